// Shared pieces of dynsparse's C++ CPU kernels: bf16 widening, the dot product, activations by code, the row kernel,
// the skipping kernels' kept-row walk
// (dynsparse.activations: 0 gelu (erf), 1 relu, 2 silu, 3 tanh, 4 identity), argument checks.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace dynsparse {

inline float widen(float v) { return v; }
inline float widen(uint16_t v) {  // bf16 is the upper half of an fp32
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// r . x with 32 partial sums (four AVX2 vectors): one chain of fused multiply-adds would wait on its own
// latency and read a row from cache at half the speed memory delivers it.
template <typename W>
inline float dot(const W* __restrict__ r, const float* __restrict__ x, int64_t d) {
  constexpr int64_t U = 32;
  float acc[U] = {};
  int64_t k = 0;
  for (; k + U <= d; k += U) {
#pragma omp simd
    for (int64_t u = 0; u < U; ++u) acc[u] += widen(r[k + u]) * x[k + u];
  }
  float z = 0.f;
  for (; k < d; ++k) z += widen(r[k]) * x[k];
#pragma omp simd reduction(+ : z)
  for (int64_t u = 0; u < U; ++u) z += acc[u];
  return z;
}

inline float activate(float z, int64_t code) {
  switch (code) {
    case 0: return 0.5f * z * (1.f + std::erf(z * 0.7071067811865476f));
    case 1: return z > 0.f ? z : 0.f;
    case 2: return z / (1.f + std::exp(-z));
    case 3: return std::tanh(z);
    default: return z;
  }
}

// out[q] = rows[q] . x for four rows at once: four accumulator sets keep four rows' loads in flight where one
// row's dot product keeps one, and a walk over rows from memory is bound by loads in flight. next[a * 4 + q]
// (a < A), where not null, is a row to be read after rows[q]: its cache lines are requested one per chunk as
// this row is read, so the following rows stream in while these compute (gemv's next rows, the kept walk's next
// kept ones, a tree walk's two children and its node's output row).
template <typename W, int A = 1>
inline void dot4(const W* const* rows, const W* const* next, const float* __restrict__ x, int64_t d, float* out) {
  constexpr int64_t U = 16;
  float acc[4][U] = {};
  int64_t k = 0;
  for (; k + U <= d; k += U)
    for (int q = 0; q < 4; ++q) {
      for (int a = 0; a < A; ++a)
        if (next[a * 4 + q]) __builtin_prefetch(next[a * 4 + q] + k, 0, 1);
#pragma omp simd
      for (int64_t u = 0; u < U; ++u) acc[q][u] += widen(rows[q][k + u]) * x[k + u];
    }
  for (int q = 0; q < 4; ++q) {
    float z = 0.f;
#pragma omp simd reduction(+ : z)
    for (int64_t u = 0; u < U; ++u) z += acc[q][u];
    for (int64_t t = k; t < d; ++t) z += widen(rows[q][t]) * x[t];
    out[q] = z;
  }
}

// y[i * ldy + j - start] = act(w[j] . x[i] + b[j]) for rows j in [start, end): each row read once for all m
// tokens, four rows at a time, the rows two blocks on prefetched while the first token reads (gemv's kernel,
// and the gate-skip MLP's dense gate).
template <typename W>
inline void act_rows(const float* x, int64_t m, int64_t d, const W* w, const float* b, int64_t act_code, float* y,
                     int64_t ldy, int64_t start, int64_t end) {
  int64_t j = start;
  for (; j + 4 <= end; j += 4) {
    const W* rows[4] = {w + j * d, w + (j + 1) * d, w + (j + 2) * d, w + (j + 3) * d};
    const bool ahead = j + 12 <= end;
    const W* next[4] = {ahead ? rows[0] + 8 * d : nullptr, ahead ? rows[1] + 8 * d : nullptr,
                        ahead ? rows[2] + 8 * d : nullptr, ahead ? rows[3] + 8 * d : nullptr};
    const W* none[4] = {nullptr, nullptr, nullptr, nullptr};
    for (int64_t i = 0; i < m; ++i) {
      float z[4];
      dot4(rows, i == 0 ? next : none, x + i * d, d, z);
      for (int q = 0; q < 4; ++q) y[i * ldy + j + q - start] = activate(z[q] + (b ? b[j + q] : 0.f), act_code);
    }
  }
  for (; j < end; ++j) {
    const W* row = w + j * d;
    const float bj = b ? b[j] : 0.f;
    for (int64_t i = 0; i < m; ++i) y[i * ldy + j - start] = activate(dot(row, x + i * d, d) + bj, act_code);
  }
}

// Ask for the head of a row ahead of use: kept rows are a skipping walk through a table, which the hardware
// prefetchers lose at every skip, so without this each kept row starts with a round trip to memory. The
// first HEAD_LINES cache lines go out early, in one burst (asking for every line of the row in one burst
// measured slower: the prefetches wait for free line-fill buffers); the rest of the row is requested line by
// line while the kept steps before it compute (kept_dots, add_kept_rows). Locality hint 1 (prefetcht1, outer
// caches) measured faster here than 0, 2 or 3 (docs/results/smollm2_decode/gemv).
constexpr int64_t HEAD_LINES = 4;
template <typename W>
inline void prefetch_row(const W* row, int64_t n) {
  const char* p = reinterpret_cast<const char*>(row);
  const int64_t bytes = std::min<int64_t>(HEAD_LINES * 64, n * static_cast<int64_t>(sizeof(W)));
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b, 0, 1);
}

// How many kept steps ahead the skipping kernels prefetch, and whether the neuron that far ahead of kept step p
// starts a new stream (is not the one after its predecessor): only then is a prefetch worth its instructions.
constexpr int64_t KEPT_AHEAD = 4;
inline bool skip_ahead(const int64_t* kept, int64_t k, int64_t p) {
  return p + KEPT_AHEAD < k && kept[p + KEPT_AHEAD] != kept[p + KEPT_AHEAD - 1] + 1;
}

// For kept steps p..p+n-1: where the neuron KEPT_AHEAD steps on starts a new stream, prefetch the heads of its
// rows in each table (tables[t] holds rows of lengths[t] elements; a null table is skipped).
template <typename W, int T>
inline void prefetch_kept(const int64_t* kept, int64_t k, int64_t p, int n, int64_t start, const W* const (&tables)[T],
                          const int64_t (&lengths)[T]) {
  for (int q = 0; q < n; ++q)
    if (skip_ahead(kept, k, p + q)) {
      const int64_t ahead = start + kept[p + q + KEPT_AHEAD];
      for (int t = 0; t < T; ++t)
        if (tables[t]) prefetch_row(tables[t] + ahead * lengths[t], lengths[t]);
    }
}

// The row of table w (rows of d elements) that kept step p + KEPT_AHEAD reads, or null past the k-th.
template <typename W>
inline const W* row_ahead(const W* w, const int64_t* kept, int64_t k, int64_t p, int64_t start, int64_t d) {
  return p + KEPT_AHEAD < k ? w + (start + kept[p + KEPT_AHEAD]) * d : nullptr;
}

// z[q] = w[start + kept[p + q]] . x for q < n of the k kept steps (n = 4: one dot4 over the four rows, streaming
// in the rows KEPT_AHEAD steps on; n = 1: one dot).
template <typename W>
inline void kept_dots(const W* w, const int64_t* kept, int64_t k, int64_t p, int n, int64_t start, const float* x,
                      int64_t d, float* z) {
  if (n == 1) {
    z[0] = dot(w + (start + kept[p]) * d, x, d);
    return;
  }
  const W* rows[4] = {w + (start + kept[p]) * d, w + (start + kept[p + 1]) * d, w + (start + kept[p + 2]) * d,
                      w + (start + kept[p + 3]) * d};
  const W* next[4] = {row_ahead(w, kept, k, p, start, d), row_ahead(w, kept, k, p + 1, start, d),
                      row_ahead(w, kept, k, p + 2, start, d), row_ahead(w, kept, k, p + 3, start, d)};
  dot4(rows, next, x, d, z);
}

// y += sum over p < k of h_p * w2_t[start + kept[p]]: the kept neurons' down rows, four per pass over y, the
// down rows KEPT_AHEAD steps on requested line by line as these are read.
// hidden(p, n, h) fills h[0..n) with the hidden values of kept steps p..p+n-1 (n is 4, or 1 for the last
// few); it is called in order, so it may prefetch what later steps read.
template <typename W, typename H>
inline void add_kept_rows(const int64_t* kept, int64_t k, int64_t start, const W* w2_t, int64_t d_out, H&& hidden,
                          float* __restrict__ y) {
  int64_t p = 0;
  for (; p + 4 <= k; p += 4) {
    float h[4];
    hidden(p, 4, h);
    const W* o0 = w2_t + (start + kept[p]) * d_out;
    const W* o1 = w2_t + (start + kept[p + 1]) * d_out;
    const W* o2 = w2_t + (start + kept[p + 2]) * d_out;
    const W* o3 = w2_t + (start + kept[p + 3]) * d_out;
    const W* next[4] = {row_ahead(w2_t, kept, k, p, start, d_out), row_ahead(w2_t, kept, k, p + 1, start, d_out),
                        row_ahead(w2_t, kept, k, p + 2, start, d_out), row_ahead(w2_t, kept, k, p + 3, start, d_out)};
    for (int64_t c = 0; c < d_out; c += 16) {
      for (const W* r : next)
        if (r) __builtin_prefetch(r + c, 0, 1);
      const int64_t e = std::min<int64_t>(c + 16, d_out);
#pragma omp simd
      for (int64_t q = c; q < e; ++q)
        y[q] += h[0] * widen(o0[q]) + h[1] * widen(o1[q]) + h[2] * widen(o2[q]) + h[3] * widen(o3[q]);
    }
  }
  for (; p < k; ++p) {
    float h;
    hidden(p, 1, &h);
    const W* o = w2_t + (start + kept[p]) * d_out;
#pragma omp simd
    for (int64_t q = 0; q < d_out; ++q) y[q] += h * widen(o[q]);
  }
}

// y[i] = b2 + the threads' partial outputs for token i: how the neuron-split kernels finish.
inline void sum_parts(const std::vector<float>& parts, int64_t threads, int64_t m, int64_t d_out, const float* b2,
                      float* y) {
  for (int64_t i = 0; i < m; ++i) {
    float* yi = y + i * d_out;
    for (int64_t q = 0; q < d_out; ++q) yi[q] = b2 ? b2[q] : 0.f;
    for (int64_t t = 0; t < threads; ++t) {
      const float* pt = parts.data() + (t * m + i) * d_out;
      for (int64_t q = 0; q < d_out; ++q) yi[q] += pt[q];
    }
  }
}

template <typename W>
const W* table(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<const W*>(t.data_ptr()) : nullptr;
}

inline const float* data(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

inline void check_act(int64_t code) { TORCH_CHECK(code >= 0 && code <= 4, "act_code must be 0-4, got ", code); }

// A weight table as the kernels read it: contiguous float32, or bfloat16 kept as stored.
inline at::Tensor weight_table(const at::Tensor& w, const char* name) {
  TORCH_CHECK(w.device().is_cpu(), name, " must be a CPU tensor");
  if (w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kFloat) return w.contiguous();
  return w.to(at::kFloat).contiguous();
}

inline at::Tensor optional_f32(const std::optional<at::Tensor>& t, int64_t n, const char* name) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK(t->dim() == 1 && t->size(0) == n, name, " must have shape (", n, ",), got ", t->sizes());
  return t->to(at::kFloat).contiguous();
}

// An MLP block's tensors as the sparse-MLP kernels read them: x and the vectors float32, the weight tables
// float32 or bf16 as stored (one dtype for all), shapes checked once for every op that takes a block.
struct BlockTables {
  at::Tensor x32, w1, w2_t, wg, b1, b2, bg, offset;
  int64_t m, d, d_ff, d_out;
  bool glu;
};

inline BlockTables block_tables(const char* op, const at::Tensor& x, const at::Tensor& w1,
                                const std::optional<at::Tensor>& b1, const at::Tensor& w2_t,
                                const std::optional<at::Tensor>& b2, const std::optional<at::Tensor>& wg,
                                const std::optional<at::Tensor>& bg, const std::optional<at::Tensor>& offset) {
  TORCH_CHECK(x.dim() == 2 && w1.dim() == 2 && w2_t.dim() == 2 && x.size(1) == w1.size(1) &&
                  w2_t.size(0) == w1.size(0),
              op, " takes x (M, d), w1 (d_ff, d), w2_t (d_ff, d_out), got ", x.sizes(), ", ", w1.sizes(), ", ",
              w2_t.sizes());
  BlockTables t;
  t.m = x.size(0), t.d = x.size(1), t.d_ff = w1.size(0), t.d_out = w2_t.size(1);
  t.x32 = x.to(at::kFloat).contiguous();
  t.w1 = weight_table(w1, "w1"), t.w2_t = weight_table(w2_t, "w2_t");
  t.glu = wg.has_value() && wg->defined();
  t.wg = t.glu ? weight_table(*wg, "wg") : at::Tensor();
  TORCH_CHECK(!t.glu || t.wg.sizes() == w1.sizes(), "wg must have w1's shape ", w1.sizes(), ", got ", t.wg.sizes());
  TORCH_CHECK(t.w2_t.scalar_type() == t.w1.scalar_type() && (!t.glu || t.wg.scalar_type() == t.w1.scalar_type()),
              "the weight tables must share one dtype");
  t.b1 = optional_f32(b1, t.d_ff, "b1"), t.b2 = optional_f32(b2, t.d_out, "b2"), t.bg = optional_f32(bg, t.d_ff, "bg");
  t.offset = optional_f32(offset, t.d_ff, "offset");
  return t;
}

// f(W{}) with W the tables' element type as the kernels read it: uint16_t (bf16 bits) or float.
template <typename F>
inline void with_table_type(const BlockTables& t, F&& f) {
  if (t.w1.scalar_type() == at::kBFloat16)
    f(uint16_t{});
  else
    f(float{});
}

}  // namespace dynsparse
