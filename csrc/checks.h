// Last-line argument checks of the internal ops (the public Python ops validate first, with
// messages naming the user's arguments; these guard direct torch.ops.avg_kernels_C calls).
#pragma once

#include <ATen/ATen.h>

namespace avg_kernels {

inline void check_avg_act_args(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& x_new,
                               const at::Tensor& out, double eps) {
  TORCH_CHECK(grad_out.sizes() == x.sizes() && x_new.sizes() == x.sizes() && out.sizes() == x.sizes(),
              "avg_act_backward: grad_out, x, x_new, out must have one shape");
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type() && x_new.scalar_type() == x.scalar_type() &&
                  out.scalar_type() == x.scalar_type(),
              "avg_act_backward: grad_out, x, x_new, out must have one dtype");
  TORCH_CHECK(grad_out.device() == x.device() && x_new.device() == x.device() && out.device() == x.device(),
              "avg_act_backward: grad_out, x, x_new, out must be on one device");
  TORCH_CHECK(out.is_contiguous(), "avg_act_backward: out must be contiguous");
  TORCH_CHECK(eps >= 0, "avg_act_backward: eps must be >= 0, got ", eps);
}

// The |x_new - x| <= eps decision is exact (activations.h, EpsCut), which float arithmetic can take only for
// eps <= FLT_MAX: with a larger eps, finite float ends may differ by more than FLT_MAX and still by no more
// than eps. Such a call runs the float64 kernel on float64 copies (more accurate than float arithmetic, and
// one rounding to the output dtype): `run(g, x, x_new, out)` with float64 tensors; returns whether it did.
template <class Run>
bool avg_act_in_fp64_if_needed(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& x_new,
                               at::Tensor& out, double eps, Run&& run) {
  if (x.scalar_type() == at::kDouble || !(eps > 3.4028234663852886e38)) return false;
  at::Tensor o = at::empty(out.sizes(), out.options().dtype(at::kDouble));
  run(grad_out.to(at::kDouble), x.to(at::kDouble), x_new.to(at::kDouble), o);
  out.copy_(o);
  return true;
}

}  // namespace avg_kernels
