// CPU kernels of the ridge solve (SPEC §3), one capability level (see level.h): the prologue, the
// eigendecomposition epilogue and the fused small-system solve that csrc/ridge_driver.h describes.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include <avg_kernels/half_bits.h>
#include <avg_kernels/ridge.h>

#include "level.h"

namespace avg_kernels::cpu::CPU_CAPABILITY {
namespace {

using ridge::kGramTol;

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


// ------------------------------------------------------------------------------------------------
// Fused small systems (D <= kRidgeSmallMaxD): per batch entry, in a per-task buffer: prologue, Cholesky of
// S + lam I, the Gram certificate, forward and back substitution for every row of G, one task per entry.
// Fused beats prologue + cholesky_ex + cholesky_solve up to kRidgeSmallMaxD; above it LAPACK's blocked
// factorisation wins (measurements: docs/kernel_choices.md).


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


}  // namespace

void ridge_prologue(const at::Tensor& A3, double lam, at::Tensor& Bm, at::Tensor& stats) {
  TORCH_CHECK(A3.device().is_cpu() && Bm.is_contiguous() && stats.is_contiguous(), "ridge prologue (cpu): bad args");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A3.scalar_type(), "ridge_prologue_cpu", [&] {
    if (Bm.scalar_type() == at::kDouble) {
      prologue_impl<scalar_t, double>(A3, lam, Bm, stats);
    } else {
      prologue_impl<scalar_t, float>(A3, float(lam), Bm, stats);
    }
  });
}

void ridge_scale(at::Tensor& Y, const at::Tensor& w, double lam, double rtol) {
  TORCH_CHECK(Y.device().is_cpu() && Y.is_contiguous() && w.is_contiguous() && Y.scalar_type() == w.scalar_type(),
              "ridge scale (cpu): bad args");
  if (Y.scalar_type() == at::kDouble) {
    scale_impl<double>(Y, w, lam, rtol);
  } else {
    scale_impl<float>(Y, w, float(lam), float(rtol));
  }
}

void ridge_small_solve(const at::Tensor& G3, const at::Tensor& A3, double lam, at::Tensor& P, at::Tensor& status) {
  TORCH_CHECK(A3.device().is_cpu() && A3.size(1) <= kRidgeSmallMaxD && P.is_contiguous() && status.is_contiguous() &&
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

}  // namespace avg_kernels::cpu::CPU_CAPABILITY
