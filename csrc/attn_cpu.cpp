#include "attn_cpu.h"

#include "ggml-cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif

namespace sambay {

namespace {

// cells converted to F32 at a time: 8 cells of all K heads (40 KB at n_embd_kv 1280) stay in L1/L2
// while every query head scores them
constexpr int64_t SUB_CELLS = 8;

// out[i] = q . k[i * kstride .. + hd] for i < 4 (four keys, one query)
using dot4_fn = void (*)(const float * q, const float * k, int64_t kstride, int64_t hd, float * out);

void dot4_scalar(const float * q, const float * k, int64_t kstride, int64_t hd, float * out) {
    for (int i = 0; i < 4; ++i) {
        const float * ki = k + i * kstride;
        float s = 0.0f;
        for (int64_t d = 0; d < hd; ++d) s += q[d] * ki[d];
        out[i] = s;
    }
}

// sum of x[i] * y[i] for i < n
using dot_fn = float (*)(const float * x, const float * y, int64_t n);
// dot4_fn on keys stored F16, converted in registers
using dot4_f16_fn = void (*)(const float * q, const ggml_fp16_t * k, int64_t kstride, int64_t hd, float * out);
// out[0] = v . w0 and, with w1, out[1] = v . w1 (n values; v stored F16, converted in registers once for both)
using dot2_f16_fn = void (*)(const ggml_fp16_t * v, const float * w0, const float * w1, int64_t n, float * out);

float dot_scalar(const float * x, const float * y, int64_t n) {
    float s = 0.0f;
    for (int64_t i = 0; i < n; ++i) s += x[i] * y[i];
    return s;
}

#if defined(__x86_64__)
__attribute__((target("avx2,fma,f16c"))) inline float hsum_avx2(__m256 x) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

__attribute__((target("avx2,fma,f16c"))) float dot_avx2(const float * x, const float * y, int64_t n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), _mm256_loadu_ps(y + i + 8), a1);
    }
    float s = hsum_avx2(_mm256_add_ps(a0, a1));
    for (; i < n; ++i) s += x[i] * y[i];
    return s;
}

// hd % 8 == 0
__attribute__((target("avx2,fma"))) void dot4_avx2(const float * q, const float * k, int64_t kstride, int64_t hd,
                                                    float * out) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (int64_t d = 0; d < hd; d += 8) {
        const __m256 qv = _mm256_loadu_ps(q + d);
        a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + d), a0);
        a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + kstride + d), a1);
        a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 2 * kstride + d), a2);
        a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 3 * kstride + d), a3);
    }
    // [a0 01, a0 23, a1 01, a1 23 | a0 45, a0 67, a1 45, a1 67], then the four sums per half
    const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)));
}
#endif

#if defined(__x86_64__)
// four F16 keys converted in registers (no scratch): the memory stream and the FMAs overlap
__attribute__((target("avx2,fma,f16c"))) void dot4_f16_avx2(const float * q, const ggml_fp16_t * k, int64_t kstride,
                                                             int64_t hd, float * out) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (int64_t d = 0; d < hd; d += 8) {
        const __m256 qv = _mm256_loadu_ps(q + d);
        a0 = _mm256_fmadd_ps(qv, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (k + d))), a0);
        a1 = _mm256_fmadd_ps(qv, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (k + kstride + d))), a1);
        a2 = _mm256_fmadd_ps(qv, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (k + 2 * kstride + d))), a2);
        a3 = _mm256_fmadd_ps(qv, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (k + 3 * kstride + d))), a3);
    }
    const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)));
}
#endif

// the dot2_f16 kernels' last n - i values (fewer than a SIMD step) added to their sums s0, s1
void dot2_f16_finish(const ggml_fp16_t * v, const float * w0, const float * w1, int64_t i, int64_t n, float s0,
                     float s1, float * out) {
    for (; i < n; ++i) {
        const float x = ggml_fp16_to_fp32(v[i]);
        s0 += x * w0[i];
        if (w1) s1 += x * w1[i];
    }
    out[0] = s0;
    if (w1) out[1] = s1;
}

#if defined(__x86_64__)
__attribute__((target("avx2,fma,f16c"))) void dot2_f16_avx2(const ggml_fp16_t * v, const float * w0, const float * w1,
                                                             int64_t n, float * out) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m256 v0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (v + i)));
        const __m256 v1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (v + i + 8)));
        a0 = _mm256_fmadd_ps(v0, _mm256_loadu_ps(w0 + i), a0);
        a1 = _mm256_fmadd_ps(v1, _mm256_loadu_ps(w0 + i + 8), a1);
        if (w1) {
            b0 = _mm256_fmadd_ps(v0, _mm256_loadu_ps(w1 + i), b0);
            b1 = _mm256_fmadd_ps(v1, _mm256_loadu_ps(w1 + i + 8), b1);
        }
    }
    dot2_f16_finish(v, w0, w1, i, n, hsum_avx2(_mm256_add_ps(a0, a1)), hsum_avx2(_mm256_add_ps(b0, b1)), out);
}
#endif

#if defined(__aarch64__)
void dot2_f16_neon(const ggml_fp16_t * v, const float * w0, const float * w1, int64_t n, float * out) {
    float32x4_t a0 = vdupq_n_f32(0.0f), a1 = a0, b0 = a0, b1 = a0;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const float32x4_t v0 = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *) (v + i))));
        const float32x4_t v1 = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *) (v + i + 4))));
        a0 = vfmaq_f32(a0, v0, vld1q_f32(w0 + i));
        a1 = vfmaq_f32(a1, v1, vld1q_f32(w0 + i + 4));
        if (w1) {
            b0 = vfmaq_f32(b0, v0, vld1q_f32(w1 + i));
            b1 = vfmaq_f32(b1, v1, vld1q_f32(w1 + i + 4));
        }
    }
    dot2_f16_finish(v, w0, w1, i, n, vaddvq_f32(vaddq_f32(a0, a1)), vaddvq_f32(vaddq_f32(b0, b1)), out);
}

// dot4_neon on F16 keys converted in registers (FCVTL: every AArch64 CPU has it)
void dot4_f16_neon(const float * q, const ggml_fp16_t * k, int64_t kstride, int64_t hd, float * out) {
    float32x4_t a0 = vdupq_n_f32(0.0f), a1 = a0, a2 = a0, a3 = a0;
    auto load = [](const ggml_fp16_t * p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *) p))); };
    for (int64_t d = 0; d < hd; d += 4) {
        const float32x4_t qv = vld1q_f32(q + d);
        a0 = vfmaq_f32(a0, qv, load(k + d));
        a1 = vfmaq_f32(a1, qv, load(k + kstride + d));
        a2 = vfmaq_f32(a2, qv, load(k + 2 * kstride + d));
        a3 = vfmaq_f32(a3, qv, load(k + 3 * kstride + d));
    }
    vst1q_f32(out, vpaddq_f32(vpaddq_f32(a0, a1), vpaddq_f32(a2, a3)));
}

float dot_neon(const float * x, const float * y, int64_t n) {
    float32x4_t a0 = vdupq_n_f32(0.0f), a1 = a0;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        a0 = vfmaq_f32(a0, vld1q_f32(x + i), vld1q_f32(y + i));
        a1 = vfmaq_f32(a1, vld1q_f32(x + i + 4), vld1q_f32(y + i + 4));
    }
    float s = vaddvq_f32(vaddq_f32(a0, a1));
    for (; i < n; ++i) s += x[i] * y[i];
    return s;
}

// hd % 4 == 0
void dot4_neon(const float * q, const float * k, int64_t kstride, int64_t hd, float * out) {
    float32x4_t a0 = vdupq_n_f32(0.0f), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t d = 0; d < hd; d += 4) {
        const float32x4_t qv = vld1q_f32(q + d);
        a0 = vfmaq_f32(a0, qv, vld1q_f32(k + d));
        a1 = vfmaq_f32(a1, qv, vld1q_f32(k + kstride + d));
        a2 = vfmaq_f32(a2, qv, vld1q_f32(k + 2 * kstride + d));
        a3 = vfmaq_f32(a3, qv, vld1q_f32(k + 3 * kstride + d));
    }
    vst1q_f32(out, vpaddq_f32(vpaddq_f32(a0, a1), vpaddq_f32(a2, a3)));
}
#endif

struct kernel {
    dot4_fn      fn;
    dot4_f16_fn  fn_f16;  // nullptr: F16 keys go through the F32 scratch
    dot_fn       dot;
    dot2_f16_fn  dot2_f16;  // nullptr: F16 V goes through the F32 chunk buffer
    int64_t      hd_multiple;  // the SIMD width the head size must be a multiple of (fn)
    const char * name;
};

const kernel K_SCALAR = { dot4_scalar, nullptr, dot_scalar, nullptr, 1, "scalar" };
#if defined(__x86_64__)
const kernel K_AVX2 = { dot4_avx2, dot4_f16_avx2, dot_avx2, dot2_f16_avx2, 8, "avx2" };
#endif
#if defined(__aarch64__)
const kernel K_NEON = { dot4_neon, dot4_f16_neon, dot_neon, dot2_f16_neon, 4, "neon" };
#endif

const kernel & pick_kernel(int64_t hd) {
    const char * env = std::getenv("SAMBAY_ATTN_SIMD");
    if (env && std::strcmp(env, "0") == 0) return K_SCALAR;
#if defined(__x86_64__)
    static const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                                 __builtin_cpu_supports("f16c");
    if (hd % K_AVX2.hd_multiple == 0 && has_avx2) return K_AVX2;
#elif defined(__aarch64__)
    if (hd % K_NEON.hd_multiple == 0) return K_NEON;
#endif
    (void) hd;
    return K_SCALAR;
}

// n elements of a cache of type `type` from src to F32
void to_f32(ggml_type type, const void * src, float * out, int64_t n) {
    switch (type) {
        case GGML_TYPE_F16:  ggml_cpu_fp16_to_fp32((const ggml_fp16_t *) src, out, n); break;
        case GGML_TYPE_BF16: ggml_cpu_bf16_to_fp32((const ggml_bf16_t *) src, out, n); break;
        default:             std::memcpy(out, src, n * sizeof(float)); break;
    }
}

// one row of the table of sequences (attn_cpu.h)
struct seq_desc {
    int64_t q_row, row, n_rows, n_kv, k_row, v_elem, v_stride;
};

seq_desc read_seq(const ggml_tensor * seqs, int64_t i) {
    const int64_t * f = (const int64_t *) ((const char *) seqs->data + i * seqs->nb[1]);
    return { f[ATTN_SEQ_Q_ROW], f[ATTN_SEQ_ROW],  f[ATTN_SEQ_N_ROWS],  f[ATTN_SEQ_N_KV],
             f[ATTN_SEQ_K_ROW], f[ATTN_SEQ_V_ELEM], f[ATTN_SEQ_V_STRIDE] };
}

// Thread ith's share of the work units of all sequences: sequence i has units(i) units of
// cost(i) >= 1 each, laid end to end in sequence order; a unit belongs to the thread whose
// equal slice of the total cost holds its start. Calls fn(i, u0, u1) for each sequence with
// units [u0, u1) in this thread's share, so one deep sequence and many short ones both spread
// over every thread.
template <class Units, class Cost, class Fn>
void for_thread_share(int64_t n_seqs, int ith, int nth, Units units, Cost cost, Fn fn) {
    int64_t total = 0;
    for (int64_t i = 0; i < n_seqs; ++i) total += units(i) * cost(i);
    const int64_t lo = total * ith / nth, hi = total * (ith + 1) / nth;
    int64_t at = 0;  // the start of sequence i's first unit
    for (int64_t i = 0; i < n_seqs && at < hi; ++i) {
        const int64_t n = units(i), c = cost(i);
        // unit u starts at at + u*c: this thread's when lo <= at + u*c < hi
        const int64_t u0 = lo <= at ? 0 : std::min(n, (lo - at + c - 1) / c);
        const int64_t u1 = std::min(n, (hi - at + c - 1) / c);
        if (u0 < u1) fn(i, u0, u1);
        at += n * c;
    }
}

void scores_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const kernel & kern = *(const kernel *) userdata;
    const ggml_tensor * q = dst->src[0];
    const ggml_tensor * k = dst->src[1];
    const ggml_tensor * mask = dst->src[2];
    const ggml_tensor * seqs = dst->src[3];
    const int64_t hd = q->ne[0], H = q->ne[1];
    const int64_t n_embd_kv = k->ne[0], Hkv = n_embd_kv / hd;
    const int64_t g = H / Hkv, H2 = H / 2, Hkv2 = Hkv / 2;
    const int64_t n_kv_max = dst->ne[0], cols_all = dst->ne[1];
    const size_t  kes = ggml_type_size(k->type);

    thread_local std::vector<float> kf;
    if ((int64_t) kf.size() < SUB_CELLS * n_embd_kv) kf.assign(SUB_CELLS * n_embd_kv, 0.0f);
    float * out = (float *) dst->data;
    // the output row of (stripe s, K-head pair m, joined row R, query head jj)
    auto out_row = [&](int64_t s, int64_t m, int64_t R, int64_t jj) {
        return out + ((s * Hkv2 + m) * cols_all + R * g + jj) * n_kv_max;
    };

    auto n_blocks = [&](int64_t i) { return (read_seq(seqs, i).n_kv + SUB_CELLS - 1) / SUB_CELLS; };
    auto rows = [&](int64_t i) { return read_seq(seqs, i).n_rows; };
    for_thread_share(seqs->ne[1], ith, nth, n_blocks, rows, [&](int64_t i, int64_t b0, int64_t b1) {
        const seq_desc sd = read_seq(seqs, i);
        if (b0 == 0 && sd.n_kv < n_kv_max) {
            // the padding past the sequence's cells, by the thread of its first block
            for (int64_t s = 0; s < 2; ++s)
                for (int64_t m = 0; m < Hkv2; ++m)
                    for (int64_t r = 0; r < sd.n_rows; ++r)
                        for (int64_t jj = 0; jj < g; ++jj) {
                            float * o = out_row(s, m, sd.row + r, jj);
                            std::fill(o + sd.n_kv, o + n_kv_max, -INFINITY);
                        }
        }
        for (int64_t sb = b0; sb < b1; ++sb) {
            const int64_t c0 = sb * SUB_CELLS, nc = std::min(SUB_CELLS, sd.n_kv - c0);
            // cells c0 .. c0+nc-1: nc consecutive cache rows
            const char * kc = (const char *) k->data + (sd.k_row + c0) * k->nb[1];
            // F16 keys in whole groups of four are read where they are; else through the scratch
            const bool direct = kern.fn_f16 && k->type == GGML_TYPE_F16 && nc % 4 == 0;
            if (sb + 1 < b1) {
                // the next block's keys on their way while this one is scored: a core alone
                // keeps too few cache misses in flight to read a deep cache at the memory's
                // speed (measured at depth 32K: ~10% off this op)
                const char * next = kc + SUB_CELLS * k->nb[1];
                const int64_t bytes = std::min(SUB_CELLS, sd.n_kv - c0 - SUB_CELLS) * (int64_t) k->nb[1];
                for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(next + o, 0, 3);
            }
            if (!direct) to_f32(k->type, kc, kf.data(), nc * n_embd_kv);
            for (int64_t s = 0; s < 2; ++s) {
                for (int64_t m = 0; m < Hkv2; ++m) {
                    const int64_t kh_off = (s * Hkv2 + m) * hd;  // this K head of cell c0
                    const float * kh = kf.data() + kh_off;
                    const ggml_fp16_t * kh16 = (const ggml_fp16_t *) (kc + kh_off * kes);
                    for (int64_t r = 0; r < sd.n_rows; ++r) {
                        const float * mrow = (const float *) ((const char *) mask->data + (sd.row + r) * mask->nb[1]) + c0;
                        for (int64_t jj = 0; jj < g; ++jj) {
                            const float * qp = (const float *) ((const char *) q->data + (s * H2 + m * g + jj) * q->nb[1] +
                                                                (sd.q_row + r) * q->nb[2]);
                            float * o = out_row(s, m, sd.row + r, jj) + c0;
                            for (int64_t c = 0; c < nc; c += 4) {
                                float d4[4];
                                // cells past nc are stale data of the scratch (never stored)
                                if (direct) {
                                    kern.fn_f16(qp, kh16 + c * n_embd_kv, n_embd_kv, hd, d4);
                                } else {
                                    kern.fn(qp, kh + c * n_embd_kv, n_embd_kv, hd, d4);
                                }
                                for (int64_t t = 0; t < 4 && c + t < nc; ++t) o[c + t] = d4[t] + mrow[c + t];
                            }
                        }
                    }
                }
            }
        }
    });
}

// cells of a V^T row converted to F32 at a time when V is not read in registers
constexpr int64_t PV_CHUNK = 512;
// V^T rows (channels) per work item
constexpr int64_t PV_CHANNELS = 8;
// bytes of weights (cols rows of a tile of cells) kept in L1 while every channel of a work item
// reads them: a tile of cells is multiplied with all the item's channels before the next one, so
// the weights are read from memory once per item rather than once per channel
constexpr int64_t PV_TILE_BYTES = 16 * 1024;

void pv_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const kernel & kern = *(const kernel *) userdata;
    const ggml_tensor * w = dst->src[0];     // F32 [n_kv_max, g*n_rows, Hkv/2]
    const ggml_tensor * v = dst->src[1];     // the V^T cache, contiguous
    const ggml_tensor * seqs = dst->src[2];
    const int64_t n_seqs = seqs->ne[1], n_pairs = w->ne[2], dv = dst->ne[0];
    const seq_desc last = read_seq(seqs, n_seqs - 1);
    const int64_t g = w->ne[1] / (last.row + last.n_rows);
    const size_t  ves = ggml_type_size(v->type);
    const int64_t blocks = (dv + PV_CHANNELS - 1) / PV_CHANNELS;
    const bool in_registers = kern.dot2_f16 && v->type == GGML_TYPE_F16;
    float buf[PV_CHUNK];
    thread_local std::vector<float> acc;  // [channel of the item][col]; kept between calls

    auto n_items = [&](int64_t) { return n_pairs * blocks; };
    auto cost = [&](int64_t i) { const seq_desc sd = read_seq(seqs, i); return sd.n_kv * sd.n_rows; };
    for_thread_share(n_seqs, ith, nth, n_items, cost, [&](int64_t i, int64_t u0, int64_t u1) {
        const seq_desc sd = read_seq(seqs, i);
        const int64_t cols = g * sd.n_rows, col0 = g * sd.row, n_kv = sd.n_kv;
        // cells per tile: a multiple of 16 (the SIMD loops' step), at least 64
        const int64_t tile = std::max<int64_t>(64, PV_TILE_BYTES / (int64_t) sizeof(float) / cols / 16 * 16);
        acc.resize(PV_CHANNELS * cols);
        for (int64_t item = u0; item < u1; ++item) {
            const int64_t m = item / blocks, ch0 = (item % blocks) * PV_CHANNELS;
            const int64_t n_ch = std::min(dv, ch0 + PV_CHANNELS) - ch0;
            const char * wm = (const char *) w->data + m * w->nb[2] + col0 * w->nb[1];
            // channel j = m*dv + ch of the sequence's V^T
            const char * vm = (const char *) v->data + (sd.v_elem + (m * dv + ch0) * sd.v_stride) * ves;
            std::fill(acc.begin(), acc.end(), 0.0f);
            for (int64_t t0 = 0; t0 < n_kv; t0 += tile) {
                const int64_t nt = std::min(tile, n_kv - t0);
                for (int64_t ci = 0; ci < n_ch; ++ci) {
                    const char * vrow = vm + ci * sd.v_stride * ves;
                    float * a = &acc[ci * cols];
                    if (in_registers) {
                        // two weight rows per pass over the tile, F16 converted in registers
                        const ggml_fp16_t * v16 = (const ggml_fp16_t *) vrow + t0;
                        for (int64_t j = 0; j < cols; j += 2) {
                            const float * w0 = (const float *) (wm + j * w->nb[1]) + t0;
                            const float * w1 = j + 1 < cols ? (const float *) (wm + (j + 1) * w->nb[1]) + t0 : nullptr;
                            float d[2];
                            kern.dot2_f16(v16, w0, w1, nt, d);
                            a[j] += d[0];
                            if (w1) a[j + 1] += d[1];
                        }
                    } else for (int64_t c0 = t0; c0 < t0 + nt; c0 += PV_CHUNK) {
                        const int64_t n = std::min(PV_CHUNK, t0 + nt - c0);
                        to_f32(v->type, vrow + c0 * ves, buf, n);
                        for (int64_t j = 0; j < cols; ++j) {
                            a[j] += kern.dot(buf, (const float *) (wm + j * w->nb[1]) + c0, n);
                        }
                    }
                }
            }
            for (int64_t ci = 0; ci < n_ch; ++ci) {
                char * o = (char *) dst->data + m * dst->nb[2] + col0 * dst->nb[1] + (ch0 + ci) * sizeof(float);
                for (int64_t j = 0; j < cols; ++j) *(float *) (o + j * dst->nb[1]) = acc[ci * cols + j];
            }
        }
    });
}

// the table's checks that cost nothing at graph build time (its values come at set_inputs)
void check_seqs(const ggml_tensor * seqs) {
    GGML_ASSERT(seqs->type == GGML_TYPE_I64 && seqs->ne[0] == ATTN_SEQ_FIELDS && seqs->ne[1] >= 1);
    GGML_ASSERT(ggml_is_contiguous(seqs));
}

} // namespace

ggml_tensor * attn_pv_cpu(ggml_context * ctx, ggml_tensor * w, ggml_tensor * v_all, ggml_tensor * seqs, int64_t dv) {
    GGML_ASSERT(w->type == GGML_TYPE_F32 && ggml_is_contiguous(w));
    GGML_ASSERT(v_all->type == GGML_TYPE_F32 || v_all->type == GGML_TYPE_F16 || v_all->type == GGML_TYPE_BF16);
    GGML_ASSERT(ggml_is_contiguous(v_all));
    check_seqs(seqs);
    ggml_tensor * args[3] = { w, v_all, seqs };
    ggml_tensor * out = ggml_custom_4d(ctx, GGML_TYPE_F32, dv, w->ne[1], w->ne[2], 1, args, 3, pv_op,
                                       GGML_N_TASKS_MAX, (void *) &pick_kernel(0));
    return ggml_set_name(out, "attn_pv_cpu");
}

ggml_tensor * attn_scores_cpu(ggml_context * ctx, ggml_tensor * q, ggml_tensor * k_all, ggml_tensor * mask,
                              ggml_tensor * seqs) {
    const int64_t hd = q->ne[0], H = q->ne[1];
    GGML_ASSERT(q->type == GGML_TYPE_F32 && mask->type == GGML_TYPE_F32);
    GGML_ASSERT(k_all->type == GGML_TYPE_F32 || k_all->type == GGML_TYPE_F16 || k_all->type == GGML_TYPE_BF16);
    GGML_ASSERT(k_all->ne[0] % hd == 0);
    const int64_t Hkv = k_all->ne[0] / hd;
    GGML_ASSERT(Hkv % 2 == 0 && H % Hkv == 0);
    GGML_ASSERT(q->nb[0] == sizeof(float) && mask->nb[0] == sizeof(float));
    // a cell's K heads adjacent, a sequence's cells consecutive rows
    GGML_ASSERT(ggml_is_contiguous(k_all));
    check_seqs(seqs);
    ggml_tensor * args[4] = { q, k_all, mask, seqs };
    const kernel & kern = pick_kernel(hd);
    ggml_tensor * out = ggml_custom_4d(ctx, GGML_TYPE_F32, mask->ne[0], (H / Hkv) * mask->ne[1], Hkv / 2, 2, args, 4,
                                       scores_op, GGML_N_TASKS_MAX, (void *) &kern);
    return ggml_set_name(out, "attn_scores_cpu");
}

const char * attn_scores_kernel_name() {
    // the kernel of a 64-wide head (the real model's)
    return pick_kernel(64).name;
}

} // namespace sambay
