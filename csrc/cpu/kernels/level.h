// Declarations of one capability level's kernels (csrc/cpu/kernels/*.cpp), in the namespace
// avg_kernels::cpu::<CPU_CAPABILITY> (DEFAULT, AVX2 or AVX512: setup.py compiles each source once per
// level with -DCPU_CAPABILITY=<level>, as ATen does). table.cpp gathers them into the level's Kernels.
#pragma once

#include "../kernels.h"

#ifndef CPU_CAPABILITY
#error "csrc/cpu/kernels/ are compiled once per capability level: setup.py defines CPU_CAPABILITY"
#endif

namespace avg_kernels::cpu::CPU_CAPABILITY {

void avg_act_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& x_new, at::Tensor& out,
                      int64_t act, double p0, double p1, double eps);
void act_value(const at::Tensor& x, at::Tensor& out, int64_t act, double p0, double p1);

void ag1_update(const ag::FlatEntry<3>* entries, int64_t n, bool into_new);
void ag2_norms(const ag::FlatEntry<3>* entries, int64_t n, double* n_step, double* n_delta);
void ag2_scale(const ag::FlatEntry<3>* entries, int64_t n, ag2::Factors scale);

void gram_correlation(const at::Tensor& x4, const gram::ConvDim& gh, const gram::ConvDim& gw, int64_t groups, bool bias,
                      at::Tensor& out);
void gram_im2col_gemm(const at::Tensor& x4, const gram::ConvDim& gh, const gram::ConvDim& gw, int64_t groups, bool bias,
                      at::Tensor& out);

void ridge_prologue(const at::Tensor& A3, double lam, at::Tensor& Bm, at::Tensor& stats);
void ridge_scale(at::Tensor& Y, const at::Tensor& w, double lam, double rtol);
void ridge_small_solve(const at::Tensor& G3, const at::Tensor& A3, double lam, at::Tensor& P, at::Tensor& status);
// The fused small-system path covers D <= kRidgeSmallMaxD (beyond it LAPACK's blocked factorisation wins).
constexpr int64_t kRidgeSmallMaxD = 256;

void vec_math(const at::Tensor& x, at::Tensor& out, int64_t fn);

}  // namespace avg_kernels::cpu::CPU_CAPABILITY
