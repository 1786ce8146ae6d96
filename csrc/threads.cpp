#include "threads.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <thread>

#ifdef __linux__
#include <sched.h>
#endif

namespace sambay {

int usable_cores() {
#ifdef __linux__
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof(set), &set) == 0) {
        const int n = CPU_COUNT(&set);
        if (n > 0) return n;
    }
#endif
    return std::max(1u, std::thread::hardware_concurrency());
}

thread_tuner::thread_tuner(int n_max, int n_fixed)
    : n_max_(n_max), fixed_(n_fixed), cur_(n_max), wait_(k_first_wait), backoff_(k_min_wait) {
    if (n_max < 1 || n_fixed < 0 || n_fixed > n_max) {
        throw std::invalid_argument("thread_tuner: need 1 <= n_max and 0 <= n_fixed <= n_max (got n_max " +
                                    std::to_string(n_max) + ", n_fixed " + std::to_string(n_fixed) + ")");
    }
}

int thread_tuner::next() {
    if (fixed_) return fixed_;
    if (probe_) return probe_;
    if (wait_ > 0 || n_avg_ == 0 || n_max_ == 1) return cur_;
    // a neighbour on this side, or the other side at a bound
    int cand = cur_ + dir_;
    if (cand < 1 || cand > n_max_) {
        dir_ = -dir_;
        cand = cur_ + dir_;
    }
    probe_ = cand;
    probe_n_ = 0;
    probe_sum_ = 0.0;
    ++n_probes_;
    return probe_;
}

void thread_tuner::record(int n, double seconds, uint64_t n_tokens) {
    if (fixed_ || n_tokens == 0 || !(seconds >= 0.0)) return;
    if (!warm_) {
        warm_ = true;
        return;
    }
    const double per = seconds / (double) n_tokens;
    if (probe_ && n == probe_) {
        probe_sum_ += per;
        const bool hopeless = per > avg_ * k_slow;
        if (++probe_n_ < k_probe_steps && !hopeless) return;
        const double mean = probe_sum_ / probe_n_;
        if (!hopeless && mean < avg_ * (1.0 - k_margin)) {
            // keep going the same way at the next probe: the best count may be further along
            cur_ = probe_;
            avg_ = mean;
            n_slow_ = 0;
            n_avg_ = (uint64_t) probe_n_;
            backoff_ = k_min_wait;
            ++n_switches_;
        } else {
            dir_ = -dir_;
            const double cost = std::ceil(k_cost_steps * mean / avg_);
            backoff_ = (int) std::min<double>(std::max<double>(2.0 * backoff_, cost), k_max_wait);
        }
        wait_ = backoff_;
        probe_ = 0;
        return;
    }
    if (n != cur_) return;  // not a count this tuner chose
    if (n_avg_ == 0) {
        avg_ = per;
    } else {
        if (n_slow_ == 0) slow_ref_ = avg_;  // a streak is measured against the time before it
        n_slow_ = per > slow_ref_ * k_slow ? n_slow_ + 1 : 0;
        avg_ += k_alpha * (per - avg_);
    }
    ++n_avg_;
    if (wait_ > 0) --wait_;
    if (n_slow_ >= k_slow_steps) {
        wait_ = 0;  // conditions changed: probe at the next step (the backoff stays)
        n_slow_ = 0;
    }
}

} // namespace sambay
