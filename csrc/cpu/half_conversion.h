// float16 ↔ float32 for whole runs of elements, in the x86 instructions made for it (F16C: eight per instruction)
// where the CPU has them. Elementwise, GCC vectorises only bit arithmetic for float16 (element_cast), about twenty
// operations per conversion, which made fp16 optimizer steps conversion-bound; the CPU launcher therefore stages
// fp16 lists through float32 buffers converted here (cpu/multi_tensor_apply.h).
#pragma once

#include <c10/util/Half.h>

#include <cstdint>

namespace fastoptim::cpu {

// out[i] = in[i] as float32, exactly.
void halves_to_floats(const c10::Half* in, float* out, int64_t n);

// out[i] = in[i] rounded to float16, to nearest even (as c10::Half rounds; a NaN stays a NaN).
void floats_to_halves(const float* in, c10::Half* out, int64_t n);

}  // namespace fastoptim::cpu
