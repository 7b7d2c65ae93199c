// Helpers for the CUDA launchers: error checks that raise meldkit::Error, and a device guard.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "meldkit/status.h"

namespace meldkit {

inline void cuda_check(cudaError_t err, const char* op, const char* what) {
  if (err != cudaSuccess) {
    throw_runtime_error(std::string(op) + ": CUDA error in " + what + ": " + cudaGetErrorName(err) +
                        " (" + cudaGetErrorString(err) + ")");
  }
}

// Makes `device` current for the launch and restores the caller's device afterwards, so a kernel
// always runs on the GPU that holds its tensors whatever torch's current device is.
class CudaDeviceGuard {
 public:
  CudaDeviceGuard(int device, const char* op) {
    cuda_check(cudaGetDevice(&previous_), op, "cudaGetDevice");
    if (previous_ != device) cuda_check(cudaSetDevice(device), op, "cudaSetDevice");
  }
  ~CudaDeviceGuard() {
    int current = -1;
    if (cudaGetDevice(&current) == cudaSuccess && current != previous_) cudaSetDevice(previous_);
  }
  CudaDeviceGuard(const CudaDeviceGuard&) = delete;
  CudaDeviceGuard& operator=(const CudaDeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

// Threads per block of the elementwise kernels, and a grid cap: enough blocks to fill any current
// GPU several times over; grid-stride loops cover the rest.
constexpr int kElementwiseThreads = 256;
constexpr int64_t kElementwiseMaxBlocks = 8192;

// Whether `p` allows `bytes`-wide vector accesses.
inline bool is_aligned(const void* p, int bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

// A fixed-size array of T loaded and stored as one aligned access (16 bytes for fp32 x 4).
template <typename T, int N>
struct alignas(sizeof(T) * N) Packed {
  T v[N];
};

}  // namespace meldkit
