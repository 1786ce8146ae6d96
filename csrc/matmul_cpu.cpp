#include "matmul_cpu.h"

#include "ggml-backend.h"
#include "ggml-cpu.h"

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
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

// Blocks ahead of the one being multiplied that the kernel asks the memory for. Without it a
// core alternates between computing and waiting for its next misses (measured: 13-16 GB/s for
// two cores, the same as ggml's gemv); 8-16 blocks (1.1-2.3 KiB) ahead reach 24-25 GB/s, the
// speed of a bare read of the matrix; 32 or more fall back to ~18 (2-vCPU KVM Xeon, huge pages).
constexpr int64_t PREFETCH_BLOCKS = 16;

// one activation row quantized: its Q8_0 blocks and 8 times each block's sum of values (the
// kernel sums n * y over the stored nibbles n and subtracts it: sum (n - 8) * y)
struct act_row {
    const block_q8_0 * q;
    const int32_t *    sum8;
};

// the 8 products of one weight group (nb blocks) with each of nr activation rows: out[r][j] for
// row j of the group
using group_fn = void (*)(int64_t nb, const block_q4_0x8 * w, const act_row * a, int nr, float * const * out);

void group_scalar(int64_t nb, const block_q4_0x8 * w, const act_row * a, int nr, float * const * out) {
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
// One block: the four 32-byte loads are rows 0-3 and 4-7 of bytes 0-7 (values 0-7 low, 16-23
// high) and of bytes 8-15 (values 8-15, 24-31). Each 8-byte lane is one row, so the activation's
// 8 values of a quarter are broadcast to every lane and maddubs (unsigned nibble times signed
// byte) sums pairs; four quarters add up as 16-bit sums (at most 4 * 2 * 15 * 127), madd and hadd
// finish each row's sum in the lane order r0 r1 r4 r5 | r2 r3 r6 r7, and the row scales are
// loaded in that order. ggml's kernel for the layout sign-extends every nibble through a table
// and shuffles the bytes of four rows into each product: about twice the instructions.
template <int NR>
__attribute__((target("avx2,fma,f16c"))) void group_avx2_n(int64_t nb, const block_q4_0x8 * w, const act_row * a,
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

void group_avx2(int64_t nb, const block_q4_0x8 * w, const act_row * a, int nr, float * const * out) {
    static_assert(MUL_MAT_CPU_ROWS_MAX == 3, "one instance per row count");
    switch (nr) {
        case 1:  group_avx2_n<1>(nb, w, a, out); break;
        case 2:  group_avx2_n<2>(nb, w, a, out); break;
        default: group_avx2_n<3>(nb, w, a, out); break;
    }
}

bool cpu_has_avx2() {
    static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                            __builtin_cpu_supports("f16c");
    return has;
}
#endif

struct kernel {
    group_fn    fn;
    const char * name;
};

const kernel K_SCALAR = { group_scalar, "scalar" };
#if defined(__x86_64__)
const kernel K_AVX2 = { group_avx2, "avx2" };
#endif

const kernel & pick_kernel() {
    const char * env = std::getenv("SAMBAY_MM_SIMD");
    if (env && std::strcmp(env, "0") == 0) return K_SCALAR;
#if defined(__x86_64__)
    if (cpu_has_avx2()) return K_AVX2;
#endif
    return K_SCALAR;
}

void mm_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const ggml_tensor * w = (const ggml_tensor *) userdata;
    const ggml_tensor * x = dst->src[0];
    const int64_t K = w->ne[0], N = w->ne[1], nb = K / QK, n_groups = N / GROUP;
    const int64_t rows = x->ne[1] * x->ne[2] * x->ne[3];

    // every thread quantizes the activations for itself (a few microseconds: no barrier in a
    // custom op), with ggml's own routine so the values are the ones its gemv would read
    thread_local std::vector<block_q8_0> aq;
    thread_local std::vector<int32_t>    sums;
    if ((int64_t) aq.size() < rows * nb) aq.resize(rows * nb);
    if ((int64_t) sums.size() < rows * nb) sums.resize(rows * nb);
    const ggml_from_float_t quantize = ggml_get_type_traits_cpu(GGML_TYPE_Q8_0)->from_float;
    act_row act[MUL_MAT_CPU_ROWS_MAX];
    float * out[MUL_MAT_CPU_ROWS_MAX];
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t i1 = r % x->ne[1], i2 = (r / x->ne[1]) % x->ne[2], i3 = r / (x->ne[1] * x->ne[2]);
        const float * xr = (const float *) ((const char *) x->data + i1 * x->nb[1] + i2 * x->nb[2] + i3 * x->nb[3]);
        block_q8_0 * q = aq.data() + r * nb;
        int32_t *    s = sums.data() + r * nb;
        quantize(xr, q, K);
        for (int64_t b = 0; b < nb; ++b) {
            int32_t t = 0;
            for (int64_t i = 0; i < QK; ++i) t += q[b].qs[i];
            s[b] = 8 * t;
        }
        act[r] = { q, s };
    }

    const group_fn fn = pick_kernel().fn;
    const block_q4_0x8 * blocks = (const block_q4_0x8 *) w->data;
    const int64_t g0 = n_groups * ith / nth, g1 = n_groups * (ith + 1) / nth;
    for (int64_t g = g0; g < g1; ++g) {
        for (int64_t r = 0; r < rows; ++r) out[r] = (float *) dst->data + r * N + g * GROUP;
        fn(nb, blocks + g * nb, act, (int) rows, out);
    }
}

bool is_repacked(const ggml_tensor * w) {
    return w->buffer && std::strcmp(ggml_backend_buft_name(ggml_backend_buffer_get_type(w->buffer)), "CPU_REPACK") == 0;
}

} // namespace

bool mul_mat_cpu_takes(const ggml_tensor * w, const ggml_tensor * x) {
#if defined(__x86_64__)
    // ggml-cpu picks the 8-row Q4_0 layout when it was built with AVX2 and the rows come in 8s
    // (repack.cpp, ggml_repack_get_optimal_repack_type); the kernel's own AVX2 test covers a
    // CPU that ggml would reject anyway
    return w->type == GGML_TYPE_Q4_0 && ggml_n_dims(w) == 2 && w->ne[1] % GROUP == 0 && w->ne[0] % QK == 0 &&
           is_repacked(w) && ggml_cpu_has_avx2() && cpu_has_avx2() && x->type == GGML_TYPE_F32 &&
           x->ne[0] == w->ne[0] && x->nb[0] == sizeof(float) &&
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
    ggml_tensor * out = ggml_custom_4d(ctx, GGML_TYPE_F32, w->ne[1], x->ne[1], x->ne[2], x->ne[3], args, 1, mm_op,
                                       GGML_N_TASKS_MAX, w);
    const char * name = w->name;
    if (std::strncmp(name, "blk.", 4) == 0 && std::strchr(name + 4, '.')) name = std::strchr(name + 4, '.') + 1;
    return ggml_format_name(out, "mm_cpu %s", name);
}

const char * mul_mat_cpu_kernel_name() {
    return pick_kernel().name;
}

} // namespace sambay
