// CPU operators for weight-only int8 and int4 linear layers, built once per machine by leangpt/quant/native.py
// (with -O3 -march=native): few-row products (decode, small batches) on the row kernels of native_rows.h,
// four input rows at a time, and dequantization for more rows. Each equals dequantize-then-matmul up to float
// rounding.
// No float copy of a weight is made for the products; inductor's generated code for the same product loads
// 8 int8 as a partial vector, which AVX2 does through memory, here each load is a full one.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "native_rows.h"

namespace {

using namespace leangpt;

constexpr int64_t kWorkPerTask = 16384;  // weights per parallel task: small layers stay on one thread

void check_inputs(const at::Tensor& x, const at::Tensor& w, int64_t k_of_w) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous float (M, K)");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "the weight must be contiguous (N, ...)");
  TORCH_CHECK(x.size(1) == k_of_w, "x has ", x.size(1), " inputs, the weight ", k_of_w);
}

void check_int8(const char* op, const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales) {
  check_inputs(x, q, q.size(1));
  TORCH_CHECK(q.scalar_type() == at::kChar && scales.scalar_type() == at::kFloat && scales.numel() == q.size(0),
              op, " needs int8 q (N, K) and float scales (N,)");
}

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales) {
  check_int8("int8_gemv", x, q, scales);
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  auto y = at::empty({M, N}, x.options());
  const float *xp = x.data_ptr<float>(), *sp = scales.contiguous().data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  float* yp = y.data_ptr<float>();
  const int64_t blocks = (N + kInt8Block - 1) / kInt8Block;
  at::parallel_for(0, blocks, std::max<int64_t>(1, kWorkPerTask / (K * kInt8Block)), [&](int64_t b0, int64_t b1) {
    const int64_t n0 = b0 * kInt8Block, n1 = std::min(N, b1 * kInt8Block);
    int64_t m = 0;  // four input rows at a time, then two, then one; this task's weights stay in cache
    for (; m + 4 <= M; m += 4)
      for (int64_t n = n0; n < n1; n += 2)
        rows_m<4>(xp + m * K, K, qp, sp, yp + m * N, K, N, n, std::min(n1, n + 2));
    for (; m + 2 <= M; m += 2)
      for (int64_t n = n0; n < n1; n += 2)
        rows_m<2>(xp + m * K, K, qp, sp, yp + m * N, K, N, n, std::min(n1, n + 2));
    for (; m < M; ++m)
      for (int64_t b = b0; b < b1; ++b)
        int8_rows(xp + m * K, qp, sp, yp + m * N, K, b * kInt8Block, std::min(N, (b + 1) * kInt8Block));
  });
  return y;
}

void check_int4(const char* op, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                const at::Tensor& szeros) {
  check_inputs(x, packed, packed.size(1) * 2);
  const int64_t K = x.size(1), G = scales.size(1);
  TORCH_CHECK(packed.scalar_type() == at::kByte && scales.scalar_type() == at::kFloat &&
                  szeros.scalar_type() == at::kFloat && scales.sizes() == szeros.sizes() &&
                  scales.size(0) == packed.size(0) && G > 0 && K % G == 0 && (K / G) % 32 == 0 &&
                  scales.is_contiguous() && szeros.is_contiguous(),
              op, " needs packed uint8 (N, K/2), float scales and szeros (N, G), groups a multiple of 32");
}

at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                     const at::Tensor& szeros) {
  check_int4("int4_gemv", x, packed, scales, szeros);
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0), G = scales.size(1);
  const float *xp = x.data_ptr<float>(), *sp = scales.data_ptr<float>(), *zp = szeros.data_ptr<float>();
  std::vector<float> xs(M * G, 0.f);  // Σ x per group, for the zero points
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xs[m * G + k / (K / G)] += xp[m * K + k];
  auto y = at::empty({M, N}, x.options());
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  const int64_t blocks = (N + kInt4Block - 1) / kInt4Block;
  at::parallel_for(0, blocks, std::max<int64_t>(1, 2 * kWorkPerTask / (K * kInt4Block)), [&](int64_t b0, int64_t b1) {
    const int64_t n0 = b0 * kInt4Block, n1 = std::min(N, b1 * kInt4Block), bytes = K / 2;
    int64_t m = 0;  // four input rows at a time, then two, then one; this task's weights stay in cache
    for (; m + 4 <= M; m += 4)
      for (int64_t n = n0; n < n1; ++n)
        int4_rows_m<4>(xp + m * K, K, pp + n * bytes, sp + n * G, yp + m * N + n, K, G, N);
    for (; m + 2 <= M; m += 2)
      for (int64_t n = n0; n < n1; ++n)
        int4_rows_m<2>(xp + m * K, K, pp + n * bytes, sp + n * G, yp + m * N + n, K, G, N);
    for (; m < M; ++m)
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r0 = b * kInt4Block, r1 = std::min(N, r0 + kInt4Block);
        int4_rows(xp + m * K, pp + r0 * bytes, sp + r0 * G, yp + m * N + r0, K, G, r0, r1);
      }
    for (m = 0; m < M; ++m)
      for (int64_t n = n0; n < n1; ++n) yp[m * N + n] -= dot(zp + n * G, xs.data() + m * G, G);
  });
  return y;
}

// int4_gemv with each input row rounded to int8 per group (an a8 scheme: native_rows.h, round_activations) and
// integer products. Rows already rounded (by leangpt.quant.formats.round_activations) round to themselves.
at::Tensor int4_a8_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                        const at::Tensor& szeros) {
  check_int4("int4_a8_gemv", x, packed, scales, szeros);
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0), G = scales.size(1);
  const float *xp = x.data_ptr<float>(), *sp = scales.data_ptr<float>(), *zp = szeros.data_ptr<float>();
  std::vector<int8_t> q(M * K);
  std::vector<float> xs(M * G), sums(M * G);
  for (int64_t m = 0; m < M; ++m)
    round_activations(xp + m * K, K, G, q.data() + m * K, xs.data() + m * G, sums.data() + m * G);
  auto y = at::empty({M, N}, x.options());
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  const int64_t blocks = (N + kInt4Block - 1) / kInt4Block;
  const int8_t* qp = q.data();
  const float* xsp = xs.data();
  at::parallel_for(0, blocks, std::max<int64_t>(1, 4 * kWorkPerTask / (K * kInt4Block)), [&](int64_t b0, int64_t b1) {
    const int64_t n0 = b0 * kInt4Block, n1 = std::min(N, b1 * kInt4Block), bytes = K / 2;
    with_vnni([&](auto vnni) {
      constexpr bool V = decltype(vnni)::value;
      int64_t m = 0;  // four input rows at a time, then two, then one; this task's weights stay in cache
      for (; m + 4 <= M; m += 4)
        for (int64_t n = n0; n < n1; ++n)
          int4_a8_rows_m<4, V>(qp + m * K, xsp + m * G, pp + n * bytes, sp + n * G, yp + m * N + n, K, G, N);
      for (; m + 2 <= M; m += 2)
        for (int64_t n = n0; n < n1; ++n)
          int4_a8_rows_m<2, V>(qp + m * K, xsp + m * G, pp + n * bytes, sp + n * G, yp + m * N + n, K, G, N);
      for (; m < M; ++m)
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t r0 = b * kInt4Block, r1 = std::min(N, r0 + kInt4Block);
          int4_a8_rows<V>(qp + m * K, xsp + m * G, pp + r0 * bytes, sp + r0 * G, yp + m * N + r0, K, G, r0, r1);
        }
    });
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = n0; n < n1; ++n) yp[m * N + n] -= dot(zp + n * G, sums.data() + m * G, G);
  });
  return y;
}

// int8_gemv with each input row rounded to int8 with one scale (int8-a8: native_rows.h, round_row) and integer
// products. Rows already rounded (by leangpt.quant.formats.round_activations) round to themselves.
at::Tensor int8_a8_gemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales) {
  check_int8("int8_a8_gemv", x, q, scales);
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  const float* xp = x.data_ptr<float>();
  std::vector<int8_t> xq(M * K);
  std::vector<float> xs(M);
  std::vector<int32_t> sum32(M);
  for (int64_t m = 0; m < M; ++m) xs[m] = round_row(xp + m * K, K, xq.data() + m * K, sum32.data() + m);
  auto y = at::empty({M, N}, x.options());
  const float* sp = scales.contiguous().data_ptr<float>();
  const int8_t *qp = q.data_ptr<int8_t>(), *xqp = xq.data();
  float* yp = y.data_ptr<float>();
  const int64_t blocks = (N + kInt8Block - 1) / kInt8Block;
  at::parallel_for(0, blocks, std::max<int64_t>(1, 2 * kWorkPerTask / (K * kInt8Block)), [&](int64_t b0, int64_t b1) {
    const int64_t n0 = b0 * kInt8Block, n1 = std::min(N, b1 * kInt8Block);
    with_vnni([&](auto vnni) {
      constexpr bool V = decltype(vnni)::value;
      int64_t m = 0;  // four input rows at a time, then two, then one; this task's weights stay in cache
      for (; m + 4 <= M; m += 4)
        for (int64_t n = n0; n < n1; n += 2)
          int8_a8_rows_m<4, V>(xqp + m * K, K, &xs[m], &sum32[m], qp, sp, yp + m * N, K, N, n, std::min(n1, n + 2));
      for (; m + 2 <= M; m += 2)
        for (int64_t n = n0; n < n1; n += 2)
          int8_a8_rows_m<2, V>(xqp + m * K, K, &xs[m], &sum32[m], qp, sp, yp + m * N, K, N, n, std::min(n1, n + 2));
      for (; m < M; ++m)
        for (int64_t n = n0; n < n1; n += kInt8Block)
          int8_a8_rows<V>(xqp + m * K, xs[m], sum32[m], qp, sp, yp + m * N, K, n, std::min(n1, n + kInt8Block));
    });
  });
  return y;
}

// Switches the int8-activation products between VNNI and AVX2 (the tests check both on a VNNI machine); returns
// whether VNNI's run now (false where the build has no VNNI).
bool set_vnni(bool on) {
  vnni_on() = on && kVnni;
  return vnni_on();
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
    int8_dequant_rows(qp, sp, wp + n0 * K, K, n0, n1);
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
    int4_dequant_rows(pp, sp, zp, wp + n0 * K, K, G, n0, n1);
  });
  return w;
}

// log_softmax(logits)[b, tokens[b]] of float (B, V) logits: the chosen token's logit less log Σ e^x of its row,
// eight lanes at a time (torch's log_softmax writes all B · V log-probabilities first: 16 µs for one row of
// 8,192 on the 2-core EPYC, where a decode step is ~0.2 ms).
at::Tensor token_logprobs(const at::Tensor& logits, const at::Tensor& tokens) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.is_contiguous(),
              "token_logprobs needs contiguous float logits (B, V)");
  const auto tok = tokens.to(at::kLong).contiguous();
  const int64_t B = logits.size(0), V = logits.size(1);
  TORCH_CHECK(tok.numel() == B, "token_logprobs: one token per row");
  const int64_t* t = tok.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(t[b] >= 0 && t[b] < V, "token id ", t[b], " is outside the logits");
  auto out = at::empty({B}, logits.options());
  const float* x = logits.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, B, std::max<int64_t>(1, kWorkPerTask * 4 / V), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* r = x + b * V;
      int64_t i = 0;
      float top = -INFINITY, total = 0.f;
#ifdef LEANGPT_AVX2
      __m256 vtop = _mm256_set1_ps(-INFINITY);
      for (; i + 8 <= V; i += 8) vtop = _mm256_max_ps(vtop, _mm256_loadu_ps(r + i));
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, vtop);
      top = *std::max_element(lanes, lanes + 8);
#endif
      for (; i < V; ++i) top = std::max(top, r[i]);
      i = 0;
#ifdef LEANGPT_AVX2
      __m256 vsum = _mm256_setzero_ps();
      const __m256 vt = _mm256_set1_ps(top);
      for (; i + 8 <= V; i += 8) vsum = _mm256_add_ps(vsum, exp8(_mm256_sub_ps(_mm256_loadu_ps(r + i), vt)));
      total = hsum(vsum);
#endif
      for (; i < V; ++i) total += std::exp(r[i] - top);
      o[b] = r[t[b]] - top - std::log(total);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(leangpt_native, m) {
  m.def("int8_gemv(Tensor x, Tensor q, Tensor scales) -> Tensor");
  m.def("int4_gemv(Tensor x, Tensor packed, Tensor scales, Tensor szeros) -> Tensor");
  m.def("int4_a8_gemv(Tensor x, Tensor packed, Tensor scales, Tensor szeros) -> Tensor");
  m.def("int8_a8_gemv(Tensor x, Tensor q, Tensor scales) -> Tensor");
  m.def("set_vnni(bool on) -> bool", &set_vnni);  // no tensors: one kernel for every dispatch key
  m.def("int8_dequant(Tensor q, Tensor scales) -> Tensor");
  m.def("token_logprobs(Tensor logits, Tensor tokens) -> Tensor");
  m.def("int4_dequant(Tensor packed, Tensor scales, Tensor szeros) -> Tensor");
}

TORCH_LIBRARY_IMPL(leangpt_native, CPU, m) {
  m.impl("int8_gemv", &int8_gemv);
  m.impl("int4_gemv", &int4_gemv);
  m.impl("int4_a8_gemv", &int4_a8_gemv);
  m.impl("int8_a8_gemv", &int8_a8_gemv);
  m.impl("int8_dequant", &int8_dequant);
  m.impl("token_logprobs", &token_logprobs);
  m.impl("int4_dequant", &int4_dequant);
}
