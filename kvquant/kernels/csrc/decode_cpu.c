/* One decoding step of attention read straight from a KVQuantCache layer's codes, on the CPU.
 *
 * Built and loaded by kvquant/kernels/cpu.py (the layout and the math are documented there).
 * kvq_decode_step cuts each (batch row, KV head)'s visible tokens into spans of whole key groups
 * (more than one only where rows x heads would leave threads idle), runs the spans in parallel
 * with OpenMP when the compiler has it, and merges their softmax pieces as flash-decoding does.
 * A span computes the scores of the R query rows against its quantized keys one group at a time
 * in two passes: (1) each channel's G keys from its codes (8 codes at a time: AVX2 shifts,
 * permutes for <= 16 levels, gathers beyond, where the target has them; 16 at a time with one
 * permute for <= 16 levels where it has AVX-512; base-3/5 digits from tables), (2) the rotation
 * and the dot products, 8 tokens at a time (16 with AVX-512 where G is a multiple of 16) with up
 * to 4 rows' sums held in registers over every channel; then the exact sinks and residual, the
 * mask, the exponentials, and the value sums (value rows decoded 8 tokens at a time, each row's
 * sum loaded once per 8 tokens, 16 channels at once with AVX-512). Nothing of size (tokens x
 * head_dim) is written. The arithmetic on 8 or 16 floats is written once in GNU C vectors
 * (csrc/decode_lanes.h: AVX / AVX-512 registers where the target has them, plain floats elsewhere).
 * kvq_append_int8 appends tokens to the INT8 residual (the newest incomplete group) in one pass.
 */
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif
#ifdef __AVX512F__
#define KVQ_AVX512 1 /* 16-float vectors: codes looked up, scores and value sums 16 at a time */
#else
#define KVQ_AVX512 0
#endif

int kvq_abi_version(void) { return 7; }

/* Floats per vector of the widest path built: 16 (AVX-512), else 8 (AVX2 or portable C). */
int kvq_decode_lanes(void) { return KVQ_AVX512 ? 16 : 8; }

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
/* table[c] for 8 codes c < levels: one permute (levels <= 8), two and a blend (<= 16; table has
 * 16 readable entries), else a gather */
static inline __m256 lut(const float *table, int64_t levels, __m256i c) {
  __m256 t0 = _mm256_loadu_ps(table);
  if (levels <= 8) return _mm256_permutevar8x32_ps(t0, c);
  if (levels <= 16) {
    __m256 lo = _mm256_permutevar8x32_ps(t0, c), hi = _mm256_permutevar8x32_ps(_mm256_loadu_ps(table + 8), c);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_cmpgt_epi32(c, _mm256_set1_epi32(7))));
  }
  return _mm256_i32gather_ps(table, c, 4);
}

/* The nb bytes (nb <= 8) at p as a little-endian word: one load where nb is 1, 2, 4 or 8, else
 * bytes combined in registers (a memcpy of 3 bytes into a word makes the next load stall). */
static inline __attribute__((always_inline)) uint64_t bytes_le(const uint8_t *p, int nb) {
  uint8_t b1;
  uint16_t b2;
  uint32_t b4;
  uint64_t b8 = 0;
  switch (nb) {
    case 1: memcpy(&b1, p, 1); return b1;
    case 2: memcpy(&b2, p, 2); return b2;
    case 4: memcpy(&b4, p, 4); return b4;
    case 8: memcpy(&b8, p, 8); return b8;
  }
  for (int k = 0; k < nb; k++) b8 |= (uint64_t)p[k] << (8 * k);
  return b8;
}

/* Eight nb-bit fields (nb <= 8) in one nb-byte little-endian word w, as 32-bit lanes before their
 * shifts: for nb <= 4 w broadcast (shifted by 0, nb, ..., 7 nb: fields_shifts8), wider its low 32
 * bits for the first four fields and the 32 bits at 4 nb for the last four (shifts 0, ..., 3 nb). */
static inline __m256i fields_words8(int nb, uint64_t w) {
  if (nb <= 4) return _mm256_set1_epi32((int)(uint32_t)w);
  const int lo = (int)(uint32_t)w, hi = (int)(uint32_t)(w >> (4 * nb));
  return _mm256_setr_epi32(lo, lo, lo, lo, hi, hi, hi, hi);
}

static inline __m256i fields_shifts8(int nb) {
  return nb <= 4 ? _mm256_setr_epi32(0, nb, 2 * nb, 3 * nb, 4 * nb, 5 * nb, 6 * nb, 7 * nb)
                 : _mm256_setr_epi32(0, nb, 2 * nb, 3 * nb, 0, nb, 2 * nb, 3 * nb);
}

#if KVQ_AVX512
/* table[c] for 16 codes c < levels: one permute (levels <= 16; table has 16 readable entries),
 * else a gather */
static inline __m512 lut16(const float *table, int64_t levels, __m512i c) {
  if (levels <= 16) return _mm512_permutexvar_ps(c, _mm512_loadu_ps(table));
  return _mm512_i32gather_ps(c, table, 4);
}
#endif

/* dst[t] = table[code_t] for n codes (a multiple of 8) of nb-bit fields (nb <= 8): eight fields
 * are one nb-byte word (fields_words8), sixteen two words side by side where the target has
 * AVX-512. 2^nb levels: lut's and lut16's branches fold. */
static inline __attribute__((always_inline)) void fields8(int nb, const uint8_t *rec, int64_t n, const float *table,
                                                          float *dst) {
  const __m256i sh = fields_shifts8(nb), mk = _mm256_set1_epi32((1 << nb) - 1);
  int64_t u = 0; /* eight-field words done */
#if KVQ_AVX512
  const __m512i sh16 = _mm512_inserti64x4(_mm512_castsi256_si512(sh), sh, 1), mk16 = _mm512_set1_epi32((1 << nb) - 1);
  for (; u + 2 <= n / 8; u += 2) {
    const __m512i words = _mm512_inserti64x4(_mm512_castsi256_si512(fields_words8(nb, bytes_le(rec + u * nb, nb))),
                                             fields_words8(nb, bytes_le(rec + (u + 1) * nb, nb)), 1);
    const __m512i c = _mm512_and_si512(_mm512_srlv_epi32(words, sh16), mk16);
    _mm512_storeu_ps(dst + 8 * u, lut16(table, 1 << nb, c));
  }
#endif
  for (; u < n / 8; u++) {
    const __m256i c = _mm256_and_si256(_mm256_srlv_epi32(fields_words8(nb, bytes_le(rec + u * nb, nb)), sh), mk);
    _mm256_storeu_ps(dst + 8 * u, lut(table, 1 << nb, c));
  }
}
#endif

/* dst[t] = table[code_t] for n codes (a multiple of 8) of one channel (levels 3 / 5, or nbits-bit
 * fields, nbits <= 8); table has at least 16 readable entries. */
static inline void lookup_codes(const uint8_t *rec, int64_t levels, int64_t nbits, int64_t n, const float *table,
                         float *dst, int32_t *codes, const uint8_t *d3, const uint8_t *d5) {
#ifdef __AVX2__
  if (levels == 3 || levels == 5) {
    channel_codes(rec, levels, nbits, n, codes, d3, d5);
    int64_t t = 0;
#if KVQ_AVX512
    for (; t + 16 <= n; t += 16) _mm512_storeu_ps(dst + t, lut16(table, levels, _mm512_loadu_si512(codes + t)));
#endif
    for (; t < n; t += 8) _mm256_storeu_ps(dst + t, lut(table, levels, _mm256_loadu_si256((const __m256i *)(codes + t))));
    return;
  }
  switch (nbits) { /* constant widths, so each record read is one load */
    case 1: fields8(1, rec, n, table, dst); break;
    case 2: fields8(2, rec, n, table, dst); break;
    case 3: fields8(3, rec, n, table, dst); break;
    case 4: fields8(4, rec, n, table, dst); break;
    case 5: fields8(5, rec, n, table, dst); break;
    case 6: fields8(6, rec, n, table, dst); break;
    case 7: fields8(7, rec, n, table, dst); break;
    default: fields8(8, rec, n, table, dst); break;
  }
#else
  channel_codes(rec, levels, nbits, n, codes, d3, d5);
  for (int64_t t = 0; t < n; t++) dst[t] = table[codes[t]];
#endif
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
  const void *q;                             /* (B, H, R, D) in dtype, unscaled (times `scale` here) */
  const void *sink_k, *sink_v;               /* (B, H, n_sink, D) in dtype */
  const void *xk, *xv;                       /* (B, H, n_exact, D): the newest tokens, in dtype or INT8 codes */
  const uint16_t *xk_scale, *xv_scale;       /* (B, H, n_exact) fp16 scales of INT8 codes, or NULL: float32 */
  const uint8_t *vcodes;                     /* (B, H, m G, pv) */
  const float *vcent;                        /* (2^bits_v,) */
  const void *vscale;                        /* (B, H, m G, 2) int8 (mid, half) codes, or (B, H, m G) float32 RMS */
  const uint8_t *mask;                       /* (B, visible tokens) 1 = attend, or NULL */
  void *out;                                 /* (B, H, R, D) in dtype */
  const uint8_t *d3, *d5;
  const float *vrot;                         /* (D, D): coded values are of v H (values="hadamard"; H symmetric,
                                                orthonormal), read back as v^' H; NULL: none */
  int64_t dtype;                             /* of q, out, the sinks and exact residual rows: 0 float32, 1 bfloat16, 2 float16 */
  double scale;                              /* the softmax scale, applied to q (as float32) */
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

/* The float of IEEE single-precision bits b, and the bits of f. */
static inline float float_of_bits(uint32_t b) {
  float f;
  memcpy(&f, &b, sizeof f);
  return f;
}

static inline uint32_t bits_of_float(float f) {
  uint32_t b;
  memcpy(&b, &f, sizeof b);
  return b;
}

/* The IEEE half-precision number of bits h as a float. */
static inline float half_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 31, man = h & 1023;
  if (e == 0) { /* zero or subnormal: man 2^-24 */
    const float f = (float)man * 5.9604644775390625e-8f;
    return sign ? -f : f;
  }
  return float_of_bits(sign | (e == 31 ? 0x7f800000u | (man << 13) : ((e + 112) << 23) | (man << 13)));
}

/* The half-precision bits of f, rounded to nearest (ties to even) as torch's float -> float16
 * conversion rounds; 0 <= f < 65520 (what rounds to a finite float16). */
static inline uint16_t float_half(float f) {
  const uint32_t b = bits_of_float(f), e = (b >> 23) & 255;
  if (e < 113) return (uint16_t)__builtin_rintf(f * 16777216.0f); /* below 2^-14: m 2^-24, m <= 1024 */
  const uint32_t mant = b & 0x7fffff, rest = mant & 0x1fff;
  uint32_t h = ((e - 112) << 10) | (mant >> 13);
  if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) h++; /* a carry moves into the exponent, as it should */
  return (uint16_t)h;
}

/* Element i of x as float: dtype 0 float32, 1 bfloat16, 2 float16. */
static inline float load_any(const void *x, int64_t i, int dtype) {
  if (dtype == 0) return ((const float *)x)[i];
  if (dtype == 2) return half_float(((const uint16_t *)x)[i]);
  return float_of_bits((uint32_t)((const uint16_t *)x)[i] << 16);
}

/* f as bfloat16 bits, rounded to nearest (ties to even), NaN as 0x7fc0: torch's conversion. */
static inline uint16_t bf16_bits(float f) {
  const uint32_t b = bits_of_float(f);
  if (f != f) return 0x7fc0;
  return (uint16_t)((b + 0x7fff + ((b >> 16) & 1)) >> 16);
}

/* f as float16 bits, rounded to nearest (ties to even), overflow to infinity: torch's conversion. */
static inline uint16_t f16_bits(float f) {
  const uint16_t sign = (uint16_t)((bits_of_float(f) >> 16) & 0x8000);
  const float a = fabsf(f);
  if (a != a) return sign | 0x7e00;
  if (a >= 65520.0f) return sign | 0x7c00; /* rounds past 65504 */
  return sign | float_half(a);
}

/* Row of D floats stored at element i of x in dtype (0 float32, 1 bfloat16, 2 float16). */
static inline void store_row(void *x, int64_t i, int64_t D, int dtype, const float *row) {
  if (dtype == 0) {
    memcpy((float *)x + i, row, sizeof(float) * D);
    return;
  }
  uint16_t *h = (uint16_t *)x + i;
  for (int64_t j = 0; j < D; j++) h[j] = dtype == 1 ? bf16_bits(row[j]) : f16_bits(row[j]);
}

/* The INT8 residual after appending n tokens, bit for bit the arithmetic of
 * kvquant.cache.store.KVStore._encode_tail: per (batch row, KV head) the n_old held rows (codes,
 * fp16 scales) copied, then each new row x (D values of dtype 0 float32, 1 bfloat16, 2 float16)
 * as s = fp16(clamp(max|x| / 127, 2^-24, 65504)) and codes rint(x / s) (ties to even) clamped to
 * +-127. Finite inputs (a NaN is not propagated as torch would). Shapes: old_codes (BH, n_old, D),
 * old_scales (BH, n_old), x (BH, n, D), codes (BH, n_old + n, D), scales (BH, n_old + n). */
void kvq_append_int8(int64_t BH, int64_t n_old, int64_t n, int64_t D, int64_t dtype, const int8_t *old_codes,
                     const uint16_t *old_scales, const void *x, int8_t *codes, uint16_t *scales) {
  const int64_t n_all = n_old + n;
  for (int64_t bh = 0; bh < BH; bh++) {
    if (n_old) {
      memcpy(codes + bh * n_all * D, old_codes + bh * n_old * D, (size_t)(n_old * D));
      memcpy(scales + bh * n_all, old_scales + bh * n_old, sizeof(uint16_t) * n_old);
    }
    for (int64_t t = 0; t < n; t++) {
      const int64_t src = (bh * n + t) * D, row = bh * n_all + n_old + t;
      float big = 0.0f;
      for (int64_t j = 0; j < D; j++) {
        const float a = fabsf(load_any(x, src + j, (int)dtype));
        big = a > big ? a : big;
      }
      float sc = big / 127.0f;
      sc = sc < 5.9604644775390625e-8f ? 5.9604644775390625e-8f : (sc > 65504.0f ? 65504.0f : sc);
      const uint16_t h = float_half(sc);
      const float s = half_float(h);
      scales[row] = h;
      int8_t *c = codes + row * D;
      for (int64_t j = 0; j < D; j++) {
        float r = __builtin_rintf(load_any(x, src + j, (int)dtype) / s);
        c[j] = (int8_t)(r < -127.0f ? -127.0f : (r > 127.0f ? 127.0f : r));
      }
    }
  }
}

/* Held token s's exact key (which 0) or value (1) row, D floats: the sink's copy where s is a sink
 * (s < n_sink: laid over its code slot or its residual slot alike), else residual row s - sq —
 * held in dtype, or INT8 codes times the token's fp16 scale —, as float32: a pointer into the
 * held float32 row, or the row decoded into tmp. */
static const float *exact_row(const kvq_step *a, int which, int64_t bh, int64_t s, int64_t sq, float *tmp) {
  const int64_t D = a->D;
  const void *x;
  int64_t i;
  if (s < a->n_sink) {
    x = which ? a->sink_v : a->sink_k;
    i = (bh * a->n_sink + s) * D;
  } else {
    x = which ? a->xv : a->xk;
    i = (bh * a->n_exact + s - sq) * D;
    const uint16_t *scale = which ? a->xv_scale : a->xk_scale;
    if (scale) {
      const int8_t *c = (const int8_t *)x + i;
      const float f = half_float(scale[i / D]);
      for (int64_t j = 0; j < D; j++) tmp[j] = (float)c[j] * f;
      return tmp;
    }
  }
  if (a->dtype == 0) return (const float *)x + i;
  for (int64_t j = 0; j < D; j++) tmp[j] = load_any(x, i + j, (int)a->dtype);
  return tmp;
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

/* Vectors of 8 floats (v8, ld8, st8) and, where the target has AVX-512, 16 (v16, ...) in GNU C
 * (AVX / AVX-512 registers where the target has them, else plain floats), with the loops that run
 * on VW tokens (scores) or VW channels (value sums) at once: csrc/decode_lanes.h, included once per
 * width, so the rotation, the dot products and the value sums are written once for every target. */
#define VW 8
#include "decode_lanes.h"
#undef VW
#if KVQ_AVX512
#define VW 16
#include "decode_lanes.h"
#undef VW
#endif

typedef int32_t v8i __attribute__((vector_size(32)));

/* exp_neg on eight floats at once (the same steps; n by truncating x log2(e) - 1/2, x <= 0) */
static inline v8 exp_neg8(v8 x) {
  const v8 lo = (v8){0} - 87.0f;
  v8i below = x < lo;
  x = (v8)(((v8i)x & ~below) | ((v8i)lo & below));
  v8 n = __builtin_convertvector(__builtin_convertvector(x * 1.44269504f - 0.5f, v8i), v8);
  v8 r = x - n * 0.693145752f - n * 1.42860677e-6f;
  v8 p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720))))));
  return p * (v8)((__builtin_convertvector(n, v8i) + 127) << 23);
}

/* The softmax's pieces of one row's scores pr[0..n): *mx the largest score the mask allows (mask
 * NULL: all; -inf where none is), pr[t] = e^(pr[t] - *mx) where allowed and 0 elsewhere, and
 * *sum their sum. */
static void exp_scores(float *pr, int64_t n, const uint8_t *mask, float *mx, float *sum) {
  float m = -INFINITY, total = 0.0f;
  for (int64_t t = 0; t < n; t++)
    if ((!mask || mask[t]) && pr[t] > m) m = pr[t];
  *mx = m;
  if (m == -INFINITY) {
    memset(pr, 0, sizeof(float) * n);
    *sum = 0.0f;
    return;
  }
  int64_t t = 0;
  v8 acc = {0};
  for (; t + 8 <= n; t += 8) {
    v8 e = exp_neg8(ld8(pr + t) - m);
    st8(pr + t, e);
    acc += e;
  }
  for (; t < n; t++) pr[t] = exp_neg(pr[t] - m);
  if (mask) {
    for (t = 0; t < n; t++) total += pr[t] = mask[t] ? pr[t] : 0.0f;
  } else {
    for (int k = 0; k < 8; k++) total += acc[k];
    for (t = n - n % 8; t < n; t++) total += pr[t];
  }
  *sum = total;
}

/* Group g's keys k^[j * G + t] = centers[code]·half + mid of channel j, token t (pass 1). */
static void group_keys(const kvq_step *a, int64_t b, int64_t h, int64_t g, float *kf, float *table, int32_t *codes) {
  const int64_t G = a->G, D = a->D;
  const uint8_t *rec = a->kcodes + (b * a->m + g) * a->gb;
  const int64_t sidx = ((b * a->H + h) * a->m + g) * D;
  for (int64_t j = 0; j < D; j++) {
    const int64_t c = h * D + j, levels = a->ch_levels[c];
    float mid, half;
    scale_pair(a, a->kmid, a->khalf, sidx + j, &mid, &half);
    const float *cent = a->kcent + c * a->K;
    for (int64_t l = 0; l < levels; l++) table[l] = cent[l] * half + mid;
    lookup_codes(rec + a->ch_off[c], levels, a->ch_bits[c], G, table, kf + j * G, codes, a->d3, a->d5);
  }
}

/* scores sc[r * G + t] = q'_r . R(delta_t) k^_t of group g's G tokens, q' the query rotated back
 * to the group's base position */
static void group_scores(const kvq_step *a, int64_t b, int64_t h, int64_t g, const float *q, float *qg, float *sc,
                         float *table, float *kf, float *rot, int32_t *codes) {
  const int64_t G = a->G, D = a->D, R = a->R, rh = a->rh;
  for (int64_t r = 0; r < R; r++) {
    const float *qr = q + r * D;
    float *o = qg + r * D;
    for (int64_t i = 0; i < rh; i++) {
      float c = a->base_cos[(b * a->m + g) * rh + i], s = a->base_sin[(b * a->m + g) * rh + i];
      o[i] = qr[i] * c + qr[i + rh] * s;
      o[i + rh] = qr[i + rh] * c - qr[i] * s;
    }
    for (int64_t j = 2 * rh; j < D; j++) o[j] = qr[j];
  }
  group_keys(a, b, h, g, kf, table, codes);
  const float *cs = a->cosd, *sn = a->sind;
  int64_t st = a->nd;
  if (rh && a->delta) { /* positions stored: the tokens' rows of the tables, gathered once */
    const int32_t *dl = a->delta + (b * a->m + g) * G;
    for (int64_t j = 0; j < rh; j++)
      for (int64_t t = 0; t < G; t++) {
        rot[j * G + t] = a->cosd[j * a->nd + dl[t]];
        rot[(rh + j) * G + t] = a->sind[j * a->nd + dl[t]];
      }
    cs = rot, sn = rot + rh * G, st = G;
  }
#if KVQ_AVX512
  if (G % 16 == 0) {
    group_dots16(R, qg, kf, G, D, rh, cs, sn, st, sc);
    return;
  }
#endif
  group_dots8(R, qg, kf, G, D, rh, cs, sn, st, sc);
}

/* Rows i < nb (D floats each) of the values of tokens s0 + i: centers[code]·mul + add from their
 * codes — up to 16 levels through a table of the token's own centers·mul + add (vtab: the
 * centers, 16 readable; tab: 16 floats of scratch), more by centers then one multiply-add —, or
 * their exact copies. */
static void value_rows(const kvq_step *a, int64_t bh, int64_t s0, int64_t nb, int64_t first_code, int64_t sq,
                       const float *vtab, float *tab, float *dst, int32_t *codes) {
  const int64_t D = a->D, levels = (int64_t)1 << a->bits_v;
  for (int64_t i = 0; i < nb; i++) {
    const int64_t s = s0 + i;
    float *row = dst + i * D;
    if (s < first_code || s >= sq) {
      const float *v = exact_row(a, 1, bh, s, sq, row);
      if (v != row) memcpy(row, v, sizeof(float) * D);
      continue;
    }
    float mul, add;
    if (a->rms_values) {
      mul = ((const float *)a->vscale)[bh * sq + s];
      add = 0.0f;
    } else {
      const int8_t *sc8 = (const int8_t *)a->vscale + (bh * sq + s) * 2;
      mul = a->half_of_code[sc8[1] + 128];
      add = (float)sc8[0] * mul / 16.0f;
    }
    const uint8_t *rec = a->vcodes + (bh * sq + s) * a->pv;
    if (levels <= 16) {
      st8(tab, ld8(vtab) * mul + add);
      st8(tab + 8, ld8(vtab + 8) * mul + add);
      lookup_codes(rec, levels, a->bits_v, D, tab, row, codes, NULL, NULL);
    } else {
      lookup_codes(rec, levels, a->bits_v, D, vtab, row, codes, NULL, NULL);
      for (int64_t j = 0; j < D; j += 8) st8(row + j, ld8(row + j) * mul + add);
    }
  }
}

/* Attention of row (b, h)'s R queries over its visible tokens [lo, hi) (lo >= start), in the
 * pieces the spans' merge needs: per query row r, mx[r] the largest allowed score (-inf: none),
 * sum[r] = sum_s e^(score_s - mx[r]) and acc[r * D + j] = sum_s e^(score_s - mx[r]) v_sj over
 * the allowed tokens s. Returns -1 where scratch memory cannot be had. */
static int span_attention(const kvq_step *a, int64_t b, int64_t h, int64_t lo, int64_t hi, float *mx, float *sum,
                          float *acc) {
  const int64_t G = a->G, D = a->D, R = a->R, sq = a->m * G, n = hi - lo, VB = 8; /* value rows per block */
  const int64_t bh = b * a->H + h, tabn = (a->K > 256 ? a->K : 256), n_vis = sq + a->n_exact - a->start;
  float *buf = malloc(sizeof(float) * (tabn + 2 * D * G + R * G + 3 * R * D + R * n + VB * D + 256 + 16));
  int32_t *codes = malloc(sizeof(int32_t) * ((G > D ? G : D) + 8)); /* one channel's or one token's codes */
  if (!buf || !codes) {
    free(buf);
    free(codes);
    return -1;
  }
  float *table = buf, *kf = table + tabn, *rot = kf + D * G, *sc = rot + D * G, *qg = sc + R * G;
  float *qs = qg + R * D, *p = qs + R * D, *vals = p + R * n, *vtab = vals + VB * D, *acc_rot = vtab + 256 + 16;
  memset(table, 0, sizeof(float) * tabn);
  memset(vtab, 0, sizeof(float) * 256);
  memcpy(vtab, a->vcent, sizeof(float) * ((int64_t)1 << a->bits_v));
  const float qscale = (float)a->scale; /* q (as float32) times the scale: torch's q.float() * scale */
  for (int64_t i = 0; i < R * D; i++) qs[i] = load_any(a->q, bh * R * D + i, (int)a->dtype) * qscale;
  const float *q = qs;
  const uint8_t *mask = a->mask ? a->mask + b * n_vis + (lo - a->start) : NULL;
  /* scores p[r * n + (s - lo)]: the quantized keys group by group, then the exact sinks laid over
   * their code slots and the exact residual */
  for (int64_t g = lo / G; g * G < hi && g < a->m; g++) {
    group_scores(a, b, h, g, q, qg, sc, table, kf, rot, codes);
    const int64_t from = lo > g * G ? lo : g * G, to = hi < (g + 1) * G ? hi : (g + 1) * G;
    for (int64_t r = 0; r < R; r++) memcpy(p + r * n + (from - lo), sc + r * G + (from - g * G), sizeof(float) * (to - from));
  }
  const int64_t sinks_end = hi < a->n_sink ? hi : a->n_sink; /* the exact tokens: the sinks ... */
  int64_t res_from = lo > sq ? lo : sq;                           /* ... and the residual after them */
  res_from = res_from > sinks_end ? res_from : sinks_end;
  for (int64_t s = lo; s < sinks_end; s++)
    for (int64_t r = 0; r < R; r++) p[r * n + s - lo] = dot(q + r * D, exact_row(a, 0, bh, s, sq, vals), D);
  for (int64_t s = res_from; s < hi; s++) {
    const float *k = exact_row(a, 0, bh, s, sq, vals);
    for (int64_t r = 0; r < R; r++) p[r * n + s - lo] = dot(q + r * D, k, D);
  }
  for (int64_t r = 0; r < R; r++) exp_scores(p + r * n, n, mask, mx + r, sum + r);
  /* values, up to VB tokens at a time (a block is all coded or all exact): their rows (from codes
   * or exact), then acc_r += sum_i p_ri v_i with acc_r's floats loaded once per block; rotated
   * coded values (vrot) summed apart in acc_rot and rotated back once: acc_r += acc_rot_r H */
  const int64_t first_code = a->start > a->n_sink ? a->start : a->n_sink;
  memset(acc, 0, sizeof(float) * R * D);
  memset(acc_rot, 0, sizeof(float) * R * D);
  for (int64_t s0 = lo, nb; s0 < hi; s0 += nb) {
    int64_t end = hi - s0 < VB ? hi : s0 + VB;
    if (s0 < first_code && end > first_code) end = first_code;
    if (s0 < sq && end > sq) end = sq;
    nb = end - s0;
    value_rows(a, bh, s0, nb, first_code, sq, vtab, vtab + 256, vals, codes);
    float *sums = a->vrot && s0 >= first_code && s0 < sq ? acc_rot : acc;
    int64_t j = 0;
#if KVQ_AVX512
    j = D - D % 16;
    value_sums16(R, D, 0, j, nb, p + s0 - lo, n, vals, sums);
#endif
    value_sums8(R, D, j, D, nb, p + s0 - lo, n, vals, sums);
  }
  if (a->vrot)
    for (int64_t r = 0; r < R; r++)
      for (int64_t i = 0; i < D; i++)
        if (acc_rot[r * D + i] != 0.0f)
          for (int64_t j = 0; j < D; j++) acc[r * D + j] += acc_rot[r * D + i] * a->vrot[i * D + j];
  free(buf);
  free(codes);
  return 0;
}

/* The step: each (batch row, KV head)'s visible tokens cut into S spans of whole key groups (S > 1
 * only where there are fewer rows x heads than twice the threads, so every thread has work),
 * the spans in parallel, then each query row's out = sum_k e^(mx_k - M) acc_k / sum_k e^(mx_k - M)
 * sum_k with M the largest mx_k (a row with no allowed key attends to nothing: zeros, as SDPA). */
int kvq_decode_step(const kvq_step *a) {
  const int64_t G = a->G, D = a->D, R = a->R, BH = a->B * a->H, n_all = a->m * G + a->n_exact;
  const int64_t g0 = a->start / G, groups = a->m - g0;
  int64_t S = BH < 2 * a->nthreads ? (2 * a->nthreads + BH - 1) / BH : 1;
  S = S > groups ? (groups > 0 ? groups : 1) : S;
  const int64_t W = R * (D + 2); /* a span's pieces: acc (R x D), mx (R), sum (R) */
  float *part = malloc(sizeof(float) * (BH * S * W + D)), *out = part + BH * S * W; /* + one output row */
  if (!part) return -1;
  int failed = 0;
#pragma omp parallel for num_threads(a->nthreads) schedule(dynamic) if (a->nthreads > 1 && BH * S > 1)
  for (int64_t task = 0; task < BH * S; task++) {
    const int64_t bh = task / S, k = task % S;
    const int64_t lo = k ? (g0 + k * groups / S) * G : a->start;
    const int64_t hi = k < S - 1 ? (g0 + (k + 1) * groups / S) * G : n_all;
    float *pc = part + task * W;
    if (span_attention(a, bh / a->H, bh % a->H, lo, hi, pc + R * D, pc + R * D + R, pc)) failed = 1;
  }
  for (int64_t bh = 0; bh < BH && !failed; bh++)
    for (int64_t r = 0; r < R; r++) {
      float M = -INFINITY, L = 0.0f;
      for (int64_t k = 0; k < S; k++) {
        const float m = part[(bh * S + k) * W + R * D + r];
        M = m > M ? m : M;
      }
      memset(out, 0, sizeof(float) * D);
      if (M == -INFINITY) {
        store_row(a->out, (bh * R + r) * D, D, (int)a->dtype, out);
        continue;
      }
      for (int64_t k = 0; k < S; k++) {
        const float *pc = part + (bh * S + k) * W, m = pc[R * D + r];
        if (m == -INFINITY) continue;
        const float w = exp_neg(m - M);
        L += w * pc[R * D + R + r];
        for (int64_t j = 0; j < D; j++) out[j] += w * pc[r * D + j];
      }
      const float inv = 1.0f / L;
      for (int64_t j = 0; j < D; j++) out[j] *= inv;
      store_row(a->out, (bh * R + r) * D, D, (int)a->dtype, out);
    }
  free(part);
  return failed ? -1 : 0;
}
