// CUDA kernel launcher of the averaged activation backward: implements the internal op
// avg_kernels_C::avg_act_backward_out (schema in csrc/cpu/avg_act.cpp) for the CUDA dispatch key.
// The kernel itself, and everything it does per element and per index, is in avg_act_kernel.cuh
// (shared with the host emulation that the CPU tests run).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>

#include "../checks.h"
#include "avg_act_dispatch.h"

namespace avg_kernels::cuda {
namespace {

// Resident blocks per SM of avg_act_kernel<A, E, V> on `device` (occupancy by its registers),
// queried once per kernel and device.
template <Act A, class E, int V>
int blocks_per_sm(int device) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices] = {};
  if (device >= 0 && device < kMaxDevices) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, avg_act_kernel<A, E, V>, kThreads, 0));
  blocks = std::max(blocks, 1);
  if (device >= 0 && device < kMaxDevices) cache[device].store(blocks, std::memory_order_relaxed);
  return blocks;
}

template <Act A, class E, int V>
void launch(const AvgActArgs<E>& args, const cudaDeviceProp& prop, int device, cudaStream_t stream) {
  const LaunchConfig cfg = launch_config(args.n, V, prop.multiProcessorCount, blocks_per_sm<A, E, V>(device));
  avg_act_kernel<A, E, V><<<cfg.grid, cfg.block, 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// out = grad_out * s(x, x_new); `out` is allocated by the caller (contiguous, x's shape and dtype).
void avg_act_backward_out_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& x_new,
                               at::Tensor& out, int64_t act, double p0, double p1, double eps) {
  check_avg_act_args(grad_out, x, x_new, out, eps);
  TORCH_CHECK(x.is_cuda(), "avg_act_backward (cuda): tensors must be on a CUDA device, got ", x.device());
  if (avg_act_in_fp64_if_needed(grad_out, x, x_new, out, eps, [&](const at::Tensor& g, const at::Tensor& a,
                                                                  const at::Tensor& b, at::Tensor& o) {
        avg_act_backward_out_cuda(g, a, b, o, act, p0, p1, eps);
      }))
    return;
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = out.numel();
  if (n == 0) return;
  // Non-contiguous inputs are copied once (the same contract as the CPU kernel); contiguous
  // views keep their storage offset, so a misaligned view takes the scalar path below.
  const auto g = grad_out.contiguous(), a = x.contiguous(), b = x_new.contiguous();
  const int device = x.get_device();
  const cudaDeviceProp& prop = *at::cuda::getDeviceProperties(device);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(device);
  dispatch_elem_act(x.scalar_type(), act, [&](auto elem, auto tag) {
    using E = decltype(elem);
    constexpr Act A = decltype(tag)::value;
    const AvgActArgs<E> args = make_avg_act_args<E>(g, a, b, out, p0, p1, eps);
    // 16-byte vectors when all four pointers are 16-byte aligned, else one element per access.
    if (can_vectorize(args)) {
      launch<A, E, kVecWidth<E>>(args, prop, device, stream);
    } else {
      launch<A, E, 1>(args, prop, device, stream);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(avg_kernels_C, CUDA, m) { m.impl("avg_act_backward_out", &avg_act_backward_out_cuda); }

}  // namespace avg_kernels::cuda
