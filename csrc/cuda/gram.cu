// CUDA launcher of the input Gram: implements the internal ops avg_kernels_C::im2col_gram_out and
// linear_gram_out (schemas in csrc/cpu/gram.cpp) for the CUDA dispatch key. The kernel and all of
// its index logic are in gram_kernel.cuh (shared with the host emulation the CPU tests run).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "gram_launch.h"

namespace avg_kernels::cuda_gram {
namespace {

void im2col_gram_out_cuda(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool bias, at::Tensor& out) {
  TORCH_CHECK(x.is_cuda(), "im2col_gram (cuda): x must be on a CUDA device, got ", x.device());
  const ConvShape s = conv_shape(x, kernel_size, stride, padding, dilation, groups, bias);
  check_out(s, x, out);
  if (s.d == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaDeviceProp& prop = *at::cuda::getDeviceProperties(x.get_device());
  const GramLaunch l = gram_launch(s.d, s.groups, s.m, prop.multiProcessorCount, 0);
  TORCH_CHECK(l.tiles < (int64_t(1) << 31) && s.groups <= 65535 && l.splits <= 65535,
              "im2col_gram (cuda): launch grid too large (tiles ", l.tiles, ", groups ", s.groups, ", splits ",
              l.splits, ")");
  at::Tensor ws = l.splits == 1 ? out : at::empty({l.splits, s.groups, s.d, s.d}, out.options());
  const dim3 grid(unsigned(l.tiles), unsigned(s.groups), unsigned(l.splits));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(x.get_device());
  dispatch_gram_types(x.scalar_type(), [&](auto in, auto acc) {
    using In = decltype(in);
    using Acc = decltype(acc);
    const GramArgs<In, Acc> a = make_args<In, Acc>(s, ws.data_ptr<Acc>(), l);
    if (l.wide) {
      gram_kernel<int64_t, In, Acc><<<grid, kThreads, 0, stream>>>(a);
    } else {
      gram_kernel<int32_t, In, Acc><<<grid, kThreads, 0, stream>>>(a);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (l.splits > 1) at::sum_out(out, ws, 0);
}

void linear_gram_out_cuda(const at::Tensor& x, bool bias, at::Tensor& out) {
  im2col_gram_out_cuda(linear_as_conv(x), {1}, {1}, {0}, {1}, 1, bias, out);
}

}  // namespace

TORCH_LIBRARY_IMPL(avg_kernels_C, CUDA, m) {
  m.impl("im2col_gram_out", &im2col_gram_out_cuda);
  m.impl("linear_gram_out", &linear_gram_out_cuda);
}

}  // namespace avg_kernels::cuda_gram
