#include "matmul_cpu.h"

#include "ggml-backend.h"
#include "ggml-cpu.h"

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace sambay {

namespace {

constexpr int64_t QK = 32;     // values per Q4_0 and Q8_0 block
constexpr int64_t GROUP = 8;   // weight rows per repacked block

// ggml's repacked Q4_0 layout for x86-64 (repack.cpp, block_q4_0x8 built with an interleave of
// 8): one block holds the blocks of 32 values of 8 consecutive rows. d[j] is row j's scale;
// qs[c*64 + j*8 + i] is byte c*8 + i (c = 0, 1; i < 8) of row j's Q4_0 bytes, XORed with 0x88.
// A Q4_0 byte t holds value t in its low nibble and value t + 16 in its high one, each stored
// as q + 8 (q in -8..7): after the XOR, nibble n stands for n - 8 again.
struct block_q4_0x8 {
    ggml_fp16_t d[GROUP];
    uint8_t     qs[QK * GROUP / 2];
};
static_assert(sizeof(block_q4_0x8) == 144, "ggml's block_q4_0x8 is 8 scales and 128 bytes");

// ggml's block_q8_0: a scale and 32 signed bytes
struct block_q8_0 {
    ggml_fp16_t d;
    int8_t      qs[QK];
};
static_assert(sizeof(block_q8_0) == 34, "ggml's block_q8_0 is a scale and 32 bytes");

constexpr int64_t QK_K = 256;  // values per K-quant super-block

// ggml's block_q6_K, used where it lies (never repacked on x86-64): value v of half h (v < 128)
// is 16 * (2 bits of qh) + (4 bits of ql) - 32, times scales[v / 16 + 8h] times d. Within a half,
// values m*32 + l (m < 4, l < 32) take the low (m = 0, 1) or high (m = 2, 3) nibble of
// ql[64h + 32(m % 2) + l] and bits 2m, 2m+1 of qh[32h + l].
struct block_q6_K {
    uint8_t     ql[QK_K / 2];
    uint8_t     qh[QK_K / 4];
    int8_t      scales[QK_K / 16];
    ggml_fp16_t d;
};
static_assert(sizeof(block_q6_K) == 210, "ggml's block_q6_K is 210 bytes");

// ggml's block_q8_K: the activations of K-quant products; bsums[i] = the sum of qs[16i .. 16i+15]
struct block_q8_K {
    float   d;
    int8_t  qs[QK_K];
    int16_t bsums[QK_K / 16];
};
static_assert(sizeof(block_q8_K) == 292, "ggml's block_q8_K is 292 bytes");

// ggml's repacked Q4_K layout for x86-64 (repack.cpp, block_q4_Kx8, interleave 8): the
// super-blocks of 8 consecutive rows. Row j's value v = d[j] * sc * q - dmin[j] * mn (q the
// nibble, sc and mn the 6-bit scale and min of v's sub-block of 32). scales[12k .. 12k+11]
// packs sub-block k's scales and mins of the 8 rows (q4_Kx8_unpack). qs[256 s + 64 p + 8 j + t]
// (s, p < 4; t < 8) is byte 32 s + 8 p + t of row j's Q4_K bytes: low nibble value
// 64 s + 8 p + t (sub-block 2s), high nibble value 64 s + 32 + 8 p + t (sub-block 2s + 1).
struct block_q4_Kx8 {
    ggml_fp16_t d[GROUP];
    ggml_fp16_t dmin[GROUP];
    uint8_t     scales[96];
    uint8_t     qs[QK_K * GROUP / 2];
};
static_assert(sizeof(block_q4_Kx8) == 1152, "ggml's block_q4_Kx8 is 1152 bytes");

// sub-block k's 6-bit scales and mins of the 8 rows from its 12 packed bytes: bytes 0-3 hold
// scales 0-3 and bits 4-5 of scales 4-7 in their top bits, bytes 4-7 the same for the mins,
// bytes 8-11 the low nibbles of scales 4-7 (low) and mins 4-7 (high)
void q4_Kx8_unpack(const uint8_t * pack, uint8_t * sc, uint8_t * mn) {
    for (int j = 0; j < 4; ++j) {
        sc[j] = pack[j] & 63;
        mn[j] = pack[4 + j] & 63;
        sc[j + 4] = (uint8_t) ((pack[8 + j] & 15) | ((pack[j] >> 6) << 4));
        mn[j + 4] = (uint8_t) ((pack[8 + j] >> 4) | ((pack[4 + j] >> 6) << 4));
    }
}

// one activation row for Q4_K: its Q8_K blocks and, per block, the sums of its 8 sub-blocks of
// 32 as 16-bit pairs: pair[4 b + i] = sum(2i) | sum(2i + 1) << 16
struct act_row_k {
    const block_q8_K * q;
    const int32_t *    pair;
};

// Bytes ahead of the block being multiplied that the kernels ask the memory for. Without it a
// core alternates between computing and waiting for its next misses (measured on repacked Q4_0:
// 13-16 GB/s for two cores, the same as ggml's gemv); 1.1-2.3 KiB ahead reach 24-25 GB/s, the
// speed of a bare read of the matrix; 4.6 KiB or more fall back to ~18 (2-vCPU KVM Xeon, huge
// pages).
constexpr int64_t PREFETCH_BYTES = 2304;
constexpr int64_t PREFETCH_BLOCKS = PREFETCH_BYTES / sizeof(block_q4_0x8);

// one activation row quantized: its Q8_0 blocks and 8 times each block's sum of values (the
// kernel sums n * y over the stored nibbles n and subtracts it: sum (n - 8) * y)
struct act_row {
    const block_q8_0 * q;
    const int32_t *    sum8;
};

// the 8 products of one weight group (nb blocks) with each of nr activation rows: out[r][j] for
// row j of the group
using q4_0x8_fn = void (*)(int64_t nb, const block_q4_0x8 * w, const act_row * a, int nr, float * const * out);

void q4_0x8_scalar(int64_t nb, const block_q4_0x8 * w, const act_row * a, int nr, float * const * out) {
    for (int r = 0; r < nr; ++r) {
        float acc[GROUP] = {};
        for (int64_t b = 0; b < nb; ++b) {
            const block_q8_0 & y = a[r].q[b];
            const float dy = ggml_fp16_to_fp32(y.d);
            for (int64_t j = 0; j < GROUP; ++j) {
                int32_t sum = 0;
                for (int64_t t = 0; t < QK / 2; ++t) {
                    const uint8_t byte = w[b].qs[(t / 8) * 64 + j * 8 + t % 8] ^ 0x88;
                    sum += ((byte & 0x0F) - 8) * y.qs[t] + ((byte >> 4) - 8) * y.qs[t + QK / 2];
                }
                // ggml's float steps: the block's integer sum times (row scale * activation scale),
                // added with one rounding
                acc[j] = std::fma((float) sum, ggml_fp16_to_fp32(w[b].d[j]) * dy, acc[j]);
            }
        }
        std::memcpy(out[r], acc, sizeof(acc));
    }
}

#if defined(__x86_64__)
// Activation rows one pass over a weight group takes (the AVX2 kernels are instantiated for
// these counts): every row up to 3, else 4, 8 or 16 at a time. One pass unpacks each block once
// for all its rows; 16 rows of Q4_0 in one pass ran at 138 GMAC/s on two cores, in passes of 4
// (the group re-read from L1) at 116, where ggml's gemm ran at ~65 (the real ffn_up).
int rows_per_pass(int left) {
    static_assert(MUL_MAT_CPU_ROWS_MAX == 16, "the instances cover 1-4, 8 and 16 rows");
    return left >= 16 ? 16 : left >= 8 ? 8 : left >= 4 ? 4 : left;
}

// pass(std::integral_constant<int, n>, done) for each pass of n rows from row `done`, nr in all
template <class Pass> void for_passes(int nr, Pass && pass) {
    for (int done = 0, n = 0; done < nr; done += n) {
        n = rows_per_pass(nr - done);
        switch (n) {
            case 1:  pass(std::integral_constant<int, 1>{}, done); break;
            case 2:  pass(std::integral_constant<int, 2>{}, done); break;
            case 3:  pass(std::integral_constant<int, 3>{}, done); break;
            case 4:  pass(std::integral_constant<int, 4>{}, done); break;
            case 8:  pass(std::integral_constant<int, 8>{}, done); break;
            default: pass(std::integral_constant<int, 16>{}, done); break;
        }
    }
}

// One block: the four 32-byte loads are rows 0-3 and 4-7 of bytes 0-7 (values 0-7 low, 16-23
// high) and of bytes 8-15 (values 8-15, 24-31). Each 8-byte lane is one row, so the activation's
// 8 values of a quarter are broadcast to every lane and maddubs (unsigned nibble times signed
// byte) sums pairs; four quarters add up as 16-bit sums (at most 4 * 2 * 15 * 127), madd and hadd
// finish each row's sum in the lane order r0 r1 r4 r5 | r2 r3 r6 r7, and the row scales are
// loaded in that order. ggml's kernel for the layout sign-extends every nibble through a table
// and shuffles the bytes of four rows into each product: about twice the instructions.
template <int NR>
__attribute__((target("avx2,fma,f16c"))) void q4_0x8_avx2_n(int64_t nb, const block_q4_0x8 * w, const act_row * a,
                                                           float * const * out) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), x88 = _mm256_set1_epi8((char) 0x88), ones = _mm256_set1_epi16(1);
    const __m128i scale_order = _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15);
    __m256 acc[NR];
    for (int r = 0; r < NR; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        // never faults: past the matrix it only fetches what another thread or op reads
        const char * ahead = (const char *) (w + b + PREFETCH_BLOCKS);
        _mm_prefetch(ahead, _MM_HINT_T0);
        _mm_prefetch(ahead + 64, _MM_HINT_T0);
        _mm_prefetch(ahead + 128, _MM_HINT_T0);
        const __m256i * qs = (const __m256i *) w[b].qs;
        const __m256i u0 = _mm256_xor_si256(_mm256_loadu_si256(qs), x88);
        const __m256i u1 = _mm256_xor_si256(_mm256_loadu_si256(qs + 1), x88);
        const __m256i u2 = _mm256_xor_si256(_mm256_loadu_si256(qs + 2), x88);
        const __m256i u3 = _mm256_xor_si256(_mm256_loadu_si256(qs + 3), x88);
        const __m256i lo0 = _mm256_and_si256(u0, m4), hi0 = _mm256_and_si256(_mm256_srli_epi16(u0, 4), m4);
        const __m256i lo1 = _mm256_and_si256(u1, m4), hi1 = _mm256_and_si256(_mm256_srli_epi16(u1, 4), m4);
        const __m256i lo2 = _mm256_and_si256(u2, m4), hi2 = _mm256_and_si256(_mm256_srli_epi16(u2, 4), m4);
        const __m256i lo3 = _mm256_and_si256(u3, m4), hi3 = _mm256_and_si256(_mm256_srli_epi16(u3, 4), m4);
        const __m256 dw = _mm256_cvtph_ps(_mm_shuffle_epi8(_mm_loadu_si128((const __m128i *) w[b].d), scale_order));
        for (int r = 0; r < NR; ++r) {
            const block_q8_0 & y = a[r].q[b];
            int64_t q[4];
            std::memcpy(q, y.qs, sizeof(q));
            const __m256i y0 = _mm256_set1_epi64x(q[0]), y1 = _mm256_set1_epi64x(q[1]);
            const __m256i y2 = _mm256_set1_epi64x(q[2]), y3 = _mm256_set1_epi64x(q[3]);
            const __m256i p03 = _mm256_add_epi16(
                _mm256_add_epi16(_mm256_maddubs_epi16(lo0, y0), _mm256_maddubs_epi16(lo2, y1)),
                _mm256_add_epi16(_mm256_maddubs_epi16(hi0, y2), _mm256_maddubs_epi16(hi2, y3)));
            const __m256i p47 = _mm256_add_epi16(
                _mm256_add_epi16(_mm256_maddubs_epi16(lo1, y0), _mm256_maddubs_epi16(lo3, y1)),
                _mm256_add_epi16(_mm256_maddubs_epi16(hi1, y2), _mm256_maddubs_epi16(hi3, y3)));
            __m256i s = _mm256_hadd_epi32(_mm256_madd_epi16(p03, ones), _mm256_madd_epi16(p47, ones));
            s = _mm256_sub_epi32(s, _mm256_set1_epi32(a[r].sum8[b]));
            const __m256 d = _mm256_mul_ps(dw, _mm256_set1_ps(_cvtsh_ss(y.d)));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), d, acc[r]);
        }
    }
    const __m256i row_order = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);
    for (int r = 0; r < NR; ++r) _mm256_storeu_ps(out[r], _mm256_permutevar8x32_ps(acc[r], row_order));
}

void q4_0x8_avx2(int64_t nb, const block_q4_0x8 * w, const act_row * a, int nr, float * const * out) {
    for_passes(nr, [&](auto n, int done) { q4_0x8_avx2_n<decltype(n)::value>(nb, w, a + done, out + done); });
}

bool cpu_has_avx2() {
    static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                            __builtin_cpu_supports("f16c");
    return has;
}
#endif

// the 8 lane sums of ggml's AVX2 Q6_K dot product (ggml_vec_dot_q6_K_q8_K), which the float
// steps then take in its order: lane k sums values 4k .. 4k+3 of every 32-value chunk, each
// times its sub-block's scale, minus 32 * (bsums[2k] sc[2k] + bsums[2k+1] sc[2k+1]) (the -32 of
// every value, taken out through the activation sums); the float result is
// ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7)) over lanes accumulated block by block as
// a_k = fma(d_w * d_y, lane_k, a_k)
float q6_K_row_scalar(int64_t nb, const block_q6_K * w, const block_q8_K * y) {
    float acc[8] = {};
    for (int64_t i = 0; i < nb; ++i) {
        int32_t lane[8] = {};
        for (int64_t h = 0; h < 2; ++h) {
            for (int64_t m = 0; m < 4; ++m) {
                for (int64_t l = 0; l < 32; ++l) {
                    const uint8_t ql = w[i].ql[64 * h + 32 * (m % 2) + l];
                    const int32_t q = ((m < 2 ? ql & 0x0F : ql >> 4) | (((w[i].qh[32 * h + l] >> (2 * m)) & 3) << 4));
                    lane[(l % 32) / 4] += q * y[i].qs[128 * h + 32 * m + l] * w[i].scales[8 * h + 2 * m + l / 16];
                }
            }
        }
        const float d = y[i].d * ggml_fp16_to_fp32(w[i].d);
        for (int k = 0; k < 8; ++k) {
            lane[k] -= 32 * (y[i].bsums[2 * k] * w[i].scales[2 * k] + y[i].bsums[2 * k + 1] * w[i].scales[2 * k + 1]);
            acc[k] = std::fma(d, (float) lane[k], acc[k]);
        }
    }
    return ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
}

// rows [r0, r1) of w (nb super-blocks each) times nr activation rows: out[r][row]
using q6_K_rows_fn = void (*)(int64_t nb, const block_q6_K * w, int64_t r0, int64_t r1, const block_q8_K * const * y,
                              int nr, float * const * out);

void q6_K_rows_scalar(int64_t nb, const block_q6_K * w, int64_t r0, int64_t r1, const block_q8_K * const * y, int nr,
                      float * const * out) {
    for (int64_t row = r0; row < r1; ++row) {
        for (int r = 0; r < nr; ++r) out[r][row] = q6_K_row_scalar(nb, w + row * nb, y[r]);
    }
}

#if defined(__x86_64__)
// A row's super-blocks are decoded once for all activation rows: per half, the four 32-value
// chunks of 6-bit values (ql nibble | qh bits << 4, unsigned 0..63) and their scales as 16-bit
// pairs (sub-block 2c for bytes 0-15 of chunk c, 2c+1 for bytes 16-31); per activation row,
// maddubs and madd with the scales give the lane sums of the scalar loop above.
template <int NR>
__attribute__((target("avx2,fma,f16c"))) void q6_K_rows_avx2_n(int64_t nb, const block_q6_K * w, int64_t r0, int64_t r1,
                                                               const block_q8_K * const * y, float * const * out) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), m3 = _mm256_set1_epi8(3), m12 = _mm256_set1_epi8(12);
    const __m256i m48 = _mm256_set1_epi8(48), m192 = _mm256_set1_epi8((char) 192);
    for (int64_t row = r0; row < r1; ++row) {
        const block_q6_K * x = w + row * nb;
        __m256 acc[NR];
        for (int r = 0; r < NR; ++r) acc[r] = _mm256_setzero_ps();
        for (int64_t i = 0; i < nb; ++i) {
            // never faults: past the matrix it only fetches what another thread or op reads
            const char * ahead = (const char *) (x + i) + PREFETCH_BYTES;
            _mm_prefetch(ahead, _MM_HINT_T0);
            _mm_prefetch(ahead + 64, _MM_HINT_T0);
            _mm_prefetch(ahead + 128, _MM_HINT_T0);
            _mm_prefetch(ahead + 192, _MM_HINT_T0);
            const __m128i sc8 = _mm_loadu_si128((const __m128i *) x[i].scales);
            __m256i q[8], sc[8];
            for (int h = 0; h < 2; ++h) {
                const __m256i l0 = _mm256_loadu_si256((const __m256i *) (x[i].ql + 64 * h));
                const __m256i l1 = _mm256_loadu_si256((const __m256i *) (x[i].ql + 64 * h + 32));
                const __m256i hb = _mm256_loadu_si256((const __m256i *) (x[i].qh + 32 * h));
                q[4 * h + 0] = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(hb, m3), 4));
                q[4 * h + 1] = _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_slli_epi16(_mm256_and_si256(hb, m12), 2));
                q[4 * h + 2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_and_si256(hb, m48));
                q[4 * h + 3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                                               _mm256_srli_epi16(_mm256_and_si256(hb, m192), 2));
            }
            for (int c = 0; c < 8; ++c) {
                // scales 2c (8 times) then 2c+1 (8 times), widened to 16 bits
                const __m128i pick = _mm_or_si128(_mm_set1_epi8((char) (2 * c)),
                                                  _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1));
                sc[c] = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc8, pick));
            }
            const __m256i sc16 = _mm256_cvtepi8_epi16(sc8);
            for (int r = 0; r < NR; ++r) {
                const block_q8_K & a = y[r][i];
                __m256i sum = _mm256_setzero_si256();
                for (int c = 0; c < 8; c += 2) {
                    const __m256i p0 = _mm256_madd_epi16(sc[c], _mm256_maddubs_epi16(q[c], _mm256_loadu_si256((const __m256i *) (a.qs + 32 * c))));
                    const __m256i p1 = _mm256_madd_epi16(sc[c + 1], _mm256_maddubs_epi16(q[c + 1], _mm256_loadu_si256((const __m256i *) (a.qs + 32 * c + 32))));
                    sum = _mm256_add_epi32(sum, _mm256_add_epi32(p0, p1));
                }
                const __m256i corr = _mm256_slli_epi32(_mm256_madd_epi16(_mm256_loadu_si256((const __m256i *) a.bsums), sc16), 5);
                sum = _mm256_sub_epi32(sum, corr);
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(a.d * _cvtsh_ss(x[i].d)), _mm256_cvtepi32_ps(sum), acc[r]);
            }
        }
        for (int r = 0; r < NR; ++r) {
            __m128 t = _mm_add_ps(_mm256_extractf128_ps(acc[r], 1), _mm256_castps256_ps128(acc[r]));
            t = _mm_add_ps(t, _mm_movehl_ps(t, t));
            t = _mm_add_ss(t, _mm_movehdup_ps(t));
            out[r][row] = _mm_cvtss_f32(t);
        }
    }
}

void q6_K_rows_avx2(int64_t nb, const block_q6_K * w, int64_t r0, int64_t r1, const block_q8_K * const * y, int nr,
                    float * const * out) {
    for_passes(nr, [&](auto n, int done) { q6_K_rows_avx2_n<decltype(n)::value>(nb, w, r0, r1, y + done, out + done); });
}
#endif

// ggml's gemv for the layout, per row j: per super-block the integer sums I = sum over sub-blocks
// k of sc_k * (nibbles . activations) and M = sum over k of mn_k * (activation sum of k), then
// acc = fma(I, d_j * d_y, acc) and accm = fma(M, dmin_j * d_y, accm); the result acc - accm
using q4_Kx8_fn = void (*)(int64_t nb, const block_q4_Kx8 * w, const act_row_k * a, int nr, float * const * out);

void q4_Kx8_scalar(int64_t nb, const block_q4_Kx8 * w, const act_row_k * a, int nr, float * const * out) {
    for (int r = 0; r < nr; ++r) {
        float acc[GROUP] = {}, accm[GROUP] = {};
        for (int64_t b = 0; b < nb; ++b) {
            const block_q8_K & y = a[r].q[b];
            uint8_t sc[8][GROUP], mn[8][GROUP];
            for (int k = 0; k < 8; ++k) q4_Kx8_unpack(w[b].scales + 12 * k, sc[k], mn[k]);
            for (int j = 0; j < GROUP; ++j) {
                int32_t isum = 0, imin = 0;
                for (int s = 0; s < 4; ++s) {
                    for (int p = 0; p < 4; ++p) {
                        for (int t = 0; t < 8; ++t) {
                            const uint8_t byte = w[b].qs[256 * s + 64 * p + 8 * j + t];
                            isum += sc[2 * s][j] * (byte & 15) * y.qs[64 * s + 8 * p + t] +
                                    sc[2 * s + 1][j] * (byte >> 4) * y.qs[64 * s + 32 + 8 * p + t];
                        }
                    }
                }
                for (int k = 0; k < 8; ++k) imin += mn[k][j] * (y.bsums[2 * k] + y.bsums[2 * k + 1]);
                acc[j] = std::fma((float) isum, ggml_fp16_to_fp32(w[b].d[j]) * y.d, acc[j]);
                accm[j] = std::fma((float) imin, ggml_fp16_to_fp32(w[b].dmin[j]) * y.d, accm[j]);
            }
        }
        for (int j = 0; j < GROUP; ++j) out[r][j] = acc[j] - accm[j];
    }
}

#if defined(__x86_64__)
// The Q4_0 kernel's plan for the K layout: per 64-byte piece, rows 0-3 and 4-7 in two loads,
// nibbles unsigned, activations broadcast 8 bytes to a lane; each sub-block's 16-bit sums times
// its rows' scales (two byte shuffles of the unpacked scales per sub-block) by madd. The mins
// term is per row in natural order (madd of (min_k, min_k+1) pairs with the activation's pair
// sums), the main sums in the hadd order r0 r1 r4 r5 | r2 r3 r6 r7.
// dst[k] = lane k of lo (rows 0-3) and of hi (rows 4-7) as one 64-bit word, k < 8: unpacking
// pairs 32-bit words k = 0, 1, 4, 5 (unpacklo) and 2, 3, 6, 7 (unpackhi)
__attribute__((target("avx2"))) inline void store_rows8(uint64_t * dst, __m256i lo, __m256i hi) {
    const __m256i x = _mm256_unpacklo_epi32(lo, hi), y = _mm256_unpackhi_epi32(lo, hi);
    _mm_store_si128((__m128i *) dst, _mm256_castsi256_si128(x));
    _mm_store_si128((__m128i *) (dst + 2), _mm256_castsi256_si128(y));
    _mm_store_si128((__m128i *) (dst + 4), _mm256_extracti128_si256(x, 1));
    _mm_store_si128((__m128i *) (dst + 6), _mm256_extracti128_si256(y, 1));
}

template <int NR>
__attribute__((target("avx2,fma,f16c"))) void q4_Kx8_avx2_n(int64_t nb, const block_q4_Kx8 * w, const act_row_k * a,
                                                           float * const * out) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m128i scale_order = _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15);
    // 16-bit scale of row j in the four 16-bit lanes of row j's 8-byte lane (0x80: a zero byte)
    const __m256i pick03 = _mm256_setr_epi8(0, -128, 0, -128, 0, -128, 0, -128, 1, -128, 1, -128, 1, -128, 1, -128,
                                            2, -128, 2, -128, 2, -128, 2, -128, 3, -128, 3, -128, 3, -128, 3, -128);
    const __m256i pick47 = _mm256_add_epi8(pick03, _mm256_set1_epi16(4));
    __m256 acc[NR], accm[NR];
    for (int r = 0; r < NR; ++r) acc[r] = accm[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        const char * ahead = (const char *) (w + b) + PREFETCH_BYTES;
        _mm_prefetch(ahead, _MM_HINT_T0);
        _mm_prefetch(ahead + 64, _MM_HINT_T0);
        // the 8 packs unpacked at once: pack k's three 32-bit words (scales 0-3, mins 0-3,
        // low nibbles of 4-7) gathered into lane k of A, B, C, then q4_Kx8_unpack's formulas on
        // every byte; sc[k] / mn[k]: sub-block k's 8 rows as one 64-bit word
        alignas(32) uint64_t sc[8], mn[8];
        {
            const __m256i l0 = _mm256_loadu_si256((const __m256i *) w[b].scales);
            const __m256i l1 = _mm256_loadu_si256((const __m256i *) (w[b].scales + 32));
            const __m256i l2 = _mm256_loadu_si256((const __m256i *) (w[b].scales + 64));
            // word 3k + f (f = 0: A, 1: B, 2: C) of the 24: words 0-7 in l0, 8-15 in l1, 16-23 in
            // l2; each source's words permuted into their lanes k, then blended
            const __m256i A = _mm256_blend_epi32(
                _mm256_blend_epi32(_mm256_permutevar8x32_epi32(l0, _mm256_setr_epi32(0, 3, 6, 0, 0, 0, 0, 0)),
                                   _mm256_permutevar8x32_epi32(l1, _mm256_setr_epi32(0, 0, 0, 1, 4, 7, 0, 0)), 0x38),
                _mm256_permutevar8x32_epi32(l2, _mm256_setr_epi32(0, 0, 0, 0, 0, 0, 2, 5)), 0xC0);
            const __m256i B = _mm256_blend_epi32(
                _mm256_blend_epi32(_mm256_permutevar8x32_epi32(l0, _mm256_setr_epi32(1, 4, 7, 0, 0, 0, 0, 0)),
                                   _mm256_permutevar8x32_epi32(l1, _mm256_setr_epi32(0, 0, 0, 2, 5, 0, 0, 0)), 0x18),
                _mm256_permutevar8x32_epi32(l2, _mm256_setr_epi32(0, 0, 0, 0, 0, 0, 3, 6)), 0xE0);
            const __m256i C = _mm256_blend_epi32(
                _mm256_blend_epi32(_mm256_permutevar8x32_epi32(l0, _mm256_setr_epi32(2, 5, 0, 0, 0, 0, 0, 0)),
                                   _mm256_permutevar8x32_epi32(l1, _mm256_setr_epi32(0, 0, 0, 3, 6, 0, 0, 0)), 0x1C),
                _mm256_permutevar8x32_epi32(l2, _mm256_setr_epi32(0, 0, 0, 0, 0, 1, 4, 7)), 0xE0);
            const __m256i m63 = _mm256_set1_epi8(63), m15 = _mm256_set1_epi8(15), top2 = _mm256_set1_epi8((char) 0xC0);
            const __m256i sc_lo = _mm256_and_si256(A, m63), mn_lo = _mm256_and_si256(B, m63);
            const __m256i sc_hi = _mm256_or_si256(_mm256_and_si256(C, m15), _mm256_srli_epi32(_mm256_and_si256(A, top2), 2));
            const __m256i mn_hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(C, 4), m15),
                                                  _mm256_srli_epi32(_mm256_and_si256(B, top2), 2));
            store_rows8(sc, sc_lo, sc_hi);
            store_rows8(mn, mn_lo, mn_hi);
        }
        // (min_k, min_k+1) of each row as 16-bit pairs, natural row order
        __m256i mpair[4];
        for (int i = 0; i < 4; ++i) {
            const __m128i lo = _mm_loadl_epi64((const __m128i *) &mn[2 * i]), hi = _mm_loadl_epi64((const __m128i *) &mn[2 * i + 1]);
            mpair[i] = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(lo, hi));
        }
        __m256i i03[NR], i47[NR];
        for (int r = 0; r < NR; ++r) i03[r] = i47[r] = _mm256_setzero_si256();
        for (int s = 0; s < 4; ++s) {
            const __m256i vlo = _mm256_set1_epi64x((int64_t) sc[2 * s]), vhi = _mm256_set1_epi64x((int64_t) sc[2 * s + 1]);
            const __m256i s0_03 = _mm256_shuffle_epi8(vlo, pick03), s0_47 = _mm256_shuffle_epi8(vlo, pick47);
            const __m256i s1_03 = _mm256_shuffle_epi8(vhi, pick03), s1_47 = _mm256_shuffle_epi8(vhi, pick47);
            __m256i p0_03[NR], p0_47[NR], p1_03[NR], p1_47[NR];
            for (int r = 0; r < NR; ++r) p0_03[r] = p0_47[r] = p1_03[r] = p1_47[r] = _mm256_setzero_si256();
            for (int p = 0; p < 4; ++p) {
                const uint8_t * piece = w[b].qs + 256 * s + 64 * p;
                _mm_prefetch((const char *) piece + PREFETCH_BYTES, _MM_HINT_T0);
                const __m256i u0 = _mm256_loadu_si256((const __m256i *) piece);
                const __m256i u1 = _mm256_loadu_si256((const __m256i *) (piece + 32));
                const __m256i lo0 = _mm256_and_si256(u0, m4), hi0 = _mm256_and_si256(_mm256_srli_epi16(u0, 4), m4);
                const __m256i lo1 = _mm256_and_si256(u1, m4), hi1 = _mm256_and_si256(_mm256_srli_epi16(u1, 4), m4);
                for (int r = 0; r < NR; ++r) {
                    const int8_t * q = a[r].q[b].qs + 64 * s + 8 * p;
                    int64_t ylo, yhi;
                    std::memcpy(&ylo, q, 8);
                    std::memcpy(&yhi, q + 32, 8);
                    const __m256i yl = _mm256_set1_epi64x(ylo), yh = _mm256_set1_epi64x(yhi);
                    p0_03[r] = _mm256_add_epi16(p0_03[r], _mm256_maddubs_epi16(lo0, yl));
                    p0_47[r] = _mm256_add_epi16(p0_47[r], _mm256_maddubs_epi16(lo1, yl));
                    p1_03[r] = _mm256_add_epi16(p1_03[r], _mm256_maddubs_epi16(hi0, yh));
                    p1_47[r] = _mm256_add_epi16(p1_47[r], _mm256_maddubs_epi16(hi1, yh));
                }
            }
            for (int r = 0; r < NR; ++r) {
                i03[r] = _mm256_add_epi32(i03[r], _mm256_add_epi32(_mm256_madd_epi16(p0_03[r], s0_03), _mm256_madd_epi16(p1_03[r], s1_03)));
                i47[r] = _mm256_add_epi32(i47[r], _mm256_add_epi32(_mm256_madd_epi16(p0_47[r], s0_47), _mm256_madd_epi16(p1_47[r], s1_47)));
            }
        }
        const __m256 dw = _mm256_cvtph_ps(_mm_shuffle_epi8(_mm_loadu_si128((const __m128i *) w[b].d), scale_order));
        const __m256 dmw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) w[b].dmin));
        for (int r = 0; r < NR; ++r) {
            const block_q8_K & y = a[r].q[b];
            const int32_t * pr = a[r].pair + 4 * b;
            __m256i m = _mm256_setzero_si256();
            for (int i = 0; i < 4; ++i) m = _mm256_add_epi32(m, _mm256_madd_epi16(mpair[i], _mm256_set1_epi32(pr[i])));
            const __m256 dy = _mm256_set1_ps(y.d);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_hadd_epi32(i03[r], i47[r])), _mm256_mul_ps(dw, dy), acc[r]);
            accm[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(m), _mm256_mul_ps(dmw, dy), accm[r]);
        }
    }
    const __m256i row_order = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);
    for (int r = 0; r < NR; ++r) _mm256_storeu_ps(out[r], _mm256_sub_ps(_mm256_permutevar8x32_ps(acc[r], row_order), accm[r]));
}

void q4_Kx8_avx2(int64_t nb, const block_q4_Kx8 * w, const act_row_k * a, int nr, float * const * out) {
    for_passes(nr, [&](auto n, int done) { q4_Kx8_avx2_n<decltype(n)::value>(nb, w, a + done, out + done); });
}
#endif

struct kernel {
    q4_0x8_fn     q4_0x8;
    q4_Kx8_fn    q4_Kx8;
    q6_K_rows_fn q6_K;
    const char * name;
};

const kernel K_SCALAR = { q4_0x8_scalar, q4_Kx8_scalar, q6_K_rows_scalar, "scalar" };
#if defined(__x86_64__)
const kernel K_AVX2 = { q4_0x8_avx2, q4_Kx8_avx2, q6_K_rows_avx2, "avx2" };
#endif

const kernel & pick_kernel() {
    const char * env = std::getenv("SAMBAY_MM_SIMD");
    if (env && std::strcmp(env, "0") == 0) return K_SCALAR;
#if defined(__x86_64__)
    if (cpu_has_avx2()) return K_AVX2;
#endif
    return K_SCALAR;
}

// activation row r of x (rows run over ne1, then ne2, then ne3)
const float * x_row(const ggml_tensor * x, int64_t r) {
    const int64_t i1 = r % x->ne[1], i2 = (r / x->ne[1]) % x->ne[2], i3 = r / (x->ne[1] * x->ne[2]);
    return (const float *) ((const char *) x->data + i1 * x->nb[1] + i2 * x->nb[2] + i3 * x->nb[3]);
}

// thread ith's equal run of the n_groups 8-row groups: fn(g, the outputs of group g's rows)
template <class Fn>
void for_thread_groups(int64_t n_groups, int ith, int nth, int rows, float * const * out, Fn && fn) {
    float * group_out[MUL_MAT_CPU_ROWS_MAX];
    for (int64_t g = n_groups * ith / nth; g < n_groups * (ith + 1) / nth; ++g) {
        for (int r = 0; r < rows; ++r) group_out[r] = out[r] + g * GROUP;
        fn(g, group_out);
    }
}

// Every thread quantizes the activations for itself (a few microseconds: there is no barrier
// inside a custom op), with ggml's own routine for the type its product reads (Q8_0 for Q4_0,
// Q8_K for Q6_K), so the values are the ones ggml's kernels would read. Threads then take equal
// runs of 8-row groups (Q4_0) or rows (Q6_K): one sequential stream each. The kernel set is
// picked when the graph is built (the userdata carries the weight), one instance per set.
template <const kernel * KERN>
void mm_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const ggml_tensor * w = (const ggml_tensor *) userdata;
    const ggml_tensor * x = dst->src[0];
    const int64_t K = w->ne[0], N = w->ne[1];
    const int     rows = (int) (x->ne[1] * x->ne[2] * x->ne[3]);
    const kernel & kern = *KERN;
    float * out[MUL_MAT_CPU_ROWS_MAX];
    for (int r = 0; r < rows; ++r) out[r] = (float *) dst->data + r * N;

    if (w->type == GGML_TYPE_Q4_K) {
        const int64_t nb = K / QK_K, n_groups = N / GROUP;
        thread_local std::vector<block_q8_K> aq;
        thread_local std::vector<int32_t>    pairs;
        if ((int64_t) aq.size() < rows * nb) aq.resize(rows * nb);
        if ((int64_t) pairs.size() < rows * nb * 4) pairs.resize(rows * nb * 4);
        const ggml_from_float_t quantize = ggml_get_type_traits_cpu(GGML_TYPE_Q8_K)->from_float;
        act_row_k act[MUL_MAT_CPU_ROWS_MAX];
        for (int r = 0; r < rows; ++r) {
            block_q8_K * q = aq.data() + r * nb;
            int32_t *    pr = pairs.data() + r * nb * 4;
            quantize(x_row(x, r), q, K);
            for (int64_t b = 0; b < nb; ++b) {
                for (int i = 0; i < 4; ++i) {
                    const int16_t * bs = q[b].bsums + 4 * i;  // sub-block 2i: bsums 4i, 4i+1; 2i+1: 4i+2, 4i+3
                    const uint32_t lo = (uint16_t) (int16_t) (bs[0] + bs[1]), hi = (uint16_t) (int16_t) (bs[2] + bs[3]);
                    pr[4 * b + i] = (int32_t) (lo | hi << 16);
                }
            }
            act[r] = { q, pr };
        }
        const block_q4_Kx8 * blocks = (const block_q4_Kx8 *) w->data;
        for_thread_groups(n_groups, ith, nth, rows, out, [&](int64_t g, float * const * group_out) {
            kern.q4_Kx8(nb, blocks + g * nb, act, rows, group_out);
        });
        return;
    }
    if (w->type == GGML_TYPE_Q6_K) {
        const int64_t nb = K / QK_K;
        thread_local std::vector<block_q8_K> aq;
        if ((int64_t) aq.size() < rows * nb) aq.resize(rows * nb);
        const ggml_from_float_t quantize = ggml_get_type_traits_cpu(GGML_TYPE_Q8_K)->from_float;
        const block_q8_K * act[MUL_MAT_CPU_ROWS_MAX];
        for (int r = 0; r < rows; ++r) {
            quantize(x_row(x, r), aq.data() + r * nb, K);
            act[r] = aq.data() + r * nb;
        }
        kern.q6_K(nb, (const block_q6_K *) w->data, N * ith / nth, N * (ith + 1) / nth, act, rows, out);
        return;
    }

    const int64_t nb = K / QK, n_groups = N / GROUP;
    thread_local std::vector<block_q8_0> aq;
    thread_local std::vector<int32_t>    sums;
    if ((int64_t) aq.size() < rows * nb) aq.resize(rows * nb);
    if ((int64_t) sums.size() < rows * nb) sums.resize(rows * nb);
    const ggml_from_float_t quantize = ggml_get_type_traits_cpu(GGML_TYPE_Q8_0)->from_float;
    act_row act[MUL_MAT_CPU_ROWS_MAX];
    for (int r = 0; r < rows; ++r) {
        block_q8_0 * q = aq.data() + r * nb;
        int32_t *    s = sums.data() + r * nb;
        quantize(x_row(x, r), q, K);
        for (int64_t b = 0; b < nb; ++b) {
            int32_t t = 0;
            for (int64_t i = 0; i < QK; ++i) t += q[b].qs[i];
            s[b] = 8 * t;
        }
        act[r] = { q, s };
    }
    const block_q4_0x8 * blocks = (const block_q4_0x8 *) w->data;
    for_thread_groups(n_groups, ith, nth, rows, out, [&](int64_t g, float * const * group_out) {
        kern.q4_0x8(nb, blocks + g * nb, act, rows, group_out);
    });
}

#if defined(__x86_64__)
bool is_repacked(const ggml_tensor * w) {
    return w->buffer && std::strcmp(ggml_backend_buft_name(ggml_backend_buffer_get_type(w->buffer)), "CPU_REPACK") == 0;
}
#endif

} // namespace

bool mul_mat_cpu_reads_as_stored(const ggml_tensor * w) {
#if defined(__x86_64__)
    return w->type == GGML_TYPE_Q6_K && ggml_n_dims(w) == 2 && w->ne[0] % QK_K == 0 && ggml_cpu_has_avx2() &&
           cpu_has_avx2();
#else
    (void) w;
    return false;
#endif
}

bool mul_mat_cpu_takes(const ggml_tensor * w, const ggml_tensor * x) {
#if defined(__x86_64__)
    // ggml-cpu picks the 8-row Q4_0 layout when it was built with AVX2 and the rows come in 8s
    // (repack.cpp, ggml_repack_get_optimal_repack_type); the kernel's own AVX2 test covers a
    // CPU that ggml would reject anyway
    const bool q4_0x8 = w->type == GGML_TYPE_Q4_0 && w->ne[1] % GROUP == 0 && w->ne[0] % QK == 0 && is_repacked(w);
    const bool q4_Kx8 = w->type == GGML_TYPE_Q4_K && w->ne[1] % GROUP == 0 && w->ne[0] % QK_K == 0 && is_repacked(w);
    // Q6_K where it lies (ggml repacks it only on Arm with i8mm); ggml's AVX2 dot product is the
    // one the result equals
    const bool q6_K = mul_mat_cpu_reads_as_stored(w) && !is_repacked(w) && w->buffer &&
                      ggml_backend_buffer_is_host(w->buffer);
    return (q4_0x8 || q4_Kx8 || q6_K) && ggml_n_dims(w) == 2 && ggml_cpu_has_avx2() && cpu_has_avx2() &&
           x->type == GGML_TYPE_F32 && x->ne[0] == w->ne[0] && x->nb[0] == sizeof(float) &&
           x->ne[1] * x->ne[2] * x->ne[3] <= MUL_MAT_CPU_ROWS_MAX;
#else
    (void) w;
    (void) x;
    return false;
#endif
}

ggml_tensor * mul_mat_cpu(ggml_context * ctx, ggml_tensor * w, ggml_tensor * x) {
    GGML_ASSERT(mul_mat_cpu_takes(w, x));
    ggml_tensor * args[1] = { x };
    ggml_custom_op_t op = mm_op<&K_SCALAR>;
#if defined(__x86_64__)
    if (&pick_kernel() == &K_AVX2) op = mm_op<&K_AVX2>;
#endif
    ggml_tensor * out = ggml_custom_4d(ctx, GGML_TYPE_F32, w->ne[1], x->ne[1], x->ne[2], x->ne[3], args, 1, op,
                                       GGML_N_TASKS_MAX, w);
    const char * name = w->name;
    if (std::strncmp(name, "blk.", 4) == 0 && std::strchr(name + 4, '.')) name = std::strchr(name + 4, '.') + 1;
    return ggml_format_name(out, "mm_cpu %s", name);
}

const char * mul_mat_cpu_kernel_name() {
    return pick_kernel().name;
}

} // namespace sambay
