// The kept-neuron walk of a sparse SwiGLU MLP at one token, from memory: for each kept neuron j,
// h = silu(wg[j] . x) * (w1[j] . x) and y += h * w2_t[j]. Compares the three tables apart (dynsparse's
// layout) with one bundled row [wg_j | w1_j | w2_j] per neuron, with and without prefetching the head of
// the next stream two kept steps ahead; kept neurons are drawn at random with the given share.
// 100 blocks of 576 x 1536 (1 GB of fp32 tables, beyond the caches), 2 OpenMP threads, median of 15 passes.
//
//   g++ -O3 -march=native -fopenmp experiments/kept_walk_layout.cpp -o /tmp/kept_walk
//   for share in 1.0 0.57 0.3; do for layout in 0 1; do for pf in 0 1; do /tmp/kept_walk $share $layout $pf; done; done; done
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

constexpr int D = 576, F = 1536, BLOCKS = 100, THREADS = 2, PASSES = 15;

static float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static float dot(const float* a, const float* x) {
  __m256 s[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int k = 0; k < D; k += 32)
    for (int u = 0; u < 4; ++u) s[u] = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8 * u), _mm256_loadu_ps(x + k + 8 * u), s[u]);
  return hsum(_mm256_add_ps(_mm256_add_ps(s[0], s[1]), _mm256_add_ps(s[2], s[3])));
}

static void axpy(float h, const float* r, float* y) {
  const __m256 hv = _mm256_set1_ps(h);
  for (int k = 0; k < D; k += 8) _mm256_storeu_ps(y + k, _mm256_fmadd_ps(hv, _mm256_loadu_ps(r + k), _mm256_loadu_ps(y + k)));
}

static void prefetch_head(const float* row) {  // four cache lines, as dynsparse's kept walks do
  for (int b = 0; b < 256; b += 64) __builtin_prefetch(reinterpret_cast<const char*>(row) + b, 0, 1);
}

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s SHARE LAYOUT(0 apart, 1 bundled) PREFETCH(0/1)\n", argv[0]);
    return 2;
  }
  const double share = std::atof(argv[1]);
  const bool bundled = std::atoi(argv[2]) != 0, prefetch = std::atoi(argv[3]) != 0;
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> u(-0.05f, 0.05f);
  std::bernoulli_distribution keep(share);
  std::vector<std::vector<float>> tables(BLOCKS, std::vector<float>(size_t(3) * F * D));
  std::vector<std::vector<int>> kept(BLOCKS);
  for (int b = 0; b < BLOCKS; ++b) {
    for (float& v : tables[b]) v = u(rng);
    for (int j = 0; j < F; ++j)
      if (keep(rng)) kept[b].push_back(j);
  }
  std::vector<float> x(D), parts(THREADS * D);
  for (float& v : x) v = u(rng);
  // the three rows of neuron j in block b
  auto rows = [&](int b, int j, const float** r) {
    const float* base = tables[b].data();
    for (int t = 0; t < 3; ++t) r[t] = bundled ? base + (size_t(j) * 3 + t) * D : base + (size_t(t) * F + j) * D;
  };
  omp_set_num_threads(THREADS);
  std::vector<double> seconds;
  for (int pass = 0; pass < PASSES; ++pass) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int b = 0; b < BLOCKS; ++b) {
      const std::vector<int>& k = kept[b];
      std::fill(parts.begin(), parts.end(), 0.f);
#pragma omp parallel
      {
        const int t = omp_get_thread_num(), n = int(k.size()), s = n * t / THREADS, e = n * (t + 1) / THREADS;
        float* y = parts.data() + t * D;
        for (int p = s; p < e; ++p) {
          const float* r[3];
          if (prefetch && p + 2 < e && k[p + 2] != k[p + 1] + 1) {
            const float* ahead[3];
            rows(b, k[p + 2], ahead);
            for (const float* a : ahead) prefetch_head(a);
          }
          rows(b, k[p], r);
          const float g = dot(r[0], x.data()), up = dot(r[1], x.data());
          axpy(g / (1.f + std::exp(-g)) * up, r[2], y);
        }
      }
    }
    seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(seconds.begin(), seconds.end());
  const double median = seconds[seconds.size() / 2];
  double bytes = 0;
  for (const auto& k : kept) bytes += k.size() * 3.0 * D * sizeof(float);
  std::printf("share %.2f %s prefetch %d: %.2f ms for %d blocks, %.1f GB/s\n", share, bundled ? "bundled" : "apart",
              int(prefetch), median * 1e3, BLOCKS, bytes / median / 1e9);
}
