// The shifted-correlation plan of the conv input Gram (host code, no libtorch dependency).
//
// A[(c,i),(c',j)] = Σ_n Σ_{p} x[n, c, p·s + a_i] · x[n, c', p·s + a_j] over output positions p, where
// a_i = k_i·dilation − padding is kernel offset i (per spatial dim; x is zero outside the input).
// Per dim, write a_i = s·α_i + φ_i with phase φ_i ∈ [0, s): then x[p·s + a_i] = x_φi[p + α_i] where
// x_φ[r] = x[r·s + φ] is the phase-φ subsampled input. So the block (i, j) of A is a correlation of
// the phase images x_φi and x_φj at shift Δ = α_j − α_i, summed over the rectangle
//     R_ij = [α_i, α_i + out) ∩ T,    T = [0, |x_φi|) ∩ [−Δ, |x_φj| − Δ)   (per dim)
// All pairs with the same key (φ_i, φ_j, Δ) share one correlation and differ only by where their
// rectangles are cut. So per key we split T (per dim) at every cut of its pairs' R into "atoms";
// every R is a union of atoms, each atom's C×C product is computed once and added to each of its
// pairs. For a 3×3 stride-1 conv there are 25 keys (13 up to transposition) for 81 blocks, and the
// atoms other than the interior ones are one-row/one-column strips along the borders.
// Keys (φ_i, φ_j, Δ) and (φ_j, φ_i, −Δ) are transposes: only the lexicographically smaller one is
// computed (its blocks (i, j) are stored, the transposed blocks mirrored at the end).
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <map>
#include <stdexcept>
#include <tuple>
#include <vector>

namespace avg_kernels::gram {

struct ConvDim {  // one spatial dim of the conv
  int64_t in, k, s, p, d;
  int64_t out() const { return (in + 2 * p - d * (k - 1) - 1) / s + 1; }
};

struct Range {
  int64_t lo = 0, hi = 0;
  bool empty() const { return lo >= hi; }
  int64_t size() const { return empty() ? 0 : hi - lo; }
};

struct DimTable {  // per kernel index along one dim
  std::vector<int64_t> phase, alpha;
  std::vector<int64_t> phase_size;  // rows of x_φ, per φ ∈ [0, s)
  int64_t out;

  explicit DimTable(const ConvDim& g) : phase(g.k), alpha(g.k), phase_size(g.s), out(g.out()) {
    for (int64_t k = 0; k < g.k; ++k) {
      const int64_t a = k * g.d - g.p;
      phase[k] = ((a % g.s) + g.s) % g.s;
      alpha[k] = (a - phase[k]) / g.s;
    }
    for (int64_t f = 0; f < g.s; ++f) phase_size[f] = f < g.in ? (g.in - f + g.s - 1) / g.s : 0;
  }
  int64_t shift(int64_t ki, int64_t kj) const { return alpha[kj] - alpha[ki]; }
  // T: where x_φi[q] and x_φj[q + Δ] both exist.
  Range common(int64_t ki, int64_t kj) const {
    const int64_t dl = shift(ki, kj);
    return {std::max<int64_t>(0, -dl), std::min(phase_size[phase[ki]], phase_size[phase[kj]] - dl)};
  }
  // R_ij: the rows q (phase-i coordinates) that output positions of pair (ki, kj) touch.
  Range rect(int64_t ki, int64_t kj) const {
    const Range t = common(ki, kj);
    return {std::max(alpha[ki], t.lo), std::min(alpha[ki] + out, t.hi)};
  }
};

struct Atom {
  Range h, w;                  // phase-p coordinates
  std::vector<int32_t> pairs;  // indices into Key::pairs
};

struct Key {
  int32_t phase_p = 0, phase_q = 0;  // indices into Plan::phases
  int64_t dh = 0, dw = 0;            // shift of the q operand
  bool diag = false;                 // the key of the diagonal blocks (p == q): symmetric products
  std::vector<std::array<int32_t, 2>> pairs;  // (p, q) kernel-offset indices: block rows p, cols q
  std::vector<Atom> atoms;
};

struct Plan {
  int64_t kh = 1, kw = 1;  // kernel sizes (K2 = kh·kw offsets, index i = ih·kw + iw)
  std::vector<std::array<int64_t, 2>> phases;  // (φh, φw) of the phase buffers
  std::vector<int32_t> offset_phase;           // per offset: index into phases
  int64_t buf_h = 0, buf_w = 0;                // phase buffer extent (max over phases)
  std::vector<Key> keys;
  std::vector<std::array<Range, 2>> bias_rect;  // per offset: its (h, w) rectangle in its phase
  int64_t positions = 0;                        // ∏ out sizes (per sample)

  int64_t k2() const { return kh * kw; }
};

inline Plan make_plan(const ConvDim& gh, const ConvDim& gw) {
  Plan plan;
  const DimTable th(gh), tw(gw);
  plan.kh = gh.k;
  plan.kw = gw.k;
  plan.positions = th.out * tw.out;
  plan.buf_h = th.phase_size[0];
  plan.buf_w = tw.phase_size[0];
  const int64_t k2 = plan.k2();
  auto ih = [&](int64_t i) { return i / plan.kw; };
  auto iw = [&](int64_t i) { return i % plan.kw; };

  std::map<std::array<int64_t, 2>, int32_t> phase_index;
  plan.offset_phase.resize(k2);
  plan.bias_rect.resize(k2);
  for (int64_t i = 0; i < k2; ++i) {
    const std::array<int64_t, 2> ph{th.phase[ih(i)], tw.phase[iw(i)]};
    auto it = phase_index.find(ph);
    if (it == phase_index.end()) {
      it = phase_index.emplace(ph, static_cast<int32_t>(plan.phases.size())).first;
      plan.phases.push_back(ph);
    }
    plan.offset_phase[i] = it->second;
    plan.bias_rect[i] = {th.rect(ih(i), ih(i)), tw.rect(iw(i), iw(i))};
  }

  // Group the blocks (i <= j) by canonical key.
  using KeyTuple = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>;
  auto key_of = [&](int64_t p, int64_t q) {
    return KeyTuple{th.phase[ih(p)], tw.phase[iw(p)], th.phase[ih(q)], tw.phase[iw(q)],
                    th.shift(ih(p), ih(q)), tw.shift(iw(p), iw(q))};
  };
  std::map<KeyTuple, int32_t> key_index;
  for (int64_t i = 0; i < k2; ++i) {
    for (int64_t j = i; j < k2; ++j) {
      const KeyTuple kij = key_of(i, j), kji = key_of(j, i);
      const bool flip = kji < kij;
      const int32_t p = static_cast<int32_t>(flip ? j : i), q = static_cast<int32_t>(flip ? i : j);
      const KeyTuple kt = flip ? kji : kij;
      auto it = key_index.find(kt);
      if (it == key_index.end()) {
        it = key_index.emplace(kt, static_cast<int32_t>(plan.keys.size())).first;
        Key key;
        key.phase_p = plan.offset_phase[p];
        key.phase_q = plan.offset_phase[q];
        key.dh = std::get<4>(kt);
        key.dw = std::get<5>(kt);
        key.diag = (p == q);
        plan.keys.push_back(key);
      }
      plan.keys[it->second].pairs.push_back({p, q});
    }
  }

  // Atoms: cut each key's common rectangle at every edge of its pairs' rectangles.
  for (Key& key : plan.keys) {
    const size_t np = key.pairs.size();
    std::vector<Range> rh(np), rw(np);
    std::vector<int64_t> cut_h, cut_w;
    for (size_t t = 0; t < np; ++t) {
      const int64_t p = key.pairs[t][0], q = key.pairs[t][1];
      rh[t] = th.rect(ih(p), ih(q));
      rw[t] = tw.rect(iw(p), iw(q));
      if (rh[t].empty() || rw[t].empty()) continue;
      cut_h.insert(cut_h.end(), {rh[t].lo, rh[t].hi});
      cut_w.insert(cut_w.end(), {rw[t].lo, rw[t].hi});
    }
    for (auto* cuts : {&cut_h, &cut_w}) {
      std::sort(cuts->begin(), cuts->end());
      cuts->erase(std::unique(cuts->begin(), cuts->end()), cuts->end());
    }
    for (size_t a = 0; a + 1 < cut_h.size(); ++a) {
      for (size_t b = 0; b + 1 < cut_w.size(); ++b) {
        Atom atom{{cut_h[a], cut_h[a + 1]}, {cut_w[b], cut_w[b + 1]}, {}};
        for (size_t t = 0; t < np; ++t) {
          if (rh[t].empty() || rw[t].empty()) continue;
          if (rh[t].lo <= atom.h.lo && atom.h.hi <= rh[t].hi && rw[t].lo <= atom.w.lo && atom.w.hi <= rw[t].hi)
            atom.pairs.push_back(static_cast<int32_t>(t));
        }
        if (!atom.pairs.empty()) key.atoms.push_back(std::move(atom));
      }
    }
  }
  return plan;
}

}  // namespace avg_kernels::gram
