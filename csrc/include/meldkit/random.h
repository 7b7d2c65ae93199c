// The counter-based random numbers of stochastic ops (DARE, DELLA): a value is a pure function of
// (seed, stream, element), so a mask is the same on every backend and thread layout. The same
// arithmetic is written in python/meldkit/ops/random_ref.py; tests pin values on both sides.
#pragma once

#include <cmath>
#include <cstdint>

#include "meldkit/macros.h"

namespace meldkit {

// The first step of mix32, x ^ (x >> 16). It distributes over xor, fold16(a ^ b) =
// fold16(a) ^ fold16(b), so a loop hashing a ^ b for a constant b folds b once.
MELDKIT_INLINE uint32_t fold16(uint32_t x) { return x ^ (x >> 16); }

// The steps of mix32 after fold16.
MELDKIT_INLINE uint32_t mix32_tail(uint32_t x) {
  x *= 0x21f0aaadu;
  x ^= x >> 15;
  x *= 0x735a2d97u;
  x ^= x >> 15;
  return x;
}

// Chris Wellons' lowbias32 integer hash.
MELDKIT_INLINE uint32_t mix32(uint32_t x) { return mix32_tail(fold16(x)); }

// The key of one stream (one tensor of one model), computed once per launch.
MELDKIT_INLINE uint32_t stream_key(uint64_t seed, uint32_t stream) {
  uint32_t h = mix32(stream ^ 0x9e3779b9u);
  h = mix32(uint32_t(seed >> 32) ^ h);
  return mix32(uint32_t(seed) ^ h);
}

// The part of uniform01 that depends only on the high 32 bits of the element index: loops over
// blocks that never cross a multiple of 2^32 compute it once per block.
MELDKIT_INLINE uint32_t uniform01_high(uint64_t e) {
  return mix32(uint32_t(e >> 32) ^ 0x85ebca6bu);
}

// The part that depends only on the element index (not on the stream): streams that draw for the
// same elements (the N models of a merge, the two masks of a blend) compute it once.
MELDKIT_INLINE uint32_t uniform01_inner(uint32_t high, uint64_t e) {
  return mix32(uint32_t(e) ^ high);
}

MELDKIT_INLINE float uniform01_from_inner(uint32_t key, uint32_t inner) {
  return float(mix32(key ^ inner) >> 8) * 5.9604644775390625e-08f;  // 2^-24
}

MELDKIT_INLINE float uniform01_from_high(uint32_t key, uint32_t high, uint64_t e) {
  return uniform01_from_inner(key, uniform01_inner(high, e));
}

// The draw `uniform01_from_inner(key, inner) < keep` decided on the integer, for loops that make
// many draws against one keep: u = (h >> 8) * 2^-24 is below keep exactly when h >> 8 is below
// ceil(keep * 2^24) (keep * 2^24 is exact in float32), so the int-to-float conversion and the
// float compare become one signed integer compare (both sides are below 2^31). Same bits.
inline int32_t uniform01_threshold(float keep) {
  if (!(keep > 0.f)) return 0;               // never (also for NaN, as u < NaN is false)
  if (keep >= 1.f) return int32_t(1) << 24;  // always
  return int32_t(std::ceil(keep * 16777216.f));
}

MELDKIT_INLINE bool uniform01_below(uint32_t key, uint32_t inner, int32_t threshold) {
  return int32_t(mix32(key ^ inner) >> 8) < threshold;
}

// Uniform in [0, 1), a multiple of 2^-24 (exact in float32), for element `e` of a stream.
MELDKIT_INLINE float uniform01(uint32_t key, uint64_t e) {
  return uniform01_from_high(key, uniform01_high(e), e);
}

}  // namespace meldkit
