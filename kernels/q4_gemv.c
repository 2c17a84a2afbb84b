/* Batch-1..8 GEMV over int4pack (AVX2) tiles: y[m, n] = sum_k x[m, k] * w[n, k].
 *
 * Weights are the prepared CPU form of offload.kernels.cpu (FORMAT.md): blocks of 32 rows, for every
 * column k 16 bytes, byte j = row j (low nibble) | row 16 + j (high nibble); per group of `group`
 * columns a bf16 pair (scale s, offset z) per row, [K / group, n_pad, 2], with w = (nibble - 8) * s + z.
 *
 * Why by hand: torch's _weight_int4pack_mm_for_cpu reaches ~20% of the streaming-read roofline at M = 1
 * on AVX2. Here each 32-row block walks its columns once: a column's 16 bytes become 32 floats (zero-extend,
 * mask or shift, convert) and meet x[k] in four FMAs; the group's scale and offset are applied once per
 * group: sum_k w x = s * (sum_k nibble x - 8 X_g) + z X_g, X_g the group's sum of x. Rows are split across
 * OpenMP threads (torch's own libgomp, so the pools are shared), one block per thread at a time, so the
 * result does not depend on the thread count.
 */
#include <immintrin.h>
#include <stdint.h>

#define MT_MAX 2 /* x rows per pass: 4 accumulators each + 4 decoded weight vectors fit 16 ymm registers */

/* One column k of a 32-row block: its 16 bytes become 32 floats that meet x[m, k] in four FMAs per m. */
static inline __attribute__((always_inline)) void column(const float *x, int mt, int K, int k, const uint8_t *blk,
                                                         __m256 acc[MT_MAX][4]) {
    const __m256i low = _mm256_set1_epi32(0x0F);
    const uint8_t *p = blk + (long)k * 16;
    __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));       /* bytes 0-7 */
    __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8))); /* bytes 8-15 */
    __m256 w0 = _mm256_cvtepi32_ps(_mm256_and_si256(b0, low));                    /* rows 0-7 */
    __m256 w1 = _mm256_cvtepi32_ps(_mm256_and_si256(b1, low));                    /* rows 8-15 */
    __m256 w2 = _mm256_cvtepi32_ps(_mm256_srli_epi32(b0, 4));                     /* rows 16-23 */
    __m256 w3 = _mm256_cvtepi32_ps(_mm256_srli_epi32(b1, 4));                     /* rows 24-31 */
    for (int m = 0; m < mt; m++) {
        __m256 xv = _mm256_broadcast_ss(x + (long)m * K + k);
        acc[m][0] = _mm256_fmadd_ps(w0, xv, acc[m][0]);
        acc[m][1] = _mm256_fmadd_ps(w1, xv, acc[m][1]);
        acc[m][2] = _mm256_fmadd_ps(w2, xv, acc[m][2]);
        acc[m][3] = _mm256_fmadd_ps(w3, xv, acc[m][3]);
    }
}

static inline __attribute__((always_inline)) void block_pass(const float *x, int mt, int K, const uint8_t *blk, const uint32_t *sz_blk,
                              long sz_group_stride, int group, const float *xsum, int n_groups, float *out[MT_MAX]) {
    const __m256i high_half = _mm256_set1_epi32((int)0xFFFF0000u);
    __m256 acc_out[MT_MAX][4];
    for (int m = 0; m < mt; m++)
        for (int r = 0; r < 4; r++) acc_out[m][r] = _mm256_setzero_ps();

    for (int g = 0; g < n_groups; g++) {
        /* At M = 1 the even and odd columns feed separate accumulators: one chain of dependent FMAs per
         * register would leave the loop waiting on FMA latency rather than on loads. */
        const int sets = mt == 1 ? 2 : 1;
        __m256 acc[2][MT_MAX][4];
        for (int t = 0; t < sets; t++)
            for (int m = 0; m < mt; m++)
                for (int r = 0; r < 4; r++) acc[t][m][r] = _mm256_setzero_ps();
        const int k0 = g * group;
        for (int k = k0; k < k0 + group; k += 2) { /* group sizes are even */
            column(x, mt, K, k, blk, acc[0]);
            column(x, mt, K, k + 1, blk, acc[sets - 1]);
        }
        if (sets == 2)
            for (int r = 0; r < 4; r++) acc[0][0][r] = _mm256_add_ps(acc[0][0][r], acc[1][0][r]);
        const uint32_t *sz = sz_blk + (long)g * sz_group_stride;
        for (int r = 0; r < 4; r++) {
            /* little endian: a (s, z) bf16 pair is one uint32 with s in the low half */
            __m256i pair = _mm256_loadu_si256((const __m256i *)(sz + r * 8));
            __m256 s = _mm256_castsi256_ps(_mm256_slli_epi32(pair, 16));
            __m256 z = _mm256_castsi256_ps(_mm256_and_si256(pair, high_half));
            for (int m = 0; m < mt; m++) {
                __m256 xs = _mm256_set1_ps(xsum[m * n_groups + g]);
                __m256 centred = _mm256_fnmadd_ps(_mm256_set1_ps(8.0f), xs, acc[0][m][r]); /* acc - 8 X_g */
                acc_out[m][r] = _mm256_fmadd_ps(s, centred, acc_out[m][r]);
                acc_out[m][r] = _mm256_fmadd_ps(z, xs, acc_out[m][r]);
            }
        }
    }
    for (int m = 0; m < mt; m++)
        for (int r = 0; r < 4; r++) _mm256_storeu_ps(out[m] + r * 8, acc_out[m][r]);
}

/* x: float [M, K]; packed: uint8 [n_pad / 32, K, 16]; sz: bf16 pairs [K / group, n_pad]; y: float [M, n_pad];
 * xsum: float scratch [M, K / group]. */
void q4_gemv(const float *x, int M, int K, const uint8_t *packed, const uint32_t *sz, int n_pad, int group,
             float *xsum, float *y) {
    const int n_groups = K / group, n_blocks = n_pad / 32;
    for (int m = 0; m < M; m++)
        for (int g = 0; g < n_groups; g++) {
            float s = 0.0f;
            for (int k = g * group; k < (g + 1) * group; k++) s += x[(long)m * K + k];
            xsum[m * n_groups + g] = s;
        }
#pragma omp parallel for schedule(static) if ((long)n_blocks * K >= 65536)
    for (int b = 0; b < n_blocks; b++) {
        for (int m0 = 0; m0 < M; m0 += MT_MAX) {
            const int mt = M - m0 < MT_MAX ? M - m0 : MT_MAX;
            float *out[MT_MAX];
            for (int m = 0; m < mt; m++) out[m] = y + (long)(m0 + m) * n_pad + (long)b * 32;
            const float *xm = x + (long)m0 * K, *xs = xsum + m0 * n_groups;
            const uint8_t *blk = packed + (long)b * K * 16;
            if (mt == 2) /* constant mt: the compiler unrolls the m loops and keeps every accumulator in a register */
                block_pass(xm, 2, K, blk, sz + (long)b * 32, n_pad, group, xs, n_groups, out);
            else
                block_pass(xm, 1, K, blk, sz + (long)b * 32, n_pad, group, xs, n_groups, out);
        }
    }
}
