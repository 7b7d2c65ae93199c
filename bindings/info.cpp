// What the build contains: compiled backends, CUDA archs, OpenMP, and whether a GPU is usable.
#include <string>

#include "meldkit/macros.h"
#include "ops.h"

#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef MELDKIT_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace meldkit::bind {

bool has_cuda() {
#ifdef MELDKIT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

py::dict build_info() {
  py::dict d;
  d["cuda"] = has_cuda();
#ifdef MELDKIT_WITH_CUDA
  d["cuda_archs"] = std::string(MELDKIT_CUDA_ARCHS);
  d["cuda_runtime"] =
      std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
#else
  d["cuda_archs"] = std::string();
  d["cuda_runtime"] = std::string();
#endif
#ifdef _OPENMP
  d["openmp"] = true;
  d["openmp_max_threads"] = omp_get_max_threads();
#else
  d["openmp"] = false;
  d["openmp_max_threads"] = 1;
#endif
#if defined(__clang__)
  d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  d["compiler"] = std::string("gcc ") + __VERSION__;
#else
  d["compiler"] = std::string("unknown");
#endif
  d["build_type"] = std::string(MELDKIT_BUILD_TYPE);
  // Which of the CPU kernels' clones (macros.h, MELDKIT_CPU_CLONES[_AVX512]) this CPU runs.
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2");
#ifndef MELDKIT_HAS_AVX512_CLONES
  const bool v4 = false;  // macros.h: this compiler builds no AVX-512 clones
#else
  const bool v4 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#endif
  d["cpu_vectors"] = std::string(v4     ? "AVX-512 (merge, blend), AVX2 (others)"
                                 : avx2 ? "AVX2"
                                        : "SSE2 (baseline)");
#else
  d["cpu_vectors"] = std::string("compiler default");
#endif
  return d;
}

// (count, reason): reason says why no GPU is usable when count is 0 (no driver, no device).
py::tuple cuda_device_count() {
#ifdef MELDKIT_WITH_CUDA
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error so later calls start clean
    return py::make_tuple(0, std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err));
  }
  return py::make_tuple(count, count > 0 ? "" : "no CUDA device");
#else
  return py::make_tuple(0, "meldkit was built without CUDA");
#endif
}

}  // namespace meldkit::bind
