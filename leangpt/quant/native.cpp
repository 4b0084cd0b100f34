// CPU kernels for weight-only int8 and int4 linear layers, built once per machine by leangpt/quant/native.py
// (with -O3 -march=native). Activations and accumulation stay float32, so each kernel equals
// dequantize-then-matmul up to float rounding.
//
// The one-to-eight-row products (decode, small batches) read each weight once per row at its stored width and
// convert it in registers: no float copy of the weight is made. Inductor's generated code for the same
// product loads 8 int8 as a partial vector, which AVX2 does through memory; here each load is a full one.
//
// Layouts (leangpt/quant/kernels.py packs them):
//   int8: q (N, K) int8, scales (N,) float: W[n, k] = q[n, k] * scales[n].
//   int4: packed (N, K/2) uint8 in blocks of 32 inputs; byte j of a block holds input j (low nibble) and input
//         j + 16 (high nibble). scales and szeros = scales * zero points (N, G), groups of K / G inputs (a
//         multiple of 32): W[n, k] = q[n, k] * scales[n, g] - szeros[n, g].

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LEANGPT_AVX2 1
#endif

namespace {

constexpr int64_t kOutBlock = 4;  // output rows computed together: each input vector is loaded once for four
constexpr int64_t kWorkPerTask = 16384;  // weights per parallel task: small layers stay on one thread

void check_inputs(const at::Tensor& x, const at::Tensor& w, int64_t k_of_w) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous float (M, K)");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "the weight must be contiguous (N, ...)");
  TORCH_CHECK(x.size(1) == k_of_w, "x has ", x.size(1), " inputs, the weight ", k_of_w);
}

#ifdef LEANGPT_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256 int8x8(const int8_t* p) {  // eight int8 weights as eight floats
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

inline __m256 nibbles8(__m128i bytes) {  // the low eight bytes (each 0..15) as eight floats
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
}
#endif

// y[n0:n1] of one input row for int8, n1 - n0 <= kOutBlock
inline void int8_rows(const float* x, const int8_t* q, const float* scales, float* y, int64_t K, int64_t n0,
                      int64_t n1) {
#ifdef LEANGPT_AVX2
  if (n1 - n0 == kOutBlock && K % 8 == 0) {
    const int8_t *w0 = q + n0 * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < K; k += 8) {
      const __m256 xv = _mm256_loadu_ps(x + k);
      a0 = _mm256_fmadd_ps(xv, int8x8(w0 + k), a0);
      a1 = _mm256_fmadd_ps(xv, int8x8(w1 + k), a1);
      a2 = _mm256_fmadd_ps(xv, int8x8(w2 + k), a2);
      a3 = _mm256_fmadd_ps(xv, int8x8(w3 + k), a3);
    }
    y[n0] = hsum(a0) * scales[n0], y[n0 + 1] = hsum(a1) * scales[n0 + 1];
    y[n0 + 2] = hsum(a2) * scales[n0 + 2], y[n0 + 3] = hsum(a3) * scales[n0 + 3];
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

// Σ_k x[k] q[n, k] * scales[n, g] over the groups of one output row (the zero points are applied by the caller)
float int4_row(const float* x, const uint8_t* p, const float* scales, int64_t G, int64_t gs) {
  float total = 0.f;
#ifdef LEANGPT_AVX2
  __m256 sum = _mm256_setzero_ps();
  const __m128i low4 = _mm_set1_epi8(0x0F);
  for (int64_t g = 0; g < G; ++g) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = g * gs; b < (g + 1) * gs; b += 32) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + b / 2));
      const __m128i lo = _mm_and_si128(bytes, low4), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + b), nibbles8(lo), acc);
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + b + 8), nibbles8(_mm_unpackhi_epi64(lo, lo)), acc);
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + b + 16), nibbles8(hi), acc);
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + b + 24), nibbles8(_mm_unpackhi_epi64(hi, hi)), acc);
    }
    sum = _mm256_fmadd_ps(acc, _mm256_set1_ps(scales[g]), sum);
  }
  total = hsum(sum);
#else
  for (int64_t g = 0; g < G; ++g) {
    float acc = 0.f;
    for (int64_t b = g * gs; b < (g + 1) * gs; b += 32)
      for (int64_t j = 0; j < 16; ++j) {
        const uint8_t byte = p[b / 2 + j];
        acc += x[b + j] * static_cast<float>(byte & 15) + x[b + 16 + j] * static_cast<float>(byte >> 4);
      }
    total += acc * scales[g];
  }
#endif
  return total;
}

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales) {
  check_inputs(x, q, q.size(1));
  TORCH_CHECK(q.scalar_type() == at::kChar && scales.scalar_type() == at::kFloat && scales.numel() == q.size(0),
              "int8_gemv needs int8 q (N, K) and float scales (N,)");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  auto y = at::empty({M, N}, x.options());
  const float *xp = x.data_ptr<float>(), *sp = scales.contiguous().data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  float* yp = y.data_ptr<float>();
  const int64_t blocks = (N + kOutBlock - 1) / kOutBlock;
  at::parallel_for(0, blocks, std::max<int64_t>(1, kWorkPerTask / (K * kOutBlock)), [&](int64_t b0, int64_t b1) {
    for (int64_t m = 0; m < M; ++m)  // this task's weights stay in cache from one row to the next
      for (int64_t b = b0; b < b1; ++b)
        int8_rows(xp + m * K, qp, sp, yp + m * N, K, b * kOutBlock, std::min(N, (b + 1) * kOutBlock));
  });
  return y;
}

at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                     const at::Tensor& szeros) {
  check_inputs(x, packed, packed.size(1) * 2);
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0), G = scales.size(1);
  TORCH_CHECK(packed.scalar_type() == at::kByte && scales.scalar_type() == at::kFloat &&
                  szeros.scalar_type() == at::kFloat && scales.sizes() == szeros.sizes() && scales.size(0) == N &&
                  G > 0 && K % G == 0 && (K / G) % 32 == 0 && scales.is_contiguous() && szeros.is_contiguous(),
              "int4_gemv needs packed uint8 (N, K/2), float scales and szeros (N, G), groups a multiple of 32");
  const int64_t gs = K / G;
  auto xsums = x.view({M, G, gs}).sum(-1).contiguous();  // Σ x per group, for the zero points
  auto y = at::empty({M, N}, x.options());
  const float *xp = x.data_ptr<float>(), *sp = scales.data_ptr<float>(), *zp = szeros.data_ptr<float>();
  const float* xs = xsums.data_ptr<float>();
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(1, kWorkPerTask / K), [&](int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = n0; n < n1; ++n) {
        float zero_term = 0.f;
        for (int64_t g = 0; g < G; ++g) zero_term += zp[n * G + g] * xs[m * G + g];
        yp[m * N + n] = int4_row(xp + m * K, pp + n * (K / 2), sp + n * G, G, gs) - zero_term;
      }
  });
  return y;
}

// The float (N, K) weights, for inputs of many rows (prefill, eval): dequantize once, then one matmul.
at::Tensor int8_dequant(const at::Tensor& q, const at::Tensor& scales) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous(), "q must be contiguous int8 (N, K)");
  const int64_t N = q.size(0), K = q.size(1);
  auto w = at::empty({N, K}, scales.options().dtype(at::kFloat));
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scales.contiguous().data_ptr<float>();
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(1, kWorkPerTask / K), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t k = 0; k < K; ++k) wp[n * K + k] = static_cast<float>(qp[n * K + k]) * sp[n];
  });
  return w;
}

at::Tensor int4_dequant(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& szeros) {
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "packed must be contiguous uint8 (N, K/2)");
  const int64_t N = packed.size(0), K = packed.size(1) * 2, G = scales.size(1), gs = K / G;
  TORCH_CHECK(K % G == 0 && gs % 32 == 0 && scales.sizes() == szeros.sizes(), "groups must be a multiple of 32");
  auto w = at::empty({N, K}, scales.options());
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const float *sp = scales.contiguous().data_ptr<float>(), *zp = szeros.contiguous().data_ptr<float>();
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(1, kWorkPerTask / K), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t b = 0; b < K; b += 32)
        for (int64_t j = 0; j < 16; ++j) {
          const uint8_t byte = pp[n * (K / 2) + b / 2 + j];
          const int64_t g = b / gs;
          wp[n * K + b + j] = static_cast<float>(byte & 15) * sp[n * G + g] - zp[n * G + g];
          wp[n * K + b + 16 + j] = static_cast<float>(byte >> 4) * sp[n * G + g] - zp[n * G + g];
        }
  });
  return w;
}

}  // namespace

TORCH_LIBRARY(leangpt_native, m) {
  m.def("int8_gemv(Tensor x, Tensor q, Tensor scales) -> Tensor");
  m.def("int4_gemv(Tensor x, Tensor packed, Tensor scales, Tensor szeros) -> Tensor");
  m.def("int8_dequant(Tensor q, Tensor scales) -> Tensor");
  m.def("int4_dequant(Tensor packed, Tensor scales, Tensor szeros) -> Tensor");
}

TORCH_LIBRARY_IMPL(leangpt_native, CPU, m) {
  m.impl("int8_gemv", &int8_gemv);
  m.impl("int4_gemv", &int4_gemv);
  m.impl("int8_dequant", &int8_dequant);
  m.impl("int4_dequant", &int4_dequant);
}
