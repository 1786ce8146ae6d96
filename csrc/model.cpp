#include "model.h"

#include "errors.h"
#include "hash.h"
#include "hugepages.h"
#include "matmul_cpu.h"
#include "log.h"

#include "ggml.h"
#include "gguf.h"

#include <algorithm>
#include <cstring>
#include <map>

namespace sambay {

model::model(const std::string & path, const model_params & params) {
    use_extra_bufts_ = params.use_extra_bufts;
    file_    = std::make_unique<gguf_file>(path, params.use_mmap);
    hparams_ = hparams::from_gguf(file_->gguf());
    select_devices(params);
    create_tensors();
    compute_fingerprint();
    log_scope quiet(log_scope::mode::quiet);  // backends log every repacked tensor at info level
    load_data(params.use_mmap);
}

void model::select_devices(const model_params & params) {
    static bool loaded = (ggml_backend_load_all(), true);
    (void) loaded;

    ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    if (!cpu) {
        throw load_error("ggml has no CPU device");
    }
    ggml_backend_dev_t gpu = nullptr;
    if (params.device == "auto") {
        for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
            ggml_backend_dev_t d = ggml_backend_dev_get(i);
            const auto t = ggml_backend_dev_type(d);
            if (t == GGML_BACKEND_DEVICE_TYPE_GPU || t == GGML_BACKEND_DEVICE_TYPE_IGPU) {
                gpu = d;
                break;
            }
        }
    } else if (params.device != "cpu" && params.device != "CPU") {
        gpu = ggml_backend_dev_by_name(params.device.c_str());
        if (!gpu) {
            std::string names;
            for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
                names += std::string(i ? ", " : "") + ggml_backend_dev_name(ggml_backend_dev_get(i));
            }
            throw load_error("no ggml device named '" + params.device + "' (available: " + names + ")");
        }
        if (gpu == cpu) {
            gpu = nullptr;
        }
    }
    const uint32_t n_layer = hparams_.n_layer;
    uint32_t n_gpu = 0;
    if (gpu && params.n_gpu_layers != 0) {
        n_gpu = params.n_gpu_layers < 0 ? n_layer + 1 : (uint32_t) params.n_gpu_layers;
    }
    // the output goes to the GPU too when n_gpu > n_layer (llama.cpp's rule)
    const layer_span span = gpu_layers(hparams_, n_gpu);
    layer_dev_.resize(n_layer);
    for (uint32_t il = 0; il < n_layer; ++il) {
        layer_dev_[il] = (gpu && il >= span.first && il < span.first + span.n) ? gpu : cpu;
    }
    output_dev_ = (gpu && n_gpu > n_layer) ? gpu : cpu;
    if (gpu && n_gpu > 0) {
        devices_.push_back(gpu);
    }
    devices_.push_back(cpu);
}

layer_span gpu_layers(const hparams & hp, uint32_t n_gpu) {
    const uint32_t n_layer = hp.n_layer, writer = hp.kv_shared_layer;
    const uint32_t n = std::min(n_gpu, n_layer);
    // hparams checks that every reader comes after the writer: [writer, n_layer) holds them all
    if (n >= n_layer - writer || n > writer) {
        return { n_layer - n, n };
    }
    return { writer - n, n };
}

std::string model::device_name() const {
    std::map<ggml_backend_dev_t, int> count;
    for (auto * d : layer_dev_) count[d]++;
    std::string out = ggml_backend_dev_name(output_dev_);
    if (count.size() > 1) {
        out.clear();
        for (auto * d : devices_) {
            out += std::string(out.empty() ? "" : "+") + ggml_backend_dev_name(d) + "(" +
                   std::to_string(count[d]) + " layers)";
        }
    }
    return out;
}

size_t model::weights_bytes() const {
    size_t n = 0;
    for (const auto & [t, d] : tensors_) n += ggml_nbytes(t);
    return n;
}

void model::compute_fingerprint() {
    const hparams & hp = hparams_;
    fnv1a f;
    for (uint32_t v : { hp.n_vocab, hp.n_ctx_train, hp.n_embd, hp.n_layer, hp.n_ff, hp.n_head, hp.n_head_kv,
                        hp.n_embd_head, hp.n_swa, hp.d_conv, hp.d_inner, hp.d_state, hp.dt_rank,
                        hp.memory_layer, hp.kv_shared_layer }) {
        f.add(v);
    }
    f.add(hp.norm_eps); f.add(hp.sub_norm_eps);
    f.add(hp.kinds.data(), hp.kinds.size() * sizeof(layer_kind));
    f.add(hp.lambda.data(), hp.lambda.size() * sizeof(float));
    f.add(hp.lambda_init.data(), hp.lambda_init.size() * sizeof(float));
    // three 32-byte windows of each tensor's data: O(n_tensors) small reads, whatever the size
    constexpr size_t window = 32;
    uint8_t buf[window];
    for (const auto & [t, dev] : tensors_) {
        f.add(std::string(ggml_get_name(t)));
        f.add((int32_t) t->type);
        f.add(t->ne, sizeof(t->ne));
        const size_t n = ggml_nbytes(t);
        const size_t base = file_->data_offset(t);
        for (size_t off : { (size_t) 0, n / 2, n > window ? n - window : 0 }) {
            const size_t m = std::min(window, n - std::min(off, n));
            file_->read(base + off, buf, m);
            f.add(buf, m);
        }
    }
    fingerprint_ = f.h;

    const std::string & path = file_->path();
    label_ = "'" + path.substr(path.find_last_of('/') + 1) + "'";
    std::string name;
    if (gguf_get_string(file_->gguf(), "general.name", name) && !name.empty()) {
        label_ += " (general.name '" + name + "')";
    }
}

// ---------------------------------------------------------------------------------------------

namespace {

enum class wtype { f32, matrix };  // f32: must be F32; matrix: any float or quantized type

struct tensor_checker {
    ggml_context * meta;
    std::vector<std::string> problems;
    std::vector<std::pair<ggml_tensor *, ggml_backend_dev_t>> & out;

    ggml_tensor * get(const std::string & name, std::initializer_list<int64_t> ne, wtype wt, ggml_backend_dev_t dev) {
        ggml_tensor * t = ggml_get_tensor(meta, name.c_str());
        if (!t) {
            problems.push_back("missing tensor '" + name + "'");
            return nullptr;
        }
        int64_t want[GGML_MAX_DIMS] = {1, 1, 1, 1};
        size_t i = 0;
        for (int64_t v : ne) want[i++] = v;
        bool shape_ok = true;
        for (int d = 0; d < GGML_MAX_DIMS; ++d) shape_ok &= t->ne[d] == want[d];
        if (!shape_ok) {
            auto fmt = [](const int64_t * v) {
                std::string s = "[";
                int n = GGML_MAX_DIMS;
                while (n > 1 && v[n - 1] == 1) --n;
                for (int d = 0; d < n; ++d) s += (d ? ", " : "") + std::to_string(v[d]);
                return s + "]";
            };
            problems.push_back("tensor '" + name + "' has shape (ne) " + fmt(t->ne) + ", expected " + fmt(want));
            return nullptr;
        }
        const ggml_type type = t->type;
        const bool is_int = type == GGML_TYPE_I8 || type == GGML_TYPE_I16 || type == GGML_TYPE_I32 ||
                            type == GGML_TYPE_I64 || type == GGML_TYPE_F64;
        if ((wt == wtype::f32 && type != GGML_TYPE_F32) || (wt == wtype::matrix && is_int)) {
            problems.push_back("tensor '" + name + "' has type " + ggml_type_name(type) +
                               (wt == wtype::f32 ? ", expected F32" : ", expected a float or quantized type"));
            return nullptr;
        }
        out.emplace_back(t, dev);
        return t;
    }
};

} // namespace

void model::create_tensors() {
    const hparams & hp = hparams_;
    const int64_t n_embd = hp.n_embd, n_ff = hp.n_ff, d_inner = hp.d_inner, d_state = hp.d_state;
    const int64_t hd = hp.n_embd_head;
    tensor_checker tc{ file_->meta(), {}, tensors_ };

    tok_embd      = tc.get("token_embd.weight", {n_embd, hp.n_vocab}, wtype::matrix, output_dev_);
    output_norm   = tc.get("output_norm.weight", {n_embd}, wtype::f32, output_dev_);
    output_norm_b = tc.get("output_norm.bias", {n_embd}, wtype::f32, output_dev_);

    layers_.resize(hp.n_layer);
    for (uint32_t il = 0; il < hp.n_layer; ++il) {
        layer_weights & l = layers_[il];
        ggml_backend_dev_t dev = layer_dev_[il];
        auto name = [il](const char * n) { return "blk." + std::to_string(il) + "." + n; };

        l.attn_norm   = tc.get(name("attn_norm.weight"), {n_embd}, wtype::f32, dev);
        l.attn_norm_b = tc.get(name("attn_norm.bias"),   {n_embd}, wtype::f32, dev);
        l.ffn_norm    = tc.get(name("ffn_norm.weight"),  {n_embd}, wtype::f32, dev);
        l.ffn_norm_b  = tc.get(name("ffn_norm.bias"),    {n_embd}, wtype::f32, dev);
        l.ffn_up      = tc.get(name("ffn_up.weight"),    {n_embd, 2 * n_ff}, wtype::matrix, dev);
        l.ffn_down    = tc.get(name("ffn_down.weight"),  {n_ff, n_embd}, wtype::matrix, dev);

        switch (hp.kind(il)) {
            case layer_kind::mamba:
                l.ssm_in       = tc.get(name("ssm_in.weight"),     {n_embd, 2 * d_inner}, wtype::matrix, dev);
                l.ssm_conv1d   = tc.get(name("ssm_conv1d.weight"), {hp.d_conv, d_inner}, wtype::f32, dev);
                l.ssm_conv1d_b = tc.get(name("ssm_conv1d.bias"),   {d_inner}, wtype::f32, dev);
                l.ssm_x        = tc.get(name("ssm_x.weight"),      {d_inner, hp.dt_rank + 2 * d_state}, wtype::matrix, dev);
                l.ssm_dt       = tc.get(name("ssm_dt.weight"),     {hp.dt_rank, d_inner}, wtype::matrix, dev);
                l.ssm_dt_b     = tc.get(name("ssm_dt.bias"),       {d_inner}, wtype::f32, dev);
                l.ssm_a        = tc.get(name("ssm_a"),             {d_state, d_inner}, wtype::f32, dev);
                l.ssm_d        = tc.get(name("ssm_d"),             {d_inner}, wtype::f32, dev);
                l.ssm_out      = tc.get(name("ssm_out.weight"),    {d_inner, n_embd}, wtype::matrix, dev);
                break;
            case layer_kind::gmu:
                l.gmu_in  = tc.get(name("gmu_in.weight"),  {n_embd, d_inner}, wtype::matrix, dev);
                l.gmu_out = tc.get(name("gmu_out.weight"), {d_inner, n_embd}, wtype::matrix, dev);
                break;
            case layer_kind::attn_swa:
            case layer_kind::attn_full:
            case layer_kind::attn_cross: {
                if (hp.kind(il) == layer_kind::attn_cross) {
                    l.wq = tc.get(name("attn_q.weight"), {n_embd, hp.n_embd_q()}, wtype::matrix, dev);
                    l.bq = tc.get(name("attn_q.bias"),   {hp.n_embd_q()}, wtype::f32, dev);
                } else {
                    const int64_t n_qkv = hp.n_embd_q() + 2 * (int64_t) hp.n_embd_kv();
                    l.wqkv = tc.get(name("attn_qkv.weight"), {n_embd, n_qkv}, wtype::matrix, dev);
                    l.bqkv = tc.get(name("attn_qkv.bias"),   {n_qkv}, wtype::f32, dev);
                }
                l.wo       = tc.get(name("attn_output.weight"),   {hp.n_embd_q(), n_embd}, wtype::matrix, dev);
                l.bo       = tc.get(name("attn_output.bias"),     {n_embd}, wtype::f32, dev);
                l.sub_norm = tc.get(name("attn_sub_norm.weight"), {2 * hd}, wtype::f32, dev);
                break;
            }
        }
    }
    if (!tc.problems.empty()) {
        std::string msg = "'" + file_->path() + "' does not hold a valid " + ARCH_NAME + " model:";
        const size_t n_show = std::min<size_t>(tc.problems.size(), 20);
        for (size_t i = 0; i < n_show; ++i) msg += "\n  - " + tc.problems[i];
        if (n_show < tc.problems.size()) {
            msg += "\n  ... and " + std::to_string(tc.problems.size() - n_show) + " more";
        }
        throw load_error(msg);
    }
}

// The CPU's extra buffer types (e.g. "CPU_REPACK": quantized weights re-laid out for faster
// matmuls; not "AMX", see below) that accept a weight used as mul_mat's
// first operand; nullptr when none does. The probe's second operand is a contiguous F32
// matrix: every weight product in the graph must take one (AMX rejects strided views, and an
// op no backend supports aborts the scheduler).
static ggml_backend_buffer_type_t extra_buft_for(ggml_backend_dev_t dev, ggml_tensor * w) {
    ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
    auto get_extra = (ggml_backend_dev_get_extra_bufts_t)
        ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts");
    if (!get_extra || ggml_n_dims(w) != 2 || w->type == GGML_TYPE_F32) {
        return nullptr;
    }
    ggml_init_params ip = { ggml_tensor_overhead() * 4, nullptr, /*no_alloc*/ true };
    ggml_context_ptr ctx(ggml_init(ip));
    ggml_tensor * x  = ggml_new_tensor_2d(ctx.get(), GGML_TYPE_F32, w->ne[0], 512);
    ggml_tensor * op = ggml_mul_mat(ctx.get(), w, x);
    ggml_backend_buffer_type_t found = nullptr;
    for (ggml_backend_buffer_type_t * b = get_extra(dev); b && *b && !found; ++b) {
        if (std::string(ggml_backend_buft_name(*b)) == "AMX") {
            // TODO(sambay): ggml 0.20.2's AMX matmuls (native builds on CPUs with AMX) segfault
            // in prefill-sized Q8_0/Q4_0 products (measured on a Xeon VM); REPACK is used instead [AMX]
            continue;
        }
        // supports_op looks at the weight's buffer type: give it an empty buffer of that type
        ggml_backend_buffer_ptr dummy(ggml_backend_buft_alloc_buffer(*b, 0));
        if (!dummy) continue;
        w->buffer = dummy.get();
        if (ggml_backend_dev_supports_op(dev, op)) found = *b;
        w->buffer = nullptr;
    }
    return found;
}

void model::load_data(bool use_mmap) {
    // group the weights by device and buffer type (nullptr: the device's default, or the mapped
    // file); CPU matrices go to an extra buffer type (repacked) when one accepts them, and those
    // the decode kernel reads as stored to the device's own buffer type (huge pages; a mapped
    // file has 4 KiB pages) when the file is mapped
    std::map<std::pair<ggml_backend_dev_t, ggml_backend_buffer_type_t>, std::vector<ggml_tensor *>> groups;
    for (auto & [t, d] : tensors_) {
        ggml_backend_buffer_type_t extra = nullptr;
        if (ggml_backend_dev_type(d) == GGML_BACKEND_DEVICE_TYPE_CPU) {
            if (use_extra_bufts_ && t != tok_embd) extra = extra_buft_for(d, t);
            if (!extra && use_mmap && huge_pages_wanted() && mul_mat_cpu_reads_as_stored(t)) {
                extra = ggml_backend_dev_buffer_type(d);
            }
        }
        groups[{d, extra}].push_back(t);
    }

    for (auto & [key, tensors] : groups) {
        auto [dev, extra] = key;
        ggml_backend_dev_props props;
        ggml_backend_dev_get_props(dev, &props);

        if (!extra && use_mmap && file_->mapping() && props.caps.buffer_from_host_ptr) {
            // zero-copy: the device uses the mapped file pages directly
            size_t max_size = 0;
            for (auto * t : tensors) max_size = std::max(max_size, ggml_nbytes(t));
            ggml_backend_buffer_t buf = ggml_backend_dev_buffer_from_host_ptr(dev, file_->mapping(), file_->file_size(), max_size);
            if (buf) {
                buffers_.emplace_back(buf);
                ggml_backend_buffer_set_usage(buf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
                for (auto * t : tensors) {
                    void * addr = (char *) file_->mapping() + file_->data_offset(t);
                    if (ggml_backend_tensor_alloc(buf, t, addr) != GGML_STATUS_SUCCESS) {
                        throw load_error(std::string("cannot place tensor '") + ggml_get_name(t) + "' in the mapped file");
                    }
                }
                mmapped_ = true;
                continue;
            }
        }

        // streamed: one buffer, filled from the file
        ggml_backend_buffer_type_t buft = extra ? extra : ggml_backend_dev_buffer_type(dev);
        const size_t align = ggml_backend_buft_get_alignment(buft);
        size_t total = 0;
        for (auto * t : tensors) total += GGML_PAD(ggml_backend_buft_get_alloc_size(buft, t), align);
        ggml_backend_buffer_t buf = ggml_backend_buft_alloc_buffer(buft, total);
        if (!buf) {
            throw load_error("cannot allocate " + std::to_string(total) + " bytes of weights (" +
                             ggml_backend_buft_name(buft) + ")");
        }
        buffers_.emplace_back(buf);
        ggml_backend_buffer_set_usage(buf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
        huge_page_bytes_ += advise_huge_pages(buf, dev);  // before the weights are written
        char * base = (char *) ggml_backend_buffer_get_base(buf);
        size_t off = 0;
        for (auto * t : tensors) {
            if (ggml_backend_tensor_alloc(buf, t, base + off) != GGML_STATUS_SUCCESS) {
                throw load_error(std::string("cannot allocate tensor '") + ggml_get_name(t) + "'");
            }
            off += GGML_PAD(ggml_backend_buft_get_alloc_size(buft, t), align);
        }
        const bool is_host = ggml_backend_buffer_is_host(buf);
        std::vector<char> staging;
        for (auto * t : tensors) {
            const size_t n = ggml_nbytes(t);
            const size_t src = file_->data_offset(t);
            if (is_host) {
                file_->read(src, t->data, n);
            } else if (extra) {
                // a repacking buffer converts whole tensors only
                staging.resize(n);
                file_->read(src, staging.data(), n);
                ggml_backend_tensor_set(t, staging.data(), 0, n);
            } else {
                const size_t chunk = 64u << 20;
                staging.resize(std::min(n, chunk));
                for (size_t done = 0; done < n; done += chunk) {
                    const size_t m = std::min(chunk, n - done);
                    file_->read(src + done, staging.data(), m);
                    ggml_backend_tensor_set(t, staging.data(), done, m);
                }
            }
        }
    }
}

} // namespace sambay
