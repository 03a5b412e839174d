// Last-line argument checks of the internal ops (the public Python ops validate first, with
// messages naming the user's arguments; these guard direct torch.ops.avg_kernels_C calls).
#pragma once

#include <ATen/ATen.h>

namespace avg_kernels {

inline void check_avg_act_args(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& x_new,
                               const at::Tensor& out) {
  TORCH_CHECK(grad_out.sizes() == x.sizes() && x_new.sizes() == x.sizes() && out.sizes() == x.sizes(),
              "avg_act_backward: grad_out, x, x_new, out must have one shape");
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type() && x_new.scalar_type() == x.scalar_type() &&
                  out.scalar_type() == x.scalar_type(),
              "avg_act_backward: grad_out, x, x_new, out must have one dtype");
  TORCH_CHECK(grad_out.device() == x.device() && x_new.device() == x.device() && out.device() == x.device(),
              "avg_act_backward: grad_out, x, x_new, out must be on one device");
  TORCH_CHECK(out.is_contiguous(), "avg_act_backward: out must be contiguous");
}

}  // namespace avg_kernels
