// Packing the rows that fastcse sends to the other ranks: L2-normalize (optionally) in the
// accumulation dtype and cast to the transport dtype, in one pass over the rows.
#pragma once

#include <ATen/core/Tensor.h>

namespace fastcse {

// eps of F.normalize: rows with a norm below it are divided by eps instead.
constexpr double kNormEps = 1e-12;

// out[i] = x[i] / max(||x[i]||, eps) (or x[i] without `normalize`), cast to out's dtype.
// pack_rows_aten is device-generic ATen (the CPU path, and the fallback without the CUDA build);
// x and out are contiguous [n, d] on the same device; out is float32/64, float16 or bfloat16.
void pack_rows_aten(const at::Tensor& x, const at::Tensor& out, bool normalize);
#ifdef FASTCSE_WITH_CUDA
void pack_rows_cuda(const at::Tensor& x, const at::Tensor& out, bool normalize);
#endif

inline void pack_rows(const at::Tensor& x, const at::Tensor& out, bool normalize) {
#ifdef FASTCSE_WITH_CUDA
  if (x.is_cuda()) {
    pack_rows_cuda(x, out, normalize);
    return;
  }
#endif
  pack_rows_aten(x, out, normalize);
}

}  // namespace fastcse
