// CPU implementation of the internal op avg_kernels_C::ridge_solve (SPEC §3): the shared driver
// (csrc/ridge_driver.cpp) over the kernels of the active capability level (csrc/cpu/kernels/ridge.cpp).
// The public op avg_kernels::ridge_solve (avg_kernels/ops/ridge.py) validates shapes, dtypes, devices and
// lam first.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "capability.h"

namespace avg_kernels::cpu {
namespace {

at::Tensor ridge_solve_cpu(const at::Tensor& G, const at::Tensor& A, double lam) {
  return ridge_solve_driver(G, A, lam, ridge_kernels(kernels(), /*fused=*/true));
}

}  // namespace
}  // namespace avg_kernels::cpu

TORCH_LIBRARY_FRAGMENT(avg_kernels_C, m) { m.def("ridge_solve(Tensor G, Tensor A, float lam) -> Tensor"); }

TORCH_LIBRARY_IMPL(avg_kernels_C, CPU, m) { m.impl("ridge_solve", &avg_kernels::cpu::ridge_solve_cpu); }
