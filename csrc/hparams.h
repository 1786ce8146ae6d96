// Model hyper-parameters as stored in a phi4flash GGUF (docs/gguf-format.md) and the
// per-layer predicates the builders use. The layer schedule is read from the file
// (phi4flash.layer_types), never recomputed here.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

struct gguf_context;

namespace sambay {

// the GGUF architecture (general.architecture, the metadata key prefix); the one definition
inline constexpr char ARCH_NAME[] = "phi4flash";

// values are what phi4flash.layer_types stores
enum class layer_kind : uint8_t { mamba = 0, attn_swa = 1, attn_full = 2, gmu = 3, attn_cross = 4 };

// "mamba", "attn_swa", ...; nullptr for a value that is no layer_kind (so callers can list
// every kind: values 0, 1, ... until nullptr)
const char * layer_kind_name(layer_kind kind);

// Throws load_error unless general.architecture is ARCH_NAME (the check every reader of a
// phi4flash GGUF makes first: loading a model, quantizing one).
void check_architecture(const gguf_context * ctx);

struct hparams {
    uint32_t n_vocab     = 0;
    uint32_t n_ctx_train = 0;
    uint32_t n_embd      = 0;
    uint32_t n_layer     = 0;
    uint32_t n_ff        = 0;
    uint32_t n_head      = 0;
    uint32_t n_head_kv   = 0;
    uint32_t n_embd_head = 0;  // head_dim (key_length == value_length)
    uint32_t n_swa       = 0;  // window W: a query sees itself and the W-1 previous tokens
    float    norm_eps     = 1e-5f;  // block and final LayerNorms
    float    sub_norm_eps = 1e-5f;  // differential-attention RMSNorm over 2*head_dim

    uint32_t d_conv  = 0;
    uint32_t d_inner = 0;
    uint32_t d_state = 0;
    uint32_t dt_rank = 0;

    uint32_t memory_layer    = 0;  // N/2: Mamba layer whose SSM read-out feeds the GMUs
    uint32_t kv_shared_layer = 0;  // N/2+1: full-attention layer whose K/V the cross layers read

    std::vector<layer_kind> kinds;        // [n_layer]
    std::vector<float>      lambda;       // [n_layer] folded differential-attention lambda
    std::vector<float>      lambda_init;  // [n_layer] output scale is (1 - lambda_init)

    layer_kind kind(uint32_t il) const { return kinds[il]; }
    bool is_mamba(uint32_t il) const { return kinds[il] == layer_kind::mamba; }
    bool is_attn(uint32_t il) const {
        return kinds[il] == layer_kind::attn_swa || kinds[il] == layer_kind::attn_full ||
               kinds[il] == layer_kind::attn_cross;
    }
    bool has_kv(uint32_t il) const {  // writes K/V of its own
        return kinds[il] == layer_kind::attn_swa || kinds[il] == layer_kind::attn_full;
    }
    uint32_t n_embd_q()  const { return n_head * n_embd_head; }
    uint32_t n_embd_kv() const { return n_head_kv * n_embd_head; }

    // Reads and validates every key; throws load_error listing every problem found.
    static hparams from_gguf(const gguf_context * ctx);
};

} // namespace sambay
