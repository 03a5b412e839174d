// The Python module avg_kernels._C. Importing it runs the TORCH_LIBRARY registrations of every
// kernel file (ops appear under torch.ops.avg_kernels_C); the functions below describe the build.
#include <torch/extension.h>

namespace {

bool built_with_cuda() {
#ifdef AVG_KERNELS_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::string cpu_isa() {
#if defined(CPU_CAPABILITY_AVX512)
  return "avx512";
#elif defined(CPU_CAPABILITY_AVX2)
  return "avx2";
#else
  return "default";
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "avg_kernels compiled kernels (C++ CPU, and CUDA when built with it)";
  m.def("built_with_cuda", &built_with_cuda, "True when the CUDA kernels were compiled in");
  m.def("cpu_isa", &cpu_isa, "SIMD instruction set the CPU kernels were compiled for");
}
