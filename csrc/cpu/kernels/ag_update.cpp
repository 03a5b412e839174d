// CPU kernels of the multi-tensor AG-1 update and AG-2 rescale (SPEC §2), one capability level (see
// level.h). The driver (argument checks, flat-buffer preparation) and op registration are
// csrc/cpu/ag_update.cpp.
//
// Work is split into items of at most kChunk elements of one tensor (a small tensor is one item);
// items are spread over the threads in contiguous runs of roughly equal size (elements plus a
// per-item overhead), so threads share both many small tensors and the slices of large ones. The
// AG-2 L1 norms are summed per item (float64, fixed lane order) and the item partials in item order:
// the result does not depend on the number of threads and is bitwise reproducible.
//
// Mixed dtypes: an item is processed in tiles of kTile elements; a member whose dtype is the
// arithmetic type is read (and the parameter written) in place, any other member is converted into
// a tile buffer first (at::vec conversions), so the float32/float64 same-dtype case copies nothing.
// All-float16 / all-bfloat16 triples take a fused loop that converts in registers instead.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <array>
#include <tuple>
#include <utility>
#include <vector>

#include "level.h"

namespace avg_kernels::cpu::CPU_CAPABILITY {
namespace {


using avg_kernels::ag::FlatEntry;
using at::vec::Vectorized;

constexpr int64_t kChunk = 16384;       // elements per work item
constexpr int64_t kTile = 512;          // elements per conversion tile
constexpr int64_t kItemOverhead = 256;  // per-item cost in "elements", for load balancing
constexpr int64_t kSerialBelow = 32768; // smaller calls run on the calling thread

template <class Op>
constexpr at::ScalarType kOpType = std::is_same_v<Op, float> ? at::kFloat : at::kDouble;

// ---------------------------------------------------------------------------------------------
// Tiles: members converted to the arithmetic type Op (or used in place when already Op).
// ---------------------------------------------------------------------------------------------
template <class T>
void widen_to_float(const T* src, float* dst, int64_t n) {  // T = at::Half / at::BFloat16
  using SV = Vectorized<T>;
  using FV = Vectorized<float>;
  int64_t i = 0;
  for (; i + SV::size() <= n; i += SV::size()) {
    auto [lo, hi] = at::vec::convert_to_float<T>(SV::loadu(src + i));
    lo.store(dst + i);
    hi.store(dst + i + FV::size());
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <class Op>
const Op* load_tile(const void* base, at::ScalarType dt, int64_t off, int64_t n, Op* buf) {
  if (dt == kOpType<Op>) return static_cast<const Op*>(base) + off;
  if constexpr (std::is_same_v<Op, float>) {
    if (dt == at::kHalf) widen_to_float(static_cast<const at::Half*>(base) + off, buf, n);
    else widen_to_float(static_cast<const at::BFloat16*>(base) + off, buf, n);
  } else {
    switch (dt) {
      case at::kFloat: at::vec::convert(static_cast<const float*>(base) + off, buf, n); break;
      case at::kHalf: at::vec::convert(static_cast<const at::Half*>(base) + off, buf, n); break;
      default: at::vec::convert(static_cast<const at::BFloat16*>(base) + off, buf, n); break;
    }
  }
  return buf;
}

// Rounds once to the parameter's dtype (float64 -> 16-bit goes through float32, like PyTorch).
template <class Op>
void store_tile(void* base, at::ScalarType dt, int64_t off, int64_t n, const Op* src) {
  switch (dt) {
    case at::kHalf: at::vec::convert(src, static_cast<at::Half*>(base) + off, n); break;
    case at::kBFloat16: at::vec::convert(src, static_cast<at::BFloat16*>(base) + off, n); break;
    case at::kFloat: at::vec::convert(src, static_cast<float*>(base) + off, n); break;
    default: at::vec::convert(src, static_cast<double*>(base) + off, n); break;
  }
}

// ---------------------------------------------------------------------------------------------
// Element math on whole registers.
// ---------------------------------------------------------------------------------------------
template <class V>
inline V ag1_vec(const V& t, const V& q, const V& g) {
  const V zero(0);
  const V d = (q - t).abs();
  V r = V::blendv(g, t, g == zero);  // ±0: keep θ; NaN: stays g (NaN)
  r = V::blendv(r, t + d, g < zero);
  return V::blendv(r, t - d, g > zero);
}

// acc_lo/acc_hi += the float lanes of v widened to double (exact), lanes in a fixed order.
inline void add_widened(Vectorized<double>& lo, Vectorized<double>& hi, const Vectorized<float>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 x = v;
  lo = lo + Vectorized<double>(_mm512_cvtps_pd(_mm512_castps512_ps256(x)));
  hi = hi + Vectorized<double>(_mm512_cvtps_pd(_mm512_extractf32x8_ps(x, 1)));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 x = v;
  lo = lo + Vectorized<double>(_mm256_cvtps_pd(_mm256_castps256_ps128(x)));
  hi = hi + Vectorized<double>(_mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)));
#else
  static_assert(Vectorized<float>::size() == 2 * Vectorized<double>::size());
  float f[Vectorized<float>::size()];
  v.store(f);
  double a[Vectorized<double>::size()], b[Vectorized<double>::size()];
  for (int k = 0; k < Vectorized<double>::size(); ++k) {
    a[k] = f[k];
    b[k] = f[k + Vectorized<double>::size()];
  }
  lo = lo + Vectorized<double>::loadu(a);
  hi = hi + Vectorized<double>::loadu(b);
#endif
}

inline void add_widened(Vectorized<double>& lo, Vectorized<double>& hi, const Vectorized<double>& v) {
  (void)hi;
  lo = lo + v;
}

inline double lane_sum(const Vectorized<double>& lo, const Vectorized<double>& hi) {
  double a[Vectorized<double>::size()], b[Vectorized<double>::size()];
  lo.store(a);
  hi.store(b);
  double s = 0;
  for (int k = 0; k < Vectorized<double>::size(); ++k) s += a[k];
  for (int k = 0; k < Vectorized<double>::size(); ++k) s += b[k];
  return s;
}

// ---------------------------------------------------------------------------------------------
// All members float16 (or all bfloat16): the common mixed-precision case gets a fused loop that
// widens in registers (no tile buffers). Same float32 operations in the same order as the tile path.
// ---------------------------------------------------------------------------------------------
inline bool all_of(const FlatEntry<3>& e, at::ScalarType t, int members) {
  for (int r = 0; r < members; ++r)
    if (e.dtype[r] != t) return false;
  return true;
}

// f(i, count, float vectors of each member: lo = elements [i, i+16), hi = [i+16, i+32)) -> writes
template <class T, int N, class F>
void for_each_16(const FlatEntry<3>& e, int64_t begin, int64_t end, const F& f) {
  using SV = Vectorized<T>;
  for (int64_t i = begin; i < end; i += SV::size()) {
    const int64_t c = std::min<int64_t>(SV::size(), end - i);
    std::array<std::tuple<Vectorized<float>, Vectorized<float>>, N> v;
    for (int r = 0; r < N; ++r) {
      const T* ptr = static_cast<const T*>(e.ptr[r]) + i;
      v[r] = at::vec::convert_to_float<T>(c == SV::size() ? SV::loadu(ptr) : SV::loadu(ptr, c));
    }
    f(i, c, v);
  }
}

// ---------------------------------------------------------------------------------------------
// Work items.
// ---------------------------------------------------------------------------------------------
struct Item {
  int32_t entry;
  bool dbl;
  int64_t begin, end;
};

std::vector<Item> make_items(const FlatEntry<3>* es, int64_t n) {
  std::vector<Item> items;
  for (int64_t k = 0; k < n; ++k) {
    const bool dbl = avg_kernels::ag::wants_double(es[k]);
    for (int64_t b = 0; b < es[k].numel; b += kChunk)
      items.push_back({int32_t(k), dbl, b, std::min(b + kChunk, es[k].numel)});
  }
  return items;
}

// Calls f(item_index) for every item, spread over the threads by weight (see the file comment).
template <class F>
void for_each_item(const std::vector<Item>& items, const F& f) {
  int64_t total = 0;
  for (const Item& it : items) total += it.end - it.begin + kItemOverhead;
  const int nt = at::get_num_threads();
  if (nt <= 1 || total < kSerialBelow || at::in_parallel_region()) {
    for (size_t k = 0; k < items.size(); ++k) f(k);
    return;
  }
  std::vector<size_t> bounds(nt + 1, items.size());
  bounds[0] = 0;
  int64_t acc = 0;
  int part = 1;
  for (size_t k = 0; k < items.size() && part < nt; ++k) {
    acc += items[k].end - items[k].begin + kItemOverhead;
    while (part < nt && acc * nt >= total * part) bounds[part++] = k + 1;
  }
  at::parallel_for(0, nt, 1, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p)
      for (size_t k = bounds[p]; k < bounds[p + 1]; ++k) f(k);
  });
}

// ---------------------------------------------------------------------------------------------
// AG-1.
// ---------------------------------------------------------------------------------------------
// Members (w, r, ḡ): w is written. ag1_update_: w = θ, r = θ'; ag1_update_new_ (kIntoNew): w = θ', r = θ.
// |θ' − θ| is the same value either way round (negation is exact), so both give bitwise the same θ_{t+1}.
template <bool kIntoNew, class V>
inline V ag1_wr(const V& w, const V& r, const V& g) {
  return kIntoNew ? ag1_vec(r, w, g) : ag1_vec(w, r, g);
}

template <class T, bool kIntoNew>
void ag1_item16(const FlatEntry<3>& e, int64_t begin, int64_t end) {
  for_each_16<T, 3>(e, begin, end, [&](int64_t i, int64_t c, auto& v) {
    const auto r0 = ag1_wr<kIntoNew>(std::get<0>(v[0]), std::get<0>(v[1]), std::get<0>(v[2]));
    const auto r1 = ag1_wr<kIntoNew>(std::get<1>(v[0]), std::get<1>(v[1]), std::get<1>(v[2]));
    at::vec::convert_from_float<T>(r0, r1).store(static_cast<T*>(e.ptr[0]) + i, c);
  });
}

template <class Op, bool kIntoNew>
void ag1_item(const FlatEntry<3>& e, int64_t begin, int64_t end) {
  if constexpr (std::is_same_v<Op, float>) {
    if (all_of(e, at::kBFloat16, 3)) return ag1_item16<at::BFloat16, kIntoNew>(e, begin, end);
    if (all_of(e, at::kHalf, 3)) return ag1_item16<at::Half, kIntoNew>(e, begin, end);
  }
  using V = Vectorized<Op>;
  alignas(64) Op bt[kTile], bq[kTile], bg[kTile], bo[kTile];
  for (int64_t off = begin; off < end; off += kTile) {
    const int64_t n = std::min(kTile, end - off);
    const Op* t = load_tile<Op>(e.ptr[0], e.dtype[0], off, n, bt);
    const Op* q = load_tile<Op>(e.ptr[1], e.dtype[1], off, n, bq);
    const Op* g = load_tile<Op>(e.ptr[2], e.dtype[2], off, n, bg);
    const bool direct = e.dtype[0] == kOpType<Op>;
    Op* out = direct ? static_cast<Op*>(e.ptr[0]) + off : bo;
    int64_t i = 0;
    for (; i + V::size() <= n; i += V::size())
      ag1_wr<kIntoNew>(V::loadu(t + i), V::loadu(q + i), V::loadu(g + i)).store(out + i);
    if (i < n) {
      const int64_t c = n - i;
      ag1_wr<kIntoNew>(V::loadu(t + i, c), V::loadu(q + i, c), V::loadu(g + i, c)).store(out + i, c);
    }
    if (!direct) store_tile<Op>(e.ptr[0], e.dtype[0], off, n, bo);
  }
}

// ---------------------------------------------------------------------------------------------
// AG-2: (Σ|θ' − θ|, Σ|θ'' − θ|) per item, then θ ← θ + (θ'' − θ)·scale.
// Members: ptr[0] = params (θ''), ptr[1] = params_old (θ), ptr[2] = params_step (θ').
// ---------------------------------------------------------------------------------------------
template <class T>
std::pair<double, double> ag2_partial16(const FlatEntry<3>& e, int64_t begin, int64_t end) {
  Vectorized<double> s_lo(0.0), s_hi(0.0), d_lo(0.0), d_hi(0.0);
  for_each_16<T, 3>(e, begin, end, [&](int64_t, int64_t, auto& v) {  // lanes past the end are zeros
    add_widened(s_lo, s_hi, (std::get<0>(v[2]) - std::get<0>(v[1])).abs());
    add_widened(d_lo, d_hi, (std::get<0>(v[0]) - std::get<0>(v[1])).abs());
    add_widened(s_lo, s_hi, (std::get<1>(v[2]) - std::get<1>(v[1])).abs());
    add_widened(d_lo, d_hi, (std::get<1>(v[0]) - std::get<1>(v[1])).abs());
  });
  return {lane_sum(s_lo, s_hi), lane_sum(d_lo, d_hi)};
}

template <class Op>
std::pair<double, double> ag2_partial(const FlatEntry<3>& e, int64_t begin, int64_t end) {
  if constexpr (std::is_same_v<Op, float>) {
    if (all_of(e, at::kBFloat16, 3)) return ag2_partial16<at::BFloat16>(e, begin, end);
    if (all_of(e, at::kHalf, 3)) return ag2_partial16<at::Half>(e, begin, end);
  }
  using V = Vectorized<Op>;
  alignas(64) Op bp[kTile], bt[kTile], bs[kTile];
  Vectorized<double> s_lo(0.0), s_hi(0.0), d_lo(0.0), d_hi(0.0);
  for (int64_t off = begin; off < end; off += kTile) {
    const int64_t n = std::min(kTile, end - off);
    const Op* p = load_tile<Op>(e.ptr[0], e.dtype[0], off, n, bp);
    const Op* t = load_tile<Op>(e.ptr[1], e.dtype[1], off, n, bt);
    const Op* s = load_tile<Op>(e.ptr[2], e.dtype[2], off, n, bs);
    int64_t i = 0;
    for (; i + V::size() <= n; i += V::size()) {
      const V tv = V::loadu(t + i);
      add_widened(s_lo, s_hi, (V::loadu(s + i) - tv).abs());
      add_widened(d_lo, d_hi, (V::loadu(p + i) - tv).abs());
    }
    if (i < n) {  // partial loads zero-fill the unused lanes: they add |0 - 0| = 0
      const int64_t c = n - i;
      const V tv = V::loadu(t + i, c);
      add_widened(s_lo, s_hi, (V::loadu(s + i, c) - tv).abs());
      add_widened(d_lo, d_hi, (V::loadu(p + i, c) - tv).abs());
    }
  }
  return {lane_sum(s_lo, s_hi), lane_sum(d_lo, d_hi)};
}

template <class T>
void ag2_scale_item16(const FlatEntry<3>& e, int64_t begin, int64_t end, double scale_d) {
  const Vectorized<float> scale(static_cast<float>(scale_d));
  for_each_16<T, 2>(e, begin, end, [&](int64_t i, int64_t c, auto& v) {
    const auto& [p0, p1] = v[0];
    const auto& [t0, t1] = v[1];
    at::vec::convert_from_float<T>(at::vec::fmadd(p0 - t0, scale, t0), at::vec::fmadd(p1 - t1, scale, t1))
        .store(static_cast<T*>(e.ptr[0]) + i, c);
  });
}

// Float arithmetic with a global scale that is not a normal float (the norms' ratio below 2^-126 or above
// FLT_MAX, e.g. a tiny θ' − θ against an ordinary Δ): the scale would underflow or overflow when rounded to
// float, so those calls multiply in double (the difference θ'' − θ still in float, SPEC §2), rounding once.
inline bool scale_needs_double(double scale) {
  return scale != 0 && !(std::fabs(scale) >= double(FLT_MIN) && std::fabs(scale) <= double(FLT_MAX));
}

// f: the scale as factors (csrc/include/avg_kernels/ag2_scale.h). Plain factors (u1 = u2 = 1) take the
// vector paths with v; the others (a ratio outside double's normal range) the scalar double loop.
template <class Op>
void ag2_scale_item(const FlatEntry<3>& e, int64_t begin, int64_t end, const ag2::Factors& f) {
  const double scale_d = f.v;
  const bool wide = !ag2::plain(f) || (std::is_same_v<Op, float> && scale_needs_double(scale_d));
  if constexpr (std::is_same_v<Op, float>) {  // params and params_old (params_step is not read here)
    if (!wide && all_of(e, at::kBFloat16, 2)) return ag2_scale_item16<at::BFloat16>(e, begin, end, scale_d);
    if (!wide && all_of(e, at::kHalf, 2)) return ag2_scale_item16<at::Half>(e, begin, end, scale_d);
  }
  using V = Vectorized<Op>;
  alignas(64) Op bp[kTile], bt[kTile], bo[kTile];
  const V scale(static_cast<Op>(scale_d));
  for (int64_t off = begin; off < end; off += kTile) {
    const int64_t n = std::min(kTile, end - off);
    const Op* p = load_tile<Op>(e.ptr[0], e.dtype[0], off, n, bp);
    const Op* t = load_tile<Op>(e.ptr[1], e.dtype[1], off, n, bt);
    const bool direct = e.dtype[0] == kOpType<Op>;
    Op* out = direct ? static_cast<Op*>(e.ptr[0]) + off : bo;
    if (wide) {
      for (int64_t i = 0; i < n; ++i)
        out[i] = Op(std::fma(double(p[i] - t[i]) * f.u1 * f.u2, f.v, double(t[i])));
      if (!direct) store_tile<Op>(e.ptr[0], e.dtype[0], off, n, bo);
      continue;
    }
    int64_t i = 0;
    for (; i + V::size() <= n; i += V::size()) {
      const V tv = V::loadu(t + i);
      at::vec::fmadd(V::loadu(p + i) - tv, scale, tv).store(out + i);
    }
    if (i < n) {
      const int64_t c = n - i;
      const V tv = V::loadu(t + i, c);
      at::vec::fmadd(V::loadu(p + i, c) - tv, scale, tv).store(out + i, c);
    }
    if (!direct) store_tile<Op>(e.ptr[0], e.dtype[0], off, n, bo);
  }
}

}  // namespace

void ag1_update(const FlatEntry<3>* entries, int64_t n, bool into_new) {
  const auto items = make_items(entries, n);
  for_each_item(items, [&](size_t k) {
    const Item& it = items[k];
    const FlatEntry<3>& e = entries[it.entry];
    if (into_new) {
      if (it.dbl) ag1_item<double, true>(e, it.begin, it.end);
      else ag1_item<float, true>(e, it.begin, it.end);
    } else {
      if (it.dbl) ag1_item<double, false>(e, it.begin, it.end);
      else ag1_item<float, false>(e, it.begin, it.end);
    }
  });
}

void ag2_norms(const FlatEntry<3>* entries, int64_t n, double* n_step, double* n_delta) {
  const auto items = make_items(entries, n);
  std::vector<std::pair<double, double>> partial(items.size());
  for_each_item(items, [&](size_t k) {
    const Item& it = items[k];
    partial[k] = it.dbl ? ag2_partial<double>(entries[it.entry], it.begin, it.end)
                        : ag2_partial<float>(entries[it.entry], it.begin, it.end);
  });
  double s = 0, d = 0;
  for (const auto& [ps, pd] : partial) {  // item order: independent of the thread count
    s += ps;
    d += pd;
  }
  *n_step = s;
  *n_delta = d;
}

void ag2_scale(const FlatEntry<3>* entries, int64_t n, ag2::Factors scale) {
  const auto items = make_items(entries, n);
  for_each_item(items, [&](size_t k) {
    const Item& it = items[k];
    if (it.dbl) ag2_scale_item<double>(entries[it.entry], it.begin, it.end, scale);
    else ag2_scale_item<float>(entries[it.entry], it.begin, it.end, scale);
  });
}

}  // namespace avg_kernels::cpu::CPU_CAPABILITY
