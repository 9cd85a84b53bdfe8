// CUDA pack kernel: one warp per row computes the row's norm and writes the normalized row
// in the transport dtype, so the rows are read once and written once (ATen would take a norm
// kernel, a division and a cast, three passes and two temporaries).

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>

#include "pack.h"

namespace fastcse {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;

template <typename in_t, typename out_t>
__global__ void pack_rows_kernel(const in_t* __restrict__ x, out_t* __restrict__ out, int64_t rows,
                                 int64_t dim, bool normalize) {
  using acc_t = at::opmath_type<in_t>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (row >= rows) {
    return;
  }
  const int lane = threadIdx.x % kWarp;
  const in_t* src = x + row * dim;
  out_t* dst = out + row * dim;
  acc_t scale = acc_t(1);
  if (normalize) {
    acc_t sum_sq = acc_t(0);
    for (int64_t j = lane; j < dim; j += kWarp) {
      const acc_t v = static_cast<acc_t>(src[j]);
      sum_sq += v * v;
    }
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      sum_sq += __shfl_xor_sync(0xffffffffu, sum_sq, offset);
    }
    // x / max(norm, eps), the division F.normalize does (not a multiply by a reciprocal).
    scale = ::max(::sqrt(sum_sq), static_cast<acc_t>(kNormEps));
  }
  for (int64_t j = lane; j < dim; j += kWarp) {
    const acc_t v = static_cast<acc_t>(src[j]);
    dst[j] = static_cast<out_t>(normalize ? v / scale : v);
  }
}

template <typename in_t, typename out_t>
void launch(const at::Tensor& x, const at::Tensor& out, bool normalize) {
  const int64_t rows = x.size(0);
  const int64_t dim = x.size(1);
  const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  pack_rows_kernel<in_t, out_t><<<blocks, kWarpsPerBlock * kWarp, 0, at::cuda::getCurrentCUDAStream()>>>(
      x.const_data_ptr<in_t>(), out.mutable_data_ptr<out_t>(), rows, dim, normalize);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void pack_rows_cuda(const at::Tensor& x, const at::Tensor& out, bool normalize) {
  TORCH_CHECK(x.is_contiguous() && out.is_contiguous(), "pack_rows_cuda: rows must be contiguous");
  TORCH_CHECK(x.sizes() == out.sizes(), "pack_rows_cuda: x ", x.sizes(), " and out ", out.sizes(), " differ");
  if (x.numel() == 0) {
    return;
  }
  const c10::cuda::CUDAGuard guard(x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastcse_pack_rows", [&] {
    if (out.scalar_type() == at::kBFloat16) {
      launch<scalar_t, at::BFloat16>(x, out, normalize);
    } else {
      TORCH_CHECK(out.scalar_type() == x.scalar_type(), "pack_rows_cuda: transport dtype ",
                  out.scalar_type(), " must be bfloat16 or the rows' dtype ", x.scalar_type());
      launch<scalar_t, scalar_t>(x, out, normalize);
    }
  });
}

}  // namespace fastcse
