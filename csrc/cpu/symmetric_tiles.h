// The CPU side of common/symmetric_tiles.h: one BLAS GEMM per strip, written straight into the strip's view of
// the result (a strided row-major block, so BLAS needs no copy), then one blocked pass that mirrors the upper
// triangle (parallel over the matrices).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "common/symmetric_tiles.h"

namespace fastoptim::cpu {

struct SymmetricTiles {
  static void upper_products(const at::Tensor& left_operand, const at::Tensor& right_operand, double alpha,
                             double beta, at::Tensor& out, int64_t tile) {
    // CPU BLAS multiplies in the result's dtype (a float32 buffer may receive bfloat16 operands).
    const at::Tensor left = left_operand.to(out.scalar_type()), right = right_operand.to(out.scalar_type());
    const int64_t m = out.size(1);
    for (int64_t b = 0; b < out.size(0); ++b) {
      for (int64_t first = 0; first < m; first += tile) {
        at::Tensor strip = out[b].narrow(0, first, tile).narrow(1, first, m - first);
        at::addmm_out(strip, strip, left[b].narrow(0, first, tile), right[b].narrow(1, first, m - first), beta,
                      alpha);
      }
    }
  }

  static void combine(const at::Tensor& upper, const at::Tensor& gram, double coef, double diagonal,
                      at::Tensor& out) {
    const int64_t m = out.size(1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "symmetric_combine", [&] {
      using Out = scalar_t;
      const Out* gram_data = gram.defined() ? gram.data_ptr<Out>() : nullptr;
      const auto run = [&](const auto* upper_data) {
        at::parallel_for(0, out.size(0), 1, [&](int64_t begin, int64_t end) {
          for (int64_t matrix = begin; matrix < end; ++matrix) {
            const int64_t offset = matrix * m * m;
            combine_matrix(upper_data + offset, gram_data == nullptr ? nullptr : gram_data + offset,
                           static_cast<float>(coef), static_cast<float>(diagonal), out.data_ptr<Out>() + offset,
                           m);
          }
        });
      };
      if (upper.scalar_type() == at::kFloat) {
        run(upper.data_ptr<float>());
      } else {
        run(upper.data_ptr<Out>());
      }
    });
  }

 private:
  // Element (r, c), r ≤ c, of `upper` (plus coef·gram, plus `diagonal` where r = c) into out at (r, c) and (c, r),
  // in kBlock × kBlock squares so that the transposed writes stay in cache. Only elements r ≤ c are read, so out may
  // be upper itself.
  template <typename Upper, typename Out>
  static void combine_matrix(const Upper* upper, const Out* gram, float coef, float diagonal, Out* out, int64_t m) {
    constexpr int64_t kBlock = 32;
    for (int64_t r0 = 0; r0 < m; r0 += kBlock) {
      for (int64_t c0 = r0; c0 < m; c0 += kBlock) {
        for (int64_t r = r0; r < std::min(r0 + kBlock, m); ++r) {
          for (int64_t c = std::max(c0, r); c < std::min(c0 + kBlock, m); ++c) {
            float v = static_cast<float>(upper[r * m + c]);
            if (gram != nullptr) v += coef * static_cast<float>(gram[r * m + c]);
            if (r == c) v += diagonal;
            out[r * m + c] = static_cast<Out>(v);
            out[c * m + r] = static_cast<Out>(v);
          }
        }
      }
    }
  }
};

}  // namespace fastoptim::cpu
