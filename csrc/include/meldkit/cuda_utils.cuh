// Helpers for the CUDA launchers: error checks that raise meldkit::Error, and a device guard.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
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

inline int64_t align_up(int64_t bytes) { return (bytes + 255) / 256 * 256; }

// Stream-ordered scratch memory from the device's default memory pool (cudaMallocAsync): no host
// synchronisation, so calls that use it can be captured in CUDA graphs. It is freed on the stream
// when the call ends, and also when a launch check throws. The first use on a device raises the
// default pool's release threshold: by default the pool hands its memory back to the driver at
// every synchronisation, and each call would then map it again (tens to hundreds of
// microseconds); kept, a call's scratch is a pointer bump.
class AsyncScratch {
 public:
  AsyncScratch(int64_t bytes, cudaStream_t stream, const char* op) : stream_(stream), op_(op) {
    if (bytes <= 0) return;
    retain_pool(op);
    cuda_check(cudaMallocAsync(&ptr_, size_t(bytes), stream), op, "cudaMallocAsync");
  }
  ~AsyncScratch() {
    if (ptr_ != nullptr) cudaFreeAsync(ptr_, stream_);  // error path only; errors already raised
  }
  char* get() const { return static_cast<char*>(ptr_); }
  void release() {
    void* p = ptr_;
    ptr_ = nullptr;
    if (p != nullptr) cuda_check(cudaFreeAsync(p, stream_), op_, "cudaFreeAsync");
  }
  AsyncScratch(const AsyncScratch&) = delete;
  AsyncScratch& operator=(const AsyncScratch&) = delete;

 private:
  // Keep at least kKeepBytes of freed scratch in the device's default pool between calls (a
  // cudaMallocAsync that the pool can serve costs no driver call); more is returned to the
  // driver at the next synchronisation, so the pool never holds much memory that torch's
  // caching allocator cannot use.
  static constexpr uint64_t kKeepBytes = uint64_t(256) << 20;
  static void retain_pool(const char* op) {
    constexpr int kMaxDevices = 64;
    static std::atomic<bool> retained[kMaxDevices] = {};
    int device = 0;
    cuda_check(cudaGetDevice(&device), op, "cudaGetDevice");
    if (device < 0 || device >= kMaxDevices || retained[device].load(std::memory_order_acquire)) {
      return;
    }
    cudaMemPool_t pool;
    cuda_check(cudaDeviceGetDefaultMemPool(&pool, device), op, "cudaDeviceGetDefaultMemPool");
    // Raise the threshold, never lower it: torch's cudaMallocAsync backend shares this pool and
    // sets its own (UINT64_MAX), which then stays.
    uint64_t current = 0;
    cuda_check(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &current), op,
               "cudaMemPoolGetAttribute");
    if (current < kKeepBytes) {
      uint64_t keep = kKeepBytes;
      cuda_check(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep), op,
                 "cudaMemPoolSetAttribute");
    }
    retained[device].store(true, std::memory_order_release);  // racing setters set the same
  }

  void* ptr_ = nullptr;
  cudaStream_t stream_;
  const char* op_;
};

// A fixed-size array of T loaded and stored as one aligned access (16 bytes for fp32 x 4).
template <typename T, int N>
struct alignas(sizeof(T) * N) Packed {
  T v[N];
};

}  // namespace meldkit
