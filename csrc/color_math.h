// Colour math shared by the CPU and CUDA kernels: sRGB (IEC 61966-2-1) <-> CIE XYZ (D65) <-> CIELAB.
// Constants match skimage.color so results agree with it to float precision.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define CD_HD __host__ __device__ __forceinline__
#else
#define CD_HD inline
#endif

namespace colorize_dist {

// D65 reference white (2° observer), as skimage.color uses.
constexpr float kWhiteX = 0.95047f;
constexpr float kWhiteY = 1.0f;
constexpr float kWhiteZ = 1.08883f;

// CIE f(t): cube root above (6/29)^3, linear segment below so that f is continuous.
constexpr float kLabEpsilon = 216.0f / 24389.0f;     // (6/29)^3
constexpr float kLabSlope = 841.0f / 108.0f;         // 1 / (3 (6/29)^2)
constexpr float kLabOffset = 4.0f / 29.0f;
constexpr float kLabDeltaInv = 6.0f / 29.0f;

CD_HD float srgb_to_linear(float c) {
  return c <= 0.04045f ? c / 12.92f : powf((c + 0.055f) / 1.055f, 2.4f);
}

CD_HD float linear_to_srgb(float c) {
  c = c < 0.0f ? 0.0f : (c > 1.0f ? 1.0f : c);  // out of gamut: clip, never wrap
  return c <= 0.0031308f ? 12.92f * c : 1.055f * powf(c, 1.0f / 2.4f) - 0.055f;
}

#if !defined(__CUDA_ARCH__)
// Cube root without pow: a bit-level guess of t^(-1/3), three Newton steps (no division), then t * r^2.
// Relative error below 1e-7 for the normal floats f(t) sees; the compiler vectorizes it.
inline float cbrt_newton(float t) {
  uint32_t bits;
  std::memcpy(&bits, &t, sizeof bits);
  // bits / 3 through float: the guess only needs ~1e-3 relative accuracy, and this form vectorizes.
  bits = 0x54a21d2au - static_cast<uint32_t>(static_cast<int32_t>(static_cast<float>(static_cast<int32_t>(bits)) *
                                                                   (1.0f / 3.0f)));
  float r;
  std::memcpy(&r, &bits, sizeof r);
  r = r * (4.0f - t * r * r * r) * (1.0f / 3.0f);
  r = r * (4.0f - t * r * r * r) * (1.0f / 3.0f);
  r = r * (4.0f - t * r * r * r) * (1.0f / 3.0f);
  return t * r * r;
}
#endif

CD_HD float lab_f(float t) {
#if defined(__CUDA_ARCH__)
  const float root = cbrtf(t);
#else
  const float root = cbrt_newton(t);
#endif
  return t > kLabEpsilon ? root : kLabSlope * t + kLabOffset;
}

CD_HD float lab_f_inverse(float f) {
  return f > kLabDeltaInv ? f * f * f : (f - kLabOffset) / kLabSlope;
}

// Linear RGB -> Lab in standard units (L 0..100, a and b about -128..127).
CD_HD void linear_rgb_to_lab(float r, float g, float b, float& L, float& A, float& B) {
  const float x = (0.412453f * r + 0.357580f * g + 0.180423f * b) * (1.0f / kWhiteX);
  const float y = (0.212671f * r + 0.715160f * g + 0.072169f * b) * (1.0f / kWhiteY);
  const float z = (0.019334f * r + 0.119193f * g + 0.950227f * b) * (1.0f / kWhiteZ);
  const float fx = lab_f(x), fy = lab_f(y), fz = lab_f(z);
  L = 116.0f * fy - 16.0f;
  A = 500.0f * (fx - fy);
  B = 200.0f * (fy - fz);
}

// Lab -> linear RGB, unclipped. The matrix is the float64 inverse of the one above.
CD_HD void lab_to_linear_rgb(float L, float A, float B, float& r, float& g, float& b) {
  const float fy = (L + 16.0f) * (1.0f / 116.0f);
  const float fx = fy + A * (1.0f / 500.0f);
  float fz = fy - B * (1.0f / 200.0f);
  fz = fz < 0.0f ? 0.0f : fz;  // as skimage does for such out-of-gamut colours
  const float x = kWhiteX * lab_f_inverse(fx);
  const float y = kWhiteY * lab_f_inverse(fy);
  const float z = kWhiteZ * lab_f_inverse(fz);
  r = 3.2404813432f * x - 1.5371515163f * y - 0.4985363262f * z;
  g = -0.9692549500f * x + 1.8759900015f * y + 0.0415559266f * z;
  b = 0.0556466391f * x - 0.2040413384f * y + 1.0573110696f * z;
}

// Round-to-nearest-even float -> bfloat16 / IEEE half bit patterns (host side; CUDA has intrinsics).
inline uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline uint16_t float_to_half_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  if (u >= 0x47800000u) return static_cast<uint16_t>(sign | (u > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (u < 0x38800000u) {
    // Subnormal or zero: adding 0.5f aligns the 10 mantissa bits at the bottom, rounding to even.
    float shifted;
    std::memcpy(&shifted, &u, sizeof shifted);
    shifted += 0.5f;
    std::memcpy(&u, &shifted, sizeof u);
    return static_cast<uint16_t>(sign | (u - 0x3f000000u));
  }
  u += 0xc8000fffu + ((u >> 13) & 1u);  // rebias exponent (127 -> 15) and round to nearest even
  return static_cast<uint16_t>(sign | (u >> 13));
}

}  // namespace colorize_dist
