// Dtype dispatch for the kernels: parameters may be float32, bfloat16 or float16 (math is float32 throughout);
// state is float32; an update list is either float32 or the parameters' dtype.
#pragma once

#include <ATen/Dispatch.h>

#include "common/checks.h"

// Runs the lambda __VA_ARGS__ (which sees `param_t`) for the parameters' dtype.
#define FASTOPTIM_DISPATCH_PARAM(DTYPE, NAME, ...)                               \
  AT_DISPATCH_SWITCH(DTYPE, NAME,                                                \
                     AT_DISPATCH_CASE(at::kFloat, [&] { using param_t = scalar_t; __VA_ARGS__(); }) \
                     AT_DISPATCH_CASE(at::kBFloat16, [&] { using param_t = scalar_t; __VA_ARGS__(); }) \
                     AT_DISPATCH_CASE(at::kHalf, [&] { using param_t = scalar_t; __VA_ARGS__(); }))

// Runs the lambda __VA_ARGS__ (which sees `param_t` and `update_t`); updates must be float32 or the params' dtype.
#define FASTOPTIM_DISPATCH_PARAM_UPDATE(PARAM_DTYPE, UPDATE_DTYPE, NAME, ...)                            \
  FASTOPTIM_DISPATCH_PARAM(PARAM_DTYPE, NAME, [&] {                                                       \
    TORCH_CHECK((UPDATE_DTYPE) == at::kFloat || (UPDATE_DTYPE) == (PARAM_DTYPE), "fastoptim: ", NAME,      \
                ": updates have dtype ", fastoptim::dtype_name(UPDATE_DTYPE),             \
                "; expected float32 or the parameters' dtype ", fastoptim::dtype_name(PARAM_DTYPE));                                                                           \
    if ((UPDATE_DTYPE) == at::kFloat) {                                                                   \
      using update_t = float;                                                                             \
      __VA_ARGS__();                                                                                      \
    } else {                                                                                              \
      using update_t = param_t;                                                                           \
      __VA_ARGS__();                                                                                      \
    }                                                                                                     \
  })
