// CUDA implementations of avg_kernels_C::ag1_update_ / ag1_update_new_ / ag2_rescale_ (SPEC §2): the checks and
// preparation of csrc/ag_lists.h, then the launch sequence of ag_update_kernel.cuh on the current
// stream. No device-to-host synchronisation: AG-2's norms and scale stay in a device buffer that the
// scaling pass reads; the tables travel as kernel arguments (no host-to-device copy either).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <limits>
#include <string>

#include "ag_update_host.h"

namespace avg_kernels::ag_cuda {
namespace {

struct CudaLauncher {
  cudaStream_t stream;

  template <class Op, bool kIntoNew>
  void ag1(const Table3& t, int64_t chunk) {
    ag1_kernel<Op, kIntoNew><<<t.n_blocks, kThreads, 0, stream>>>(t, chunk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <class Op>
  void ag2_reduce(const Table3& t, int64_t chunk, double* partials) {
    ag2_reduce_kernel<Op><<<t.n_blocks, kThreads, 0, stream>>>(t, chunk, partials);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  void ag2_final(const double* partials, int64_t n_blocks, double* norms) {
    ag2_final_kernel<<<1, kThreads, 0, stream>>>(partials, n_blocks, norms);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <class Op>
  void ag2_scale(const Table3& t, int64_t chunk, const double* norms) {
    ag2_scale_kernel<Op><<<t.n_blocks, kThreads, 0, stream>>>(t, chunk, norms);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// lists written-first: (params, params_new, avg_grads), or (params_new, params, avg_grads) with into_new.
void ag1_run(const char* op, const std::vector<ag::NamedList>& lists, bool into_new) {
  ag::check_lists(op, lists);
  if (lists[0].tensors.empty()) return;
  at::NoGradGuard no_grad;
  const c10::cuda::CUDAGuard guard(lists[0].tensors[0].device());
  auto prep = ag::prepare<3>(lists);
  Refs groups[2];
  make_groups(prep, groups);
  CudaLauncher launcher{at::cuda::getCurrentCUDAStream()};
  launch_ag1(groups, Limits{}, launcher, into_new);
  prep.finish();
}

void ag1_update_cuda(at::TensorList params, at::TensorList params_new,
                     const c10::List<std::optional<at::Tensor>>& avg_grads) {
  ag1_run("ag1_update_", {ag::named("params", params), ag::named("params_new", params_new),
                          ag::named("avg_grads", avg_grads)}, false);
}

void ag1_update_new_cuda(at::TensorList params_new, at::TensorList params,
                         const c10::List<std::optional<at::Tensor>>& avg_grads) {
  ag1_run("ag1_update_new_", {ag::named("params_new", params_new), ag::named("params", params),
                              ag::named("avg_grads", avg_grads)}, true);
}

at::Tensor ag2_rescale_cuda(at::TensorList params, at::TensorList params_old, at::TensorList params_step) {
  const std::vector<ag::NamedList> lists{ag::named("params", params), ag::named("params_old", params_old),
                                         ag::named("params_step", params_step)};
  ag::check_lists("ag2_rescale_", lists);
  TORCH_CHECK(!params.empty(), "ag2_rescale_: empty lists have no device");
  at::NoGradGuard no_grad;
  const c10::cuda::CUDAGuard guard(params[0].device());
  auto prep = ag::prepare<3>(lists);
  Refs groups[2];
  make_groups(prep, groups);
  const Limits lim;
  const int64_t n_blocks = mta::count_blocks(groups[0], lim.chunk) + mta::count_blocks(groups[1], lim.chunk);
  // Partials and norms in one allocation, not cleared: every block writes its partial and the final
  // reduce writes the norms. NaN-filled under AVG_KERNELS_POISON_OUTPUTS=1 (the test suite), so a
  // partial that a block forgets poisons the result.
  const char* poison = std::getenv("AVG_KERNELS_POISON_OUTPUTS");
  at::Tensor buf = (poison && std::string(poison) == "1")
                       ? at::full({2 * n_blocks + 6}, std::numeric_limits<double>::quiet_NaN(),
                                  params[0].options().dtype(at::kDouble))
                       : at::empty({2 * n_blocks + 6}, params[0].options().dtype(at::kDouble));
  double* partials = buf.data_ptr<double>();
  double* norms = partials + 2 * n_blocks;
  CudaLauncher launcher{at::cuda::getCurrentCUDAStream()};
  launch_ag2(groups, lim, partials, norms, launcher);
  prep.finish();
  return buf.narrow(0, 2 * n_blocks, 3);  // the scale's factors (3 more) stay internal
}

}  // namespace

TORCH_LIBRARY_IMPL(avg_kernels_C, CUDA, m) {
  m.impl("ag1_update_", &ag1_update_cuda);
  m.impl("ag1_update_new_", &ag1_update_new_cuda);
  m.impl("ag2_rescale_", &ag2_rescale_cuda);
}

}  // namespace avg_kernels::ag_cuda
