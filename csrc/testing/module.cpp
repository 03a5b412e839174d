// The Python module avg_kernels._C_testing: test hooks (host emulations of the CUDA launches, probes into
// the CPU kernels) as ops torch.ops.avg_kernels_testing.*. Built with the extension but imported only by
// the test suite (avg_kernels._build.testing_extension()), which installs the active level's CPU kernels
// here too.
#include <torch/extension.h>

#include "../cpu/capability_bindings.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "avg_kernels test hooks (ops torch.ops.avg_kernels_testing.*)";
  avg_kernels::cpu::bind_capability(m);
}
