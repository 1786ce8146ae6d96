// A context: up to n_seq_max sequences evaluated on a model, with their memory (memory.h), a
// backend scheduler over the model's devices, and the micro-batching of decode()/eval().
#pragma once

#include "graph.h"
#include "memory.h"
#include "model.h"
#include "threads.h"

#include "ggml-backend.h"
#include "ggml-cpp.h"

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace sambay {

struct threadpool_deleter {
    void operator()(ggml_threadpool * tp) const;
};

constexpr int threads_auto = -1;

struct context_params {
    uint32_t  n_ctx           = 0;     // 0: the trained context (context_length), per sequence
    uint32_t  n_batch         = 512;   // micro-batch size (rows of all sequences together)
    uint32_t  n_seq_max       = 1;     // sequences (slots 0 .. n_seq_max-1), each of n_ctx positions
    // CPU threads for steps of one token (n_threads) and of several (n_threads_batch):
    // threads_auto adapts the count by timing (thread_tuner, threads.h), 0 is every usable core,
    // N is exactly N
    int       n_threads       = threads_auto;
    int       n_threads_batch = threads_auto;
    bool      logits_all      = false; // logits of every token instead of the last one
    ggml_type kv_type         = GGML_TYPE_F16;
    bool      yoco            = true;  // run the cross-decoder on output rows only
    bool      flash_attn      = false; // ggml_flash_attn_ext instead of mul_mat + soft_max
};

// one sequence's tokens in a decode() call
struct seq_tokens {
    uint32_t        seq      = 0;
    const int32_t * tokens   = nullptr;
    size_t          n_tokens = 0;
};

// decode()'s hook between micro-batches.
struct ubatch_hook {
    // called after each micro-batch (the last one too) with the tokens of the call evaluated so
    // far and the call's total, over all entries; returning false stops decode() there (the
    // memory then holds exactly those n_done tokens). An exception it throws leaves the same way.
    std::function<bool(size_t n_done, size_t n_total)> on_ubatch;
    // every micro-batch writes each entry's last evaluated row (logits_all writes all rows
    // anyway), so that a stop leaves the logits of the tokens evaluated in place. Cost: one row
    // through the cross-decoder per micro-batch that would otherwise stop after the shared KV.
    bool rows_each_ubatch = false;
};

class context {
public:
    context(std::shared_ptr<const model> m, const context_params & params);
    context(const context &) = delete;
    context & operator=(const context &) = delete;

    // rows of logits a sequence's n tokens give: n with logits_all, else 1 (0 for n == 0)
    uint32_t n_outputs(size_t n_tokens) const;
    // Evaluates every entry's tokens continuing its sequence (distinct sequences). Checks every
    // sequence id and token (std::invalid_argument), context size (context_full_error naming the
    // sequence) and state before any compute. The one place an input is cut into micro-batches:
    // each takes up to n_batch rows of several sequences (the shortest inputs first, so decoding
    // sequences are never held back by more than one chunk of a long prompt); each weight
    // matrix is multiplied once per micro-batch. Writes, entry after entry, n_outputs(n_tokens)
    // rows of n_vocab floats to logits.
    // With hook.on_ubatch: called after every micro-batch; when it returns false before the
    // end, decode() throws aborted_error (logits rows written so far stay: with logits_all the
    // first n_done rows of each entry; with hook.rows_each_ubatch the entry's last evaluated
    // row). A cancel() between micro-batches throws the same way, after every micro-batch
    // before it was reported.
    void decode(const std::vector<seq_tokens> & batch, float * logits, const ubatch_hook & hook = {});
    // decode() of sequence 0 alone
    void eval(const int32_t * tokens, size_t n_tokens, float * logits, const ubatch_hook & hook = {});

    uint32_t n_past(uint32_t seq = 0) const;  // positions sequence `seq` holds
    void     reset();                         // every sequence empty
    void     reset_seq(uint32_t seq);         // sequence `seq` empty

    // throws std::invalid_argument naming the first token id outside [0, n_vocab): the one
    // check, made by decode() and, before narrowing to int32, by the binding (any integer type)
    template <typename T> void check_tokens(const T * tokens, size_t n_tokens) const {
        const uint32_t n_vocab = model_->hp().n_vocab;
        for (size_t i = 0; i < n_tokens; ++i) {
            if (tokens[i] < 0 || (uint64_t) tokens[i] >= n_vocab) {
                throw std::invalid_argument("invalid token id " + std::to_string(tokens[i]) + " at index " +
                                            std::to_string(i) + " (n_vocab is " + std::to_string(n_vocab) + ")");
            }
        }
    }
    // throws context_full_error when sequence `seq` of `n_positions` would not fit: the one
    // check, made by decode() and by callers that feed a sequence in several calls (sambay.Llama)
    void check_fits(uint64_t n_positions, uint32_t seq = 0) const;

    // Cancellation, callable from any thread while another one is in eval(): the running graph
    // stops at its next node (the CPU backend's abort callback) and eval throws aborted_error.
    // A request made while no eval runs is kept and stops the next eval before it computes
    // anything (clear_cancel() drops it). After an abort the memory holds a partly computed
    // micro-batch: eval throws state_error until reset() or load_state().
    void     cancel() { abort_.store(true); }
    void     clear_cancel() { abort_.store(false); }
    bool     cancel_requested() const { return abort_.load(); }
    bool     needs_reset(uint32_t seq = 0) const;
    // one sequence's state; loads into any sequence of a context of the same model and KV type.
    // With tokens, the state must have been saved after exactly those tokens (state_error else).
    std::vector<uint8_t> save_state(uint32_t seq = 0) const;
    void                 load_state(const std::vector<uint8_t> & data, uint32_t seq = 0,
                                    const std::vector<int32_t> * tokens = nullptr);

    std::map<std::string, size_t> memory_breakdown() const;
    size_t huge_page_bytes() const;  // of the caches (memory::huge_page_bytes)
    // the thread count chooser of single-token steps (batch false) or of longer ones (true):
    // a copy, taken under the lock (waits for a running eval)
    thread_tuner threads(bool batch) const;
    const context_params & params() const { return params_; }
    // time spent per kind of graph node since the context was made or last reset, when the
    // context was made with SAMBAY_PROFILE=1 (empty otherwise): key "OP" or "OP name" (weight
    // products and named custom ops), value (nodes computed, seconds). Profiling computes the
    // graph one node at a time, so the sum exceeds an unprofiled step by the per-node dispatch.
    std::map<std::string, std::pair<uint64_t, double>> op_profile() const;
    void reset_op_profile();
    const model & get_model() const { return *model_; }
    std::string device_name() const { return model_->device_name(); }

private:
    // computes one micro-batch; returns the logits tensor (nullptr without output rows)
    ggml_tensor * compute_ubatch(ggml_context * ctx, const ubatch & ub);
    void set_threads(int n);
    void check_seq(uint32_t seq) const;

    std::shared_ptr<const model>   model_;
    context_params                 params_;
    std::unique_ptr<memory>        mem_;
    // destroyed in reverse order: the scheduler, then the backends, then their thread pool
    std::unique_ptr<ggml_threadpool, threadpool_deleter> threadpool_;  // persistent CPU workers (see constructor)
    std::vector<ggml_backend_ptr>  backends_;
    ggml_backend_sched_ptr         sched_;
    size_t                         graph_size_ = 0;
    thread_tuner                   tuner_decode_{1, 0};  // single-token steps
    thread_tuner                   tuner_batch_{1, 0};   // steps of several tokens
    bool                           cpu_attn_ = false;  // every device is the CPU: attention scores by attn_cpu.h
    bool                           cpu_mm_ = false;    // every device is the CPU: decode weight products by matmul_cpu.h
    std::vector<uint8_t>           graph_meta_;  // memory for graph tensor headers
    std::vector<seq_history>       history_;   // per sequence: n_past and its tokens' hash
    std::atomic<bool>              abort_{false};
    std::vector<uint8_t>           poisoned_;  // per sequence: an aborted compute left its memory half-written
    mutable std::mutex             mutex_;  // one eval/state call at a time (the GIL is released)
    // SAMBAY_PROFILE: per node kind (nodes, seconds), and when the last node finished
    std::map<std::string, std::pair<uint64_t, double>> profile_;
    std::chrono::steady_clock::time_point              profile_t_;
    static bool profile_node(ggml_tensor * t, bool ask, void * ud);
};

} // namespace sambay
