/* GEMV over our 4-bit, 2-bit and FP4 (MXFP4) tiles: y[m, n] = sum_k x[m, k] * w[n, k], any number of rows m.
 *
 * Weights are the prepared CPU forms of offload.kernels.cpu, in our own tile layout (FORMAT.md), tiles of 64 rows:
 *   4-bit: two 32-row blocks; for every column k 16 bytes, byte j = row j (bits 0-3) | row 16 + j (bits 4-7).
 *   2-bit: for every column k 16 bytes, byte j = rows j, 32 + j, 16 + j, 48 + j at bits 0, 2, 4, 6.
 *   FP4:   the 4-bit layout holding e2m1 codes (MXFP4); a 16-entry table turns them into 2 * value, exact int8.
 * Per group of `group` columns a bf16 pair (scale s, offset z) per row, [K / group, n_pad, 2], with
 * w = (code - centre) * s + z (centre 8 for 4-bit nibbles, 2 for 2-bit codes; FP4: w = table[code] * s).
 *
 * One source, compiled once per instruction set by offload.kernels.native: VEC = 8 (AVX2 + FMA, 8-float ymm
 * vectors) or VEC = 16 (AVX-512 F/BW/VL, 16-float zmm vectors, twice the registers). A column's 16 bytes
 * are 16 rows of one byte each, so they fill 16 / VEC vectors per mask.
 *
 * Why by hand: torch's _weight_int4pack_mm_for_cpu reads bf16 activations, reaches ~20% of the streaming-read
 * roofline at M = 1 on AVX2, has no 2-bit or FP4 form, and its tile layout depends on the CPU. Each pass
 * walks its columns once: a column's bytes become float vectors by one mask and one convert each, with no
 * shift: a code masked in place is code * 2^shift, and that power of two is divided out once per group. The
 * vectors meet x[k] in one FMA each; scale and offset are applied once per group:
 * sum_k w x = s * (sum_k code x - centre X_g) + z X_g, X_g the group's sum of x.
 * Tiles are split across OpenMP threads (torch's own libgomp, so the pools are shared), one tile per
 * thread at a time, so the result does not depend on the thread count.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#if VEC == 16
typedef __m512 vf;
typedef __m512i vi;
#define vf_zero _mm512_setzero_ps
#define vf_set1 _mm512_set1_ps
#define vf_load _mm512_loadu_ps
#define vf_store _mm512_storeu_ps
#define vf_add _mm512_add_ps
#define vf_mul _mm512_mul_ps
#define vf_fmadd _mm512_fmadd_ps
#define vf_fmsub _mm512_fmsub_ps
#define vi_load(p) _mm512_loadu_si512((const void *)(p))
#define vi_and _mm512_and_si512
#define vi_set1 _mm512_set1_epi32
#define vi_slli _mm512_slli_epi32
#define vi_float _mm512_cvtepi32_ps
#define vi_bits _mm512_castsi512_ps
#define u8_lanes(p) _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p))) /* 16 bytes -> 16 int32 */
#define i8_lanes(v) _mm512_cvtepi8_epi32(v)
#define SETS_MAX 4 /* independent accumulator sets per pass: 32 registers leave room for 16 accumulators */
#define ACC_REGS 16
#define MT_MAX 4 /* x rows per pass */
#elif VEC == 8
typedef __m256 vf;
typedef __m256i vi;
#define vf_zero _mm256_setzero_ps
#define vf_set1 _mm256_set1_ps
#define vf_load _mm256_loadu_ps
#define vf_store _mm256_storeu_ps
#define vf_add _mm256_add_ps
#define vf_mul _mm256_mul_ps
#define vf_fmadd _mm256_fmadd_ps
#define vf_fmsub _mm256_fmsub_ps
#define vi_load(p) _mm256_loadu_si256((const __m256i *)(p))
#define vi_and _mm256_and_si256
#define vi_set1 _mm256_set1_epi32
#define vi_slli _mm256_slli_epi32
#define vi_float _mm256_cvtepi32_ps
#define vi_bits _mm256_castsi256_ps
#define u8_lanes(p) _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p))) /* 8 bytes -> 8 int32 */
#define i8_lanes(v) _mm256_cvtepi8_epi32(v)
#define SETS_MAX 2
#define ACC_REGS 8
#define MT_MAX 2
#else
#error "compile with -DVEC=8 (AVX2) or -DVEC=16 (AVX-512)"
#endif

#define LOADS (16 / VEC)   /* vectors one mask makes of a column's 16 bytes */
#define NV_MAX (64 / VEC)  /* vectors per column of a 64-row (2-bit) tile */
#define INLINE static inline __attribute__((always_inline))

/* One column k of a pass: its 16 bytes (one row per byte) become nv vectors of VEC floats,
 * vector v = bytes[v % LOADS] & masks[v / LOADS], i.e. a code times the power of two its mask starts at;
 * they meet x[m, k] in nv FMAs per m. */
INLINE void column(const float *x, int mt, int K, int k, const uint8_t *blk, const int *masks, int nv,
                   vf acc[MT_MAX][NV_MAX]) {
    const uint8_t *p = blk + (long)k * 16;
    vi b[LOADS];
    for (int l = 0; l < LOADS; l++) b[l] = u8_lanes(p + l * VEC);
    vf w[NV_MAX];
    for (int v = 0; v < nv; v++) w[v] = vi_float(vi_and(b[v % LOADS], vi_set1(masks[v / LOADS])));
    for (int m = 0; m < mt; m++) {
        vf xv = vf_set1(x[(long)m * K + k]);
        for (int v = 0; v < nv; v++) acc[m][v] = vf_fmadd(w[v], xv, acc[m][v]);
    }
}

/* The same for FP4 (32 rows, 32 / VEC vectors): the e2m1 codes of rows 0-15 (low nibbles) and 16-31 (high
 * nibbles) become 2 * value through a 16-entry byte table, exact as int8. */
INLINE void column_fp4(const float *x, int mt, int K, int k, const uint8_t *blk, vf acc[MT_MAX][NV_MAX]) {
    const __m128i table = _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
    const __m128i nibble = _mm_set1_epi8(0x0F), raw = _mm_loadu_si128((const __m128i *)(blk + (long)k * 16));
    const __m128i low = _mm_shuffle_epi8(table, _mm_and_si128(raw, nibble));
    const __m128i high = _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16(raw, 4), nibble));
    const __m128i rows8[4] = {low, _mm_srli_si128(low, 8), high, _mm_srli_si128(high, 8)}; /* 8 rows each */
    vf w[32 / VEC];
    for (int v = 0; v < 32 / VEC; v++) w[v] = vi_float(i8_lanes(rows8[v * (VEC / 8)]));
    for (int m = 0; m < mt; m++) {
        vf xv = vf_set1(x[(long)m * K + k]);
        for (int v = 0; v < 32 / VEC; v++) acc[m][v] = vf_fmadd(w[v], xv, acc[m][v]);
    }
}

/* VEC * nv rows (vector v holds rows VEC*v ..) for mt rows of x, all K columns. `mt` and `nv` are constants
 * at every call site, so the compiler unrolls the loops over them and keeps the accumulators in registers:
 * up to ACC_REGS of them, in `sets` independent sets over consecutive columns, so that the loop waits on
 * loads, not on FMA latency. */
INLINE void rows_pass(const float *x, int mt, int K, const uint8_t *blk, const int *masks, int nv, float centre,
                      const uint32_t *sz_rows, long sz_group_stride, int group, const float *xsum, int n_groups,
                      float *out[MT_MAX]) {
    const vi high_half = vi_set1((int)0xFFFF0000u);
    const int fit = ACC_REGS / (mt * nv), sets = fit >= SETS_MAX ? SETS_MAX : (fit >= 2 ? 2 : 1);
    const vf centre_v = vf_set1(centre);
    /* Group results add up in `out` itself (L1), not in registers: the column loop needs them all. */
    for (int m = 0; m < mt; m++)
        for (int v = 0; v < nv; v++) vf_store(out[m] + v * VEC, vf_zero());

    for (int g = 0; g < n_groups; g++) {
        vf acc[SETS_MAX][MT_MAX][NV_MAX];
        for (int t = 0; t < sets; t++)
            for (int m = 0; m < mt; m++)
                for (int v = 0; v < nv; v++) acc[t][m][v] = vf_zero();
        const int k0 = g * group;
        for (int k = k0; k < k0 + group; k += SETS_MAX) { /* group sizes are multiples of 4 */
            for (int u = 0; u < SETS_MAX; u++) {
                if (masks)
                    column(x, mt, K, k + u, blk, masks, nv, acc[u % sets]);
                else
                    column_fp4(x, mt, K, k + u, blk, acc[u % sets]);
            }
        }
        for (int t = 1; t < sets; t++)
            for (int m = 0; m < mt; m++)
                for (int v = 0; v < nv; v++) acc[0][m][v] = vf_add(acc[0][m][v], acc[t][m][v]);
        const uint32_t *sz = sz_rows + (long)g * sz_group_stride;
        for (int v = 0; v < nv; v++) {
            /* little endian: a (s, z) bf16 pair is one uint32 with s in the low half */
            vi pair = vi_load(sz + v * VEC);
            vf s = vi_bits(vi_slli(pair, 16));
            vf z = vi_bits(vi_and(pair, high_half));
            const int mask = masks ? masks[v / LOADS] : 1;
            const vf unshift = vf_set1(1.0f / (float)(mask & -mask)); /* 1 / the mask's lowest bit */
            for (int m = 0; m < mt; m++) {
                vf xs = vf_set1(xsum[m * n_groups + g]);
                vf centred = vf_fmsub(acc[0][m][v], unshift, vf_mul(centre_v, xs)); /* sum code x - centre X_g */
                vf total = vf_fmadd(s, centred, vf_load(out[m] + v * VEC));
                vf_store(out[m] + v * VEC, vf_fmadd(z, xs, total));
            }
        }
    }
}

/* Calls `call_with_mt` with a constant mt (1..MT_MAX), so each case is specialised. */
#if MT_MAX == 4
#define MORE_ROWS(call_with_mt) case 3: call_with_mt(3); break; case 4: call_with_mt(4); break;
#else
#define MORE_ROWS(call_with_mt)
#endif
#define BY_ROWS(mt, call_with_mt)                                                                                  \
    switch (mt) {                                                                                                  \
    case 1: call_with_mt(1); break;                                                                                \
    case 2: call_with_mt(2); break;                                                                                \
    MORE_ROWS(call_with_mt)                                                                                        \
    }

/* Masks of a 4-bit 32-row block: rows 0-15 (low), rows 16-31 (high). */
static const int MASKS_4BIT[2] = {0x0F, 0xF0};
/* A whole 2-bit tile in one pass: rows 0-15, 16-31, 32-47, 48-63. */
static const int MASKS_2BIT_TILE[4] = {0x03, 0x30, 0x0C, 0xC0};

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

/* One 64-row tile t of a 4-bit or 2-bit weight for all M rows of x: y[m * ldy + r] for the tile's rows r. */
static void q_tile(const float *x, int M, int K, const uint8_t *packed, int bits, const uint32_t *sz, int n_pad,
                   int group, const float *xsum, int t, float *y, long ldy) {
    const int n_groups = K / group;
    const uint8_t *tile = packed + (long)t * (bits == 4 ? 2 : 1) * K * 16;
    const uint32_t *sz_tile = sz + (long)t * 64;
    float *y_tile = y + (long)t * 64;
    for (int m0 = 0; m0 < M; m0 += MT_MAX) {
        const int mt = M - m0 < MT_MAX ? M - m0 : MT_MAX;
        const float *xm = x + (long)m0 * K, *xs = xsum + m0 * n_groups;
        float *out[2][MT_MAX]; /* per 32-row half of the tile */
        for (int h = 0; h < 2; h++)
            for (int m = 0; m < mt; m++) out[h][m] = y_tile + (long)(m0 + m) * ldy + h * 32;
        if (bits == 4) {
#define HALVES(MT)                                                                                                \
    rows_pass(xm, MT, K, tile, MASKS_4BIT, 32 / VEC, 8.0f, sz_tile, n_pad, group, xs, n_groups, out[0]);          \
    rows_pass(xm, MT, K, tile + (long)K * 16, MASKS_4BIT, 32 / VEC, 8.0f, sz_tile + 32, n_pad, group, xs,         \
              n_groups, out[1])
            BY_ROWS(mt, HALVES)
        } else { /* a whole 2-bit tile per pass: its vectors share each column's byte loads (on AVX2 at
                  * mt = 2 the 16 accumulators spill a few to L1, still well ahead of two passes) */
#define TILE2(MT)                                                                                                 \
    rows_pass(xm, MT, K, tile, MASKS_2BIT_TILE, 64 / VEC, 2.0f, sz_tile, n_pad, group, xs, n_groups, out[0])
            BY_ROWS(mt, TILE2)
        }
    }
}

/* x: float [M, K]; packed: 4-bit uint8 [n_pad / 32, K, 16] or 2-bit uint8 [n_pad / 64, K, 16];
 * sz: bf16 pairs [K / group, n_pad]; y: float [M, n_pad]; xsum: float scratch [M, K / group]. */
void q_gemv(const float *x, int M, int K, const uint8_t *packed, int bits, const uint32_t *sz, int n_pad, int group,
            float *xsum, float *y) {
    const int n_tiles = n_pad / 64;
    group_sums(x, M, K, group, xsum);
#pragma omp parallel for schedule(static) if ((long)n_tiles * K >= 32768)
    for (int t = 0; t < n_tiles; t++) q_tile(x, M, K, packed, bits, sz, n_pad, group, xsum, t, y, n_pad);
}

/* One 32-row block b of an FP4 weight (4-bit layout; MXFP4's 32-column groups, z = 0) for all M rows of x. A
 * function of its own: sharing q_tile's body changed how the compiler allocated registers in the 2-bit pass
 * (10% slower, AVX2). */
static void fp4_block(const float *x, int M, int K, const uint8_t *packed, const uint32_t *sz, int n_pad, int group,
                      const float *xsum, int b, float *y, long ldy) {
    const int n_groups = K / group;
    for (int m0 = 0; m0 < M; m0 += MT_MAX) {
        const int mt = M - m0 < MT_MAX ? M - m0 : MT_MAX;
        float *out[MT_MAX];
        for (int m = 0; m < mt; m++) out[m] = y + (long)(m0 + m) * ldy + (long)b * 32;
        const float *xm = x + (long)m0 * K, *xs = xsum + m0 * n_groups;
#define FP4(MT)                                                                                                   \
    rows_pass(xm, MT, K, packed + (long)b * K * 16, 0, 32 / VEC, 0.0f, sz + (long)b * 32, n_pad, group, xs,       \
              n_groups, out)
        BY_ROWS(mt, FP4)
    }
}

void fp4_gemv(const float *x, int M, int K, const uint8_t *packed, const uint32_t *sz, int n_pad, int group,
              float *xsum, float *y) {
    const int n_blocks = n_pad / 32;
    group_sums(x, M, K, group, xsum);
#pragma omp parallel for schedule(static) if ((long)n_blocks * K >= 65536)
    for (int b = 0; b < n_blocks; b++) fp4_block(x, M, K, packed, sz, n_pad, group, xsum, b, y, n_pad);
}

/* ---- Dense bf16 / fp32 weights [N, K] (row-major), few rows of x: y[m, n] = sum_k x[m, k] w[n, k] ----
 * Memory-bound: each weight row is read once for all M (<= 8) rows of x, NR rows of w at a time, a bf16 value
 * widened to fp32 exactly by a 16-bit shift. Each output is one fp32 dot product whose order (VEC lanes over k,
 * then a fixed lane reduction, then the scalar tail) depends on neither M, NR nor the thread count. */
#define DENSE_M 8
#if VEC == 16
#define vf_load_bf16(p) vi_bits(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16))
INLINE float vf_sum(__m512 v) {
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}
#define NR_OF(mt) ((mt) <= 4 ? 4 : 2)
#else
#define vf_load_bf16(p) vi_bits(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))
INLINE float vf_sum(__m256 v) {
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}
#define NR_OF(mt) ((mt) <= 2 ? 4 : (mt) <= 4 ? 2 : 1)
#endif

INLINE float bf16_value(uint16_t b) {
    union { uint32_t u; float f; } v = {.u = (uint32_t)b << 16};
    return v.f;
}

INLINE float weight_at(const void *w, int bf16, long i) {
    return bf16 ? bf16_value(((const uint16_t *)w)[i]) : ((const float *)w)[i];
}

/* Rows n0 .. n0 + nr of w for mt rows of x (row stride ldx), into y[m * ldy + n]. */
INLINE void dense_pass(const float *x, int mt, long ldx, int K, const void *w, int bf16, int n0, int nr, float *y,
                       long ldy) {
    vf acc[DENSE_M][4];
    for (int m = 0; m < mt; m++)
        for (int r = 0; r < nr; r++) acc[m][r] = vf_zero();
    const int kv = K - K % VEC;
    for (int k = 0; k < kv; k += VEC) {
        vf wv[4];
        for (int r = 0; r < nr; r++) {
            const long at = (long)(n0 + r) * K + k;
            wv[r] = bf16 ? vf_load_bf16((const uint16_t *)w + at) : vf_load((const float *)w + at);
        }
        for (int m = 0; m < mt; m++) {
            const vf xv = vf_load(x + m * ldx + k);
            for (int r = 0; r < nr; r++) acc[m][r] = vf_fmadd(wv[r], xv, acc[m][r]);
        }
    }
    for (int m = 0; m < mt; m++)
        for (int r = 0; r < nr; r++) {
            float s = vf_sum(acc[m][r]);
            for (int k = kv; k < K; k++) s += weight_at(w, bf16, (long)(n0 + r) * K + k) * x[m * ldx + k];
            y[m * ldy + n0 + r] = s;
        }
}

/* Rows [n0, n1) of w for M <= DENSE_M rows of x. */
static void dense_rows(const float *x, int M, long ldx, int K, const void *w, int bf16, int n0, int n1, float *y,
                       long ldy) {
#define DENSE(MT)                                                                                                 \
    case MT: {                                                                                                    \
        int n = n0;                                                                                               \
        for (; n + NR_OF(MT) <= n1; n += NR_OF(MT)) dense_pass(x, MT, ldx, K, w, bf16, n, NR_OF(MT), y, ldy);     \
        for (; n < n1; n++) dense_pass(x, MT, ldx, K, w, bf16, n, 1, y, ldy);                                     \
        break;                                                                                                    \
    }
    switch (M) { DENSE(1) DENSE(2) DENSE(3) DENSE(4) DENSE(5) DENSE(6) DENSE(7) DENSE(8) }
}

/* bias[n] (bf16 or fp32; none when NULL) added to rows [n0, n1) of y. */
static void add_bias(int M, const void *bias, int bias_bf16, int n0, int n1, float *y, long ldy) {
    if (!bias) return;
    for (int m = 0; m < M; m++)
        for (int n = n0; n < n1; n++) y[m * ldy + n] += weight_at(bias, bias_bf16, n);
}

#define DENSE_BLOCK 32 /* rows per parallel task */

/* x: float [M, K]; w: bf16 (bf16 = 1) or fp32 [N, K]; bias: [N] or NULL; y: float [M, N]. Any M (8 rows per
 * pass over the weight). */
void dense_gemv(const float *x, int M, int K, const void *w, int bf16, int N, const void *bias, int bias_bf16,
                float *y) {
    const int n_blocks = (N + DENSE_BLOCK - 1) / DENSE_BLOCK;
#pragma omp parallel for schedule(static) if ((long)N * K >= 65536)
    for (int b = 0; b < n_blocks; b++) {
        const int n0 = b * DENSE_BLOCK, n1 = n0 + DENSE_BLOCK < N ? n0 + DENSE_BLOCK : N;
        for (int m0 = 0; m0 < M; m0 += DENSE_M) {
            const int mt = M - m0 < DENSE_M ? M - m0 : DENSE_M;
            dense_rows(x + (long)m0 * K, mt, K, K, w, bf16, n0, n1, y + (long)m0 * N, N);
            add_bias(mt, bias, bias_bf16, n0, n1, y + (long)m0 * N, N);
        }
    }
}

/* ---- One MoE layer: every expert's gate/up, activation and down in one call ----
 * A projection is described by 8 int64s: kind (KIND_*), weight, (s, z) pairs (quantized), group, n_pad (rows
 * as stored, the output stride of a quantized weight), bias (or 0), bias is bf16, out_features. Experts
 * [E][3] (gate, up, down); expert e owns rows start[e] .. start[e + 1] of x [P, H] and of out [P, ldo].
 * Work is split in 64-row units (a quantized tile, two FP4 blocks, 64 dense rows), parallel over experts and
 * units; each unit is computed by one thread in a fixed order, so a (token, expert) result depends only on
 * the expert's weights and rows, never on which other experts share the call nor on the thread count. */
enum { KIND_F32, KIND_BF16, KIND_INT4, KIND_INT2, KIND_FP4 };
enum { ACT_SWIGLU, ACT_CLAMPED };
typedef struct { int64_t kind, w, sz, group, n_pad, bias, bias_bf16, n; } proj_t;

static int units_of(const proj_t *p) { return (int)((p->n + 63) / 64); }

/* Group sums of a quantized projection's input (nothing for a dense one). */
static void input_sums(const proj_t *p, const float *x, int M, int K, float *xsum) {
    if (p->kind >= KIND_INT4) group_sums(x, M, K, (int)p->group, xsum);
}

/* Unit u (rows 64u .. 64u + 64) of projection p for M rows of x [M, K]: y[m * ldy + n], bias added. */
static void run_unit(const proj_t *p, const float *x, int M, int K, const float *xsum, int u, float *y, long ldy) {
    const int n0 = 64 * u, n1 = n0 + 64 < p->n ? n0 + 64 : (int)p->n;
    const void *w = (const void *)(intptr_t)p->w;
    const uint32_t *sz = (const uint32_t *)(intptr_t)p->sz;
    switch (p->kind) {
    case KIND_F32:
    case KIND_BF16:
        for (int m0 = 0; m0 < M; m0 += DENSE_M)
            dense_rows(x + (long)m0 * K, M - m0 < DENSE_M ? M - m0 : DENSE_M, K, K, w, p->kind == KIND_BF16, n0,
                       n1, y + (long)m0 * ldy, ldy);
        break;
    case KIND_INT4:
    case KIND_INT2:
        q_tile(x, M, K, w, p->kind == KIND_INT4 ? 4 : 2, sz, (int)p->n_pad, (int)p->group, xsum, u, y, ldy);
        break;
    case KIND_FP4:
        for (int b = 2 * u; b < 2 * u + 2 && b < p->n_pad / 32; b++)
            fp4_block(x, M, K, w, sz, (int)p->n_pad, (int)p->group, xsum, b, y, ldy);
        break;
    }
    add_bias(M, (const void *)(intptr_t)p->bias, (int)p->bias_bf16, n0, n1, y, ldy);
}

INLINE float sigmoid(float v) { return 1.0f / (1.0f + expf(-v)); }

/* x: float [P, H]; out: float [P, ldo] (ldo >= every down n_pad). act: ACT_SWIGLU silu(g) * u, or ACT_CLAMPED
 * (gpt-oss) g = min(g, limit), u = clamp(u, +-limit), (u + 1) * g * sigmoid(alpha g). Returns 0, or -1 when
 * scratch memory could not be allocated. */
int moe_layer(int E, const int64_t *desc, const int *start, const float *x, int H, int F, int act, float alpha,
              float limit, float *out, int ldo) {
    const proj_t *proj = (const proj_t *)desc;
    const int P = start[E];
    long ldg = (F + 63) / 64 * 64;
    for (int e = 0; e < E; e++)
        for (int j = 0; j < 2; j++) ldg = proj[3 * e + j].n_pad > ldg ? proj[3 * e + j].n_pad : ldg;
    const int sums_x = H / 32 + 1, sums_h = F / 32 + 1; /* groups are at least 32 columns */
    float *g = malloc(sizeof(float) * P * (2 * ldg + F + sums_x + sums_h) + 64);
    if (!g) return -1;
    float *up = g + P * ldg, *h = up + P * ldg, *xs = h + (long)P * F, *hs = xs + (long)P * sums_x;
    int gate_units = 0, down_units = 0;
    for (int e = 0; e < E; e++) {
        gate_units = units_of(&proj[3 * e]) > gate_units ? units_of(&proj[3 * e]) : gate_units;
        down_units = units_of(&proj[3 * e + 2]) > down_units ? units_of(&proj[3 * e + 2]) : down_units;
    }
#pragma omp parallel if ((long)P * H * F >= 65536)
    {
#pragma omp for schedule(static)
        for (int e = 0; e < E; e++)
            input_sums(&proj[3 * e], x + (long)start[e] * H, start[e + 1] - start[e], H, xs + (long)start[e] * sums_x);
#pragma omp for schedule(static)
        for (int t = 0; t < E * gate_units; t++) {
            const int e = t / gate_units, u = t % gate_units, M = start[e + 1] - start[e];
            const proj_t *p = &proj[3 * e];
            if (M == 0 || u >= units_of(p)) continue;
            const float *xe = x + (long)start[e] * H, *xse = xs + (long)start[e] * sums_x;
            float *ge = g + start[e] * ldg, *ue = up + start[e] * ldg, *he = h + (long)start[e] * F;
            run_unit(&p[0], xe, M, H, xse, u, ge, ldg);
            run_unit(&p[1], xe, M, H, xse, u, ue, ldg);
            const int n1 = 64 * u + 64 < F ? 64 * u + 64 : F;
            for (int m = 0; m < M; m++)
                for (int n = 64 * u; n < n1; n++) {
                    float a = ge[m * ldg + n], b = ue[m * ldg + n];
                    if (act == ACT_SWIGLU) {
                        he[(long)m * F + n] = a * sigmoid(a) * b;
                    } else {
                        a = a < limit ? a : limit;
                        b = b < -limit ? -limit : (b > limit ? limit : b);
                        he[(long)m * F + n] = (b + 1.0f) * a * sigmoid(alpha * a);
                    }
                }
        }
#pragma omp for schedule(static)
        for (int e = 0; e < E; e++)
            input_sums(&proj[3 * e + 2], h + (long)start[e] * F, start[e + 1] - start[e], F,
                       hs + (long)start[e] * sums_h);
#pragma omp for schedule(static)
        for (int t = 0; t < E * down_units; t++) {
            const int e = t / down_units, u = t % down_units, M = start[e + 1] - start[e];
            const proj_t *p = &proj[3 * e + 2];
            if (M == 0 || u >= units_of(p)) continue;
            run_unit(p, h + (long)start[e] * F, M, F, hs + (long)start[e] * sums_h, u, out + (long)start[e] * ldo,
                     ldo);
        }
    }
    free(g);
    return 0;
}

/* Every (token, expert) pair of a routed layer in one call, for a provider that holds every expert: desc has
 * all E experts' descriptors; pair p (token p / k) goes through expert ids[p]; x float [N, H]; out float
 * [P, ldo] in pair order. The pairs are grouped by expert and run by moe_layer (experts with no pair are
 * skipped there), so each pair's result is the one moe_layer gives it in any grouping. Returns 0, or -1 when
 * scratch memory could not be allocated. */
int moe_pairs(int E, const int64_t *desc, int P, int k, const int64_t *ids, const float *x, int H, int F, int act,
              float alpha, float limit, float *out, int ldo) {
    int *start = calloc(E + 1, sizeof(int)), *where = malloc(sizeof(int) * P);
    float *xg = malloc(sizeof(float) * (long)P * H), *og = malloc(sizeof(float) * (long)P * ldo);
    int status = -1;
    if (start && where && xg && og) {
        for (int p = 0; p < P; p++) start[ids[p] + 1]++;
        for (int e = 0; e < E; e++) start[e + 1] += start[e];
        int cursor[E]; /* each expert's next free row */
        for (int e = 0; e < E; e++) cursor[e] = start[e];
        for (int p = 0; p < P; p++) { /* pairs in order within an expert: its rows as a stable sort leaves them */
            where[p] = cursor[ids[p]]++;
            for (int h = 0; h < H; h++) xg[(long)where[p] * H + h] = x[(long)(p / k) * H + h];
        }
        status = moe_layer(E, desc, start, xg, H, F, act, alpha, limit, og, ldo);
        for (int p = 0; status == 0 && p < P; p++)
            for (int n = 0; n < ldo; n++) out[(long)p * ldo + n] = og[(long)where[p] * ldo + n];
    }
    free(start); free(where); free(xg); free(og);
    return status;
}

/* ---- Decode attention: a few new tokens against the KV cache, every head in one call ----
 * out[b, t, h, :] = sum_s p[s] v[b, h / G, s, :], p = softmax over s (and the head's sink, when sinks is not
 * NULL: it joins the normalisation, then is dropped) of scale * q[b, h, t, :] . k[b, h / G, s, :], keys with
 * blocked[b, t, s] != 0 left out; G = Hq / Hkv query heads share a key head. q: float [B, Hq, T, D]
 * contiguous; k, v: bf16 (kv_bf16) or float, element strides (batch, head, position), rows contiguous;
 * scores: float scratch [B, Hq, T, S]; out: float [B, T, Hq, Dv]; a row with every key blocked and no sink
 * (left padding) averages all S values, as torch's softmax over equal masked scores does. One thread per
 * (b, h), each dot product in a fixed order (VEC lanes over d, a fixed lane reduction, then the tail), so the
 * result does not depend on the thread count. Replaces ~20 torch ops a layer (two batched matmuls in the
 * model's dtype, views, mask, softmax). */
INLINE float kv_dot(const float *q, const void *k, int bf16, int D) {
    vf acc = vf_zero();
    const int dv = D - D % VEC;
    for (int d = 0; d < dv; d += VEC)
        acc = vf_fmadd(vf_load(q + d), bf16 ? vf_load_bf16((const uint16_t *)k + d) : vf_load((const float *)k + d),
                       acc);
    float s = vf_sum(acc);
    for (int d = dv; d < D; d++) s += q[d] * weight_at(k, bf16, d);
    return s;
}

INLINE void kv_axpy(float p, const void *v, int bf16, int Dv, float *out) {
    const int dv = Dv - Dv % VEC;
    const vf pv = vf_set1(p);
    for (int d = 0; d < dv; d += VEC)
        vf_store(out + d, vf_fmadd(pv, bf16 ? vf_load_bf16((const uint16_t *)v + d) : vf_load((const float *)v + d),
                                   vf_load(out + d)));
    for (int d = dv; d < Dv; d++) out[d] += p * weight_at(v, bf16, d);
}

void decode_attention(int B, int Hq, int Hkv, int T, int S, int D, int Dv, const float *q, const void *k,
                      const void *v, int kv_bf16, long k_sb, long k_sh, long k_ss, long v_sb, long v_sh, long v_ss,
                      const uint8_t *blocked, const float *sinks, float scale, float *scores, float *out) {
    const int G = Hq / Hkv, size = kv_bf16 ? 2 : 4;
#pragma omp parallel for schedule(static) if ((long)B * Hq * T * S * (D + Dv) >= 65536)
    for (int bh = 0; bh < B * Hq; bh++) {
        const int b = bh / Hq, h = bh % Hq, g = h / G;
        const char *kb = (const char *)k + (long)(b * k_sb + g * k_sh) * size;
        const char *vb = (const char *)v + (long)(b * v_sb + g * v_sh) * size;
        for (int t = 0; t < T; t++) {
            const float *qt = q + ((long)bh * T + t) * D;
            const uint8_t *mask = blocked + ((long)b * T + t) * S;
            float *sc = scores + ((long)bh * T + t) * S;
            float top = sinks ? sinks[h] : -INFINITY;
            for (int s = 0; s < S; s++) {
                sc[s] = mask[s] ? -INFINITY : scale * kv_dot(qt, kb + (long)s * k_ss * size, kv_bf16, D);
                if (sc[s] > top) top = sc[s];
            }
            float total = sinks ? expf(sinks[h] - top) : 0.0f;
            for (int s = 0; s < S; s++) {
                sc[s] = mask[s] ? 0.0f : expf(sc[s] - top);
                total += sc[s];
            }
            float *o = out + (((long)b * T + t) * Hq + h) * Dv;
            for (int d = 0; d < Dv; d++) o[d] = 0.0f;
            const int uniform = total == 0.0f;
            const float inv = uniform ? 1.0f / S : 1.0f / total;
            for (int s = 0; s < S; s++)
                if (uniform || !mask[s]) kv_axpy(uniform ? inv : sc[s] * inv, vb + (long)s * v_ss * size, kv_bf16, Dv, o);
        }
    }
}
