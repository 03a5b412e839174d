// Torch-free instantiation of every CUDA kernel of ag_update_kernel.cuh (the multi-tensor AG-1 update
// and AG-2 rescale over multi_tensor_apply.cuh's tables), float and double arithmetic, so that CI
// compiles them with nvcc for the target architectures and reads ptxas's register/spill report without
// libtorch (CMakeLists.txt, .ci/cuda_compile_check.sh). The extension launches the same templates from
// csrc/cuda/ag_update.cu.
#include "../cuda/ag_update_kernel.cuh"

namespace avg_kernels::ag_cuda {

template __global__ void ag1_kernel<float, false>(const __grid_constant__ Table3, int64_t);
template __global__ void ag1_kernel<double, false>(const __grid_constant__ Table3, int64_t);
template __global__ void ag1_kernel<float, true>(const __grid_constant__ Table3, int64_t);
template __global__ void ag1_kernel<double, true>(const __grid_constant__ Table3, int64_t);
template __global__ void ag2_reduce_kernel<float>(const __grid_constant__ Table3, int64_t, double*);
template __global__ void ag2_reduce_kernel<double>(const __grid_constant__ Table3, int64_t, double*);
template __global__ void ag2_scale_kernel<float>(const __grid_constant__ Table3, int64_t, const double*);
template __global__ void ag2_scale_kernel<double>(const __grid_constant__ Table3, int64_t, const double*);

}  // namespace avg_kernels::ag_cuda
