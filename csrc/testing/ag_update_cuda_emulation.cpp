// Host emulation of the CUDA multi-tensor launches of AG-1 / AG-2 (csrc/cuda/ag_update_kernel.cuh),
// as CPU ops for the tests (torch.ops.avg_kernels_testing.*, built into avg_kernels._C_testing). They
// run the CUDA path's own host code (checks, preparation, grouping, table planning, launch sequence)
// and, for every block and thread of every launch, the same __host__ __device__ functions the GPU
// runs. Table limits and the chunk size can be lowered so that short lists already need several
// tables, chunks and carried-over tensors.
//
//   ag1_update_cuda_emulated_(params, params_new, avg_grads, chunk, max_tensors, max_blocks)
//       -> launches [ag1, ag2_reduce, ag2_final, ag2_scale]
//   ag1_update_new_cuda_emulated_(params_new, params, avg_grads, chunk, max_tensors, max_blocks): the same,
//       θ_{t+1} written over θ'
//   ag2_rescale_cuda_emulated_(params, params_old, params_step, chunk, max_tensors, max_blocks)
//       -> (norms [‖θ'−θ‖₁, ‖θ''−θ‖₁, scale], launches)
//   mta_plan(numels, chunk, max_tensors, max_blocks) -> int64 [blocks, 6]: table, slot, list
//       index, begin, end, global block — index arithmetic only, so sizes beyond 2^31 cost nothing
//   mta_thread_groups(begin, end, nthreads, tid, aligned) -> int64 [groups, 3]: i, count, whole
//   mta_limits() -> production chunk, tensors and blocks per table, threads, ILP, table bytes
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>
#include <tuple>
#include <vector>

#include "../cuda/ag_update_host.h"

namespace avg_kernels::ag_cuda {
namespace {

Limits limits(int64_t chunk, int64_t max_tensors, int64_t max_blocks) {
  Limits lim;
  lim.chunk = chunk;
  lim.max_tensors = int(max_tensors);
  lim.max_blocks = int(max_blocks);
  return lim;
}

at::Tensor launch_counts(const Emulator& em) {
  return at::tensor(std::vector<int64_t>(em.launches, em.launches + 4), at::kLong);
}

// lists written-first, as in csrc/cuda/ag_update.cu's ag1_run.
at::Tensor ag1_run_emulated(const char* op, const std::vector<ag::NamedList>& lists, bool into_new, int64_t chunk,
                            int64_t max_tensors, int64_t max_blocks) {
  ag::check_lists(op, lists);
  at::NoGradGuard no_grad;
  auto prep = ag::prepare<3>(lists);
  Refs groups[2];
  make_groups(prep, groups);
  Emulator em;
  launch_ag1(groups, limits(chunk, max_tensors, max_blocks), em, into_new);
  prep.finish();
  return launch_counts(em);
}

at::Tensor ag1_emulated(at::TensorList params, at::TensorList params_new,
                        const c10::List<std::optional<at::Tensor>>& avg_grads, int64_t chunk, int64_t max_tensors,
                        int64_t max_blocks) {
  return ag1_run_emulated("ag1_update_", {ag::named("params", params), ag::named("params_new", params_new),
                                          ag::named("avg_grads", avg_grads)}, false, chunk, max_tensors, max_blocks);
}

at::Tensor ag1_new_emulated(at::TensorList params_new, at::TensorList params,
                            const c10::List<std::optional<at::Tensor>>& avg_grads, int64_t chunk, int64_t max_tensors,
                            int64_t max_blocks) {
  return ag1_run_emulated("ag1_update_new_", {ag::named("params_new", params_new), ag::named("params", params),
                                              ag::named("avg_grads", avg_grads)}, true, chunk, max_tensors, max_blocks);
}

std::tuple<at::Tensor, at::Tensor> ag2_emulated(at::TensorList params, at::TensorList params_old,
                                                at::TensorList params_step, int64_t chunk, int64_t max_tensors,
                                                int64_t max_blocks) {
  const std::vector<ag::NamedList> lists{ag::named("params", params), ag::named("params_old", params_old),
                                         ag::named("params_step", params_step)};
  ag::check_lists("ag2_rescale_", lists);
  at::NoGradGuard no_grad;
  auto prep = ag::prepare<3>(lists);
  Refs groups[2];
  make_groups(prep, groups);
  const Limits lim = limits(chunk, max_tensors, max_blocks);
  const int64_t n_blocks = mta::count_blocks(groups[0], lim.chunk) + mta::count_blocks(groups[1], lim.chunk);
  // NaN-filled: a block that forgets its partial poisons the norms.
  std::vector<double> partials(2 * n_blocks, std::numeric_limits<double>::quiet_NaN());
  at::Tensor norms = at::full({6}, std::numeric_limits<double>::quiet_NaN(), at::kDouble);  // + the factors
  Emulator em;
  launch_ag2(groups, lim, partials.data(), norms.data_ptr<double>(), em);
  prep.finish();
  return {norms.narrow(0, 0, 3), launch_counts(em)};
}

at::Tensor plan(at::IntArrayRef numels, int64_t chunk, int64_t max_tensors, int64_t max_blocks) {
  std::vector<mta::TensorRef<3>> refs;
  for (size_t i = 0; i < numels.size(); ++i) {
    mta::TensorRef<3> r{};
    r.numel = numels[i];
    r.index = int32_t(i);
    refs.push_back(r);
  }
  std::vector<int64_t> rows;
  int64_t table = 0;
  mta::plan_tables<Table3>(refs, chunk, int(max_tensors), int(max_blocks), [&](const Table3& t) {
    for (int b = 0; b < t.n_blocks; ++b) {
      const mta::BlockTask task = mta::block_task(t, b, chunk);
      rows.insert(rows.end(), {table, task.slot, t.slot_index[task.slot], task.begin, task.end, t.first_block + b});
    }
    ++table;
  });
  return at::tensor(rows, at::kLong).view({-1, 6});
}

at::Tensor thread_groups(int64_t begin, int64_t end, int64_t nthreads, int64_t tid, bool aligned) {
  std::vector<int64_t> rows;
  mta::for_groups(begin, end, int(tid), int(nthreads), aligned, [&](int64_t i, int count, bool whole) {
    rows.insert(rows.end(), {i, count, whole ? 1 : 0});
  });
  return at::tensor(rows, at::kLong).view({-1, 3});
}

// (production chunk, max tensors and max blocks per table, threads per block, ILP, table bytes)
std::vector<int64_t> limits_list() {
  return {mta::kChunk, Table3::max_tensors, Table3::max_blocks, mta::kThreads, mta::kILP, int64_t(sizeof(Table3))};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(avg_kernels_testing, m) {
  m.def("ag1_update_cuda_emulated_(Tensor(a!)[] params, Tensor[] params_new, Tensor?[] avg_grads, int chunk, "
        "int max_tensors, int max_blocks) -> Tensor");
  m.def("ag1_update_new_cuda_emulated_(Tensor(a!)[] params_new, Tensor[] params, Tensor?[] avg_grads, int chunk, "
        "int max_tensors, int max_blocks) -> Tensor");
  m.def("ag2_rescale_cuda_emulated_(Tensor(a!)[] params, Tensor[] params_old, Tensor[] params_step, int chunk, "
        "int max_tensors, int max_blocks) -> (Tensor, Tensor)");
  // Index arithmetic only (no tensor arguments): registered as catch-all implementations.
  m.def("mta_plan(int[] numels, int chunk, int max_tensors, int max_blocks) -> Tensor", &plan);
  m.def("mta_thread_groups(int begin, int end, int nthreads, int tid, bool aligned) -> Tensor", &thread_groups);
  m.def("mta_limits() -> int[]", &limits_list);
}

TORCH_LIBRARY_IMPL(avg_kernels_testing, CPU, m) {
  m.impl("ag1_update_cuda_emulated_", &ag1_emulated);
  m.impl("ag1_update_new_cuda_emulated_", &ag1_new_emulated);
  m.impl("ag2_rescale_cuda_emulated_", &ag2_emulated);
}

}  // namespace avg_kernels::ag_cuda
