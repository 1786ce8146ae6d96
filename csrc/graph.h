// Builds the ggml graph of one micro-batch: the layer loop (graph.cpp) and one function per
// block (blocks/*.cpp). The graph reads and writes the context memory in place: Mamba states
// through ggml_cpy of the scan/conv results, K/V through ggml_set_rows with index inputs.
// Inputs are graph tensors filled on the host after allocation (set_inputs).
#pragma once

#include "hparams.h"

#include "ggml.h"

#include <cstdint>
#include <vector>

namespace sambay {

class model;
class memory;
struct layer_weights;

// one micro-batch of a single sequence: positions pos0 .. pos0+n_tokens-1
struct ubatch {
    const int32_t * tokens   = nullptr;
    uint32_t        n_tokens = 0;
    uint32_t        pos0     = 0;
    uint32_t        n_out    = 0;     // logits rows: n_tokens (all), 1 (last token) or 0 (none)
    bool            yoco     = true;  // cut to the output rows right after kv_shared_layer
};

// host-filled graph inputs; a tensor the graph ended up not using has no buffer and is skipped
struct graph_inputs {
    ggml_tensor * tokens     = nullptr;  // I32 [n_tokens]
    ggml_tensor * out_ids    = nullptr;  // I32 [n_out] rows of the micro-batch that give logits
    ggml_tensor * ssm_ids    = nullptr;  // I32 [1]: the (only) state slot, 0
    ggml_tensor * swa_mask   = nullptr;  // F32 [n_kv_swa, n_tokens]: 0 or -inf
    ggml_tensor * full_mask  = nullptr;  // F32 [n_kv_full, n_tokens]
    ggml_tensor * cross_mask = nullptr;  // F32 [n_kv_full, n_rows_cross]
    ggml_tensor * swa_k_idx  = nullptr;  // I64 [n_tokens]: ring cell per token
    ggml_tensor * swa_v_idx  = nullptr;  // I64 [n_tokens*n_embd_kv]: element index in V^T
    ggml_tensor * full_k_idx = nullptr;  // I64 [n_tokens]
    ggml_tensor * full_v_idx = nullptr;  // I64 [n_tokens*n_embd_kv]
};

class graph_builder {
public:
    graph_builder(const model & m, const memory & mem, ggml_context * ctx, ggml_cgraph * gf, const ubatch & ub);

    // builds the whole graph; returns the logits tensor F32 [n_vocab, n_out], or nullptr if n_out == 0
    ggml_tensor * build();
    // fills the inputs of an allocated graph
    void set_inputs() const;

private:
    ggml_tensor * build_norm(ggml_tensor * cur, ggml_tensor * w, ggml_tensor * b, int il);
    ggml_tensor * build_mlp(ggml_tensor * cur, const layer_weights & l, int il);
    ggml_tensor * build_mamba(ggml_tensor * cur, int il);
    ggml_tensor * build_gmu(ggml_tensor * cur, int il);
    ggml_tensor * build_self_attn(ggml_tensor * cur, int il);
    ggml_tensor * build_cross_attn(ggml_tensor * cur, int il);
    ggml_tensor * build_diff_attn(ggml_tensor * q, ggml_tensor * k_all, ggml_tensor * v_all,
                                  uint32_t n_cells, uint32_t n_kv, ggml_tensor * mask, int il);
    void cb(ggml_tensor * t, const char * name, int il) const;

    const model &   model_;
    const hparams & hp_;
    const memory &  mem_;
    ggml_context *  ctx_;
    ggml_cgraph *   gf_;
    ubatch          ub_;

    uint32_t n_kv_swa_  = 0;  // ring cells the SWA layers read
    uint32_t n_kv_full_ = 0;  // cells of the shared cache read (= positions so far)
    uint32_t n_rows_    = 0;  // rows the current layer runs on (n_tokens, or n_out after the YOCO cut)
    bool     cut_       = false;

    graph_inputs  inp_;
    ggml_tensor * gmu_memory_ = nullptr;  // [d_inner, n_rows] SSM read-out of memory_layer
    ggml_tensor * shared_k_   = nullptr;  // kv_shared_layer's K cache after this batch's write
    ggml_tensor * shared_v_   = nullptr;  // ... and its V^T cache
};

// nodes budget for ggml_new_graph_custom and the scheduler
size_t graph_size_for(const hparams & hp);

} // namespace sambay
