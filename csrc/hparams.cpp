#include "hparams.h"

#include "errors.h"
#include "loader.h"

#include "gguf.h"

#include <cmath>

namespace sambay {

const char * layer_kind_name(layer_kind kind) {
    switch (kind) {
        case layer_kind::mamba:      return "mamba";
        case layer_kind::attn_swa:   return "attn_swa";
        case layer_kind::attn_full:  return "attn_full";
        case layer_kind::gmu:        return "gmu";
        case layer_kind::attn_cross: return "attn_cross";
    }
    return nullptr;
}

// sanity bounds: far above any real SambaY model, low enough that a corrupt value cannot make
// us allocate absurd amounts of memory before the tensor shape checks catch it
static constexpr uint64_t MAX_DIM    = 1u << 20;
static constexpr uint64_t MAX_VOCAB  = 1u << 24;
static constexpr uint64_t MAX_LAYERS = 4096;

void check_architecture(const gguf_context * ctx) {
    std::string arch;
    if (!gguf_get_string(ctx, "general.architecture", arch)) {
        throw load_error("missing metadata key 'general.architecture'");
    }
    if (arch != ARCH_NAME) {
        throw load_error("unsupported architecture '" + arch + "' (this engine runs '" + ARCH_NAME + "')");
    }
}

hparams hparams::from_gguf(const gguf_context * ctx) {
    check_architecture(ctx);

    std::vector<std::string> problems;
    hparams hp;
    const std::string p = std::string(ARCH_NAME) + ".";

    auto req_u32 = [&](const std::string & key, uint32_t & dst, uint64_t lo, uint64_t hi) {
        uint64_t v = 0;
        if (!gguf_get_uint(ctx, key, v)) {
            problems.push_back("missing metadata key '" + key + "'");
            return;
        }
        if (v < lo || v > hi) {
            problems.push_back("metadata key '" + key + "' = " + std::to_string(v) + " is out of range [" +
                               std::to_string(lo) + ", " + std::to_string(hi) + "]");
            return;
        }
        dst = (uint32_t) v;
    };

    req_u32(p + "embedding_length",          hp.n_embd,      1, MAX_DIM);
    req_u32(p + "block_count",               hp.n_layer,     4, MAX_LAYERS);
    req_u32(p + "feed_forward_length",       hp.n_ff,        1, MAX_DIM);
    req_u32(p + "attention.head_count",      hp.n_head,      2, MAX_DIM);
    req_u32(p + "attention.head_count_kv",   hp.n_head_kv,   2, MAX_DIM);
    req_u32(p + "attention.key_length",      hp.n_embd_head, 1, MAX_DIM);
    req_u32(p + "attention.sliding_window",  hp.n_swa,       1, 1u << 30);
    req_u32(p + "ssm.conv_kernel",           hp.d_conv,      2, 64);
    req_u32(p + "ssm.inner_size",            hp.d_inner,     1, MAX_DIM);
    req_u32(p + "ssm.state_size",            hp.d_state,     1, 1024);
    req_u32(p + "ssm.time_step_rank",        hp.dt_rank,     1, MAX_DIM);
    req_u32(p + "memory_layer",              hp.memory_layer,    0, MAX_LAYERS);
    req_u32(p + "kv_shared_layer",           hp.kv_shared_layer, 0, MAX_LAYERS);
    req_u32(p + "context_length",            hp.n_ctx_train, 1, 1u << 31);

    // vocab size: the key, else the token list length; the tensor shape check confirms it
    uint64_t n_vocab = 0;
    if (!gguf_get_uint(ctx, p + "vocab_size", n_vocab)) {
        const int64_t id = gguf_find_key(ctx, "tokenizer.ggml.tokens");
        if (id >= 0 && gguf_get_kv_type(ctx, id) == GGUF_TYPE_ARRAY) {
            n_vocab = gguf_get_arr_n(ctx, id);
        }
    }
    if (n_vocab < 1 || n_vocab > MAX_VOCAB) {
        problems.push_back("vocabulary size missing or out of range (" + std::to_string(n_vocab) + ")");
    } else {
        hp.n_vocab = (uint32_t) n_vocab;
    }

    uint64_t vlen = 0;
    if (gguf_get_uint(ctx, p + "attention.value_length", vlen) && vlen != hp.n_embd_head) {
        problems.push_back("attention.value_length (" + std::to_string(vlen) +
                           ") differs from attention.key_length (" + std::to_string(hp.n_embd_head) + ")");
    }
    uint64_t mb = 2;
    if (gguf_get_uint(ctx, p + "mb_per_layer", mb) && mb != 2) {
        problems.push_back("mb_per_layer = " + std::to_string(mb) + ", only 2 is supported");
    }

    double eps = 0;
    if (!gguf_get_float(ctx, p + "attention.layer_norm_epsilon", eps)) {
        problems.push_back("missing metadata key '" + p + "attention.layer_norm_epsilon'");
    } else if (!(eps > 0 && eps < 1)) {
        problems.push_back("attention.layer_norm_epsilon = " + std::to_string(eps) + " is out of range");
    } else {
        hp.norm_eps = (float) eps;
    }
    if (gguf_get_float(ctx, p + "attention.sub_norm_epsilon", eps)) {
        if (!(eps > 0 && eps < 1)) {
            problems.push_back("attention.sub_norm_epsilon = " + std::to_string(eps) + " is out of range");
        } else {
            hp.sub_norm_eps = (float) eps;
        }
    }
    bool deint = false;
    if (!gguf_get_bool(ctx, p + "attention.heads_deinterleaved", deint) || !deint) {
        problems.push_back("'" + p + "attention.heads_deinterleaved' must be true (the engine needs "
                           "stripe-major Q/K rows; re-convert the model)");
    }

    // head geometry: differential attention works on head pairs
    if (hp.n_head && hp.n_head_kv && (hp.n_head % 2 || hp.n_head_kv % 2 || hp.n_head % hp.n_head_kv)) {
        problems.push_back("head_count (" + std::to_string(hp.n_head) + ") and head_count_kv (" +
                           std::to_string(hp.n_head_kv) + ") must be even and head_count_kv must divide head_count");
    }
    if ((uint64_t) hp.n_head * hp.n_embd_head > MAX_DIM) {
        problems.push_back("head_count * key_length is absurdly large");
    }

    // per-layer arrays
    std::vector<int64_t> kinds;
    if (!gguf_get_int_array(ctx, p + "layer_types", kinds)) {
        problems.push_back("missing metadata key '" + p + "layer_types'");
    } else if (hp.n_layer == 0) {
        // block_count already reported
    } else if (kinds.size() != hp.n_layer) {
        problems.push_back("layer_types has " + std::to_string(kinds.size()) + " entries for " +
                           std::to_string(hp.n_layer) + " layers");
    } else {
        for (size_t il = 0; il < kinds.size(); ++il) {
            if (kinds[il] < 0 || kinds[il] > 255 || !layer_kind_name((layer_kind) kinds[il])) {
                problems.push_back("layer_types[" + std::to_string(il) + "] = " + std::to_string(kinds[il]) + " is not a layer kind");
                hp.kinds.clear();
                break;
            }
            hp.kinds.push_back((layer_kind) kinds[il]);
        }
    }
    std::vector<double> lam, lam_init;
    for (auto [key, dst] : { std::pair{"attention.diff_lambda", &lam}, std::pair{"attention.diff_lambda_init", &lam_init} }) {
        if (!gguf_get_float_array(ctx, p + key, *dst)) {
            problems.push_back("missing metadata key '" + p + key + "'");
        } else if (hp.n_layer != 0 && dst->size() != hp.n_layer) {
            problems.push_back(std::string(key) + " has " + std::to_string(dst->size()) + " entries for " +
                               std::to_string(hp.n_layer) + " layers");
        } else {
            for (double v : *dst) {
                if (!std::isfinite(v)) {
                    problems.push_back(std::string(key) + " holds a non-finite value");
                    break;
                }
            }
        }
    }
    hp.lambda.assign(lam.begin(), lam.end());
    hp.lambda_init.assign(lam_init.begin(), lam_init.end());

    // the schedule must have SambaY's shape: what the graph builder and the YOCO cut rely on
    if (hp.n_layer != 0 && hp.kinds.size() == hp.n_layer) {
        const uint32_t ml = hp.memory_layer, kl = hp.kv_shared_layer;
        if (ml >= hp.n_layer || hp.kinds[ml] != layer_kind::mamba) {
            problems.push_back("memory_layer " + std::to_string(ml) + " is not a mamba layer");
        }
        if (kl >= hp.n_layer || hp.kinds[kl] != layer_kind::attn_full || kl <= ml) {
            problems.push_back("kv_shared_layer " + std::to_string(kl) +
                               " is not a full-attention layer after memory_layer");
        }
        for (uint32_t il = 0; il < hp.n_layer; ++il) {
            const layer_kind k = hp.kinds[il];
            const bool ok =
                (k == layer_kind::attn_full) ? il == kl :
                (k == layer_kind::gmu || k == layer_kind::attn_cross) ? il > kl :
                /* mamba, attn_swa */ il < kl;
            if (!ok) {
                problems.push_back("layer " + std::to_string(il) + " is " + layer_kind_name(k) +
                                   ", which the SambaY schedule does not allow there");
            }
        }
    }

    if (!problems.empty()) {
        std::string msg = std::string("invalid ") + ARCH_NAME + " hyper-parameters:";
        for (const auto & s : problems) msg += "\n  - " + s;
        throw load_error(msg);
    }
    return hp;
}

} // namespace sambay
