// What the CPU and CUDA multi-tensor launchers share: how a list of tensors is cut into chunks, and the contracts
// of the functors they run.
//
// Element functor (multi_tensor_apply): a small struct whose `load(const ChunkContext&)` (callable on host and
// device) reads the step's scalars from their 0-dim tensors once per chunk and returns the per-element math: a
// callable taking one element reference from each list, in list order. Writing the math once as a
// C10_HOST_DEVICE functor is what makes the CPU and CUDA kernels compute the same function. A list the math only
// reads is named with a const element type at the call (`apply<float, const float>`): it gets const references,
// and the CUDA launcher, which stages elements in registers, never writes it back. The math computes in float32 and
// never reads an element after writing it (it keeps the value in a local instead): the CPU launcher stages float16
// lists through float32 buffers, so a read-back would see the unrounded value there and the stored one on CUDA.
//
// Reduce functor (multi_tensor_reduce): `load(ctx)` returns math whose `operator()(elements...)` gives a float
// per element and whose `finish(float chunk_sum)` receives the chunk's sum (once per chunk; on CUDA from one
// thread). Chunks are numbered in list order (`global_chunk`), so a functor that writes partials[global_chunk]
// gets the same sums in the same places on every run.
//
// Segment functor (multi_tensor_segment_apply): tensor i is cut into equal contiguous segments, one per element of
// a segment-state tensor (Adam-mini's blocks). `load(ctx)` returns math with `reduce(elements...)` (a float per
// element, summed over the segment), `segment(V& state, float sum, int64_t length)` (updates the segment's state
// and returns a float handed to every element of the segment) and `operator()(float, elements...)`.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace fastoptim {

// Elements per chunk: large enough to amortise a CUDA block's start, small enough to balance the CPU threads.
constexpr int64_t kChunkSize = 65536;

// Where a chunk lies: the position of its tensor in the caller's lists, that tensor's size, and the chunk's number
// counted over the whole call in list order (empty tensors have no chunks).
struct ChunkContext {
  int tensor;
  int64_t numel;
  int64_t global_chunk;
};

// *address += value, atomically, on the host (CPU kernels run chunks in parallel) and on the device. Integer sums
// are exact whatever the order, so a count accumulated this way is deterministic.
C10_HOST_DEVICE inline void atomic_add(unsigned long long* address, unsigned long long value) {
#ifdef __CUDA_ARCH__
  atomicAdd(address, value);
#else
  __atomic_fetch_add(address, value, __ATOMIC_RELAXED);
#endif
}

// Chunks of a tensor of `numel` elements.
C10_HOST_DEVICE inline int64_t chunks_of(int64_t numel) { return (numel + kChunkSize - 1) / kChunkSize; }

// Whole segments per chunk for segments of `length` elements: as many as fit in kChunkSize, at least one.
C10_HOST_DEVICE inline int64_t segments_per_chunk(int64_t length) {
  return length >= kChunkSize || length == 0 ? 1 : kChunkSize / length;
}

// element_cast<To>(x): an element read from or written to a tensor, converted as static_cast converts it (float to
// bfloat16 and half round to nearest even; NaN stays NaN). On the host the low-precision conversions are written
// without branches, so that the CPU chunk loops around them vectorise; c10's own conversions branch on NaN and on
// the half's exponent, which stops GCC's vectoriser. Device code keeps c10's conversions, which the GPU does in one
// instruction each.
#if defined(__CUDACC__)
template <typename To, typename From>
C10_HOST_DEVICE inline To element_cast(const From& x) {
  return static_cast<To>(x);
}
#else
namespace element_bits {

inline uint32_t of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// c ? a : b as bit masks: GCC 12 may leave nested ternaries as branches (a loop over float_to_half written with
// them stayed scalar), and a branch in a loop body stops the vectoriser.
inline uint32_t select(bool c, uint32_t a, uint32_t b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(c);
  return (a & mask) | (b & ~mask);
}

inline float bfloat16_to_float(uint16_t b) { return to_float(static_cast<uint32_t>(b) << 16); }

inline uint16_t float_to_bfloat16(float f) {
  const uint32_t u = of(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(select((u & 0x7FFFFFFFu) > 0x7F800000u, 0x7FC0u, rounded));
}

// The half's exponent and mantissa moved into a float's bits and rescaled by 2^112 (exact for normals and
// subnormals alike); an all-ones exponent (inf, NaN) is set to the float's.
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t magnitude = static_cast<uint32_t>(h & 0x7FFFu);
  const uint32_t scaled = of(to_float(magnitude << 13) * 0x1p112f);
  const uint32_t finite_or_not = select(magnitude >= 0x7C00u, scaled | 0x7F800000u, scaled);
  return to_float(finite_or_not | sign);
}

// Round to nearest even in the three ranges a half has, each computed and the right one selected: overflow to inf
// (NaN to the quiet NaN 0x7E00), subnormals by adding a magic float whose ulp is the half's smallest subnormal, and
// normals by rebiasing the exponent and rounding the 13 dropped bits.
inline uint16_t float_to_half(float f) {
  const uint32_t u = of(f);
  const uint32_t sign = u & 0x80000000u;
  const uint32_t magnitude = u ^ sign;
  constexpr uint32_t kInf = 0x7F800000u, kHalfOverflow = (127u + 16u) << 23, kNormalMin = 113u << 23;
  constexpr uint32_t kSubnormalMagic = 126u << 23;  // 0.5: its ulp is 2^-24, the half's smallest subnormal
  const uint32_t special = select(magnitude > kInf, 0x7E00u, 0x7C00u);
  const uint32_t subnormal = of(to_float(magnitude) + to_float(kSubnormalMagic)) - kSubnormalMagic;
  const uint32_t normal = (magnitude + 0xC8000FFFu + ((magnitude >> 13) & 1u)) >> 13;  // 0xC8000000: (15 − 127) << 23
  const uint32_t finite = select(magnitude < kNormalMin, subnormal, normal);
  const uint32_t bits = select(magnitude >= kHalfOverflow, special, finite);
  return static_cast<uint16_t>(bits | (sign >> 16));
}

}  // namespace element_bits

// x comes by value: taken by reference, a local it converts has its address taken and GCC stops vectorising.
template <typename To, typename From>
inline To element_cast(From x) {
  if constexpr (std::is_same_v<From, c10::BFloat16> && std::is_same_v<To, float>) {
    return element_bits::bfloat16_to_float(x.x);
  } else if constexpr (std::is_same_v<From, c10::Half> && std::is_same_v<To, float>) {
    return element_bits::half_to_float(x.x);
  } else if constexpr (std::is_same_v<From, float> && std::is_same_v<To, c10::BFloat16>) {
    return c10::BFloat16(element_bits::float_to_bfloat16(x), c10::BFloat16::from_bits());
  } else if constexpr (std::is_same_v<From, float> && std::is_same_v<To, c10::Half>) {
    return c10::Half(element_bits::float_to_half(x), c10::Half::from_bits());
  } else {
    return static_cast<To>(x);
  }
}
#endif

}  // namespace fastoptim
