// Weight products of decode-sized batches on the CPU (docs/engine.md, "Weight products at
// decode"). A decode step reads every weight once. ggml's gemv for its repacked Q4_0 layout
// keeps a core busy long enough per 144-byte block that the core's own stream of cache misses
// stalls, so weights arrive at ~14 GB/s of the ~26 two cores can read. mul_mat_cpu's kernels
// (ggml's repacked Q4_0 and Q4_K, Q6_K as stored; x86-64 with AVX2) spend fewer instructions
// per block and ask for each block ~2 KiB before it is used.
#pragma once

#include "ggml.h"

namespace sambay {

// Rows of activations up to which mul_mat_cpu takes a product: a decode step of up to 16
// sequences. ggml's repacked matmul runs its gemv (one activation row per pass over the
// weights) below 4 rows and its gemm from 4; the kernels here read the weights once for up to
// 16 rows and ran the real ffn_up at 16 rows 2.1x faster than ggml's gemm (docs/engine.md).
// Prefill-sized products (more rows) stay on ggml's gemm, which was not measured against them.
constexpr int64_t MUL_MAT_CPU_ROWS_MAX = 16;

// whether mul_mat_cpu computes w @ x: w a 2-D weight that ggml's CPU backend repacked into its
// 8-row Q4_0 or Q4_K layout (a "CPU_REPACK" buffer, rows a multiple of 8, on an x86-64 ggml with
// AVX2: the layouts ggml picks there), or a Q6_K matrix in host memory as stored
// (mul_mat_cpu_reads_as_stored); x F32 with unit element stride and at most
// MUL_MAT_CPU_ROWS_MAX rows (ne1*ne2*ne3)
bool mul_mat_cpu_takes(const ggml_tensor * w, const ggml_tensor * x);

// whether mul_mat_cpu reads w in the layout the file stores (Q6_K on an x86-64 ggml with AVX2;
// the Q4_0 and Q4_K layouts it reads are ggml's repacked copies). Such a matrix streams ~1.6x
// faster from huge pages than from a mapped file's 4 KiB pages (the real model's tied output,
// 420 MB of Q6_K: 18 against 29-31 ms per token), so model.cpp copies it out of the mapping.
bool mul_mat_cpu_reads_as_stored(const ggml_tensor * w);

// w @ x as ggml_mul_mat computes it: F32 [w->ne[1], x->ne[1], x->ne[2], x->ne[3]], each value
// bit for bit what ggml's AVX2 kernels give (the activations quantized to Q8_0 or Q8_K by
// ggml's own routine, the same integer sums, the same float operations in the same order). The
// weight is not a source of the
// node (ggml-cpu hands an op with a repacked source to the repack buffer, which takes MUL_MAT
// only): the node carries it in its userdata, and its name "mm_cpu <weight name without the
// blk.N. prefix>" says which it is (the op profile groups by it). Threads split the 8-row
// groups (Q4_0, Q4_K) or the rows (Q6_K) of w. CPU backend only (a ggml custom op).
ggml_tensor * mul_mat_cpu(ggml_context * ctx, ggml_tensor * w, ggml_tensor * x);

// the kernel mul_mat_cpu picks when a graph is built: "avx2", or "scalar" (SAMBAY_MM_SIMD=0
// forces it: tests)
const char * mul_mat_cpu_kernel_name();

} // namespace sambay
