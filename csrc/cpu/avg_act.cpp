// CPU implementation of the internal op avg_kernels_C::avg_act_backward_out: checks, then the kernel of
// the active capability level (csrc/cpu/kernels/avg_act.cpp). The public op avg_kernels::avg_act_backward
// (avg_kernels/ops) validates arguments and chooses the backend before calling this.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <avg_kernels/activations.h>

#include "../checks.h"
#include "capability.h"

namespace avg_kernels::cpu {
namespace {

void avg_act_backward_out(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& x_new, at::Tensor& out,
                          int64_t act, double p0, double p1, double eps) {
  check_avg_act_args(grad_out, x, x_new, out, eps);
  TORCH_CHECK(act >= 0 && act < kNumActs, "avg_act_backward: unknown activation id ", act);
  const auto& k = kernels();
  if (avg_act_in_fp64_if_needed(grad_out, x, x_new, out, eps, [&](const at::Tensor& g, const at::Tensor& a,
                                                                  const at::Tensor& b, at::Tensor& o) {
        k.avg_act_backward(g, a, b, o, act, p0, p1, eps);
      }))
    return;
  k.avg_act_backward(grad_out.contiguous(), x.contiguous(), x_new.contiguous(), out, act, p0, p1, eps);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(avg_kernels_C, m) {
  m.def("avg_act_backward_out(Tensor grad_out, Tensor x, Tensor x_new, Tensor(a!) out, int act, float p0, "
        "float p1, float eps) -> ()");
}

TORCH_LIBRARY_IMPL(avg_kernels_C, CPU, m) { m.impl("avg_act_backward_out", &avg_act_backward_out); }

}  // namespace avg_kernels::cpu
