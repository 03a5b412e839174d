// CPU implementation of the internal ops avg_kernels_C::im2col_gram_out / linear_gram_out (SPEC §3):
// geometry checks, the choice between the correlation kernels and the GEMM paths, the Linear GEMM path,
// then the kernels of the active capability level (csrc/cpu/kernels/gram.cpp). The public ops
// avg_kernels::*_gram (avg_kernels/ops/gram.py) validate the arguments and allocate `out` first.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>

#include "capability.h"

namespace avg_kernels::cpu {
namespace {

using gram::ConvDim;

// The explicit-im2col GEMM path runs for 1-3 channels per group and D <= 64: the correlation kernels pad
// each group's channels to a whole vector, so there they do several times the useful work (the measured
// crossover is in docs/kernel_choices.md). Depthwise convs (one channel per group, >= kDwMinGroups groups)
// are the exception: the correlation kernels' depthwise mode vectorises across groups without padding,
// 4-25x faster than the GEMM path's per-group 9x9 GEMMs (bench/results/models-cost-log.md).
constexpr int64_t kGemmMaxChannels = 3, kGemmMaxDim = 64, kDwMinGroups = 8;

enum class GramPath : int64_t { kNever = -1, kAuto = 0, kAlways = 1 };
std::atomic<int64_t> gemm_path{int64_t(GramPath::kAuto)};

// The GEMM path runs where `automatic` (the measured rule of the caller) says so, unless set_gram_path forces it.
bool use_gemm(bool automatic) {
  switch (GramPath(gemm_path.load(std::memory_order_relaxed))) {
    case GramPath::kNever: return false;
    case GramPath::kAlways: return true;
    default: return automatic;
  }
}

void check_out(const at::Tensor& x, const at::Tensor& out, int64_t groups, int64_t dim) {
  const auto want = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(out.scalar_type() == want, "im2col_gram: out must be ", want, ", got ", out.scalar_type());
  TORCH_CHECK(out.is_contiguous() && out.dim() == 3 && out.size(0) == groups && out.size(1) == dim && out.size(2) == dim,
              "im2col_gram: out must be a contiguous (", groups, ", ", dim, ", ", dim, ") tensor, got ", out.sizes());
  TORCH_CHECK(out.device() == x.device(), "im2col_gram: out and x must be on one device");
}

void gram_conv(const at::Tensor& x4, const ConvDim& gh, const ConvDim& gw, int64_t groups, bool bias, at::Tensor& out) {
  TORCH_CHECK(x4.dim() == 4, "im2col_gram: internal: expected a 4-d input");
  TORCH_CHECK(groups >= 1 && x4.size(1) % groups == 0, "im2col_gram: channels ", x4.size(1),
              " not divisible by groups ", groups);
  for (const ConvDim* g : {&gh, &gw})
    TORCH_CHECK(g->k >= 1 && g->s >= 1 && g->p >= 0 && g->d >= 1 && g->out() >= 1,
                "im2col_gram: kernel/stride/padding/dilation give an empty output or are invalid");
  const int64_t k2 = gh.k * gw.k, positions = gh.out() * gw.out();
  check_out(x4, out, groups, x4.size(1) / groups * k2 + (bias ? 1 : 0));
  TORCH_CHECK(x4.is_floating_point(), "im2col_gram: x must be a floating-point tensor");
  const bool depthwise = x4.size(1) == groups && groups >= kDwMinGroups;
  if (use_gemm(!depthwise && x4.size(1) / groups <= kGemmMaxChannels && out.size(1) <= kGemmMaxDim)) {
    if (x4.size(0) == 0 || x4.size(1) == 0) {
      out.zero_();
      if (bias) out.select(1, out.size(1) - 1).select(1, out.size(1) - 1).fill_(double(x4.size(0) * positions));
    } else {
      kernels().gram_im2col_gemm(x4, gh, gw, groups, bias, out);
    }
  } else {
    kernels().gram_correlation(x4, gh, gw, groups, bias, out);
  }
}

void im2col_gram_out(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                     at::IntArrayRef dilation, int64_t groups, bool bias, at::Tensor& out) {
  const int64_t nd = x.dim() - 2;
  TORCH_CHECK(nd == 1 || nd == 2, "im2col_gram: x must be 3-d or 4-d, got ", x.dim(), "-d");
  TORCH_CHECK(int64_t(kernel_size.size()) == nd && int64_t(stride.size()) == nd && int64_t(padding.size()) == nd &&
                  int64_t(dilation.size()) == nd,
              "im2col_gram: kernel_size/stride/padding/dilation must have one entry per spatial dim");
  if (nd == 1) {
    gram_conv(x.unsqueeze(2), ConvDim{1, 1, 1, 0, 1}, ConvDim{x.size(2), kernel_size[0], stride[0], padding[0], dilation[0]},
              groups, bias, out);
  } else {
    gram_conv(x, ConvDim{x.size(2), kernel_size[0], stride[0], padding[0], dilation[0]},
              ConvDim{x.size(3), kernel_size[1], stride[1], padding[1], dilation[1]}, groups, bias, out);
  }
}

// Linear inputs with D <= 64: the rows are already the unfolded matrix, so GEMMs (x_cᵀ x_c per chunk of
// kGramGemmK rows, summed in double when there are several) beats the correlation kernel's setup; above
// that the kernel wins (crossover measured in docs/kernel_choices.md).
constexpr int64_t kLinearGemmMaxDim = 64;

template <typename T>
void linear_mm(const at::Tensor& rows, bool bias, at::Tensor& out) {
  const int64_t m = rows.size(0), f = rows.size(1), dim = f + (bias ? 1 : 0);
  const auto opts = rows.options().dtype(c10::CppTypeToScalarType<T>::value);
  // U = [x_c, 1] in the compute type: its Gram holds x_cᵀx_c, the column sums and the count
  auto pack = [&](const at::Tensor& c) {
    if (!bias) return c.to(opts);  // no copy when x is already T
    at::Tensor u = at::empty({c.size(0), dim}, opts);
    u.narrow(1, 0, f).copy_(c);
    u.select(1, f).fill_(1);
    return u;
  };
  at::Tensor a = out.select(0, 0);
  if (m <= kGramGemmK) {  // one GEMM straight into A (few ATen calls: at these sizes each call's overhead counts)
    at::Tensor u = pack(rows);
    at::mm_out(a, u.t(), u);
    return;
  }
  // chunks of kGramGemmK rows (accuracy, see kGramGemmK; bounded 16-bit conversions), summed in double
  at::Tensor acc = at::zeros({dim, dim}, opts.dtype(at::kDouble));
  for (int64_t r0 = 0; r0 < m; r0 += kGramGemmK) {
    at::Tensor u = pack(rows.narrow(0, r0, std::min(kGramGemmK, m - r0)));
    acc.add_(at::mm(u.t(), u));
  }
  a.copy_(acc);
}

void linear_gram_out(const at::Tensor& x, bool bias, at::Tensor& out) {
  TORCH_CHECK(x.dim() >= 1, "linear_gram: x must have at least 1 dim");
  const int64_t f = x.size(-1), dim = f + (bias ? 1 : 0);
  int64_t m = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) m *= x.size(d);
  at::Tensor rows = x.reshape({m, f});  // a view when the leading dims collapse
  if (f > 0 && m > 0 && use_gemm(dim <= kLinearGemmMaxDim)) {
    TORCH_CHECK(x.is_floating_point(), "linear_gram: x must be a floating-point tensor");
    check_out(x, out, 1, dim);
    if (x.scalar_type() == at::kDouble) {
      linear_mm<double>(rows, bias, out);
    } else {
      linear_mm<float>(rows, bias, out);
    }
    return;
  }
  gram_conv(rows.unsqueeze(2).unsqueeze(3), ConvDim{1, 1, 1, 0, 1}, ConvDim{1, 1, 1, 0, 1}, 1, bias, out);
}

// Chooses the Gram path for tests and benchmarks: -1 correlation kernels only, 0 automatic (the default),
// 1 the GEMM paths always (conv: packed im2col chunks; Linear: the rows). Returns the previous setting.
int64_t set_gram_path(int64_t mode) {
  TORCH_CHECK(mode >= -1 && mode <= 1, "set_gram_path: mode must be -1, 0 or 1, got ", mode);
  return gemm_path.exchange(mode);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(avg_kernels_C, m) {
  m.def("set_gram_path(int mode) -> int", &set_gram_path);
  m.def("im2col_gram_out(Tensor x, int[] kernel_size, int[] stride, int[] padding, int[] dilation, int groups, "
        "bool bias, Tensor(a!) out) -> ()");
  m.def("linear_gram_out(Tensor x, bool bias, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(avg_kernels_C, CPU, m) {
  m.impl("im2col_gram_out", &im2col_gram_out);
  m.impl("linear_gram_out", &linear_gram_out);
}

}  // namespace avg_kernels::cpu
