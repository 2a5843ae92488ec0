// CPU kernels: threads over image rows, a 256-entry table for uint8 sRGB linearisation, and a
// vectorizable inner loop over chunks of a row (table lookups first, then the arithmetic).
#include <algorithm>
#include <array>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "color_kernels.h"
#include "color_math.h"

namespace colorize_dist {
namespace {

constexpr int64_t kChunk = 256;

const std::array<float, 256>& linear_lut() {
  static const std::array<float, 256> lut = [] {
    std::array<float, 256> t{};
    for (int i = 0; i < 256; ++i) t[i] = srgb_to_linear(static_cast<float>(i) / 255.0f);
    return t;
  }();
  return lut;
}

int resolve_threads(int threads) {
#if defined(_OPENMP)
  return threads > 0 ? threads : omp_get_max_threads();
#else
  (void)threads;
  return 1;
#endif
}

struct StoreFloat {
  using T = float;
  static T convert(float v) { return v; }
};
struct StoreBFloat16 {
  using T = uint16_t;
  static T convert(float v) { return float_to_bf16_bits(v); }
};
struct StoreHalf {
  using T = uint16_t;
  static T convert(float v) { return float_to_half_bits(v); }
};

// The arithmetic of one chunk, compiled for x86-64-v3 (AVX2 and FMA together) and for baseline x86-64;
// the loader picks one. Not "avx2,fma": GCC splits that into an AVX2 clone and an FMA clone, and the
// AVX2 one it prefers has no FMA.
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target_clones("arch=x86-64-v3", "default")))
#endif
void lab_chunk(const float* __restrict r, const float* __restrict g, const float* __restrict b,
               float* __restrict L, float* __restrict A, float* __restrict B, int64_t m, float l_scale,
               float l_shift, float ab_scale) {
#pragma omp simd
  for (int64_t i = 0; i < m; ++i) {
    float l, a, bb;
    linear_rgb_to_lab(r[i], g[i], b[i], l, a, bb);
    L[i] = l * l_scale + l_shift;
    A[i] = a * ab_scale;
    B[i] = bb * ab_scale;
  }
}

template <typename Store>
void rgb_to_lab_impl(const uint8_t* rgb, int64_t n, int64_t h, int64_t w, const LabPlanes& out, int threads) {
  using T = typename Store::T;
  const float* lut = linear_lut().data();
  const int64_t rows = n * h;
#pragma omp parallel for schedule(static) num_threads(resolve_threads(threads))
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t image = row / h;
    const int64_t y = row % h;
    const uint8_t* src = rgb + row * w * 3;
    T* l_row = static_cast<T*>(out.l) + image * out.l_image_stride + y * w;
    T* a_row = static_cast<T*>(out.ab) + image * out.ab_image_stride + y * w;
    T* b_row = a_row + h * w;
    alignas(64) float r[kChunk], g[kChunk], b[kChunk], L[kChunk], A[kChunk], B[kChunk];
    for (int64_t x0 = 0; x0 < w; x0 += kChunk) {
      const int64_t m = std::min(kChunk, w - x0);
      const uint8_t* p = src + 3 * x0;
      for (int64_t i = 0; i < m; ++i) {
        r[i] = lut[p[3 * i]];
        g[i] = lut[p[3 * i + 1]];
        b[i] = lut[p[3 * i + 2]];
      }
      lab_chunk(r, g, b, L, A, B, m, out.l_scale, out.l_shift, out.ab_scale);
      for (int64_t i = 0; i < m; ++i) {
        l_row[x0 + i] = Store::convert(L[i]);
        a_row[x0 + i] = Store::convert(A[i]);
        b_row[x0 + i] = Store::convert(B[i]);
      }
    }
  }
}

template <typename T>
void lab_to_rgb_impl(const float* lab, int64_t n, int64_t h, int64_t w, T* rgb, int threads) {
  const int64_t hw = h * w;
  const int64_t rows = n * h;
#pragma omp parallel for schedule(static) num_threads(resolve_threads(threads))
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t offset = (row / h) * 3 * hw + (row % h) * w;
    const float* L = lab + offset;
    T* out = rgb + offset;
#pragma omp simd
    for (int64_t x = 0; x < w; ++x) {
      float r, g, b;
      lab_to_linear_rgb(L[x], L[x + hw], L[x + 2 * hw], r, g, b);
      r = linear_to_srgb(r);
      g = linear_to_srgb(g);
      b = linear_to_srgb(b);
      if constexpr (sizeof(T) == 1) {
        out[x] = static_cast<T>(r * 255.0f + 0.5f);
        out[x + hw] = static_cast<T>(g * 255.0f + 0.5f);
        out[x + 2 * hw] = static_cast<T>(b * 255.0f + 0.5f);
      } else {
        out[x] = r;
        out[x + hw] = g;
        out[x + 2 * hw] = b;
      }
    }
  }
}

}  // namespace

void rgb_to_lab_cpu(const uint8_t* rgb, int64_t n, int64_t h, int64_t w, const LabPlanes& out, int threads) {
  switch (out.dtype) {
    case OutDType::kFloat32: return rgb_to_lab_impl<StoreFloat>(rgb, n, h, w, out, threads);
    case OutDType::kBFloat16: return rgb_to_lab_impl<StoreBFloat16>(rgb, n, h, w, out, threads);
    case OutDType::kFloat16: return rgb_to_lab_impl<StoreHalf>(rgb, n, h, w, out, threads);
  }
}

void lab_to_rgb_cpu(const float* lab, int64_t n, int64_t h, int64_t w, void* rgb, bool out_uint8, int threads) {
  if (out_uint8) {
    lab_to_rgb_impl(lab, n, h, w, static_cast<uint8_t*>(rgb), threads);
  } else {
    lab_to_rgb_impl(lab, n, h, w, static_cast<float*>(rgb), threads);
  }
}

}  // namespace colorize_dist
