// CPU kernels for the attention of decode-sized batches (docs/engine.md, "Attention on the
// CPU"). ggml's mul_mat computes q.k for one cached key and one query head per call of a 64-wide
// dot product: at depth 32K that is millions of calls per token, each ending in a horizontal
// sum. attn_scores_cpu reads each cached key once per step (F16 keys converted in registers,
// others through an F32 scratch filled by ggml's row conversion) and scores every query head that shares the key's head (both
// differential stripes, every row of the sequence) with SIMD dot products whose horizontal sums
// are batched four keys at a time. attn_softmax_diff_cpu turns both stripes' scores into the
// combined weights P1 - lambda P2 in one op; attn_pv_cpu multiplies them with V. Each op
// serves every sequence of a micro-batch at once (a table of sequences, below): a decode step
// of 16 sequences is a handful of graph nodes per layer, not a subgraph per sequence.
#pragma once

#include "ggml.h"

namespace sambay {

// The joined attention of several sequences (each over its own cells) in one op each: a table
// I64 [ATTN_SEQ_FIELDS, n_seqs] tells the kernels where each sequence's rows and cells are. The
// graph fills it with memory's addressing (memory::row_of, memory::vt_index); the kernels only
// step from a sequence's cell 0 to its cell c (consecutive cache rows, consecutive V^T elements).
// Joined rows are sequence after sequence: a sequence's rows are ROW .. ROW + N_ROWS - 1.
enum attn_seq_field : int64_t {
    ATTN_SEQ_Q_ROW,     // its first row of q (q may hold rows of other sequences in between)
    ATTN_SEQ_ROW,       // its first joined row (of the mask and of the outputs)
    ATTN_SEQ_N_ROWS,    // >= 1
    ATTN_SEQ_N_KV,      // cells read: c < n_kv (1 <= n_kv <= the mask's n_kv_max)
    ATTN_SEQ_K_ROW,     // the K cache row of its cell 0 (cell c: row K_ROW + c)
    ATTN_SEQ_V_ELEM,    // the V^T element of its (channel 0, cell 0): (j, c) at V_ELEM + j*V_STRIDE + c
    ATTN_SEQ_V_STRIDE,  // V^T elements from one channel to the next
    ATTN_SEQ_FIELDS,
};

// scores[c, R*g + jj, m, s] = q[., s*H/2 + m*g + jj, q_row] . k[., s*Hkv/2 + m, cell c] + mask[c, R]
// for joined row R of a sequence (q_row its row of q) and its cells c < n_kv; the padding
// n_kv <= c < n_kv_max is not written (the softmax op reads each sequence's own cells only).
// g = H / Hkv query heads share a K head and m < Hkv/2 indexes pairs of K heads (stripe-major
// heads, docs/gguf-format.md):
//   q:     F32 [hd, H, n_q_rows] (a view: rows of the projection)
//   k_all: F32/F16/BF16 K cache rows [Hkv*hd, n_cache_rows] (a cell's heads adjacent)
//   mask:  F32 [n_kv_max, n_rows] (0 or -inf; n_rows = the joined rows of all sequences)
//   seqs:  I64 [ATTN_SEQ_FIELDS, n_seqs]
// returns F32 [n_kv_max, g*n_rows, Hkv/2, 2]: one row per (stripe, K-head pair, joined row,
// query head): each stripe is one contiguous half, and the rows a V pair multiplies are
// adjacent (no broadcast in the product with V). Threads split (sequence, block of 8 cells).
// CPU backend only (a ggml custom op).
ggml_tensor * attn_scores_cpu(ggml_context * ctx, ggml_tensor * q, ggml_tensor * k_all, ggml_tensor * mask,
                              ggml_tensor * seqs);

// w[c, j, m] = P1[c, j, m] - lambda * P2[c, j, m] for c < the n_kv of row j's sequence (not
// written past it: the V op reads no further), where P_s[., j, m] = softmax(scale * kq[., j, m, s]) over those cells: the combined
// attention weights of both stripes from attn_scores_cpu's output (kq, F32 [n_kv_max, g*n_rows,
// Hkv/2, 2]; seqs as there), in one op (ggml's soft_max, scale and sub were five passes over the
// scores). Returns F32 [n_kv_max, g*n_rows, Hkv/2]. Threads split (sequence, row, K-head pair)
// units.
ggml_tensor * attn_softmax_diff_cpu(ggml_context * ctx, ggml_tensor * kq, ggml_tensor * seqs, float scale, float lambda);

// out[ch, R*g + jj, m] = sum over the cells c < n_kv of R's sequence of w[c, R*g + jj, m] * V^T[m*dv + ch, c]:
// the combined attention weights (F32, contiguous [n_kv_max, g*n_rows, Hkv/2]) times the V pairs
// of each sequence's cells (v_all: the whole V^T cache, contiguous, F32/F16/BF16, addressed by
// seqs); returns F32 [dv, g*n_rows, Hkv/2] (dv = 2*hd). Each V^T row is converted to F32 once
// and multiplied with every row of weights that reads it (ggml's mul_mat would round the weights
// to F16 and convert both sides for every pair of rows); a work item's 8 rows are read side by
// side, a tile of cells at a time. Threads split (sequence, V pair, 8 channels).
ggml_tensor * attn_pv_cpu(ggml_context * ctx, ggml_tensor * w, ggml_tensor * v_all, ggml_tensor * seqs, int64_t dv);

// whether this build and CPU have a SIMD kernel (AVX2+FMA on x86-64, NEON on AArch64); the
// scalar loop is used otherwise. SAMBAY_ATTN_SIMD=0 forces the scalar loop (tests).
const char * attn_scores_kernel_name();

} // namespace sambay
