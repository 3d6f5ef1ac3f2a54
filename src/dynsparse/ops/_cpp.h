// Shared pieces of dynsparse's C++ CPU kernels: bf16 widening, the dot product, activations by code, the row kernel
// (dynsparse.activations: 0 gelu (erf), 1 relu, 2 silu, 3 tanh, 4 identity), argument checks.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <cstring>

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

// y[i * ldy + j - start] = act(w[j] . x[i] + b[j]) for rows j in [start, end): each row read once for all m
// tokens (gemv's kernel, and the gate-skip MLP's dense gate).
template <typename W>
inline void act_rows(const float* x, int64_t m, int64_t d, const W* w, const float* b, int64_t act_code, float* y,
                     int64_t ldy, int64_t start, int64_t end) {
  for (int64_t j = start; j < end; ++j) {
    const W* row = w + j * d;
    const float bj = b ? b[j] : 0.f;
    for (int64_t i = 0; i < m; ++i) y[i * ldy + j - start] = activate(dot(row, x + i * d, d) + bj, act_code);
  }
}

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

}  // namespace dynsparse
