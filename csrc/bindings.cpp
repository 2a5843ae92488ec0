// pybind11 module colorize_dist._C. It takes raw data pointers (tensor.data_ptr()) and a CUDA stream
// handle rather than tensors, so it never links against libtorch. Shapes, dtypes and devices are
// validated in colorize_dist/color.py; here we check what a pointer cannot tell us.
#include <pybind11/pybind11.h>

#include <stdexcept>

#if defined(COLORIZE_DIST_WITH_CUDA)
#include <cuda_runtime_api.h>  // CUDART_VERSION
#endif

#include "color_kernels.h"

namespace py = pybind11;
using namespace colorize_dist;

namespace {

void check_args(uintptr_t src, uintptr_t dst, int64_t n, int64_t h, int64_t w) {
  if (src == 0 || dst == 0) throw std::invalid_argument("colorize_dist._C: null data pointer");
  if (n <= 0 || h <= 0 || w <= 0) throw std::invalid_argument("colorize_dist._C: sizes must be positive");
}

LabPlanes make_planes(uintptr_t l, uintptr_t ab, int64_t l_stride, int64_t ab_stride, float l_scale,
                      float l_shift, float ab_scale, int dtype) {
  if (dtype < 0 || dtype > 2) throw std::invalid_argument("colorize_dist._C: dtype code must be 0, 1 or 2");
  if (ab == 0) throw std::invalid_argument("colorize_dist._C: null data pointer");
  return LabPlanes{reinterpret_cast<void*>(l), reinterpret_cast<void*>(ab), l_stride, ab_stride,
                   l_scale, l_shift, ab_scale, static_cast<OutDType>(dtype)};
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "RGB<->CIELAB kernels (CPU, and CUDA when built with nvcc)";
  // cuda_archs: the compute capabilities with SASS (setup.py's list); PTX of the highest serves newer GPUs.
  // cuda_runtime_version: the CUDA runtime linked in (0 without CUDA kernels), checked against the driver.
#if defined(COLORIZE_DIST_WITH_CUDA)
  m.attr("cuda_compiled") = true;
  m.attr("cuda_archs") = py::make_tuple(COLORIZE_DIST_CUDA_ARCHS);
  m.attr("cuda_runtime_version") = CUDART_VERSION;  // e.g. 13000: the driver must support this CUDA major version
#else
  m.attr("cuda_compiled") = false;
  m.attr("cuda_archs") = py::tuple();
  m.attr("cuda_runtime_version") = 0;
#endif

  m.def(
      "rgb_to_lab_cpu",
      [](uintptr_t rgb, int64_t n, int64_t h, int64_t w, uintptr_t l, uintptr_t ab, int64_t l_stride,
         int64_t ab_stride, float l_scale, float l_shift, float ab_scale, int dtype, int threads) {
        check_args(rgb, l, n, h, w);
        const LabPlanes out = make_planes(l, ab, l_stride, ab_stride, l_scale, l_shift, ab_scale, dtype);
        py::gil_scoped_release release;
        rgb_to_lab_cpu(reinterpret_cast<const uint8_t*>(rgb), n, h, w, out, threads);
      });
  m.def("lab_to_rgb_cpu", [](uintptr_t lab, int64_t n, int64_t h, int64_t w, uintptr_t rgb, bool out_uint8,
                             int threads) {
    check_args(lab, rgb, n, h, w);
    py::gil_scoped_release release;
    lab_to_rgb_cpu(reinterpret_cast<const float*>(lab), n, h, w, reinterpret_cast<void*>(rgb), out_uint8, threads);
  });
#if defined(COLORIZE_DIST_WITH_CUDA)
  m.def(
      "rgb_to_lab_cuda",
      [](uintptr_t rgb, int64_t n, int64_t h, int64_t w, uintptr_t l, uintptr_t ab, int64_t l_stride,
         int64_t ab_stride, float l_scale, float l_shift, float ab_scale, int dtype, int device, uintptr_t stream) {
        check_args(rgb, l, n, h, w);
        const LabPlanes out = make_planes(l, ab, l_stride, ab_stride, l_scale, l_shift, ab_scale, dtype);
        py::gil_scoped_release release;
        rgb_to_lab_cuda(reinterpret_cast<const uint8_t*>(rgb), n, h, w, out, device, stream);
      });
  m.def("lab_to_rgb_cuda", [](uintptr_t lab, int64_t n, int64_t h, int64_t w, uintptr_t rgb, bool out_uint8,
                              int device, uintptr_t stream) {
    check_args(lab, rgb, n, h, w);
    py::gil_scoped_release release;
    lab_to_rgb_cuda(reinterpret_cast<const float*>(lab), n, h, w, reinterpret_cast<void*>(rgb), out_uint8, device,
                    stream);
  });
#endif
}
