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

// How far ahead the scores op prefetches keys: this many K heads (of SUB_CELLS cells each) on in
// the order it reads them, 4 KiB of F16 keys at the real shape. At depth 32K (Q4_0, 2 threads)
// the op took 34-35.5 ms per token with 4-8 heads ahead and 39-42 ms when it fetched the whole
// next block (20 KiB) at the start of each block.
constexpr int64_t PREFETCH_HEADS = 4;

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
// dot4_f16_fn for two queries at once, their masks added: out0[i] = q0 . k_i + mask0[i], out1[i]
// = q1 . k_i + mask1[i] for i < 4 (each key converted once for both)
using dot4x2_f16_fn = void (*)(const float * q0, const float * q1, const ggml_fp16_t * k, int64_t kstride, int64_t hd,
                               const float * mask0, const float * mask1, float * out0, float * out1);
// out = { v0 . w0, v0 . w1, v1 . w0, v1 . w1 } over n values, v0/v1 stored F16 and converted in
// registers once for both weight rows; v1 and w1 may be nullptr (their sums are not written)
using dot2x2_f16_fn = void (*)(const ggml_fp16_t * v0, const ggml_fp16_t * v1, const float * w0, const float * w1,
                               int64_t n, float * out);

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

// the dot2x2_f16 kernels' last n - i values (fewer than a SIMD step) added to their sums s[4]
void dot2x2_f16_finish(const ggml_fp16_t * v0, const ggml_fp16_t * v1, const float * w0, const float * w1, int64_t i,
                       int64_t n, float * s, float * out) {
    for (; i < n; ++i) {
        const float x = ggml_fp16_to_fp32(v0[i]), y = v1 ? ggml_fp16_to_fp32(v1[i]) : 0.0f;
        s[0] += x * w0[i];
        s[2] += y * w0[i];
        if (w1) {
            s[1] += x * w1[i];
            s[3] += y * w1[i];
        }
    }
    out[0] = s[0];
    if (w1) out[1] = s[1];
    if (v1) {
        out[2] = s[2];
        if (w1) out[3] = s[3];
    }
}

#if defined(__x86_64__)
// two queries, four keys: each key converted once (the K read of a decode step is shared by the
// g query heads of its K head; converting it per query doubled the work of a memory-bound loop)
__attribute__((target("avx2,fma,f16c"))) void dot4x2_f16_avx2(const float * q0, const float * q1, const ggml_fp16_t * k,
                                                               int64_t kstride, int64_t hd, const float * mask0,
                                                               const float * mask1, float * out0, float * out1) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (int64_t d = 0; d < hd; d += 8) {
        const __m256 qa = _mm256_loadu_ps(q0 + d), qb = _mm256_loadu_ps(q1 + d);
        const __m256 k0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (k + d)));
        const __m256 k1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (k + kstride + d)));
        const __m256 k2 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (k + 2 * kstride + d)));
        const __m256 k3 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (k + 3 * kstride + d)));
        a0 = _mm256_fmadd_ps(qa, k0, a0);
        a1 = _mm256_fmadd_ps(qa, k1, a1);
        a2 = _mm256_fmadd_ps(qa, k2, a2);
        a3 = _mm256_fmadd_ps(qa, k3, a3);
        b0 = _mm256_fmadd_ps(qb, k0, b0);
        b1 = _mm256_fmadd_ps(qb, k1, b1);
        b2 = _mm256_fmadd_ps(qb, k2, b2);
        b3 = _mm256_fmadd_ps(qb, k3, b3);
    }
    __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    _mm_storeu_ps(out0, _mm_add_ps(_mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)), _mm_loadu_ps(mask0)));
    s = _mm256_hadd_ps(_mm256_hadd_ps(b0, b1), _mm256_hadd_ps(b2, b3));
    _mm_storeu_ps(out1, _mm_add_ps(_mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)), _mm_loadu_ps(mask1)));
}

__attribute__((target("avx2,fma,f16c"))) void dot2x2_f16_avx2(const ggml_fp16_t * v0, const ggml_fp16_t * v1,
                                                               const float * w0, const float * w1, int64_t n, float * out) {
    // a missing row reads (and multiplies) the other one again: its sums are never stored
    const ggml_fp16_t * u = v1 ? v1 : v0;
    const float * x1 = w1 ? w1 : w0;
    // two sets of accumulators (16 cells a step): eight independent FMA chains keep both FMA
    // ports busy when the data is in cache
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0, c0 = a0, c1 = a0, d0 = a0, d1 = a0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m256 x = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (v0 + i)));
        const __m256 y = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (u + i)));
        const __m256 p = _mm256_loadu_ps(w0 + i), q = _mm256_loadu_ps(x1 + i);
        a0 = _mm256_fmadd_ps(x, p, a0);
        a1 = _mm256_fmadd_ps(x, q, a1);
        b0 = _mm256_fmadd_ps(y, p, b0);
        b1 = _mm256_fmadd_ps(y, q, b1);
        const __m256 x2 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (v0 + i + 8)));
        const __m256 y2 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (u + i + 8)));
        const __m256 p2 = _mm256_loadu_ps(w0 + i + 8), q2 = _mm256_loadu_ps(x1 + i + 8);
        c0 = _mm256_fmadd_ps(x2, p2, c0);
        c1 = _mm256_fmadd_ps(x2, q2, c1);
        d0 = _mm256_fmadd_ps(y2, p2, d0);
        d1 = _mm256_fmadd_ps(y2, q2, d1);
    }
    float sums[4] = { hsum_avx2(_mm256_add_ps(a0, c0)), hsum_avx2(_mm256_add_ps(a1, c1)),
                      hsum_avx2(_mm256_add_ps(b0, d0)), hsum_avx2(_mm256_add_ps(b1, d1)) };
    dot2x2_f16_finish(v0, v1, w0, w1, i, n, sums, out);
}
#endif

#if defined(__aarch64__)
void dot2x2_f16_neon(const ggml_fp16_t * v0, const ggml_fp16_t * v1, const float * w0, const float * w1, int64_t n,
                     float * out) {
    const ggml_fp16_t * u = v1 ? v1 : v0;  // as in dot2x2_f16_avx2
    const float * x1 = w1 ? w1 : w0;
    float32x4_t a0 = vdupq_n_f32(0.0f), a1 = a0, b0 = a0, b1 = a0;
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        const float32x4_t x = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *) (v0 + i))));
        const float32x4_t y = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *) (u + i))));
        const float32x4_t p = vld1q_f32(w0 + i), q = vld1q_f32(x1 + i);
        a0 = vfmaq_f32(a0, x, p);
        a1 = vfmaq_f32(a1, x, q);
        b0 = vfmaq_f32(b0, y, p);
        b1 = vfmaq_f32(b1, y, q);
    }
    float sums[4] = { vaddvq_f32(a0), vaddvq_f32(a1), vaddvq_f32(b0), vaddvq_f32(b1) };
    dot2x2_f16_finish(v0, v1, w0, w1, i, n, sums, out);
}

void dot4x2_f16_neon(const float * q0, const float * q1, const ggml_fp16_t * k, int64_t kstride, int64_t hd,
                     const float * mask0, const float * mask1, float * out0, float * out1) {
    float32x4_t a0 = vdupq_n_f32(0.0f), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    auto load = [](const ggml_fp16_t * p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *) p))); };
    for (int64_t d = 0; d < hd; d += 4) {
        const float32x4_t qa = vld1q_f32(q0 + d), qb = vld1q_f32(q1 + d);
        const float32x4_t k0 = load(k + d), k1 = load(k + kstride + d), k2 = load(k + 2 * kstride + d),
                          k3 = load(k + 3 * kstride + d);
        a0 = vfmaq_f32(a0, qa, k0);
        a1 = vfmaq_f32(a1, qa, k1);
        a2 = vfmaq_f32(a2, qa, k2);
        a3 = vfmaq_f32(a3, qa, k3);
        b0 = vfmaq_f32(b0, qb, k0);
        b1 = vfmaq_f32(b1, qb, k1);
        b2 = vfmaq_f32(b2, qb, k2);
        b3 = vfmaq_f32(b3, qb, k3);
    }
    vst1q_f32(out0, vaddq_f32(vpaddq_f32(vpaddq_f32(a0, a1), vpaddq_f32(a2, a3)), vld1q_f32(mask0)));
    vst1q_f32(out1, vaddq_f32(vpaddq_f32(vpaddq_f32(b0, b1), vpaddq_f32(b2, b3)), vld1q_f32(mask1)));
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


// One row pair of the differential softmax (attn_softmax_diff_cpu): n scores of each stripe,
// s1 and s2 (-inf where masked or padded); writes out[c] = P1[c] - lambda * P2[c] with
// P_s = softmax(scale * s_s). tmp: n floats of scratch.
using softmax_diff_fn = void (*)(const float * s1, const float * s2, int64_t n, float scale, float lambda, float * out,
                                 float * tmp);

// The driver of every softmax_diff kernel: Simd's loops over the first n / Simd::W * Simd::W
// cells, the scalar formulas over the rest. Simd provides
//   W: cells per step
//   max(s1, s2, n, m1, m2): the running maxima m1, m2 over cells < n
//   exp(s1, s2, n, scale, m1, m2, out, tmp, l1, l2): out = e^(scale (s1 - m1)), tmp likewise
//     from s2 and m2, their sums added to l1, l2
//   combine(out, tmp, n, a1, a2): out = out * a1 - tmp * a2
template <class Simd>
void softmax_diff_rows(const float * s1, const float * s2, int64_t n, float scale, float lambda, float * out,
                       float * tmp) {
    const int64_t ns = n / Simd::W * Simd::W;
    float m1 = -INFINITY, m2 = -INFINITY;
    Simd::max(s1, s2, ns, m1, m2);
    for (int64_t c = ns; c < n; ++c) {
        m1 = std::max(m1, s1[c]);
        m2 = std::max(m2, s2[c]);
    }
    if (m1 == -INFINITY || m2 == -INFINITY) {  // a stripe sees no cell: no weights
        std::fill(out, out + n, 0.0f);
        return;
    }
    float l1 = 0.0f, l2 = 0.0f;
    Simd::exp(s1, s2, ns, scale, m1, m2, out, tmp, l1, l2);
    for (int64_t c = ns; c < n; ++c) {
        out[c] = std::exp(scale * (s1[c] - m1));
        tmp[c] = std::exp(scale * (s2[c] - m2));
        l1 += out[c];
        l2 += tmp[c];
    }
    const float a1 = 1.0f / l1, a2 = lambda / l2;
    Simd::combine(out, tmp, ns, a1, a2);
    for (int64_t c = ns; c < n; ++c) out[c] = out[c] * a1 - tmp[c] * a2;
}

// no SIMD: W is longer than any row, so every cell takes the driver's scalar formulas
struct softmax_scalar {
    static constexpr int64_t W = 1 << 30;
    static void max(const float *, const float *, int64_t, float &, float &) {}
    static void exp(const float *, const float *, int64_t, float, float, float, float *, float *, float &, float &) {}
    static void combine(float *, const float *, int64_t, float, float) {}
};

void softmax_diff_scalar(const float * s1, const float * s2, int64_t n, float scale, float lambda, float * out,
                         float * tmp) {
    softmax_diff_rows<softmax_scalar>(s1, s2, n, scale, lambda, out, tmp);
}

#if defined(__x86_64__)
// e^x for x <= 0 (x = -inf or below the smallest normal result gives exactly 0): x = n ln2 + r,
// |r| <= ln2/2, e^r by a degree-5 polynomial (relative error ~1e-7), 2^n put in the exponent
__attribute__((target("avx2,fma,f16c"))) inline __m256 exp_neg_avx2(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.33654f);
    const __m256 zero = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(x, lo);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    const __m256 y = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(zero, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

struct softmax_avx2 {
    static constexpr int64_t W = 8;
    __attribute__((target("avx2,fma,f16c"))) static void max(const float * s1, const float * s2, int64_t n, float & m1,
                                                              float & m2) {
        __m256 v1 = _mm256_set1_ps(m1), v2 = _mm256_set1_ps(m2);
        for (int64_t c = 0; c < n; c += 8) {
            v1 = _mm256_max_ps(v1, _mm256_loadu_ps(s1 + c));
            v2 = _mm256_max_ps(v2, _mm256_loadu_ps(s2 + c));
        }
        float a[8], b[8];
        _mm256_storeu_ps(a, v1);
        _mm256_storeu_ps(b, v2);
        m1 = *std::max_element(a, a + 8);
        m2 = *std::max_element(b, b + 8);
    }
    __attribute__((target("avx2,fma,f16c"))) static void exp(const float * s1, const float * s2, int64_t n, float scale,
                                                              float m1, float m2, float * out, float * tmp, float & l1,
                                                              float & l2) {
        // scale * (s - m) as one FMA: scale * s - scale * m
        const __m256 sc = _mm256_set1_ps(scale), b1 = _mm256_set1_ps(-scale * m1), b2 = _mm256_set1_ps(-scale * m2);
        __m256 v1 = _mm256_setzero_ps(), v2 = v1;
        for (int64_t c = 0; c < n; c += 8) {
            const __m256 e1 = exp_neg_avx2(_mm256_fmadd_ps(sc, _mm256_loadu_ps(s1 + c), b1));
            const __m256 e2 = exp_neg_avx2(_mm256_fmadd_ps(sc, _mm256_loadu_ps(s2 + c), b2));
            _mm256_storeu_ps(out + c, e1);
            _mm256_storeu_ps(tmp + c, e2);
            v1 = _mm256_add_ps(v1, e1);
            v2 = _mm256_add_ps(v2, e2);
        }
        l1 += hsum_avx2(v1);
        l2 += hsum_avx2(v2);
    }
    __attribute__((target("avx2,fma,f16c"))) static void combine(float * out, const float * tmp, int64_t n, float a1,
                                                                  float a2) {
        const __m256 v1 = _mm256_set1_ps(a1), v2 = _mm256_set1_ps(a2);
        for (int64_t c = 0; c < n; c += 8) {
            _mm256_storeu_ps(out + c, _mm256_fmsub_ps(_mm256_loadu_ps(out + c), v1, _mm256_mul_ps(_mm256_loadu_ps(tmp + c), v2)));
        }
    }
};

void softmax_diff_avx2(const float * s1, const float * s2, int64_t n, float scale, float lambda, float * out,
                       float * tmp) {
    softmax_diff_rows<softmax_avx2>(s1, s2, n, scale, lambda, out, tmp);
}
#endif

#if defined(__aarch64__)
// exp_neg_avx2's method
inline float32x4_t exp_neg_neon(float32x4_t x) {
    const float32x4_t lo = vdupq_n_f32(-87.33654f);
    const uint32x4_t zero = vcltq_f32(x, lo);
    x = vmaxq_f32(x, lo);
    const float32x4_t n = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(1.44269504088896341f)));
    float32x4_t r = vfmsq_f32(x, n, vdupq_n_f32(0.693359375f));
    r = vfmsq_f32(r, n, vdupq_n_f32(-2.12194440e-4f));
    float32x4_t p = vdupq_n_f32(1.9875691500e-4f);
    p = vfmaq_f32(vdupq_n_f32(1.3981999507e-3f), p, r);
    p = vfmaq_f32(vdupq_n_f32(8.3334519073e-3f), p, r);
    p = vfmaq_f32(vdupq_n_f32(4.1665795894e-2f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.6666665459e-1f), p, r);
    p = vfmaq_f32(vdupq_n_f32(5.0000001201e-1f), p, r);
    const float32x4_t y = vfmaq_f32(vaddq_f32(r, vdupq_n_f32(1.0f)), p, vmulq_f32(r, r));
    const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
    const float32x4_t v = vmulq_f32(y, vreinterpretq_f32_s32(e));
    return vreinterpretq_f32_u32(vbicq_u32(vreinterpretq_u32_f32(v), zero));
}

struct softmax_neon {
    static constexpr int64_t W = 4;
    static void max(const float * s1, const float * s2, int64_t n, float & m1, float & m2) {
        float32x4_t v1 = vdupq_n_f32(m1), v2 = vdupq_n_f32(m2);
        for (int64_t c = 0; c < n; c += 4) {
            v1 = vmaxq_f32(v1, vld1q_f32(s1 + c));
            v2 = vmaxq_f32(v2, vld1q_f32(s2 + c));
        }
        m1 = vmaxvq_f32(v1);
        m2 = vmaxvq_f32(v2);
    }
    static void exp(const float * s1, const float * s2, int64_t n, float scale, float m1, float m2, float * out,
                    float * tmp, float & l1, float & l2) {
        const float32x4_t sc = vdupq_n_f32(scale), b1 = vdupq_n_f32(-scale * m1), b2 = vdupq_n_f32(-scale * m2);
        float32x4_t v1 = vdupq_n_f32(0.0f), v2 = v1;
        for (int64_t c = 0; c < n; c += 4) {
            const float32x4_t e1 = exp_neg_neon(vfmaq_f32(b1, sc, vld1q_f32(s1 + c)));
            const float32x4_t e2 = exp_neg_neon(vfmaq_f32(b2, sc, vld1q_f32(s2 + c)));
            vst1q_f32(out + c, e1);
            vst1q_f32(tmp + c, e2);
            v1 = vaddq_f32(v1, e1);
            v2 = vaddq_f32(v2, e2);
        }
        l1 += vaddvq_f32(v1);
        l2 += vaddvq_f32(v2);
    }
    static void combine(float * out, const float * tmp, int64_t n, float a1, float a2) {
        const float32x4_t v1 = vdupq_n_f32(a1), v2 = vdupq_n_f32(a2);
        for (int64_t c = 0; c < n; c += 4) vst1q_f32(out + c, vfmsq_f32(vmulq_f32(vld1q_f32(out + c), v1), vld1q_f32(tmp + c), v2));
    }
};

void softmax_diff_neon(const float * s1, const float * s2, int64_t n, float scale, float lambda, float * out,
                       float * tmp) {
    softmax_diff_rows<softmax_neon>(s1, s2, n, scale, lambda, out, tmp);
}
#endif

struct kernel {
    dot4_fn      fn;
    dot4_f16_fn  fn_f16;  // nullptr: F16 keys go through the F32 scratch
    dot_fn       dot;
    dot4x2_f16_fn fn_f16x2;  // nullptr: F16 keys are scored one query at a time
    dot2x2_f16_fn dot2x2_f16;  // nullptr: F16 V goes through the F32 chunk buffer
    softmax_diff_fn softmax_diff;
    int64_t      hd_multiple;  // the SIMD width the head size must be a multiple of (fn)
    const char * name;
};

const kernel K_SCALAR = { dot4_scalar, nullptr, dot_scalar, nullptr, nullptr, softmax_diff_scalar, 1, "scalar" };
#if defined(__x86_64__)
const kernel K_AVX2 = { dot4_avx2, dot4_f16_avx2, dot_avx2, dot4x2_f16_avx2, dot2x2_f16_avx2, softmax_diff_avx2, 8, "avx2" };
#endif
#if defined(__aarch64__)
const kernel K_NEON = { dot4_neon, dot4_f16_neon, dot_neon, dot4x2_f16_neon, dot2x2_f16_neon, softmax_diff_neon, 4, "neon" };
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
        for (int64_t sb = b0; sb < b1; ++sb) {
            const int64_t c0 = sb * SUB_CELLS, nc = std::min(SUB_CELLS, sd.n_kv - c0);
            // cells c0 .. c0+nc-1: nc consecutive cache rows
            const char * kc = (const char *) k->data + (sd.k_row + c0) * k->nb[1];
            // F16 keys in whole groups of four are read where they are; else through the scratch
            const bool direct = kern.fn_f16 && k->type == GGML_TYPE_F16 && nc % 4 == 0;
            if (!direct) to_f32(k->type, kc, kf.data(), nc * n_embd_kv);
            for (int64_t s = 0; s < 2; ++s) {
                for (int64_t m = 0; m < Hkv2; ++m) {
                    const int64_t kh_off = (s * Hkv2 + m) * hd;  // this K head of cell c0
                    {
                        // the keys PREFETCH_HEADS heads on in the order they are read (this
                        // block's cells head by head, then the next block's): a core alone keeps
                        // too few misses in flight to read a deep cache at the memory's speed
                        int64_t h = s * Hkv2 + m + PREFETCH_HEADS;
                        const char * base = kc;
                        if (h >= Hkv) {
                            h -= Hkv;
                            base = sb + 1 < b1 ? kc + SUB_CELLS * k->nb[1] : nullptr;
                        }
                        for (int64_t c = 0; base && c < SUB_CELLS; ++c) {
                            // never faults: past the cache it only fetches what nothing reads
                            const char * p = base + c * k->nb[1] + h * hd * (int64_t) kes;
                            for (int64_t o = 0; o < hd * (int64_t) kes; o += 64) __builtin_prefetch(p + o, 0, 3);
                        }
                    }
                    const float * kh = kf.data() + kh_off;
                    const ggml_fp16_t * kh16 = (const ggml_fp16_t *) (kc + kh_off * kes);
                    // the queries that read this K head: (row r, query head jj), n_q = n_rows * g of
                    // them, two at a time where the keys are read in registers
                    const int64_t n_q = sd.n_rows * g;
                    auto q_of = [&](int64_t i) {
                        return (const float *) ((const char *) q->data + (s * H2 + m * g + i % g) * q->nb[1] +
                                                (sd.q_row + i / g) * q->nb[2]);
                    };
                    auto out_of = [&](int64_t i) { return out_row(s, m, sd.row + i / g, i % g) + c0; };
                    auto mask_of = [&](int64_t i) {
                        return (const float *) ((const char *) mask->data + (sd.row + i / g) * mask->nb[1]) + c0;
                    };
                    for (int64_t i = 0; i < n_q;) {
                        const float * qa = q_of(i), * ma = mask_of(i);
                        float * oa = out_of(i);
                        if (direct && kern.fn_f16x2 && i + 1 < n_q) {
                            const float * qb = q_of(i + 1), * mb = mask_of(i + 1);
                            float * ob = out_of(i + 1);
                            for (int64_t c = 0; c < nc; c += 4) {
                                kern.fn_f16x2(qa, qb, kh16 + c * n_embd_kv, n_embd_kv, hd, ma + c, mb + c, oa + c, ob + c);
                            }
                            i += 2;
                            continue;
                        }
                        for (int64_t c = 0; c < nc; c += 4) {
                            float d4[4];
                            // cells past nc are stale data of the scratch (never stored)
                            if (direct) {
                                kern.fn_f16(qa, kh16 + c * n_embd_kv, n_embd_kv, hd, d4);
                            } else {
                                kern.fn(qa, kh + c * n_embd_kv, n_embd_kv, hd, d4);
                            }
                            for (int64_t t = 0; t < 4 && c + t < nc; ++t) oa[c + t] = d4[t] + ma[c + t];
                        }
                        ++i;
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
// A work item walks its channels' V^T rows together, a tile of cells at a time: every row of
// the tile is multiplied with every row of weights before the next tile, so the weights of a
// tile are read from memory once per item (at most PV_TILE_BYTES of them, kept in L1) and the
// item's PV_CHANNELS rows are read as that many sequential streams advancing side by side.
// Short tiles keep those streams close together: at depth 32K (F16 V, 2 threads) tiles of 256
// cells read V ~20% faster than tiles of 2048 (a row finished before the next was started).
constexpr int64_t PV_TILE_BYTES = 16 * 1024;
constexpr int64_t PV_TILE_CELLS = 256;
// ... except for rows of at most this many cells, read in one tile (one row after the other):
// at 16 sequences of 512 cells, tiles of 256 made the V product 25% slower (27 -> 34 ms per
// step), whole rows 30 ms
constexpr int64_t PV_WHOLE_ROW = 1024;

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
    const bool in_registers = kern.dot2x2_f16 && v->type == GGML_TYPE_F16;
    float buf[PV_CHUNK];
    thread_local std::vector<float> acc;  // [channel of the item][col]; kept between calls

    auto n_items = [&](int64_t) { return n_pairs * blocks; };
    auto cost = [&](int64_t i) { const seq_desc sd = read_seq(seqs, i); return sd.n_kv * sd.n_rows; };
    for_thread_share(n_seqs, ith, nth, n_items, cost, [&](int64_t i, int64_t u0, int64_t u1) {
        const seq_desc sd = read_seq(seqs, i);
        const int64_t cols = g * sd.n_rows, col0 = g * sd.row, n_kv = sd.n_kv;
        // cells per tile: a multiple of 16 (the SIMD loops' step), 64 .. PV_TILE_CELLS, or up to
        // the whole row when it is short (PV_WHOLE_ROW); never more weights than PV_TILE_BYTES
        const int64_t cap = n_kv <= PV_WHOLE_ROW ? PV_WHOLE_ROW : PV_TILE_CELLS;
        const int64_t tile = std::clamp<int64_t>(PV_TILE_BYTES / (int64_t) sizeof(float) / cols / 16 * 16, 64, cap);
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
                if (in_registers) {
                    // two channels times two weight rows per pass over the tile, F16 converted in registers
                    for (int64_t ci = 0; ci < n_ch; ci += 2) {
                        const ggml_fp16_t * v0 = (const ggml_fp16_t *) (vm + ci * sd.v_stride * ves) + t0;
                        const ggml_fp16_t * v1 = ci + 1 < n_ch ? v0 + sd.v_stride : nullptr;
                        float * a0 = &acc[ci * cols];
                        for (int64_t j = 0; j < cols; j += 2) {
                            const float * w0 = (const float *) (wm + j * w->nb[1]) + t0;
                            const float * w1 = j + 1 < cols ? (const float *) (wm + (j + 1) * w->nb[1]) + t0 : nullptr;
                            float d[4];
                            kern.dot2x2_f16(v0, v1, w0, w1, nt, d);
                            a0[j] += d[0];
                            if (w1) a0[j + 1] += d[1];
                            if (v1) {
                                a0[cols + j] += d[2];
                                if (w1) a0[cols + j + 1] += d[3];
                            }
                        }
                    }
                    continue;
                }
                for (int64_t ci = 0; ci < n_ch; ++ci) {
                    const char * vrow = vm + ci * sd.v_stride * ves;
                    float * a = &acc[ci * cols];
                    for (int64_t c0 = t0; c0 < t0 + nt; c0 += PV_CHUNK) {
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


// attn_softmax_diff_cpu's scale and lambda, carried in the op's userdata pointer itself (two
// floats; never dereferenced), with the kernel picked when the graph runs
struct softmax_params {
    float scale, lambda;
};
static_assert(sizeof(softmax_params) <= sizeof(void *), "softmax_params must fit in a pointer");

void softmax_diff_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    softmax_params par;
    std::memcpy(&par, &userdata, sizeof(par));
    const kernel & kern = pick_kernel(0);
    const ggml_tensor * kq = dst->src[0];  // [n_kv_max, rows, Hkv/2, 2]
    const ggml_tensor * seqs = dst->src[1];
    const int64_t n_kv_max = kq->ne[0], rows = kq->ne[1], n_pairs = kq->ne[2];
    const seq_desc last = read_seq(seqs, seqs->ne[1] - 1);
    const int64_t g = rows / (last.row + last.n_rows);
    thread_local std::vector<float> tmp;
    if ((int64_t) tmp.size() < n_kv_max) tmp.resize(n_kv_max);
    // threads split (sequence, row pair) units weighed by the sequence's cells; a unit is the two
    // stripes' rows of one (joined row R, query head jj, K-head pair m)
    auto units = [&](int64_t i) { return read_seq(seqs, i).n_rows * g * n_pairs; };
    auto cost = [&](int64_t i) { return read_seq(seqs, i).n_kv; };
    for_thread_share(seqs->ne[1], ith, nth, units, cost, [&](int64_t i, int64_t u0, int64_t u1) {
        const seq_desc sd = read_seq(seqs, i);
        for (int64_t u = u0; u < u1; ++u) {
            const int64_t j = sd.row * g + u / n_pairs, m = u % n_pairs;  // j: the row of (R, jj)
            const float * s1 = (const float *) ((const char *) kq->data + j * kq->nb[1] + m * kq->nb[2]);
            const float * s2 = (const float *) ((const char *) s1 + kq->nb[3]);
            float * o = (float *) ((char *) dst->data + j * dst->nb[1] + m * dst->nb[2]);
            // the sequence's own cells; the V op reads no further
            kern.softmax_diff(s1, s2, sd.n_kv, par.scale, par.lambda, o, tmp.data());
        }
    });
}

// the table's checks that cost nothing at graph build time (its values come at set_inputs)
void check_seqs(const ggml_tensor * seqs) {
    GGML_ASSERT(seqs->type == GGML_TYPE_I64 && seqs->ne[0] == ATTN_SEQ_FIELDS && seqs->ne[1] >= 1);
    GGML_ASSERT(ggml_is_contiguous(seqs));
}

} // namespace

ggml_tensor * attn_softmax_diff_cpu(ggml_context * ctx, ggml_tensor * kq, ggml_tensor * seqs, float scale,
                                    float lambda) {
    GGML_ASSERT(kq->type == GGML_TYPE_F32 && ggml_is_contiguous(kq) && kq->ne[3] == 2);
    check_seqs(seqs);
    const softmax_params par = { scale, lambda };
    void * userdata = nullptr;
    std::memcpy(&userdata, &par, sizeof(par));
    ggml_tensor * args[2] = { kq, seqs };
    ggml_tensor * out = ggml_custom_4d(ctx, GGML_TYPE_F32, kq->ne[0], kq->ne[1], kq->ne[2], 1, args, 2,
                                       softmax_diff_op, GGML_N_TASKS_MAX, userdata);
    return ggml_set_name(out, "attn_softmax_cpu");
}

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
