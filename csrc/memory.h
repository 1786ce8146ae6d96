// The sequence memory of one context, n_seq_max sequences (slots) of the layout SambaY exists for:
//   - Mamba layers: F32 conv state (the last d_conv-1 raw x columns) and SSM state, constant size;
//   - SWA layers:   a K/V ring of n_swa + n_batch - 1 cells (enough for every key a micro-batch
//                   of up to n_batch tokens can see), cell of position p = p % n_cells;
//   - layer kv_shared_layer: one full K/V cache of n_ctx cells (cell = position), written by that
//                   layer and read, never written, by every cross-attention layer.
// GMU, cross-attention and MLP keep nothing.
// Every part holds one region per sequence slot s: states [.., s], ring cells
// [s*n_swa_cells, (s+1)*n_swa_cells), full cells [s*n_ctx, (s+1)*n_ctx); n_ctx is per sequence.
//
// K caches are [n_embd_kv, n_cells, n_seq] (one row per cell). V caches are stored transposed per
// sequence, [n_cells, n_embd_kv, n_seq], for the mul_mat attention path (it reads V^T as a strided
// view without a copy), and like K for the flash-attention path (v_trans == false).
// Invariant: cells holding positions < n_past of their sequence are the only ones any graph
// reads; the graph writes the cells of the micro-batch's positions (ggml_set_rows with index
// inputs) and the context advances each sequence's n_past after a successful compute.
#pragma once

#include "hparams.h"

#include "ggml-backend.h"
#include "ggml-cpp.h"

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace sambay {

class model;

// what a sequence has evaluated: n_past positions, and a hash of their token ids in order
// (seq_history::add; zero positions hash to fnv1a's initial value)
struct seq_history {
    uint32_t n_past = 0;
    uint64_t tokens_hash = 0xcbf29ce484222325ull;
    void add(const int32_t * tokens, size_t n);
};

struct layer_memory {
    ggml_tensor * conv = nullptr;  // mamba: F32 [d_conv-1, d_inner, n_seq]
    ggml_tensor * ssm  = nullptr;  // mamba: F32 [d_state, d_inner, n_seq]
    ggml_tensor * k    = nullptr;  // swa/full: [n_embd_kv, n_cells, n_seq]
    ggml_tensor * v    = nullptr;  // swa/full: [n_cells, n_embd_kv, n_seq] if v_trans, else like k
    uint32_t n_cells   = 0;        // cells per sequence
};

class memory {
public:
    memory(const model & m, uint32_t n_ctx, uint32_t n_batch, uint32_t n_seq, ggml_type kv_type, bool v_trans);
    memory(const memory &) = delete;
    memory & operator=(const memory &) = delete;

    // Cell addressing, its one definition (the graph's index and mask inputs use it too):
    // position p of a sequence lives in cell cell_of(p, n_cells) of the sequence slot's region,
    // p % n_cells in an SWA ring and p itself in the full cache (n_cells == n_ctx > p); the
    // cache row (K, or V like K) of cell c of slot s is row_of(s, c, n_cells); element (channel
    // j, cell c) of slot s of a transposed V cache [n_cells, n_embd_kv, n_seq] is vt_index(...).
    static uint32_t cell_of(uint32_t p, uint32_t n_cells) { return p % n_cells; }
    static int64_t  row_of(uint32_t s, uint32_t c, uint32_t n_cells) { return (int64_t) s * n_cells + c; }
    static int64_t  vt_index(uint32_t s, int64_t j, uint32_t c, uint32_t n_cells, int64_t n_embd_kv) {
        return ((int64_t) s * n_embd_kv + j) * n_cells + c;
    }
    // the position ring cell c holds once positions [0, p_end) were written (p_end >= 1): the
    // largest p < p_end with cell_of(p) == c; negative when no position maps there yet
    static int64_t pos_in_cell(uint32_t c, uint32_t p_end, uint32_t n_cells) {
        const uint32_t last = p_end - 1;
        return (int64_t) last - (int64_t) ((cell_of(last, n_cells) + n_cells - c) % n_cells);
    }

    const layer_memory & layer(uint32_t il) const { return layers_[il]; }
    uint32_t n_ctx() const { return n_ctx_; }  // per sequence
    uint32_t n_seq() const { return n_seq_; }
    uint32_t n_swa_cells() const { return n_swa_cells_; }  // per sequence
    ggml_type kv_type() const { return kv_type_; }
    bool v_trans() const { return v_trans_; }

    void clear();               // zero every state and cache (all sequences fresh)
    void clear_seq(uint32_t s); // a fresh sequence s: zero its Mamba states (its cells are masked
                                // until rewritten)

    // bytes per part, all sequences: mamba_conv, mamba_ssm, swa_kv, full_kv
    std::map<std::string, size_t> breakdown() const;
    // bytes of the caches the kernel was asked to back with huge pages (hugepages.h)
    size_t huge_page_bytes() const { return huge_page_bytes_; }

    // state (de)serialisation of the first n_past positions of sequence s; the layout is
    // independent of n_ctx, n_batch, n_seq, the slot and v_trans, so a state moves between
    // sequences and contexts of the same model (model::fingerprint) and KV type. The state
    // carries the sequence's history (n_past and a hash of its tokens, kept by the context).
    std::vector<uint8_t> save(uint32_t s, const seq_history & h) const;
    // Returns the state's history. Throws state_error (another model, KV type or layout,
    // corrupt data, or a history other than *expect when given) or context_full_error before
    // touching the memory, so a rejected state leaves sequence s as it was.
    seq_history load(uint32_t s, const std::vector<uint8_t> & data, const seq_history * expect = nullptr);

private:
    const model &                      model_;
    uint32_t                           n_ctx_;
    uint32_t                           n_seq_;
    uint32_t                           n_swa_cells_;
    ggml_type                          kv_type_;
    bool                               v_trans_;
    std::vector<layer_memory>          layers_;
    std::vector<ggml_context_ptr>        ctxs_;     // one per device: the tensor headers
    std::vector<ggml_backend_buffer_ptr> buffers_;  // one per device: the data (freed first)
    size_t                             huge_page_bytes_ = 0;
};

} // namespace sambay
