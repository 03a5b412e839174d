// CUDA backend of the ridge solve (SPEC §3): the driver of csrc/cpu/ridge.cpp (ATen linalg: batched
// Cholesky with per-entry info, cholesky_solve, eigh for failing entries) with the CUDA kernels of its
// prologue and epilogue (csrc/cuda/ridge_kernel.cuh, shared with the host emulation the CPU tests run).
// Implements the internal op avg_kernels_C::ridge_solve for the CUDA dispatch key.
//
// Host synchronisation per call: one copy of the per-entry flags + Cholesky info (the driver needs them
// to raise errors and to pick the entries for the eigendecomposition); more only when an entry fails.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../ridge_driver.h"
#include "ridge_dispatch.h"

namespace avg_kernels::ridge::cuda {
namespace {

void prologue_cuda(const at::Tensor& A3, double lam, at::Tensor& Bm, at::Tensor& stats) {
  TORCH_CHECK(A3.is_cuda(), "ridge prologue (cuda): A must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(A3.device());
  if (Bm.numel() == 0) return;
  const Launch cfg = prologue_launch(A3.size(0), A3.size(1));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_storage(A3.scalar_type(), [&](auto in) {
    using In = decltype(in);
    dispatch_compute(Bm.scalar_type(), [&](auto c) {
      using C = decltype(c);
      ridge_prologue_kernel<In, C><<<unsigned(cfg.grid), cfg.block, 0, stream>>>(
          make_prologue_args<In, C>(A3, lam, Bm, stats));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void scale_cuda(at::Tensor& Y, const at::Tensor& w, double lam, double rtol) {
  TORCH_CHECK(Y.is_cuda(), "ridge scale (cuda): Y must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(Y.device());
  if (Y.numel() == 0) return;
  const Launch cfg = scale_launch(Y.numel());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_compute(Y.scalar_type(), [&](auto c) {
    using C = decltype(c);
    ridge_scale_kernel<C><<<unsigned(cfg.grid), cfg.block, 0, stream>>>(make_scale_args<C>(Y, w, lam, rtol));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor ridge_solve_cuda(const at::Tensor& G, const at::Tensor& A, double lam) {
  TORCH_CHECK(G.is_cuda() && A.is_cuda(), "ridge_solve (cuda): tensors must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(A.device());
  return ridge_solve_driver(G, A, lam, RidgeKernels{&prologue_cuda, &scale_cuda});
}

}  // namespace

TORCH_LIBRARY_IMPL(avg_kernels_C, CUDA, m) { m.impl("ridge_solve", &ridge_solve_cuda); }

}  // namespace avg_kernels::ridge::cuda
