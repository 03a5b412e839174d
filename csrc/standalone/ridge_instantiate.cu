// Torch-free instantiation of every CUDA kernel of ridge_kernel.cuh (A's storage type x compute type), so
// that CI can compile them with nvcc for the target architectures and read ptxas's register/spill report
// without libtorch (CMakeLists.txt, .ci/cuda_compile_check.sh). The extension instantiates the same
// templates in csrc/cuda/ridge.cu.
#include "../cuda/ridge_kernel.cuh"

namespace avg_kernels::ridge::cuda {

template __global__ void ridge_prologue_kernel<float, float>(PrologueArgs<float, float>);
template __global__ void ridge_prologue_kernel<F16, float>(PrologueArgs<F16, float>);
template __global__ void ridge_prologue_kernel<BF16, float>(PrologueArgs<BF16, float>);
template __global__ void ridge_prologue_kernel<double, float>(PrologueArgs<double, float>);
template __global__ void ridge_prologue_kernel<float, double>(PrologueArgs<float, double>);
template __global__ void ridge_prologue_kernel<F16, double>(PrologueArgs<F16, double>);
template __global__ void ridge_prologue_kernel<BF16, double>(PrologueArgs<BF16, double>);
template __global__ void ridge_prologue_kernel<double, double>(PrologueArgs<double, double>);
template __global__ void ridge_scale_kernel<float>(ScaleArgs<float>);
template __global__ void ridge_scale_kernel<double>(ScaleArgs<double>);

}  // namespace avg_kernels::ridge::cuda
