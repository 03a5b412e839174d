// Torch-facing helpers shared by the CUDA launcher of the Gram kernel (gram.cu) and its host
// emulation (csrc/cpu/gram_cuda_emulation.cpp): the conv shape from the op's arguments, the
// kernel arguments, the dtype dispatch. The kernel itself is gram_kernel.cuh (torch-free).
#pragma once

#include <ATen/ATen.h>

#include "gram_kernel.cuh"

namespace avg_kernels::cuda_gram {

struct ConvShape {
  at::Tensor x4;  // (N, C, H, W) view of the input (a Conv1d input gets H = 1)
  int64_t kh = 1, kw = 1, sh = 1, sw = 1, ph = 0, pw = 0, dh = 1, dw = 1;
  int64_t groups = 1, cg = 0, oh = 0, ow = 0, d_in = 0, d = 0, m = 0;
  bool bias = false;
};

inline ConvShape conv_shape(const at::Tensor& x, at::IntArrayRef ks, at::IntArrayRef st, at::IntArrayRef pd,
                            at::IntArrayRef dl, int64_t groups, bool bias) {
  const int64_t nd = x.dim() - 2;
  TORCH_CHECK(nd == 1 || nd == 2, "im2col_gram: x must be 3-d or 4-d, got ", x.dim(), "-d");
  TORCH_CHECK(int64_t(ks.size()) == nd && int64_t(st.size()) == nd && int64_t(pd.size()) == nd &&
                  int64_t(dl.size()) == nd,
              "im2col_gram: kernel_size/stride/padding/dilation must have one entry per spatial dim");
  ConvShape s;
  s.x4 = nd == 1 ? x.unsqueeze(2) : x;
  if (nd == 2) {
    s.kh = ks[0], s.sh = st[0], s.ph = pd[0], s.dh = dl[0];
  }
  s.kw = ks[nd - 1], s.sw = st[nd - 1], s.pw = pd[nd - 1], s.dw = dl[nd - 1];
  TORCH_CHECK(s.kh >= 1 && s.kw >= 1 && s.sh >= 1 && s.sw >= 1 && s.ph >= 0 && s.pw >= 0 && s.dh >= 1 && s.dw >= 1,
              "im2col_gram: invalid kernel_size/stride/padding/dilation");
  TORCH_CHECK(groups >= 1 && s.x4.size(1) % groups == 0, "im2col_gram: channels ", s.x4.size(1),
              " not divisible by groups ", groups);
  s.groups = groups;
  s.bias = bias;
  s.cg = s.x4.size(1) / groups;
  s.oh = (s.x4.size(2) + 2 * s.ph - s.dh * (s.kh - 1) - 1) / s.sh + 1;
  s.ow = (s.x4.size(3) + 2 * s.pw - s.dw * (s.kw - 1) - 1) / s.sw + 1;
  TORCH_CHECK(s.oh >= 1 && s.ow >= 1, "im2col_gram: kernel/stride/padding/dilation give an empty output");
  TORCH_CHECK(s.kh * s.kw < (int64_t(1) << 31) && s.ph < (int64_t(1) << 30) && s.pw < (int64_t(1) << 30) &&
                  s.dh * s.kh < (int64_t(1) << 30) && s.dw * s.kw < (int64_t(1) << 30),
              "im2col_gram: kernel/padding/dilation too large for the CUDA kernel's 32-bit offsets");
  s.d_in = s.cg * s.kh * s.kw;
  s.d = s.d_in + (bias ? 1 : 0);
  s.m = s.x4.size(0) * s.oh * s.ow;
  return s;
}

inline void check_out(const ConvShape& s, const at::Tensor& x, const at::Tensor& out) {
  const auto want = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(out.scalar_type() == want, "im2col_gram: out must be ", want, ", got ", out.scalar_type());
  TORCH_CHECK(out.is_contiguous() && out.dim() == 3 && out.size(0) == s.groups && out.size(1) == s.d &&
                  out.size(2) == s.d,
              "im2col_gram: out must be a contiguous (", s.groups, ", ", s.d, ", ", s.d, ") tensor, got ", out.sizes());
  TORCH_CHECK(out.device() == x.device(), "im2col_gram: out and x must be on one device");
}

template <class In, class Acc>
GramArgs<In, Acc> make_args(const ConvShape& s, Acc* ws, const GramLaunch& l) {
  GramArgs<In, Acc> a{};
  a.x = reinterpret_cast<const In*>(s.x4.const_data_ptr());
  a.out = ws;
  a.sn = s.x4.stride(0), a.sc = s.x4.stride(1), a.sh = s.x4.stride(2), a.sw = s.x4.stride(3);
  a.cg = s.cg, a.h = s.x4.size(2), a.w = s.x4.size(3), a.oh = s.oh, a.ow = s.ow;
  a.kw = int32_t(s.kw), a.stride_h = int32_t(s.sh), a.stride_w = int32_t(s.sw);
  a.pad_h = int32_t(s.ph), a.pad_w = int32_t(s.pw), a.dil_h = int32_t(s.dh), a.dil_w = int32_t(s.dw);
  a.k2 = int32_t(s.kh * s.kw);
  a.d_in = s.d_in, a.d = s.d, a.m = s.m, a.steps = l.steps, a.groups = s.groups;
  a.n_tiles = (s.d + kTile - 1) / kTile;
  a.bias = s.bias;
  return a;
}

// f(In{}, Acc{}) for the input dtype: the storage type In (c10::Half/BFloat16 convert to float on
// host and device) and the accumulation type Acc.
template <class F>
void dispatch_gram_types(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: return f(float{}, float{});
    case at::kDouble: return f(double{}, double{});
    case at::kHalf: return f(c10::Half{}, float{});
    case at::kBFloat16: return f(c10::BFloat16{}, float{});
    default: TORCH_CHECK(false, "im2col_gram: unsupported dtype ", t);
  }
}

// Linear input (…, F) as the Conv1d input (M, F, 1).
inline at::Tensor linear_as_conv(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1, "linear_gram: x must have at least 1 dim");
  int64_t m = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) m *= x.size(d);
  return x.reshape({m, x.size(-1)}).unsqueeze(2);
}

}  // namespace avg_kernels::cuda_gram
