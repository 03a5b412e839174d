// Host emulation of the ridge CUDA kernels (csrc/cuda/ridge_kernel.cuh), built into
// avg_kernels._C_testing (for the test suite; not loaded by `import avg_kernels`), so the CPU test
// suite executes the GPU's tile, shared-memory, masking and 64-bit index logic. Ops
// torch.ops.avg_kernels_testing.*:
//
//   ridge_prologue_emulated(A, lam, compute_dtype, grid) -> (Bm, stats)
//       the CUDA prologue (same dispatch, same arguments) with every block of a grid of `grid` blocks
//       (grid-stride over the tiles) and every thread run on the host, phase by phase.
//   ridge_scale_emulated(Y, w, lam, rtol, grid, block) -> Tensor
//   ridge_solve_emulated(G, A, lam) -> Tensor
//       the CUDA backend's whole code path (the shared driver + these kernels at the CUDA launch
//       configuration) on CPU tensors.
//   ridge_cuda_launch(nb, D, n) -> [prologue grid, prologue block, scale grid, scale block]
//   ridge_tile_coords(blk, nt) -> [b, i0, j0]       (no memory: index logic beyond 2^31)
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../cuda/ridge_dispatch.h"
#include "../ridge_driver.h"

namespace avg_kernels::ridge::cuda {
namespace {

void prologue_emulated_into(const at::Tensor& A3, double lam, at::Tensor& Bm, at::Tensor& stats, int64_t grid) {
  TORCH_CHECK(A3.device().is_cpu(), "ridge_prologue_emulated runs on CPU tensors");
  TORCH_CHECK(grid >= 1 && grid <= 2147483647LL, "grid must be in [1, 2^31 - 1]");
  if (Bm.numel() == 0) return;
  dispatch_storage(A3.scalar_type(), [&](auto in) {
    using In = decltype(in);
    dispatch_compute(Bm.scalar_type(), [&](auto c) {
      using C = decltype(c);
      emulate_prologue(make_prologue_args<In, C>(A3, lam, Bm, stats), grid);
    });
  });
}

std::tuple<at::Tensor, at::Tensor> prologue_emulated(const at::Tensor& A, double lam, at::ScalarType ct, int64_t grid) {
  at::Tensor Bm = at::empty({A.size(0), A.size(1), A.size(2)}, A.options().dtype(ct));
  at::Tensor stats = at::zeros({A.size(0), 2}, A.options().dtype(ct));
  prologue_emulated_into(A, lam, Bm, stats, grid);
  return {Bm, stats};
}

void scale_emulated_into(at::Tensor& Y, const at::Tensor& w, double lam, double rtol, int64_t grid, int64_t block) {
  TORCH_CHECK(grid >= 1 && block >= 1 && block <= 1024, "bad launch configuration");
  if (Y.numel() == 0) return;
  dispatch_compute(Y.scalar_type(), [&](auto c) {
    using C = decltype(c);
    emulate_scale(make_scale_args<C>(Y, w, lam, rtol), grid, int(block));
  });
}

at::Tensor scale_emulated(const at::Tensor& Y, const at::Tensor& w, double lam, double rtol, int64_t grid,
                          int64_t block) {
  at::Tensor out = Y.contiguous().clone();
  scale_emulated_into(out, w.contiguous(), lam, rtol, grid, block);
  return out;
}

// The CUDA backend's kernels at its own launch configuration, on the host.
void prologue_at_cuda_config(const at::Tensor& A3, double lam, at::Tensor& Bm, at::Tensor& stats) {
  prologue_emulated_into(A3, lam, Bm, stats, prologue_launch(A3.size(0), A3.size(1)).grid);
}

void scale_at_cuda_config(at::Tensor& Y, const at::Tensor& w, double lam, double rtol) {
  const Launch cfg = scale_launch(Y.numel());
  scale_emulated_into(Y, w, lam, rtol, cfg.grid, cfg.block);
}

at::Tensor solve_emulated(const at::Tensor& G, const at::Tensor& A, double lam) {
  TORCH_CHECK(G.device().is_cpu() && A.device().is_cpu(), "ridge_solve_emulated runs on CPU tensors");
  return ridge_solve_driver(G, A, lam, RidgeKernels{&prologue_at_cuda_config, &scale_at_cuda_config});
}

std::vector<int64_t> cuda_launch(int64_t nb, int64_t D, int64_t n) {
  const Launch p = prologue_launch(nb, D), s = scale_launch(n);
  return {p.grid, p.block, s.grid, s.block};
}

std::vector<int64_t> coords(int64_t blk, int64_t nt) {
  const TileCoords t = tile_coords(blk, nt);
  return {t.b, t.i0, t.j0};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(avg_kernels_testing, m) {
  m.def("ridge_prologue_emulated(Tensor A, float lam, ScalarType compute_dtype, int grid) -> (Tensor, Tensor)");
  m.def("ridge_scale_emulated(Tensor Y, Tensor w, float lam, float rtol, int grid, int block) -> Tensor");
  m.def("ridge_solve_emulated(Tensor G, Tensor A, float lam) -> Tensor");
  m.def("ridge_cuda_launch(int nb, int D, int n) -> int[]");
  m.def("ridge_tile_coords(int blk, int nt) -> int[]");
}

TORCH_LIBRARY_IMPL(avg_kernels_testing, CPU, m) {
  m.impl("ridge_prologue_emulated", &prologue_emulated);
  m.impl("ridge_scale_emulated", &scale_emulated);
  m.impl("ridge_solve_emulated", &solve_emulated);
}

TORCH_LIBRARY_IMPL(avg_kernels_testing, CompositeExplicitAutograd, m) {
  m.impl("ridge_cuda_launch", &cuda_launch);
  m.impl("ridge_tile_coords", &coords);
}

}  // namespace avg_kernels::ridge::cuda
