// A context: one sequence evaluated on a model, with its memory (memory.h), a backend
// scheduler over the model's devices, and the micro-batching of eval().
#pragma once

#include "memory.h"
#include "model.h"

#include "ggml-backend.h"

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace sambay {

struct context_params {
    uint32_t  n_ctx           = 0;     // 0: the trained context (context_length)
    uint32_t  n_batch         = 512;   // micro-batch size
    int       n_threads       = 0;     // decode (1 token); 0: hardware concurrency
    int       n_threads_batch = 0;     // prefill; 0: n_threads
    bool      logits_all      = false; // logits of every token instead of the last one
    ggml_type kv_type         = GGML_TYPE_F16;
    bool      yoco            = true;  // run the cross-decoder on output rows only
    bool      flash_attn      = false; // ggml_flash_attn_ext instead of mul_mat + soft_max
};

class context {
public:
    context(std::shared_ptr<const model> m, const context_params & params);
    ~context();
    context(const context &) = delete;
    context & operator=(const context &) = delete;

    // rows of logits eval(n tokens) returns: n with logits_all, else 1 (0 for n == 0)
    uint32_t n_outputs(size_t n_tokens) const;
    // checks tokens (std::invalid_argument) and the context size (context_full_error) before any
    // compute, then evaluates them in micro-batches continuing the sequence; writes
    // n_outputs(n) rows of n_vocab floats to logits
    void eval(const int32_t * tokens, size_t n_tokens, float * logits);

    uint32_t n_past() const { return n_past_; }  // (read without the lock: a plain value)
    void     reset();

    // Cancellation, callable from any thread while another one is in eval(): the running graph
    // stops at its next node (the CPU backend's abort callback) and eval throws aborted_error.
    // A request made while no eval runs is kept and stops the next eval before it computes
    // anything (clear_cancel() drops it). After an abort the memory holds a partly computed
    // micro-batch: eval throws state_error until reset() or load_state().
    void     cancel() { abort_.store(true); }
    void     clear_cancel() { abort_.store(false); }
    bool     cancel_requested() const { return abort_.load(); }
    bool     needs_reset() const { return poisoned_; }
    std::vector<uint8_t> save_state() const;
    void                 load_state(const std::vector<uint8_t> & data);

    std::map<std::string, size_t> memory_breakdown() const;
    const context_params & params() const { return params_; }
    const model & get_model() const { return *model_; }
    std::string device_name() const { return model_->device_name(); }

private:
    void eval_ubatch(const int32_t * tokens, uint32_t n, uint32_t n_out, float * logits);
    void set_threads(int n);

    std::shared_ptr<const model>   model_;
    context_params                 params_;
    std::unique_ptr<memory>        mem_;
    std::vector<ggml_backend_t>    backends_;
    ggml_threadpool_t              threadpool_ = nullptr;  // persistent CPU workers (see constructor)
    ggml_backend_sched_t           sched_ = nullptr;
    size_t                         graph_size_ = 0;
    std::vector<uint8_t>           graph_meta_;  // memory for graph tensor headers
    uint32_t                       n_past_ = 0;
    std::atomic<bool>              abort_{false};
    bool                           poisoned_ = false;  // an aborted compute left the memory half-written
    mutable std::mutex             mutex_;  // one eval/state call at a time (the GIL is released)
};

} // namespace sambay
