// dynsparse_cpp::lowbit_gate_mlp: an MLP block behind the low-bit MGS gate (dynsparse.gating.lowbit), for a few
// tokens. Each neuron's predicted contribution |act(g~) * u~| * ||W_down[:, j]|| comes from 4-bit-packed codes of
// the gate (routing) and up projections and the int8-rounded input; only where it exceeds the threshold are the
// neuron's exact gate, up and down rows read. The neurons split over torch's intra-op threads (one parallel
// region), their partial outputs summed after.
//
// Code layout (what dynsparse.ops.mlp.lowbit.pack writes): per row, per group of 32 inputs, 16 bytes; byte b
// holds input b's code in its low nibble and input b + 16's in its high one. scale and lo: float16 per row and
// group; the dequantized weight is lo + scale * code.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "_cpp.h"

namespace dynsparse {

namespace {

constexpr int64_t GROUP = 32;

inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      uint32_t m = man;
      do { m <<= 1; ++e; } while (!(m & 0x400u));
      bits = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (m & 0x3ffu) << 13;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | man << 13;
  } else {
    bits = sign | (exp + 127 - 15) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

// One token's gate input: x / in_scale rounded to int8 per group (absmax / 127 steps, ties to even like
// torch.round), each group's step, and each group's sum of codes (for the lo term).
struct RoundedInput {
  std::vector<int8_t> q;
  std::vector<float> step;
  std::vector<int32_t> qsum;
};

RoundedInput round_input(const float* x, const float* in_scale, int64_t m, int64_t d) {
  const int64_t groups = d / GROUP;
  RoundedInput r{std::vector<int8_t>(m * d), std::vector<float>(m * groups), std::vector<int32_t>(m * groups)};
  std::vector<float> xs(GROUP);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t g = 0; g < groups; ++g) {
      float amax = 0.f;
      for (int64_t k = 0; k < GROUP; ++k) {
        const int64_t c = g * GROUP + k;
        xs[k] = x[i * d + c] / in_scale[c];
        amax = std::max(amax, std::abs(xs[k]));
      }
      const float step = amax / 127.f;
      int32_t sum = 0;
      for (int64_t k = 0; k < GROUP; ++k) {
        const int8_t q = step > 0.f ? static_cast<int8_t>(std::nearbyint(xs[k] / step)) : 0;
        r.q[i * d + g * GROUP + k] = q;
        sum += q;
      }
      r.step[i * groups + g] = step;
      r.qsum[i * groups + g] = sum;
    }
  return r;
}

// sum_k code_k * q_k over one group: 16 packed bytes against 32 int8 inputs.
inline int32_t group_dot(const uint8_t* c, const int8_t* q) {
#if defined(__AVX2__)
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c));
  const __m256i both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);  // high nibbles in the upper lane
  const __m256i codes = _mm256_and_si256(both, _mm256_set1_epi8(0x0f));
  const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
  const __m256i pairs = _mm256_madd_epi16(_mm256_maddubs_epi16(codes, xq), _mm256_set1_epi16(1));
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(pairs), _mm256_extracti128_si256(pairs, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
#else
  int32_t s = 0;
  for (int64_t b = 0; b < 16; ++b) s += (c[b] & 0x0f) * q[b] + (c[b] >> 4) * q[b + 16];
  return s;
#endif
}

// The low-bit pre-activation of one row for one token: sum over groups of step * (scale * <code, q> + lo * sum q).
inline float lowbit_row(const uint8_t* codes, const uint16_t* scale, const uint16_t* lo, const RoundedInput& r,
                        int64_t i, int64_t d) {
  const int64_t groups = d / GROUP;
  const int8_t* q = r.q.data() + i * d;
  const float* step = r.step.data() + i * groups;
  const int32_t* qsum = r.qsum.data() + i * groups;
  float z = 0.f;
  for (int64_t g = 0; g < groups; ++g)
    z += step[g] * (half_to_float(scale[g]) * static_cast<float>(group_dot(codes + g * 16, q + g * GROUP)) +
                    half_to_float(lo[g]) * static_cast<float>(qsum[g]));
  return z;
}

struct Gate {  // the low-bit gate's tables (up_* null for a plain block)
  const uint8_t *route, *up;
  const uint16_t *route_scale, *route_lo, *up_scale, *up_lo;
  const float *b_route, *b_up, *w2_norm;
};

template <typename W>
void slice(const float* x, const RoundedInput& r, int64_t m, int64_t d, const Gate& gt, const W* w1, const float* b1,
           const W* w2_t, const W* wg, const float* bg, const float* off, float thr, int64_t act_code, int64_t d_out,
           int64_t start, int64_t end, float* __restrict__ part) {
  const bool glu = wg != nullptr;
  const int64_t n = end - start, groups = d / GROUP, row_bytes = d / 2;
  std::vector<uint8_t> keep(m * n);
  for (int64_t j = start; j < end; ++j)  // one sequential walk over the slice's codes, every token at once
    for (int64_t i = 0; i < m; ++i) {
      float h = activate(lowbit_row(gt.route + j * row_bytes, gt.route_scale + j * groups, gt.route_lo + j * groups,
                                    r, i, d) + (gt.b_route ? gt.b_route[j] : 0.f), act_code);
      if (glu)
        h *= lowbit_row(gt.up + j * row_bytes, gt.up_scale + j * groups, gt.up_lo + j * groups, r, i, d) +
             (gt.b_up ? gt.b_up[j] : 0.f);
      keep[i * n + j - start] = std::abs(h) * gt.w2_norm[j] > thr;
    }
  std::vector<int64_t> kept(n);
  for (int64_t i = 0; i < m; ++i) {
    const float* xi = x + i * d;
    int64_t k = 0;
    for (int64_t j = 0; j < n; ++j)
      if (keep[i * n + j]) kept[k++] = j;
    auto hidden = [&](int64_t p) {
      const int64_t j = start + kept[p];
      if (skip_ahead(kept.data(), k, p)) {
        const int64_t ahead = start + kept[p + KEPT_AHEAD];
        if (glu) prefetch_row(wg + ahead * d, d);
        prefetch_row(w1 + ahead * d, d);
        prefetch_row(w2_t + ahead * d_out, d_out);
      }
      const float z = dot(w1 + j * d, xi, d) + (b1 ? b1[j] : 0.f);
      const float h = glu ? activate(dot(wg + j * d, xi, d) + (bg ? bg[j] : 0.f), act_code) * z : activate(z, act_code);
      return off ? h - off[j] : h;
    };
    add_kept_rows(kept.data(), k, start, w2_t, d_out, hidden, part + i * d_out);
  }
}

template <typename W>
void run(const float* x, const RoundedInput& r, int64_t m, int64_t d, const Gate& gt, const W* w1, const float* b1,
         const W* w2_t, const float* b2, const W* wg, const float* bg, const float* off, float thr, int64_t act_code,
         int64_t d_ff, int64_t d_out, float* y) {
  const int64_t threads = at::get_num_threads();
  std::vector<float> parts(threads * m * d_out, 0.f);
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / (m * d));  // neurons per slice, as gate_skip_mlp's
  at::parallel_for(0, d_ff, grain, [&](int64_t s, int64_t e) {
    slice(x, r, m, d, gt, w1, b1, w2_t, wg, bg, off, thr, act_code, d_out, s, e,
          parts.data() + at::get_thread_num() * m * d_out);
  });
  sum_parts(parts, threads, m, d_out, b2, y);
}

void check_codes(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& lo, int64_t d_ff, int64_t d,
                 const char* name) {
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 2 && codes.size(0) == d_ff &&
                  codes.size(1) == d / 2 && codes.is_contiguous(),
              name, " codes must be contiguous uint8 (", d_ff, ", ", d / 2, "), got ", codes.scalar_type(), " ",
              codes.sizes());
  for (const auto* t : {&scale, &lo})
    TORCH_CHECK(t->scalar_type() == at::kHalf && t->dim() == 2 && t->size(0) == d_ff && t->size(1) == d / GROUP &&
                    t->is_contiguous(),
                name, " scale and lo must be contiguous float16 (", d_ff, ", ", d / GROUP, "), got ",
                t->scalar_type(), " ", t->sizes());
}

}  // namespace

at::Tensor lowbit_gate_mlp(const at::Tensor& x, const at::Tensor& route_codes, const at::Tensor& route_scale,
                           const at::Tensor& route_lo, const std::optional<at::Tensor>& up_codes,
                           const std::optional<at::Tensor>& up_scale, const std::optional<at::Tensor>& up_lo,
                           const at::Tensor& in_scale, const at::Tensor& w2_norm,
                           const std::optional<at::Tensor>& b_route, const std::optional<at::Tensor>& b_up,
                           const at::Tensor& w1, const std::optional<at::Tensor>& b1, const at::Tensor& w2_t,
                           const std::optional<at::Tensor>& b2, const std::optional<at::Tensor>& wg,
                           const std::optional<at::Tensor>& bg, const std::optional<at::Tensor>& offset,
                           const at::Tensor& threshold, int64_t act_code) {
  check_act(act_code);
  const BlockTables t = block_tables("lowbit_gate_mlp", x, w1, b1, w2_t, b2, wg, bg, offset);
  const int64_t d = t.d, d_ff = t.d_ff;
  TORCH_CHECK(d % GROUP == 0, "lowbit_gate_mlp needs d_model divisible by ", GROUP, ", got ", d);
  const bool up = up_codes.has_value() && up_codes->defined();
  TORCH_CHECK(t.glu == up, "a gated block's low-bit gate has up codes and a plain block's has none");
  check_codes(route_codes, route_scale, route_lo, d_ff, d, "route");
  if (up) check_codes(*up_codes, *up_scale, *up_lo, d_ff, d, "up");
  const auto s = optional_f32(in_scale, d, "in_scale"), nd = optional_f32(w2_norm, d_ff, "w2_norm");
  const auto brc = optional_f32(b_route, d_ff, "b_route"), buc = optional_f32(b_up, d_ff, "b_up");
  const float thr = threshold.item<float>();
  const RoundedInput r = round_input(t.x32.data_ptr<float>(), s.data_ptr<float>(), t.m, d);
  auto half = [](const at::Tensor& h) { return reinterpret_cast<const uint16_t*>(h.data_ptr()); };
  const Gate gt{route_codes.data_ptr<uint8_t>(), up ? up_codes->data_ptr<uint8_t>() : nullptr, half(route_scale),
                half(route_lo), up ? half(*up_scale) : nullptr, up ? half(*up_lo) : nullptr, data(brc), data(buc),
                nd.data_ptr<float>()};
  auto y = at::empty({t.m, t.d_out}, t.x32.options());
  with_table_type(t, [&](auto tag) {
    using W = decltype(tag);
    run(t.x32.data_ptr<float>(), r, t.m, d, gt, table<W>(t.w1), data(t.b1), table<W>(t.w2_t), data(t.b2),
        table<W>(t.wg), data(t.bg), data(t.offset), thr, act_code, d_ff, t.d_out, y.data_ptr<float>());
  });
  return y.to(x.scalar_type());
}

}  // namespace dynsparse

TORCH_LIBRARY_FRAGMENT(dynsparse_cpp, m) {
  m.def("lowbit_gate_mlp(Tensor x, Tensor route_codes, Tensor route_scale, Tensor route_lo, Tensor? up_codes, "
        "Tensor? up_scale, Tensor? up_lo, Tensor in_scale, Tensor w2_norm, Tensor? b_route, Tensor? b_up, Tensor w1, "
        "Tensor? b1, Tensor w2_t, Tensor? b2, Tensor? wg, Tensor? bg, Tensor? offset, Tensor threshold, "
        "int act_code) -> Tensor");
}
TORCH_LIBRARY_IMPL(dynsparse_cpp, CPU, m) { m.impl("lowbit_gate_mlp", &dynsparse::lowbit_gate_mlp); }
