// Internal op that evaluates one vectorised math primitive of csrc/cpu/vec_ops.h elementwise, so
// tests can compare exp/erfc/log1p (float and double lanes) with float64 references directly.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "elementwise.h"
#include "vec_ops.h"

namespace avg_kernels::cpu {
namespace {

at::Tensor vec_math_probe(const at::Tensor& x, c10::string_view fn) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "vec_math_probe: float32/float64 only");
  auto a = x.contiguous();
  auto out = at::empty_like(a);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "vec_math_probe", [&] {
    using O = Ops<at::vec::Vectorized<scalar_t>>;
    using Vec = at::vec::Vectorized<scalar_t>;
    const scalar_t* in = a.const_data_ptr<scalar_t>();
    if (fn == "exp") parallel_map(out.data_ptr<scalar_t>(), a.numel(), [](const Vec& v) { return O::exp(v); }, in);
    else if (fn == "erfc") parallel_map(out.data_ptr<scalar_t>(), a.numel(), [](const Vec& v) { return O::erfc(v); }, in);
    else if (fn == "log1p") parallel_map(out.data_ptr<scalar_t>(), a.numel(), [](const Vec& v) { return O::log1p(v); }, in);
    else TORCH_CHECK(false, "vec_math_probe: unknown function ", fn);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(avg_kernels_C, m) { m.def("vec_math_probe(Tensor x, str fn) -> Tensor"); }
TORCH_LIBRARY_IMPL(avg_kernels_C, CPU, m) { m.impl("vec_math_probe", &vec_math_probe); }

}  // namespace avg_kernels::cpu
