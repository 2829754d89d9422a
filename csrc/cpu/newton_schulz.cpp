// Newton–Schulz on the CPU: the pass in as a parallel loop over (matrix, chunk) tasks, the iteration through
// ATen's batched BLAS or, for large matrices, BLAS on upper-triangular tiles (cpu/symmetric_tiles.h).
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "common/multi_tensor.h"
#include "cpu/symmetric_tiles.h"
#include "kernels/newton_schulz.h"

namespace fastoptim::cpu {
namespace {

// method="auto" tiles Gram matrices from this many rows up. One thread of CI's AVX512-BF16 EPYC, float32, five
// steps, strips against plain (min of 7): 512 × 512 in 35.1 ms against 36.9; 4 × 512 × 512 in 144 against 158;
// 1024 × 1024 in 285 against 303.
constexpr int64_t kSymmetricMinRows = 512;

// Whether the CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX), as oneDNN's bf16 GEMMs need to be fast.
bool native_bfloat16() {
#if defined(__GNUC__) && defined(__x86_64__)
  static const bool native = __builtin_cpu_supports("avx512bf16") || __builtin_cpu_supports("amx-bf16");
  return native;
#else
  return false;
#endif
}

// Where bfloat16 is native, oneDNN's plain batched GEMMs beat the strips, whose A·A runs in a float32 buffer
// (1024 × 1024, five steps, on CI's AVX512-BF16 EPYC: 69 ms plain against 140 ms); where it is emulated, halving the
// Gram work wins (24.2 s plain against 12.6 s tiled on an AVX2 EPYC). So "auto" keeps bf16 plain there.
at::Tensor newton_schulz(const at::Tensor& x, int64_t steps, double eps, const std::optional<at::Tensor>& coefficients,
                         const std::optional<at::Tensor>& norms, c10::string_view method) {
  const bool plain_is_faster = method == "auto" && x.scalar_type() == at::kBFloat16 && native_bfloat16();
  return fastoptim::newton_schulz<SymmetricTiles, kSymmetricMinRows>(x, steps, eps, coefficients, norms,
                                                                     plain_is_faster ? "plain" : method);
}

struct NewtonSchulzBackend {
  template <typename B, typename G, typename O>
  static void momentum_stack(at::TensorList buffers, at::TensorList grads, const NsMomentumMath& math,
                             at::Tensor& out, at::Tensor& norm_sq) {
    const int64_t numel = out.size(1) * out.size(2);
    const int64_t chunks_per_matrix = std::max<int64_t>(1, (numel + kChunkSize - 1) / kChunkSize);
    const int64_t tasks = static_cast<int64_t>(buffers.size()) * chunks_per_matrix;
    // Each task sums its own squares (in double, so the order of tasks does not matter at float32 precision).
    std::vector<double> partial(tasks, 0.0);
    O* out_data = out.data_ptr<O>();
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t matrix = task / chunks_per_matrix;
        const int64_t start = (task % chunks_per_matrix) * kChunkSize;
        const int64_t stop = std::min(numel, start + kChunkSize);
        B* buf = buffers[matrix].data_ptr<B>();
        const G* grad = grads[matrix].data_ptr<G>();
        O* direction = out_data + matrix * numel;
        double squares = 0.0;
        for (int64_t i = start; i < stop; ++i) {
          const float u = math(buf[i], grad[i]);
          direction[i] = static_cast<O>(u);
          squares += static_cast<double>(u) * u;
        }
        partial[task] = squares;
      }
    });
    float* norm_sq_data = norm_sq.data_ptr<float>();
    for (int64_t matrix = 0; matrix < static_cast<int64_t>(buffers.size()); ++matrix) {
      const auto first = partial.begin() + matrix * chunks_per_matrix;
      norm_sq_data[matrix] = static_cast<float>(std::accumulate(first, first + chunks_per_matrix, 0.0));
    }
  }
};

}  // namespace
}  // namespace fastoptim::cpu

TORCH_LIBRARY_IMPL(fastoptim, CPU, m) {
  m.impl("newton_schulz_momentum_", &fastoptim::newton_schulz_momentum_<fastoptim::cpu::NewtonSchulzBackend>);
  m.impl("newton_schulz", &fastoptim::cpu::newton_schulz);
}
