/* Batch-1..8 GEMV over 4-bit (int4pack, AVX2), 2-bit and FP4 (MXFP4) tiles: y[m, n] = sum_k x[m, k] * w[n, k].
 *
 * Weights are the prepared CPU forms of offload.kernels.cpu (FORMAT.md), in tiles of 64 rows:
 *   4-bit: two 32-row blocks; for every column k 16 bytes, byte j = row j (bits 0-3) | row 16 + j (bits 4-7).
 *   2-bit: for every column k 16 bytes, byte j = rows j, 32 + j, 16 + j, 48 + j at bits 0, 2, 4, 6.
 *   FP4:   the 4-bit layout holding e2m1 codes (MXFP4); a 16-entry table turns them into 2 * value, exact int8.
 * Per group of `group` columns a bf16 pair (scale s, offset z) per row, [K / group, n_pad, 2], with
 * w = (code - centre) * s + z (centre 8 for 4-bit nibbles, 2 for 2-bit codes; FP4: w = table[code] * s).
 *
 * Why by hand: torch's _weight_int4pack_mm_for_cpu reaches ~20% of the streaming-read roofline at M = 1
 * on AVX2, and has no 2-bit form. Each pass walks its columns once: a column's 16 bytes become 8-row float
 * vectors by one mask and one convert each, with no shift: a code masked in place is code * 2^shift, and
 * that power of two is divided out once per group. The vectors meet x[k] in one FMA each; scale and offset
 * are applied once per group: sum_k w x = s * (sum_k code x - centre X_g) + z X_g, X_g the group's sum of x.
 * Tiles are split across OpenMP threads (torch's own libgomp, so the pools are shared), one tile per
 * thread at a time, so the result does not depend on the thread count.
 */
#include <immintrin.h>
#include <stdint.h>

#define MT_MAX 2 /* x rows per pass */
#define NV_MAX 8 /* 8-row weight vectors per column and pass */

/* One column k of a pass: its 16 bytes (b0 = bytes 0-7, b1 = bytes 8-15, one row per byte) become nv
 * vectors of 8 floats, vector v = b[v % 2] & masks[v / 2], i.e. a code times the power of two its mask
 * starts at; they meet x[m, k] in nv FMAs per m. */
static inline __attribute__((always_inline)) void column(const float *x, int mt, int K, int k, const uint8_t *blk,
                                                         const int *masks, int nv, __m256 acc[MT_MAX][NV_MAX]) {
    const uint8_t *p = blk + (long)k * 16;
    const __m256i b[2] = {_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)),
                          _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8)))};
    __m256 w[NV_MAX];
    for (int v = 0; v < nv; v++) w[v] = _mm256_cvtepi32_ps(_mm256_and_si256(b[v % 2], _mm256_set1_epi32(masks[v / 2])));
    for (int m = 0; m < mt; m++) {
        __m256 xv = _mm256_broadcast_ss(x + (long)m * K + k);
        for (int v = 0; v < nv; v++) acc[m][v] = _mm256_fmadd_ps(w[v], xv, acc[m][v]);
    }
}

/* The same for FP4 (4 vectors): the e2m1 codes of rows 0-15 (low nibbles) and 16-31 (high nibbles) become
 * 2 * value through a 16-entry byte table, exact as int8. */
static inline __attribute__((always_inline)) void column_fp4(const float *x, int mt, int K, int k, const uint8_t *blk,
                                                             __m256 acc[MT_MAX][NV_MAX]) {
    const __m128i table = _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
    const __m128i nibble = _mm_set1_epi8(0x0F), raw = _mm_loadu_si128((const __m128i *)(blk + (long)k * 16));
    const __m128i low = _mm_shuffle_epi8(table, _mm_and_si128(raw, nibble));
    const __m128i high = _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16(raw, 4), nibble));
    const __m256 w[4] = {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(low)),
                         _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(low, 8))),
                         _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(high)),
                         _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(high, 8)))};
    for (int m = 0; m < mt; m++) {
        __m256 xv = _mm256_broadcast_ss(x + (long)m * K + k);
        for (int v = 0; v < 4; v++) acc[m][v] = _mm256_fmadd_ps(w[v], xv, acc[m][v]);
    }
}

/* 8 * nv rows (vector v holds rows 8v..8v+7) for mt rows of x, all K columns. `mt` and `nv` are constants
 * at every call site, so the compiler unrolls the loops over them and keeps the accumulators in registers:
 * 8 of them, with even and odd columns in separate sets when mt * nv = 4, so that the loop waits on loads,
 * not on FMA latency. */
static inline __attribute__((always_inline)) void rows_pass(const float *x, int mt, int K, const uint8_t *blk,
                                                            const int *masks, int nv, float centre,
                                                            const uint32_t *sz_rows, long sz_group_stride, int group,
                                                            const float *xsum, int n_groups, float *out[MT_MAX]) {
    const __m256i high_half = _mm256_set1_epi32((int)0xFFFF0000u);
    const int sets = 8 / (mt * nv) >= 2 ? 2 : 1;
    const __m256 centre_v = _mm256_set1_ps(centre);
    /* Group results add up in `out` itself (L1), not in registers: the column loop needs all 16. */
    for (int m = 0; m < mt; m++)
        for (int v = 0; v < nv; v++) _mm256_storeu_ps(out[m] + v * 8, _mm256_setzero_ps());

    for (int g = 0; g < n_groups; g++) {
        __m256 acc[2][MT_MAX][NV_MAX];
        for (int t = 0; t < sets; t++)
            for (int m = 0; m < mt; m++)
                for (int v = 0; v < nv; v++) acc[t][m][v] = _mm256_setzero_ps();
        const int k0 = g * group;
        for (int k = k0; k < k0 + group; k += 2) { /* group sizes are even */
            if (masks) {
                column(x, mt, K, k, blk, masks, nv, acc[0]);
                column(x, mt, K, k + 1, blk, masks, nv, acc[sets - 1]);
            } else {
                column_fp4(x, mt, K, k, blk, acc[0]);
                column_fp4(x, mt, K, k + 1, blk, acc[sets - 1]);
            }
        }
        if (sets == 2)
            for (int m = 0; m < mt; m++)
                for (int v = 0; v < nv; v++) acc[0][m][v] = _mm256_add_ps(acc[0][m][v], acc[1][m][v]);
        const uint32_t *sz = sz_rows + (long)g * sz_group_stride;
        for (int v = 0; v < nv; v++) {
            /* little endian: a (s, z) bf16 pair is one uint32 with s in the low half */
            __m256i pair = _mm256_loadu_si256((const __m256i *)(sz + v * 8));
            __m256 s = _mm256_castsi256_ps(_mm256_slli_epi32(pair, 16));
            __m256 z = _mm256_castsi256_ps(_mm256_and_si256(pair, high_half));
            const int mask = masks ? masks[v / 2] : 1;
            const __m256 unshift = _mm256_set1_ps(1.0f / (float)(mask & -mask)); /* 1 / the mask's lowest bit */
            for (int m = 0; m < mt; m++) {
                __m256 xs = _mm256_set1_ps(xsum[m * n_groups + g]);
                __m256 centred = _mm256_fmsub_ps(acc[0][m][v], unshift, _mm256_mul_ps(centre_v, xs)); /* sum code x - centre X_g */
                __m256 total = _mm256_fmadd_ps(s, centred, _mm256_loadu_ps(out[m] + v * 8));
                _mm256_storeu_ps(out[m] + v * 8, _mm256_fmadd_ps(z, xs, total));
            }
        }
    }
}

/* Masks of a 4-bit 32-row block: rows 0-15 (low), rows 16-31 (high). */
static const int MASKS_4BIT[2] = {0x0F, 0xF0};
/* A whole 2-bit tile in one pass: rows 0-15, 16-31, 32-47, 48-63. */
static const int MASKS_2BIT_TILE[4] = {0x03, 0x30, 0x0C, 0xC0};

/* One 32-row block for mt <= 2 rows of x; called with constant masks (NULL: FP4), so each call site is
 * specialised. */
static inline __attribute__((always_inline)) void block(const float *x, int mt, int K, const uint8_t *blk,
                                                        const int *masks, float centre, const uint32_t *sz_rows,
                                                        int n_pad, int group, const float *xsum, int n_groups,
                                                        float *out[MT_MAX]) {
    if (mt == 2)
        rows_pass(x, 2, K, blk, masks, 4, centre, sz_rows, n_pad, group, xsum, n_groups, out);
    else
        rows_pass(x, 1, K, blk, masks, 4, centre, sz_rows, n_pad, group, xsum, n_groups, out);
}

/* Per-group sums of x, X_g = sum over the group's columns of x[m, k]: [M, K / group]. */
static void group_sums(const float *x, int M, int K, int group, float *xsum) {
    const int n_groups = K / group;
    for (int m = 0; m < M; m++)
        for (int g = 0; g < n_groups; g++) {
            float s = 0.0f;
            for (int k = g * group; k < (g + 1) * group; k++) s += x[(long)m * K + k];
            xsum[m * n_groups + g] = s;
        }
}

/* x: float [M, K]; packed: 4-bit uint8 [n_pad / 32, K, 16] or 2-bit uint8 [n_pad / 64, K, 16];
 * sz: bf16 pairs [K / group, n_pad]; y: float [M, n_pad]; xsum: float scratch [M, K / group]. */
void q_gemv(const float *x, int M, int K, const uint8_t *packed, int bits, const uint32_t *sz, int n_pad, int group,
            float *xsum, float *y) {
    const int n_groups = K / group, n_tiles = n_pad / 64;
    group_sums(x, M, K, group, xsum);
#pragma omp parallel for schedule(static) if ((long)n_tiles * K >= 32768)
    for (int t = 0; t < n_tiles; t++) {
        const uint8_t *tile = packed + (long)t * (bits == 4 ? 2 : 1) * K * 16;
        const uint32_t *sz_tile = sz + (long)t * 64;
        float *y_tile = y + (long)t * 64;
        for (int m0 = 0; m0 < M; m0 += MT_MAX) {
            const int mt = M - m0 < MT_MAX ? M - m0 : MT_MAX;
            const float *xm = x + (long)m0 * K, *xs = xsum + m0 * n_groups;
            float *out[2][MT_MAX]; /* per 32-row half of the tile */
            for (int h = 0; h < 2; h++)
                for (int m = 0; m < mt; m++) out[h][m] = y_tile + (long)(m0 + m) * n_pad + h * 32;
            if (bits == 4) {
                block(xm, mt, K, tile, MASKS_4BIT, 8.0f, sz_tile, n_pad, group, xs, n_groups, out[0]);
                block(xm, mt, K, tile + (long)K * 16, MASKS_4BIT, 8.0f, sz_tile + 32, n_pad, group, xs, n_groups, out[1]);
            } else { /* a whole 2-bit tile per pass: 8 vectors share each column's two byte loads; at mt = 2
                      * the 16 accumulators spill a few to L1, still well ahead of two passes over the bytes */
                if (mt == 2)
                    rows_pass(xm, 2, K, tile, MASKS_2BIT_TILE, 8, 2.0f, sz_tile, n_pad, group, xs, n_groups, out[0]);
                else
                    rows_pass(xm, 1, K, tile, MASKS_2BIT_TILE, 8, 2.0f, sz_tile, n_pad, group, xs, n_groups, out[0]);
            }
        }
    }
}

/* The same over FP4 tiles (4-bit layout; MXFP4's 32-column groups, z = 0). A function of its own: sharing
 * q_gemv's body changed how the compiler allocated registers in the 2-bit pass (10% slower). */
void fp4_gemv(const float *x, int M, int K, const uint8_t *packed, const uint32_t *sz, int n_pad, int group,
              float *xsum, float *y) {
    const int n_groups = K / group, n_blocks = n_pad / 32;
    group_sums(x, M, K, group, xsum);
#pragma omp parallel for schedule(static) if ((long)n_blocks * K >= 65536)
    for (int b = 0; b < n_blocks; b++) {
        for (int m0 = 0; m0 < M; m0 += MT_MAX) {
            const int mt = M - m0 < MT_MAX ? M - m0 : MT_MAX;
            float *out[MT_MAX];
            for (int m = 0; m < mt; m++) out[m] = y + (long)(m0 + m) * n_pad + (long)b * 32;
            block(x + (long)m0 * K, mt, K, packed + (long)b * K * 16, 0, 0.0f, sz + (long)b * 32, n_pad, group,
                  xsum + m0 * n_groups, n_groups, out);
        }
    }
}
