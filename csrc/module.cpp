// The Python module avg_kernels._C. Importing it runs the TORCH_LIBRARY registrations of every op
// (torch.ops.avg_kernels_C.*); the functions below describe the build and install the CPU kernels of
// the capability level avg_kernels/_build.py chose (csrc/cpu/capability.h).
#include <torch/extension.h>

#include "cpu/capability_bindings.h"

namespace {

bool built_with_cuda() {
#ifdef AVG_KERNELS_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "avg_kernels ops: registration, checks and drivers (C++ CPU kernels in avg_kernels._cpu_<level>; "
            "CUDA kernels when built with them)";
  m.def("built_with_cuda", &built_with_cuda, "True when the CUDA kernels were compiled in");
  avg_kernels::cpu::bind_capability(m);
}
