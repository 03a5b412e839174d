// Torch-side glue shared by the CUDA launcher (csrc/cuda/avg_act.cu, compiled by nvcc) and its
// host emulation (csrc/cpu/cuda_emulation.cpp, compiled by the C++ compiler): the dtype x
// activation dispatch and the kernel arguments built from tensors, so both run the same code path.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <avg_kernels/dispatch.h>

#include "avg_act_kernel.cuh"

namespace avg_kernels::cuda {

template <class scalar_t>
struct ElemOf;
template <>
struct ElemOf<float> {
  using type = ElemF32;
};
template <>
struct ElemOf<double> {
  using type = ElemF64;
};
template <>
struct ElemOf<at::Half> {
  using type = ElemF16;
};
template <>
struct ElemOf<at::BFloat16> {
  using type = ElemBF16;
};

// Calls f(E{}, ActTag<A>{}) for the tensor dtype and the runtime activation id.
template <class F>
void dispatch_elem_act(at::ScalarType dtype, int64_t act, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "avg_act_backward", [&] {
    using E = typename ElemOf<scalar_t>::type;
    dispatch_act(act, [&](auto tag) { f(E{}, tag); });
  });
}

// Kernel arguments from contiguous tensors of one dtype (grad_out, x, x_new, out) and the
// activation parameters, converted to the compute type (float, or double for float64).
template <class E>
AvgActArgs<E> make_avg_act_args(const at::Tensor& g, const at::Tensor& x, const at::Tensor& x_new, at::Tensor& out,
                                double p0, double p1, double eps) {
  using S = typename E::storage;
  using C = typename E::compute;
  static_assert(sizeof(S) == 2 || sizeof(S) == 4 || sizeof(S) == 8, "storage type");
  TORCH_INTERNAL_ASSERT(x.element_size() == int64_t(sizeof(S)));
  AvgActArgs<E> a;
  a.grad_out = static_cast<const S*>(g.const_data_ptr());
  a.x = static_cast<const S*>(x.const_data_ptr());
  a.x_new = static_cast<const S*>(x_new.const_data_ptr());
  a.out = static_cast<S*>(out.mutable_data_ptr());
  a.n = out.numel();
  a.prm = ActParams<C>{C(p0), C(p1)};
  a.eps = make_eps_cut<C>(eps);
  return a;
}

}  // namespace avg_kernels::cuda
