// The Python functions of capability.h, shared by avg_kernels._C and avg_kernels._C_testing (each module
// has its own installed table; avg_kernels/_build.py installs the same level in both).
#pragma once

#include <torch/extension.h>

#include "capability.h"

namespace avg_kernels::cpu {

inline void bind_capability(py::module& m) {
  m.def(
      "set_cpu_kernels",
      [](py::object capsule) {
        if (capsule.is_none()) return set_kernels(nullptr);
        if (!PyCapsule_IsValid(capsule.ptr(), kKernelsCapsule))
          throw py::type_error("set_cpu_kernels: expected the `kernels` capsule of an avg_kernels._cpu_<level> module");
        set_kernels(static_cast<const Kernels*>(PyCapsule_GetPointer(capsule.ptr(), kKernelsCapsule)));
      },
      py::arg("capsule"), "Install the kernel table of an avg_kernels._cpu_<level> module (None: uninstall)");
  m.def("cpu_capability", &active_level, "The installed CPU kernels' level ('' when none)");
  m.def("cpu_features", &cpu_features, "What the running CPU and OS support (cpuid, xgetbv)");
}

}  // namespace avg_kernels::cpu
