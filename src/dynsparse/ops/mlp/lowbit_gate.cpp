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
// torch.round), each group's step, and each group's step times its sum of codes (the lo term's factor).
// pair_q and pair_step lay out two groups g, g + 1 as one 32-byte load of their packed codes meets them: the
// low nibbles are inputs 0-15 of g then of g + 1, the high nibbles inputs 16-31 of each; pair_step holds
// g's step in four lanes and g + 1's in the other four.
struct RoundedInput {
  std::vector<int8_t> q, pair_q;
  std::vector<float> step, step_sum, pair_step;
};

RoundedInput round_input(const float* x, const float* in_scale, int64_t m, int64_t d) {
  const int64_t groups = d / GROUP, pairs = groups / 2;
  RoundedInput r{std::vector<int8_t>(m * d), std::vector<int8_t>(m * pairs * 2 * GROUP),
                 std::vector<float>(m * groups), std::vector<float>(m * groups), std::vector<float>(m * pairs * 8)};
  std::vector<float> xs(GROUP);
  for (int64_t i = 0; i < m; ++i) {
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
      r.step_sum[i * groups + g] = step * static_cast<float>(sum);
    }
    for (int64_t p = 0; p < pairs; ++p) {
      const int8_t* q = r.q.data() + i * d + 2 * p * GROUP;
      int8_t* out = r.pair_q.data() + (i * pairs + p) * 2 * GROUP;
      for (int64_t b = 0; b < 16; ++b) {
        out[b] = q[b], out[16 + b] = q[GROUP + b];            // low nibbles: inputs 0-15 of g, of g + 1
        out[32 + b] = q[16 + b], out[48 + b] = q[GROUP + 16 + b];  // high nibbles: inputs 16-31
      }
      for (int64_t l = 0; l < 8; ++l) r.pair_step[(i * pairs + p) * 8 + l] = r.step[i * groups + 2 * p + l / 4];
    }
  }
  return r;
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// Sums of 4 adjacent products of unsigned codes a and signed inputs b, in 8 int32 lanes (VNNI: one instruction).
inline __m256i dpbusd(__m256i a, __m256i b) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1));
#endif
}
#endif

// The low-bit pre-activations of R rows (a neuron's routing and up rows) for one token: over groups g,
// step_g * (scale_g * <code_g, q_g> + lo_g * sum q_g). Two groups per 32-byte load of codes; the products
// stay in eight float lanes per row (one horizontal sum per row, not per group); the rows share each load of
// the input.
template <int R>
inline void lowbit_rows(const uint8_t* const* codes, const uint16_t* const* scale, const uint16_t* const* lo,
                        const RoundedInput& r, int64_t i, int64_t d, float* z) {
  const int64_t groups = d / GROUP;
  const float* step = r.step.data() + i * groups;
  const float* step_sum = r.step_sum.data() + i * groups;
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
  const int64_t pairs = groups / 2;
  const int8_t* pq = r.pair_q.data() + i * pairs * 2 * GROUP;
  const float* ps = r.pair_step.data() + i * pairs * 8;
  const __m256i nibble = _mm256_set1_epi8(0x0f), spread = _mm256_set_epi32(1, 1, 1, 1, 0, 0, 0, 0);
  __m256 acc[R], lo_acc[R];
#pragma GCC unroll 4
  for (int k = 0; k < R; ++k) acc[k] = lo_acc[k] = _mm256_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    const __m256i qa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pq + p * 2 * GROUP));
    const __m256i qb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pq + p * 2 * GROUP + GROUP));
    const __m256 sv = _mm256_loadu_ps(ps + p * 8);
#pragma GCC unroll 4
    for (int k = 0; k < R; ++k) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes[k] + p * GROUP));
      const __m256i s = _mm256_add_epi32(dpbusd(_mm256_and_si256(v, nibble), qa),
                                         dpbusd(_mm256_and_si256(_mm256_srli_epi16(v, 4), nibble), qb));
      int32_t sc2;
      std::memcpy(&sc2, scale[k] + 2 * p, sizeof sc2);
      const __m256 sc = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_cvtph_ps(_mm_cvtsi32_si128(sc2))), spread);
      acc[k] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(s), sv), sc, acc[k]);
    }
  }
  int64_t g = 0;
  for (; g + 8 <= groups; g += 8) {
    const __m256 ss = _mm256_loadu_ps(step_sum + g);
#pragma GCC unroll 4
    for (int k = 0; k < R; ++k)
      lo_acc[k] = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lo[k] + g))), ss,
                                  lo_acc[k]);
  }
#pragma GCC unroll 4
  for (int k = 0; k < R; ++k) {
    float t = hsum(acc[k]) + hsum(lo_acc[k]);
    for (int64_t h = g; h < groups; ++h) t += half_to_float(lo[k][h]) * step_sum[h];
    if (groups % 2) {  // the last group on its own
      const int64_t last = groups - 1;
      const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes[k] + last * 16));
      const __m256i c = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), nibble);
      const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r.q.data() + i * d + last * GROUP));
      int32_t lanes[8];
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(lanes), dpbusd(c, xq));
      int32_t s = 0;
      for (int32_t v : lanes) s += v;
      t += step[last] * half_to_float(scale[k][last]) * static_cast<float>(s);
    }
    z[k] = t;
  }
#else
  const int8_t* q = r.q.data() + i * d;
  for (int k = 0; k < R; ++k) {
    float t = 0.f;
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* c = codes[k] + g * 16;
      const int8_t* qg = q + g * GROUP;
      int32_t s = 0;
      for (int64_t b = 0; b < 16; ++b) s += (c[b] & 0x0f) * qg[b] + (c[b] >> 4) * qg[b + 16];
      t += step[g] * half_to_float(scale[k][g]) * static_cast<float>(s) + half_to_float(lo[k][g]) * step_sum[g];
    }
    z[k] = t;
  }
#endif
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
      float z[2];
      float h;
      if (glu) {
        const uint8_t* codes[2] = {gt.route + j * row_bytes, gt.up + j * row_bytes};
        const uint16_t* scale[2] = {gt.route_scale + j * groups, gt.up_scale + j * groups};
        const uint16_t* lo[2] = {gt.route_lo + j * groups, gt.up_lo + j * groups};
        lowbit_rows<2>(codes, scale, lo, r, i, d, z);
        h = activate(z[0] + (gt.b_route ? gt.b_route[j] : 0.f), act_code) * (z[1] + (gt.b_up ? gt.b_up[j] : 0.f));
      } else {
        const uint8_t* codes[1] = {gt.route + j * row_bytes};
        const uint16_t* scale[1] = {gt.route_scale + j * groups};
        const uint16_t* lo[1] = {gt.route_lo + j * groups};
        lowbit_rows<1>(codes, scale, lo, r, i, d, z);
        h = activate(z[0] + (gt.b_route ? gt.b_route[j] : 0.f), act_code);
      }
      keep[i * n + j - start] = std::abs(h) * gt.w2_norm[j] > thr;
    }
  std::vector<int64_t> kept(n);
  for (int64_t i = 0; i < m; ++i) {
    const float* xi = x + i * d;
    int64_t k = 0;
    for (int64_t j = 0; j < n; ++j)
      if (keep[i * n + j]) kept[k++] = j;
    auto hidden = [&](int64_t p, int n, float* h) {
      prefetch_kept(kept.data(), k, p, n, start, {wg, w1, w2_t}, {d, d, d_out});
      float z[4], g[4];
      kept_dots(w1, kept.data(), k, p, n, start, xi, d, z);
      if (glu) kept_dots(wg, kept.data(), k, p, n, start, xi, d, g);
      for (int q = 0; q < n; ++q) {
        const int64_t j = start + kept[p + q];
        const float zq = z[q] + (b1 ? b1[j] : 0.f);
        const float hq = glu ? activate(g[q] + (bg ? bg[j] : 0.f), act_code) * zq : activate(zq, act_code);
        h[q] = off ? hq - off[j] : hq;
      }
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
