// One vectorised math primitive of vec_ops.h (exp, erfc, log1p, and Ops::exp = exp_nonpos for float lanes;
// float and double lanes) evaluated elementwise, so tests compare each level's own implementations with
// float64 references directly.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "elementwise.h"
#include "level.h"
#include "vec_ops.h"

namespace avg_kernels::cpu::CPU_CAPABILITY {
namespace {

// The general e^x (the kernels' Ops::exp is exp_nonpos for float lanes).
at::vec::Vectorized<float> general_exp(const at::vec::Vectorized<float>& v) { return vec_math::exp(v); }
at::vec::Vectorized<double> general_exp(const at::vec::Vectorized<double>& v) { return v.exp(); }

}  // namespace

void vec_math(const at::Tensor& x, at::Tensor& out, int64_t fn) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "vec_math: float32/float64 only");
  TORCH_CHECK(fn >= 0 && fn <= 3, "vec_math: fn must be 0 (exp), 1 (erfc), 2 (log1p) or 3 (exp_nonpos), got ", fn);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "vec_math", [&] {
    using O = Ops<at::vec::Vectorized<scalar_t>>;
    using Vec = at::vec::Vectorized<scalar_t>;
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    switch (fn) {
      case 0: parallel_map(o, x.numel(), [](const Vec& v) { return general_exp(v); }, in); break;
      case 1: parallel_map(o, x.numel(), [](const Vec& v) { return O::erfc(v); }, in); break;
      case 2: parallel_map(o, x.numel(), [](const Vec& v) { return O::log1p(v); }, in); break;
      default: parallel_map(o, x.numel(), [](const Vec& v) { return O::exp(v); }, in); break;
    }
  });
}

}  // namespace avg_kernels::cpu::CPU_CAPABILITY
