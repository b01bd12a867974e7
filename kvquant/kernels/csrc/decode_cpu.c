/* One decoding step of attention read straight from a KVQuantCache layer's codes, on the CPU.
 *
 * Built and loaded by kvquant/kernels/cpu.py (the layout and the math are documented there).
 * kvq_decode_step runs, per (batch row, KV head) — in parallel with OpenMP when the compiler
 * has it — scores of the R query rows against the quantized keys (codes unpacked 8 at a time,
 * centers looked up with AVX2 permutes where the target has them, rotation and dot products
 * fused), the exact sinks and the exact residual; the mask; the softmax; and the value sums
 * from the value codes and the exact values. Nothing of size (tokens x head_dim) is written.
 */
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

int kvq_abi_version(void) { return 2; }

/* ---- codes ------------------------------------------------------------------------------ */

/* n codes (a multiple of 8) of one channel: base-3 digits of bytes (3 levels), base-5 digits
 * of 7-bit words (5 levels), else nbits-bit fields of a little-endian bit stream. */
static void channel_codes(const uint8_t *rec, int64_t levels, int64_t nbits, int64_t n, int32_t *codes,
                          const uint8_t *d3, const uint8_t *d5) {
  if (levels == 3) {
    for (int64_t u = 0; u < (n + 4) / 5; u++) {
      const uint8_t *d = d3 + 5 * rec[u];
      for (int64_t k = 0; k < 5 && 5 * u + k < n; k++) codes[5 * u + k] = d[k];
    }
  } else if (levels == 5) {
    for (int64_t u = 0; u < (n + 2) / 3; u++) {
      int64_t bit = 7 * u, i = bit >> 3, sh = bit & 7;
      int w = rec[i];
      if (sh > 1) w |= rec[i + 1] << 8;
      const uint8_t *d = d5 + 3 * ((w >> sh) & 127);
      for (int64_t k = 0; k < 3 && 3 * u + k < n; k++) codes[3 * u + k] = d[k];
    }
  } else {
    switch (nbits) {
#define UNPACK(NB)                                                                  \
  case NB:                                                                          \
    for (int64_t u = 0; u < n / 8; u++) {                                           \
      uint64_t w = 0;                                                               \
      memcpy(&w, rec + u * NB, NB); /* little-endian hosts (x86, arm64) */         \
      for (int k = 0; k < 8; k++) codes[8 * u + k] = (int32_t)((w >> (k * NB)) & ((1u << NB) - 1)); \
    }                                                                               \
    break;
      UNPACK(1) UNPACK(2) UNPACK(3) UNPACK(4) UNPACK(5) UNPACK(6) UNPACK(7) UNPACK(8)
#undef UNPACK
    }
  }
}

#ifdef __AVX2__
/* table[c] for 8 codes c < 16 (table has 16 readable entries) */
static inline __m256 lut16(__m256 t0, __m256 t1, __m256i c) {
  __m256 lo = _mm256_permutevar8x32_ps(t0, c), hi = _mm256_permutevar8x32_ps(t1, c);
  return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_cmpgt_epi32(c, _mm256_set1_epi32(7))));
}
#endif

/* dst[t] = table[code_t] for n codes (a multiple of 8) of nbits-bit fields (powers of two levels)
 * or levels 3 / 5; table has at least 16 readable entries. */
static void lookup_codes(const uint8_t *rec, int64_t levels, int64_t nbits, int64_t n, const float *table,
                         float *dst, int32_t *codes, const uint8_t *d3, const uint8_t *d5) {
#ifdef __AVX2__
  if (levels != 3 && levels != 5 && nbits <= 4) {
    __m256 t0 = _mm256_loadu_ps(table), t1 = _mm256_loadu_ps(table + 8);
    switch (nbits) {
#define LOOKUP(NB)                                                                                  \
  case NB: {                                                                                        \
    const __m256i sh = _mm256_setr_epi32(0, NB, 2 * NB, 3 * NB, 4 * NB, 5 * NB, 6 * NB, 7 * NB);  \
    const __m256i mk = _mm256_set1_epi32((1 << NB) - 1);                                            \
    for (int64_t u = 0; u < n / 8; u++) {                                                           \
      uint32_t w = 0;                                                                               \
      memcpy(&w, rec + u * NB, NB);                                                                 \
      __m256i c = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)w), sh), mk);           \
      _mm256_storeu_ps(dst + 8 * u, lut16(t0, t1, c));                                              \
    }                                                                                               \
    return;                                                                                         \
  }
      LOOKUP(1) LOOKUP(2) LOOKUP(3) LOOKUP(4)
#undef LOOKUP
    }
  }
#endif
  channel_codes(rec, levels, nbits, n, codes, d3, d5);
  for (int64_t t = 0; t < n; t++) dst[t] = table[codes[t]];
}

/* ---- the step ---------------------------------------------------------------------------- */

/* Keep in step with cpu_kernels.Step (ctypes). Shapes: B rows, H KV heads, R query rows per KV
 * head, D head dim, G tokens per group, m groups held, gb bytes per group record. */
typedef struct {
  int64_t B, H, R, D, G, m, gb, K, nd, rh, n_sink, n_exact, start, pv, bits_v, scale_bits, rms_values, nthreads;
  const uint8_t *kcodes;                     /* (B, m, gb) */
  const int64_t *ch_off, *ch_levels, *ch_bits; /* (H, D) */
  const float *kcent;                        /* (H, D, K) */
  const void *kmid, *khalf;                  /* (B, H, m, D): int8 codes (scale_bits 8) or float32 */
  const float *half_of_code;                 /* (256,): the half-range of 8-bit exponent code e at e + 128 */
  const float *base_cos, *base_sin;          /* (B, m, rh): cos, sin of each group's base position */
  const float *cosd, *sind;                  /* (rh, nd): a cos(theta delta), a sin(theta delta) */
  const int32_t *delta;                      /* (B, m G) rows into cosd / sind, or NULL: delta = s mod G */
  const float *q;                            /* (B, H, R, D), scaled */
  const float *sink_k, *sink_v;              /* (B, H, n_sink, D) */
  const float *xk, *xv;                      /* (B, H, n_exact, D): the exact residual */
  const uint8_t *vcodes;                     /* (B, H, m G, pv) */
  const float *vcent;                        /* (2^bits_v,) */
  const void *vscale;                        /* (B, H, m G, 2) int8 (mid, half) codes, or (B, H, m G) float32 RMS */
  const uint8_t *mask;                       /* (B, visible tokens) 1 = attend, or NULL */
  float *out;                                /* (B, H, R, D) */
  const uint8_t *d3, *d5;
} kvq_step;

static inline void scale_pair(const kvq_step *a, const void *mid, const void *half, int64_t i, float *m, float *h) {
  if (a->scale_bits == 8) {
    *h = a->half_of_code[((const int8_t *)half)[i] + 128];
    *m = (float)((const int8_t *)mid)[i] * *h / 16.0f;
  } else {
    *h = ((const float *)half)[i];
    *m = ((const float *)mid)[i];
  }
}

/* e^x for x <= 0 (scores minus their max), branch-free so the softmax loop vectorizes: x = n ln2 + r,
 * |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial (relative error < 3e-7), 2^n in the exponent
 * bits; 0 below -87 (e^-87 < 2^-125, under float's normal range). */
static inline float exp_neg(float x) {
  x = x < -87.0f ? -87.0f : x;
  float n = __builtin_rintf(x * 1.44269504f);
  float r = x - n * 0.693145752f - n * 1.42860677e-6f;
  float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720))))));
  int32_t bits = ((int32_t)n + 127) << 23;
  float scale;
  memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

static inline float dot(const float *x, const float *y, int64_t n) {
  float s = 0.0f;
  for (int64_t j = 0; j < n; j++) s += x[j] * y[j];
  return s;
}

/* scores sc[r * G + t] = q'_r . R(delta_t) k^_t of group g's G tokens */
static void group_scores(const kvq_step *a, int64_t b, int64_t h, int64_t g, const float *q, float *qg, float *sc,
                         float *table, float *k1, float *k2, int32_t *codes) {
  const int64_t G = a->G, D = a->D, R = a->R, rh = a->rh;
  const uint8_t *rec = a->kcodes + (b * a->m + g) * a->gb;
  const int64_t sidx = ((b * a->H + h) * a->m + g) * D;
  for (int64_t r = 0; r < R; r++) { /* the query rotated back to the group's base position */
    const float *qr = q + r * D;
    float *o = qg + r * D;
    for (int64_t i = 0; i < rh; i++) {
      float c = a->base_cos[(b * a->m + g) * rh + i], s = a->base_sin[(b * a->m + g) * rh + i];
      o[i] = qr[i] * c + qr[i + rh] * s;
      o[i + rh] = qr[i + rh] * c - qr[i] * s;
    }
    for (int64_t j = 2 * rh; j < D; j++) o[j] = qr[j];
  }
  memset(sc, 0, sizeof(float) * R * G);
  for (int64_t j = 0; j < D; j++) {
    if (j >= rh && j < 2 * rh) continue; /* second of a pair: done with its first */
    int64_t pair = j < rh;
    for (int64_t z = 0; z <= pair; z++) {
      int64_t jj = j + z * rh, c = h * D + jj;
      float mid, half;
      scale_pair(a, a->kmid, a->khalf, sidx + jj, &mid, &half);
      const float *cent = a->kcent + c * a->K;
      for (int64_t l = 0; l < a->ch_levels[c]; l++) table[l] = cent[l] * half + mid;
      lookup_codes(rec + a->ch_off[c], a->ch_levels[c], a->ch_bits[c], G, table, z ? k2 : k1, codes, a->d3, a->d5);
    }
    if (pair) {
      if (!a->delta) {
        const float *ci = a->cosd + j * a->nd, *si = a->sind + j * a->nd;
        for (int64_t t = 0; t < G; t++) {
          float x1 = k1[t], x2 = k2[t];
          k1[t] = x1 * ci[t] - x2 * si[t];
          k2[t] = x2 * ci[t] + x1 * si[t];
        }
      } else {
        const int32_t *dl = a->delta + b * a->m * G + g * G;
        for (int64_t t = 0; t < G; t++) {
          float x1 = k1[t], x2 = k2[t], ci = a->cosd[j * a->nd + dl[t]], si = a->sind[j * a->nd + dl[t]];
          k1[t] = x1 * ci - x2 * si;
          k2[t] = x2 * ci + x1 * si;
        }
      }
      for (int64_t r = 0; r < R; r++) {
        float a1 = qg[r * D + j], a2 = qg[r * D + j + rh], *s = sc + r * G;
        for (int64_t t = 0; t < G; t++) s[t] += a1 * k1[t] + a2 * k2[t];
      }
    } else {
      for (int64_t r = 0; r < R; r++) {
        float w = qg[r * D + j], *s = sc + r * G;
        for (int64_t t = 0; t < G; t++) s[t] += w * k1[t];
      }
    }
  }
}

int kvq_decode_step(const kvq_step *a) {
  const int64_t G = a->G, D = a->D, R = a->R, H = a->H, sq = a->m * G, n_all = sq + a->n_exact;
  const int64_t start = a->start, n_vis = n_all - start;
  int failed = 0;
#pragma omp parallel for num_threads(a->nthreads) schedule(static) if (a->nthreads > 1 && a->B * a->H > 1)
  for (int64_t bh = 0; bh < a->B * H; bh++) {
    const int64_t b = bh / H, h = bh % H, tabn = (a->K > 256 ? a->K : 256);
    float *buf = malloc(sizeof(float) * (tabn + 2 * G + R * G + R * D + R * n_vis + R * D + R + D + 256));
    int32_t *codes = malloc(sizeof(int32_t) * ((G > D ? G : D) + 8));
    if (!buf || !codes) {
      failed = 1;
      free(buf);
      free(codes);
      continue;
    }
    float *table = buf, *k1 = table + tabn, *k2 = k1 + G, *sc = k2 + G, *qg = sc + R * G, *p = qg + R * D;
    float *acc = p + R * n_vis, *cst = acc + R * D, *vals = cst + R, *vtab = vals + D;
    memset(table, 0, sizeof(float) * tabn);
    memset(vtab, 0, sizeof(float) * 256);
    memcpy(vtab, a->vcent, sizeof(float) * ((int64_t)1 << a->bits_v));
    const float *q = a->q + bh * R * D;
    const uint8_t *mask = a->mask ? a->mask + b * n_vis : NULL;
    /* scores p[r * n_vis + (s - start)] */
    for (int64_t g = start / G; g < a->m; g++) {
      group_scores(a, b, h, g, q, qg, sc, table, k1, k2, codes);
      int64_t lo = start > g * G ? start : g * G;
      for (int64_t r = 0; r < R; r++)
        memcpy(p + r * n_vis + (lo - start), sc + r * G + (lo - g * G), sizeof(float) * ((g + 1) * G - lo));
    }
    for (int64_t s = start; s < a->n_sink && s < sq; s++) /* exact sinks over their code slots */
      for (int64_t r = 0; r < R; r++) p[r * n_vis + s - start] = dot(q + r * D, a->sink_k + (bh * a->n_sink + s) * D, D);
    for (int64_t s = (start > sq ? start : sq); s < n_all; s++)
      for (int64_t r = 0; r < R; r++)
        p[r * n_vis + s - start] = dot(q + r * D, a->xk + (bh * a->n_exact + s - sq) * D, D);
    /* softmax per row (a row with no allowed key attends to nothing: zeros, as SDPA) */
    for (int64_t r = 0; r < R; r++) {
      float *pr = p + r * n_vis, mx = -INFINITY, sum = 0.0f;
      for (int64_t t = 0; t < n_vis; t++)
        if ((!mask || mask[t]) && pr[t] > mx) mx = pr[t];
      if (mx == -INFINITY) { /* no allowed key */
        memset(pr, 0, sizeof(float) * n_vis);
        continue;
      }
      for (int64_t t = 0; t < n_vis; t++) pr[t] = exp_neg(pr[t] - mx);
      if (mask)
        for (int64_t t = 0; t < n_vis; t++) pr[t] = mask[t] ? pr[t] : 0.0f;
      for (int64_t t = 0; t < n_vis; t++) sum += pr[t];
      float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
      for (int64_t t = 0; t < n_vis; t++) pr[t] *= inv;
    }
    /* values: codes, then exact sinks and residual */
    memset(acc, 0, sizeof(float) * (R * D + R));
    const int64_t first_code = start > a->n_sink ? start : a->n_sink;
    for (int64_t s = first_code; s < sq; s++) {
      lookup_codes(a->vcodes + (bh * sq + s) * a->pv, (int64_t)1 << a->bits_v, a->bits_v, D, vtab, vals, codes,
                   NULL, NULL);
      float mul, add;
      if (a->rms_values) {
        mul = ((const float *)a->vscale)[bh * sq + s];
        add = 0.0f;
      } else {
        const int8_t *sc8 = (const int8_t *)a->vscale + (bh * sq + s) * 2;
        mul = a->half_of_code[sc8[1] + 128];
        add = (float)sc8[0] * mul / 16.0f;
      }
      for (int64_t r = 0; r < R; r++) {
        float pr = p[r * n_vis + s - start], w = pr * mul, *ac = acc + r * D;
        if (pr == 0.0f) continue;
        cst[r] += pr * add;
        for (int64_t j = 0; j < D; j++) ac[j] += w * vals[j];
      }
    }
    for (int64_t s = start; s < n_all; s++) {
      if (s >= first_code && s < sq) continue;
      const float *v = s < sq ? a->sink_v + (bh * a->n_sink + s) * D : a->xv + (bh * a->n_exact + s - sq) * D;
      for (int64_t r = 0; r < R; r++) {
        float pr = p[r * n_vis + s - start], *ac = acc + r * D;
        for (int64_t j = 0; j < D; j++) ac[j] += pr * v[j];
      }
    }
    for (int64_t r = 0; r < R; r++)
      for (int64_t j = 0; j < D; j++) a->out[(bh * R + r) * D + j] = acc[r * D + j] + cst[r];
    free(buf);
    free(codes);
  }
  return failed ? -1 : 0;
}
