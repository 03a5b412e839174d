// Torch-side glue shared by the CUDA launcher of the ridge kernels (csrc/cuda/ridge.cu, nvcc) and their
// host emulation (csrc/cpu/ridge_emulation.cpp, the C++ compiler): dtype dispatch and kernel arguments
// built from tensors, so both run the same code path.
#pragma once

#include <ATen/ATen.h>

#include "ridge_kernel.cuh"

namespace avg_kernels::ridge::cuda {

// Calls f(In{}) with In the kernel's storage type of A's dtype.
template <class F>
void dispatch_storage(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kDouble: return f(double{});
    case at::kHalf: return f(F16{});
    case at::kBFloat16: return f(BF16{});
    default: TORCH_CHECK(false, "ridge kernels: unsupported dtype ", dtype);
  }
}

// Calls f(C{}) with C = float or double for the compute dtype.
template <class F>
void dispatch_compute(at::ScalarType ct, F&& f) {
  TORCH_CHECK(ct == at::kFloat || ct == at::kDouble, "ridge kernels: compute dtype must be float32/float64");
  if (ct == at::kDouble) return f(double{});
  return f(float{});
}

template <class In, class C>
PrologueArgs<In, C> make_prologue_args(const at::Tensor& A3, double lam, at::Tensor& Bm, at::Tensor& stats) {
  TORCH_CHECK(A3.dim() == 3 && A3.size(1) == A3.size(2), "ridge prologue: A must be (nb, D, D)");
  TORCH_CHECK(Bm.is_contiguous() && stats.is_contiguous() && Bm.sizes() == A3.sizes() &&
                  stats.size(0) == A3.size(0) && stats.size(1) == 2,
              "ridge prologue: Bm must be contiguous (nb, D, D), stats (nb, 2)");
  TORCH_CHECK(A3.element_size() == int64_t(sizeof(In)) && Bm.element_size() == int64_t(sizeof(C)) &&
                  stats.scalar_type() == Bm.scalar_type(),
              "ridge prologue: dtypes");
  PrologueArgs<In, C> p;
  p.a = static_cast<const In*>(A3.const_data_ptr());
  p.sb = A3.stride(0);
  p.si = A3.stride(1);
  p.sj = A3.stride(2);
  p.nb = A3.size(0);
  p.D = A3.size(1);
  p.nt = (p.D + kTile - 1) / kTile;
  p.lam = C(lam);
  p.out = static_cast<C*>(Bm.mutable_data_ptr());
  p.stats = static_cast<C*>(stats.mutable_data_ptr());
  return p;
}

template <class C>
ScaleArgs<C> make_scale_args(at::Tensor& Y, const at::Tensor& w, double lam, double rtol) {
  TORCH_CHECK(Y.dim() == 3 && w.dim() == 2 && Y.size(0) == w.size(0) && Y.size(2) == w.size(1) && Y.is_contiguous() &&
                  w.is_contiguous() && Y.scalar_type() == w.scalar_type() && Y.element_size() == int64_t(sizeof(C)),
              "ridge scale: Y must be contiguous (nb, C, D), w contiguous (nb, D), one dtype");
  ScaleArgs<C> s;
  s.y = static_cast<C*>(Y.mutable_data_ptr());
  s.w = static_cast<const C*>(w.const_data_ptr());
  s.n = Y.numel();
  s.row_len = Y.size(1) * Y.size(2);
  s.D = Y.size(2);
  s.lam = C(lam);
  s.rtol = C(rtol);
  return s;
}

}  // namespace avg_kernels::ridge::cuda
