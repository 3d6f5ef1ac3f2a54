// dynsparse_cpp::gemv: y = act(x w^T + b) for a few tokens, each weight row read once for all of them,
// rows split over torch's own intra-op threads (at::parallel_for), bfloat16 tables read as stored.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "_cpp.h"

namespace dynsparse {

at::Tensor gemv(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b, int64_t act_code) {
  check_act(act_code);
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "gemv takes x (M, d) and w (N, d), got ",
              x.sizes(), " and ", w.sizes());
  const auto x32 = x.to(at::kFloat).contiguous();
  const auto wc = weight_table(w, "w");
  const auto b32 = optional_f32(b, w.size(0), "b");
  const int64_t m = x.size(0), d = x.size(1), n = w.size(0);
  auto y = at::empty({m, n}, x32.options());
  const float* xp = x32.data_ptr<float>();
  const float* bp = b32.defined() ? b32.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  // a grain of rows that keeps each thread's slice a few KB of weights at least
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(d, 1));
  at::parallel_for(0, n, grain, [&](int64_t s, int64_t e) {
    if (wc.scalar_type() == at::kBFloat16)
      act_rows(xp, m, d, reinterpret_cast<const uint16_t*>(wc.data_ptr()), bp, act_code, yp + s, n, s, e);
    else
      act_rows(xp, m, d, wc.data_ptr<float>(), bp, act_code, yp + s, n, s, e);
  });
  return y.to(x.scalar_type());
}

}  // namespace dynsparse

TORCH_LIBRARY_FRAGMENT(dynsparse_cpp, m) { m.def("gemv(Tensor x, Tensor w, Tensor? b, int act_code) -> Tensor"); }
TORCH_LIBRARY_IMPL(dynsparse_cpp, CPU, m) { m.impl("gemv", &dynsparse::gemv); }
