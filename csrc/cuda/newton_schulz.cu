// Newton–Schulz on the GPU.
//
// Pass in: one launch for all matrices of the list (grid.y = matrix), each block reduces its squares and adds them
// to its matrix's norm with one atomic.
//
// Iteration: operands in the iteration dtype (bfloat16 from the optimizers), fp32 accumulation, every product one
// batched cuBLAS call over all matrices. Two ways to compute the symmetric products A = X·Xᵀ and b·A + c·A²:
//   plain      full batched GEMMs (PlainProducts, through ATen);
//   symmetric  only the upper-triangular T × T tiles, all (matrix, tile pair) products in one cublasGemmBatchedEx
//              call over pointer arrays (about (nt+1)/(2·nt) of the FLOPs for nt tiles per side), then one
//              epilogue pass that mirrors the upper tiles into the lower ones, adding b·A on the way.
// The choice between them is by size ("auto"): symmetric for Gram matrices of ≥ kSymmetricMinRows rows. That
// threshold is a guess, NOT measured (no GPU was available when this was written); bench/bench_newton_schulz.py
// compares both methods and is where it should be set from.
#include <torch/library.h>

#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublas_v2.h>

#include <cub/block/block_reduce.cuh>

#include <cstring>
#include <vector>

#include "kernels/newton_schulz.h"

namespace fastoptim::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridY = 65535;
// Gram matrices from this many rows up take the symmetric-tile path under method="auto" (unmeasured, see above).
constexpr int64_t kSymmetricMinRows = 2048;
constexpr int64_t kSymmetricMinTile = 256;

// A list of device addresses as a device array, copied from pinned memory on the current stream.
at::Tensor device_pointer_table(const std::vector<const void*>& pointers, const at::Device& device) {
  at::Tensor host = at::empty({static_cast<int64_t>(pointers.size())},
                              at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::memcpy(host.data_ptr(), pointers.data(), pointers.size() * sizeof(void*));
  return host.to(device, /*non_blocking=*/true);
}

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

// --- Symmetric products ---

cudaDataType_t cublas_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return CUDA_R_32F;
    case at::kBFloat16: return CUDA_R_16BF;
    case at::kHalf: return CUDA_R_16F;
    default: break;
  }
  TORCH_CHECK(false, "fastoptim: newton_schulz: no cuBLAS type for ", dtype_name(dtype));
}

// Row-major C (rows × cols) = alpha·op(A)·op(B) + beta·C for every pointer triple of the tables, in one call.
// cuBLAS is column-major, where a row-major matrix reads as its transpose: it computes Cᵀ = op(B)ᵀ·op(A)ᵀ.
void gemm_batched_row_major(bool transpose_a, bool transpose_b, int64_t rows, int64_t cols, int64_t depth,
                            float alpha, const void* const* a, int64_t lda, const void* const* b, int64_t ldb,
                            void* const* c, int64_t ldc, int64_t count, cudaDataType_t operand_type,
                            cudaDataType_t out_type) {
  const float beta = 0.0f;
  TORCH_CUDABLAS_CHECK(cublasGemmBatchedEx(
      at::cuda::getCurrentCUDABlasHandle(), transpose_b ? CUBLAS_OP_T : CUBLAS_OP_N,
      transpose_a ? CUBLAS_OP_T : CUBLAS_OP_N, static_cast<int>(cols), static_cast<int>(rows),
      static_cast<int>(depth), &alpha, b, operand_type, static_cast<int>(ldb), a, operand_type,
      static_cast<int>(lda), &beta, c, out_type, static_cast<int>(ldc), static_cast<int>(count), CUBLAS_COMPUTE_32F,
      CUBLAS_GEMM_DEFAULT));
}

constexpr int kMirrorTile = 32;
constexpr int kMirrorRowsPerPass = 8;

// For each m × m matrix of the batch, out = S + coef·G where S is given by its upper-triangular tiles of `upper`
// (tile rows ≤ tile columns, kMirrorTile wide; the lower ones are never read) and G is symmetric (`gram`, may be
// null); both triangles of `out` are written, exactly symmetric. One block per upper tile: it reads that tile and
// writes it and its mirror image, so `out` may be `upper` itself.
template <typename Upper, typename Out>
__global__ void __launch_bounds__(kMirrorTile* kMirrorRowsPerPass)
    symmetric_combine_kernel(const Upper* upper, const Out* gram, float coef, Out* out, int64_t m) {
  const int tile_row = blockIdx.y, tile_col = blockIdx.x;
  if (tile_row > tile_col) return;
  __shared__ float values[kMirrorTile][kMirrorTile + 1];
  const int64_t base = static_cast<int64_t>(blockIdx.z) * m * m;
  const int x = threadIdx.x;
  for (int r = threadIdx.y; r < kMirrorTile; r += kMirrorRowsPerPass) {
    const int64_t index = base + (static_cast<int64_t>(tile_row) * kMirrorTile + r) * m + tile_col * kMirrorTile + x;
    float v = static_cast<float>(upper[index]);
    if (gram != nullptr) v += coef * static_cast<float>(gram[index]);
    values[r][x] = v;
  }
  __syncthreads();
  const bool diagonal = tile_row == tile_col;
  for (int r = threadIdx.y; r < kMirrorTile; r += kMirrorRowsPerPass) {
    // A diagonal tile keeps its upper triangle (r ≤ x) and mirrors it onto its lower one.
    const float v = diagonal && r > x ? values[x][r] : values[r][x];
    out[base + (static_cast<int64_t>(tile_row) * kMirrorTile + r) * m + tile_col * kMirrorTile + x] = static_cast<Out>(v);
    if (!diagonal) {
      out[base + (static_cast<int64_t>(tile_col) * kMirrorTile + r) * m + tile_row * kMirrorTile + x] =
          static_cast<Out>(values[x][r]);
    }
  }
}

template <typename Upper, typename Out>
void symmetric_combine(const at::Tensor& upper, const Out* gram, float coef, at::Tensor& out) {
  const int64_t batch = out.size(0), m = out.size(1);
  const dim3 grid(static_cast<unsigned>(m / kMirrorTile), static_cast<unsigned>(m / kMirrorTile),
                  static_cast<unsigned>(batch));
  symmetric_combine_kernel<Upper, Out><<<grid, dim3(kMirrorTile, kMirrorRowsPerPass), 0,
                                         at::cuda::getCurrentCUDAStream()>>>(
      upper.data_ptr<Upper>(), gram, coef, out.data_ptr<Out>(), m);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The edge of the square tiles for m × m Gram matrices: the largest multiple of kMirrorTile that divides m into
// ≥ 4 tiles per side (else ≥ 2); 0 where none does.
int64_t symmetric_tile(int64_t m) {
  for (const int64_t min_tiles : {4, 2}) {
    for (const int64_t tile : {512, 256, 128, 64, 32}) {
      if (m % tile == 0 && m / tile >= min_tiles) return tile;
    }
  }
  return 0;
}

// The products of csrc/kernels/newton_schulz.h on upper-triangular tiles.
class SymmetricProducts {
 public:
  explicit SymmetricProducts(int64_t tile) : tile_(tile) {}

  // A = X·Xᵀ: tile (i, j) = X[rows i]·X[rows j]ᵀ for i ≤ j, then the mirror pass.
  void gram(const at::Tensor& x, at::Tensor& a) const {
    const int64_t n = x.size(2);
    const auto tables = tile_tables(x, n, x, n, a);
    gemm_batched_row_major(false, true, tile_, tile_, n, 1.0f, tables.a, n, tables.b, n, tables.c, m(a),
                           tables.count, cublas_type(x.scalar_type()), cublas_type(a.scalar_type()));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "newton_schulz", [&] {
      symmetric_combine<scalar_t, scalar_t>(a, static_cast<const scalar_t*>(nullptr), 0.0f, a);
    });
  }

  // out = b·A + c·A·A: tile (i, j) of c·A·A = c·A[rows i]·A[columns j] into a float32 buffer, then one pass that
  // adds b·A and mirrors.
  void poly(const at::Tensor& a, double b, double c, at::Tensor& out) const {
    const int64_t mm = m(a);
    at::Tensor squares = at::empty(a.sizes(), a.options().dtype(at::kFloat));
    const auto tables = tile_tables(a, mm, a, 1, squares);
    gemm_batched_row_major(false, false, tile_, tile_, mm, static_cast<float>(c), tables.a, mm, tables.b, mm,
                           tables.c, mm, tables.count, cublas_type(a.scalar_type()), CUDA_R_32F);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "newton_schulz", [&] {
      symmetric_combine<float, scalar_t>(squares, a.data_ptr<scalar_t>(), static_cast<float>(b), out);
    });
  }

 private:
  struct Tables {
    at::Tensor storage;  // keeps the device array alive until the call is queued
    const void* const* a;
    const void* const* b;
    void* const* c;
    int64_t count;
  };

  static int64_t m(const at::Tensor& gram) { return gram.size(1); }

  // For every matrix and tile pair i ≤ j: A operand at row i·T of `left`, B operand at tile j of `right` (element
  // offset j·T·right_tile_stride, so rows for X and columns for A·A), C at tile (i, j) of `out`.
  Tables tile_tables(const at::Tensor& left, int64_t left_row_stride, const at::Tensor& right,
                     int64_t right_tile_stride, const at::Tensor& out) const {
    const int64_t batch = out.size(0), mm = m(out), tiles = mm / tile_;
    const int64_t pairs = tiles * (tiles + 1) / 2, count = batch * pairs;
    const auto* left_base = static_cast<const char*>(left.data_ptr());
    const auto* right_base = static_cast<const char*>(right.data_ptr());
    auto* out_base = static_cast<char*>(out.data_ptr());
    const int64_t operand_size = left.element_size(), out_size = out.element_size();
    std::vector<const void*> pointers(3 * count);
    int64_t k = 0;
    for (int64_t matrix = 0; matrix < batch; ++matrix) {
      for (int64_t i = 0; i < tiles; ++i) {
        for (int64_t j = i; j < tiles; ++j, ++k) {
          pointers[k] = left_base + (matrix * left.stride(0) + i * tile_ * left_row_stride) * operand_size;
          pointers[count + k] = right_base + (matrix * right.stride(0) + j * tile_ * right_tile_stride) * operand_size;
          pointers[2 * count + k] = out_base + (matrix * out.stride(0) + (i * tile_) * mm + j * tile_) * out_size;
        }
      }
    }
    Tables tables{device_pointer_table(pointers, out.device()), nullptr, nullptr, nullptr, count};
    auto* addresses = static_cast<void**>(tables.storage.data_ptr());
    tables.a = addresses;
    tables.b = addresses + count;
    tables.c = addresses + 2 * count;
    return tables;
  }

  int64_t tile_;
};

at::Tensor newton_schulz(const at::Tensor& x, int64_t steps, double eps, const std::optional<at::Tensor>& coefficients,
                         const std::optional<at::Tensor>& norms, c10::string_view method) {
  check_newton_schulz(x, eps, norms);
  TORCH_CHECK(method == "auto" || method == "plain" || method == "symmetric", "fastoptim: newton_schulz: method is '",
              method, "'; expected 'auto', 'plain' or 'symmetric'");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = std::min(x.size(1), x.size(2));
  const int64_t tile = symmetric_tile(m);
  TORCH_CHECK(method != "symmetric" || tile > 0, "fastoptim: newton_schulz: method='symmetric' needs the smaller "
              "side of the matrices to be a multiple of 32 of at least 64, got ", m);
  TORCH_CHECK(x.size(0) <= kMaxGridY, "fastoptim: newton_schulz: x holds ", x.size(0), " matrices; at most ",
              kMaxGridY, " per call");
  const bool symmetric = method == "symmetric" || (method == "auto" && m >= kSymmetricMinRows && tile >= kSymmetricMinTile);
  if (symmetric) return newton_schulz_iterate(x, steps, eps, coefficients, norms, SymmetricProducts(tile));
  return newton_schulz_iterate(x, steps, eps, coefficients, norms, PlainProducts{});
}

}  // namespace
}  // namespace fastoptim::cuda

TORCH_LIBRARY_IMPL(fastoptim, CUDA, m) {
  m.impl("newton_schulz_momentum_", &fastoptim::newton_schulz_momentum_<fastoptim::cuda::NewtonSchulzBackend>);
  m.impl("newton_schulz", &fastoptim::cuda::newton_schulz);
}
