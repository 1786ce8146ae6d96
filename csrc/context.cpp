#include "context.h"

#include "errors.h"
#include "graph.h"

#include "ggml.h"
#include "ggml-cpu.h"

#include <algorithm>
#include <stdexcept>
#include <thread>

namespace sambay {

context::context(std::shared_ptr<const model> m, const context_params & params)
    : model_(std::move(m)), params_(params) {
    const hparams & hp = model_->hp();
    if (params_.n_ctx == 0) {
        params_.n_ctx = hp.n_ctx_train;
    }
    if (params_.n_ctx > (1u << 24)) {
        throw std::invalid_argument("n_ctx " + std::to_string(params_.n_ctx) + " is absurdly large (max 16777216)");
    }
    if (params_.n_batch == 0) {
        throw std::invalid_argument("n_batch must be positive");
    }
    // ggml's thread pools hold at most GGML_MAX_N_THREADS workers
    if (params_.n_threads > GGML_MAX_N_THREADS || params_.n_threads_batch > GGML_MAX_N_THREADS) {
        throw std::invalid_argument("n_threads and n_threads_batch must be at most " +
                                    std::to_string(GGML_MAX_N_THREADS) + " (got " +
                                    std::to_string(std::max(params_.n_threads, params_.n_threads_batch)) + ")");
    }
    if (params_.n_threads <= 0) {
        params_.n_threads = std::max(1u, std::thread::hardware_concurrency());
    }
    if (params_.n_threads_batch <= 0) {
        params_.n_threads_batch = params_.n_threads;
    }
    if (params_.kv_type != GGML_TYPE_F32 && params_.kv_type != GGML_TYPE_F16 && params_.kv_type != GGML_TYPE_BF16) {
        throw std::invalid_argument("kv_type must be F32, F16 or BF16");
    }
    params_.n_batch = std::min(params_.n_batch, params_.n_ctx);

    mem_ = std::make_unique<memory>(*model_, params_.n_ctx, params_.n_batch, params_.kv_type,
                                    /*v_trans*/ !params_.flash_attn);

    for (ggml_backend_dev_t dev : model_->devices()) {
        ggml_backend_t b = ggml_backend_dev_init(dev, nullptr);
        if (!b) {
            throw compute_error(std::string("cannot initialise the backend of device ") + ggml_backend_dev_name(dev));
        }
        backends_.push_back(b);
        // cancel(): the backend checks the flag between graph nodes
        ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
        auto set_abort = reg ? (ggml_backend_set_abort_callback_t)
            ggml_backend_reg_get_proc_address(reg, "ggml_backend_set_abort_callback") : nullptr;
        if (set_abort) {
            set_abort(b, [](void * ud) { return ((std::atomic<bool> *) ud)->load(std::memory_order_relaxed); }, &abort_);
        }
        if (ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_CPU && !threadpool_) {
            // one persistent pool for this context: without it the CPU backend starts and joins
            // its worker threads on every graph compute (every decoded token)
            ggml_threadpool_params tpp = ggml_threadpool_params_default(
                std::max(params_.n_threads, params_.n_threads_batch));
            threadpool_ = ggml_threadpool_new(&tpp);
            if (!threadpool_) {
                throw compute_error("cannot create the CPU thread pool");
            }
            ggml_backend_cpu_set_threadpool(b, threadpool_);
        }
    }
    graph_size_ = graph_size_for(hp);
    graph_meta_.resize(ggml_tensor_overhead() * graph_size_ + ggml_graph_overhead_custom(graph_size_, false));
    sched_ = ggml_backend_sched_new(backends_.data(), nullptr, (int) backends_.size(), graph_size_,
                                    /*parallel*/ false, /*op_offload*/ backends_.size() > 1);

    // reserve the compute buffers with the worst case: a full micro-batch at the end of the
    // context, with the logits rows this context returns
    {
        std::vector<int32_t> dummy(params_.n_batch, 0);
        ubatch ub;
        ub.tokens = dummy.data(); ub.n_tokens = params_.n_batch;
        ub.pos0 = params_.n_ctx - params_.n_batch; ub.yoco = params_.yoco;
        ub.n_out = params_.logits_all ? params_.n_batch : 1;
        ub.flash_attn = params_.flash_attn;
        ggml_init_params ip = { graph_meta_.size(), graph_meta_.data(), /*no_alloc*/ true };
        ggml_context * ctx = ggml_init(ip);
        ggml_cgraph * gf = ggml_new_graph_custom(ctx, graph_size_, false);
        graph_builder gb(*model_, *mem_, ctx, gf, ub);
        gb.build();
        const bool ok = ggml_backend_sched_reserve(sched_, gf);
        ggml_free(ctx);
        if (!ok) {
            throw compute_error("cannot reserve the compute buffers");
        }
    }
}

context::~context() {
    if (sched_) ggml_backend_sched_free(sched_);
    for (auto * b : backends_) ggml_backend_free(b);
    if (threadpool_) ggml_threadpool_free(threadpool_);
}

uint32_t context::n_outputs(size_t n_tokens) const {
    if (n_tokens == 0) return 0;
    return params_.logits_all ? (uint32_t) n_tokens : 1;
}

void context::set_threads(int n) {
    for (auto * b : backends_) {
        ggml_backend_dev_t dev = ggml_backend_get_device(b);
        ggml_backend_reg_t reg = dev ? ggml_backend_dev_backend_reg(dev) : nullptr;
        auto fn = reg ? (ggml_backend_set_n_threads_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_set_n_threads") : nullptr;
        if (fn) fn(b, n);
    }
}

void context::eval(const int32_t * tokens, size_t n_tokens, float * logits) {
    std::lock_guard<std::mutex> lock(mutex_);
    const hparams & hp = model_->hp();
    for (size_t i = 0; i < n_tokens; ++i) {
        if (tokens[i] < 0 || (uint32_t) tokens[i] >= hp.n_vocab) {
            throw std::invalid_argument("invalid token id " + std::to_string(tokens[i]) + " at index " +
                                        std::to_string(i) + " (n_vocab is " + std::to_string(hp.n_vocab) + ")");
        }
    }
    if ((uint64_t) n_past_ + n_tokens > params_.n_ctx) {
        throw context_full_error((int64_t) (n_past_ + n_tokens), params_.n_ctx);
    }
    if (poisoned_) {
        throw state_error("the context was cancelled in the middle of a computation: reset() it or "
                          "load_state() a saved state before evaluating more tokens");
    }
    const uint32_t n_vocab = hp.n_vocab;
    for (size_t i = 0; i < n_tokens; i += params_.n_batch) {
        const uint32_t n = (uint32_t) std::min<size_t>(params_.n_batch, n_tokens - i);
        const bool last = i + n == n_tokens;
        const uint32_t n_out = params_.logits_all ? n : (last ? 1 : 0);
        float * out = params_.logits_all ? logits + i * (size_t) n_vocab : logits;
        if (abort_.exchange(false)) {
            // between micro-batches: the memory is consistent (n_past_ tokens), nothing poisoned
            throw aborted_error("evaluation cancelled after " + std::to_string(i) + " of " +
                                std::to_string(n_tokens) + " tokens (n_past is " + std::to_string(n_past_) + ")");
        }
        eval_ubatch(tokens + i, n, n_out, out);
    }
}

void context::eval_ubatch(const int32_t * tokens, uint32_t n, uint32_t n_out, float * logits) {
    ubatch ub;
    ub.tokens = tokens; ub.n_tokens = n; ub.pos0 = n_past_; ub.n_out = n_out; ub.yoco = params_.yoco;
    ub.flash_attn = params_.flash_attn;

    ggml_init_params ip = { graph_meta_.size(), graph_meta_.data(), /*no_alloc*/ true };
    ggml_context * ctx = ggml_init(ip);
    ggml_cgraph * gf = ggml_new_graph_custom(ctx, graph_size_, false);
    graph_builder gb(*model_, *mem_, ctx, gf, ub);
    ggml_tensor * t_logits = gb.build();

    ggml_backend_sched_reset(sched_);
    if (!ggml_backend_sched_alloc_graph(sched_, gf)) {
        ggml_free(ctx);
        throw compute_error("cannot allocate the compute graph");
    }
    gb.set_inputs();
    set_threads(n == 1 ? params_.n_threads : params_.n_threads_batch);
    const ggml_status st = ggml_backend_sched_graph_compute(sched_, gf);
    if (st == GGML_STATUS_ABORTED) {
        // earlier nodes (or scheduler splits) have written part of the memory for this
        // micro-batch, later ones not: the memory no longer describes any position.
        // (A cancel that came after the last node leaves the graph complete and the flag set:
        // the next micro-batch or eval stops instead.)
        ggml_free(ctx);
        abort_.store(false);
        poisoned_ = true;
        throw aborted_error("evaluation cancelled during a micro-batch at position " + std::to_string(n_past_) +
                            ": reset() or load_state() before the next eval");
    }
    if (st != GGML_STATUS_SUCCESS) {
        ggml_free(ctx);
        throw compute_error(std::string("graph compute failed: ") + ggml_status_to_string(st));
    }
    if (t_logits) {
        ggml_backend_tensor_get(t_logits, logits, 0, ggml_nbytes(t_logits));
    }
    ggml_free(ctx);
    n_past_ += n;
}

void context::reset() {
    std::lock_guard<std::mutex> lock(mutex_);
    mem_->clear();
    n_past_ = 0;
    poisoned_ = false;
}

std::vector<uint8_t> context::save_state() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return mem_->save(n_past_);
}

void context::load_state(const std::vector<uint8_t> & data) {
    std::lock_guard<std::mutex> lock(mutex_);
    n_past_ = mem_->load(data);
    poisoned_ = false;
}

std::map<std::string, size_t> context::memory_breakdown() const {
    std::lock_guard<std::mutex> lock(mutex_);
    auto out = mem_->breakdown();
    size_t compute = 0;
    for (auto * b : backends_) compute += ggml_backend_sched_get_buffer_size(sched_, b);
    out["compute"] = compute;
    out["weights"] = model_->weights_bytes();
    return out;
}

} // namespace sambay
