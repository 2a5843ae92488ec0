// CUDA kernels: one pass over memory on the caller's stream. RGB->Lab reads 4 pixels (12 bytes) as three
// 32-bit words and writes each plane as one 4-element vector when the layout allows, else one pixel a thread.
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "color_kernels.h"
#include "color_math.h"

namespace colorize_dist {
namespace {

constexpr int kThreads = 256;  // also the LUT size: each thread fills one entry

template <typename T>
__device__ __forceinline__ T to_out(float v);
template <>
__device__ __forceinline__ float to_out<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 to_out<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half to_out<__half>(float v) { return __float2half_rn(v); }

template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads)
    rgb_to_lab_kernel(const uint8_t* __restrict__ rgb, int64_t n, int64_t hw, LabPlanes out) {
  __shared__ float lut[256];
  lut[threadIdx.x] = srgb_to_linear(static_cast<float>(threadIdx.x) / 255.0f);
  __syncthreads();

  const int64_t groups_per_image = hw / kVec;
  const int64_t total = n * groups_per_image;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t group = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; group < total; group += stride) {
    const int64_t image = group / groups_per_image;
    const int64_t p = (group - image * groups_per_image) * kVec;
    const uint8_t* src = rgb + (image * hw + p) * 3;
    uint8_t bytes[3 * kVec];
    if constexpr (kVec == 4) {
      const uint32_t* words = reinterpret_cast<const uint32_t*>(src);
      const uint32_t loaded[3] = {__ldg(words), __ldg(words + 1), __ldg(words + 2)};
      memcpy(bytes, loaded, sizeof loaded);
    } else {
#pragma unroll
      for (int i = 0; i < 3 * kVec; ++i) bytes[i] = __ldg(src + i);
    }
    Pack<T, kVec> l_pack, a_pack, b_pack;
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      float L, A, B;
      linear_rgb_to_lab(lut[bytes[3 * i]], lut[bytes[3 * i + 1]], lut[bytes[3 * i + 2]], L, A, B);
      l_pack.v[i] = to_out<T>(L * out.l_scale + out.l_shift);
      a_pack.v[i] = to_out<T>(A * out.ab_scale);
      b_pack.v[i] = to_out<T>(B * out.ab_scale);
    }
    T* l_dst = static_cast<T*>(out.l) + image * out.l_image_stride + p;
    T* a_dst = static_cast<T*>(out.ab) + image * out.ab_image_stride + p;
    *reinterpret_cast<Pack<T, kVec>*>(l_dst) = l_pack;
    *reinterpret_cast<Pack<T, kVec>*>(a_dst) = a_pack;
    *reinterpret_cast<Pack<T, kVec>*>(a_dst + hw) = b_pack;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    lab_to_rgb_kernel(const float* __restrict__ lab, int64_t n, int64_t hw, T* __restrict__ rgb) {
  const int64_t total = n * hw;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total; i += stride) {
    const int64_t offset = (i / hw) * 3 * hw + i % hw;
    float r, g, b;
    lab_to_linear_rgb(lab[offset], lab[offset + hw], lab[offset + 2 * hw], r, g, b);
    const float c[3] = {linear_to_srgb(r), linear_to_srgb(g), linear_to_srgb(b)};
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      if constexpr (sizeof(T) == 1) {
        rgb[offset + k * hw] = static_cast<T>(c[k] * 255.0f + 0.5f);
      } else {
        rgb[offset + k * hw] = c[k];
      }
    }
  }
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("colorize_dist._C: ") + what + ": " + cudaGetErrorString(err));
  }
}

// cuDevicePrimaryCtxGetState, reached through the runtime: linking libcuda would stop the module
// importing on machines without a driver.
bool has_primary_context(int device) {
  using GetState = CUresult (*)(CUdevice, unsigned int*, int*);
  static const GetState get_state = [] {
    void* fn = nullptr;
#if CUDART_VERSION >= 12050
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuDevicePrimaryCtxGetState", &fn, CUDART_VERSION,
                                                             cudaEnableDefault, nullptr);
#else
    const cudaError_t err = cudaGetDriverEntryPoint("cuDevicePrimaryCtxGetState", &fn, cudaEnableDefault);
#endif
    return err == cudaSuccess ? reinterpret_cast<GetState>(fn) : nullptr;
  }();
  unsigned int flags = 0;
  int active = 0;
  // Unknown (no entry point, or the query failed): assume a context, so the caller's device is restored.
  return get_state == nullptr || get_state(device, &flags, &active) != CUDA_SUCCESS || active != 0;
}

// Makes `device` current for a launch and gives the caller back their current device after, as
// torch's CUDAGuard does: the current device is per-thread state that belongs to the caller.
// Like torch, it does not switch back to a device that has no context yet (a fresh thread reads
// device 0): that would create one there, hundreds of MB on a GPU this process never used.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    switched_ = previous_ != device;
    if (switched_) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    // A destructor cannot throw; clear the error so the caller's next CUDA check does not report it.
    if (switched_ && has_primary_context(previous_) && cudaSetDevice(previous_) != cudaSuccess) cudaGetLastError();
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
};

// Enough blocks to fill the GPU a few times over; the kernels loop over the rest.
int grid_size(int device, int64_t work_items) {
  int sms = 0;
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  const int64_t needed = (work_items + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(needed, static_cast<int64_t>(sms) * 16)));
}

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <typename T>
void launch_rgb_to_lab(const uint8_t* rgb, int64_t n, int64_t hw, const LabPlanes& out, int device,
                       cudaStream_t stream) {
  const bool vectorized = hw % 4 == 0 && aligned(rgb, 4) && aligned(out.l, 4 * sizeof(T)) &&
                          aligned(out.ab, 4 * sizeof(T)) && out.l_image_stride % 4 == 0 &&
                          out.ab_image_stride % 4 == 0;
  if (vectorized) {
    rgb_to_lab_kernel<T, 4><<<grid_size(device, n * hw / 4), kThreads, 0, stream>>>(rgb, n, hw, out);
  } else {
    rgb_to_lab_kernel<T, 1><<<grid_size(device, n * hw), kThreads, 0, stream>>>(rgb, n, hw, out);
  }
  check(cudaGetLastError(), "rgb_to_lab kernel launch");
}

}  // namespace

void rgb_to_lab_cuda(const uint8_t* rgb, int64_t n, int64_t h, int64_t w, const LabPlanes& out, int device,
                     uintptr_t stream_handle) {
  const DeviceGuard guard(device);
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  switch (out.dtype) {
    case OutDType::kFloat32: return launch_rgb_to_lab<float>(rgb, n, h * w, out, device, stream);
    case OutDType::kBFloat16: return launch_rgb_to_lab<__nv_bfloat16>(rgb, n, h * w, out, device, stream);
    case OutDType::kFloat16: return launch_rgb_to_lab<__half>(rgb, n, h * w, out, device, stream);
  }
}

void lab_to_rgb_cuda(const float* lab, int64_t n, int64_t h, int64_t w, void* rgb, bool out_uint8, int device,
                     uintptr_t stream_handle) {
  const DeviceGuard guard(device);
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const int64_t hw = h * w;
  const int blocks = grid_size(device, n * hw);
  if (out_uint8) {
    lab_to_rgb_kernel<<<blocks, kThreads, 0, stream>>>(lab, n, hw, static_cast<uint8_t*>(rgb));
  } else {
    lab_to_rgb_kernel<<<blocks, kThreads, 0, stream>>>(lab, n, hw, static_cast<float*>(rgb));
  }
  check(cudaGetLastError(), "lab_to_rgb kernel launch");
}

}  // namespace colorize_dist
