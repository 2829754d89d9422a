// Products whose result is symmetric (X·Xᵀ, and A·A for a symmetric A), computed on the upper-triangular T × T
// tiles of the result only and then mirrored: (nt + 1)/(2·nt) of the FLOPs for nt tiles per side.
//
// The tiles of one tile row form a strip, out[rows i·T … (i+1)·T, columns i·T … m], which is one GEMM of T rows
// with a strided result: nt GEMMs per matrix (on the GPU, nt strided-batched GEMMs for the whole batch), no table of
// per-tile addresses to build, so a step stays capturable in a CUDA graph.
//
// Each backend provides, as static members of a `Tiles` policy (cpu/symmetric_tiles.h, cuda/symmetric_tiles.cuh):
//   upper_products(left, right, alpha, beta, out, tile)
//       for every matrix of the batch and every tile row i:
//       out[strip i] ← alpha·left[rows i]·right[columns i·T …] + beta·out[strip i]; left (B, m, k), right (B, k, m),
//       either may be a transposed view of a contiguous batch; out (B, m, m) contiguous, its tiles below the
//       diagonal are neither read nor written;
//   combine(upper, gram, coef, diagonal, out)
//       out = S + coef·gram + diagonal·I with S the symmetric matrix of upper's upper-triangular tiles and gram
//       symmetric (an undefined tensor: none); both triangles of out are written, exactly symmetric; out may be
//       upper itself.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <string>

namespace fastoptim {

// The largest tile edge (a multiple of 32, at most 512) that cuts m into at least two tiles; 0 where none does.
inline int64_t symmetric_tile(int64_t m) {
  for (const int64_t tile : {512, 256, 128, 64, 32}) {
    if (m % tile == 0 && m / tile >= 2) return tile;
  }
  return 0;
}

// Below this edge the tile GEMMs are too small for "auto" to pick them.
constexpr int64_t kMinAutoTile = 256;

// The tile edge `method` asks for on an m × m result, 0 for the plain product: "plain" never tiles, "symmetric"
// always (an error where no tile fits), "auto" from `auto_min_rows` rows up, with tiles of at least kMinAutoTile.
inline int64_t resolve_symmetric_tile(c10::string_view method, int64_t m, int64_t auto_min_rows, const char* op) {
  TORCH_CHECK(method == "auto" || method == "plain" || method == "symmetric", "fastoptim: ", op, ": method is '",
              std::string(method), "'; expected 'auto', 'plain' or 'symmetric'");
  const int64_t tile = symmetric_tile(m);
  TORCH_CHECK(method != "symmetric" || tile > 0, "fastoptim: ", op, ": method='symmetric' needs the symmetric side "
              "to be a multiple of 32 of at least 64, got ", m);
  if (method == "plain" || (method == "auto" && (m < auto_min_rows || tile < kMinAutoTile))) return 0;
  return tile;
}

// out ← beta·out + alpha·X·Xᵀ for every X (m × k) of the batch x (B, m, k); out (B, m, m) symmetric on entry (where
// beta ≠ 0) and on exit. tile = 0: one plain batched GEMM.
template <typename Tiles>
void symmetric_gram_(at::Tensor& out, const at::Tensor& x, double beta, double alpha, int64_t tile) {
  if (x.size(2) == 1 && x.is_cpu() && alpha >= 0.0) {
    // A rank-one update (a 1-D block): CPU BLAS runs it at a third of memory speed (512 blocks of 256: 28 ms
    // against 9.5 ms for these elementwise passes). Every term is a product that commutes, so out stays exactly
    // symmetric: (x_i·x_j)·alpha when beta = 0 (out is not read: it may hold anything; and it is the pure-torch
    // path's value to the bit, which matters where the first eigenbasis is degenerate), else s_i·s_j with
    // s = √alpha·x.
    if (beta == 0.0) {
      at::mul_out(out, x, x.mT()).mul_(alpha);
    } else {
      const at::Tensor s = x * std::sqrt(alpha);
      out.mul_(beta).addcmul_(s, s.mT());
    }
    return;
  }
  if (tile == 0) {
    out.baddbmm_(x, x.mT(), beta, alpha);
    return;
  }
  Tiles::upper_products(x, x.mT(), alpha, beta, out, tile);
  Tiles::combine(out, at::Tensor(), 0.0, 0.0, out);
}

}  // namespace fastoptim
