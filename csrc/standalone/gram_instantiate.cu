// Torch-free instantiation of the CUDA Gram kernel of csrc/cuda/gram_kernel.cuh for every input
// dtype x {int32, int64 position arithmetic}, so that CI compiles it with nvcc for the target
// architectures and reads ptxas's register/spill report without libtorch (CMakeLists.txt,
// .ci/cuda_compile_check.sh). The extension instantiates the same templates in csrc/cuda/gram.cu
// with c10::Half / c10::BFloat16 as the 16-bit storage types (same layout, same float conversion).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../cuda/gram_kernel.cuh"

namespace avg_kernels::cuda_gram {

#define AK_GRAM_INSTANTIATE(IN, ACC)                                              \
  template __global__ void gram_kernel<int32_t, IN, ACC>(const GramArgs<IN, ACC>); \
  template __global__ void gram_kernel<int64_t, IN, ACC>(const GramArgs<IN, ACC>);

AK_GRAM_INSTANTIATE(float, float)
AK_GRAM_INSTANTIATE(double, double)
AK_GRAM_INSTANTIATE(__half, float)
AK_GRAM_INSTANTIATE(__nv_bfloat16, float)

}  // namespace avg_kernels::cuda_gram
