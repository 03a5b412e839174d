// Test hooks into the CPU kernels of the active capability level (csrc/cpu/kernels.h), built into
// avg_kernels._C_testing (for the test suite; not loaded by `import avg_kernels`). Ops
// torch.ops.avg_kernels_testing.*:
//
//   vec_math_probe(x, fn) -> Tensor        one vectorised primitive (exp, erfc, log1p, exp_nonpos), float32/float64
//   act_value(x, act, p0, p1) -> Tensor     f(x) of the shared header math (activations.h)
//   ridge_solve_unfused(G, A, lam)          the ridge driver without the fused small-system path
//   ridge_prologue(A, lam, compute_dtype) -> (Bm, stats)    the prologue kernel alone
//   ridge_scale(Y, w, lam, rtol) -> Tensor  the eigendecomposition epilogue alone
#include <ATen/ATen.h>
#include <torch/library.h>

#include <avg_kernels/activations.h>

#include "../cpu/capability.h"

namespace avg_kernels::cpu {
namespace {

at::Tensor vec_math_probe(const at::Tensor& x, c10::string_view fn) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "vec_math_probe: float32/float64 only");
  const int64_t id = fn == "exp" ? 0 : fn == "erfc" ? 1 : fn == "log1p" ? 2 : fn == "exp_nonpos" ? 3 : -1;
  TORCH_CHECK(id >= 0, "vec_math_probe: unknown function ", fn);
  auto a = x.contiguous();
  auto out = at::empty_like(a);
  kernels().vec_math(a, out, id);
  return out;
}

at::Tensor act_value(const at::Tensor& x, int64_t act, double p0, double p1) {
  TORCH_CHECK(act >= 0 && act < kNumActs, "act_value: unknown activation id ", act);
  auto a = x.contiguous();
  auto out = at::empty(a.sizes(), a.options());
  kernels().act_value(a, out, act, p0, p1);
  return out;
}

at::Tensor ridge_solve_unfused(const at::Tensor& G, const at::Tensor& A, double lam) {
  return ridge_solve_driver(G, A, lam, ridge_kernels(kernels(), /*fused=*/false));
}

std::tuple<at::Tensor, at::Tensor> ridge_prologue(const at::Tensor& A3, double lam, at::ScalarType ct) {
  at::Tensor Bm = at::empty({A3.size(0), A3.size(1), A3.size(2)}, A3.options().dtype(ct));
  at::Tensor stats = at::zeros({A3.size(0), 2}, A3.options().dtype(ct));
  kernels().ridge_prologue(A3, lam, Bm, stats);
  return {Bm, stats};
}

at::Tensor ridge_scale(const at::Tensor& Y, const at::Tensor& w, double lam, double rtol) {
  at::Tensor out = Y.contiguous().clone();
  kernels().ridge_scale(out, w.contiguous(), lam, rtol);
  return out;
}

}  // namespace
}  // namespace avg_kernels::cpu

TORCH_LIBRARY_FRAGMENT(avg_kernels_testing, m) {
  m.def("vec_math_probe(Tensor x, str fn) -> Tensor");
  m.def("act_value(Tensor x, int act, float p0, float p1) -> Tensor");
  m.def("ridge_solve_unfused(Tensor G, Tensor A, float lam) -> Tensor");
  m.def("ridge_prologue(Tensor A, float lam, ScalarType compute_dtype) -> (Tensor, Tensor)");
  m.def("ridge_scale(Tensor Y, Tensor w, float lam, float rtol) -> Tensor");
}

TORCH_LIBRARY_IMPL(avg_kernels_testing, CPU, m) {
  m.impl("vec_math_probe", &avg_kernels::cpu::vec_math_probe);
  m.impl("act_value", &avg_kernels::cpu::act_value);
  m.impl("ridge_solve_unfused", &avg_kernels::cpu::ridge_solve_unfused);
  m.impl("ridge_prologue", &avg_kernels::cpu::ridge_prologue);
  m.impl("ridge_scale", &avg_kernels::cpu::ridge_scale);
}
