// The Python module avg_kernels._cpu_<level> (one per capability level, setup.py): its only content is
// the `kernels` capsule holding this level's Kernels table (kernels.h). Plain CPython API: no pybind11.
#include <Python.h>

#include "level.h"

#define AK_STR2(x) #x
#define AK_STR(x) AK_STR2(x)
#define AK_CAT2(a, b) a##b
#define AK_CAT(a, b) AK_CAT2(a, b)

namespace avg_kernels::cpu::CPU_CAPABILITY {
namespace {

// "DEFAULT" -> "default" etc.: the names avg_kernels/_cpu_levels.py uses.
constexpr const char* level_name() {
  constexpr const char* n = AK_STR(CPU_CAPABILITY);
  return n[0] == 'A' && n[3] == '5' ? "avx512" : n[0] == 'A' ? "avx2" : "default";
}

const Kernels kTable{
    kKernelsAbi,
    sizeof(Kernels),
    level_name(),
    &avg_act_backward,
    &act_value,
    &ag1_update,
    &ag2_norms,
    &ag2_scale,
    &gram_correlation,
    &gram_im2col_gemm,
    &ridge_prologue,
    &ridge_scale,
    &ridge_small_solve,
    kRidgeSmallMaxD,
    &vec_math,
};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, AK_STR(TORCH_EXTENSION_NAME),
                       "avg_kernels CPU kernels of one capability level (see csrc/cpu/kernels.h)", -1};

}  // namespace
}  // namespace avg_kernels::cpu::CPU_CAPABILITY

// avg_kernels/_build.py imports a level's module only where the CPU supports the level: this function and any
// static initialiser of the module are compiled with the level's flags.
PyMODINIT_FUNC AK_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  using namespace avg_kernels::cpu;
  PyObject* m = PyModule_Create(&CPU_CAPABILITY::kModule);
  if (m == nullptr) return nullptr;
  PyObject* cap = PyCapsule_New(const_cast<Kernels*>(&CPU_CAPABILITY::kTable), kKernelsCapsule, nullptr);
  if (cap == nullptr || PyModule_AddObject(m, "kernels", cap) != 0 ||
      PyModule_AddStringConstant(m, "level", CPU_CAPABILITY::level_name()) != 0) {
    Py_XDECREF(cap);
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
