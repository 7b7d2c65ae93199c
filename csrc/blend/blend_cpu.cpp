// CPU blend (algorithm: blend.h): OpenMP over the plan's chunks, taken span by span across the
// tensors so that the masks' shared hash of each element is computed once for all of them
// (span_major_items); the mask choice is hoisted out of the element loop so that it
// vectorises. On CPUs with AVX-512 (F/BW/DQ/VL) a path written with intrinsics (below) runs
// instead, which gives the same bits.
#include <algorithm>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

#include "meldkit/blend.h"
#include "meldkit/cpu_isa.h"
#include "meldkit/macros.h"
#include "meldkit/random.h"
#include "meldkit/status.h"

namespace meldkit {
namespace {

// Elements [begin, end) of row r, within one chunk. kShared: the masks' shared hash of each
// element comes from `inner` (uniform01_inner of elements begin, begin + 1, ...: fill_inner),
// else it is computed here.
template <typename T, bool kDraw1, bool kDraw2, bool kShared>
MELDKIT_CPU_CLONES_AVX512 void blend_range(const BlendParams& p, const BlendRow& r, int64_t begin,
                                           int64_t end, const uint32_t* inner) {
  T* out = reinterpret_cast<T*>(r.out);
  const T* base = reinterpret_cast<const T*>(r.base);
  const T* tau = reinterpret_cast<const T*>(r.tau);
  if (r.dense) {
    const float g = p.g_dense;
    for (int64_t e = begin; e < end; ++e) {
      const float prod = widen(tau[e]) * g;
      out[e] = Store<T>::from(widen(base[e]) + prod);
    }
    return;
  }
  const uint32_t k1 = stream_key(p.seed, uint32_t(r.stream1));
  const uint32_t k2 = stream_key(p.seed, uint32_t(r.stream2));
  const uint32_t high = uniform01_high(uint64_t(begin));
  const int32_t thr1 = uniform01_threshold(p.keep1), thr2 = uniform01_threshold(p.keep2);
  const float t0 = p.g_table[0], t1 = p.g_table[1], t2 = p.g_table[2], t3 = p.g_table[3];
  // A chunk never crosses a multiple of 2^32, so the element index's low word is a 32-bit
  // counter from the chunk's first element (32-bit lanes vectorise; 64-bit ones need shuffles).
  const uint32_t lo = uint32_t(uint64_t(begin));
  const int n = int(end - begin);
  const T* tb = tau + begin;
  const T* bb = base + begin;
  T* ob = out + begin;
  for (int i = 0; i < n; ++i) {  // selects, not an indexed table: vectorises
    // shared by both masks
    const uint32_t in = kShared ? inner[i] : uniform01_inner(high, lo + uint32_t(i));
    const bool m1 = kDraw1 && uniform01_below(k1, in, thr1);
    const bool m2 = kDraw2 && uniform01_below(k2, in, thr2);
    const float g = m1 ? (m2 ? t3 : t1) : (m2 ? t2 : t0);
    const float prod = widen(tb[i]) * g;
    ob[i] = Store<T>::from(widen(bb[i]) + prod);
  }
}

// blend_range for any mask choice of the call.
template <typename T, bool kShared>
void blend_range_any(const BlendParams& p, const BlendRow& r, int64_t begin, int64_t end,
                     const uint32_t* inner) {
  if (p.draw1 && p.draw2) {
    blend_range<T, true, true, kShared>(p, r, begin, end, inner);
  } else if (p.draw1) {
    blend_range<T, true, false, kShared>(p, r, begin, end, inner);
  } else if (p.draw2) {
    blend_range<T, false, true, kShared>(p, r, begin, end, inner);
  } else {
    blend_range<T, false, false, kShared>(p, r, begin, end, inner);
  }
}

// uniform01_inner of the n elements from the one whose 32-bit counter is lo (vectorises).
MELDKIT_CPU_CLONES_AVX512 void fill_inner(uint32_t* inner, int64_t n, uint32_t lo, uint32_t high) {
  for (int64_t i = 0; i < n; ++i) inner[i] = uniform01_inner(high, lo + uint32_t(i));
}

// Chunks per span: a thread keeps the masks' shared hash of one span of elements
// (kSpanChunks * kBlendChunk of them: 1 MB of uint32, about this machine's L2) and reuses it
// for every tensor. Spans of 4 and 8 chunks measured slower (the tensors are then read in
// shorter runs), 32 no faster.
constexpr int64_t kSpanChunks = 16;
static_assert(kSpanChunks <= 64, "SharedSpan::filled has one bit per chunk");

// This thread's buffer of one span of shared hash values (64-byte aligned, not zeroed),
// allocated at its first masked blend and kept while the thread lives; nullptr when that
// allocation failed (no exception may leave an OpenMP region).
inline uint32_t* shared_span_buffer() {
  struct Free {
    void operator()(uint32_t* q) const { ::operator delete[](q, std::align_val_t(64)); }
  };
  static thread_local std::unique_ptr<uint32_t[], Free> values(
      static_cast<uint32_t*>(::operator new[](size_t(kSpanChunks * kBlendChunk) * sizeof(uint32_t),
                                              std::align_val_t(64), std::nothrow)));
  return values.get();
}

// A thread's values of the masks' shared hash for one span (fill_inner's, or the AVX-512
// path's fill_shared): those of span `span`, chunk c of it filled when bit c is set.
struct SharedSpan {
  uint32_t* values = nullptr;  // shared_span_buffer(), taken at the first masked chunk
  int64_t span = -1;
  uint64_t filled = 0;

  // The values of chunk c (of any tensor), made by fill(values, lo, high) unless this thread
  // made them since it last changed span; nullptr when the buffer could not be allocated.
  template <typename Fill>
  const uint32_t* chunk(int64_t c, Fill&& fill) {
    if (values == nullptr) values = shared_span_buffer();
    if (values == nullptr) return nullptr;
    uint32_t* v = values + (c % kSpanChunks) * kBlendChunk;
    const uint64_t bit = uint64_t(1) << (c % kSpanChunks);
    if (span != c / kSpanChunks) span = c / kSpanChunks, filled = 0;
    if (!(filled & bit)) {
      const uint64_t begin = uint64_t(c * kBlendChunk);
      fill(v, uint32_t(begin), uniform01_high(begin));
      filled |= bit;
    }
    return v;
  }
};

// A call's work items: chunks in span-major order, the chunks of span 0 (the first kSpanChunks
// chunks) of every tensor, tensor after tensor, then those of span 1 of every tensor that has
// one, and so on. A thread's items are a contiguous run of that order (static schedule), so it
// computes the masks' shared hash (a third of the hashing) once per span for all the tensors,
// while each tensor is still read in runs of up to a span.
struct SpanItem {
  int32_t row;
  int32_t chunk;  // within the row: < 2^31 chunks of 2^14 elements
};

inline std::vector<SpanItem> span_major_items(const BlendParams& p) {
  std::vector<SpanItem> items;
  items.reserve(size_t(std::max<int64_t>(p.num_chunks, 0)));
  std::vector<int> rows(static_cast<size_t>(p.num_tensors));
  for (int i = 0; i < p.num_tensors; ++i) rows[size_t(i)] = i;
  for (int64_t span = 0; !rows.empty(); ++span) {
    size_t kept = 0;
    for (const int i : rows) {
      const int64_t chunks = (p.rows[i].numel + kBlendChunk - 1) / kBlendChunk;
      const int64_t first = span * kSpanChunks, last = std::min(chunks, first + kSpanChunks);
      for (int64_t c = first; c < last; ++c) items.push_back({i, int32_t(c)});
      if (chunks > first + kSpanChunks) rows[kept++] = i;
    }
    rows.resize(kept);
  }
  return items;
}

// Chunk c of row r through blend_range, the masks' shared hash from `shared`.
template <typename T>
void blend_chunk(const BlendParams& p, const BlendRow& r, int64_t c, SharedSpan& shared) {
  const int64_t begin = c * kBlendChunk;
  const int64_t end = std::min(r.numel, begin + kBlendChunk);
  const uint32_t* inner = nullptr;
  if (!r.dense && (p.draw1 || p.draw2)) {
    inner = shared.chunk(
        c, [](uint32_t* v, uint32_t lo, uint32_t high) { fill_inner(v, kBlendChunk, lo, high); });
  }
  if (inner != nullptr) {
    blend_range_any<T, true>(p, r, begin, end, inner);
  } else {
    blend_range_any<T, false>(p, r, begin, end, nullptr);
  }
}

#ifdef MELDKIT_AVX512_INTRINSICS
// The blend with intrinsics, 32 elements a step, on CPUs with AVX-512 F/BW/DQ/VL. The
// compiler's AVX-512 clone of blend_range spends about 150 vector operations on 32 elements
// of a two-mask bfloat16 blend; this path about 55, and it brings that blend on 2 cores of an
// AMD Zen 4 from 42 % to about 70 % of the copy bandwidth, the speed of a blend without masks
// (bench/RESULTS.md). Same arithmetic, same bits as blend_range (tests compare both,
// MELDKIT_CPU_AVX512=0 selecting the portable one):
// - the hashes of random.h, the masks' shared part computed once per span of elements for all
//   tensors (span_major_items, as in the portable loop), and the first step of each mask
//   hash folded into it:
//   mix32(k ^ inner) starts with x ^= x >> 16, and (k ^ inner) ^ ((k ^ inner) >> 16) =
//   (inner ^ (inner >> 16)) ^ (k ^ (k >> 16)): the shared value xor a constant per mask;
// - a draw is h < thr << 8 (that is, h >> 8 < thr), unsigned; a mask that keeps everything or
//   nothing is not drawn (its draws could only give that value: fast_call folds it into the
//   table);
// - g from the float32 table by one to three blends instead of a compare-and-select chain;
// - the product and the sum rounded one by one (no fused multiply-add); when both θ₀ and τ·g
//   are NaN, which of the two the sum keeps (payload, sign) is the compiler's choice, here as
//   in blend_range's clones (and the CUDA kernel writes the canonical NaN);
// - bfloat16 read as 16 32-bit words: the even elements are word << 16, the odd ones
//   word & 0xffff0000, so the two halves of a step are the even and the odd elements (their
//   counters follow); written back by VCVTNE2PS2BF16 where the CPU has AVX512-BF16 (to nearest
//   even, NaN quietened with its payload, as float_to_bf16) and an interleaving permute, except
//   that the instruction flushes float32 subnormals to zero: a step that holds one is rounded by
//   float_to_bf16's integer formula instead (and every step, when MXCSR's denormals-are-zero
//   mode hides subnormals from the test);
// - float16 converted by VCVTPH2PS / VCVTPS2PH (exact, to nearest even, whatever MXCSR's
//   flush-to-zero and denormals-are-zero say); NaNs are then written as float_to_f16 writes them.
#define MELDKIT_BLEND_TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))
MELDKIT_AVX512_BEGIN

inline bool cpu_blend_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512vl") && cpu_avx512_allowed();
  return yes;
}
// Whether the bfloat16 steps may round with VCVTNE2PS2BF16: the CPU has AVX512-BF16 (CPUID leaf
// 7, subleaf 1, EAX bit 5) and the toolchain assembles it (GCC 10 or clang 9 and later).
#if (defined(__clang__) && __clang_major__ >= 9) || (!defined(__clang__) && __GNUC__ >= 10)
#define MELDKIT_BLEND_HW_BF16 1
#endif
inline bool cpu_blend_avx512_bf16() {
#ifdef MELDKIT_BLEND_HW_BF16
  static const bool yes = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    return cpu_blend_avx512() && __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a & (1u << 5)) != 0;
  }();
  return yes;
#else
  return false;
#endif
}

// lowbias32 after its first xor-shift (random.h: mix32).
MELDKIT_BLEND_TARGET inline __m512i mix32_tail(__m512i x) {
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(int(0x21f0aaadu)));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(int(0x735a2d97u)));
  return _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
}

// A step's 32 elements as two float32 vectors (exactly widen()), written back from two, and
// the element offsets of their lanes within the step.
template <typename T>
struct Step32;

template <>
struct Step32<float> {
  MELDKIT_BLEND_TARGET static __m512i offsets(int half) {
    return _mm512_add_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                            _mm512_set1_epi32(16 * half));
  }
  MELDKIT_BLEND_TARGET static void load(const float* p, __m512& v0, __m512& v1) {
    v0 = _mm512_loadu_ps(p);
    v1 = _mm512_loadu_ps(p + 16);
  }
  template <bool kHwBf16>
  MELDKIT_BLEND_TARGET static void store(float* p, __m512 v0, __m512 v1) {
    _mm512_storeu_ps(p, v0);
    _mm512_storeu_ps(p + 16, v1);
  }
};

template <>
struct Step32<f16_t> {
  MELDKIT_BLEND_TARGET static __m512i offsets(int half) { return Step32<float>::offsets(half); }
  MELDKIT_BLEND_TARGET static void load(const f16_t* p, __m512& v0, __m512& v1) {
    v0 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    v1 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16)));
  }
  template <bool kHwBf16>
  MELDKIT_BLEND_TARGET static void store(f16_t* p, __m512 v0, __m512 v1) {
    const int round = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v0, round));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + 16), _mm512_cvtps_ph(v1, round));
    const __mmask16 nan0 = _mm512_cmp_ps_mask(v0, v0, _CMP_UNORD_Q);
    const __mmask16 nan1 = _mm512_cmp_ps_mask(v1, v1, _CMP_UNORD_Q);
    if (__builtin_expect((nan0 | nan1) != 0, 0)) {  // NaNs as float_to_f16 writes them
      alignas(64) float f[32];
      _mm512_store_ps(f, v0);
      _mm512_store_ps(f + 16, v1);
      for (int j = 0; j < 32; ++j) {
        if (f[j] != f[j]) p[j] = float_to_f16(f[j]);
      }
    }
  }
};

template <>
struct Step32<bf16_t> {
  // half 0: the even elements, half 1: the odd ones
  MELDKIT_BLEND_TARGET static __m512i offsets(int half) {
    return _mm512_add_epi32(
        _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0),
        _mm512_set1_epi32(half));
  }
  MELDKIT_BLEND_TARGET static void load(const bf16_t* p, __m512& v0, __m512& v1) {
    const __m512i w = _mm512_loadu_si512(p);
    v0 = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
    v1 = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(int(0xffff0000u))));
  }
  // float_to_bf16 of 16 lanes, in the low half of each 32-bit lane.
  MELDKIT_BLEND_TARGET static __m512i bits(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i hi = _mm512_srli_epi32(u, 16);
    const __m512i lsb = _mm512_and_si512(hi, _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_srli_epi32(
        _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    return _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(hi, _mm512_set1_epi32(0x40)));
  }
  template <bool kHwBf16>
  MELDKIT_BLEND_TARGET static void store(bf16_t* p, __m512 v0, __m512 v1) {
    if (kHwBf16) {
      const __mmask16 sub = _mm512_fpclass_ps_mask(v0, 0x20) | _mm512_fpclass_ps_mask(v1, 0x20);
      if (__builtin_expect(sub == 0, 1)) {
        // VCVTNE2PS2BF16 written as assembly: a function with the AVX512-BF16 target could
        // not be inlined into the loop, which CPUs without it run too. Words 0-15 from v0
        // (the even elements), 16-31 from v1 (the odd ones), then interleaved.
        __m512i packed;
#ifdef MELDKIT_BLEND_HW_BF16
        asm("vcvtne2ps2bf16 %2, %1, %0" : "=v"(packed) : "v"(v1), "v"(v0));
#else
        packed = _mm512_setzero_si512();  // never taken: cpu_blend_avx512_bf16() is false
#endif
        alignas(64) static const uint16_t kInterleave[32] = {
            0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
            8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
        const __m512i order = _mm512_load_si512(kInterleave);
        _mm512_storeu_si512(p, _mm512_permutexvar_epi16(order, packed));
        return;
      }
    }
    _mm512_storeu_si512(p, _mm512_or_si512(bits(v0), _mm512_slli_epi32(bits(v1), 16)));
  }
};

// g for 16 lanes: table[m1 | m2 << 1] (tab0..tab3 broadcast).
template <bool kD1, bool kD2>
MELDKIT_BLEND_TARGET inline __m512 select_g(__mmask16 m1, __mmask16 m2, __m512 tab0, __m512 tab1,
                                            __m512 tab2, __m512 tab3) {
  if (kD1 && kD2) {
    const __m512 no2 = _mm512_mask_blend_ps(m1, tab0, tab1);
    const __m512 yes2 = _mm512_mask_blend_ps(m1, tab2, tab3);
    return _mm512_mask_blend_ps(m2, no2, yes2);
  }
  if (kD1) return _mm512_mask_blend_ps(m1, tab0, tab1);
  if (kD2) return _mm512_mask_blend_ps(m2, tab0, tab2);
  return tab0;
}

// The masks' shared first step for the n elements (n a multiple of 32) from the one whose
// 32-bit counter is lo: inner ^ (inner >> 16), inner = mix32(lo + offset ^ high), in the lane
// order of Step32<T>. It depends on the element index only, not on the tensor.
template <typename T>
MELDKIT_BLEND_TARGET void fill_shared(uint32_t* shared, int64_t n, uint32_t lo, uint32_t high) {
  const __m512i highv = _mm512_set1_epi32(int(high));
  const __m512i step = _mm512_set1_epi32(32);
  __m512i count[2] = {_mm512_add_epi32(_mm512_set1_epi32(int(lo)), Step32<T>::offsets(0)),
                      _mm512_add_epi32(_mm512_set1_epi32(int(lo)), Step32<T>::offsets(1))};
  for (int64_t i = 0; i < n; i += 32) {
    for (int h = 0; h < 2; ++h) {
      __m512i x = _mm512_xor_si512(count[h], highv);
      x = mix32_tail(_mm512_xor_si512(x, _mm512_srli_epi32(x, 16)));
      _mm512_store_si512(shared + i + 16 * h, _mm512_xor_si512(x, _mm512_srli_epi32(x, 16)));
      count[h] = _mm512_add_epi32(count[h], step);
    }
  }
}

// Elements [0, n) of a tensor's range, n a multiple of 32, `shared` from fill_shared for the
// same elements. No draws: g = tab[0] (a dense tensor's g_dense, or the folded table). k1x /
// k2x: the mask streams' keys after the first xor-shift; lim1 / lim2: thr << 8.
template <typename T, bool kD1, bool kD2, bool kHwBf16>
MELDKIT_BLEND_TARGET void blend_steps_avx512(T* out, const T* base, const T* tau, int64_t n,
                                             const uint32_t* shared, uint32_t k1x, uint32_t k2x,
                                             uint32_t lim1, uint32_t lim2, const float* tab) {
  const __m512i k1v = _mm512_set1_epi32(int(k1x)), k2v = _mm512_set1_epi32(int(k2x));
  const __m512i lim1v = _mm512_set1_epi32(int(lim1)), lim2v = _mm512_set1_epi32(int(lim2));
  const __m512 tab0 = _mm512_set1_ps(tab[0]), tab1 = _mm512_set1_ps(tab[1]);
  const __m512 tab2 = _mm512_set1_ps(tab[2]), tab3 = _mm512_set1_ps(tab[3]);
  for (int64_t i = 0; i < n; i += 32) {
    __m512 b[2], t[2], v[2];
    Step32<T>::load(base + i, b[0], b[1]);
    Step32<T>::load(tau + i, t[0], t[1]);
    for (int h = 0; h < 2; ++h) {
      __mmask16 m1 = 0, m2 = 0;
      if (kD1 || kD2) {
        const __m512i x = _mm512_load_si512(shared + i + 16 * h);
        if (kD1) m1 = _mm512_cmplt_epu32_mask(mix32_tail(_mm512_xor_si512(x, k1v)), lim1v);
        if (kD2) m2 = _mm512_cmplt_epu32_mask(mix32_tail(_mm512_xor_si512(x, k2v)), lim2v);
      }
      const __m512 g = select_g<kD1, kD2>(m1, m2, tab0, tab1, tab2, tab3);
      v[h] = _mm512_add_ps(b[h], _mm512_mul_ps(t[h], g));
    }
    Step32<T>::template store<kHwBf16>(out + i, v[0], v[1]);
  }
}

// What every chunk of one call shares: the table with a mask that keeps everything (m = 1) or
// nothing (m = 0) folded into it and that mask not drawn (its draws could only give that
// value), and the draw limits.
struct FastCall {
  float tab[4];
  bool d1, d2, hw;
  uint32_t lim1, lim2;
};

inline FastCall fast_call(const BlendParams& p, bool bf16) {
  FastCall f{{p.g_table[0], p.g_table[1], p.g_table[2], p.g_table[3]},
             p.draw1,
             p.draw2,
             bf16 && cpu_blend_avx512_bf16(),
             0,
             0};
  const int32_t thr1 = uniform01_threshold(p.keep1), thr2 = uniform01_threshold(p.keep2);
  constexpr int32_t kAlways = int32_t(1) << 24;
  if (f.d1 && thr1 >= kAlways) f.tab[0] = f.tab[1], f.tab[2] = f.tab[3];
  if (f.d1 && (thr1 <= 0 || thr1 >= kAlways)) f.d1 = false;
  if (f.d2 && thr2 >= kAlways) f.tab[0] = f.tab[2], f.tab[1] = f.tab[3];
  if (f.d2 && (thr2 <= 0 || thr2 >= kAlways)) f.d2 = false;
  f.lim1 = f.d1 ? uint32_t(thr1) << 8 : 0u;
  f.lim2 = f.d2 ? uint32_t(thr2) << 8 : 0u;
  return f;
}

// Chunk c of row r (elements [c * kBlendChunk, ...)): the steps, then the last numel % 32
// elements through blend_range.
template <typename T>
void blend_chunk_avx512(const BlendParams& p, const FastCall& f, const BlendRow& r, int64_t c,
                        SharedSpan& shared) {
  const int64_t begin = c * kBlendChunk;
  const int64_t end = std::min(r.numel, begin + kBlendChunk);
  int64_t n = (end - begin) / 32 * 32;
  const bool d1 = f.d1 && !r.dense, d2 = f.d2 && !r.dense;
  const uint32_t* values = nullptr;
  if (n > 0 && (d1 || d2)) {
    values = shared.chunk(c, [](uint32_t* v, uint32_t lo, uint32_t high) {
      fill_shared<T>(v, kBlendChunk, lo, high);
    });
    if (values == nullptr) n = 0;  // out of memory: all through blend_range
  }
  if (n > 0) {
    const uint32_t k1 = stream_key(p.seed, uint32_t(r.stream1));
    const uint32_t k2 = stream_key(p.seed, uint32_t(r.stream2));
    const uint32_t k1x = k1 ^ (k1 >> 16), k2x = k2 ^ (k2 >> 16);
    const float dense_tab[4] = {p.g_dense, p.g_dense, p.g_dense, p.g_dense};
    const float* tab = r.dense ? dense_tab : f.tab;
    T* out = reinterpret_cast<T*>(r.out) + begin;
    const T* base = reinterpret_cast<const T*>(r.base) + begin;
    const T* tau = reinterpret_cast<const T*>(r.tau) + begin;
#define MELDKIT_BLEND_STEPS(D1, D2)                                                                \
  (f.hw ? blend_steps_avx512<T, D1, D2, true>(out, base, tau, n, values, k1x, k2x, f.lim1, f.lim2, \
                                              tab)                                                 \
        : blend_steps_avx512<T, D1, D2, false>(out, base, tau, n, values, k1x, k2x, f.lim1,        \
                                               f.lim2, tab))
    if (d1 && d2) {
      MELDKIT_BLEND_STEPS(true, true);
    } else if (d1) {
      MELDKIT_BLEND_STEPS(true, false);
    } else if (d2) {
      MELDKIT_BLEND_STEPS(false, true);
    } else {
      MELDKIT_BLEND_STEPS(false, false);
    }
#undef MELDKIT_BLEND_STEPS
  }
  if (begin + n < end) blend_range_any<T, false>(p, r, begin + n, end, nullptr);
}

// The whole call with the AVX-512 steps, over span_major_items.
template <typename T>
void blend_items_avx512(const BlendParams& p, const std::vector<SpanItem>& items) {
  const FastCall f = fast_call(p, std::is_same<T, bf16_t>::value);
  const int64_t num_items = int64_t(items.size());
#pragma omp parallel if (num_items > 1)
  {
    // VFPCLASSPS, which finds the steps VCVTNE2PS2BF16 would flush, reads a float32 subnormal
    // as zero when this thread's MXCSR has denormals-are-zero on (a library built with
    // -ffast-math may set it): then every bfloat16 step is rounded by the integer formula.
    FastCall mine = f;
    mine.hw = f.hw && (_mm_getcsr() & 0x40u) == 0;
    SharedSpan shared;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < num_items; ++i) {
      const SpanItem& it = items[size_t(i)];
      blend_chunk_avx512<T>(p, mine, p.rows[it.row], it.chunk, shared);
    }
  }
}

MELDKIT_AVX512_END
#endif

template <typename T>
void blend_typed(const BlendParams& p) {
  const std::vector<SpanItem> items = span_major_items(p);
  const int64_t num_items = int64_t(items.size());
  if (num_items == p.num_chunks) {
#ifdef MELDKIT_AVX512_INTRINSICS
    if (cpu_blend_avx512()) {
      blend_items_avx512<T>(p, items);
      return;
    }
#endif
#pragma omp parallel if (num_items > 1)
    {
      SharedSpan shared;
#pragma omp for schedule(static)
      for (int64_t i = 0; i < num_items; ++i) {
        const SpanItem& it = items[size_t(i)];
        blend_chunk<T>(p, p.rows[it.row], it.chunk, shared);
      }
    }
    return;
  }
  // A table whose rows do not add up to num_chunks (not blend_plan's): its chunks in order,
  // each hashed on its own.
  const int64_t n_chunks = p.num_chunks;
#pragma omp parallel for schedule(static) if (n_chunks > 1)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const BlendRow& r = p.rows[blend_find_row(p.rows, p.num_tensors, c)];
    const int64_t begin = (c - r.first_chunk) * kBlendChunk;
    const int64_t end = std::min(r.numel, begin + kBlendChunk);
    blend_range_any<T, false>(p, r, begin, end, nullptr);
  }
}

}  // namespace

void blend_cpu(const BlendParams& p) {
  MELDKIT_DISPATCH_FLOAT(p.dtype, "blend", "bases", T, { blend_typed<T>(p); });
}

}  // namespace meldkit
