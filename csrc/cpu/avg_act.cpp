// CPU kernels of the averaged activation backward (and the header's f, for tests).
// Internal ops avg_kernels_C::*; the public op avg_kernels::avg_act_backward (avg_kernels/ops)
// validates arguments and chooses the backend before calling these.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <avg_kernels/dispatch.h>

#include "../checks.h"
#include "elementwise.h"
#include "vec_ops.h"

namespace avg_kernels::cpu {
namespace {

// out = grad_out * s(x, x_new); `out` is allocated by the caller (contiguous, x's shape and dtype).
void avg_act_backward_out(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& x_new,
                          at::Tensor& out, int64_t act, double p0, double p1, double eps) {
  check_avg_act_args(grad_out, x, x_new, out);
  auto g = grad_out.contiguous(), a = x.contiguous(), b = x_new.contiguous();
  if (out.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "avg_act_backward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    using Vec = at::vec::Vectorized<opmath_t>;
    const ActParams<opmath_t> prm{opmath_t(p0), opmath_t(p1)};
    const opmath_t e = opmath_t(eps);
    dispatch_act(act, [&](auto tag) {
      constexpr Act A = decltype(tag)::value;
      parallel_map(out.data_ptr<scalar_t>(), out.numel(),
                   [&](const Vec& gv, const Vec& av, const Vec& bv) { return gv * avg_kernels::avg_slope<A>(av, bv, prm, e); },
                   g.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>());
    });
  });
}

at::Tensor act_value_cpu(const at::Tensor& x, int64_t act, double p0, double p1) {
  auto a = x.contiguous();
  auto out = at::empty(x.sizes(), x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "act_value_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    using Vec = at::vec::Vectorized<opmath_t>;
    const ActParams<opmath_t> prm{opmath_t(p0), opmath_t(p1)};
    dispatch_act(act, [&](auto tag) {
      constexpr Act A = decltype(tag)::value;
      parallel_map(out.data_ptr<scalar_t>(), out.numel(), [&](const Vec& v) { return avg_kernels::act_value<A>(v, prm); },
                   a.const_data_ptr<scalar_t>());
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(avg_kernels_C, m) {
  m.def("avg_act_backward_out(Tensor grad_out, Tensor x, Tensor x_new, Tensor(a!) out, int act, float p0, "
        "float p1, float eps) -> ()");
  m.def("act_value(Tensor x, int act, float p0, float p1) -> Tensor");
}

TORCH_LIBRARY_IMPL(avg_kernels_C, CPU, m) {
  m.impl("avg_act_backward_out", &avg_act_backward_out);
  m.impl("act_value", &act_value_cpu);
}

}  // namespace avg_kernels::cpu
