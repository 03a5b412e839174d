// The ridge solve of SPEC §3, P = G (A + lam I)^{-1}: the driver shared by the CPU and CUDA backends
// (csrc/ridge_driver.h). It only calls ATen and the backend's RidgeKernels, so it drives CUDA tensors
// too; compiled once (default level). The CPU kernels are csrc/cpu/kernels/ridge.cpp, the CUDA ones
// csrc/cuda/ridge_kernel.cuh.
//
// Internal op avg_kernels_C::ridge_solve(G, A, lam); the public op avg_kernels::ridge_solve
// (avg_kernels/ops/ridge.py) validates shapes, dtypes, devices and lam first.
//
// What the driver does, per call (nb batch entries of D x D):
//   1. prologue kernel (one pass over A): Bm = sym(A) + lam I in the compute dtype, and per entry a
//      non-finite flag and max |A_ii|;
//   2. lam > 0: at::linalg_cholesky_ex(Bm) for the whole batch (info per entry, no exception);
//   3. ONE device-to-host copy of (flags, max |A_ii|, info): non-finite entries raise here;
//   4. lam > 0: at::cholesky_solve for the whole batch; P = X^T is contiguous as it comes out (LAPACK
//      writes X column-major). (CPU: per entry, by two triangular solves from the right, or by the explicit
//      inverse + one GEMM where C is large enough against D for that to be cheaper: solve_by_inverse.) Entries whose Cholesky failed are redone through at::linalg_eigh
//      (only those entries), the epilogue kernel scaling G V by 1 / (max(w, 0) + lam);
//      lam = 0: at::linalg_eigh of every entry, the epilogue applying pinv's cutoff.
//   5. The Gram check (an eigenvalue below -1e-3 ||S||_2 raises): entries that went through eigh are
//      checked exactly. An entry whose Cholesky of S + lam I succeeded has min eig(S) > -lam, which
//      settles it when lam <= 1e-3 max|S_ii| <= 1e-3 ||S||_2; otherwise (lam large against A) a second
//      Cholesky of S + 1e-3 max|S_ii| I on those entries certifies it, and eigvalsh decides if that fails.
//      Steps 4-5 sync again only when an entry needs a fallback or a certificate.
#include <ATen/ATen.h>
#include <ATen/Config.h>
#include <ATen/Parallel.h>
#if AT_BUILD_WITH_LAPACK()
#include <ATen/native/BatchLinearAlgebra.h>  // at::native::lapackCholesky
#endif

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include <avg_kernels/ridge.h>

#include "ridge_driver.h"

namespace avg_kernels {
namespace {

using ridge::kGramTol;

// ------------------------------------------------------------------------------------------------
// Messages, the same text as avg_kernels/reference/ridge.py.

std::string batch_name(int64_t index, at::IntArrayRef batch_shape) {
  if (batch_shape.empty()) return "A";
  std::vector<int64_t> multi(batch_shape.size());
  int64_t rest = index;
  for (int64_t d = int64_t(batch_shape.size()) - 1; d >= 0; --d) {
    multi[d] = rest % batch_shape[d];
    rest /= batch_shape[d];
  }
  std::string idx, shape;
  for (size_t d = 0; d < multi.size(); ++d) {
    idx += (d ? ", " : "") + std::to_string(multi[d]);
    shape += (d ? ", " : "") + std::to_string(batch_shape[d]);
  }
  if (batch_shape.size() == 1) shape += ",";
  return "A[" + idx + "] (batch index " + std::to_string(index) + " of batch shape (" + shape + "))";
}

std::string fmt_g(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.6g", v);
  return buf;
}

struct GramViolation {
  int64_t index;
  double w_min, norm;
};

// The first entry (lowest batch index) of `indices` whose eigenvalues `w` (rows, ascending) show it is
// clearly not a Gram matrix.
std::optional<GramViolation> gram_violation(const at::Tensor& w, const std::vector<int64_t>& indices) {
  if (indices.empty()) return std::nullopt;
  const auto first = w.select(-1, 0), last = w.select(-1, w.size(-1) - 1);
  const auto host = at::stack({first, at::maximum(first.abs(), last.abs())}).to(at::kCPU, at::kDouble).contiguous();
  const double* h = host.const_data_ptr<double>();
  const int64_t n = int64_t(indices.size());
  std::optional<GramViolation> out;
  for (int64_t k = 0; k < n; ++k) {
    const double w_min = h[k], norm = h[n + k];
    if (w_min < -kGramTol * norm && (!out || indices[k] < out->index)) out = GramViolation{indices[k], w_min, norm};
  }
  return out;
}

at::Tensor index_tensor(const std::vector<int64_t>& v, const at::Device& device) {
  return at::tensor(v, at::TensorOptions().dtype(at::kLong)).to(device);
}

// Per-entry CPU solves (RidgeKernels::per_entry_lapack): after the Cholesky factor L of S + lam I, P is
// either (a) two triangular solves (trsm) with the C rows of G as right-hand sides or
// (b) cholesky_inverse (potri: (S + lam I)^{-1} from L) and one GEMM, P = G (S + lam I)^{-1}. In flops:
//   (a) 2 C D^2 at the triangular-solve rate, (b) 2/3 D^3 at potri's rate + 2 C D^2 at the GEMM rate.
// Measured, 1 thread, MKL (AMD EPYC, AVX-512; docs/kernel_choices.md): potrs and the fused kernel's own
// substitutions 20-40 GFLOP/s, potri 15-40, GEMM 60-100; with the middle values below (b) wins when
// C > 2/3 D (measured break-even 0.5-0.8 D, higher at larger D). (a)'s two right-hand trsm on row-major
// rows run at 30-60 GFLOP/s, 0.6-0.75x potrs's time: the break-even is kept where it was (below it
// nothing got slower; the fused kernel's D <= 256 choices stay as measured). Below kInverseMinD the calls' fixed costs
// dominate and the fused small-system kernel stays. The choice depends on the shapes only, never on the
// thread count (SPEC §3: bitwise the same at every thread count).
constexpr double kTrsmGflops = 30, kPotriGflops = 30, kGemmGflops = 60;
constexpr int64_t kInverseMinD = 64;

// Cholesky in place of the D x D column-major CPU matrix Lc (lower triangle); LAPACK's info (0: success).
// LAPACK's potrf directly: at::linalg_cholesky_ex_out zeroes the upper triangle afterwards, and tril_ on this
// transposed view cost 2.6 ms next to the factorisation's 7 ms at D = 1024 (1 thread). cholesky_solve and
// cholesky_inverse read the lower triangle only (LAPACK uplo 'L'), so the upper one may keep S's values.
int32_t cholesky_lower_inplace(at::Tensor& Lc, at::Tensor& info) {
#if AT_BUILD_WITH_LAPACK()
  if (Lc.is_cpu() && Lc.stride(0) == 1 && Lc.stride(1) == Lc.size(0)) {
    const int n = int(Lc.size(0));
    int out = 0;
    if (Lc.scalar_type() == at::kDouble) {
      at::native::lapackCholesky<double>('L', n, Lc.data_ptr<double>(), n, &out);
    } else {
      at::native::lapackCholesky<float>('L', n, Lc.data_ptr<float>(), n, &out);
    }
    return out;
  }
#endif
  at::linalg_cholesky_ex_out(Lc, info, Lc, /*upper=*/false, /*check_errors=*/false);
  return info.item<int32_t>();
}

bool solve_by_inverse(int64_t C, int64_t D) {
  if (D < kInverseMinD) return false;
  const double c = double(C), d = double(D);
  const double potrs = 2 * c * d * d / kTrsmGflops;
  const double inverse = (2.0 / 3.0) * d * d * d / kPotriGflops + 2 * c * d * d / kGemmGflops;
  return inverse < potrs;
}

}  // namespace

at::Tensor ridge_solve_driver(const at::Tensor& G, const at::Tensor& A, double lam, const RidgeKernels& k) {
  TORCH_CHECK(G.dim() >= 2 && A.dim() >= 2, "ridge_solve: G and A must be at least 2-d");
  TORCH_CHECK(A.size(-1) == A.size(-2) && G.size(-1) == A.size(-1), "ridge_solve: A must be (..., D, D), G (..., C, D)");
  TORCH_CHECK(G.sizes().slice(0, G.dim() - 2) == A.sizes().slice(0, A.dim() - 2), "ridge_solve: batch shapes differ");
  TORCH_CHECK(G.device() == A.device(), "ridge_solve: G and A must be on one device");
  TORCH_CHECK(lam >= 0 && lam < std::numeric_limits<double>::infinity(), "ridge_solve: lam must be finite and >= 0");
  const auto batch_shape = A.sizes().slice(0, A.dim() - 2);
  const int64_t D = A.size(-1), C = G.size(-2);
  int64_t nb = 1;
  for (auto s : batch_shape) nb *= s;
  const auto ct = (G.scalar_type() == at::kDouble || A.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
  if (nb == 0 || D == 0 || C == 0) return at::zeros(G.sizes(), G.options());
  const auto dev = A.device();
  const auto copt = A.options().dtype(ct);
  const at::Tensor A3 = A.reshape({nb, D, D});
  const at::Tensor G3 = G.reshape({nb, C, D}).to(ct);

  at::Tensor Bm;  // S + lam I from the prologue (undefined on the fused small-system path)
  // S + shift I for the given entries (a copy), S = sym(A).
  auto sym_plus = [&](const std::vector<int64_t>& entries, double shift) {
    const auto idx = index_tensor(entries, dev);
    at::Tensor S;
    if (Bm.defined()) {
      S = Bm.index_select(0, idx);
      if (shift != lam) S.diagonal(0, -2, -1).add_(shift - lam);
    } else {
      const auto a = A3.index_select(0, idx).to(ct);
      S = a.mul(0.5).add_(a.mT(), 0.5);
      if (shift != 0) S.diagonal(0, -2, -1).add_(shift);
    }
    return S;
  };
  auto raise_nonfinite = [&](int64_t b) {
    TORCH_CHECK_VALUE(false, "ridge_solve: ", batch_name(b, batch_shape), " is not finite (it contains NaN or inf)");
  };

  at::Tensor P;
  std::vector<int64_t> failed, doubt;  // Cholesky failed / Gram certificate failed
  // CPU: the explicit inverse + one GEMM where it is cheaper (solve_by_inverse), for every D.
  const bool by_inverse = lam > 0 && k.per_entry_lapack && solve_by_inverse(C, D);
  if (lam > 0 && k.small_solve != nullptr && D <= k.small_max_d && !by_inverse) {
    // Fused small systems: prologue, factorisations and solves in one kernel.
    P = at::empty({nb, C, D}, copt);
    at::Tensor status = at::zeros({nb, 3}, copt);
    k.small_solve(G3, A3, lam, P, status);
    const auto host = status.to(at::kCPU, at::kDouble).contiguous();
    const double* h = host.const_data_ptr<double>();
    for (int64_t b = 0; b < nb; ++b)
      if (h[3 * b] != 0) raise_nonfinite(b);
    for (int64_t b = 0; b < nb; ++b) {
      if (h[3 * b + 1] != 0) failed.push_back(b);
      if (h[3 * b + 2] != 0) doubt.push_back(b);
    }
  } else if (lam > 0 && k.per_entry_lapack) {
    // One entry at a time through ONE reused D x D buffer, factorised in place by LAPACK: no nb x D x D
    // temporaries (on CPU their first-touch page faults cost about as much as the factorisation itself;
    // docs/kernel_choices.md). The prologue writes S + lam I row-major; S is
    // symmetric, so the same bytes read column-major are the matrix LAPACK factorises.
    P = at::empty({nb, C, D}, copt);
    // status[b] = 0 ok, 1 non-finite, 2 Cholesky failed; maxdiag[b] = max |A_ii|. The entries run one
    // after the other on this thread, never spread over threads: the result must be bitwise the same at
    // every thread count (SPEC §3), and LAPACK on a worker thread gave other bits than on this one
    // (D = 576, 2 threads: 7e-7 apart). The CPU op runs these calls single-threaded (csrc/cpu/ridge.cpp).
    std::vector<int8_t> status(size_t(nb), 0);
    std::vector<double> maxdiag(size_t(nb), 0.0);
    {
      at::Tensor buf = at::empty({1, D, D}, copt);
      at::Tensor Lc = buf.select(0, 0).mT();  // column-major (Fortran) view
      at::Tensor info = at::empty({}, A.options().dtype(at::kInt));
      at::Tensor stats = at::zeros({1, 2}, copt);
      at::Tensor inv = by_inverse ? at::empty({D, D}, copt) : at::Tensor();  // (S + lam I)^{-1}, symmetric
      for (int64_t b = 0; b < nb; ++b) {
        k.prologue(A3.narrow(0, b, 1), lam, buf, stats);
        const auto st = stats.to(at::kCPU, at::kDouble);  // a no-op copy for CPU tensors
        const double* sp = st.const_data_ptr<double>();
        maxdiag[b] = sp[1];
        if (sp[0] != 0) {
          status[b] = 1;
          continue;
        }
        if (cholesky_lower_inplace(Lc, info) != 0) {
          status[b] = 2;
          continue;
        }
        if (by_inverse) {
          at::cholesky_inverse_out(inv, Lc, /*upper=*/false);
          at::Tensor out_b = P.select(0, b);
          at::mm_out(out_b, G3.select(0, b), inv);  // MKL GEMM, single-threaded here like LAPACK
        } else {
          // P = (G L^-T) L^-1: two triangular solves from the right on the row-major C x D rows, written in
          // place (cholesky_solve copied G and L into column-major buffers first: 7.5 -> 5.3 ms at D = 1024,
          // C = 128, 1 thread). Each reads only its triangle of Lc (the upper one of Lc still holds S).
          at::Tensor out_b = P.select(0, b);
          at::linalg_solve_triangular_out(out_b, Lc.mT(), G3.select(0, b), /*upper=*/true, /*left=*/false);
          at::linalg_solve_triangular_out(out_b, Lc, out_b, /*upper=*/false, /*left=*/false);
        }
      }
    }
    std::vector<int64_t> nonfinite, cert;
    std::vector<double> cert_tau;
    for (int64_t b = 0; b < nb; ++b) {
      const double tau = kGramTol * maxdiag[b];
      if (status[b] == 1) {
        nonfinite.push_back(b);
      } else if (status[b] == 2) {
        failed.push_back(b);
      } else if (lam > tau) {
        cert.push_back(b);
        cert_tau.push_back(tau);
      }
    }
    if (!nonfinite.empty()) raise_nonfinite(nonfinite.front());
    if (!cert.empty()) {  // Gram certificates, as below
      auto S = sym_plus(cert, 0.0);
      S.diagonal(0, -2, -1).add_(at::tensor(cert_tau, at::TensorOptions().dtype(at::kDouble)).to(dev, ct).unsqueeze(-1));
      const auto info2 = std::get<1>(at::linalg_cholesky_ex(S, false, false)).to(at::kCPU);
      const int32_t* i2 = info2.const_data_ptr<int32_t>();
      for (size_t q = 0; q < cert.size(); ++q)
        if (i2[q] != 0) doubt.push_back(cert[q]);
    }
  } else {
    // 1. Prologue. 2-3. Batched Cholesky, then one copy of flags + info to the host.
    Bm = at::empty({nb, D, D}, copt);
    at::Tensor stats = at::zeros({nb, 2}, copt);
    k.prologue(A3, lam, Bm, stats);
    at::Tensor L, info, host;
    if (lam > 0) {
      std::tie(L, info) = at::linalg_cholesky_ex(Bm, /*upper=*/false, /*check_errors=*/false);
      host = at::cat({stats.reshape({-1}), info.to(ct)}).to(at::kCPU, at::kDouble).contiguous();
    } else {
      host = stats.reshape({-1}).to(at::kCPU, at::kDouble).contiguous();
    }
    const double* h = host.const_data_ptr<double>();
    for (int64_t b = 0; b < nb; ++b)
      if (h[2 * b] != 0) raise_nonfinite(b);
    if (lam > 0) {
      // 4. Solve every entry with its factor (entries whose Cholesky failed are overwritten below).
      P = at::cholesky_solve(G3.mT(), L, /*upper=*/false).mT();
      std::vector<int64_t> cert;
      std::vector<double> cert_shift;
      for (int64_t b = 0; b < nb; ++b) {
        const double tau = kGramTol * h[2 * b + 1];  // <= 1e-3 ||S||_2 for any symmetric S
        if (h[2 * nb + b] != 0) {
          failed.push_back(b);
        } else if (lam > tau) {
          cert.push_back(b);
          cert_shift.push_back(lam - tau);
        }
      }
      // 5. Gram certificates where lam is large against A: S + tau I must factorise too.
      if (!cert.empty()) {
        auto S = Bm.index_select(0, index_tensor(cert, dev));
        S.diagonal(0, -2, -1).sub_(at::tensor(cert_shift, at::TensorOptions().dtype(at::kDouble)).to(dev, ct).unsqueeze(-1));
        const auto info2 = std::get<1>(at::linalg_cholesky_ex(S, false, false)).to(at::kCPU);
        const int32_t* i2 = info2.const_data_ptr<int32_t>();
        for (size_t q = 0; q < cert.size(); ++q)
          if (i2[q] != 0) doubt.push_back(cert[q]);
      }
    }
  }

  std::optional<GramViolation> violation;
  auto note = [&](std::optional<GramViolation> v) {
    if (v && (!violation || v->index < violation->index)) violation = v;
  };
  if (!doubt.empty()) note(gram_violation(at::linalg_eigvalsh(sym_plus(doubt, 0.0)), doubt));
  if (lam > 0 && !failed.empty()) {
    // The eigendecomposition fallback, for the entries whose Cholesky failed only.
    auto [w, V] = at::linalg_eigh(sym_plus(failed, 0.0));
    note(gram_violation(w, failed));
    if (!violation) {
      const auto idx = index_tensor(failed, dev);
      at::Tensor Y = at::matmul(G3.index_select(0, idx), V).contiguous();
      k.scale(Y, w.contiguous(), lam, 0.0);
      P = P.contiguous();
      P.index_copy_(0, idx, at::matmul(Y, V.mT()));
    }
  }
  if (lam == 0) {
    // pinv(S) through eigh of every entry, with pinv's default cutoff at the compute precision.
    auto [w, V] = at::linalg_eigh(Bm);
    std::vector<int64_t> all(nb);
    for (int64_t b = 0; b < nb; ++b) all[b] = b;
    note(gram_violation(w, all));
    if (!violation) {
      const double rtol = double(D) * (ct == at::kDouble ? std::numeric_limits<double>::epsilon()
                                                         : double(std::numeric_limits<float>::epsilon()));
      at::Tensor Y = at::matmul(G3, V).contiguous();
      k.scale(Y, w.contiguous(), 0.0, rtol);
      P = at::matmul(Y, V.mT());
    }
  }
  if (violation) {
    TORCH_CHECK_VALUE(false, "ridge_solve: ", batch_name(violation->index, batch_shape),
                      " is not a Gram matrix: its smallest eigenvalue ", fmt_g(violation->w_min), " is below -",
                      fmt_g(kGramTol), "·‖A‖₂ = ", fmt_g(-kGramTol * violation->norm));
  }
  return P.to(G.scalar_type()).contiguous().reshape(G.sizes());
}

}  // namespace avg_kernels
