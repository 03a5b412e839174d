// CPU kernels of the averaged activation backward and of the header's f (SPEC §1), one capability
// level (see level.h). The driver and op registration are csrc/cpu/avg_act.cpp.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <avg_kernels/dispatch.h>

#include "elementwise.h"
#include "level.h"
#include "vec_ops.h"

namespace avg_kernels::cpu::CPU_CAPABILITY {

// out = grad_out * s(x, x_new); all contiguous, one shape and dtype (checked by the driver).
void avg_act_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& x_new, at::Tensor& out,
                      int64_t act, double p0, double p1, double eps) {
  if (out.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "avg_act_backward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    using Vec = at::vec::Vectorized<opmath_t>;
    const ActParams<opmath_t> prm{opmath_t(p0), opmath_t(p1)};
    const EpsCut<opmath_t> cut = make_eps_cut<opmath_t>(eps);  // the exact |d| <= eps decision
    dispatch_act(act, [&](auto tag) {
      constexpr Act A = decltype(tag)::value;
      parallel_map(out.data_ptr<scalar_t>(), out.numel(),
                   [prm, cut](const Vec& gv, const Vec& av, const Vec& bv) {
                     return avg_kernels::avg_grad<A>(gv, av, bv, prm, cut);
                   },
                   grad_out.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), x_new.const_data_ptr<scalar_t>());
    });
  });
}

void act_value(const at::Tensor& x, at::Tensor& out, int64_t act, double p0, double p1) {
  if (out.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "act_value_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    using Vec = at::vec::Vectorized<opmath_t>;
    const ActParams<opmath_t> prm{opmath_t(p0), opmath_t(p1)};
    dispatch_act(act, [&](auto tag) {
      constexpr Act A = decltype(tag)::value;
      parallel_map(out.data_ptr<scalar_t>(), out.numel(), [prm](const Vec& v) { return avg_kernels::act_value<A>(v, prm); },
                   x.const_data_ptr<scalar_t>());
    });
  });
}

}  // namespace avg_kernels::cpu::CPU_CAPABILITY
