// The one-token decode step of a GPT at batch 1 on a CPU, whole, in C++ (llama.cpp's shape): every block's
// norms, products, QK-norm, RoPE, KV-cache write and attention, then the final norm and the head, in one
// OpenMP parallel region. The threads split each product's output rows and the attention's key/value heads,
// and meet at a barrier between phases; each thread norms its own copy of a product's input (a few hundred
// numbers: cheaper than waiting for one thread to do it). Nothing is allocated but the logits and each
// thread's scratch, and no operator is dispatched, so a step costs its weight reads and 5 barriers a block.
//
// leangpt/native_decode.py builds a Decoder from a model (float, int8 and int4 linear layers; the GPT-2,
// llama, Qwen3 and nanochat options of leangpt/model.py); the model's own prefill fills the KV cache that the
// step then reads and extends. Float32 throughout: equal to the model's forward up to float rounding.

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

struct Norm {
  bool rms = true;
  float eps = 1e-5f;
  at::Tensor weight, bias;  // either may be empty (parameter-free norms, LayerNorm without bias)

  void apply(const float* x, float* y, int64_t n) const {  // y may be x
    float mean = 0.f, sq = 0.f;
    for (int64_t i = 0; i < n; ++i) mean += x[i];
    mean = rms ? 0.f : mean / n;
    for (int64_t i = 0; i < n; ++i) sq += (x[i] - mean) * (x[i] - mean);
    const float inv = 1.f / std::sqrt(sq / n + eps);
    const float *w = floats(weight), *b = floats(bias);
    for (int64_t i = 0; i < n; ++i) y[i] = (x[i] - mean) * inv * (w ? w[i] : 1.f) + (b ? b[i] : 0.f);
  }
};

enum Kind : int64_t { kFloat = 0, kInt8 = 1, kInt4 = 2 };

struct Linear {
  int64_t kind = kFloat, N = 0, K = 0, G = 1;  // K: stored inputs (int4: padded to whole groups, zero inputs)
  at::Tensor a, b, c, bias;                     // float: weight; int8: q, scales; int4: packed, scales, szeros

  // y[n0:n1] = W[n0:n1] x + bias; n0 a multiple of the row block. sums: scratch of G floats (int4).
  void rows(const float* x, float* y, int64_t n0, int64_t n1, float* sums) const {
    if (kind == kFloat) {
      for (int64_t n = n0; n < n1; n += kFloatBlock)
        float_rows(x, a.data_ptr<float>(), y, K, n, std::min(n1, n + kFloatBlock));
    } else if (kind == kInt8) {
      for (int64_t n = n0; n < n1; n += kInt8Block)
        int8_rows(x, a.data_ptr<int8_t>(), b.data_ptr<float>(), y, K, n, std::min(n1, n + kInt8Block));
    } else {
      const int64_t gs = K / G;
      for (int64_t g = 0; g < G; ++g) {  // Σ x per group, for the zero points
        float s = 0.f;
        for (int64_t k = g * gs; k < (g + 1) * gs; ++k) s += x[k];
        sums[g] = s;
      }
      const uint8_t* p = a.data_ptr<uint8_t>();
      const float *sc = b.data_ptr<float>(), *sz = c.data_ptr<float>();
      for (int64_t n = n0; n < n1; n += kInt4Block) {
        const int64_t end = std::min(n1, n + kInt4Block);
        int4_rows(x, p + n * (K / 2), sc + n * G, y + n, K, G, n, end);
        for (int64_t r = n; r < end; ++r) y[r] -= dot(sz + r * G, sums, G);
      }
    }
    if (const float* bp = floats(bias))
      for (int64_t n = n0; n < n1; ++n) y[n] += bp[n];
  }
};

constexpr int64_t kRowAlign = 8;  // a multiple of every row block

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

#ifdef LEANGPT_AVX2
// e^x of eight lanes (Cephes' expf: 2^n times a polynomial of the remainder; about 1 ulp), for x <= 0.
__m256 exp8(__m256 x) {
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

// y[0:D] = Σ_t p[t] values[t, 0:D] / total, 64 outputs at a time in registers.
void weighted_values(const float* p, const float* values, float* y, int64_t n, int64_t D, float total) {
  const float inv = 1.f / total;
#ifdef LEANGPT_AVX2
  if (D % 8 == 0) {
    for (int64_t i0 = 0; i0 < D; i0 += 64) {
      const int64_t lanes = std::min<int64_t>(64, D - i0) / 8;
      __m256 acc[8];
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
      for (int64_t t = 0; t < n; ++t) {
        const __m256 pt = _mm256_set1_ps(p[t]);
        const float* vt = values + t * D + i0;
        for (int j = 0; j < lanes; ++j) acc[j] = _mm256_fmadd_ps(pt, _mm256_loadu_ps(vt + 8 * j), acc[j]);
      }
      for (int j = 0; j < lanes; ++j) _mm256_storeu_ps(y + i0 + 8 * j, _mm256_mul_ps(acc[j], _mm256_set1_ps(inv)));
    }
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
  std::vector<at::Tensor> k_cache, v_cache;  // per block (rows, n_kv_head, max_len, head_dim): row 0 is decoded
  // Activations, each as long as its widest reader reads (zeros past what is written: padded int4 inputs). The
  // normed input of a product is each thread's own copy (`normed` floats), so no thread waits for a norm.
  std::vector<float> x, qkv, att, hidden, gate_out, fc_out, out;
  int64_t normed = 0, groups = 1;  // groups: the most int4 groups of a layer (each thread's Σ x per group)

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
    TORCH_CHECK(t.size() == 4 && kind >= kFloat && kind <= kInt4, "a linear layer is a kind and four tensors");
    Linear l;
    l.kind = kind;
    l.a = t[0].contiguous(), l.b = t[1].contiguous(), l.c = t[2].contiguous(), l.bias = t[3].contiguous();
    l.N = l.a.size(0);
    l.K = kind == kInt4 ? l.a.size(1) * 2 : l.a.size(1);
    if (kind == kInt4) {
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

  void embed(int64_t token, int64_t pos) {
    TORCH_CHECK(present(tokens), "no float embedding table: pass the embedded token");
    TORCH_CHECK(token >= 0 && token < tokens.size(0), "token id ", token, " is outside the vocabulary");
    const float* row = tokens.data_ptr<float>() + token * n_embd;
    std::copy(row, row + n_embd, x.begin());
    if (present(positions)) {
      TORCH_CHECK(pos < positions.size(0), "position ", pos, " is outside the position table");
      const float* p = positions.data_ptr<float>() + pos * n_embd;
      for (int64_t i = 0; i < n_embd; ++i) x[i] += p[i];
    }
    if (embed_norm) norm_emb.apply(x.data(), x.data(), n_embd);
  }

  void size_buffers() {
    int64_t widest = n_embd, q = 0, a = 0, m = 0;
    for (const Block& b : blocks) {
      widest = std::max({widest, b.qkv.K, b.fc.K, b.gate.K});
      q = std::max(q, b.qkv.N);
      a = std::max(a, b.proj.K);
      m = std::max(m, b.down.K);
    }
    widest = std::max(widest, head.K);
    normed = widest;
    groups = head.G;
    for (const Block& b : blocks) groups = std::max({groups, b.qkv.G, b.proj.G, b.gate.G, b.fc.G, b.down.G});
    x.assign(n_embd, 0.f), qkv.assign(q, 0.f), att.assign(a, 0.f), hidden.assign(m, 0.f);
    gate_out.assign(m, 0.f), fc_out.assign(m, 0.f), out.assign(n_embd, 0.f);
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

  // One layer's attention for the key/value heads of this thread: QK-norm and RoPE of its keys and queries,
  // the new key and value written at slot pos, then softmax(q k / sqrt(d)) v over slots 0..pos into att.
  void attend(size_t layer, int64_t pos, std::vector<float>& scores) {
    const Block& b = blocks[layer];
    const int64_t D = head_dim, group = b.n_head / b.n_kv_head, L = k_cache[layer].size(2);
    const int64_t q_size = b.n_head * D, kv_size = b.n_kv_head * D;
    const float *cs = floats(rope_cos), *sn = floats(rope_sin);
    if (cs) cs += pos * D, sn += pos * D;
    const float scale = 1.f / std::sqrt(static_cast<float>(D));
    auto [j0, j1] = share(b.n_kv_head);
    for (int64_t j = j0; j < j1; ++j) {
      float *k = qkv.data() + q_size + j * D, *v = k + kv_size;
      if (b.qk_norm) b.k_norm.apply(k, k, D);
      if (cs) rope(k, cs, sn, D);
      float* keys = k_cache[layer].data_ptr<float>() + j * L * D;
      float* values = v_cache[layer].data_ptr<float>() + j * L * D;
      std::copy(k, k + D, keys + pos * D);
      std::copy(v, v + D, values + pos * D);
      for (int64_t hd = j * group; hd < (j + 1) * group; ++hd) {
        float* q = qkv.data() + hd * D;
        if (b.qk_norm) b.q_norm.apply(q, q, D);
        if (cs) rope(q, cs, sn, D);
        float top = -INFINITY;
        for (int64_t t = 0; t <= pos; ++t) top = std::max(top, scores[t] = dot(q, keys + t * D, D) * scale);
        const float total = exp_sum(scores.data(), pos + 1, top);
        weighted_values(scores.data(), values, att.data() + hd * D, pos + 1, D, total);
      }
    }
    if (omp_get_thread_num() == 0) std::fill(att.begin() + q_size, att.end(), 0.f);  // a pruned layer's tail
  }

  // x += W y for this thread's rows of the residual stream.
  void add_product(const Linear& l, const float* y, float* sums) {
    auto [n0, n1] = share(l.N, kRowAlign);
    l.rows(y, out.data(), n0, n1, sums);
    for (int64_t n = n0; n < n1; ++n) x[n] += out[n];
  }

  void mlp_hidden(const Block& b, const float* h, float* sums) {
    auto [n0, n1] = share(b.fc.N, kRowAlign);
    b.fc.rows(h, fc_out.data(), n0, n1, sums);
    if (mlp == kSwiglu) b.gate.rows(h, gate_out.data(), n0, n1, sums);
    for (int64_t n = n0; n < n1; ++n) hidden[n] = activation(mlp, gate_out[n], fc_out[n]);
    if (omp_get_thread_num() == 0) std::fill(hidden.begin() + b.fc.N, hidden.end(), 0.f);
  }

  // Logits (1, vocab) of token at position pos; embedded: the first block's input (n_embd floats) when the
  // embedding is not a float table (set_embedding), else empty.
  at::Tensor step(int64_t token, int64_t pos, at::Tensor embedded) {
    TORCH_CHECK(k_cache.size() == blocks.size(), "set_cache before step");
    TORCH_CHECK(pos >= 0 && pos < k_cache[0].size(2), "position ", pos, " is outside the KV cache");
    if (present(embedded)) {
      TORCH_CHECK(embedded.scalar_type() == at::kFloat && embedded.numel() == n_embd, "embedded: n_embd floats");
      const auto xc = embedded.contiguous();
      std::copy(xc.data_ptr<float>(), xc.data_ptr<float>() + n_embd, x.begin());
    } else {
      embed(token, pos);
    }
    auto logits = at::empty({1, head.N}, at::TensorOptions().dtype(at::kFloat));
    float* y = logits.data_ptr<float>();
#pragma omp parallel num_threads(at::get_num_threads())
    {
      std::vector<float> sums(groups), scores(pos + 1), h(normed, 0.f);
      for (size_t i = 0; i < blocks.size(); ++i) {
        const Block& b = blocks[i];
        b.norm1.apply(x.data(), h.data(), n_embd);
        {
          auto [n0, n1] = share(b.qkv.N, kRowAlign);
          b.qkv.rows(h.data(), qkv.data(), n0, n1, sums.data());
        }
#pragma omp barrier
        attend(i, pos, scores);
#pragma omp barrier
        add_product(b.proj, att.data(), sums.data());
#pragma omp barrier
        b.norm2.apply(x.data(), h.data(), n_embd);
        mlp_hidden(b, h.data(), sums.data());
#pragma omp barrier
        add_product(b.down, hidden.data(), sums.data());
#pragma omp barrier
      }
      norm_f.apply(x.data(), h.data(), n_embd);
      auto [n0, n1] = share(head.N, kRowAlign);
      head.rows(h.data(), y, n0, n1, sums.data());
      if (softcap > 0)
        for (int64_t n = n0; n < n1; ++n) y[n] = softcap * std::tanh(y[n] / softcap);
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
