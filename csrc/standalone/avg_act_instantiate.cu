// Torch-free instantiation of every CUDA kernel of avg_act_kernel.cuh (activation x dtype x
// {16-byte vector path, scalar path}), so that CI can compile them with nvcc for the target
// architectures and read ptxas's register/spill report without libtorch (CMakeLists.txt,
// .ci/cuda_compile_check.sh). The extension instantiates the same templates in csrc/cuda/avg_act.cu.
#include "../cuda/avg_act_kernel.cuh"

namespace avg_kernels::cuda {

#define AK_INSTANTIATE(A, E)                                                              \
  template __global__ void avg_act_kernel<Act::A, E, kVecWidth<E>>(AvgActArgs<E>); \
  template __global__ void avg_act_kernel<Act::A, E, 1>(AvgActArgs<E>);

// One row of AVG_KERNELS_ACTIVATIONS (activations.h): every dtype, both paths.
#define AK_INSTANTIATE_ALL_DTYPES(A, id, name, bounded) \
  AK_INSTANTIATE(A, ElemF32)                            \
  AK_INSTANTIATE(A, ElemF64)                            \
  AK_INSTANTIATE(A, ElemF16)                            \
  AK_INSTANTIATE(A, ElemBF16)

AVG_KERNELS_ACTIVATIONS(AK_INSTANTIATE_ALL_DTYPES)

}  // namespace avg_kernels::cuda
