/* The vector of VW floats and the loops of kvq_decode_step whose arithmetic runs on VW floats at
 * once: included by decode_cpu.c once per vector width VW (8, or 16 where the target has AVX-512).
 * Names end in the width (v8, ld8, st8, group_dots8; v16, ...). */
#define KVQ_PASTE(a, b) a##b
#define KVQ_NAME(a, b) KVQ_PASTE(a, b)
#define LANES(name) KVQ_NAME(name, VW)
#define VF LANES(v)
#define LD LANES(ld)
#define ST LANES(st)

typedef float VF __attribute__((vector_size(4 * VW)));

static inline VF LD(const float *p) { /* unaligned */
  VF v;
  memcpy(&v, p, sizeof v);
  return v;
}

static inline void ST(float *p, VF v) { memcpy(p, &v, sizeof v); }

/* Scores of NR (<= 4) query rows qr[r * D] against VW tokens from t0 (pass 2): rotary pairs
 * (j, j + rh) rotated by the tokens' R(delta) (rows cs / sn of the tables, stride st), then the
 * channels past the rotary ones. The rows' sums stay in registers over every channel. */
static inline __attribute__((always_inline)) void LANES(dots)(int NR, const float *qr, const float *kf, int64_t G,
                                                              int64_t D, int64_t rh, const float *cs, const float *sn,
                                                              int64_t st, int64_t t0, float *sc) {
  VF s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
  for (int64_t j = 0; j < rh; j++) {
    VF x1 = LD(kf + j * G + t0), x2 = LD(kf + (j + rh) * G + t0);
    VF c = LD(cs + j * st + t0), s = LD(sn + j * st + t0);
    VF y1 = x1 * c - x2 * s, y2 = x2 * c + x1 * s;
    s0 += qr[j] * y1 + qr[j + rh] * y2;
    if (NR > 1) s1 += qr[D + j] * y1 + qr[D + j + rh] * y2;
    if (NR > 2) s2 += qr[2 * D + j] * y1 + qr[2 * D + j + rh] * y2;
    if (NR > 3) s3 += qr[3 * D + j] * y1 + qr[3 * D + j + rh] * y2;
  }
  for (int64_t j = 2 * rh; j < D; j++) {
    VF x = LD(kf + j * G + t0);
    s0 += qr[j] * x;
    if (NR > 1) s1 += qr[D + j] * x;
    if (NR > 2) s2 += qr[2 * D + j] * x;
    if (NR > 3) s3 += qr[3 * D + j] * x;
  }
  ST(sc + t0, s0);
  if (NR > 1) ST(sc + G + t0, s1);
  if (NR > 2) ST(sc + 2 * G + t0, s2);
  if (NR > 3) ST(sc + 3 * G + t0, s3);
}

/* sc[r * G + t]: the scores of the R query rows qg[r * D] (rotated to the group's base) against a
 * group's G keys kf[j * G + t] (G a multiple of VW), four rows at a time. */
static void LANES(group_dots)(int64_t R, const float *qg, const float *kf, int64_t G, int64_t D, int64_t rh,
                              const float *cs, const float *sn, int64_t st, float *sc) {
  for (int64_t r0 = 0; r0 < R; r0 += 4)
    for (int64_t t0 = 0; t0 < G; t0 += VW) {
      const float *qr = qg + r0 * D;
      float *o = sc + r0 * G;
      switch (R - r0 < 4 ? R - r0 : 4) {
        case 1: LANES(dots)(1, qr, kf, G, D, rh, cs, sn, st, t0, o); break;
        case 2: LANES(dots)(2, qr, kf, G, D, rh, cs, sn, st, t0, o); break;
        case 3: LANES(dots)(3, qr, kf, G, D, rh, cs, sn, st, t0, o); break;
        default: LANES(dots)(4, qr, kf, G, D, rh, cs, sn, st, t0, o); break;
      }
    }
}

/* acc[r * D + j] += sum_{i < nb} w[r * n + i] vals[i * D + j] for the R query rows and the channels
 * j in [j0, j1) (j1 - j0 a multiple of VW): VW channels of acc loaded once per block of nb value rows. */
static void LANES(value_sums)(int64_t R, int64_t D, int64_t j0, int64_t j1, int64_t nb, const float *w, int64_t n,
                              const float *vals, float *acc) {
  for (int64_t r = 0; r < R; r++)
    for (int64_t j = j0; j < j1; j += VW) {
      VF x = LD(acc + r * D + j);
      for (int64_t i = 0; i < nb; i++) x += w[r * n + i] * LD(vals + i * D + j);
      ST(acc + r * D + j, x);
    }
}

#undef ST
#undef LD
#undef VF
#undef LANES
#undef KVQ_NAME
#undef KVQ_PASTE
