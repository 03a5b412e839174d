// The ridge solve of SPEC §3, P = G (A + lam I)^{-1}: the driver shared by the CPU and CUDA backends
// (csrc/ridge_driver.h) and the CPU kernels of its prologue and epilogue.
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
//      writes X column-major). Entries whose Cholesky failed are redone through at::linalg_eigh
//      (only those entries), the epilogue kernel scaling G V by 1 / (max(w, 0) + lam);
//      lam = 0: at::linalg_eigh of every entry, the epilogue applying pinv's cutoff.
//   5. The Gram check (an eigenvalue below -1e-3 ||S||_2 raises): entries that went through eigh are
//      checked exactly. An entry whose Cholesky of S + lam I succeeded has min eig(S) > -lam, which
//      settles it when lam <= 1e-3 max|S_ii| <= 1e-3 ||S||_2; otherwise (lam large against A) a second
//      Cholesky of S + 1e-3 max|S_ii| I on those entries certifies it, and eigvalsh decides if that fails.
//      Steps 4-5 sync again only when an entry needs a fallback or a certificate.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include <avg_kernels/half_bits.h>
#include <avg_kernels/ridge.h>

#include "../ridge_driver.h"

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
  if (lam > 0 && k.small_solve != nullptr && D <= k.small_max_d) {
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
    // temporaries (on CPU their first-touch page faults cost about as much as the factorisation itself:
    // measured 76 ms to clone 64 x 576 x 576 floats here). The prologue writes S + lam I row-major; S is
    // symmetric, so the same bytes read column-major are the matrix LAPACK factorises.
    P = at::empty({nb, C, D}, copt);
    // status[b] = 0 ok, 1 non-finite, 2 Cholesky failed; maxdiag[b] = max |A_ii|. Entries run in
    // parallel, each task with its own buffer (LAPACK then runs single-threaded per matrix).
    std::vector<int8_t> status(size_t(nb), 0);
    std::vector<double> maxdiag(size_t(nb), 0.0);
    at::parallel_for(0, nb, 1, [&](int64_t begin, int64_t end) {
      at::Tensor buf = at::empty({1, D, D}, copt);
      at::Tensor Lc = buf.select(0, 0).mT();  // column-major (Fortran) view
      at::Tensor info = at::empty({}, A.options().dtype(at::kInt));
      at::Tensor stats = at::zeros({1, 2}, copt);
      for (int64_t b = begin; b < end; ++b) {
        k.prologue(A3.narrow(0, b, 1), lam, buf, stats);
        const auto st = stats.to(at::kCPU, at::kDouble);  // a no-op copy for CPU tensors
        const double* sp = st.const_data_ptr<double>();
        maxdiag[b] = sp[1];
        if (sp[0] != 0) {
          status[b] = 1;
          continue;
        }
        at::linalg_cholesky_ex_out(Lc, info, Lc, /*upper=*/false, /*check_errors=*/false);
        if (info.item<int32_t>() != 0) {
          status[b] = 2;
          continue;
        }
        at::Tensor out_b = P.select(0, b).mT();  // (D, C) column-major: where cholesky_solve writes
        at::cholesky_solve_out(out_b, G3.select(0, b).mT(), Lc, /*upper=*/false);
      }
    });
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

namespace cpu {
namespace {

// Loads in the compute type. 16-bit values go through the shared bit conversions: c10::Half's
// operator float inlines an AVX-512 intrinsic that GCC 12 flags as maybe-uninitialized.
template <class C, class T> inline C load(T v) { return C(v); }
template <class C> inline C load(c10::Half v) { return C(half_bits_to_float(v.x)); }
template <class C> inline C load(c10::BFloat16 v) { return C(bf16_bits_to_float(v.x)); }

// ------------------------------------------------------------------------------------------------
// CPU prologue: rows are processed in tiles of kTile so that the transposed reads A[j, i..i+kTile)
// hit cache lines shared by the tile's rows; each task (entry, row tile) keeps its own flags, reduced
// serially at the end (no atomics).

constexpr int64_t kTile = 16;

template <class in_t, class C>
void prologue_impl(const at::Tensor& A3, C lam, at::Tensor& Bm, at::Tensor& stats) {
  const int64_t nb = A3.size(0), D = A3.size(1);
  const int64_t sb = A3.stride(0), si = A3.stride(1), sj = A3.stride(2);
  const in_t* a = A3.const_data_ptr<in_t>();
  C* out = Bm.mutable_data_ptr<C>();
  const int64_t nt = (D + kTile - 1) / kTile;
  std::vector<C> part(size_t(nb * nt * 2), C(0));
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, kTile * D));
  at::parallel_for(0, nb * nt, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nt, i0 = (task % nt) * kTile, i1 = std::min(D, i0 + kTile);
      const in_t* ab = a + b * sb;
      C* ob = out + b * D * D;
      bool bad = false;
      C maxdiag = C(0);
      for (int64_t i = i0; i < i1; ++i) {
        const in_t* row = ab + i * si;  // A[i, :]
        const in_t* col = ab + i * sj;  // A[:, i]
        C* orow = ob + i * D;
        for (int64_t j = 0; j < D; ++j) {
          const C aij = load<C>(row[j * sj]), aji = load<C>(col[j * si]);
          bad |= !ridge::is_finite(aij);
          orow[j] = ridge::sym_entry(aij, aji);
        }
        const C aii = load<C>(row[i * sj]);
        maxdiag = std::max(maxdiag, ridge::abs_value(aii));
        orow[i] += lam;
      }
      part[2 * task] = bad ? C(1) : C(0);
      part[2 * task + 1] = maxdiag;
    }
  });
  C* st = stats.mutable_data_ptr<C>();
  for (int64_t b = 0; b < nb; ++b) {
    C bad = 0, md = 0;
    for (int64_t t = 0; t < nt; ++t) {
      bad = std::max(bad, part[2 * (b * nt + t)]);
      const C m = part[2 * (b * nt + t) + 1];
      md = (m > md || m != m) ? m : md;
    }
    st[2 * b] = bad;
    st[2 * b + 1] = md;
  }
}

void prologue_cpu(const at::Tensor& A3, double lam, at::Tensor& Bm, at::Tensor& stats) {
  TORCH_CHECK(A3.device().is_cpu() && Bm.is_contiguous() && stats.is_contiguous(), "ridge prologue (cpu): bad args");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A3.scalar_type(), "ridge_prologue_cpu", [&] {
    if (Bm.scalar_type() == at::kDouble) {
      prologue_impl<scalar_t, double>(A3, lam, Bm, stats);
    } else {
      prologue_impl<scalar_t, float>(A3, float(lam), Bm, stats);
    }
  });
}

template <class C>
void scale_impl(at::Tensor& Y, const at::Tensor& w, C lam, C rtol) {
  const int64_t nb = Y.size(0), rows = Y.size(1), D = Y.size(2);
  C* y = Y.mutable_data_ptr<C>();
  const C* wp = w.const_data_ptr<C>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, rows * D));  // no thread wake-up for tiny work
  at::parallel_for(0, nb, grain, [&](int64_t begin, int64_t end) {
    std::vector<C> r(static_cast<size_t>(D));
    for (int64_t b = begin; b < end; ++b) {
      const C* wb = wp + b * D;
      const C cut = ridge::eig_cutoff(wb[0], wb[D - 1], rtol);
      for (int64_t j = 0; j < D; ++j) r[j] = ridge::inverse_factor(wb[j], lam, cut);
      C* yb = y + b * rows * D;
      for (int64_t c = 0; c < rows; ++c)
        for (int64_t j = 0; j < D; ++j) yb[c * D + j] *= r[j];
    }
  });
}

void scale_cpu(at::Tensor& Y, const at::Tensor& w, double lam, double rtol) {
  TORCH_CHECK(Y.device().is_cpu() && Y.is_contiguous() && w.is_contiguous() && Y.scalar_type() == w.scalar_type(),
              "ridge scale (cpu): bad args");
  if (Y.scalar_type() == at::kDouble) {
    scale_impl<double>(Y, w, lam, rtol);
  } else {
    scale_impl<float>(Y, w, float(lam), float(rtol));
  }
}


// ------------------------------------------------------------------------------------------------
// Fused small systems (D <= kSmallD): per batch entry, in a per-task buffer: prologue, Cholesky of
// S + lam I, the Gram certificate, forward and back substitution for every row of G, one task per entry.
// Measured on this machine's CPU (MKL LAPACK, 1 thread, fused vs prologue + cholesky_ex + cholesky_solve):
// D = 16: 10 vs 31 us (1 entry), 92 vs 302 us (64); D = 73: 78 vs 196 us (1), 5.0 vs 13.8 ms (64);
// D = 256: about even for one entry, 59 vs 99 ms for 64; at D = 576 LAPACK's blocked factorisation wins.

constexpr int64_t kSmallD = 256;

// Right-looking Cholesky S = U^T U in place on the upper triangle of a row-major D x D array: every
// inner loop is an axpy over a contiguous row (vectorised by the compiler). false: not positive definite.
template <class C>
bool cholesky_upper_inplace(C* __restrict U, int64_t D) {
  for (int64_t j = 0; j < D; ++j) {
    C* __restrict uj = U + j * D;
    if (!(uj[j] > C(0))) return false;
    const C d = std::sqrt(uj[j]);
    const C r = C(1) / d;  // scale by the reciprocal, as LAPACK's potf2 does
    uj[j] = d;
    for (int64_t k = j + 1; k < D; ++k) uj[k] *= r;
    for (int64_t i = j + 1; i < D; ++i) {
      C* __restrict ui = U + i * D;
      const C f = uj[i];
      for (int64_t k = i; k < D; ++k) ui[k] -= f * uj[k];
    }
  }
  return true;
}

template <class in_t, class C>
void small_impl(const at::Tensor& G3, const at::Tensor& A3, C lam, at::Tensor& P, at::Tensor& status) {
  const int64_t nb = A3.size(0), D = A3.size(1), rows = G3.size(1);
  const int64_t sb = A3.stride(0), si = A3.stride(1), sj = A3.stride(2);
  const int64_t gb = G3.stride(0), gi = G3.stride(1), gj = G3.stride(2);
  const in_t* a = A3.const_data_ptr<in_t>();
  const C* g = G3.const_data_ptr<C>();
  C* p = P.mutable_data_ptr<C>();
  C* st = status.mutable_data_ptr<C>();
  // Parallel only when a chunk holds enough work (~0.2 MFLOP) to pay for waking the thread pool.
  const int64_t grain = std::max<int64_t>(1, 200000 / (D * D * D / 3 + 2 * rows * D * D + D * D));
  at::parallel_for(0, nb, grain, [&](int64_t begin, int64_t end) {
    std::vector<C> buf(size_t(2 * D * D + D * rows));
    C* __restrict U = buf.data();  // S + lam I, then its factor (upper)
    C* __restrict T = U + D * D;   // S + tau I for the Gram certificate
    C* __restrict X = T + D * D;   // (D, rows): G^T, solved in place
    for (int64_t b = begin; b < end; ++b) {
      const in_t* ab = a + b * sb;
      C probe = C(0);  // stays 0 unless an entry is NaN or infinite (x * 0 is NaN then)
      C maxdiag = C(0);
      for (int64_t i = 0; i < D; ++i) {  // the upper triangle of S (all the factorisation reads)
        const in_t* row = ab + i * si;  // A[i, :]
        const in_t* col = ab + i * sj;  // A[:, i]
        C* __restrict ui = U + i * D;
        for (int64_t j = i; j < D; ++j) {
          const C aij = load<C>(row[j * sj]), aji = load<C>(col[j * si]);
          probe += aij * C(0) + aji * C(0);
          ui[j] = ridge::sym_entry(aij, aji);
        }
        maxdiag = std::max(maxdiag, ridge::abs_value(ui[i]));
      }
      if (!(probe == C(0))) {
        st[3 * b] = C(1);
        continue;
      }
      const C tau = C(kGramTol) * maxdiag;
      if (lam > tau) {  // certificate: S + tau I positive definite  =>  min eig(S) > -1e-3 ||S||_2
        std::copy(U, U + D * D, T);  // (the lower triangle is not read)
        for (int64_t i = 0; i < D; ++i) T[i * D + i] += tau;
        if (!cholesky_upper_inplace(T, D)) st[3 * b + 2] = C(1);
      }
      for (int64_t i = 0; i < D; ++i) U[i * D + i] += lam;
      if (!cholesky_upper_inplace(U, D)) {
        st[3 * b + 1] = C(1);
        continue;
      }
      // P^T = (U^T U)^{-1} G^T: all rows of G at once, X holds G^T (D x rows).
      const C* gb_ = g + b * gb;
      for (int64_t i = 0; i < D; ++i)
        for (int64_t c = 0; c < rows; ++c) X[i * rows + c] = gb_[c * gi + i * gj];
      for (int64_t i = 0; i < D; ++i) {  // U^T Y = G^T (forward, right-looking)
        C* __restrict xi = X + i * rows;
        const C r = C(1) / U[i * D + i];
        for (int64_t c = 0; c < rows; ++c) xi[c] *= r;
        for (int64_t k = i + 1; k < D; ++k) {
          C* __restrict xk = X + k * rows;
          const C f = U[i * D + k];
          for (int64_t c = 0; c < rows; ++c) xk[c] -= f * xi[c];
        }
      }
      for (int64_t i = D - 1; i >= 0; --i) {  // U X = Y (backward)
        C* __restrict xi = X + i * rows;
        const C r = C(1) / U[i * D + i];
        for (int64_t c = 0; c < rows; ++c) xi[c] *= r;
        for (int64_t k = 0; k < i; ++k) {
          C* __restrict xk = X + k * rows;
          const C f = U[k * D + i];
          for (int64_t c = 0; c < rows; ++c) xk[c] -= f * xi[c];
        }
      }
      C* pb = p + b * rows * D;
      for (int64_t c = 0; c < rows; ++c)
        for (int64_t i = 0; i < D; ++i) pb[c * D + i] = X[i * rows + c];
    }
  });
}

void small_solve_cpu(const at::Tensor& G3, const at::Tensor& A3, double lam, at::Tensor& P, at::Tensor& status) {
  TORCH_CHECK(A3.device().is_cpu() && A3.size(1) <= kSmallD && P.is_contiguous() && status.is_contiguous() &&
                  G3.scalar_type() == P.scalar_type(),
              "ridge small solve (cpu): bad args");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A3.scalar_type(), "ridge_small_solve_cpu", [&] {
    if (P.scalar_type() == at::kDouble) {
      small_impl<scalar_t, double>(G3, A3, lam, P, status);
    } else {
      small_impl<scalar_t, float>(G3, A3, float(lam), P, status);
    }
  });
}

const RidgeKernels kCpuKernels{&prologue_cpu, &scale_cpu, &small_solve_cpu, kSmallD, /*per_entry_lapack=*/true};

at::Tensor ridge_solve_cpu(const at::Tensor& G, const at::Tensor& A, double lam) {
  return ridge_solve_driver(G, A, lam, kCpuKernels);
}

// The driver without the fused small-system path (prologue + LAPACK at every D), for tests.
at::Tensor ridge_solve_unfused_cpu(const at::Tensor& G, const at::Tensor& A, double lam) {
  return ridge_solve_driver(G, A, lam, RidgeKernels{&prologue_cpu, &scale_cpu});
}

// The kernels alone, for tests: (Bm, stats) of the prologue and the scaled Y of the epilogue.
std::tuple<at::Tensor, at::Tensor> ridge_prologue_test(const at::Tensor& A3, double lam, at::ScalarType ct) {
  at::Tensor Bm = at::empty({A3.size(0), A3.size(1), A3.size(2)}, A3.options().dtype(ct));
  at::Tensor stats = at::zeros({A3.size(0), 2}, A3.options().dtype(ct));
  prologue_cpu(A3, lam, Bm, stats);
  return {Bm, stats};
}

at::Tensor ridge_scale_test(const at::Tensor& Y, const at::Tensor& w, double lam, double rtol) {
  at::Tensor out = Y.contiguous().clone();
  scale_cpu(out, w.contiguous(), lam, rtol);
  return out;
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_FRAGMENT(avg_kernels_C, m) {
  m.def("ridge_solve(Tensor G, Tensor A, float lam) -> Tensor");
  m.def("ridge_solve_unfused(Tensor G, Tensor A, float lam) -> Tensor");
  m.def("ridge_prologue(Tensor A, float lam, ScalarType compute_dtype) -> (Tensor, Tensor)");
  m.def("ridge_scale(Tensor Y, Tensor w, float lam, float rtol) -> Tensor");
}

TORCH_LIBRARY_IMPL(avg_kernels_C, CPU, m) {
  m.impl("ridge_solve", &cpu::ridge_solve_cpu);
  m.impl("ridge_solve_unfused", &cpu::ridge_solve_unfused_cpu);
  m.impl("ridge_prologue", &cpu::ridge_prologue_test);
  m.impl("ridge_scale", &cpu::ridge_scale_test);
}

}  // namespace avg_kernels
