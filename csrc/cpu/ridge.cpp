// CPU implementation of the internal op avg_kernels_C::ridge_solve (SPEC §3): the shared driver
// (csrc/ridge_driver.cpp) over the kernels of the active capability level (csrc/cpu/kernels/ridge.cpp).
// The public op avg_kernels::ridge_solve (avg_kernels/ops/ridge.py) validates shapes, dtypes, devices and
// lam first.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__linux__) || defined(__APPLE__)
#include <dlfcn.h>
#endif

#include "capability.h"

namespace avg_kernels::cpu {
namespace {

// Bitwise the same result at every thread count (SPEC §3). Systems with D <= kRidgeSmallMaxD run in the
// fused kernel (csrc/cpu/kernels/ridge.cpp: one thread per batch entry, a fixed sequence of operations).
// Larger ones, the eigendecomposition fallback, the Gram checks and lam = 0 go to LAPACK on this thread
// (csrc/ridge_driver.cpp), and a multi-threaded LAPACK splits its sums by thread count (D = 576: every
// element differed between 1 and 2 threads), so those calls run single-threaded, through MKL's
// thread-local setting. torch's x86 and CUDA wheels link MKL; with another LAPACK (e.g. OpenBLAS on
// aarch64) they are left as they are, and ridge_lapack_is_sequential() tells the tests.
using SetLocalThreads = int (*)(int);

SetLocalThreads mkl_set_local() {
#if defined(__linux__) || defined(__APPLE__)
  // The C entry point (mkl_service.h: #define mkl_set_num_threads_local MKL_Set_Num_Threads_Local); the
  // lower-case symbol is the Fortran one, which takes a pointer.
  static const auto fn = reinterpret_cast<SetLocalThreads>(dlsym(RTLD_DEFAULT, "MKL_Set_Num_Threads_Local"));
  return fn;
#else
  return nullptr;
#endif
}

// The calling thread's LAPACK/BLAS calls run with one thread while in scope.
class SequentialLapack {
 public:
  SequentialLapack() : set_(mkl_set_local()) {
    if (set_ != nullptr) previous_ = set_(1);
  }
  ~SequentialLapack() {
    if (set_ != nullptr) set_(previous_);  // 0 restores "follow the global setting"
  }
  SequentialLapack(const SequentialLapack&) = delete;
  SequentialLapack& operator=(const SequentialLapack&) = delete;

 private:
  SetLocalThreads set_;
  int previous_ = 0;
};

at::Tensor ridge_solve_cpu(const at::Tensor& G, const at::Tensor& A, double lam) {
  SequentialLapack sequential;
  return ridge_solve_driver(G, A, lam, ridge_kernels(kernels(), /*fused=*/true));
}

bool ridge_lapack_is_sequential() { return mkl_set_local() != nullptr; }

}  // namespace
}  // namespace avg_kernels::cpu

TORCH_LIBRARY_FRAGMENT(avg_kernels_C, m) {
  m.def("ridge_solve(Tensor G, Tensor A, float lam) -> Tensor");
  m.def("ridge_lapack_is_sequential() -> bool", &avg_kernels::cpu::ridge_lapack_is_sequential);
}

TORCH_LIBRARY_IMPL(avg_kernels_C, CPU, m) { m.impl("ridge_solve", &avg_kernels::cpu::ridge_solve_cpu); }
