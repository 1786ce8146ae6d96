// Builds the ggml graph of one micro-batch (the rows of one or more sequences): the layer loop (graph.cpp) and one function per
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

// one sequence's part of a micro-batch: positions pos0 .. pos0+n_tokens-1 of slot `seq`, rows
// row0 .. row0+n_tokens-1 of the micro-batch; its last n_out tokens give logits
struct ubatch_seq {
    uint32_t seq      = 0;
    uint32_t pos0     = 0;
    uint32_t n_tokens = 0;
    uint32_t n_out    = 0;  // 0, 1 (last token) or n_tokens (all)
    uint32_t row0     = 0;
};

// one micro-batch: the rows of several sequences, sequence after sequence. Sequences with the
// same n_tokens are adjacent (the Mamba ops run once per such group: ssm_conv and ssm_scan take
// equal-length sequences); the weight matrices are multiplied once for all rows.
struct ubatch {
    const int32_t *         tokens = nullptr;  // n_tokens() ids, in row order
    std::vector<ubatch_seq> seqs;
    bool            yoco     = true;  // cut to the output rows right after kv_shared_layer
    bool            flash_attn = false;  // ggml_flash_attn_ext (F16 masks, V not transposed)
    // every device is the CPU (context.cpp): the attention may use what only the CPU backend
    // has, the kernels of attn_cpu.h for decode-sized batches and flash_attn_ext with a V head
    // size (2*hd) other than K's; false: ggml ops that CUDA and Metal run too
    bool            cpu_attn = false;
    // every device is the CPU: weight products of at most MUL_MAT_CPU_ROWS_MAX rows may use
    // matmul_cpu.h's kernel (false: ggml's mul_mat everywhere)
    bool            cpu_mm = false;

    uint32_t n_tokens() const { return seqs.empty() ? 0 : seqs.back().row0 + seqs.back().n_tokens; }
    uint32_t n_out() const { uint32_t n = 0; for (const auto & s : seqs) n += s.n_out; return n; }
};

// host-filled graph inputs; a tensor the graph ended up not using has no buffer and is skipped
struct seq_inputs {
    ggml_tensor * swa_mask  = nullptr;  // F32 [n_kv_swa, n_tokens]: 0 or -inf (F16 with flash_attn)
    ggml_tensor * full_mask = nullptr;  // F32 [n_kv_full, n_tokens] (cross layers: a view of its last rows)
    uint32_t n_kv_swa  = 0;             // ring cells read
    uint32_t n_kv_full = 0;             // shared-cache cells read (= positions so far)
};
struct group_inputs {                   // sequences of equal n_tokens (Mamba)
    uint32_t first = 0, count = 0;      // ubatch.seqs[first .. first+count)
    ggml_tensor * slots32 = nullptr;    // I32 [count]: state slots (get_rows, ssm_scan)
    ggml_tensor * slots64 = nullptr;    // I64 [count]: the same (set_rows)
};
// a joined attention (attn_cpu.h) of short sequences of a micro-batch over one cache, at one
// stage (before or after the YOCO cut); ub.seqs[idx[k]] is its k-th sequence (idx ascending).
// A stage's short sequences form one join, or several when their depths differ so much that
// padding them all to the deepest would multiply the size of the padded tensors (attn.cpp,
// JOIN_PAD_MAX)
struct attn_join_inputs {
    bool is_swa = false;                // the SWA ring, else the full (shared) cache
    bool cut    = false;                // rows after the YOCO cut (the last n_out of each sequence)
    std::vector<uint32_t> idx;
    std::vector<uint32_t> q_row0, rows; // per joined sequence: its first row of q, its rows
    uint32_t n_kv_max = 0;
    ggml_tensor * seqs = nullptr;       // I64 [ATTN_SEQ_FIELDS, idx.size()]
    ggml_tensor * mask = nullptr;       // F32 [n_kv_max, joined rows]: each row its sequence's, -inf padded
};
struct graph_inputs {
    ggml_tensor * tokens     = nullptr;  // I32 [n_tokens]
    ggml_tensor * out_ids    = nullptr;  // I32 [n_out] rows of the micro-batch that give logits
    ggml_tensor * swa_k_idx  = nullptr;  // I64 [n_tokens]: ring cell per token (slot * n_cells + cell)
    ggml_tensor * swa_v_idx  = nullptr;  // I64 [n_tokens*n_embd_kv]: element index in V^T (mul_mat path only)
    ggml_tensor * full_k_idx = nullptr;  // I64 [n_tokens]
    ggml_tensor * full_v_idx = nullptr;  // I64 [n_tokens*n_embd_kv]
    std::vector<seq_inputs>   seqs;      // per ubatch.seqs entry
    std::vector<group_inputs> groups;
    std::vector<attn_join_inputs> joins;
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
    // attention of every sequence over its own cells; q: [hd, H, n_rows] of all rows
    ggml_tensor * build_attn_seqs(ggml_tensor * q, ggml_tensor * k_all, ggml_tensor * v_all,
                                  uint32_t n_cells, bool is_swa, int il);
    ggml_tensor * build_diff_attn(ggml_tensor * q, ggml_tensor * k_all, ggml_tensor * v_all, uint32_t slot,
                                  uint32_t n_cells, uint32_t n_kv, ggml_tensor * mask, int il);
    // the attention of the sequences of `join` in one set of CPU ops; [2*hd*H/2, joined rows]
    ggml_tensor * build_attn_joined(ggml_tensor * q, ggml_tensor * k_all, ggml_tensor * v_all,
                                    const attn_join_inputs & join, int il);
    // the joins of the current stage for this cache (made on first use; indices into
    // inp_.joins); empty when no sequence of the micro-batch takes the joined path
    std::vector<size_t> join_inputs(bool is_swa);
    // the pair norm of the differential attention on pairs of 2*hd values, then the rows in the
    // original head order: [2*hd*H/2, n_rows]; by_kv_pair: cur is [2*hd, g*n_rows, Hkv/2] (the
    // CPU kernels' order), else [2*hd, n_rows, H/2] or, with flash_attn, [2*hd, H/2, n_rows]
    ggml_tensor * build_pair_norm(ggml_tensor * cur, int64_t n_rows, bool by_kv_pair, int il);
    // the host values of a sequence's mask over one cache: F32 [n_kv, n_tokens] (0 or -inf)
    std::vector<float> seq_mask(size_t i, bool is_swa) const;
    // rows of the current layer of sequence i: [first, first + count)
    uint32_t seq_row0(size_t i) const { return cut_ ? out_row0_[i] : ub_.seqs[i].row0; }
    uint32_t seq_rows(size_t i) const { return cut_ ? ub_.seqs[i].n_out : ub_.seqs[i].n_tokens; }
    ggml_tensor * build_attn_out(ggml_tensor * cur, int il);
    void cb(ggml_tensor * t, const char * name, int il) const;
    // a weight product w @ x: ggml_mul_mat, or mul_mat_cpu (matmul_cpu.h) where it takes it
    ggml_tensor * mm(ggml_tensor * w, ggml_tensor * x);
    ggml_type mask_type() const;

    const model &   model_;
    const hparams & hp_;
    const memory &  mem_;
    ggml_context *  ctx_;
    ggml_cgraph *   gf_;
    ubatch          ub_;

    uint32_t n_rows_    = 0;  // rows the current layer runs on (n_tokens, or n_out after the YOCO cut)
    bool     cut_       = false;
    std::vector<uint32_t> out_row0_;  // first output row of each sequence (after the cut)

    graph_inputs  inp_;
    ggml_tensor * gmu_memory_ = nullptr;  // [d_inner, n_rows] SSM read-out of memory_layer
    ggml_tensor * shared_k_   = nullptr;  // kv_shared_layer's K cache after this batch's write
    ggml_tensor * shared_v_   = nullptr;  // ... and its V cache
};

// whether CUDA and Metal both have flash-attention kernels for head size hd as K and V head
// size (the split path of blocks/attn.cpp); the sizes and why: docs/gpu-op-audit.md
bool flash_attn_gpu_head_size(uint32_t hd);

// rows of tensors [ne0, rows_i] joined along dimension 1 (a balanced tree of ggml_concat)
ggml_tensor * join_rows(ggml_context * ctx, std::vector<ggml_tensor *> parts);

// nodes budget for ggml_new_graph_custom and the scheduler, for micro-batches of up to n_seq
// sequences
size_t graph_size_for(const hparams & hp, uint32_t n_seq);

} // namespace sambay
