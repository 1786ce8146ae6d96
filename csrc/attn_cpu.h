// CPU kernels for the attention of decode-sized batches (docs/engine.md, "Attention on the
// CPU"). ggml's mul_mat computes q.k for one cached key and one query head per call of a 64-wide
// dot product: at depth 32K that is millions of calls per token, each ending in a horizontal
// sum. attn_scores_cpu reads each cached key once per step (F16 keys converted in registers,
// others through an F32 scratch filled by ggml's row conversion) and scores every query head that shares the key's head (both
// differential stripes, every row of the sequence) with SIMD dot products whose horizontal sums
// are batched four keys at a time. attn_pv_cpu multiplies the combined weights with V, each V^T
// row converted once. The softmax and the (P1 - lambda P2) combination stay ggml ops.
#pragma once

#include "ggml.h"

namespace sambay {

// scores[c, r*g + jj, m, s] = q[., s*H/2 + m*g + jj, r] . k[., s*Hkv/2 + m, c] + mask[c, r]
// for the cells c < n_kv of one sequence, where g = H / Hkv query heads share a K head and
// m < Hkv/2 indexes pairs of K heads (stripe-major heads, docs/gguf-format.md):
//   q:    F32 [hd, H, n_rows] (a view: rows of the projection)
//   k:    F32/F16/BF16 [hd, Hkv, n_kv] (a view of the sequence's cells; a cell's heads adjacent)
//   mask: F32 [n_kv, n_rows] (0 or -inf)
// returns F32 [n_kv, g*n_rows, Hkv/2, 2]: one row per (stripe, K-head pair, row, query head):
// each stripe is one contiguous half, and the rows a V pair multiplies are adjacent (no
// broadcast in the product with V).
// CPU backend only (a ggml custom op).
ggml_tensor * attn_scores_cpu(ggml_context * ctx, ggml_tensor * q, ggml_tensor * k, ggml_tensor * mask);

// out[ch, j, m] = sum over c < n_kv of w[c, j, m] * v[c, ch, m]: the combined attention weights
// (F32, contiguous [n_kv, cols, Hkv/2]) times the V pairs (a V^T view [n_kv, 2*hd, Hkv/2] of
// the sequence's cells, F32/F16/BF16); returns F32 [2*hd, cols, Hkv/2]. Each V^T row is
// converted to F32 once, in chunks, and multiplied with every row of weights that reads it (ggml's
// mul_mat would round the weights to F16 and convert both sides for every pair of rows).
ggml_tensor * attn_pv_cpu(ggml_context * ctx, ggml_tensor * w, ggml_tensor * v);

// whether this build and CPU have a SIMD kernel (AVX2+FMA on x86-64, NEON on AArch64); the
// scalar loop is used otherwise. SAMBAY_ATTN_SIMD=0 forces the scalar loop (tests).
const char * attn_scores_kernel_name();

} // namespace sambay
