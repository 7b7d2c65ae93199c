// Portability macros shared by the CPU and CUDA translation units.
#pragma once

#if defined(__CUDACC__)
#define MELDKIT_HD __host__ __device__
#define MELDKIT_DEVICE __device__
#else
#define MELDKIT_HD
#define MELDKIT_DEVICE
#endif

#define MELDKIT_INLINE MELDKIT_HD inline

// Helpers of a MELDKIT_CPU_CLONES kernel must be inlined into it: an out-of-line helper is
// compiled for the baseline ISA only, and its loops lose the wider vectors (measured 8x slower).
#if defined(__GNUC__) || defined(__clang__)
#define MELDKIT_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define MELDKIT_ALWAYS_INLINE inline
#endif

// CPU kernels marked MELDKIT_CPU_CLONES are compiled twice on x86-64, for AVX2 and for the
// baseline ISA, and the loader picks one for the running CPU (GCC/Clang target_clones). The
// default build targets SSE2 only; the wider vectors roughly double the speed of loops that
// convert fp16 by hand.
//
// MELDKIT_CPU_CLONES_AVX512 adds a third clone for x86-64-v4 (AVX-512 F/BW/DQ/VL), for the kernels
// where it was measured to help: the hash-bound loops of the blend and the merge family (DARE
// draws, per-element keeps). Elsewhere (logit fusion, routed_lora) it was slower or the same on
// an AMD Zen 4, so those stay at two clones. The clones compute the same bits: IEEE arithmetic
// without contraction (-ffp-contract=off) in every one.
#if !defined(__CUDACC__) && defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && \
    defined(__linux__)
#define MELDKIT_CPU_CLONES __attribute__((target_clones("avx2", "default")))
// target_clones("arch=x86-64-v4") is a GCC 12 feature (older GCCs and clang reject or mis-dispatch
// it): elsewhere the AVX-512 kernels get the two clones.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define MELDKIT_CPU_CLONES_AVX512 \
  __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#define MELDKIT_HAS_AVX512_CLONES 1
#else
#define MELDKIT_CPU_CLONES_AVX512 MELDKIT_CPU_CLONES
#endif
#else
#define MELDKIT_CPU_CLONES
#define MELDKIT_CPU_CLONES_AVX512
#endif

// Products and sums rounded one by one, never fused into a multiply-add: on the device with the
// _rn intrinsics, on the host by compiling with -ffp-contract=off. Kernels that promise CPU = CUDA
// = reference bit for bit do their arithmetic with these.
MELDKIT_INLINE float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
MELDKIT_INLINE float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
