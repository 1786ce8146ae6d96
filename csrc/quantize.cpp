#include "quantize.h"

#include "hparams.h"
#include "loader.h"

#include "ggml-cpp.h"
#include "gguf.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <thread>

namespace sambay {

// llama.cpp's LLAMA_FTYPE_MOSTLY_* values, so general.file_type reads the same in every tool
const std::vector<quant_ftype> & quant_ftypes() {
    static const std::vector<quant_ftype> table = {
        {"F32",    0,  GGML_TYPE_F32},
        {"F16",    1,  GGML_TYPE_F16},
        {"BF16",   32, GGML_TYPE_BF16},
        {"Q8_0",   7,  GGML_TYPE_Q8_0},
        {"Q6_K",   18, GGML_TYPE_Q6_K},
        {"Q5_0",   8,  GGML_TYPE_Q5_0},
        {"Q5_1",   9,  GGML_TYPE_Q5_1},
        {"Q5_K_M", 17, GGML_TYPE_Q5_K},
        {"Q5_K_S", 16, GGML_TYPE_Q5_K},
        {"Q4_0",   2,  GGML_TYPE_Q4_0},
        {"Q4_1",   3,  GGML_TYPE_Q4_1},
        {"Q4_K_M", 15, GGML_TYPE_Q4_K},
        {"Q4_K_S", 14, GGML_TYPE_Q4_K},
        {"Q3_K_M", 12, GGML_TYPE_Q3_K},
        {"Q2_K",   10, GGML_TYPE_Q2_K},
    };
    return table;
}

static std::string upper(std::string s) {
    std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return (char) std::toupper(c); });
    return s;
}

const quant_ftype & quant_ftype_by_name(const std::string & name) {
    std::string key = upper(name);
    if (key == "Q4_K" || key == "Q5_K") {  // llama-quantize's aliases of the _M types
        key += "_M";
    }
    const bool numeric = !key.empty() && key.size() <= 4 &&
                         std::all_of(key.begin(), key.end(), [](unsigned char c) { return std::isdigit(c); });
    for (const auto & ft : quant_ftypes()) {
        if (ft.name == key || (numeric && ft.file_type == (uint32_t) std::stoul(key))) {
            return ft;
        }
    }
    std::string known;
    for (const auto & ft : quant_ftypes()) {
        known += (known.empty() ? "" : ", ") + ft.name;
    }
    throw quantize_error("unknown quantization type '" + name + "' (known: " + known + ")");
}

// the types the overrides may name: those the rules above can produce
static const ggml_type writable_types[] = {
    GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_BF16, GGML_TYPE_Q8_0, GGML_TYPE_Q6_K, GGML_TYPE_Q5_0, GGML_TYPE_Q5_1,
    GGML_TYPE_Q5_K, GGML_TYPE_Q4_0, GGML_TYPE_Q4_1, GGML_TYPE_Q4_K, GGML_TYPE_Q3_K, GGML_TYPE_Q2_K,
};

ggml_type quant_type_by_name(const std::string & name) {
    std::string known;
    for (ggml_type t : writable_types) {
        if (upper(ggml_type_name(t)) == upper(name)) {
            return t;
        }
        known += (known.empty() ? "" : ", ") + std::string(ggml_type_name(t));
    }
    throw quantize_error("unknown tensor type '" + name + "' (known: " + known + ")");
}

static bool contains(const std::string & s, const char * part) { return s.find(part) != std::string::npos; }

static bool ends_with(const std::string & s, const std::string & tail) {
    return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

static bool is_float_type(ggml_type t) {
    return t == GGML_TYPE_F32 || t == GGML_TYPE_F16 || t == GGML_TYPE_BF16;
}

// llama-quantize's tensor_allows_quantization, for SambaY's names: matrices named *.weight,
// except norms and the Mamba conv kernel. ssm_a / ssm_d (no ".weight") and every bias and
// 1-D tensor stay as stored (F32).
static bool allows_quantization(const tensor_desc & t) {
    return t.n_dims >= 2 && ends_with(t.name, ".weight") && !contains(t.name, "_norm.weight") &&
           !contains(t.name, "ssm_conv1d");
}

// llama-quantize's use_more_bits: the first and last eighth of the stack and every third layer
static bool use_more_bits(int i_layer, int n_layer) {
    return i_layer < n_layer / 8 || i_layer >= 7 * n_layer / 8 || (i_layer - n_layer / 8) % 3 == 2;
}

// a row length the type's blocks don't divide: the nearest type whose blocks do
static ggml_type fallback_type(ggml_type type, int64_t ne0) {
    if (ne0 % ggml_blck_size(type) == 0) {
        return type;
    }
    ggml_type alt;
    switch (type) {
        case GGML_TYPE_Q4_K: alt = GGML_TYPE_Q5_0; break;
        case GGML_TYPE_Q5_K: alt = GGML_TYPE_Q5_1; break;
        case GGML_TYPE_Q6_K: alt = GGML_TYPE_Q8_0; break;
        default:             alt = GGML_TYPE_Q4_0; break;  // Q2_K, Q3_K
    }
    return ne0 % ggml_blck_size(alt) == 0 ? alt : GGML_TYPE_F16;
}

ggml_type quant_tensor_type(const quant_ftype & ft, const tensor_desc & t, const quant_options & opt) {
    if (!allows_quantization(t)) {
        return t.cur_type;
    }
    const bool is_embd = t.name == "token_embd.weight";
    const bool is_output = t.name == "output.weight" || (opt.tied_output && is_embd);
    if (is_output && opt.leave_output) {
        return t.cur_type;
    }
    if (is_output && opt.output_type != GGML_TYPE_COUNT) {
        return fallback_type(opt.output_type, t.ne0);
    }
    if (is_embd && opt.token_embd_type != GGML_TYPE_COUNT) {
        return fallback_type(opt.token_embd_type, t.ne0);
    }
    const ggml_type def = ft.default_type;
    if (is_float_type(def)) {
        return def;
    }
    if (opt.pure) {  // llama-quantize --pure: no tensor raised above the default
        return fallback_type(def, t.ne0);
    }
    const std::string & ftn = ft.name;
    ggml_type type = def;
    if (t.name == "token_embd.weight" || t.name == "output.weight") {
        // the tied embedding is also the output projection: the most sensitive matrix
        if (t.ne0 % 256 != 0) {
            type = GGML_TYPE_Q8_0;
        } else if (def != GGML_TYPE_Q8_0) {
            type = GGML_TYPE_Q6_K;
        }
    } else if (contains(t.name, "attn_qkv.weight")) {
        if (ftn == "Q3_K_M") type = GGML_TYPE_Q4_K;
        else if (ftn == "Q4_K_M") type = GGML_TYPE_Q5_K;
        else if (ftn == "Q5_K_M") type = GGML_TYPE_Q6_K;
    } else if (contains(t.name, "ffn_down.weight")) {
        const int i = t.i_layer, n = t.n_layer;
        if (ftn == "Q2_K") type = GGML_TYPE_Q3_K;
        else if (ftn == "Q3_K_M") type = i < n / 16 ? GGML_TYPE_Q5_K : use_more_bits(i, n) ? GGML_TYPE_Q4_K : GGML_TYPE_Q3_K;
        else if ((ftn == "Q4_K_M" || ftn == "Q5_K_M") && use_more_bits(i, n)) type = GGML_TYPE_Q6_K;
        else if (ftn == "Q4_K_S" && i < n / 8) type = GGML_TYPE_Q5_K;
    } else if (contains(t.name, "attn_output.weight")) {
        if (ftn == "Q2_K") type = GGML_TYPE_Q3_K;
        else if (ftn == "Q3_K_M") type = GGML_TYPE_Q4_K;
    }
    return fallback_type(type, t.ne0);
}

namespace {

int layer_of(const std::string & name) {
    int il = -1;
    if (std::sscanf(name.c_str(), "blk.%d.", &il) == 1) {
        return il;
    }
    return -1;
}

// src (a float type, or a quantized one for --allow-requantize) -> f32
void to_f32(ggml_type type, const void * src, float * dst, int64_t n) {
    switch (type) {
        case GGML_TYPE_F32:  std::memcpy(dst, src, (size_t) n * sizeof(float)); break;
        case GGML_TYPE_F16:  ggml_fp16_to_fp32_row((const ggml_fp16_t *) src, dst, n); break;
        case GGML_TYPE_BF16: ggml_bf16_to_fp32_row((const ggml_bf16_t *) src, dst, n); break;
        default: {
            const auto * traits = ggml_get_type_traits(type);
            if (traits->to_float == nullptr) {
                throw quantize_error("cannot dequantize type " + std::string(ggml_type_name(type)));
            }
            traits->to_float(src, dst, n);
        }
    }
}

// f32 rows -> `type` rows, split over threads by whole rows
void convert_rows(ggml_type type, const float * src, void * dst, int64_t nrows, int64_t n_per_row, int n_threads) {
    if (type == GGML_TYPE_F32) {
        std::memcpy(dst, src, (size_t) (nrows * n_per_row) * sizeof(float));
        return;
    }
    const int n = (int) std::max<int64_t>(1, std::min<int64_t>(n_threads, nrows));
    const int64_t per = (nrows + n - 1) / n;
    std::vector<std::thread> workers;
    for (int k = 0; k < n; ++k) {
        const int64_t r0 = k * per, r1 = std::min(nrows, r0 + per);
        if (r0 >= r1) break;
        workers.emplace_back([=] {
            ggml_quantize_chunk(type, src, dst, r0 * n_per_row, r1 - r0, n_per_row, nullptr);
        });
    }
    for (auto & w : workers) w.join();
}

struct file_closer { void operator()(std::FILE * f) const { std::fclose(f); } };
using file_ptr = std::unique_ptr<std::FILE, file_closer>;

[[noreturn]] void write_failed(int err) {
    throw quantize_error(std::string("cannot write the output file: ") + std::strerror(err));
}

// fwrite that throws with the system's reason ("No space left on device") on a short write
void write_all(std::FILE * f, const void * data, size_t n) {
    if (n > 0 && std::fwrite(data, 1, n, f) != n) {
        write_failed(errno);
    }
}

} // namespace

quantize_result quantize_file(const quantize_params & params) {
    const quant_ftype & ft = quant_ftype_by_name(params.ftype);
    const int n_threads = params.n_threads > 0 ? params.n_threads
                                               : (int) std::max(1u, std::thread::hardware_concurrency());

    // opened and checked as a model file is (loader.h), with the same load_error: missing or not
    // a regular file, bad magic, a header ggml cannot parse, absurd tensor shapes, tensor data
    // outside the file; then the architecture, as hparams checks it
    const gguf_file in_file(params.input, /*use_mmap*/ false);
    const gguf_context * in = in_file.gguf();
    ggml_context * meta = in_file.meta();
    check_architecture(in);
    const std::string block_count = std::string(ARCH_NAME) + ".block_count";
    uint64_t n_layer_key = 0;
    if (!gguf_get_uint(in, block_count, n_layer_key) || n_layer_key == 0 || n_layer_key > (uint64_t) INT32_MAX) {
        throw quantize_error("GGUF has no valid " + block_count);
    }
    const int n_layer = (int) n_layer_key;

    // plan: every tensor's new type, checking the input first
    const int64_t n_tensors = gguf_get_n_tensors(in);
    gguf_context_ptr out(gguf_init_empty());
    gguf_set_kv(out.get(), in);
    gguf_set_val_u32(out.get(), "general.file_type", ft.file_type);
    gguf_set_val_u32(out.get(), "general.quantization_version", GGML_QNT_VERSION);

    bool has_output = false;
    for (int64_t i = 0; i < n_tensors; ++i) {
        has_output = has_output || std::string(gguf_get_tensor_name(in, i)) == "output.weight";
    }
    quant_options opt = params.options;
    opt.tied_output = !has_output;
    if (opt.tied_output && opt.output_type != GGML_TYPE_COUNT && opt.token_embd_type != GGML_TYPE_COUNT &&
        opt.output_type != opt.token_embd_type) {
        throw quantize_error("token_embd.weight is also the output projection of this model (tied): the "
                             "output tensor type and the token embedding type must not differ");
    }
    if (opt.tied_output && opt.leave_output && opt.token_embd_type != GGML_TYPE_COUNT) {
        throw quantize_error("token_embd.weight is also the output projection of this model (tied): "
                             "leave the output tensor as is, or give it a token embedding type, not both");
    }

    quantize_result result;
    std::vector<ggml_type> new_types(n_tensors);
    for (int64_t i = 0; i < n_tensors; ++i) {
        const std::string name = gguf_get_tensor_name(in, i);
        ggml_tensor * t = ggml_get_tensor(meta, name.c_str());
        if (!t) {
            throw quantize_error("internal: tensor '" + name + "' missing from the GGUF context");
        }
        if (!is_float_type(t->type) && !params.allow_requantize) {
            throw quantize_error("input is already quantized (tensor '" + name + "' is " +
                                 ggml_type_name(t->type) + "); quantize from an F32, F16 or BF16 GGUF, or allow "
                                 "requantizing (--allow-requantize, allow_requantize=True): the errors of both "
                                 "quantizations add up");
        }
        tensor_desc desc{name, ggml_n_dims(t), t->ne[0], t->type, layer_of(name), n_layer};
        new_types[i] = quant_tensor_type(ft, desc, opt);
        gguf_add_tensor(out.get(), t);
        gguf_set_tensor_type(out.get(), name.c_str(), new_types[i]);
        const uint64_t bytes_out = ggml_row_size(new_types[i], t->ne[0]) * (uint64_t) (ggml_nelements(t) / t->ne[0]);
        result.plan.push_back({name, ggml_type_name(t->type), ggml_type_name(new_types[i]), ggml_nbytes(t), bytes_out});
    }
    if (params.dry_run) {
        for (const auto & p : result.plan) {
            result.bytes_in += p.bytes_in;
            result.bytes_out += p.bytes_out;
            result.tensor_types.emplace_back(p.name, p.to);
        }
        return result;
    }

    // write: metadata, then each tensor's data padded to the alignment
    file_ptr fout(std::fopen(params.output.c_str(), "wb"));
    if (!fout) {
        throw quantize_error("cannot open " + params.output + ": " + std::strerror(errno));
    }
    std::vector<char> meta_buf(gguf_get_meta_size(out.get()));
    gguf_get_meta_data(out.get(), meta_buf.data());
    write_all(fout.get(), meta_buf.data(), meta_buf.size());
    size_t written = meta_buf.size();

    const size_t alignment = gguf_get_alignment(out.get());
    std::vector<char> src_buf, dst_buf;
    std::vector<float> f32_buf;
    for (int64_t i = 0; i < n_tensors; ++i) {
        const std::string name = gguf_get_tensor_name(in, i);
        const ggml_tensor * t = ggml_get_tensor(meta, name.c_str());
        const size_t nbytes_in = ggml_nbytes(t);
        src_buf.resize(nbytes_in);
        in_file.read(in_file.data_offset(t), src_buf.data(), nbytes_in);  // inside the file: checked at open
        const ggml_type type = new_types[i];
        const int64_t n_per_row = t->ne[0];
        const int64_t nrows = ggml_nelements(t) / n_per_row;
        const size_t nbytes_out = ggml_row_size(type, n_per_row) * (size_t) nrows;
        const char * data = src_buf.data();
        if (type != t->type) {
            f32_buf.resize((size_t) ggml_nelements(t));
            to_f32(t->type, src_buf.data(), f32_buf.data(), ggml_nelements(t));
            dst_buf.resize(nbytes_out);
            convert_rows(type, f32_buf.data(), dst_buf.data(), nrows, n_per_row, n_threads);
            if (!ggml_validate_row_data(type, dst_buf.data(), nbytes_out)) {
                throw quantize_error("quantized data of tensor '" + name + "' failed validation (NaN or inf in the input?)");
            }
            data = dst_buf.data();
        }
        const size_t expect = meta_buf.size() + gguf_get_tensor_offset(out.get(), i);
        if (written != expect) {
            throw quantize_error("internal: tensor '" + name + "' would be written at the wrong offset");
        }
        write_all(fout.get(), data, nbytes_out);
        const size_t pad = (alignment - nbytes_out % alignment) % alignment;
        static const char zeros[64] = {0};
        for (size_t left = pad; left > 0;) {
            const size_t n = std::min(left, sizeof(zeros));
            write_all(fout.get(), zeros, n);
            left -= n;
        }
        written += nbytes_out + pad;
        result.bytes_in += nbytes_in;
        result.bytes_out += nbytes_out;
        result.tensor_types.emplace_back(name, ggml_type_name(type));
        if (params.progress) {
            params.progress((size_t) i + 1, (size_t) n_tensors, name, ggml_type_name(type));
        }
    }
    if (std::fflush(fout.get()) != 0) {
        write_failed(errno);
    }
    if (std::fclose(fout.release()) != 0) {
        write_failed(errno);
    }
    return result;
}

} // namespace sambay
