#include "cpu/half_conversion.h"

#include "common/multi_tensor.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define FASTOPTIM_HAVE_F16C_PATH 1
#endif

namespace fastoptim::cpu {
namespace {

void halves_to_floats_portable(const c10::Half* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = element_cast<float>(in[i]);
}

void floats_to_halves_portable(const float* in, c10::Half* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = element_cast<c10::Half>(in[i]);
}

#if FASTOPTIM_HAVE_F16C_PATH
__attribute__((target("avx,f16c"))) void halves_to_floats_f16c(const c10::Half* in, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i))));
  }
  halves_to_floats_portable(in + i, out + i, n - i);
}

__attribute__((target("avx,f16c"))) void floats_to_halves_f16c(const float* in, c10::Half* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  floats_to_halves_portable(in + i, out + i, n - i);
}

// The zero-masked forms with every lane set: the same instructions as the plain intrinsics, whose GCC 12 definitions
// start from an undefined vector and warn (-Wmaybe-uninitialized).
constexpr __mmask16 kAll16 = 0xFFFF;

__attribute__((target("avx512f"))) void halves_to_floats_avx512(const c10::Half* in, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i halves = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + i));
    _mm512_storeu_ps(out + i, _mm512_maskz_cvtph_ps(kAll16, halves));
  }
  halves_to_floats_f16c(in + i, out + i, n - i);
}

__attribute__((target("avx512f"))) void floats_to_halves_avx512(const float* in, c10::Half* out, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i halves =
        _mm512_maskz_cvtps_ph(kAll16, _mm512_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), halves);
  }
  floats_to_halves_f16c(in + i, out + i, n - i);
}

#endif

struct Converters {
  void (*to_floats)(const c10::Half*, float*, int64_t);
  void (*to_halves)(const float*, c10::Half*, int64_t);
};

// The widest conversions this CPU has, picked once when the library loads.
const Converters kConverters = [] {
#if FASTOPTIM_HAVE_F16C_PATH
  __builtin_cpu_init();  // the CPU model must be read before a static initialiser asks for it
  if (__builtin_cpu_supports("avx512f")) return Converters{halves_to_floats_avx512, floats_to_halves_avx512};
  if (__builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c")) {
    return Converters{halves_to_floats_f16c, floats_to_halves_f16c};
  }
#endif
  return Converters{halves_to_floats_portable, floats_to_halves_portable};
}();

}  // namespace

void halves_to_floats(const c10::Half* in, float* out, int64_t n) { kConverters.to_floats(in, out, n); }

void floats_to_halves(const float* in, c10::Half* out, int64_t n) { kConverters.to_halves(in, out, n); }

}  // namespace fastoptim::cpu
