// dynsparse_cpp::tree_infer: tree FF inference for a few tokens (the decode step). Each token walks one
// root-to-leaf path per tree, child 2i+2 where z > 0 and 2i+1 otherwise, one dot product and one axpy per
// node. Four trees walk together: a walk is a chain of dependent row reads (the branch picks the next row),
// so one tree keeps one row's loads in flight and four keep four. Trees split over torch's intra-op threads,
// their partial outputs summed after; bfloat16 tables are read as stored. Why C++ beside numba: numba's call
// costs tens of microseconds, as much as a whole tree layer at one token.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "_cpp.h"

namespace dynsparse {
namespace {

struct Trees {
  int64_t m, d, d_out, nodes, depth, act_code;
  bool act_on_path;
  const float *x, *b_in;
};

// Trees [t0, t0 + n) (n <= 4) for token i: y += each tree's path output; leaves[t] = the leaf it reached.
template <typename W>
void walk(const Trees& s, const W* w_in, const W* w_out, int64_t i, int64_t t0, int n, float* y, float* acc,
          int64_t* leaves) {
  const float* xi = s.x + i * s.d;
  int64_t node[4] = {0, 0, 0, 0};
  if (s.act_on_path) std::fill(acc, acc + 4 * s.d_out, 0.f);
  for (int64_t level = 0; level <= s.depth; ++level) {
    float z[4];
    const W* rows[4];
    // streamed in while this level's rows are read (the branch is known only after the dot product): both
    // children's w_in rows and this node's w_out row
    const W* ahead[12];
    for (int q = 0; q < 4; ++q) {
      const int64_t t = t0 + std::min(q, n - 1), row = t * s.nodes + node[q];
      rows[q] = w_in + row * s.d;
      const bool inner = level < s.depth && q < n;
      ahead[q] = inner ? w_in + (row + node[q] + 1) * s.d : nullptr;  // child 2i+1, row t*N + 2i+1
      ahead[4 + q] = inner ? w_in + (row + node[q] + 2) * s.d : nullptr;
      ahead[8 + q] = q < n && s.d_out <= s.d ? w_out + row * s.d_out : nullptr;
    }
    dot4<W, 3>(rows, ahead, xi, s.d, z);
    for (int q = 0; q < n; ++q) {
      const int64_t t = t0 + q;
      const float zq = z[q] + (s.b_in ? s.b_in[t * s.nodes + node[q]] : 0.f);
      const float h = s.act_on_path ? zq : activate(zq, s.act_code);
      const W* o = w_out + (t * s.nodes + node[q]) * s.d_out;
      float* dst = s.act_on_path ? acc + q * s.d_out : y;
#pragma omp simd
      for (int64_t k = 0; k < s.d_out; ++k) dst[k] += h * widen(o[k]);
      if (level == s.depth) leaves[t] = node[q] - ((int64_t(1) << s.depth) - 1);
      node[q] = zq > 0.f ? 2 * node[q] + 2 : 2 * node[q] + 1;
    }
  }
  if (s.act_on_path)
    for (int q = 0; q < n; ++q)
      for (int64_t k = 0; k < s.d_out; ++k) y[k] += activate(acc[q * s.d_out + k], s.act_code);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> tree_infer(const at::Tensor& x, const at::Tensor& w_in,
                                              const std::optional<at::Tensor>& b_in, const at::Tensor& w_out,
                                              int64_t depth, int64_t act_code, bool act_on_path) {
  check_act(act_code);
  TORCH_CHECK(x.dim() == 2 && w_in.dim() == 3 && w_out.dim() == 3 && x.size(1) == w_in.size(2) &&
                  w_out.size(0) == w_in.size(0) && w_out.size(1) == w_in.size(1),
              "tree_infer takes x (M, d), w_in (T, N, d) and w_out (T, N, d_out), got ", x.sizes(), ", ",
              w_in.sizes(), " and ", w_out.sizes());
  TORCH_CHECK(depth >= 0 && depth < 62 && w_in.size(1) == (int64_t(2) << depth) - 1,
              "w_in holds ", w_in.size(1), " nodes per tree, not the 2^(depth+1) - 1 of depth ", depth);
  const auto x32 = x.to(at::kFloat).contiguous();
  const auto wi = weight_table(w_in, "w_in");
  const auto wo = weight_table(w_out, "w_out");
  TORCH_CHECK(wi.scalar_type() == wo.scalar_type(), "w_in and w_out must share a dtype");
  const int64_t trees = w_in.size(0);
  const auto b32 = b_in.has_value() && b_in->defined()
                       ? optional_f32(b_in->reshape({-1}), trees * w_in.size(1), "b_in")
                       : at::Tensor();
  const Trees s{x.size(0), x.size(1), w_out.size(2), w_in.size(1), depth, act_code, act_on_path,
                x32.data_ptr<float>(), data(b32)};
  const int64_t threads = at::get_num_threads();
  std::vector<float> parts(threads * s.m * s.d_out, 0.f);
  auto leaves = at::empty({s.m, trees}, x.options().dtype(at::kLong));
  int64_t* lp = leaves.data_ptr<int64_t>();
  const int64_t groups = (trees + 3) / 4;
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    float* part = parts.data() + at::get_thread_num() * s.m * s.d_out;
    std::vector<float> acc(4 * s.d_out);
    for (int64_t i = 0; i < s.m; ++i)
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t t0 = 4 * g;
        const int n = static_cast<int>(std::min<int64_t>(4, trees - t0));
        if (wi.scalar_type() == at::kBFloat16)
          walk(s, reinterpret_cast<const uint16_t*>(wi.data_ptr()), reinterpret_cast<const uint16_t*>(wo.data_ptr()),
               i, t0, n, part + i * s.d_out, acc.data(), lp + i * trees);
        else
          walk(s, wi.data_ptr<float>(), wo.data_ptr<float>(), i, t0, n, part + i * s.d_out, acc.data(),
               lp + i * trees);
      }
  });
  auto y = at::empty({s.m, s.d_out}, x32.options());
  sum_parts(parts, threads, s.m, s.d_out, nullptr, y.data_ptr<float>());
  return {y.to(x.scalar_type()), leaves};
}

}  // namespace dynsparse

TORCH_LIBRARY_FRAGMENT(dynsparse_cpp, m) {
  m.def("tree_infer(Tensor x, Tensor w_in, Tensor? b_in, Tensor w_out, int depth, int act_code, bool act_on_path) "
        "-> (Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(dynsparse_cpp, CPU, m) { m.impl("tree_infer", &dynsparse::tree_infer); }
