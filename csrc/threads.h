// CPU thread counts per graph kind: a fixed count, or one the engine adapts by timing its own
// steps (thread_tuner). Why adapt: ggml's workers meet at a spin barrier after every graph node,
// so on a machine whose cores are busy with other work a descheduled worker stalls the others for
// a scheduler time slice at each barrier; there one thread can be several times faster than two.
// No fixed default is right on both an idle and a busy machine; a measured one is.
#pragma once

#include <cstdint>

namespace sambay {

// the cores this process may run on: its CPU affinity mask on Linux, the hardware concurrency
// elsewhere; at least 1
int usable_cores();

// Chooses the thread count of one kind of step (decode-sized or prefill-sized graphs).
//
// Contract: the caller asks next() before each step, runs the step with that count, and reports
// it with record(n, seconds, n_tokens). A fixed tuner (n_fixed > 0) always answers n_fixed. An
// adaptive one (n_fixed == 0) keeps a running time per token for its current count and now and
// then runs a few steps ("a probe") with a neighbouring count (one less or one more, alternating
// sides, within [1, n_max]):
//   - the probe is clearly faster (by k_margin) than the running time: it becomes the current count;
//   - else the current count holds, and the wait before the next probe doubles (k_min_wait ..
//     k_max_wait steps, and at least k_cost_steps times the probe's slowdown), so a settled
//     choice costs little;
//   - k_slow_steps steps in a row much slower than the running time (k_slow: other programs
//     started; one slow step is noise on a shared machine) end the wait: the next step probes;
//   - a probe step much slower than the running time ends its probe at once (more threads on
//     busy cores can be several times slower: a failed probe should cost one step, not two).
// The first step reported is not used (it pays one-time costs: page faults, caches).
// Pure logic on the numbers it is given (no clock, no threads): tests feed it synthetic times.
class thread_tuner {
public:
    static constexpr int    k_probe_steps = 2;     // steps per probe (their mean is compared)
    static constexpr int    k_first_wait  = 1;     // steps before the first probe (after the unused one)
    static constexpr int    k_min_wait    = 4;     // steps before the next probe after a switch
    static constexpr int    k_max_wait    = 1024;  // the longest wait between probes
    // a failed probe r times slower than the current count waits at least k_cost_steps·r steps:
    // on busy cores two threads can be 30x slower than one, and failed probes should stay
    // near 1/k_cost_steps of the time
    static constexpr int    k_cost_steps  = 16;
    static constexpr double k_margin      = 0.10;  // a probe must be 10% faster to switch
    static constexpr double k_slow        = 1.5;   // a step this much slower than the average is "slow"
    static constexpr int    k_slow_steps  = 3;     // slow steps in a row that make the next step probe
    static constexpr double k_alpha       = 0.25;  // weight of a new step in the running time

    // n_max: the largest count (>= 1); n_fixed: 0 to adapt, else the count to keep (<= n_max)
    thread_tuner(int n_max, int n_fixed);

    int  next();                                          // the count for the next step
    void record(int n, double seconds, uint64_t n_tokens);  // a finished step that ran with n

    bool     adaptive() const { return fixed_ == 0; }
    int      current() const { return fixed_ ? fixed_ : cur_; }  // the count steps run with outside probes
    int      n_max() const { return n_max_; }
    uint64_t n_probes() const { return n_probes_; }
    uint64_t n_switches() const { return n_switches_; }

private:
    int      n_max_;
    int      fixed_;
    int      cur_;
    double   avg_      = 0.0;  // running seconds per token at cur_ (valid when n_avg_ > 0)
    uint64_t n_avg_    = 0;
    bool     warm_     = false;  // the first step has been seen
    int      probe_    = 0;      // count being probed (0: none)
    int      probe_n_  = 0;      // probe steps recorded
    double   probe_sum_ = 0.0;   // their seconds per token
    int      wait_;              // steps at cur_ before the next probe
    int      backoff_;           // the wait after a probe that did not switch
    int      dir_ = -1;          // side of the next probe
    int      n_slow_ = 0;        // slow steps in a row at cur_
    double   slow_ref_ = 0.0;    // the running time before them
    uint64_t n_probes_ = 0;
    uint64_t n_switches_ = 0;
};

} // namespace sambay
