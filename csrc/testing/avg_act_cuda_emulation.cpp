// Host emulation of the CUDA kernels, built into avg_kernels._C_testing (for the test suite; not loaded
// by `import avg_kernels`), so the CPU test suite executes the GPU's index, vector, tail and
// float16/bfloat16 logic (csrc/cuda/avg_act_kernel.cuh) for chosen launch configurations. Ops
// torch.ops.avg_kernels_testing.*:
//
//   avg_act_backward_emulated(grad_out, x, x_new, out!, act, p0, p1, eps, grid, block) -> bool
//       the CUDA op's code path (same dispatch, same arguments, same vector/scalar choice) with
//       every (block, thread) of the given grid run on the host; returns whether the 16-byte
//       vector path ran.
//   cuda_launch_config(n, elem_size, vectorized, num_sms, blocks_per_sm) -> [grid, block, vec]
//       the launch configuration the CUDA op picks on a device with that many SMs, for a kernel
//       with that occupancy (resident blocks per SM).
//   grid_stride_check(n, vec, grid, block, thread_begin, thread_end) -> [elements, visits, errors, max_end]
//       runs the grid-stride loop of global threads [thread_begin, thread_end) without memory and
//       checks each visits exactly its arithmetic progression (see CoverageCheck); any n.
//   grid_stride_ranges(n, vec, grid, block, block_idx, thread_idx, capacity) -> Tensor[k, 2]
//       the (start, length) element ranges one thread is handed, in order (first `capacity`).
//   emulated_bits_to_float(Tensor int16 bits, int kind) / emulated_float_to_bits(Tensor float, int kind)
//       the kernel's float16 (kind 0) / bfloat16 (kind 1) conversions, run on the host.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <limits>

#include "../checks.h"
#include "../cuda/avg_act_dispatch.h"

namespace avg_kernels::cuda {
namespace {

LaunchConfig checked_config(int64_t grid, int64_t block) {
  TORCH_CHECK(grid >= 1 && grid <= std::numeric_limits<int32_t>::max(),
              "grid must be in [1, 2^31 - 1] (CUDA's gridDim.x limit), got ", grid);
  TORCH_CHECK(block >= 1 && block <= 1024, "block must be in [1, 1024], got ", block);
  return LaunchConfig{uint32_t(grid), uint32_t(block)};
}

bool avg_act_backward_emulated(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& x_new,
                               at::Tensor& out, int64_t act, double p0, double p1, double eps, int64_t grid,
                               int64_t block) {
  check_avg_act_args(grad_out, x, x_new, out, eps);
  TORCH_CHECK(x.device().is_cpu(), "avg_act_backward_emulated runs on CPU tensors");
  const LaunchConfig cfg = checked_config(grid, block);
  bool vec64 = false;
  if (avg_act_in_fp64_if_needed(grad_out, x, x_new, out, eps, [&](const at::Tensor& g, const at::Tensor& a,
                                                                  const at::Tensor& b, at::Tensor& o) {
        vec64 = avg_act_backward_emulated(g, a, b, o, act, p0, p1, eps, grid, block);
      }))
    return vec64;
  if (out.numel() == 0) return false;
  const auto g = grad_out.contiguous(), a = x.contiguous(), b = x_new.contiguous();
  bool vectorized = false;
  dispatch_elem_act(x.scalar_type(), act, [&](auto elem, auto tag) {
    using E = decltype(elem);
    constexpr Act A = decltype(tag)::value;
    vectorized = emulate_avg_act<A>(make_avg_act_args<E>(g, a, b, out, p0, p1, eps), cfg);
  });
  return vectorized;
}

std::vector<int64_t> cuda_launch_config(int64_t n, int64_t elem_size, bool vectorized, int64_t num_sms,
                                        int64_t blocks_per_sm) {
  TORCH_CHECK(n > 0, "n must be > 0 (the CUDA op launches nothing for empty tensors)");
  TORCH_CHECK(elem_size == 2 || elem_size == 4 || elem_size == 8, "elem_size must be 2, 4 or 8");
  const int vec = vectorized ? int(kVecBytes / elem_size) : 1;
  const LaunchConfig c = launch_config(n, vec, int(num_sms), int(blocks_per_sm));
  return {int64_t(c.grid), int64_t(c.block), int64_t(vec)};
}

std::vector<int64_t> grid_stride_check(int64_t n, int64_t vec, int64_t grid, int64_t block, int64_t thread_begin,
                                       int64_t thread_end) {
  const LaunchConfig cfg = checked_config(grid, block);
  const int64_t nthreads = grid_threads(cfg.grid, cfg.block);
  TORCH_CHECK(n >= 0, "n must be >= 0");
  TORCH_CHECK(0 <= thread_begin && thread_begin <= thread_end && thread_end <= nthreads,
              "threads [", thread_begin, ", ", thread_end, ") outside the grid's ", nthreads);
  std::atomic<int64_t> elements{0}, visits{0}, errors{0}, max_end{0};
  dispatch_vec(vec, [&](auto v) {
    constexpr int VEC = decltype(v)::value;
    at::parallel_for(thread_begin, thread_end, 1, [&](int64_t lo, int64_t hi) {
      int64_t el = 0, vi = 0, er = 0, me = 0;
      for (int64_t t = lo; t < hi; ++t) {
        // The kernel's own id arithmetic from (blockIdx.x, threadIdx.x, blockDim.x).
        const int64_t tid = global_thread_id(uint32_t(t / cfg.block), uint32_t(t % cfg.block), cfg.block);
        if (tid != t) ++er;
        const CoverageCheck c = check_thread_coverage<VEC>(n, tid, nthreads);
        el += c.elements;
        vi += c.visits;
        er += c.errors;
        me = std::max(me, c.max_end);
      }
      elements += el;
      visits += vi;
      errors += er;
      int64_t cur = max_end.load();
      while (me > cur && !max_end.compare_exchange_weak(cur, me)) {
      }
    });
  });
  return {elements.load(), visits.load(), errors.load(), max_end.load()};
}

at::Tensor grid_stride_ranges(int64_t n, int64_t vec, int64_t grid, int64_t block, int64_t block_idx,
                              int64_t thread_idx, int64_t capacity) {
  const LaunchConfig cfg = checked_config(grid, block);
  TORCH_CHECK(0 <= block_idx && block_idx < grid && 0 <= thread_idx && thread_idx < block,
              "(block_idx, thread_idx) = (", block_idx, ", ", thread_idx, ") outside the launch");
  TORCH_CHECK(n >= 0 && capacity >= 0, "n and capacity must be >= 0");
  const int64_t tid = global_thread_id(uint32_t(block_idx), uint32_t(thread_idx), cfg.block);
  const int64_t nthreads = grid_threads(cfg.grid, cfg.block);
  auto out = at::empty({capacity, 2}, at::kLong);
  int64_t count = 0;
  dispatch_vec(vec, [&](auto v) {
    constexpr int VEC = decltype(v)::value;
    count = record_thread_ranges<VEC>(n, tid, nthreads, out.data_ptr<int64_t>(), capacity);
  });
  TORCH_CHECK(count <= capacity, "thread visits ", count, " ranges, more than capacity=", capacity);
  return out.narrow(0, 0, count);
}

at::Tensor emulated_bits_to_float(const at::Tensor& bits, int64_t kind) {
  TORCH_CHECK(bits.scalar_type() == at::kShort, "bits must be int16");
  TORCH_CHECK(kind == 0 || kind == 1, "kind: 0 = float16, 1 = bfloat16");
  auto in = bits.contiguous();
  auto out = at::empty(in.sizes(), at::kFloat);
  const auto* p = reinterpret_cast<const uint16_t*>(in.const_data_ptr<int16_t>());
  float* q = out.data_ptr<float>();
  for (int64_t i = 0; i < in.numel(); ++i) q[i] = kind == 0 ? ElemF16::load(p[i]) : ElemBF16::load(p[i]);
  return out;
}

at::Tensor emulated_float_to_bits(const at::Tensor& values, int64_t kind) {
  TORCH_CHECK(values.scalar_type() == at::kFloat, "values must be float32");
  TORCH_CHECK(kind == 0 || kind == 1, "kind: 0 = float16, 1 = bfloat16");
  auto in = values.contiguous();
  auto out = at::empty(in.sizes(), at::kShort);
  const float* p = in.const_data_ptr<float>();
  auto* q = reinterpret_cast<uint16_t*>(out.data_ptr<int16_t>());
  for (int64_t i = 0; i < in.numel(); ++i) q[i] = kind == 0 ? ElemF16::store(p[i]) : ElemBF16::store(p[i]);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(avg_kernels_testing, m) {
  m.def("avg_act_backward_emulated(Tensor grad_out, Tensor x, Tensor x_new, Tensor(a!) out, int act, float p0, "
        "float p1, float eps, int grid, int block) -> bool");
  m.def("cuda_launch_config(int n, int elem_size, bool vectorized, int num_sms, int blocks_per_sm) -> int[]",
        &cuda_launch_config);
  m.def("grid_stride_check(int n, int vec, int grid, int block, int thread_begin, int thread_end) -> int[]",
        &grid_stride_check);
  m.def("grid_stride_ranges(int n, int vec, int grid, int block, int block_idx, int thread_idx, int capacity) "
        "-> Tensor",
        &grid_stride_ranges);
  m.def("emulated_bits_to_float(Tensor bits, int kind) -> Tensor");
  m.def("emulated_float_to_bits(Tensor values, int kind) -> Tensor");
}

TORCH_LIBRARY_IMPL(avg_kernels_testing, CPU, m) {
  m.impl("avg_act_backward_emulated", &avg_act_backward_emulated);
  m.impl("emulated_bits_to_float", &emulated_bits_to_float);
  m.impl("emulated_float_to_bits", &emulated_float_to_bits);
}

}  // namespace avg_kernels::cuda
