// Host emulation of the CUDA Gram kernel (csrc/cuda/gram_kernel.cuh), built into avg_kernels._C_testing
// (for the test suite; not loaded by `import avg_kernels`), so the CPU tests execute the GPU kernel's
// tile numbering, per-thread row/position decomposition, masks, 64-bit offsets, shared-memory stages
// and stores. Ops torch.ops.avg_kernels_testing.*:
//
//   im2col_gram_cuda_emulated(x, kernel_size, stride, padding, dilation, groups, bias, out!, splits,
//                             wide, sm_count) -> int[]
//       the CUDA op's code path on CPU tensors: the same launch shape (gram_launch: `splits` > 0
//       forces the split count, else it is chosen for `sm_count` SMs), every block of the grid run
//       by emulate_gram_block (threads in turn between barriers), the same split reduction.
//       `wide` forces the int64 position path. Returns [tiles, splits, steps, wide].
//   gram_tile_coords(t) -> int[]   the kernel's (bi, bj) of upper-triangle tile t.
//   gram_unfolded_index(sizes, strides, conv args, g, rows, positions, wide) -> (offset, kind)
//       the kernel's address of unfolded element (row, position) for an input of any size (meta).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../cuda/gram_launch.h"

namespace avg_kernels::cuda_gram {
namespace {

std::vector<int64_t> im2col_gram_cuda_emulated(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                               bool bias, at::Tensor& out, int64_t splits, bool wide, int64_t sm_count) {
  TORCH_CHECK(x.device().is_cpu(), "im2col_gram_cuda_emulated runs on CPU tensors");
  const ConvShape s = conv_shape(x, kernel_size, stride, padding, dilation, groups, bias);
  check_out(s, x, out);
  GramLaunch l = gram_launch(s.d, s.groups, s.m, sm_count, splits);
  l.wide = l.wide || wide;
  if (s.d == 0) return {l.tiles, l.splits, l.steps, int64_t(l.wide)};
  at::Tensor ws = l.splits == 1 ? out : at::empty({l.splits, s.groups, s.d, s.d}, out.options());
  dispatch_gram_types(x.scalar_type(), [&](auto in, auto acc) {
    using In = decltype(in);
    using Acc = decltype(acc);
    const GramArgs<In, Acc> a = make_args<In, Acc>(s, ws.data_ptr<Acc>(), l);
    const int64_t blocks = l.tiles * s.groups * l.splits;
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      std::vector<ThreadState<Acc>> states(kThreads);
      for (int64_t b = b0; b < b1; ++b) {
        // blockIdx = (tile, group, split), x fastest as in the CUDA grid
        const int64_t tile = b % l.tiles, g = (b / l.tiles) % s.groups, split = b / (l.tiles * s.groups);
        if (l.wide) {
          emulate_gram_block<int64_t>(a, tile, g, split, states.data());
        } else {
          emulate_gram_block<int32_t>(a, tile, g, split, states.data());
        }
      }
    });
  });
  if (l.splits > 1) at::sum_out(out, ws, 0);
  return {l.tiles, l.splits, l.steps, int64_t(l.wide)};
}

std::vector<int64_t> linear_gram_cuda_emulated(const at::Tensor& x, bool bias, at::Tensor& out, int64_t splits,
                                               bool wide, int64_t sm_count) {
  return im2col_gram_cuda_emulated(linear_as_conv(x), {1}, {1}, {0}, {1}, 1, bias, out, splits, wide, sm_count);
}

std::vector<int64_t> gram_tile_coords(int64_t t) {
  int64_t bi = 0, bj = 0;
  tile_coords(t, &bi, &bj);
  return {bi, bj};
}

// The kernel's element addressing for (row d, position m) pairs of an input with the given sizes
// and strides (a meta tensor: no storage, so shapes far beyond 2^31 elements cost nothing).
// Returns (offset, kind): kind 0 = x[offset], 1 = a zero (padding, past M or past D), 2 = the bias one.
std::tuple<at::Tensor, at::Tensor> gram_unfolded_index(at::IntArrayRef sizes, at::IntArrayRef strides,
                                                       at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                                       bool bias, int64_t g, const at::Tensor& rows,
                                                       const at::Tensor& positions, bool wide) {
  const at::Tensor x = at::empty_strided(sizes, strides, at::TensorOptions().device(at::kMeta).dtype(at::kFloat));
  const ConvShape s = conv_shape(x, kernel_size, stride, padding, dilation, groups, bias);
  TORCH_CHECK(rows.sizes() == positions.sizes() && rows.scalar_type() == at::kLong &&
                  positions.scalar_type() == at::kLong, "rows and positions: int64 tensors of one shape");
  GramLaunch l{};
  GramArgs<float, float> a = make_args<float, float>(s, nullptr, l);
  const auto r = rows.contiguous(), p = positions.contiguous();
  auto off = at::empty(r.sizes(), at::kLong), kind = at::empty(r.sizes(), at::kLong);
  const int64_t* rp = r.const_data_ptr<int64_t>();
  const int64_t* pp = p.const_data_ptr<int64_t>();
  for (int64_t e = 0; e < r.numel(); ++e) {
    const RowInfo ri = row_info(a, g, rp[e]);
    const ColInfo ci = wide ? col_info<int64_t>(a, pp[e]) : col_info<int32_t>(a, pp[e]);
    int64_t o = 0, k = 1;
    if (ci.valid && ri.kind == 1) {
      k = 2;
    } else if (ci.valid && ri.kind == 0) {
      const int64_t ih = ci.hs + ri.dh, iw = ci.ws + ri.dw;
      if (ih >= 0 && ih < a.h && iw >= 0 && iw < a.w) o = ci.offset + ri.offset, k = 0;
    }
    off.data_ptr<int64_t>()[e] = o;
    kind.data_ptr<int64_t>()[e] = k;
  }
  return {off, kind};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(avg_kernels_testing, m) {
  m.def("im2col_gram_cuda_emulated(Tensor x, int[] kernel_size, int[] stride, int[] padding, int[] dilation, "
        "int groups, bool bias, Tensor(a!) out, int splits, bool wide, int sm_count) -> int[]");
  m.def("linear_gram_cuda_emulated(Tensor x, bool bias, Tensor(a!) out, int splits, bool wide, int sm_count) -> int[]");
  m.def("gram_tile_coords(int t) -> int[]", &gram_tile_coords);
  m.def("gram_unfolded_index(int[] sizes, int[] strides, int[] kernel_size, int[] stride, int[] padding, "
        "int[] dilation, int groups, bool bias, int g, Tensor rows, Tensor positions, bool wide) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(avg_kernels_testing, CPU, m) {
  m.impl("im2col_gram_cuda_emulated", &im2col_gram_cuda_emulated);
  m.impl("linear_gram_cuda_emulated", &linear_gram_cuda_emulated);
  m.impl("gram_unfolded_index", &gram_unfolded_index);
}

}  // namespace avg_kernels::cuda_gram
