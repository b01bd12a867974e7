/* Causal prefill attention with Q·Kᵀ from int8 codes, on the CPU.
 *
 * Built and loaded by kvquant/kernels/prefill_cpu.py (the math and the layouts are documented
 * there). One task is (KV head, tile of TR query positions) for every query head that shares the
 * KV head; OpenMP hands tasks out dynamically (later tiles see more keys). A task walks its visible
 * keys in blocks of KB keys, flash-attention style: the int32 dots of the tile's rows with the
 * block's keys, the scores s = (dot - 128·ksum)·qscale·kscale (log2 units), a running max and sum,
 * the probabilities rounded to bf16, and the value sums in float32 from bf16 values.
 *
 * With AVX-512 VNNI and BF16 (compiler flags set by the loader where the CPU has them) the dots are
 * vpdpbusd of the queries as unsigned bytes (code + 128) with 16 keys' signed codes at once, and
 * the value sums vdpbf16ps over pairs of keys; elsewhere plain C loops compute the same integers
 * and the same bf16 products (sums in another order).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#define KVQ_VNNI 1
#else
#define KVQ_VNNI 0
#endif

#define TR 8   /* query positions per task (of each query head) */
#define KB 32  /* keys per block (a multiple of 16) */

int kvq_prefill_abi_version(void) { return 1; }
int kvq_prefill_vnni(void) { return KVQ_VNNI; }

typedef struct {
  int64_t BH;      /* query heads x batch rows */
  int64_t rep;     /* query heads per KV head */
  int64_t T;       /* tokens (queries = keys, key 0 aligned with query 0) */
  int64_t Tp;      /* T rounded up to a multiple of KB */
  int64_t D;       /* head_dim, a multiple of 16 */
  int64_t window;  /* sliding window (keys j > i - window), 0 = none */
  int64_t nthreads;
  const uint8_t *qu;     /* (BH, T, D) query codes + 128 */
  const float *qscale;   /* (BH, T) query scale x softmax scale x log2(e) */
  const int8_t *kp;      /* (BHkv, Tp/16, D/4, 16, 4) key codes, 16 keys interleaved per 4 channels */
  const int32_t *ksum;   /* (BHkv, Tp) sum of a key's codes */
  const float *kscale;   /* (BHkv, Tp) key scale */
  const uint16_t *vp;    /* (BHkv, Tp/2, D, 2) values as bf16 bits, pairs of keys interleaved */
  float *out;            /* (BH, T, D) */
} kvq_prefill;

static inline uint16_t bf16_round(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even (finite inputs) */
  return (uint16_t)(u >> 16);
}

static inline float bf16_float(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

/* dots[r][j] of rows r < nr of the tile (query codes qu, D bytes each) with keys j0 .. j0+KB */
static void block_dots(const kvq_prefill *a, const uint8_t *qu, int64_t nr, const int8_t *kp, int64_t j0,
                       int32_t dots[TR][KB]) {
  const int64_t D = a->D;
#if KVQ_VNNI
  for (int64_t s = 0; s < KB / 16; s++) {
    const int8_t *blk = kp + ((j0 / 16 + s) * (D / 4)) * 64;
    __m512i acc[TR];
    for (int r = 0; r < TR; r++) acc[r] = _mm512_setzero_si512();
    for (int64_t c = 0; c < D / 4; c++) {
      __m512i kv = _mm512_loadu_si512((const void *)(blk + c * 64));
      for (int r = 0; r < TR; r++) {
        if (r < nr) {
          int32_t w;
          memcpy(&w, qu + r * D + 4 * c, 4);
          acc[r] = _mm512_dpbusd_epi32(acc[r], _mm512_set1_epi32(w), kv);
        }
      }
    }
    for (int r = 0; r < TR; r++) _mm512_storeu_si512((void *)(dots[r] + 16 * s), acc[r]);
  }
#else
  for (int64_t r = 0; r < nr; r++) {
    for (int64_t j = 0; j < KB; j++) {
      const int64_t jj = j0 + j;
      const int8_t *blk = kp + ((jj / 16) * (D / 4)) * 64 + (jj % 16) * 4;
      int32_t acc = 0;
      for (int64_t c = 0; c < D / 4; c++)
        for (int e = 0; e < 4; e++) acc += (int32_t)qu[r * D + 4 * c + e] * (int32_t)blk[c * 64 + e];
      dots[r][j] = acc;
    }
  }
#endif
}

/* o[r][:] += sum over keys j of p[r][j] * v[j][:] for one block (p as bf16 bits, KB keys) */
static void block_values(const kvq_prefill *a, int64_t nr, const uint16_t p[TR][KB], const uint16_t *vp, int64_t j0,
                         float *o) {
  const int64_t D = a->D;
#if KVQ_VNNI
  for (int64_t c = 0; c < D / 16; c++) {
    __m512 acc[TR];
    for (int r = 0; r < TR; r++) acc[r] = r < nr ? _mm512_loadu_ps(o + r * D + 16 * c) : _mm512_setzero_ps();
    for (int64_t u = 0; u < KB / 2; u++) {
      __m512bh vv = (__m512bh)_mm512_loadu_si512((const void *)(vp + ((j0 / 2 + u) * D + 16 * c) * 2));
      for (int r = 0; r < TR; r++) {
        if (r < nr) {
          int32_t w;
          memcpy(&w, p[r] + 2 * u, 4);
          acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32(w), vv);
        }
      }
    }
    for (int r = 0; r < TR; r++)
      if (r < nr) _mm512_storeu_ps(o + r * D + 16 * c, acc[r]);
  }
#else
  for (int64_t r = 0; r < nr; r++) {
    for (int64_t j = 0; j < KB; j++) {
      const float pj = bf16_float(p[r][j]);
      if (pj == 0.0f) continue;
      const uint16_t *row = vp + ((j0 + j) / 2) * D * 2 + (j0 + j) % 2;
      for (int64_t c = 0; c < D; c++) o[r * D + c] += pj * bf16_float(row[2 * c]);
    }
  }
#endif
}

#if KVQ_VNNI
/* 2^x for x <= 0 (16 lanes): x = n + f, n = round(x), |f| <= 1/2, 2^f by its Taylor polynomial of
 * degree 6 (relative error < 2e-7), scaled by 2^n */
static inline __m512 exp2_16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-126.0f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.5403530e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}
#endif

/* Row i's probabilities p (bf16 bits) of keys j0 .. j0+KB from their dots, its running max mx and
 * sum, and its value sums o (D floats) rescaled when the max grows. */
static void row_probs(const kvq_prefill *a, const int32_t *dots, const int32_t *ksum, const float *ks, float qs,
                      int64_t i, int64_t j0, float *mx, float *sum, float *o, uint16_t *p) {
  const int64_t D = a->D, w = a->window;
#if KVQ_VNNI
  __m512 s[KB / 16];
  __mmask16 vis[KB / 16];
  float bmax = -INFINITY;
  const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int u = 0; u < KB / 16; u++) {
    const __m512i jj = _mm512_add_epi32(iota, _mm512_set1_epi32((int32_t)(j0 + 16 * u)));
    vis[u] = _mm512_cmple_epi32_mask(jj, _mm512_set1_epi32((int32_t)i));
    if (w > 0) vis[u] &= _mm512_cmpgt_epi32_mask(jj, _mm512_set1_epi32((int32_t)(i - w)));
    const __m512i dk = _mm512_sub_epi32(_mm512_loadu_si512((const void *)(dots + 16 * u)),
                                        _mm512_slli_epi32(_mm512_loadu_si512((const void *)(ksum + j0 + 16 * u)), 7));
    s[u] = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dk), _mm512_set1_ps(qs)), _mm512_loadu_ps(ks + j0 + 16 * u));
    if (vis[u]) {
      const float m = _mm512_mask_reduce_max_ps(vis[u], s[u]);
      bmax = m > bmax ? m : bmax;
    }
  }
#else
  float s[KB], bmax = -INFINITY;
  for (int64_t j = 0; j < KB; j++) {
    const int64_t jj = j0 + j;
    const int visible = jj <= i && (w <= 0 || jj > i - w);
    s[j] = visible ? (float)(dots[j] - 128 * ksum[jj]) * qs * ks[jj] : -INFINITY;
    bmax = s[j] > bmax ? s[j] : bmax;
  }
#endif
  if (bmax == -INFINITY) {
    memset(p, 0, sizeof(uint16_t) * KB);
    return;
  }
  if (bmax > *mx) {
    const float c = exp2f(*mx - bmax);
    *sum *= c;
    for (int64_t d = 0; d < D; d++) o[d] *= c;
    *mx = bmax;
  }
#if KVQ_VNNI
  __m512 acc = _mm512_setzero_ps();
  for (int u = 0; u < KB / 16; u++) {
    const __m512 e = _mm512_maskz_mov_ps(vis[u], exp2_16(_mm512_sub_ps(s[u], _mm512_set1_ps(*mx))));
    const __m256i pb = (__m256i)_mm512_cvtneps_pbh(e);
    _mm256_storeu_si256((__m256i *)(p + 16 * u), pb);
    acc = _mm512_add_ps(acc, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(pb), 16)));
  }
  *sum += _mm512_reduce_add_ps(acc);
#else
  for (int64_t j = 0; j < KB; j++) {
    const uint16_t pb = s[j] == -INFINITY ? 0 : bf16_round(exp2f(s[j] - *mx));
    p[j] = pb;
    *sum += bf16_float(pb);
  }
#endif
}

/* One task: the TR query positions i0 .. i0+TR of every query head sharing KV head bkv (rep heads,
 * rep x TR rows), so each block of keys and values is read from memory once for all of them.
 * Scratch: o (rep*TR*D floats), mx and sum (rep*TR). */
static void tile(const kvq_prefill *a, int64_t bkv, int64_t i0, float *o, float *mx, float *sum) {
  const int64_t D = a->D, T = a->T, rep = a->rep, nr = (T - i0) < TR ? (T - i0) : TR;
  const int8_t *kp = a->kp + bkv * a->Tp * D;
  const int32_t *ksum = a->ksum + bkv * a->Tp;
  const float *ks = a->kscale + bkv * a->Tp;
  const uint16_t *vp = a->vp + bkv * a->Tp * D;
  int32_t dots[TR][KB];
  uint16_t p[TR][KB];
  for (int64_t r = 0; r < rep * TR; r++) mx[r] = -INFINITY, sum[r] = 0.0f;
  memset(o, 0, sizeof(float) * rep * TR * D);
  memset(p, 0, sizeof p);
  const int64_t last = i0 + nr - 1;                          /* the tile's last row sees keys <= last */
  int64_t lo = a->window > 0 ? i0 - a->window + 1 : 0;        /* the first row's first visible key */
  if (lo < 0) lo = 0;
  for (int64_t j0 = (lo / KB) * KB; j0 <= last; j0 += KB) {
    for (int64_t g = 0; g < rep; g++) {
      const int64_t bh = bkv * rep + g;
      const float *qs = a->qscale + bh * T + i0;
      float *og = o + g * TR * D;
      block_dots(a, a->qu + (bh * T + i0) * D, nr, kp, j0, dots);
      for (int64_t r = 0; r < nr; r++)
        row_probs(a, dots[r], ksum, ks, qs[r], i0 + r, j0, mx + g * TR + r, sum + g * TR + r, og + r * D, p[r]);
      block_values(a, nr, p, vp, j0, og);
    }
  }
  for (int64_t g = 0; g < rep; g++) {
    const int64_t bh = bkv * rep + g;
    for (int64_t r = 0; r < nr; r++) {
      const float inv = 1.0f / sum[g * TR + r];
      float *dst = a->out + (bh * T + i0 + r) * D;
      for (int64_t d = 0; d < D; d++) dst[d] = o[(g * TR + r) * D + d] * inv;
    }
  }
}

int kvq_prefill_attention(const kvq_prefill *a) {
  const int64_t tiles = (a->T + TR - 1) / TR, nkv = a->BH / a->rep, ntasks = nkv * tiles, rows = a->rep * TR;
  int failed = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads((int)a->nthreads)
#endif
  {
    float *o = (float *)malloc(sizeof(float) * rows * (a->D + 2));
    if (!o) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
      failed = 1;
    }
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t task = 0; task < ntasks; task++) {
      /* longest tiles first: task 0 is the last tile of KV head 0 */
      const int64_t bkv = task % nkv, t = tiles - 1 - task / nkv;
      if (o) tile(a, bkv, t * TR, o, o + rows * a->D, o + rows * (a->D + 1));
    }
    free(o);
  }
  return failed;
}
