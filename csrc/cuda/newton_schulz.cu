// Newton–Schulz on the GPU.
//
// Pass in: one launch per 64 matrices of the list (grid.y = matrix, addresses passed by value), each block writes
// the sum of its squares to its own slot; the slots are summed in a fixed order (deterministic, no atomics).
//
// Iteration: operands in the iteration dtype (bfloat16 from the optimizers), fp32 accumulation, every product one
// batched cuBLAS call over all matrices: full batched GEMMs, or only the upper-triangular tiles of the symmetric
// products (cuda/symmetric_tiles.cu). method="auto" tiles Gram matrices from kSymmetricMinRows rows up. That
// threshold is a guess, NOT measured (no GPU was available when this was written); bench/bench_newton_schulz.py
// compares both methods and is where it should be set from.
#include <torch/library.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cub/block/block_reduce.cuh>

#include <algorithm>

#include "cuda/symmetric_tiles.cuh"
#include "kernels/newton_schulz.h"

namespace fastoptim::cuda {
namespace {

constexpr int kThreads = 256;
// Gram matrices from this many rows up take the symmetric-tile path under method="auto" (unmeasured, see above).
constexpr int64_t kSymmetricMinRows = 2048;

// --- Pass in ---

// The addresses of up to kMatricesPerLaunch matrices, passed by value as a kernel argument (no table to copy to the
// device, so the launch is capturable in a CUDA graph).
constexpr int kMatricesPerLaunch = 64;

template <typename B, typename G>
struct MatrixAddresses {
  B* buffers[kMatricesPerLaunch];
  const G* grads[kMatricesPerLaunch];
};

// grid.y = matrix of this launch; each block writes the sum of its squares to its own slot of `partials`
// (batch, gridDim.x), which are then summed in a fixed order: no float atomics, so two runs agree bitwise.
template <typename B, typename G, typename O>
__global__ void __launch_bounds__(kThreads) momentum_stack_kernel(MatrixAddresses<B, G> addresses, int64_t first,
                                                                  O* out, float* partials, int64_t numel,
                                                                  NsMomentumMath math) {
  const int64_t matrix = first + blockIdx.y;
  B* buf = addresses.buffers[blockIdx.y];
  const G* grad = addresses.grads[blockIdx.y];
  O* direction = out + matrix * numel;
  float squares = 0.0f;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const float u = math(buf[i], grad[i]);
    direction[i] = static_cast<O>(u);
    squares += u * u;
  }
  using Reduce = cub::BlockReduce<float, kThreads>;
  __shared__ typename Reduce::TempStorage storage;
  const float total = Reduce(storage).Sum(squares);
  if (threadIdx.x == 0) partials[matrix * gridDim.x + blockIdx.x] = total;
}

struct NewtonSchulzBackend {
  template <typename B, typename G, typename O>
  static void momentum_stack(at::TensorList buffers, at::TensorList grads, const NsMomentumMath& math,
                             at::Tensor& out, at::Tensor& norm_sq) {
    const int64_t batch = static_cast<int64_t>(buffers.size());
    const int64_t numel = out.size(1) * out.size(2);
    if (numel == 0) return;
    const c10::cuda::CUDAGuard guard(out.device());
    const int64_t blocks = std::min<int64_t>((numel + kThreads - 1) / kThreads, 1024);
    at::Tensor partials = at::empty({batch, blocks}, norm_sq.options());
    for (int64_t first = 0; first < batch; first += kMatricesPerLaunch) {
      const int64_t count = std::min<int64_t>(kMatricesPerLaunch, batch - first);
      MatrixAddresses<B, G> addresses{};
      for (int64_t i = 0; i < count; ++i) {
        addresses.buffers[i] = buffers[first + i].data_ptr<B>();
        addresses.grads[i] = grads[first + i].data_ptr<G>();
      }
      const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(count));
      momentum_stack_kernel<B, G, O><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          addresses, first, out.data_ptr<O>(), partials.data_ptr<float>(), numel, math);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    at::sum_out(norm_sq, partials, {1});
  }
};

}  // namespace
}  // namespace fastoptim::cuda

TORCH_LIBRARY_IMPL(fastoptim, CUDA, m) {
  m.impl("newton_schulz_momentum_", &fastoptim::newton_schulz_momentum_<fastoptim::cuda::NewtonSchulzBackend>);
  m.impl("newton_schulz", &fastoptim::newton_schulz<fastoptim::cuda::SymmetricTiles, fastoptim::cuda::kSymmetricMinRows>);
}
