// Newton–Schulz on the GPU.
//
// Pass in: one launch for all matrices of the list (grid.y = matrix), each block reduces its squares and adds them
// to its matrix's norm with one atomic.
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
#include <vector>

#include "cuda/symmetric_tiles.cuh"
#include "kernels/newton_schulz.h"

namespace fastoptim::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridY = 65535;
// Gram matrices from this many rows up take the symmetric-tile path under method="auto" (unmeasured, see above).
constexpr int64_t kSymmetricMinRows = 2048;

// --- Pass in ---

template <typename B, typename G, typename O>
__global__ void __launch_bounds__(kThreads) momentum_stack_kernel(B* const* buffers, const G* const* grads, O* out,
                                                                  float* norm_sq, int64_t numel,
                                                                  NsMomentumMath math) {
  const int64_t matrix = blockIdx.y;
  B* buf = buffers[matrix];
  const G* grad = grads[matrix];
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
  if (threadIdx.x == 0) atomicAdd(norm_sq + matrix, total);
}

struct NewtonSchulzBackend {
  template <typename B, typename G, typename O>
  static void momentum_stack(at::TensorList buffers, at::TensorList grads, const NsMomentumMath& math,
                             at::Tensor& out, at::Tensor& norm_sq) {
    const int64_t batch = static_cast<int64_t>(buffers.size());
    const int64_t numel = out.size(1) * out.size(2);
    if (numel == 0) return;
    TORCH_CHECK(batch <= kMaxGridY, "fastoptim: newton_schulz_momentum_: momentum_buffers has ", batch,
                " matrices; one call takes at most ", kMaxGridY);
    const c10::cuda::CUDAGuard guard(out.device());
    std::vector<const void*> pointers;
    for (const at::Tensor& t : buffers) pointers.push_back(t.data_ptr());
    for (const at::Tensor& t : grads) pointers.push_back(t.data_ptr());
    const at::Tensor table = device_pointer_table(pointers, out.device());
    void* const* addresses = static_cast<void* const*>(table.data_ptr());
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>((numel + kThreads - 1) / kThreads, 1024)),
                    static_cast<unsigned>(batch));
    momentum_stack_kernel<B, G, O><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<B* const*>(addresses), reinterpret_cast<const G* const*>(addresses + batch),
        out.data_ptr<O>(), norm_sq.data_ptr<float>(), numel, math);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace
}  // namespace fastoptim::cuda

TORCH_LIBRARY_IMPL(fastoptim, CUDA, m) {
  m.impl("newton_schulz_momentum_", &fastoptim::newton_schulz_momentum_<fastoptim::cuda::NewtonSchulzBackend>);
  m.impl("newton_schulz", &fastoptim::newton_schulz<fastoptim::cuda::SymmetricTiles, fastoptim::cuda::kSymmetricMinRows>);
}
