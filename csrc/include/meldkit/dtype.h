// Storage dtypes, their conversions to and from float, and the switch that turns a runtime dtype
// into a template parameter.
//
// bf16 and fp16 are plain 16-bit storage structs here rather than CUDA's __nv_bfloat16/__half so
// the CPU code needs no CUDA headers. The conversions are __host__ __device__ and round to nearest
// even, exactly as torch's casts do, so CPU and CUDA kernels store bit-identical values.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

#include "meldkit/macros.h"
#include "meldkit/status.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace meldkit {

// kInt64 only travels through bindings (index outputs); no kernel dispatches on it.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3, kInt64 = 4 };

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::kFloat32:
      return "float32";
    case DType::kFloat16:
      return "float16";
    case DType::kBFloat16:
      return "bfloat16";
    case DType::kFloat64:
      return "float64";
    case DType::kInt64:
      return "int64";
  }
  return "unknown";
}

inline int dtype_size(DType d) {
  switch (d) {
    case DType::kFloat32:
      return 4;
    case DType::kFloat16:
    case DType::kBFloat16:
      return 2;
    case DType::kFloat64:
    case DType::kInt64:
      return 8;
  }
  return 0;
}

struct bf16_t {
  uint16_t bits;
};
struct f16_t {
  uint16_t bits;
};

MELDKIT_INLINE uint32_t float_as_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

MELDKIT_INLINE float bits_as_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// bf16 is the top half of a float.
MELDKIT_INLINE float bf16_to_float(bf16_t h) { return bits_as_float(uint32_t(h.bits) << 16); }

// On the host, every conversion below computes each candidate result and picks one with a bit
// mask instead of branching, so that CPU loops over them vectorise. On the device the hardware
// converts (cvt.rn), which rounds identically; only NaN payloads may differ.
MELDKIT_INLINE uint32_t select_bits(uint32_t mask, uint32_t if_set, uint32_t if_clear) {
  return (if_set & mask) | (if_clear & ~mask);
}
MELDKIT_INLINE uint32_t mask_if(bool cond) { return 0u - uint32_t(cond); }

MELDKIT_INLINE bf16_t float_to_bf16(float f) {
#if defined(__CUDA_ARCH__)
  return bf16_t{__bfloat16_as_ushort(__float2bfloat16_rn(f))};
#else
  const uint32_t u = float_as_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // nearest, ties to even
  const uint32_t quiet_nan = (u >> 16) | 0x40u;
  return bf16_t{
      uint16_t(select_bits(mask_if((u & 0x7fffffffu) > 0x7f800000u), quiet_nan, rounded))};
#endif
}

// A normal half's exponent+mantissa, shifted into a float's, is rebased (bias 15 -> 127) by an
// integer add; a subnormal half is its mantissa times 2^-24, an int -> float conversion and an
// exact scaling. No step passes through a float subnormal, so the result is exact even when
// another library in the process has turned on flush-to-zero / denormals-are-zero (as one built
// with -ffast-math does when it is loaded). Vectorises.
MELDKIT_INLINE float f16_to_float(f16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h.bits));
#else
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16;
  const uint32_t em = h.bits & 0x7fffu;
  const uint32_t normal = (em << 13) + 0x38000000u;  // + (127 - 15) << 23
  const uint32_t subnormal = float_as_bits(float(int32_t(em)) * 5.9604644775390625e-8f /* 2^-24 */);
  const uint32_t special = 0x7f800000u | (em << 13);  // inf / NaN keep their payload
  const uint32_t finite = select_bits(mask_if(em < 0x400u), subnormal, normal);
  return bits_as_float(select_bits(mask_if(em >= 0x7c00u), special, finite) | sign);
#endif
}

MELDKIT_INLINE f16_t float_to_f16(float f) {
#if defined(__CUDA_ARCH__)
  return f16_t{__half_as_ushort(__float2half_rn(f))};
#else
  const uint32_t u = float_as_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  // |f| >= 65536 (or inf, NaN): overflow to inf, NaN to the quiet NaN.
  const uint32_t big = select_bits(mask_if(a > 0x7f800000u), 0x7e00u, 0x7c00u);
  // Subnormal or zero result: adding 0.5 (as float) aligns the mantissa so the FPU's own
  // round-to-nearest-even leaves the half's subnormal bits at the bottom. (A float subnormal
  // input read as 0 under denormals-are-zero rounds to the same signed zero.)
  const uint32_t tiny = float_as_bits(bits_as_float(a) + 0.5f) - 0x3f000000u;
  // Normal result: rebias the exponent (127 -> 15) and round to nearest even.
  const uint32_t normal = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;
  const uint32_t h = select_bits(mask_if(a >= 0x47800000u), big,
                                 select_bits(mask_if(a < 0x38800000u), tiny, normal));
  return f16_t{uint16_t(h | sign)};
#endif
}

// widen(x): a storage value in its accumulation type (float, or double for float64 storage).
// Store<T>::from(acc): an accumulator rounded back to storage type T.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

MELDKIT_INLINE float widen(float x) { return x; }
MELDKIT_INLINE double widen(double x) { return x; }
MELDKIT_INLINE float widen(bf16_t x) { return bf16_to_float(x); }
MELDKIT_INLINE float widen(f16_t x) { return f16_to_float(x); }

template <typename T>
struct Store;
template <>
struct Store<float> {
  template <typename A>
  MELDKIT_HD static float from(A x) {
    return static_cast<float>(x);
  }
};
template <>
struct Store<double> {
  template <typename A>
  MELDKIT_HD static double from(A x) {
    return static_cast<double>(x);
  }
};
template <>
struct Store<bf16_t> {
  template <typename A>
  MELDKIT_HD static bf16_t from(A x) {
    return float_to_bf16(static_cast<float>(x));
  }
};
template <>
struct Store<f16_t> {
  template <typename A>
  MELDKIT_HD static f16_t from(A x) {
    return float_to_f16(static_cast<float>(x));
  }
};

// One element of a tensor whose dtype is known only at run time, read as / written from Acc: for
// the few small per-call arrays (gates, weight gradients) that do not justify a template switch.
template <typename Acc>
MELDKIT_INLINE Acc load_as(const void* data, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kBFloat16:
      return Acc(widen(static_cast<const bf16_t*>(data)[i]));
    case DType::kFloat16:
      return Acc(widen(static_cast<const f16_t*>(data)[i]));
    case DType::kFloat64:
      return Acc(static_cast<const double*>(data)[i]);
    default:
      return Acc(static_cast<const float*>(data)[i]);
  }
}

template <typename Acc>
MELDKIT_INLINE void store_as(void* data, DType dtype, int64_t i, Acc v) {
  switch (dtype) {
    case DType::kBFloat16:
      static_cast<bf16_t*>(data)[i] = Store<bf16_t>::from(v);
      break;
    case DType::kFloat16:
      static_cast<f16_t*>(data)[i] = Store<f16_t>::from(v);
      break;
    case DType::kFloat64:
      static_cast<double*>(data)[i] = double(v);
      break;
    default:
      static_cast<float*>(data)[i] = float(v);
      break;
  }
}

// The dtype sets the two dispatch switches below cover; bindings advertise and check them.
constexpr DType kFloatDtypes[] = {DType::kFloat32, DType::kBFloat16, DType::kFloat16};
constexpr DType kFloatAndDoubleDtypes[] = {DType::kFloat32, DType::kBFloat16, DType::kFloat16,
                                           DType::kFloat64};

// Runtime dtype -> compile-time type. `OP` names the op in the error when a dtype has no kernel.
// Usage: MELDKIT_DISPATCH_FLOAT(dtype, "weighted_sum", "tensors", T, { run<T>(); });
#define MELDKIT_DTYPE_CASE(ENUM, CTYPE, TNAME, ...) \
  case ::meldkit::DType::ENUM: {                    \
    using TNAME = CTYPE;                            \
    __VA_ARGS__;                                    \
    break;                                          \
  }

#define MELDKIT_DTYPE_UNSUPPORTED(DTYPE, OP, ARG)                                                  \
  ::meldkit::throw_type_error(std::string(OP) + ": argument '" + ARG + "': no kernel for dtype " + \
                              ::meldkit::dtype_name(DTYPE) + " on this device")

// float32, bfloat16, float16: what every op supports on every device.
#define MELDKIT_DISPATCH_FLOAT(DTYPE, OP, ARG, TNAME, ...)               \
  switch (DTYPE) {                                                       \
    MELDKIT_DTYPE_CASE(kFloat32, float, TNAME, __VA_ARGS__)              \
    MELDKIT_DTYPE_CASE(kBFloat16, ::meldkit::bf16_t, TNAME, __VA_ARGS__) \
    MELDKIT_DTYPE_CASE(kFloat16, ::meldkit::f16_t, TNAME, __VA_ARGS__)   \
    default:                                                             \
      MELDKIT_DTYPE_UNSUPPORTED(DTYPE, OP, ARG);                         \
  }

// The same plus float64, for CPU kernels (gradcheck runs in float64).
#define MELDKIT_DISPATCH_FLOAT_AND_DOUBLE(DTYPE, OP, ARG, TNAME, ...)    \
  switch (DTYPE) {                                                       \
    MELDKIT_DTYPE_CASE(kFloat32, float, TNAME, __VA_ARGS__)              \
    MELDKIT_DTYPE_CASE(kBFloat16, ::meldkit::bf16_t, TNAME, __VA_ARGS__) \
    MELDKIT_DTYPE_CASE(kFloat16, ::meldkit::f16_t, TNAME, __VA_ARGS__)   \
    MELDKIT_DTYPE_CASE(kFloat64, double, TNAME, __VA_ARGS__)             \
    default:                                                             \
      MELDKIT_DTYPE_UNSUPPORTED(DTYPE, OP, ARG);                         \
  }

}  // namespace meldkit
