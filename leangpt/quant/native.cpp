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

#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LEANGPT_AVX2 1
#endif

namespace {

// Output rows computed together: each input vector is loaded once for all of them, and their independent
// accumulators hide the latency of the multiply-adds.
constexpr int64_t kInt8Block = 8, kInt4Block = 4;
constexpr int64_t kWorkPerTask = 16384;  // weights per parallel task: small layers stay on one thread

void check_inputs(const at::Tensor& x, const at::Tensor& w, int64_t k_of_w) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous float (M, K)");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "the weight must be contiguous (N, ...)");
  TORCH_CHECK(x.size(1) == k_of_w, "x has ", x.size(1), " inputs, the weight ", k_of_w);
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

inline __m256 int8x8(const int8_t* p) {  // eight int8 weights as eight floats
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

#endif

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

// Σ_k x[k] q[n, k] scales[n, g] for the output rows n0:n1 (n1 - n0 <= kInt4Block) of one input row, into
// out[0 : n1 - n0]; the zero points are applied by the caller. p: row n0's packed bytes, scales: row n0's.
inline void int4_rows(const float* x, const uint8_t* p, const float* scales, float* out, int64_t K, int64_t G,
                      int64_t n0, int64_t n1) {
  const int64_t gs = K / G, half = K / 2;
#ifdef LEANGPT_AVX2
  if (n1 - n0 == kInt4Block) {
    // The 16 bytes of 32 inputs sit in both 128-bit lanes; an in-lane byte shuffle puts byte j (0..7, then 8..15)
    // in the low byte of 32-bit lane j, whose low nibble is input j and whose value >> 4 is input j + 16.
    const __m256i first = _mm256_setr_epi8(0, -1, -1, -1, 1, -1, -1, -1, 2, -1, -1, -1, 3, -1, -1, -1,
                                           4, -1, -1, -1, 5, -1, -1, -1, 6, -1, -1, -1, 7, -1, -1, -1);
    const __m256i second = _mm256_add_epi32(first, _mm256_set1_epi32(8));
    const __m256i low4 = _mm256_set1_epi32(0x0F);
    __m256 sum[kInt4Block], acc[kInt4Block];
    for (int i = 0; i < kInt4Block; ++i) sum[i] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      for (int i = 0; i < kInt4Block; ++i) acc[i] = _mm256_setzero_ps();
      for (int64_t b = g * gs; b < (g + 1) * gs; b += 32) {
        const __m256 x0 = _mm256_loadu_ps(x + b), x1 = _mm256_loadu_ps(x + b + 8);
        const __m256 x2 = _mm256_loadu_ps(x + b + 16), x3 = _mm256_loadu_ps(x + b + 24);
        for (int i = 0; i < kInt4Block; ++i) {
          const __m256i bytes =
              _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i * half + b / 2)));
          const __m256i d0 = _mm256_shuffle_epi8(bytes, first), d1 = _mm256_shuffle_epi8(bytes, second);
          acc[i] = _mm256_fmadd_ps(x0, _mm256_cvtepi32_ps(_mm256_and_si256(d0, low4)), acc[i]);
          acc[i] = _mm256_fmadd_ps(x1, _mm256_cvtepi32_ps(_mm256_and_si256(d1, low4)), acc[i]);
          acc[i] = _mm256_fmadd_ps(x2, _mm256_cvtepi32_ps(_mm256_srli_epi32(d0, 4)), acc[i]);
          acc[i] = _mm256_fmadd_ps(x3, _mm256_cvtepi32_ps(_mm256_srli_epi32(d1, 4)), acc[i]);
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

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales) {
  check_inputs(x, q, q.size(1));
  TORCH_CHECK(q.scalar_type() == at::kChar && scales.scalar_type() == at::kFloat && scales.numel() == q.size(0),
              "int8_gemv needs int8 q (N, K) and float scales (N,)");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  auto y = at::empty({M, N}, x.options());
  const float *xp = x.data_ptr<float>(), *sp = scales.contiguous().data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  float* yp = y.data_ptr<float>();
  const int64_t blocks = (N + kInt8Block - 1) / kInt8Block;
  at::parallel_for(0, blocks, std::max<int64_t>(1, kWorkPerTask / (K * kInt8Block)), [&](int64_t b0, int64_t b1) {
    for (int64_t m = 0; m < M; ++m)  // this task's weights stay in cache from one row to the next
      for (int64_t b = b0; b < b1; ++b)
        int8_rows(xp + m * K, qp, sp, yp + m * N, K, b * kInt8Block, std::min(N, (b + 1) * kInt8Block));
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
  const float *xp = x.data_ptr<float>(), *sp = scales.data_ptr<float>(), *zp = szeros.data_ptr<float>();
  std::vector<float> xs(M * G, 0.f);  // Σ x per group, for the zero points
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xs[m * G + k / (K / G)] += xp[m * K + k];
  auto y = at::empty({M, N}, x.options());
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  const int64_t blocks = (N + kInt4Block - 1) / kInt4Block;
  at::parallel_for(0, blocks, std::max<int64_t>(1, 2 * kWorkPerTask / (K * kInt4Block)), [&](int64_t b0, int64_t b1) {
    float dots[kInt4Block];
    for (int64_t m = 0; m < M; ++m)
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t n0 = b * kInt4Block, n1 = std::min(N, n0 + kInt4Block);
        int4_rows(xp + m * K, pp + n0 * (K / 2), sp + n0 * G, dots, K, G, n0, n1);
        for (int64_t n = n0; n < n1; ++n) {
          float zero_term = 0.f;
          for (int64_t g = 0; g < G; ++g) zero_term += zp[n * G + g] * xs[m * G + g];
          yp[m * N + n] = dots[n - n0] - zero_term;
        }
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
