// One-row kernels shared by the operators (native.cpp) and the decode step (native_decoder.cpp): y = W x for a
// block of output rows of one input row, weights read at their stored width and converted in registers.
// Activations and accumulation are float32.
//
// Layouts (leangpt/quant/kernels.py packs them):
//   float: w (N, K) float.
//   int8: q (N, K) int8, scales (N,) float: W[n, k] = q[n, k] * scales[n].
//   int4: packed (N, K/2) uint8 in blocks of 32 inputs; byte j of a block holds input j (low nibble) and input
//         j + 16 (high nibble). scales and szeros = scales * zero points (N, G), groups of K / G inputs (a
//         multiple of 32): W[n, k] = q[n, k] * scales[n, g] - szeros[n, g].
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LEANGPT_AVX2 1
#endif
// VNNI's byte dot product (unsigned times signed bytes, four products a 32-bit lane, added in 32 bits): AVX-512
// VNNI on 256-bit vectors, or AVX-VNNI. The int8-activation products take it where the build has it.
#if defined(LEANGPT_AVX2) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define LEANGPT_VNNI 1
#define LEANGPT_DPBUSD _mm256_dpbusd_epi32
#define LEANGPT_DPBUSD128 _mm_dpbusd_epi32
#elif defined(LEANGPT_AVX2) && defined(__AVXVNNI__)
#define LEANGPT_VNNI 1
#define LEANGPT_DPBUSD _mm256_dpbusd_avx_epi32
#define LEANGPT_DPBUSD128 _mm_dpbusd_avx_epi32
#endif

namespace leangpt {

// Output rows computed together: each input vector is loaded once for all of them, and their independent
// accumulators hide the latency of the multiply-adds.
constexpr int64_t kFloatBlock = 8, kInt8Block = 8, kInt4Block = 4;

// Whether the int8-activation products take VNNI where the build has it; the tests switch it off to check the
// AVX2 products on the same machine.
#ifdef LEANGPT_VNNI
constexpr bool kVnni = true;
#else
constexpr bool kVnni = false;
#endif
inline bool& vnni_on() {
  static bool on = kVnni;
  return on;
}

// f(std::true_type{}) where the VNNI products run, else f(std::false_type{}): kernels take it as a template flag.
template <typename F>
inline void with_vnni(F&& f) {
  if (kVnni && vnni_on()) return f(std::integral_constant<bool, kVnni>{});
  f(std::false_type{});
}


#ifdef LEANGPT_AVX2

inline __m256 hsum8(const __m256* a) {  // lane i: the sum of a[i]'s lanes
  const __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20), _mm256_permute2f128_ps(h0, h1, 0x31));
}

inline __m128 hsum4(const __m256* a) {  // lane i: the sum of a[i]'s lanes
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

inline float hsum(__m256 a) {  // the sum of a's lanes
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  h = _mm_hadd_ps(h, h);
  return _mm_cvtss_f32(_mm_hadd_ps(h, h));
}

inline __m256 int8x8(const int8_t* p) {  // eight int8 weights as eight floats
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// The 32 int4 weights of 16 packed bytes as four vectors of 8 consecutive inputs (0-7, 8-15, 16-23, 24-31). The
// 16 bytes sit in both 128-bit lanes; an in-lane byte shuffle puts byte j (0..7, then 8..15) in the low byte of
// 32-bit lane j, whose low nibble is input j and whose value >> 4 is input j + 16.
inline void int4x32(const uint8_t* p, __m256* w) {
  const __m256i first = _mm256_setr_epi8(0, -1, -1, -1, 1, -1, -1, -1, 2, -1, -1, -1, 3, -1, -1, -1,
                                         4, -1, -1, -1, 5, -1, -1, -1, 6, -1, -1, -1, 7, -1, -1, -1);
  const __m256i second = _mm256_add_epi32(first, _mm256_set1_epi32(8));
  const __m256i low4 = _mm256_set1_epi32(0x0F);
  const __m256i bytes = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i d0 = _mm256_shuffle_epi8(bytes, first), d1 = _mm256_shuffle_epi8(bytes, second);
  w[0] = _mm256_cvtepi32_ps(_mm256_and_si256(d0, low4));
  w[1] = _mm256_cvtepi32_ps(_mm256_and_si256(d1, low4));
  w[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(d0, 4));
  w[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(d1, 4));
}

// e^x of eight lanes (Cephes' expf: 2^n times a polynomial of the remainder; about 1 ulp), for x <= 0.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));  // e^x underflows below; this keeps 2^n a normal float
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // x - n ln 2, in two parts
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.f));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}
#endif

// y[n0:n1] of one input row for float weights, n1 - n0 <= kFloatBlock
inline void float_rows(const float* x, const float* w, float* y, int64_t K, int64_t n0, int64_t n1) {
#ifdef LEANGPT_AVX2
  if (n1 - n0 == kFloatBlock && K % 8 == 0) {
    const float* r = w + n0 * K;
    __m256 acc[kFloatBlock];
    for (int i = 0; i < kFloatBlock; ++i) acc[i] = _mm256_setzero_ps();
    const float* next = r + kFloatBlock * K;  // the next block's rows, fetched while this one computes
    for (int64_t k = 0; k < K; k += 8) {
      const __m256 xv = _mm256_loadu_ps(x + k);
      if (k % 16 == 0)
        for (int i = 0; i < kFloatBlock; ++i) _mm_prefetch(reinterpret_cast<const char*>(next + i * K + k), _MM_HINT_T0);
      for (int i = 0; i < kFloatBlock; ++i) acc[i] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(r + i * K + k), acc[i]);
    }
    _mm256_storeu_ps(y + n0, hsum8(acc));
    return;
  }
#endif
  for (int64_t n = n0; n < n1; ++n) {
    const float* r = w + n * K;
    float a = 0.f;
    for (int64_t k = 0; k < K; ++k) a += x[k] * r[k];
    y[n] = a;
  }
}


// y[n0:n1] of one input row for int8, n1 - n0 <= kInt8Block
inline void int8_rows(const float* x, const int8_t* q, const float* scales, float* y, int64_t K, int64_t n0,
                      int64_t n1) {
#ifdef LEANGPT_AVX2
  if (n1 - n0 == kInt8Block && K % 8 == 0) {
    const int8_t* w = q + n0 * K;
    __m256 acc[kInt8Block];
    for (int i = 0; i < kInt8Block; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {
      const __m256 xv = _mm256_loadu_ps(x + k);
      for (int i = 0; i < kInt8Block; ++i) acc[i] = _mm256_fmadd_ps(xv, int8x8(w + i * K + k), acc[i]);
    }
    _mm256_storeu_ps(y + n0, _mm256_mul_ps(hsum8(acc), _mm256_loadu_ps(scales + n0)));
    return;
  }
#endif
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* w = q + n * K;
    float a = 0.f;
    for (int64_t k = 0; k < K; ++k) a += x[k] * static_cast<float>(w[k]);
    y[n] = a * scales[n];
  }
}

#ifdef LEANGPT_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }  // eight weights as floats
inline __m256 load8(const int8_t* p) { return int8x8(p); }
#endif

// y[m * ldy + n] = Σ_k x[m, k] w[n, k] (times scales[n], if given) for Mr input rows m (ldx apart) and the
// output rows n0:n1, n1 - n0 <= 2, for float or int8 weights: each weight vector is loaded and converted once for
// all Mr rows (the one-row kernels above convert it once per row).
template <int Mr, typename T>
inline void rows_m(const float* x, int64_t ldx, const T* w, const float* scales, float* y, int64_t K,
                   int64_t ldy, int64_t n0, int64_t n1) {
#ifdef LEANGPT_AVX2
  if (n1 - n0 == 2 && K % 8 == 0) {
    const T *w0 = w + n0 * K, *w1 = w0 + K;
    __m256 a0[Mr], a1[Mr];
    for (int m = 0; m < Mr; ++m) a0[m] = a1[m] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {
      if (k % (64 / sizeof(T)) == 0) {  // the next two rows, fetched while these compute (the first input rows
        _mm_prefetch(reinterpret_cast<const char*>(w0 + 2 * K + k), _MM_HINT_T0);  // stream them from memory)
        _mm_prefetch(reinterpret_cast<const char*>(w1 + 2 * K + k), _MM_HINT_T0);
      }
      const __m256 v0 = load8(w0 + k), v1 = load8(w1 + k);
      for (int m = 0; m < Mr; ++m) {
        const __m256 xv = _mm256_loadu_ps(x + m * ldx + k);
        a0[m] = _mm256_fmadd_ps(xv, v0, a0[m]);
        a1[m] = _mm256_fmadd_ps(xv, v1, a1[m]);
      }
    }
    for (int m = 0; m < Mr; ++m) {
      y[m * ldy + n0] = hsum(a0[m]) * (scales ? scales[n0] : 1.f);
      y[m * ldy + n0 + 1] = hsum(a1[m]) * (scales ? scales[n0 + 1] : 1.f);
    }
    return;
  }
#endif
  for (int m = 0; m < Mr; ++m)
    for (int64_t n = n0; n < n1; ++n) {
      float a = 0.f;
      for (int64_t k = 0; k < K; ++k) a += x[m * ldx + k] * static_cast<float>(w[n * K + k]);
      y[m * ldy + n] = a * (scales ? scales[n] : 1.f);
    }
}

// Σ_k x[k] q[n, k] scales[n, g] for the output rows n0:n1 (n1 - n0 <= kInt4Block) of one input row, into
// out[0 : n1 - n0]; the zero points are applied by the caller. p: row n0's packed bytes, scales: row n0's.
inline void int4_rows(const float* x, const uint8_t* p, const float* scales, float* out, int64_t K, int64_t G,
                      int64_t n0, int64_t n1) {
  const int64_t gs = K / G, half = K / 2;
#ifdef LEANGPT_AVX2
  if (n1 - n0 == kInt4Block) {
    __m256 sum[kInt4Block], acc[kInt4Block], w[4];
    for (int i = 0; i < kInt4Block; ++i) sum[i] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      for (int i = 0; i < kInt4Block; ++i) acc[i] = _mm256_setzero_ps();
      for (int64_t b = g * gs; b < (g + 1) * gs; b += 32) {
        const __m256 x0 = _mm256_loadu_ps(x + b), x1 = _mm256_loadu_ps(x + b + 8);
        const __m256 x2 = _mm256_loadu_ps(x + b + 16), x3 = _mm256_loadu_ps(x + b + 24);
        for (int i = 0; i < kInt4Block; ++i) {
          int4x32(p + i * half + b / 2, w);
          acc[i] = _mm256_fmadd_ps(x0, w[0], acc[i]);
          acc[i] = _mm256_fmadd_ps(x1, w[1], acc[i]);
          acc[i] = _mm256_fmadd_ps(x2, w[2], acc[i]);
          acc[i] = _mm256_fmadd_ps(x3, w[3], acc[i]);
        }
      }
      for (int i = 0; i < kInt4Block; ++i) sum[i] = _mm256_fmadd_ps(acc[i], _mm256_set1_ps(scales[i * G + g]), sum[i]);
    }
    _mm_storeu_ps(out, hsum4(sum));
    return;
  }
#endif
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p + (n - n0) * half;
    float total = 0.f;
    for (int64_t g = 0; g < G; ++g) {
      float acc = 0.f;
      for (int64_t b = g * gs; b < (g + 1) * gs; b += 32)
        for (int64_t j = 0; j < 16; ++j) {
          const uint8_t byte = row[b / 2 + j];
          acc += x[b + j] * static_cast<float>(byte & 15) + x[b + 16 + j] * static_cast<float>(byte >> 4);
        }
      total += acc * scales[(n - n0) * G + g];
    }
    out[n - n0] = total;
  }
}

// out[m * ldo] = Σ_k x[m, k] q[k] scales[g] for Mr input rows m (x: Mr rows of K, ldx apart) and one output row
// (p, scales: its packed bytes and G scales), for int4: each weight vector is unpacked once for all Mr rows. The
// zero points are applied by the caller.
template <int Mr>
inline void int4_rows_m(const float* x, int64_t ldx, const uint8_t* p, const float* scales, float* out, int64_t K,
                        int64_t G, int64_t ldo) {
#ifdef LEANGPT_AVX2
  const int64_t gs = K / G;
  __m256 sum[Mr], acc[Mr], w[4];
  for (int m = 0; m < Mr; ++m) sum[m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    for (int m = 0; m < Mr; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t b = g * gs; b < (g + 1) * gs; b += 32) {
      if (b % 128 == 0) _mm_prefetch(reinterpret_cast<const char*>(p + K / 2 + b / 2), _MM_HINT_T0);  // the next row
      int4x32(p + b / 2, w);
      for (int m = 0; m < Mr; ++m) {
        const float* xm = x + m * ldx + b;
        acc[m] = _mm256_fmadd_ps(_mm256_loadu_ps(xm), w[0], acc[m]);
        acc[m] = _mm256_fmadd_ps(_mm256_loadu_ps(xm + 8), w[1], acc[m]);
        acc[m] = _mm256_fmadd_ps(_mm256_loadu_ps(xm + 16), w[2], acc[m]);
        acc[m] = _mm256_fmadd_ps(_mm256_loadu_ps(xm + 24), w[3], acc[m]);
      }
    }
    const __m256 scale = _mm256_set1_ps(scales[g]);
    for (int m = 0; m < Mr; ++m) sum[m] = _mm256_fmadd_ps(acc[m], scale, sum[m]);
  }
  for (int m = 0; m < Mr; ++m) out[m * ldo] = hsum(sum[m]);
#else
  for (int m = 0; m < Mr; ++m) int4_rows(x + m * ldx, p, scales, out + m * ldo, K, G, 0, 1);
#endif
}

// int8 activations of int4 layers (a8: leangpt.quant.formats.round_activations). Each group g of an input row
// is rounded to q = round(x / s[g]) (ties to even), s[g] = max |x| / 127 over the group (1 for a zero group), and
// the product is integer within a group: Σ_g scales[n, g] s[g] Σ_k q4[n, k] q[k], the zero points applied by the
// caller from sums[g] = s[g] Σ_k q[k]. The integers are stored in the order the product reads them: in each whole
// 64 inputs, 0-15, 32-47, 16-31, 48-63 (the low, then the high nibbles of 32 packed bytes); a last 32 stays as is.
inline int64_t a8_position(int64_t k, int64_t K) {  // where input k's integer is stored
  const int64_t c = k / 64 * 64, r = k % 64;
  if (c + 64 > K || r < 16 || r >= 48) return k;
  return c + (r < 32 ? r + 16 : r - 16);
}

// The largest |x| of x[0:n].
inline float absmax(const float* x, int64_t n) {
  float top = 0.f;
  int64_t i = 0;
#ifdef LEANGPT_AVX2
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 vtop = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) vtop = _mm256_max_ps(vtop, _mm256_and_ps(_mm256_loadu_ps(x + i), abs_mask));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(vtop), _mm256_extractf128_ps(vtop, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  top = _mm_cvtss_f32(_mm_max_ss(h, _mm_shuffle_ps(h, h, 1)));
#endif
  for (; i < n; ++i) top = std::max(top, std::fabs(x[i]));
  return top;
}

#ifdef LEANGPT_AVX2
// x[0:32] / scale rounded (ties to even) as 32 bytes in input order; the rounded values are added to vsum.
inline __m256i round32(const float* x, __m256 scale, __m256& vsum) {
  __m256i i32[4];
  for (int j = 0; j < 4; ++j) {
    const __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + 8 * j), scale),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    vsum = _mm256_add_ps(vsum, r);
    i32[j] = _mm256_cvtps_epi32(r);
  }
  // packs work within 128-bit lanes: the permutation puts the 32 bytes back in input order
  return _mm256_permutevar8x32_epi32(
      _mm256_packs_epi16(_mm256_packs_epi32(i32[0], i32[1]), _mm256_packs_epi32(i32[2], i32[3])),
      _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}
#endif

// Rounds one input row x[0:K] (K a multiple of 32, groups of K / G inputs) as above: q (K, in the product's
// order), s and sums (G).
inline void round_activations(const float* x, int64_t K, int64_t G, int8_t* q, float* s, float* sums) {
  const int64_t gs = K / G;
  for (int64_t g = 0; g < G; ++g) {
    const float* xg = x + g * gs;
    const float top = absmax(xg, gs), scale = top > 0.f ? top / 127.f : 1.f;
    float total = 0.f;
    int64_t k = 0;
#ifdef LEANGPT_AVX2
    const __m256 vs = _mm256_set1_ps(scale);
    __m256 vsum = _mm256_setzero_ps();
    for (; k + 32 <= gs; k += 32) {
      const __m256i bytes = round32(xg + k, vs, vsum);
      const int64_t at = g * gs + k;  // 16 inputs each side stay together in the product's order
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + a8_position(at, K)), _mm256_castsi256_si128(bytes));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + a8_position(at + 16, K)), _mm256_extracti128_si256(bytes, 1));
    }
    total = hsum(vsum);
#endif
    for (; k < gs; ++k) {
      const float r = std::nearbyint(xg[k] / scale);  // the default rounding mode: ties to even, as torch.round
      q[a8_position(g * gs + k, K)] = static_cast<int8_t>(r);
      total += r;
    }
    s[g] = scale, sums[g] = total * scale;
  }
}

#ifdef LEANGPT_AVX2
// The integer dots of 32 packed bytes (64 nibbles: 0-15 and 32-47 low, 16-31 and 48-63 high) with a8 inputs xa
// (their order's first 32) and xb, as floats: lanes 0-3 sum inputs 0-31, lanes 4-7 inputs 32-63.
// VNNI: two byte dot products straight into 32 bits.
template <bool Vnni>
inline __m256 int4_a8_dots(__m256i lo, __m256i hi, __m256i xa, __m256i xb) {
#ifdef LEANGPT_VNNI
  if constexpr (Vnni) return _mm256_cvtepi32_ps(LEANGPT_DPBUSD(LEANGPT_DPBUSD(_mm256_setzero_si256(), lo, xa), hi, xb));
#endif
  const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xa), _mm256_maddubs_epi16(hi, xb));
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

inline void nibbles(const uint8_t* p, __m256i& lo, __m256i& hi) {  // 32 packed bytes' low and high nibbles
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  lo = _mm256_and_si256(bytes, low4), hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4);
}

template <bool Vnni>
inline __m256 int4_a8_dots(const uint8_t* p, __m256i xa, __m256i xb) {  // from the packed bytes
  __m256i lo, hi;
  nibbles(p, lo, hi);
  return int4_a8_dots<Vnni>(lo, hi, xa, xb);
}

// Two floats of a 64-input step as lanes 0-3 and 4-7: one of group g0's, one of g1's (the same group from 64
// inputs a group on).
inline __m256 halves(const float* v, int64_t g0, int64_t g1) {
  return g0 == g1 ? _mm256_broadcast_ss(v + g0) : _mm256_set_m128(_mm_broadcast_ss(v + g1), _mm_broadcast_ss(v + g0));
}

// The integer dot of a last 32 inputs (16 packed bytes) times its two scales, by 128-bit vectors.
template <bool Vnni>
inline float int4_a8_tail(const int8_t* q, float xs, const uint8_t* p, float ws) {
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i lo = _mm_and_si128(bytes, low4), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);
  const __m128i xa = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  const __m128i xb = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16));
  __m128i d;
#ifdef LEANGPT_VNNI
  if constexpr (Vnni) d = LEANGPT_DPBUSD128(LEANGPT_DPBUSD128(_mm_setzero_si128(), lo, xa), hi, xb);
  else
#endif
    d = _mm_madd_epi16(_mm_add_epi16(_mm_maddubs_epi16(lo, xa), _mm_maddubs_epi16(hi, xb)), _mm_set1_epi16(1));
  d = _mm_add_epi32(d, _mm_shuffle_epi32(d, 0x4E));
  d = _mm_add_epi32(d, _mm_shuffle_epi32(d, 0xB1));
  return static_cast<float>(_mm_cvtsi128_si32(d)) * xs * ws;
}
#endif

// Σ_g scales[n, g] s[g] Σ_k q4[n, k] q[k] for the output rows n0:n1 (n1 - n0 <= kInt4Block) of one a8 input row
// (q, s: from round_activations), into out[0 : n1 - n0]. p, scales: row n0's packed bytes and scales. Unsigned
// nibbles times signed bytes by maddubs (pairs of products, at most 2 · 15 · 127 each: no saturation) or VNNI,
// summed as 32-bit integers for each 32 inputs, then scaled as floats.
template <bool Vnni>
inline void int4_a8_rows(const int8_t* q, const float* s, const uint8_t* p, const float* scales, float* out,
                         int64_t K, int64_t G, int64_t n0, int64_t n1) {
  const int64_t gs = K / G, half = K / 2;
#ifdef LEANGPT_AVX2
  if (n1 - n0 == kInt4Block) {
    __m256 sum[kInt4Block];
    for (int i = 0; i < kInt4Block; ++i) sum[i] = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 64 <= K; b += 64) {  // lanes 0-3: inputs b..b+31 (group g0), lanes 4-7: b+32..b+63 (group g1)
      const int64_t g0 = b / gs, g1 = (b + 32) / gs;
      const __m256i xa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + b));
      const __m256i xb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + b + 32));
      const __m256 xs = halves(s, g0, g1);
      for (int i = 0; i < kInt4Block; ++i) {
        const __m256 dots = _mm256_mul_ps(int4_a8_dots<Vnni>(p + i * half + b / 2, xa, xb), xs);
        sum[i] = _mm256_fmadd_ps(dots, halves(scales + i * G, g0, g1), sum[i]);
      }
    }
    _mm_storeu_ps(out, hsum4(sum));
    if (b < K)  // a last 32 inputs
      for (int i = 0; i < kInt4Block; ++i)
        out[i] += int4_a8_tail<Vnni>(q + b, s[b / gs], p + i * half + b / 2, scales[i * G + b / gs]);
    return;
  }
#endif
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p + (n - n0) * half;
    float total = 0.f;
    for (int64_t g = 0; g < G; ++g) {
      int32_t acc = 0;
      for (int64_t k = g * gs; k < (g + 1) * gs; ++k) {
        const uint8_t byte = row[k / 32 * 16 + k % 16];
        acc += static_cast<int32_t>(k % 32 < 16 ? byte & 15 : byte >> 4) * q[a8_position(k, K)];
      }
      total += static_cast<float>(acc) * s[g] * scales[(n - n0) * G + g];
    }
    out[n - n0] = total;
  }
}

// out[m * ldo] = Σ_g scales[g] s[m, g] Σ_k q4[k] q[m, k] for Mr a8 input rows m (q: Mr rows of K, s: Mr rows of G,
// from round_activations) and one output row (p, scales: its packed bytes and G scales): each weight vector is
// unpacked once for all Mr rows. The zero points are applied by the caller.
template <int Mr, bool Vnni>
inline void int4_a8_rows_m(const int8_t* q, const float* s, const uint8_t* p, const float* scales, float* out,
                           int64_t K, int64_t G, int64_t ldo) {
#ifdef LEANGPT_AVX2
  const int64_t gs = K / G;
  __m256 sum[Mr];
  for (int m = 0; m < Mr; ++m) sum[m] = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 64 <= K; b += 64) {
    const int64_t g0 = b / gs, g1 = (b + 32) / gs;
    __m256i lo, hi;
    nibbles(p + b / 2, lo, hi);
    const __m256 sw = halves(scales, g0, g1);
    for (int m = 0; m < Mr; ++m) {
      const __m256i xa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + m * K + b));
      const __m256i xb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + m * K + b + 32));
      const __m256 dots = _mm256_mul_ps(int4_a8_dots<Vnni>(lo, hi, xa, xb), halves(s + m * G, g0, g1));
      sum[m] = _mm256_fmadd_ps(dots, sw, sum[m]);
    }
  }
  for (int m = 0; m < Mr; ++m) out[m * ldo] = hsum(sum[m]);
  if (b < K)  // a last 32 inputs
    for (int m = 0; m < Mr; ++m)
      out[m * ldo] += int4_a8_tail<Vnni>(q + m * K + b, s[m * G + b / gs], p + b / 2, scales[b / gs]);
#else
  for (int m = 0; m < Mr; ++m) int4_a8_rows<Vnni>(q + m * K, s + m * G, p, scales, out + m * ldo, K, G, 0, 1);
#endif
}

// int8 activations of int8 layers (int8-a8): a whole input row x[0:K] is rounded to q = round(x / s) (ties to
// even), s = max |x| / 127 (1 for a zero row), in input order; one scale a row, as torchao's and SmoothQuant's
// dynamic per-token int8 do. Returns s; *sum32 = Σ q over the whole 32s of inputs (the offset that VNNI's
// unsigned products take off).
inline float round_row(const float* x, int64_t K, int8_t* q, int32_t* sum32) {
  const float top = absmax(x, K), scale = top > 0.f ? top / 127.f : 1.f;
  int64_t k = 0;
#ifdef LEANGPT_AVX2
  const __m256 vs = _mm256_set1_ps(scale);
  __m256 vsum = _mm256_setzero_ps();
  for (; k + 32 <= K; k += 32) _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k), round32(x + k, vs, vsum));
  *sum32 = static_cast<int32_t>(hsum(vsum));  // integers: exact in float while 127 K < 2^24
#else
  *sum32 = 0;  // only VNNI's products read it
#endif
  for (; k < K; ++k) q[k] = static_cast<int8_t>(std::nearbyint(x[k] / scale));
  return scale;
}

#ifdef LEANGPT_AVX2
inline __m256i load32(const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// acc + Σ w x of signed bytes, four a 32-bit lane. AVX2: maddubs of |x| (unsigned) and w with x's sign (pairs of
// at most 2 · 127 · 127: no saturation). VNNI: w ^ 0x80 = w + 128 as unsigned bytes (wu, flipped once by the
// caller for every row that reads it), so it adds Σ (w + 128) x: the caller takes 128 Σ x off.
template <bool Vnni>
inline __m256i dot_i8(__m256i acc, __m256i w, __m256i x) {
#ifdef LEANGPT_VNNI
  if constexpr (Vnni) return LEANGPT_DPBUSD(acc, w, x);
#endif
  const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(w, x));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

template <bool Vnni>
inline __m256i weights_i8(const int8_t* p) {  // 32 weights as dot_i8 takes them
  const __m256i w = load32(p);
  return Vnni ? _mm256_xor_si256(w, _mm256_set1_epi8(static_cast<char>(0x80))) : w;
}

inline __m256i hsum8_i32(const __m256i* a) {  // lane i: the sum of a[i]'s lanes (as hsum8)
  const __m256i h0 = _mm256_hadd_epi32(_mm256_hadd_epi32(a[0], a[1]), _mm256_hadd_epi32(a[2], a[3]));
  const __m256i h1 = _mm256_hadd_epi32(_mm256_hadd_epi32(a[4], a[5]), _mm256_hadd_epi32(a[6], a[7]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(h0, h1, 0x20), _mm256_permute2x128_si256(h0, h1, 0x31));
}
#endif

// y[n0:n1] = scales[n] · s · Σ_k q[n, k] xq[k] for one int8-a8 input row (xq, s, sum32: from round_row) and the
// outputs n0:n1 (n1 - n0 <= kInt8Block) of an int8 layer: 32-bit integer sums over the whole row, then one
// conversion; inputs past the whole 32s by scalar code.
template <bool Vnni>
inline void int8_a8_rows(const int8_t* xq, float s, int32_t sum32, const int8_t* q, const float* scales, float* y,
                         int64_t K, int64_t n0, int64_t n1) {
  int32_t dots[kInt8Block] = {};
  int64_t done = 0;  // inputs the vector code summed
#ifdef LEANGPT_AVX2
  if (n1 - n0 == kInt8Block) {
    const int8_t* w = q + n0 * K;
    __m256i acc[kInt8Block];
    for (int i = 0; i < kInt8Block; ++i) acc[i] = _mm256_setzero_si256();
    for (; done + 32 <= K; done += 32) {
      const __m256i x = load32(xq + done);
      for (int i = 0; i < kInt8Block; ++i) acc[i] = dot_i8<Vnni>(acc[i], weights_i8<Vnni>(w + i * K + done), x);
    }
    const __m256i d = _mm256_sub_epi32(hsum8_i32(acc), _mm256_set1_epi32(Vnni ? 128 * sum32 : 0));
    if (done == K) {  // no inputs left: the eight outputs at once
      const __m256 scaled = _mm256_mul_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(s));
      _mm256_storeu_ps(y + n0, _mm256_mul_ps(scaled, _mm256_loadu_ps(scales + n0)));
      return;
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dots), d);
  }
#endif
  for (int64_t n = n0; n < n1; ++n) {
    int32_t d = dots[n - n0];
    for (int64_t k = done; k < K; ++k) d += static_cast<int32_t>(q[n * K + k]) * xq[k];
    y[n] = static_cast<float>(d) * s * scales[n];
  }
}

// y[m * ldy + n] as int8_a8_rows for Mr input rows m (xq: Mr rows, ldq apart; s, sum32: Mr each) and the outputs
// n0:n1, n1 - n0 <= 2: each weight vector is loaded once for all Mr rows.
template <int Mr, bool Vnni>
inline void int8_a8_rows_m(const int8_t* xq, int64_t ldq, const float* s, const int32_t* sum32, const int8_t* q,
                           const float* scales, float* y, int64_t K, int64_t ldy, int64_t n0, int64_t n1) {
  int32_t dots[Mr][2] = {};
  int64_t done = 0;
#ifdef LEANGPT_AVX2
  if (n1 - n0 == 2) {
    static_assert(Mr <= 4, "one reduction of 2 * Mr accumulators");
    const int8_t *w0 = q + n0 * K, *w1 = w0 + K;
    __m256i acc[8];  // acc[2 m + j]: input row m, output n0 + j
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_si256();
    for (; done + 32 <= K; done += 32) {
      if (done % 64 == 0) {  // the next two rows, fetched while these compute
        _mm_prefetch(reinterpret_cast<const char*>(w0 + 2 * K + done), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(w1 + 2 * K + done), _MM_HINT_T0);
      }
      const __m256i v0 = weights_i8<Vnni>(w0 + done), v1 = weights_i8<Vnni>(w1 + done);
      for (int m = 0; m < Mr; ++m) {
        const __m256i x = load32(xq + m * ldq + done);
        acc[2 * m] = dot_i8<Vnni>(acc[2 * m], v0, x);
        acc[2 * m + 1] = dot_i8<Vnni>(acc[2 * m + 1], v1, x);
      }
    }
    alignas(32) int32_t d[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(d), hsum8_i32(acc));
    for (int m = 0; m < Mr; ++m)
      for (int j = 0; j < 2; ++j) dots[m][j] = d[2 * m + j] - (Vnni ? 128 * sum32[m] : 0);
  }
#endif
  for (int m = 0; m < Mr; ++m)
    for (int64_t n = n0; n < n1; ++n) {
      int32_t d = dots[m][n - n0];
      for (int64_t k = done; k < K; ++k) d += static_cast<int32_t>(q[n * K + k]) * xq[m * ldq + k];
      y[m * ldy + n] = static_cast<float>(d) * s[m] * scales[n];
    }
}

// w[(n - n0) * K + k] = W[n, k] for the rows n0:n1 of an int8 layer.
inline void int8_dequant_rows(const int8_t* q, const float* scales, float* w, int64_t K, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* r = q + n * K;
    float* out = w + (n - n0) * K;
    int64_t k = 0;
#ifdef LEANGPT_AVX2
    const __m256 scale = _mm256_set1_ps(scales[n]);
    for (; k + 8 <= K; k += 8) _mm256_storeu_ps(out + k, _mm256_mul_ps(int8x8(r + k), scale));
#endif
    for (; k < K; ++k) out[k] = static_cast<float>(r[k]) * scales[n];
  }
}

// w[(n - n0) * K + k] = W[n, k] for the rows n0:n1 of an int4 layer (packed, scales and szeros: row 0's).
inline void int4_dequant_rows(const uint8_t* packed, const float* scales, const float* szeros, float* w, int64_t K,
                              int64_t G, int64_t n0, int64_t n1) {
  const int64_t gs = K / G;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* r = packed + n * (K / 2);
    float* out = w + (n - n0) * K;
    for (int64_t b = 0; b < K; b += 32) {
      const float scale = scales[n * G + b / gs], szero = szeros[n * G + b / gs];
#ifdef LEANGPT_AVX2
      __m256 v[4];
      int4x32(r + b / 2, v);
      for (int i = 0; i < 4; ++i)
        _mm256_storeu_ps(out + b + 8 * i, _mm256_fmsub_ps(v[i], _mm256_set1_ps(scale), _mm256_set1_ps(szero)));
#else
      for (int64_t j = 0; j < 16; ++j) {
        out[b + j] = static_cast<float>(r[b / 2 + j] & 15) * scale - szero;
        out[b + 16 + j] = static_cast<float>(r[b / 2 + j] >> 4) * scale - szero;
      }
#endif
    }
  }
}

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t k = 0;
  float total = 0.f;
#ifdef LEANGPT_AVX2
  __m256 acc = _mm256_setzero_ps();
  for (; k + 8 <= n; k += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc);
  total = hsum(acc);
#endif
  for (; k < n; ++k) total += a[k] * b[k];
  return total;
}

}  // namespace leangpt
