// The one-token decode step of a GPT on a CPU, whole, in C++ (llama.cpp's shape), for one row or a few (each at
// its own position, in its own KV-cache row): every block's norms, products, QK-norm, RoPE, KV-cache write and
// attention, then the final norm and the head, in one OpenMP parallel region. The threads split each product's
// output rows (every input row passes over a thread's weights while they are in cache) and the attention's
// (row, key/value head) pairs, and meet at a barrier between phases; each thread norms its own copy of a
// product's input (a few hundred numbers a row: cheaper than waiting for one thread to do it). Nothing is
// allocated but the logits and each thread's scratch, and no operator is dispatched, so a step costs its weight
// reads, its products and 5 barriers a block.
//
// leangpt/native_decode.py builds a Decoder from a model (float, int8 and int4 linear layers; the GPT-2,
// llama, Qwen3 and nanochat options of leangpt/model.py); the model's own prefill fills the KV cache that the
// step then reads and extends. Float32 throughout (a8 layers: integer products of the inputs rounded as the layers
// round them): equal to the model's forward up to float rounding.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "native_rows.h"

namespace {

using namespace leangpt;

bool present(const at::Tensor& t) { return t.defined() && t.numel() > 0; }  // an empty tensor means "none"

const float* floats(const at::Tensor& t) { return present(t) ? t.data_ptr<float>() : nullptr; }

// This thread's share [lo, hi) of n items, in units of `align` (so that each product's row blocks stay whole).
std::pair<int64_t, int64_t> share(int64_t n, int64_t align = 1) {
  const int64_t units = (n + align - 1) / align, t = omp_get_thread_num(), T = omp_get_num_threads();
  return {std::min(n, units * t / T * align), std::min(n, units * (t + 1) / T * align)};
}

// Σ x[i] - c and Σ (x[i] - c)² over n numbers.
std::pair<float, float> centred_sums(const float* x, int64_t n, float c) {
  int64_t i = 0;
  float s = 0.f, sq = 0.f;
#ifdef LEANGPT_AVX2
  __m256 vs = _mm256_setzero_ps(), vsq = _mm256_setzero_ps();
  const __m256 vc = _mm256_set1_ps(c);
  for (; i + 8 <= n; i += 8) {
    const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + i), vc);
    vs = _mm256_add_ps(vs, d);
    vsq = _mm256_fmadd_ps(d, d, vsq);
  }
  s = hsum(vs), sq = hsum(vsq);
#endif
  for (; i < n; ++i) s += x[i] - c, sq += (x[i] - c) * (x[i] - c);
  return {s, sq};
}

struct Norm {
  bool rms = true;
  float eps = 1e-5f;
  at::Tensor weight, bias;  // either may be empty (parameter-free norms, LayerNorm without bias)

  void apply(const float* x, float* y, int64_t n) const {  // y may be x
    const float mean = rms ? 0.f : centred_sums(x, n, 0.f).first / n;
    const float inv = 1.f / std::sqrt(centred_sums(x, n, mean).second / n + eps);
    const float *w = floats(weight), *b = floats(bias);
    if (w && b) {
      for (int64_t i = 0; i < n; ++i) y[i] = (x[i] - mean) * inv * w[i] + b[i];
    } else if (w) {
      for (int64_t i = 0; i < n; ++i) y[i] = (x[i] - mean) * inv * w[i];
    } else if (!b) {
      for (int64_t i = 0; i < n; ++i) y[i] = (x[i] - mean) * inv;
    } else {
      for (int64_t i = 0; i < n; ++i) y[i] = (x[i] - mean) * inv + b[i];
    }
  }
};

// kInt4A8 / kInt8A8: int4 / int8 weights whose products round their inputs to int8, per group / per row
// (native_rows.h, round_activations / round_row).
enum Kind : int64_t { kFloat = 0, kInt8 = 1, kInt4 = 2, kInt4A8 = 3, kInt8A8 = 4 };

constexpr int64_t kRowAlign = 8;  // a multiple of every row block
// Outputs per tile of a several-row product: a tile's weights (16-64 KB for these models' widths) stay in the L2
// cache while every input row passes over them (measured against 8 and whole shares at 4-32 rows).
constexpr int64_t kTile = 64;
// From this many input rows an int4 product dequantizes its weights, a few rows at a time (dequantized_rows):
// at 8-32 rows it took about 0.7 times as long as converting each weight vector once per four rows. (int8's
// conversion is cheaper: there it was slower.)
constexpr int64_t kDequantRows = 8;

// A thread's scratch for the products: Σ x per int4 group (the zero points), a dequantized tile of weights, and
// an a8 layer's rounded inputs (each row's integers, group scales and, for int8, Σ of its integers).
struct Scratch {
  std::vector<float> sums, tile, xscales;
  std::vector<int8_t> xq;
  std::vector<int32_t> xsums;
};

struct Linear {
  int64_t kind = kFloat, N = 0, K = 0, G = 1;  // K: stored inputs (int4: padded to whole groups, zero inputs)
  bool a8 = false;                              // int8-rounded inputs (kInt4A8, kInt8A8)
  at::Tensor a, b, c, bias;                     // float: weight; int8: q, scales; int4: packed, scales, szeros
  at::Tensor szeros_t;                          // int4: szeros (G, N), each group's zero points of the rows in a row
  // Their data, read once: data_ptr checks its tensor on every call, and the kernels are called per 8 outputs.
  const void* weights = nullptr;
  const float *scales = nullptr, *szeros = nullptr, *szeros_by_group = nullptr;

  // y[m * ldy + n] = W[n] x[m] + bias[n] for the M input rows m (ldx apart) and the outputs n0:n1, n0 a multiple
  // of kRowAlign. Each tile of outputs is done for every input row before the next tile: four rows at a time
  // (each weight vector converted once for them), then two, then one. An a8 layer's rows take integer products.
  void rows(const float* x, int64_t ldx, float* y, int64_t ldy, int64_t M, int64_t n0, int64_t n1,
            Scratch& s) const {
    float* sums = s.sums.data();
    if (a8) return a8_rows(x, ldx, y, ldy, M, n0, n1, s);
    if (kind == kInt4 && M >= kDequantRows) return dequantized_rows(x, ldx, y, ldy, M, n0, n1, s.tile.data());
    if (kind == kInt4) group_sums(x, ldx, M, sums);
    by_tiles(M, n0, n1, [&](auto rows, int64_t m, int64_t t0, int64_t t1) {
      if constexpr (decltype(rows)::value > 1) {
        several_rows<decltype(rows)::value>(x + m * ldx, ldx, y + m * ldy, ldy, t0, t1);
      } else {
        for (int64_t n = t0; n < t1; n += kRowAlign) one_row(x + m * ldx, y + m * ldy, n, std::min(t1, n + kRowAlign));
      }
    });
    finish(y, ldy, M, n0, n1, sums);
  }

 private:
  // f(rows, m, t0, t1) for each tile t0:t1 of the outputs n0:n1 and, within it, the M input rows four at a time,
  // then two, then one (rows: std::integral_constant of 4, 2 or 1; m: the first of them).
  template <typename F>
  static void by_tiles(int64_t M, int64_t n0, int64_t n1, F&& f) {
    for (int64_t t0 = n0; t0 < n1; t0 += kTile) {
      const int64_t t1 = std::min(n1, t0 + kTile);
      int64_t m = 0;
      for (; M > 1 && m + 4 <= M; m += 4) f(std::integral_constant<int, 4>{}, m, t0, t1);
      for (; M > 1 && m + 2 <= M; m += 2) f(std::integral_constant<int, 2>{}, m, t0, t1);
      for (; m < M; ++m) f(std::integral_constant<int, 1>{}, m, t0, t1);
    }
  }

  // rows() for many input rows of an int4 layer: each block of kRowAlign outputs is dequantized into
  // `tile` (kRowAlign * K floats, in the L1 cache) once, then multiplied with every input row as float weights.
  void dequantized_rows(const float* x, int64_t ldx, float* y, int64_t ldy, int64_t M, int64_t n0, int64_t n1,
                        float* tile) const {
    for (int64_t n = n0; n < n1; n += kRowAlign) {
      const int64_t end = std::min(n1, n + kRowAlign);
      int4_dequant_rows(w<uint8_t>(), scales, szeros, tile, K, G, n, end);
      int64_t m = 0;
      for (; m + 4 <= M; m += 4)
        for (int64_t r = 0; r < end - n; r += 2)
          rows_m<4>(x + m * ldx, ldx, tile, nullptr, y + m * ldy + n, K, ldy, r, std::min(end - n, r + 2));
      for (; m < M; ++m) float_rows(x + m * ldx, tile, y + m * ldy + n, K, 0, end - n);
    }
    finish(y, ldy, M, n0, n1, nullptr);
  }

  // rows() of an a8 layer: each input row rounded to int8 (round_activations), then integer products.
  void a8_rows(const float* x, int64_t ldx, float* y, int64_t ldy, int64_t M, int64_t n0, int64_t n1,
               Scratch& s) const {
    if (kind == kInt8) return int8_a8_all_rows(x, ldx, y, ldy, M, n0, n1, s);
    int8_t* q = s.xq.data();
    float *xs = s.xscales.data(), *sums = s.sums.data();
    for (int64_t m = 0; m < M; ++m) round_activations(x + m * ldx, K, G, q + m * K, xs + m * G, sums + m * G);
    const uint8_t* packed = w<uint8_t>();
    with_vnni([&](auto vnni) {
      constexpr bool V = decltype(vnni)::value;
      by_tiles(M, n0, n1, [&](auto rows, int64_t m, int64_t t0, int64_t t1) {
        constexpr int Mr = decltype(rows)::value;
        const int8_t* qm = q + m * K;
        if constexpr (Mr > 1) {
          for (int64_t n = t0; n < t1; ++n)
            int4_a8_rows_m<Mr, V>(qm, xs + m * G, packed + n * (K / 2), scales + n * G, y + m * ldy + n, K, G, ldy);
        } else {
          for (int64_t n = t0; n < t1; n += kInt4Block)
            int4_a8_rows<V>(qm, xs + m * G, packed + n * (K / 2), scales + n * G, y + m * ldy + n, K, G, n,
                            std::min(t1, n + kInt4Block));
        }
      });
    });
    finish(y, ldy, M, n0, n1, sums);
  }

  // a8_rows() of an int8 layer: each input row rounded to int8 with one scale (round_row), then integer products.
  void int8_a8_all_rows(const float* x, int64_t ldx, float* y, int64_t ldy, int64_t M, int64_t n0, int64_t n1,
                        Scratch& s) const {
    int8_t* q = s.xq.data();
    float* xs = s.xscales.data();
    int32_t* sum32 = s.xsums.data();
    for (int64_t m = 0; m < M; ++m) xs[m] = round_row(x + m * ldx, K, q + m * K, sum32 + m);
    const int8_t* wq = w<int8_t>();
    with_vnni([&](auto vnni) {
      constexpr bool V = decltype(vnni)::value;
      by_tiles(M, n0, n1, [&](auto rows, int64_t m, int64_t t0, int64_t t1) {
        constexpr int Mr = decltype(rows)::value;
        if constexpr (Mr > 1) {
          for (int64_t n = t0; n < t1; n += 2)
            int8_a8_rows_m<Mr, V>(q + m * K, K, xs + m, sum32 + m, wq, scales, y + m * ldy, K, ldy, n,
                                  std::min(t1, n + 2));
        } else {
          for (int64_t n = t0; n < t1; n += kInt8Block)
            int8_a8_rows<V>(q + m * K, xs[m], sum32[m], wq, scales, y + m * ldy, K, n, std::min(t1, n + kInt8Block));
        }
      });
    });
    finish(y, ldy, M, n0, n1, nullptr);
  }

  void finish(float* y, int64_t ldy, int64_t M, int64_t n0, int64_t n1, const float* sums) const {  // zeros, bias
    const float* bp = floats(bias);
    for (int64_t m = 0; m < M; ++m) {
      float* ym = y + m * ldy;
      // y -= Σ_g (Σ x of group g) × szeros[:, g], a vectorised pass per group over contiguous zero points. (With a
      // dot of G numbers per output row instead, a batch-1 int4 step took 0.33-0.35 ms against 0.29.)
      if (sums && kind == kInt4)
        for (int64_t g = 0; g < G; ++g) {
          const float *zt = szeros_by_group + g * N, s = sums[m * G + g];
          for (int64_t r = n0; r < n1; ++r) ym[r] -= zt[r] * s;
        }
      if (bp)
        for (int64_t r = n0; r < n1; ++r) ym[r] += bp[r];
    }
  }

  void group_sums(const float* x, int64_t ldx, int64_t M, float* sums) const {  // Σ x per group: the zero points
    const int64_t gs = K / G;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < G; ++g) {
        float s = 0.f;
        for (int64_t k = g * gs; k < (g + 1) * gs; ++k) s += x[m * ldx + k];
        sums[m * G + g] = s;
      }
  }

  void one_row(const float* x, float* y, int64_t n0, int64_t n1) const {  // n1 - n0 <= kRowAlign
    if (kind == kFloat) {
      float_rows(x, w<float>(), y, K, n0, n1);
    } else if (kind == kInt8) {
      int8_rows(x, w<int8_t>(), scales, y, K, n0, n1);
    } else {
      for (int64_t n = n0; n < n1; n += kInt4Block)
        int4_rows(x, w<uint8_t>() + n * (K / 2), scales + n * G, y + n, K, G, n, std::min(n1, n + kInt4Block));
    }
  }

  template <int Mr>
  void several_rows(const float* x, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1) const {  // Mr rows
    if (kind == kFloat) {
      for (int64_t n = n0; n < n1; n += 2) rows_m<Mr>(x, ldx, w<float>(), nullptr, y, K, ldy, n, std::min(n1, n + 2));
    } else if (kind == kInt8) {
      for (int64_t n = n0; n < n1; n += 2) rows_m<Mr>(x, ldx, w<int8_t>(), scales, y, K, ldy, n, std::min(n1, n + 2));
    } else {
      for (int64_t n = n0; n < n1; ++n)
        int4_rows_m<Mr>(x, ldx, w<uint8_t>() + n * (K / 2), scales + n * G, y + n, K, G, ldy);
    }
  }

  template <typename T>
  const T* w() const {  // the stored weights, as float, int8 or packed int4
    return static_cast<const T*>(weights);
  }
};

struct Block {
  int64_t n_head = 0, n_kv_head = 0;
  bool qk_norm = false;
  Norm norm1, norm2, q_norm, k_norm;
  Linear qkv, proj, gate, fc, down;  // gate.N == 0 unless the MLP is SwiGLU
};

enum Mlp : int64_t { kGelu = 0, kSwiglu = 1, kRelu2 = 2 };

float activation(int64_t mlp, float g, float f) {  // the MLP's hidden unit from its gate (SwiGLU) and fc outputs
  if (mlp == kSwiglu) return g / (1.f + std::exp(-g)) * f;
  if (mlp == kRelu2) return f > 0.f ? f * f : 0.f;
  const float c = 0.7978845608028654f;  // sqrt(2 / pi): GPT-2's tanh approximation
  return 0.5f * f * (1.f + std::tanh(c * (f + 0.044715f * f * f * f)));
}

// h[0:n] = activation(g, f), eight lanes at a time: e^-|u| keeps exp8 in its range.
void activations(int64_t mlp, const float* g, const float* f, float* h, int64_t n) {
  int64_t i = 0;
#ifdef LEANGPT_AVX2
  const __m256 one = _mm256_set1_ps(1.f), sign = _mm256_set1_ps(-0.f);
  for (; i + 8 <= n && mlp != kRelu2; i += 8) {
    const __m256 fv = _mm256_loadu_ps(f + i);
    __m256 out;
    if (mlp == kSwiglu) {  // silu(g) f: sigmoid(g) = 1 / (1 + e^-g), or e^g / (1 + e^g) for g < 0
      const __m256 gv = _mm256_loadu_ps(g + i);
      const __m256 e = exp8(_mm256_or_ps(gv, sign));  // e^-|g|
      const __m256 sig = _mm256_blendv_ps(one, e, gv);  // numerator: 1, or e^g where g's sign bit is set
      out = _mm256_mul_ps(_mm256_mul_ps(gv, _mm256_div_ps(sig, _mm256_add_ps(one, e))), fv);
    } else {  // GELU: 0.5 f (1 + tanh u), tanh u = sign(u) (1 - e^-2|u|) / (1 + e^-2|u|)
      const __m256 f3 = _mm256_mul_ps(_mm256_mul_ps(fv, fv), fv);
      const __m256 u = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f),
                                     _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), f3, fv));
      const __m256 e = exp8(_mm256_mul_ps(_mm256_set1_ps(-2.f), _mm256_andnot_ps(sign, u)));
      const __m256 t = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
      const __m256 th = _mm256_or_ps(t, _mm256_and_ps(sign, u));
      out = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), fv), _mm256_add_ps(one, th));
    }
    _mm256_storeu_ps(h + i, out);
  }
#endif
  for (; i < n; ++i) h[i] = activation(mlp, g[i], f[i]);
}

// scores[0:n] = e^(scores - top); returns their sum.
float exp_sum(float* scores, int64_t n, float top) {
  int64_t t = 0;
  float total = 0.f;
#ifdef LEANGPT_AVX2
  __m256 sum = _mm256_setzero_ps();
  for (; t + 8 <= n; t += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + t), _mm256_set1_ps(top)));
    _mm256_storeu_ps(scores + t, e);
    sum = _mm256_add_ps(sum, e);
  }
  total = hsum(sum);
#endif
  for (; t < n; ++t) total += scores[t] = std::exp(scores[t] - top);
  return total;
}

// scores[t] = q · keys[t] * scale for the n keys (D apart); returns the largest. Four keys at a time, whose
// independent sums hide the multiply-adds' latency.
float key_scores(const float* q, const float* keys, float* scores, int64_t n, int64_t D, float scale) {
  int64_t t = 0;
#ifdef LEANGPT_AVX2
  if (D % 8 == 0)
    for (; t + 4 <= n; t += 4) {
      __m256 acc[4];
      for (int i = 0; i < 4; ++i) acc[i] = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; d += 8) {
        const __m256 qv = _mm256_loadu_ps(q + d);
        for (int i = 0; i < 4; ++i) acc[i] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(keys + (t + i) * D + d), acc[i]);
      }
      _mm_storeu_ps(scores + t, _mm_mul_ps(hsum4(acc), _mm_set1_ps(scale)));
    }
#endif
  for (; t < n; ++t) scores[t] = dot(q, keys + t * D, D) * scale;
  return *std::max_element(scores, scores + n);
}

#ifdef LEANGPT_AVX2
// y[0 : 8 Lanes] = Σ_t p[t] values[t, 0 : 8 Lanes] * inv, in registers.
template <int Lanes>
void weighted_chunk(const float* p, const float* values, float* y, int64_t n, int64_t D, float inv) {
  __m256 acc[Lanes];
  for (int j = 0; j < Lanes; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t t = 0; t < n; ++t) {
    const __m256 pt = _mm256_set1_ps(p[t]);
    for (int j = 0; j < Lanes; ++j) acc[j] = _mm256_fmadd_ps(pt, _mm256_loadu_ps(values + t * D + 8 * j), acc[j]);
  }
  for (int j = 0; j < Lanes; ++j) _mm256_storeu_ps(y + 8 * j, _mm256_mul_ps(acc[j], _mm256_set1_ps(inv)));
}
#endif

// y[0:D] = Σ_t p[t] values[t, 0:D] / total, 64 outputs at a time.
void weighted_values(const float* p, const float* values, float* y, int64_t n, int64_t D, float total) {
  const float inv = 1.f / total;
#ifdef LEANGPT_AVX2
  if (D % 8 == 0) {
    using Chunk = void (*)(const float*, const float*, float*, int64_t, int64_t, float);
    static constexpr Chunk chunks[] = {weighted_chunk<1>, weighted_chunk<2>, weighted_chunk<3>, weighted_chunk<4>,
                                       weighted_chunk<5>, weighted_chunk<6>, weighted_chunk<7>, weighted_chunk<8>};
    for (int64_t i0 = 0; i0 < D; i0 += 64)
      chunks[std::min<int64_t>(64, D - i0) / 8 - 1](p, values + i0, y + i0, n, D, inv);
    return;
  }
#endif
  std::fill(y, y + D, 0.f);
  for (int64_t t = 0; t < n; ++t)
    for (int64_t i = 0; i < D; ++i) y[i] += p[t] * values[t * D + i];
  for (int64_t i = 0; i < D; ++i) y[i] *= inv;
}

void rope(float* x, const float* cos, const float* sin, int64_t d) {  // Hugging Face's rotate-half layout
  const int64_t h = d / 2;
  for (int64_t i = 0; i < h; ++i) {
    const float x1 = x[i], x2 = x[i + h];
    x[i] = x1 * cos[i] - x2 * sin[i];
    x[i + h] = x2 * cos[i + h] + x1 * sin[i + h];
  }
}

struct Decoder : torch::CustomClassHolder {
  int64_t n_embd, head_dim, mlp;
  double softcap;             // 0: none
  at::Tensor rope_cos, rope_sin;  // (block_size, head_dim), or empty without RoPE
  at::Tensor tokens, positions;   // float embedding tables (vocab, n_embd) and (block_size, n_embd), or empty
  bool embed_norm = false;
  Norm norm_emb;
  std::vector<Block> blocks;
  Norm norm_f;
  Linear head;
  std::vector<at::Tensor> k_cache, v_cache;  // per block (rows, n_kv_head, max_len, head_dim)
  // Activations of `rows` step rows, each row as long as its widest reader reads (zeros past what is written:
  // padded int4 inputs). The normed input of a product is each thread's own copy (`normed` floats a row), so no
  // thread waits for a norm.
  int64_t rows = 0, q_width = 0, att_width = 0, mlp_width = 0;
  std::vector<float> x, qkv, att, hidden, gate_out, fc_out, out;
  int64_t normed = 0, groups = 1;  // groups: the most int4 groups of a layer (each thread's Σ x per group)
  bool a8 = false;                  // some layer rounds its inputs (each thread's rounded rows)

  Decoder(int64_t n_embd, int64_t head_dim, int64_t mlp, double softcap, at::Tensor rope_cos, at::Tensor rope_sin)
      : n_embd(n_embd), head_dim(head_dim), mlp(mlp), softcap(softcap), rope_cos(rope_cos), rope_sin(rope_sin) {}

  static Norm make_norm(bool rms, double eps, const at::Tensor& w, const at::Tensor& b) {
    Norm n;
    n.rms = rms;
    n.eps = static_cast<float>(eps);
    n.weight = w.contiguous();
    n.bias = b.contiguous();
    return n;
  }

  static Linear make_linear(int64_t kind, const std::vector<at::Tensor>& t) {  // t: a, b, c, bias
    TORCH_CHECK(t.size() == 4 && kind >= kFloat && kind <= kInt8A8, "a linear layer is a kind and four tensors");
    Linear l;
    l.a8 = kind == kInt4A8 || kind == kInt8A8;
    l.kind = kind == kInt4A8 ? kInt4 : kind == kInt8A8 ? kInt8 : kind;
    l.a = t[0].contiguous(), l.b = t[1].contiguous(), l.c = t[2].contiguous(), l.bias = t[3].contiguous();
    if (l.kind == kInt4) l.szeros_t = l.c.t().contiguous();
    l.weights = l.a.data_ptr(), l.scales = floats(l.b), l.szeros = floats(l.c), l.szeros_by_group = floats(l.szeros_t);
    l.N = l.a.size(0);
    l.K = l.kind == kInt4 ? l.a.size(1) * 2 : l.a.size(1);
    if (l.kind == kInt4) {
      l.G = l.b.size(1);
      TORCH_CHECK(l.K % l.G == 0 && (l.K / l.G) % 32 == 0, "int4 groups must be a multiple of 32 inputs");
    }
    TORCH_CHECK(!present(l.bias) || l.bias.numel() == l.N, "bias size");
    return l;
  }

  // norms: norm1 w, b; norm2 w, b; q_norm w; k_norm w. linears: kinds of qkv, proj, gate (-1: none), fc, down;
  // weights: four tensors each (see make_linear), in the same order.
  void add_block(int64_t n_head, int64_t n_kv_head, bool qk_norm, bool rms, double eps,
                 std::vector<at::Tensor> norms, std::vector<int64_t> kinds, std::vector<at::Tensor> weights) {
    TORCH_CHECK(norms.size() == 6 && kinds.size() == 5 && weights.size() == 20, "add_block: wrong argument sizes");
    Block b;
    b.n_head = n_head, b.n_kv_head = n_kv_head, b.qk_norm = qk_norm;
    b.norm1 = make_norm(rms, eps, norms[0], norms[1]);
    b.norm2 = make_norm(rms, eps, norms[2], norms[3]);
    b.q_norm = make_norm(true, eps, norms[4], at::Tensor());
    b.k_norm = make_norm(true, eps, norms[5], at::Tensor());
    Linear* slots[] = {&b.qkv, &b.proj, &b.gate, &b.fc, &b.down};
    for (int i = 0; i < 5; ++i)
      if (kinds[i] >= 0) *slots[i] = make_linear(kinds[i], {weights.begin() + 4 * i, weights.begin() + 4 * i + 4});
    TORCH_CHECK(b.qkv.N == (n_head + 2 * n_kv_head) * head_dim && b.qkv.K >= n_embd && b.proj.N == n_embd &&
                    b.proj.K >= n_head * head_dim && b.fc.K >= n_embd && b.down.N == n_embd && b.down.K >= b.fc.N &&
                    (mlp != kSwiglu || (b.gate.N == b.fc.N && b.gate.K == b.fc.K)),
                "add_block: layer shapes do not match");
    blocks.push_back(std::move(b));
  }

  void set_head(bool rms, double eps, at::Tensor w, at::Tensor b, int64_t kind, std::vector<at::Tensor> weights) {
    norm_f = make_norm(rms, eps, w, b);
    head = make_linear(kind, weights);
    TORCH_CHECK(head.K >= n_embd, "set_head: the head's inputs do not match");
    size_buffers();
  }

  // The embedding of a token, if its table is float (else the caller passes the embedded token to step).
  void set_embedding(at::Tensor table, at::Tensor pos_table, bool norm, bool rms, double eps, at::Tensor w,
                     at::Tensor b) {
    TORCH_CHECK(table.dim() == 2 && table.size(1) == n_embd && table.scalar_type() == at::kFloat &&
                    (!present(pos_table) || pos_table.size(1) == n_embd),
                "set_embedding: the tables must be float (rows, n_embd)");
    tokens = table.contiguous(), positions = pos_table.contiguous(), embed_norm = norm;
    norm_emb = make_norm(rms, eps, w, b);
  }

  void embed(int64_t row, int64_t token, int64_t pos) {
    TORCH_CHECK(present(tokens), "no float embedding table: pass the embedded tokens");
    TORCH_CHECK(token >= 0 && token < tokens.size(0), "token id ", token, " is outside the vocabulary");
    const float* emb = tokens.data_ptr<float>() + token * n_embd;
    float* xr = x.data() + row * n_embd;
    std::copy(emb, emb + n_embd, xr);
    if (present(positions)) {
      TORCH_CHECK(pos < positions.size(0), "position ", pos, " is outside the position table");
      const float* p = positions.data_ptr<float>() + pos * n_embd;
      for (int64_t i = 0; i < n_embd; ++i) xr[i] += p[i];
    }
    if (embed_norm) norm_emb.apply(xr, xr, n_embd);
  }

  void size_buffers() {
    normed = std::max(n_embd, head.K), groups = head.G, a8 = head.a8;
    for (const Block& b : blocks) {
      a8 = a8 || b.qkv.a8 || b.proj.a8 || b.gate.a8 || b.fc.a8 || b.down.a8;
      normed = std::max({normed, b.qkv.K, b.fc.K, b.gate.K});
      q_width = std::max(q_width, b.qkv.N);
      att_width = std::max(att_width, b.proj.K);
      mlp_width = std::max(mlp_width, b.down.K);
      groups = std::max({groups, b.qkv.G, b.proj.G, b.gate.G, b.fc.G, b.down.G});
    }
    rows = 0;
    reserve_rows(1);
  }

  Scratch scratch(int64_t M) const {  // a thread's, for a step of M rows
    const int64_t widest = std::max({normed, att_width, mlp_width});
    Scratch s;
    s.sums.resize(M * groups);
    s.tile.resize(M >= kDequantRows ? kRowAlign * widest : 0);
    if (a8) s.xq.resize(M * widest), s.xscales.resize(M * groups), s.xsums.resize(M);
    return s;
  }

  void reserve_rows(int64_t n) {
    if (n <= rows) return;
    rows = n;
    x.assign(n * n_embd, 0.f), qkv.assign(n * q_width, 0.f), att.assign(n * att_width, 0.f);
    hidden.assign(n * mlp_width, 0.f), gate_out.assign(n * mlp_width, 0.f), fc_out.assign(n * mlp_width, 0.f);
    out.assign(n * n_embd, 0.f);
  }

  void set_cache(std::vector<at::Tensor> k, std::vector<at::Tensor> v) {
    TORCH_CHECK(k.size() == blocks.size() && v.size() == blocks.size(), "one key and one value cache per block");
    for (size_t i = 0; i < k.size(); ++i)
      TORCH_CHECK(k[i].is_contiguous() && v[i].is_contiguous() && k[i].scalar_type() == at::kFloat &&
                      k[i].dim() == 4 && k[i].size(0) >= 1 && k[i].size(1) == blocks[i].n_kv_head &&
                      k[i].size(3) == head_dim && v[i].sizes() == k[i].sizes(),
                  "the KV cache must be contiguous float (rows, n_kv_head, max_len, head_dim)");
    k_cache = std::move(k), v_cache = std::move(v);
  }

  // Where a step runs: item r (one token) at position pos[r] of KV-cache row slot[r]. Items may share a cache row
  // (a prompt's tokens, or a draft's to verify), each then attending to the keys the others write.
  struct Items {
    const int64_t *pos, *slot;
    int64_t M;
    bool shared_slots;  // some cache row holds several items: every key is written before any is read
  };

  float* cache_at(const std::vector<at::Tensor>& cache, size_t layer, int64_t slot, int64_t head) const {
    const int64_t H = cache[layer].size(1), L = cache[layer].size(2);
    return cache[layer].data_ptr<float>() + (slot * H + head) * L * head_dim;
  }

  // One layer's attention for this thread's (item, key/value head) pairs: QK-norm and RoPE of its keys and
  // queries, the new key and value written at the item's position, then softmax(q k / sqrt(d)) v over positions
  // 0..pos[r] of its cache row into att.
  void attend(size_t layer, const Items& it, std::vector<float>& scores) {
    const Block& b = blocks[layer];
    const int64_t D = head_dim, group = b.n_head / b.n_kv_head;
    const int64_t q_size = b.n_head * D, kv_size = b.n_kv_head * D;
    const float scale = 1.f / std::sqrt(static_cast<float>(D));
    const float *cs = floats(rope_cos), *sn = floats(rope_sin);
    auto [i0, i1] = share(it.M * b.n_kv_head);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = i / b.n_kv_head, j = i % b.n_kv_head, p = it.pos[r];
      float *k = qkv.data() + r * q_width + q_size + j * D, *v = k + kv_size;
      if (b.qk_norm) b.k_norm.apply(k, k, D);
      if (cs) rope(k, cs + p * D, sn + p * D, D);
      std::copy(k, k + D, cache_at(k_cache, layer, it.slot[r], j) + p * D);
      std::copy(v, v + D, cache_at(v_cache, layer, it.slot[r], j) + p * D);
    }
    if (it.shared_slots) {
#pragma omp barrier
    }
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = i / b.n_kv_head, j = i % b.n_kv_head, p = it.pos[r];
      const float *keys = cache_at(k_cache, layer, it.slot[r], j), *values = cache_at(v_cache, layer, it.slot[r], j);
      for (int64_t hd = j * group; hd < (j + 1) * group; ++hd) {
        float* q = qkv.data() + r * q_width + hd * D;
        if (b.qk_norm) b.q_norm.apply(q, q, D);
        if (cs) rope(q, cs + p * D, sn + p * D, D);
        const float top = key_scores(q, keys, scores.data(), p + 1, D, scale);
        const float total = exp_sum(scores.data(), p + 1, top);
        weighted_values(scores.data(), values, att.data() + r * att_width + hd * D, p + 1, D, total);
      }
    }
    if (omp_get_thread_num() == 0)  // a pruned layer's tail
      for (int64_t r = 0; r < it.M; ++r)
        std::fill(att.begin() + r * att_width + q_size, att.begin() + (r + 1) * att_width, 0.f);
  }

  void norm_rows(const Norm& norm, float* h, int64_t M) const {  // h (M, normed) = norm(x)
    for (int64_t r = 0; r < M; ++r) norm.apply(x.data() + r * n_embd, h + r * normed, n_embd);
  }

  // x += W y for this thread's columns of the residual stream, y: M rows ldy apart.
  void add_product(const Linear& l, const float* y, int64_t ldy, int64_t M, Scratch& s) {
    auto [n0, n1] = share(l.N, kRowAlign);
    l.rows(y, ldy, out.data(), n_embd, M, n0, n1, s);
    for (int64_t r = 0; r < M; ++r)
      for (int64_t n = n0; n < n1; ++n) x[r * n_embd + n] += out[r * n_embd + n];
  }

  void mlp_hidden(const Block& b, const float* h, int64_t M, Scratch& s) {
    auto [n0, n1] = share(b.fc.N, kRowAlign);
    b.fc.rows(h, normed, fc_out.data(), mlp_width, M, n0, n1, s);
    if (mlp == kSwiglu) b.gate.rows(h, normed, gate_out.data(), mlp_width, M, n0, n1, s);
    for (int64_t r = 0; r < M; ++r) {
      const int64_t at = r * mlp_width + n0;
      activations(mlp, gate_out.data() + at, fc_out.data() + at, hidden.data() + at, n1 - n0);
    }
    if (omp_get_thread_num() == 0)
      for (int64_t r = 0; r < M; ++r)
        std::fill(hidden.begin() + r * mlp_width + b.fc.N, hidden.begin() + (r + 1) * mlp_width, 0.f);
  }

  // Items checked against the cache: (positions, cache rows, whether a cache row holds several items).
  Items check_items(const at::Tensor& pos_t, const at::Tensor& slot_t, int64_t M, int64_t& last) const {
    TORCH_CHECK(k_cache.size() == blocks.size(), "set_cache before step");
    TORCH_CHECK(M >= 1 && pos_t.numel() == M && slot_t.numel() == M, "step: one position and cache row per token");
    const int64_t *pos = pos_t.data_ptr<int64_t>(), *slot = slot_t.data_ptr<int64_t>();
    const int64_t rows = k_cache[0].size(0), L = k_cache[0].size(2);
    std::vector<bool> used(rows, false);
    bool shared = false;
    last = 0;
    for (int64_t r = 0; r < M; ++r) {
      TORCH_CHECK(pos[r] >= 0 && pos[r] < L, "position ", pos[r], " is outside the KV cache");
      TORCH_CHECK(slot[r] >= 0 && slot[r] < rows, "cache row ", slot[r], " is outside the KV cache (", rows, " rows)");
      shared = shared || used[slot[r]];
      used[slot[r]] = true;
      last = std::max(last, pos[r]);
    }
    return {pos, slot, M, shared};
  }

  // Logits (len(logit_items), vocab) of tokens (M,) at positions (M,) of the KV cache's rows slots (M,): item r
  // attends to positions 0..positions[r] of its row, including the keys that items before it in the same row
  // write in this step. logit_items: the items whose logits are wanted (ascending). embedded: the first block's
  // inputs (M, n_embd) when the embedding is not a float table (set_embedding), else empty.
  at::Tensor step(at::Tensor tokens_in, at::Tensor positions_in, at::Tensor slots_in, at::Tensor logit_items_in,
                  at::Tensor embedded) {
    const auto tok = tokens_in.to(at::kLong).contiguous(), pos_t = positions_in.to(at::kLong).contiguous();
    const auto slot_t = slots_in.to(at::kLong).contiguous(), want_t = logit_items_in.to(at::kLong).contiguous();
    const int64_t M = tok.numel(), W = want_t.numel();
    int64_t last = 0;
    const Items it = check_items(pos_t, slot_t, M, last);
    const int64_t* want = want_t.data_ptr<int64_t>();
    for (int64_t w = 0; w < W; ++w)
      TORCH_CHECK(want[w] >= 0 && want[w] < M && (w == 0 || want[w] > want[w - 1]), "logit items: ascending, < M");
    reserve_rows(M);
    if (present(embedded)) {
      TORCH_CHECK(embedded.scalar_type() == at::kFloat && embedded.numel() == M * n_embd,
                  "embedded: (M, n_embd) floats");
      const auto xc = embedded.contiguous();
      std::copy(xc.data_ptr<float>(), xc.data_ptr<float>() + M * n_embd, x.begin());
    } else {
      for (int64_t r = 0; r < M; ++r) embed(r, tok.data_ptr<int64_t>()[r], it.pos[r]);
    }
    auto logits = at::empty({W, head.N}, at::TensorOptions().dtype(at::kFloat));
    float* y = logits.data_ptr<float>();
#pragma omp parallel num_threads(at::get_num_threads())
    {
      std::vector<float> scores(last + 1), h(M * normed, 0.f);
      Scratch s = scratch(M);
      for (size_t i = 0; i < blocks.size(); ++i) {
        const Block& b = blocks[i];
        norm_rows(b.norm1, h.data(), M);
        {
          auto [n0, n1] = share(b.qkv.N, kRowAlign);
          b.qkv.rows(h.data(), normed, qkv.data(), q_width, M, n0, n1, s);
        }
#pragma omp barrier
        attend(i, it, scores);
#pragma omp barrier
        add_product(b.proj, att.data(), att_width, M, s);
#pragma omp barrier
        norm_rows(b.norm2, h.data(), M);
        mlp_hidden(b, h.data(), M, s);
#pragma omp barrier
        add_product(b.down, hidden.data(), mlp_width, M, s);
#pragma omp barrier
      }
      for (int64_t w = 0; w < W; ++w) norm_f.apply(x.data() + want[w] * n_embd, h.data() + w * normed, n_embd);
      auto [n0, n1] = share(head.N, kRowAlign);
      if (W) head.rows(h.data(), normed, y, head.N, W, n0, n1, s);
      if (softcap > 0)
        for (int64_t r = 0; r < W; ++r)
          for (int64_t n = r * head.N + n0; n < r * head.N + n1; ++n) y[n] = softcap * std::tanh(y[n] / softcap);
    }
    return logits;
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(leangpt_native, m) {
  m.class_<Decoder>("Decoder")
      .def(torch::init<int64_t, int64_t, int64_t, double, at::Tensor, at::Tensor>())
      .def("add_block", &Decoder::add_block)
      .def("set_head", &Decoder::set_head)
      .def("set_embedding", &Decoder::set_embedding)
      .def("set_cache", &Decoder::set_cache)
      .def("step", &Decoder::step);
}
