// Muon's and Scion's orthogonalisation, as two ops the CPU and CUDA kernels share:
//
//   newton_schulz_momentum_  the pass in: momentum update of a list of same-shape matrices, the cast of each
//                            direction to the iteration dtype, written into one stacked (B, m, n) batch, and the
//                            direction's Frobenius norm per matrix;
//   newton_schulz            k quintic steps X ← a·X + (b·A + c·A²)·X, A = X·Xᵀ, on that batch, with the 1/(‖X‖_F+ε)
//                            normalisation folded into the copy that the iteration needs anyway; a rides on the
//                            diagonal, P = a·I + b·A + c·A², so that each step ends in one GEMM X ← P·X, with no
//                            copy of X into the output first (as a GEMM's beta·C would need).
//
// The pass out (p ← p·(1 − lr·λ) − lr·scale·O) is decoupled_update_. The iteration is written once here, over a
// `Products` policy that computes the two symmetric products (A = X·Xᵀ and B = b·A + c·A²); the CPU uses plain
// batched GEMMs for them or, for large matrices, upper-triangular tiles (common/symmetric_tiles.h).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/symmetric_tiles.h"

namespace fastoptim {

// The element math of the pass in. Heavy ball (Muon): buf ← β·buf + g; EMA (Scion): buf ← β·buf + (1−β)·g, i.e.
// `grad_weight` is 1 or 1−β. The direction is the buffer, or with Nesterov β·buf + grad_weight·g.
struct NsMomentumMath {
  float beta;
  float grad_weight;
  bool nesterov;

  template <typename B, typename G>
  C10_HOST_DEVICE float operator()(B& buf, const G& grad) const {
    const float g = static_cast<float>(grad);
    buf = static_cast<B>(beta * static_cast<float>(buf) + grad_weight * g);
    const float stored = static_cast<float>(buf);  // the state as kept, so a resumed run continues identically
    return nesterov ? beta * stored + grad_weight * g : stored;
  }
};

// What a valid call of newton_schulz_momentum_ works on: B matrices of m × n (a buffer of shape (m, rest...) is
// read as m × prod(rest)).
struct MomentumStack {
  at::Device device;
  int64_t batch, rows, cols;
  at::ScalarType buffer_dtype, grad_dtype;
};

inline std::optional<MomentumStack> check_momentum_stack(at::TensorList buffers, at::TensorList grads,
                                                         at::ScalarType dtype) {
  const auto device = check_tensor_lists({{"momentum_buffers", buffers}, {"grads", grads}});
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "fastoptim: newton_schulz_momentum_: dtype is ", dtype_name(dtype),
              "; supported are float32, bfloat16 and float16");
  if (!device) return std::nullopt;
  const at::Tensor& first = buffers[0];
  TORCH_CHECK(first.dim() >= 2, "fastoptim: momentum_buffers[0] has ", first.dim(),
              " dims; Newton–Schulz needs matrices (≥ 2 dims, read as (size(0), rest))");
  for (size_t i = 0; i < buffers.size(); ++i) {
    TORCH_CHECK(buffers[i].sizes() == first.sizes(), "fastoptim: momentum_buffers[", i, "] has shape ",
                buffers[i].sizes(), " but momentum_buffers[0] has ", first.sizes(),
                "; one call takes matrices of one shape");
  }
  const at::ScalarType buffer_dtype = common_float_dtype("momentum_buffers", buffers);
  const at::ScalarType grad_dtype = common_float_dtype("grads", grads);
  TORCH_CHECK(grad_dtype == at::kFloat || grad_dtype == buffer_dtype, "fastoptim: grads have dtype ",
              dtype_name(grad_dtype), "; expected float32 or the momentum buffers' dtype ", dtype_name(buffer_dtype));
  const int64_t rows = first.size(0);
  return MomentumStack{*device, static_cast<int64_t>(buffers.size()), rows, rows == 0 ? 0 : first.numel() / rows,
                       buffer_dtype, grad_dtype};
}

// Runs the lambda __VA_ARGS__ (which sees `buffer_t`, `grad_t` and `out_t`) for the dtypes of a checked stack.
#define FASTOPTIM_DISPATCH_MOMENTUM_STACK(STACK, OUT_DTYPE, ...)                                              \
  FASTOPTIM_DISPATCH_PARAM_UPDATE((STACK).buffer_dtype, (STACK).grad_dtype, "newton_schulz_momentum_", [&] { \
    using buffer_t = param_t;                                                                               \
    using grad_t = update_t;                                                                                \
    FASTOPTIM_DISPATCH_PARAM(OUT_DTYPE, "newton_schulz_momentum_", [&] {                                    \
      using out_t = param_t;                                                                                \
      __VA_ARGS__();                                                                                        \
    });                                                                                                     \
  })

// The pass in, over a backend that provides
//   momentum_stack<buffer_t, grad_t, out_t>(buffers, grads, math, out, norm_sq): per matrix i, updates the buffer,
//   writes the direction into out[i] and the sum of its squares into norm_sq[i] (float32, zero on entry).
template <typename Backend>
std::tuple<at::Tensor, at::Tensor> newton_schulz_momentum_(at::TensorList momentum_buffers, at::TensorList grads,
                                                           double beta, bool nesterov, bool ema,
                                                           at::ScalarType dtype) {
  const auto stack = check_momentum_stack(momentum_buffers, grads, dtype);
  if (!stack) {  // an empty list: an empty batch of unknown shape
    return {at::empty({0, 0, 0}, at::TensorOptions().dtype(dtype)), at::empty({0}, at::kFloat)};
  }
  const auto options = at::TensorOptions().device(stack->device);
  at::Tensor out = at::empty({stack->batch, stack->rows, stack->cols}, options.dtype(dtype));
  at::Tensor norm_sq = at::zeros({stack->batch}, options.dtype(at::kFloat));
  const NsMomentumMath math{static_cast<float>(beta), ema ? static_cast<float>(1.0 - beta) : 1.0f, nesterov};
  FASTOPTIM_DISPATCH_MOMENTUM_STACK(*stack, dtype, [&] {
    Backend::template momentum_stack<buffer_t, grad_t, out_t>(momentum_buffers, grads, math, out, norm_sq);
  });
  return {out, norm_sq.sqrt_()};
}

// Keller Jordan's quintic coefficients (a, b, c): a steep slope at zero, singular values driven into ~[0.7, 1.2].
constexpr std::array<double, 3> kNsCoefficients{3.4445, -4.7750, 2.0315};

// The (a, b, c) of each step: the default quintic `steps` times, or the rows of a (steps, 3) CPU tensor.
inline std::vector<std::array<double, 3>> ns_schedule(int64_t steps, const std::optional<at::Tensor>& coefficients) {
  TORCH_CHECK(steps >= 0, "fastoptim: newton_schulz: steps is ", steps, "; it must be ≥ 0");
  if (!coefficients) return std::vector<std::array<double, 3>>(steps, kNsCoefficients);
  const at::Tensor& c = *coefficients;
  TORCH_CHECK(c.dim() == 2 && c.size(0) == steps && c.size(1) == 3, "fastoptim: newton_schulz: coefficients has shape ",
              c.sizes(), "; expected (steps, 3) = (", steps, ", 3), one (a, b, c) per step");
  TORCH_CHECK(c.device().is_cpu(), "fastoptim: newton_schulz: coefficients is on ", c.device(),
              "; it must be a CPU tensor (its values become GEMM scalars on the host)");
  TORCH_CHECK(at::isFloatingType(c.scalar_type()), "fastoptim: newton_schulz: coefficients has dtype ",
              dtype_name(c.scalar_type()), "; expected a floating dtype");
  const at::Tensor values = c.to(at::kDouble).contiguous();
  const double* v = values.data_ptr<double>();
  std::vector<std::array<double, 3>> schedule(steps);
  for (int64_t s = 0; s < steps; ++s) schedule[s] = {v[3 * s], v[3 * s + 1], v[3 * s + 2]};
  return schedule;
}

// Argument checks of newton_schulz, before anything is computed.
inline void check_newton_schulz(const at::Tensor& x, double eps, const std::optional<at::Tensor>& norms) {
  TORCH_CHECK(x.dim() == 3, "fastoptim: newton_schulz: x has ", x.dim(),
              " dims; expected a batch of matrices (batch, m, n)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "fastoptim: newton_schulz: x has dtype ", dtype_name(x.scalar_type()),
              "; supported are float32, bfloat16 and float16 (the iteration runs in x's dtype)");
  TORCH_CHECK(eps >= 0, "fastoptim: newton_schulz: eps is ", eps, "; it must be ≥ 0");
  if (norms) {
    TORCH_CHECK(norms->dim() == 1 && norms->size(0) == x.size(0) && norms->scalar_type() == at::kFloat,
                "fastoptim: newton_schulz: norms must be a float32 tensor of shape (", x.size(0), ",), got dtype ",
                dtype_name(norms->scalar_type()), " and shape ", norms->sizes());
    TORCH_CHECK(norms->device() == x.device(), "fastoptim: newton_schulz: norms is on ", norms->device(),
                " but x is on ", x.device());
  }
}

// The products of one step on the wide batch X (B, m, n), m ≤ n, as a policy object:
//   gram(X, A):                A = X·Xᵀ
//   poly(A, a, b, c, out):     out = a·I + b·A + c·A·A
// Plain batched GEMMs through ATen (BLAS on CPU, cuBLAS on GPU, fp32 accumulation); the scalars b and c ride on
// the GEMM's beta and alpha, a on the diagonal afterwards (m elements per matrix).
struct PlainProducts {
  void gram(const at::Tensor& x, at::Tensor& a) const { at::bmm_out(a, x, x.mT()); }
  void poly(const at::Tensor& gram, double a, double b, double c, at::Tensor& out) const {
    at::baddbmm_out(out, gram, gram, gram, b, c);
    out.diagonal(0, 1, 2).add_(a);
  }
};

// The same products on the upper-triangular tiles of common/symmetric_tiles.h; c·A·A goes into a float32 buffer,
// and b·A and a·I are added in the mirroring pass.
template <typename Tiles>
struct SymmetricProducts {
  int64_t tile;

  void gram(const at::Tensor& x, at::Tensor& a) const { symmetric_gram_<Tiles>(a, x, 0.0, 1.0, tile); }
  void poly(const at::Tensor& gram, double a, double b, double c, at::Tensor& out) const {
    at::Tensor squares = at::empty(gram.sizes(), gram.options().dtype(at::kFloat));
    Tiles::upper_products(gram, gram, c, 0.0, squares, tile);
    Tiles::combine(squares, gram, b, a, out);
  }
};

// The iteration, given the products policy the backend chose for this batch.
template <typename Products>
at::Tensor newton_schulz_iterate(const at::Tensor& x, int64_t steps, double eps,
                                 const std::optional<at::Tensor>& coefficients,
                                 const std::optional<at::Tensor>& norms, const Products& products) {
  const auto schedule = ns_schedule(steps, coefficients);
  const int64_t batch = x.size(0);
  // Iterate on the wide orientation (m ≤ n), so the Gram matrix is the smaller one; the last step writes the tall
  // result directly (Xᵀ·P = (P·X)ᵀ, P symmetric), so no transposing pass is needed on the way out.
  const bool tall = x.size(1) > x.size(2);
  const at::Tensor wide = tall ? x.mT() : x;
  const int64_t m = wide.size(1), n = wide.size(2);
  if (x.numel() == 0) return at::empty_like(x, at::MemoryFormat::Contiguous);

  // The normalisation rides on the copy into the working buffer: X = x/(‖x‖_F + ε), a zero matrix stays zero
  // (also with ε = 0) instead of turning into 0/0.
  const at::Tensor norm = norms ? *norms : at::linalg_vector_norm(x, 2, at::IntArrayRef{1, 2}, false, at::kFloat);
  const at::Tensor denom = norm + eps;
  const at::Tensor inverse = at::where(denom > 0, denom.reciprocal(), at::zeros_like(denom));
  if (steps == 0) return at::mul(x, inverse.view({batch, 1, 1})).to(x.scalar_type());
  at::Tensor current = at::empty({batch, m, n}, x.options().memory_format(at::MemoryFormat::Contiguous));
  at::mul_out(current, wide, inverse.view({batch, 1, 1}));
  at::Tensor next = at::empty_like(current);
  at::Tensor gram = at::empty({batch, m, m}, current.options());
  at::Tensor poly = at::empty_like(gram);
  for (int64_t s = 0; s < steps; ++s) {
    const auto [a, b, c] = schedule[s];
    products.gram(current, gram);
    products.poly(gram, a, b, c, poly);
    if (s == steps - 1 && tall) {
      at::Tensor out = at::empty({batch, n, m}, current.options());
      at::bmm_out(out, current.mT(), poly);
      return out;
    }
    at::bmm_out(next, poly, current);
    std::swap(current, next);
  }
  return current;
}

// The op: `method` picks plain or tiled products ("auto": tiled for Gram matrices from AutoMinRows rows up, a
// per-backend choice).
template <typename Tiles, int64_t AutoMinRows>
at::Tensor newton_schulz(const at::Tensor& x, int64_t steps, double eps, const std::optional<at::Tensor>& coefficients,
                         const std::optional<at::Tensor>& norms, c10::string_view method) {
  check_newton_schulz(x, eps, norms);
  const int64_t tile = resolve_symmetric_tile(method, std::min(x.size(1), x.size(2)), AutoMinRows, "newton_schulz");
  if (tile > 0) return newton_schulz_iterate(x, steps, eps, coefficients, norms, SymmetricProducts<Tiles>{tile});
  return newton_schulz_iterate(x, steps, eps, coefficients, norms, PlainProducts{});
}

}  // namespace fastoptim
