// Launchers of the RGB<->Lab kernels. Inputs are checked by the Python API (colorize_dist/color.py)
// and by the bindings; these functions trust their arguments.
#pragma once

#include <cstdint>

namespace colorize_dist {

enum class OutDType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Where the RGB->Lab kernels write: image i's L plane starts at l + i * l_image_stride and its a, b
// planes at ab + i * ab_image_stride (b one plane after a); strides in elements. Each channel is
// written as value * scale + shift, so one kernel serves standard units and the model's normalisation.
struct LabPlanes {
  void* l;
  void* ab;
  int64_t l_image_stride;
  int64_t ab_image_stride;
  float l_scale, l_shift, ab_scale;
  OutDType dtype;
};

// rgb: uint8 (n, h, w, 3) contiguous. threads <= 0: all OpenMP threads.
void rgb_to_lab_cpu(const uint8_t* rgb, int64_t n, int64_t h, int64_t w, const LabPlanes& out, int threads);
// lab: float32 (n, 3, h, w); rgb: (n, 3, h, w) float32 in [0, 1] or uint8.
void lab_to_rgb_cpu(const float* lab, int64_t n, int64_t h, int64_t w, void* rgb, bool out_uint8, int threads);

#if defined(COLORIZE_DIST_WITH_CUDA)
// Same contracts on device pointers; launched on `stream` (a cudaStream_t) of `device`, leaving the
// calling thread's current device as it was.
// Throw std::runtime_error with CUDA's message on failure.
void rgb_to_lab_cuda(const uint8_t* rgb, int64_t n, int64_t h, int64_t w, const LabPlanes& out, int device,
                     uintptr_t stream);
void lab_to_rgb_cuda(const float* lab, int64_t n, int64_t h, int64_t w, void* rgb, bool out_uint8, int device,
                     uintptr_t stream);
#endif

}  // namespace colorize_dist
