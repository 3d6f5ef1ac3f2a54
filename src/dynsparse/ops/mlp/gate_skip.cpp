// dynsparse_cpp::gate_skip_mlp: the CATS block for a few tokens. Every gate row is read; where
// |act(gate)| > threshold for a token, that neuron's w1 row (GLU) and w2_t row are read too. The neurons split
// over torch's intra-op threads (one parallel region), their partial outputs summed after.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "_cpp.h"

namespace dynsparse {

namespace {

// part[i] += sum over token i's kept neurons j in [start, end) of h_ij w2_t[j]: first the gate rows of the
// slice (one sequential walk), then per token its kept neurons, four per pass over its output, with the
// rows of the neurons two steps ahead prefetched.
template <typename W>
void slice(const float* x, int64_t m, int64_t d, const W* w1, const float* b1, const W* w2_t, const W* wg,
           const float* bg, const float* off, float thr, int64_t act_code, int64_t d_out, int64_t start, int64_t end,
           float* __restrict__ part) {
  const bool glu = wg != nullptr;
  const W* gate = glu ? wg : w1;
  const float* gate_bias = glu ? bg : b1;
  const int64_t n = end - start;
  std::vector<float> a(m * n);
  act_rows(x, m, d, gate, gate_bias, act_code, a.data(), n, start, end);
  std::vector<int64_t> kept(n);
  for (int64_t i = 0; i < m; ++i) {
    const float* xi = x + i * d;
    const float* ai = a.data() + i * n;
    int64_t k = 0;
    for (int64_t j = 0; j < n; ++j)
      if (std::abs(ai[j]) > thr) kept[k++] = j;
    auto hidden = [&](int64_t p, int n, float* h) {
      prefetch_kept(kept.data(), k, p, n, start, {glu ? w1 : nullptr, w2_t}, {d, d_out});
      float z[4];
      if (glu) kept_dots(w1, kept.data(), k, p, n, start, xi, d, z);
      for (int q = 0; q < n; ++q) {
        const int64_t jl = kept[p + q], j = start + jl;
        const float hq = glu ? ai[jl] * (z[q] + (b1 ? b1[j] : 0.f)) : ai[jl];
        h[q] = off ? hq - off[j] : hq;
      }
    };
    add_kept_rows(kept.data(), k, start, w2_t, d_out, hidden, part + i * d_out);
  }
}

template <typename W>
void run(const float* x, int64_t m, int64_t d, const W* w1, const float* b1, const W* w2_t, const float* b2,
         const W* wg, const float* bg, const float* off, float thr, int64_t act_code, int64_t d_ff, int64_t d_out,
         float* y) {
  const int64_t threads = at::get_num_threads();
  std::vector<float> parts(threads * m * d_out, 0.f);
  // a slice of at least this many neurons, so that a small block does not pay for waking a thread
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / (m * (d * (1 + (wg != nullptr)) + d_out)));
  at::parallel_for(0, d_ff, grain, [&](int64_t s, int64_t e) {
    slice(x, m, d, w1, b1, w2_t, wg, bg, off, thr, act_code, d_out, s, e,
          parts.data() + at::get_thread_num() * m * d_out);
  });
  sum_parts(parts, threads, m, d_out, b2, y);
}

}  // namespace

at::Tensor gate_skip_mlp(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                         const at::Tensor& w2_t, const std::optional<at::Tensor>& b2,
                         const std::optional<at::Tensor>& wg, const std::optional<at::Tensor>& bg,
                         const std::optional<at::Tensor>& offset, const at::Tensor& threshold, int64_t act_code) {
  check_act(act_code);
  const BlockTables t = block_tables("gate_skip_mlp", x, w1, b1, w2_t, b2, wg, bg, offset);
  const float thr = threshold.item<float>();
  auto y = at::empty({t.m, t.d_out}, t.x32.options());
  with_table_type(t, [&](auto tag) {
    using W = decltype(tag);
    run(t.x32.data_ptr<float>(), t.m, t.d, table<W>(t.w1), data(t.b1), table<W>(t.w2_t), data(t.b2), table<W>(t.wg),
        data(t.bg), data(t.offset), thr, act_code, t.d_ff, t.d_out, y.data_ptr<float>());
  });
  return y.to(x.scalar_type());
}

}  // namespace dynsparse

TORCH_LIBRARY_FRAGMENT(dynsparse_cpp, m) {
  m.def("gate_skip_mlp(Tensor x, Tensor w1, Tensor? b1, Tensor w2_t, Tensor? b2, Tensor? wg, Tensor? bg, "
        "Tensor? offset, Tensor threshold, int act_code) -> Tensor");
}
TORCH_LIBRARY_IMPL(dynsparse_cpp, CPU, m) { m.impl("gate_skip_mlp", &dynsparse::gate_skip_mlp); }
