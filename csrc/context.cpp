#include "context.h"

#include "errors.h"
#include "graph.h"

#include "ggml.h"
#include "ggml-cpu.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <thread>

namespace sambay {

void threadpool_deleter::operator()(ggml_threadpool * tp) const {
    ggml_threadpool_free(tp);
}

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
    if (params_.n_seq_max == 0 || params_.n_seq_max > 4096) {
        throw std::invalid_argument("n_seq_max must be in [1, 4096], got " + std::to_string(params_.n_seq_max));
    }
    // ggml's thread pools hold at most GGML_MAX_N_THREADS workers
    for (int n : {params_.n_threads, params_.n_threads_batch}) {
        if (n > GGML_MAX_N_THREADS || n < threads_auto) {
            throw std::invalid_argument("n_threads and n_threads_batch must be at most " + std::to_string(GGML_MAX_N_THREADS) +
                                        ", and >= 0 or auto (got " + std::to_string(n) + ")");
        }
    }
    {
        const int bound = std::min(usable_cores(), (int) GGML_MAX_N_THREADS);
        auto make = [bound](int n) {  // auto: adapt within the usable cores; 0: all of them; N: N
            return n == threads_auto ? thread_tuner(bound, 0) : thread_tuner(n ? n : bound, n ? n : bound);
        };
        tuner_decode_ = make(params_.n_threads);
        tuner_batch_  = make(params_.n_threads_batch);
    }
    if (params_.kv_type != GGML_TYPE_F32 && params_.kv_type != GGML_TYPE_F16 && params_.kv_type != GGML_TYPE_BF16) {
        throw std::invalid_argument("kv_type must be F32, F16 or BF16");
    }
    params_.n_batch = std::min(params_.n_batch, params_.n_ctx);

    mem_ = std::make_unique<memory>(*model_, params_.n_ctx, params_.n_batch, params_.n_seq_max, params_.kv_type,
                                    /*v_trans*/ !params_.flash_attn);
    history_.assign(params_.n_seq_max, seq_history{});
    poisoned_.assign(params_.n_seq_max, 0);

    for (ggml_backend_dev_t dev : model_->devices()) {
        backends_.emplace_back(ggml_backend_dev_init(dev, nullptr));
        ggml_backend_t b = backends_.back().get();
        if (!b) {
            throw compute_error(std::string("cannot initialise the backend of device ") + ggml_backend_dev_name(dev));
        }
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
                std::max(tuner_decode_.n_max(), tuner_batch_.n_max()));
            // workers outside a graph's thread count, and all of them between graphs, sleep at
            // once instead of spinning first (ggml's default, poll 50): a spinning idle worker
            // takes a core from the threads that work. SAMBAY_THREAD_POLL (0..100) overrides,
            // for measurements.
            tpp.poll = 0;
            if (const char * env = std::getenv("SAMBAY_THREAD_POLL")) tpp.poll = std::clamp(std::atoi(env), 0, 100);
            threadpool_.reset(ggml_threadpool_new(&tpp));
            if (!threadpool_) {
                throw compute_error("cannot create the CPU thread pool");
            }
            ggml_backend_cpu_set_threadpool(b, threadpool_.get());
        }
    }
    // CPU-only attention formulations (graph.h, ubatch::cpu_attn) only where no GPU backend
    // takes part: with one, the scheduler would run them on the host and pull the caches back
    // for them every micro-batch. SAMBAY_CPU_ATTN=0 builds the GPU graph on the CPU too (ggml's
    // mul_mat path; flash attention split in halves of V): comparisons in tests and benchmarks.
    {
        const char * env = std::getenv("SAMBAY_CPU_ATTN");
        cpu_attn_ = !(env && std::string(env) == "0");
        // the same for the weight products of decode-sized batches (matmul_cpu.h);
        // SAMBAY_CPU_MM=0 keeps ggml's mul_mat (comparisons)
        const char * env_mm = std::getenv("SAMBAY_CPU_MM");
        cpu_mm_ = !(env_mm && std::string(env_mm) == "0");
        for (ggml_backend_dev_t dev : model_->devices()) {
            if (ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_CPU) continue;
            cpu_attn_ = false;
            cpu_mm_ = false;
            if (params_.flash_attn && !flash_attn_gpu_head_size(hp.n_embd_head)) {
                // no GPU kernel: the scheduler would run attention on the CPU (CUDA) or a
                // missing pipeline would crash (Metal)
                throw std::invalid_argument(
                    "flash_attn on " + std::string(ggml_backend_dev_name(dev)) + ": ggml's GPU backends have no "
                    "flash-attention kernel for this model's attention head size " + std::to_string(hp.n_embd_head) +
                    "; use flash_attn=False (the default attention path runs on every GPU)");
            }
        }
    }
    graph_size_ = graph_size_for(hp, std::min(params_.n_seq_max, params_.n_batch));
    graph_meta_.resize(ggml_tensor_overhead() * graph_size_ + ggml_graph_overhead_custom(graph_size_, false));
    std::vector<ggml_backend_t> backends;
    for (auto & b : backends_) backends.push_back(b.get());
    sched_.reset(ggml_backend_sched_new(backends.data(), nullptr, (int) backends.size(), graph_size_,
                                        /*parallel*/ false, /*op_offload*/ backends.size() > 1));
    if (const char * prof = std::getenv("SAMBAY_PROFILE"); prof && *prof && std::strcmp(prof, "0") != 0) {
        ggml_backend_sched_set_eval_callback(sched_.get(), &context::profile_node, this);
    }

    // reserve the compute buffers with the worst cases: a full micro-batch of one sequence at
    // the end of the context, with the logits rows this context returns, and one token of as
    // many sequences as a micro-batch holds, each at the end of its context
    auto reserve = [&](uint32_t n_seqs, uint32_t n_each) {
        std::vector<int32_t> dummy((size_t) n_seqs * n_each, 0);
        ubatch ub;
        ub.tokens = dummy.data(); ub.yoco = params_.yoco; ub.flash_attn = params_.flash_attn; ub.cpu_attn = cpu_attn_; ub.cpu_mm = cpu_mm_;
        for (uint32_t i = 0; i < n_seqs; ++i) {
            ubatch_seq us;
            us.seq = i; us.pos0 = params_.n_ctx - n_each; us.n_tokens = n_each;
            us.n_out = params_.logits_all ? n_each : 1; us.row0 = i * n_each;
            ub.seqs.push_back(us);
        }
        ggml_init_params ip = { graph_meta_.size(), graph_meta_.data(), /*no_alloc*/ true };
        ggml_context_ptr ctx(ggml_init(ip));
        ggml_cgraph * gf = ggml_new_graph_custom(ctx.get(), graph_size_, false);
        graph_builder gb(*model_, *mem_, ctx.get(), gf, ub);
        gb.build();
        if (!ggml_backend_sched_reserve(sched_.get(), gf)) {
            throw compute_error("cannot reserve the compute buffers (n_ctx " + std::to_string(params_.n_ctx) +
                                ", n_batch " + std::to_string(params_.n_batch) +
                                "): out of memory; a smaller n_ctx or n_batch needs less");
        }
    };
    reserve(1, params_.n_batch);
    if (params_.n_seq_max > 1 && params_.n_batch > 1) {
        reserve(std::min(params_.n_seq_max, params_.n_batch), 1);
    }
}

uint32_t context::n_outputs(size_t n_tokens) const {
    if (n_tokens == 0) return 0;
    return params_.logits_all ? (uint32_t) n_tokens : 1;
}

void context::set_threads(int n) {
    for (auto & bp : backends_) {
        ggml_backend_t b = bp.get();
        ggml_backend_dev_t dev = ggml_backend_get_device(b);
        ggml_backend_reg_t reg = dev ? ggml_backend_dev_backend_reg(dev) : nullptr;
        auto fn = reg ? (ggml_backend_set_n_threads_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_set_n_threads") : nullptr;
        if (fn) fn(b, n);
    }
}

void context::check_fits(uint64_t n_positions, uint32_t seq) const {
    if (n_positions > params_.n_ctx) {
        throw context_full_error((int64_t) n_positions, params_.n_ctx, seq);
    }
}

void context::check_seq(uint32_t seq) const {
    if (seq >= params_.n_seq_max) {
        throw std::invalid_argument("sequence id " + std::to_string(seq) + " is out of range (n_seq_max is " +
                                    std::to_string(params_.n_seq_max) + ")");
    }
}

uint32_t context::n_past(uint32_t seq) const {
    check_seq(seq);
    return history_[seq].n_past;  // (read without the lock: a plain value)
}

bool context::needs_reset(uint32_t seq) const {
    check_seq(seq);
    return poisoned_[seq] != 0;
}

void context::eval(const int32_t * tokens, size_t n_tokens, float * logits, const ubatch_hook & hook) {
    decode({ seq_tokens{0, tokens, n_tokens} }, logits, hook);
}

void context::decode(const std::vector<seq_tokens> & batch, float * logits, const ubatch_hook & hook) {
    std::lock_guard<std::mutex> lock(mutex_);
    const hparams & hp = model_->hp();
    const uint32_t n_vocab = hp.n_vocab;
    std::vector<uint8_t> seen(params_.n_seq_max, 0);
    std::vector<size_t>  out_row(batch.size());  // first logits row of each entry
    size_t rows = 0;
    for (size_t e = 0; e < batch.size(); ++e) {
        const seq_tokens & b = batch[e];
        check_seq(b.seq);
        if (seen[b.seq]++) {
            throw std::invalid_argument("sequence " + std::to_string(b.seq) + " appears twice in one batch");
        }
        check_tokens(b.tokens, b.n_tokens);
        check_fits((uint64_t) history_[b.seq].n_past + b.n_tokens, b.seq);
        if (poisoned_[b.seq]) {
            throw state_error("sequence " + std::to_string(b.seq) + " was cancelled in the middle of a computation: "
                              "reset it or load_state() a saved state before evaluating more tokens");
        }
        out_row[e] = rows;
        rows += n_outputs(b.n_tokens);
    }

    std::vector<size_t> done(batch.size(), 0);
    size_t n_done = 0, n_all = 0;
    for (const seq_tokens & b : batch) n_all += b.n_tokens;
    std::vector<size_t> order(batch.size());
    for (size_t e = 0; e < order.size(); ++e) order[e] = e;
    // shortest inputs first: single decode tokens always get into the next micro-batch
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return batch[a].n_tokens < batch[b].n_tokens; });
    std::vector<int32_t> tokens;
    for (;;) {
        // the next micro-batch: up to n_batch rows, the shortest remaining inputs first
        std::vector<std::pair<size_t, uint32_t>> picks;  // (entry, tokens taken)
        uint32_t budget = params_.n_batch;
        for (size_t e : order) {
            const size_t left = batch[e].n_tokens - done[e];
            if (left == 0) continue;
            if (budget == 0) break;
            const uint32_t take = (uint32_t) std::min<size_t>(left, budget);
            picks.emplace_back(e, take);
            budget -= take;
        }
        if (picks.empty()) break;
        if (abort_.exchange(false)) {
            // between micro-batches: the memory is consistent (every sequence holds what it
            // has evaluated so far), nothing poisoned
            throw aborted_error("evaluation cancelled after " + std::to_string(n_done) + " of " + std::to_string(n_all) +
                                " tokens (" + (batch.size() == 1 ? "n_past is " + std::to_string(history_[batch[0].seq].n_past)
                                                                 : std::string("each sequence keeps what it evaluated")) + ")");
        }
        // equal lengths adjacent (the Mamba groups)
        // (and, within equal lengths, by slot: a decode step on consecutive slots is one group)
        std::stable_sort(picks.begin(), picks.end(), [&](const auto & a, const auto & b) {
            return a.second != b.second ? a.second < b.second : batch[a.first].seq < batch[b.first].seq;
        });
        ubatch ub;
        ub.yoco = params_.yoco; ub.flash_attn = params_.flash_attn; ub.cpu_attn = cpu_attn_; ub.cpu_mm = cpu_mm_;
        tokens.clear();
        for (const auto & [e, take] : picks) {
            const seq_tokens & b = batch[e];
            ubatch_seq us;
            us.seq = b.seq; us.pos0 = history_[b.seq].n_past; us.n_tokens = take; us.row0 = (uint32_t) tokens.size();
            // the last row only at the end of the entry, or at every micro-batch when asked
            us.n_out = params_.logits_all ? take : (done[e] + take == b.n_tokens || hook.rows_each_ubatch ? 1 : 0);
            tokens.insert(tokens.end(), b.tokens + done[e], b.tokens + done[e] + take);
            ub.seqs.push_back(us);
        }
        ub.tokens = tokens.data();

        ggml_init_params ip = { graph_meta_.size(), graph_meta_.data(), /*no_alloc*/ true };
        ggml_context_ptr ctx(ggml_init(ip));
        {
            ggml_tensor * t_logits = compute_ubatch(ctx.get(), ub);
            size_t r = 0;  // row of the logits tensor
            for (size_t i = 0; i < picks.size(); ++i) {
                const size_t e = picks[i].first;
                const uint32_t n_out = ub.seqs[i].n_out;
                if (n_out == 0) continue;
                const size_t dst = out_row[e] + (params_.logits_all ? done[e] : 0);
                ggml_backend_tensor_get(t_logits, logits + dst * n_vocab, r * n_vocab * sizeof(float),
                                        (size_t) n_out * n_vocab * sizeof(float));
                r += n_out;
            }
        }
        for (size_t i = 0; i < picks.size(); ++i) {
            const size_t e = picks[i].first;
            history_[batch[e].seq].add(batch[e].tokens + done[e], picks[i].second);
            done[e] += picks[i].second;
            n_done += picks[i].second;
        }
        if (hook.on_ubatch && !hook.on_ubatch(n_done, n_all) && n_done < n_all) {
            throw aborted_error("evaluation stopped by the caller after " + std::to_string(n_done) + " of " +
                                std::to_string(n_all) + " tokens");
        }
    }
}

ggml_tensor * context::compute_ubatch(ggml_context * ctx, const ubatch & ub) {
    ggml_cgraph * gf = ggml_new_graph_custom(ctx, graph_size_, false);
    graph_builder gb(*model_, *mem_, ctx, gf, ub);
    ggml_tensor * t_logits = gb.build();

    ggml_backend_sched_reset(sched_.get());
    if (!ggml_backend_sched_alloc_graph(sched_.get(), gf)) {
        throw compute_error("cannot allocate the compute graph");
    }
    gb.set_inputs();
    thread_tuner & tuner = ub.n_tokens() == 1 ? tuner_decode_ : tuner_batch_;
    const int n_threads = tuner.next();
    set_threads(n_threads);
    const auto t0 = std::chrono::steady_clock::now();
    profile_t_ = t0;
    const ggml_status st = ggml_backend_sched_graph_compute(sched_.get(), gf);
    if (st == GGML_STATUS_SUCCESS) {
        tuner.record(n_threads, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(),
                     ub.n_tokens());
    }
    if (st == GGML_STATUS_ABORTED) {
        // earlier nodes (or scheduler splits) have written part of the memory of this
        // micro-batch's sequences, later ones not: their memory no longer describes any position.
        // (A cancel that came after the last node leaves the graph complete and the flag set:
        // the next micro-batch or eval stops instead.)
        abort_.store(false);
        for (const ubatch_seq & us : ub.seqs) poisoned_[us.seq] = 1;
        throw aborted_error("evaluation cancelled during a micro-batch at position " + std::to_string(ub.seqs[0].pos0) +
                            (ub.seqs.size() > 1 ? " (and " + std::to_string(ub.seqs.size() - 1) + " more sequences)" : "") +
                            ": reset() or load_state() before the next eval");
    }
    if (st != GGML_STATUS_SUCCESS) {
        throw compute_error(std::string("graph compute failed: ") + ggml_status_to_string(st));
    }
    return t_logits;
}

void context::reset() {
    std::lock_guard<std::mutex> lock(mutex_);
    mem_->clear();
    std::fill(history_.begin(), history_.end(), seq_history{});
    std::fill(poisoned_.begin(), poisoned_.end(), 0);
}

void context::reset_seq(uint32_t seq) {
    std::lock_guard<std::mutex> lock(mutex_);
    check_seq(seq);
    mem_->clear_seq(seq);
    history_[seq] = seq_history{};
    poisoned_[seq] = 0;
}

std::vector<uint8_t> context::save_state(uint32_t seq) const {
    std::lock_guard<std::mutex> lock(mutex_);
    check_seq(seq);
    return mem_->save(seq, history_[seq]);
}

void context::load_state(const std::vector<uint8_t> & data, uint32_t seq, const std::vector<int32_t> * tokens) {
    std::lock_guard<std::mutex> lock(mutex_);
    check_seq(seq);
    seq_history claimed;
    if (tokens) claimed.add(tokens->data(), tokens->size());
    history_[seq] = mem_->load(seq, data, tokens ? &claimed : nullptr);
    poisoned_[seq] = 0;
}

thread_tuner context::threads(bool batch) const {
    std::lock_guard<std::mutex> lock(mutex_);
    return batch ? tuner_batch_ : tuner_decode_;
}

size_t context::huge_page_bytes() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return mem_->huge_page_bytes();
}

std::map<std::string, size_t> context::memory_breakdown() const {
    std::lock_guard<std::mutex> lock(mutex_);
    auto out = mem_->breakdown();
    size_t compute = 0;
    for (auto & b : backends_) compute += ggml_backend_sched_get_buffer_size(sched_.get(), b.get());
    out["compute"] = compute;
    out["weights"] = model_->weights_bytes();
    // one sequence's share of the caches (every sequence has the same regions)
    out["n_seq_max"] = params_.n_seq_max;
    out["per_sequence"] = (out["mamba_conv"] + out["mamba_ssm"] + out["swa_kv"] + out["full_kv"]) / params_.n_seq_max;
    return out;
}

bool context::profile_node(ggml_tensor * t, bool ask, void * ud) {
    if (ask) return true;  // every node on its own, so each one's time can be taken
    context & c = *(context *) ud;
    const auto now = std::chrono::steady_clock::now();
    std::string key = ggml_op_desc(t);
    if (t->op == GGML_OP_MUL_MAT && t->src[0] && std::strncmp(t->src[0]->name, "blk.", 4) == 0) {
        // a weight product: "MUL_MAT attn_qkv.weight" for every layer's blk.N.attn_qkv.weight
        const char * dot = std::strchr(t->src[0]->name + 4, '.');
        key += std::string(" ") + (dot ? dot + 1 : t->src[0]->name);
    } else if (t->op == GGML_OP_MUL_MAT || t->op == GGML_OP_GET_ROWS) {
        // "MUL_MAT cache_k" for every layer's "cache_k_l5 (reshaped) (view)", "GET_ROWS l_out"
        std::string src = t->src[0] && t->src[0]->name[0] ? t->src[0]->name : "(activations)";
        src = src.substr(0, src.find(' '));
        const size_t cut = std::min(src.rfind("_l"), src.rfind('-'));
        if (cut != std::string::npos && cut + 1 < src.size() &&
            src.find_first_not_of("0123456789", cut + (src[cut] == '-' ? 1 : 2)) == std::string::npos) {
            src.resize(cut);
        }
        key += " " + src;
    } else if (t->op == GGML_OP_CUSTOM && t->name[0]) {
        key += std::string(" ") + t->name;
    }
    auto & e = c.profile_[key];
    e.first += 1;
    e.second += std::chrono::duration<double>(now - c.profile_t_).count();
    c.profile_t_ = now;
    return true;
}

std::map<std::string, std::pair<uint64_t, double>> context::op_profile() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return profile_;
}

void context::reset_op_profile() {
    std::lock_guard<std::mutex> lock(mutex_);
    profile_.clear();
}

} // namespace sambay
