#include "cuda/symmetric_tiles.cuh"

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublas_v2.h>

#include <algorithm>
#include <type_traits>

#include "common/checks.h"

namespace fastoptim::cuda {

namespace {

cudaDataType_t cublas_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return CUDA_R_32F;
    case at::kBFloat16: return CUDA_R_16BF;
    case at::kHalf: return CUDA_R_16F;
    default: break;
  }
  TORCH_CHECK(false, "fastoptim: no cuBLAS type for ", dtype_name(dtype));
}

// How one operand of the tile products lies in memory: a (B, rows, cols) batch of row-major matrices
// (stride(2) = 1) or of transposed views of row-major ones (stride(1) = 1); a tile of rows or of columns starts
// tile·stride(1) or tile·stride(2) elements further on.
struct Operand {
  const char* base;
  int64_t batch_stride, row_stride, col_stride, element_size;
  bool transposed;
  int64_t ld;

  explicit Operand(const at::Tensor& t)
      : base(static_cast<const char*>(t.data_ptr())), batch_stride(t.stride(0)), row_stride(t.stride(1)),
        col_stride(t.stride(2)), element_size(t.element_size()), transposed(t.stride(2) != 1),
        // a single row or column never steps by its leading dimension, but cuBLAS still wants it ≥ the extent
        ld(transposed ? std::max(t.stride(2), t.size(1)) : std::max(t.stride(1), t.size(2))) {
    TORCH_CHECK(t.stride(1) == 1 || t.stride(2) == 1, "fastoptim: symmetric tile products need row-major matrices "
                "or transposed views of them, got strides ", t.strides());
  }

  const void* at(int64_t matrix, int64_t row, int64_t col) const {
    return base + (matrix * batch_stride + row * row_stride + col * col_stride) * element_size;
  }
};

// Row-major C (rows × cols, leading dimension ldc) = alpha·op(A)·op(B) + beta·C for each of `batch` matrices,
// A, B and C starting at a_first, b_first and c_first and `*.batch_stride` elements apart, in one call. cuBLAS is
// column-major, where a row-major matrix reads as its transpose: it computes Cᵀ = op(B)ᵀ·op(A)ᵀ.
void gemm_strided_batched_row_major(const Operand& a, const void* a_first, const Operand& b, const void* b_first,
                                    const Operand& c, void* c_first, int64_t rows, int64_t cols, int64_t depth,
                                    float alpha, float beta, int64_t batch, cudaDataType_t operand_type,
                                    cudaDataType_t out_type) {
  TORCH_CUDABLAS_CHECK(cublasGemmStridedBatchedEx(
      at::cuda::getCurrentCUDABlasHandle(), b.transposed ? CUBLAS_OP_T : CUBLAS_OP_N,
      a.transposed ? CUBLAS_OP_T : CUBLAS_OP_N, static_cast<int>(cols), static_cast<int>(rows),
      static_cast<int>(depth), &alpha, b_first, operand_type, static_cast<int>(b.ld), b.batch_stride, a_first,
      operand_type, static_cast<int>(a.ld), a.batch_stride, &beta, c_first, out_type, static_cast<int>(c.ld),
      c.batch_stride, static_cast<int>(batch), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

constexpr int kMirrorTile = 32;
constexpr int64_t kMaxGridZ = 65535;
constexpr int kMirrorRowsPerPass = 8;

// One block per kMirrorTile tile (i, j) with i ≤ j of every matrix: it reads that tile of `upper` (plus coef·gram,
// plus `diagonal` on the diagonal) and writes it and its mirror image, so `out` may be `upper` itself. A diagonal
// tile keeps its upper triangle.
template <typename Upper, typename Out>
__global__ void __launch_bounds__(kMirrorTile* kMirrorRowsPerPass)
    symmetric_combine_kernel(const Upper* upper, const Out* gram, float coef, float diagonal, Out* out, int64_t m) {
  const int tile_row = blockIdx.y, tile_col = blockIdx.x;
  if (tile_row > tile_col) return;
  const bool on_diagonal = tile_row == tile_col;
  __shared__ float values[kMirrorTile][kMirrorTile + 1];
  const int64_t base = static_cast<int64_t>(blockIdx.z) * m * m;
  const int x = threadIdx.x;
  for (int r = threadIdx.y; r < kMirrorTile; r += kMirrorRowsPerPass) {
    const int64_t index = base + (static_cast<int64_t>(tile_row) * kMirrorTile + r) * m + tile_col * kMirrorTile + x;
    float v = static_cast<float>(upper[index]);
    if (gram != nullptr) v += coef * static_cast<float>(gram[index]);
    if (on_diagonal && r == x) v += diagonal;
    values[r][x] = v;
  }
  __syncthreads();
  for (int r = threadIdx.y; r < kMirrorTile; r += kMirrorRowsPerPass) {
    const float v = on_diagonal && r > x ? values[x][r] : values[r][x];
    out[base + (static_cast<int64_t>(tile_row) * kMirrorTile + r) * m + tile_col * kMirrorTile + x] = static_cast<Out>(v);
    if (!on_diagonal) {
      out[base + (static_cast<int64_t>(tile_col) * kMirrorTile + r) * m + tile_row * kMirrorTile + x] =
          static_cast<Out>(values[x][r]);
    }
  }
}

}  // namespace

void SymmetricTiles::upper_products(const at::Tensor& left, const at::Tensor& right, double alpha, double beta,
                                    at::Tensor& out, int64_t tile) {
  TORCH_CHECK(left.scalar_type() == right.scalar_type(), "fastoptim: symmetric tile products need operands of one "
              "dtype, got ", dtype_name(left.scalar_type()), " and ", dtype_name(right.scalar_type()));
  TORCH_CHECK(out.is_contiguous(), "fastoptim: symmetric tile products write a contiguous result");
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t batch = out.size(0), m = out.size(1), depth = left.size(2);
  if (batch == 0 || m == 0) return;
  const Operand a(left), b(right), c(out);
  // One strided-batched GEMM per strip: the tile row's T rows of the left operand times the columns from the
  // diagonal on, into the strip of every matrix at once.
  for (int64_t first = 0; first < m; first += tile) {
    gemm_strided_batched_row_major(a, a.at(0, first, 0), b, b.at(0, 0, first), c,
                                   const_cast<void*>(c.at(0, first, first)), tile, m - first, depth,
                                   static_cast<float>(alpha), static_cast<float>(beta), batch,
                                   cublas_type(left.scalar_type()), cublas_type(out.scalar_type()));
  }
}

void SymmetricTiles::combine(const at::Tensor& upper, const at::Tensor& gram, double coef, double diagonal,
                             at::Tensor& out) {
  const int64_t batch = out.size(0), m = out.size(1);
  TORCH_CHECK(m % kMirrorTile == 0, "fastoptim: symmetric combine needs a multiple of ", kMirrorTile, " rows, got ",
              m);
  TORCH_CHECK(upper.scalar_type() == at::kFloat || upper.scalar_type() == out.scalar_type(), "fastoptim: symmetric "
              "combine reads float32 or the result's dtype, got ", dtype_name(upper.scalar_type()));
  if (m == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const auto launch = [&](const auto* upper_data, const auto* gram_data, auto* out_data) {
    using Upper = std::remove_cv_t<std::remove_pointer_t<decltype(upper_data)>>;
    using Out = std::remove_pointer_t<decltype(out_data)>;
    for (int64_t start = 0; start < batch; start += kMaxGridZ) {  // the grid's z extent is limited
      const dim3 grid(static_cast<unsigned>(m / kMirrorTile), static_cast<unsigned>(m / kMirrorTile),
                      static_cast<unsigned>(std::min(kMaxGridZ, batch - start)));
      const int64_t offset = start * m * m;
      symmetric_combine_kernel<Upper, Out><<<grid, dim3(kMirrorTile, kMirrorRowsPerPass), 0,
                                             at::cuda::getCurrentCUDAStream()>>>(
          upper_data + offset, gram_data == nullptr ? nullptr : gram_data + offset, static_cast<float>(coef),
          static_cast<float>(diagonal), out_data + offset, m);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  };
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "symmetric_combine", [&] {
    const scalar_t* gram_data = gram.defined() ? gram.data_ptr<scalar_t>() : nullptr;
    if (upper.scalar_type() == at::kFloat) {
      launch(upper.data_ptr<float>(), gram_data, out.data_ptr<scalar_t>());
    } else {
      launch(upper.data_ptr<scalar_t>(), gram_data, out.data_ptr<scalar_t>());
    }
  });
}

}  // namespace fastoptim::cuda
