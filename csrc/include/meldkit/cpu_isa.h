// Hand-written AVX-512 paths of the CPU kernels (x86-64 with GCC or clang): the macros their
// intrinsics code needs, and the switch that every one of them obeys.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__)
#include <cpuid.h>
#include <immintrin.h>

#include <cstdlib>
#include <cstring>

#define MELDKIT_AVX512_INTRINSICS 1
#define MELDKIT_AVX512_TARGET __attribute__((target("avx512f")))
// GCC 12's own AVX-512 headers start vectors from _mm512_undefined_*() and then warn about it:
// the intrinsics code sits between these two.
#if defined(__GNUC__) && !defined(__clang__)
#define MELDKIT_AVX512_BEGIN                                                           \
  _Pragma("GCC diagnostic push") _Pragma("GCC diagnostic ignored \"-Wuninitialized\"") \
      _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")
#define MELDKIT_AVX512_END _Pragma("GCC diagnostic pop")
#else
#define MELDKIT_AVX512_BEGIN
#define MELDKIT_AVX512_END
#endif

namespace meldkit {

// False when the environment sets MELDKIT_CPU_AVX512=0 (read once per process): every
// intrinsics path then steps aside for its portable loop. Tests use it to compare the two.
inline bool cpu_avx512_allowed() {
  static const bool allowed = [] {
    const char* env = std::getenv("MELDKIT_CPU_AVX512");
    return !(env != nullptr && std::strcmp(env, "0") == 0);
  }();
  return allowed;
}

}  // namespace meldkit
#endif
