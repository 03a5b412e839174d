// CPU kernels of the im2col/Linear input Gram (SPEC §3): A = X Xᵀ without materialising X, one
// capability level (see level.h). The driver (path choice, checks, the Linear GEMM path) and op
// registration are csrc/cpu/gram.cpp.
//
// Correlation path: the input is packed, a few samples at a time, into a channels-last buffer per
// stride phase (bounded workspace, independent of the batch size); gram_plan.h groups the blocks of A
// by shift so that one C×C correlation serves every block sharing it; a register-blocked micro-kernel
// (at::vec) accumulates C×C tiles over rectangles of positions, reading both operands in place (rows
// of positions at any stride), and only one triangle of A is computed.
// Few-channel path: explicit im2col of a few samples at a time into a bounded buffer, one GEMM per chunk.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <vector>

#include "gram_plan.h"
#include "level.h"

namespace avg_kernels::cpu::CPU_CAPABILITY {
namespace {

using namespace avg_kernels::gram;

constexpr int kMR = 6;                    // micro-tile rows (broadcast operand)
constexpr int kNV = 4;                    // micro-tile columns, in vectors (depthwise path)
// Dense micro-tile columns, in vectors: kMR × kNVDense accumulators, kNVDense operand vectors and a
// broadcast must fit the register file. AVX512 (32 zmm): 6 × 4 (29 registers). AVX2 (16 ymm): 6 × 2
// (15 registers, the usual AVX2 SGEMM tile); 6 × 4 needed 29 and spilled accumulators in every FMA.
#if defined(CPU_CAPABILITY_AVX2)
constexpr int kNVDense = 2;
#else
constexpr int kNVDense = 4;
#endif
constexpr int64_t kRowBlock = 48;         // rows of A per work item (multiple of kMR)
constexpr int64_t kPanelBytes = 24 << 10;  // q-operand panel of a K block (k_block × kNV vectors): in L1
constexpr int64_t kKMin = 16, kKMax = 512;  // positions per K block, clamped
constexpr int64_t kChunkBytes = 3 << 19;  // target size of the packed input buffer (1.5 MB)

// c += v for a vector of T, into T or (for T = float) into double: the block sums of the micro-kernel
// accumulate across K blocks and chunks in the accumulator type C.
template <typename T, typename C>
inline void add_to(const at::vec::Vectorized<T>& v, C* c) {
  using Vec = at::vec::Vectorized<T>;
  if constexpr (std::is_same_v<T, C>) {
    (Vec::loadu(c) + v).store(c);
  } else {
    static_assert(std::is_same_v<T, float> && std::is_same_v<C, double>, "float into double only");
#if defined(CPU_CAPABILITY_AVX512)
    const __m512 f = v;
    const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(f));
    const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(f), 1)));
    _mm512_storeu_pd(c, _mm512_add_pd(_mm512_loadu_pd(c), lo));
    _mm512_storeu_pd(c + 8, _mm512_add_pd(_mm512_loadu_pd(c + 8), hi));
#elif defined(CPU_CAPABILITY_AVX2)
    const __m256 f = v;
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(f));
    const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1));
    _mm256_storeu_pd(c, _mm256_add_pd(_mm256_loadu_pd(c), lo));
    _mm256_storeu_pd(c + 4, _mm256_add_pd(_mm256_loadu_pd(c + 4), hi));
#else
    T tmp[Vec::size()];
    v.store(tmp);
    for (int i = 0; i < Vec::size(); ++i) c[i] += C(tmp[i]);
#endif
  }
}

// c[r][:] += Σ_k a[k][r] · b[k][:] over positions k = rows[t] + w·ps (t < nrows, w < len), for R rows
// and NVEC vectors of columns; b[k] = a[k] + bdelta. The sum of the block starts from zero in registers
// and is added to c (type C) once: summation error ~ (block length + number of blocks)·eps, not M·eps.
template <typename T, typename C, int R, int NVEC>
void micro(const T* a, int64_t bdelta, const int64_t* rows, int64_t nrows, int64_t len, int64_t ps, C* c,
           int64_t ldc) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int VL = Vec::size();
  Vec acc[R][NVEC];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NVEC; ++v) acc[r][v] = Vec(T(0));
  for (int64_t t = 0; t < nrows; ++t) {
    const T* pa = a + rows[t];
    for (int64_t w = 0; w < len; ++w, pa += ps) {
      const T* pb = pa + bdelta;
      Vec bv[NVEC];
      for (int v = 0; v < NVEC; ++v) bv[v] = Vec::loadu(pb + v * VL);
      for (int r = 0; r < R; ++r) {
        const Vec av(pa[r]);
        for (int v = 0; v < NVEC; ++v) acc[r][v] = at::vec::fmadd(av, bv[v], acc[r][v]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NVEC; ++v) add_to<T, C>(acc[r][v], c + r * ldc + v * VL);
}

template <typename T, typename C>
using MicroFn = void (*)(const T*, int64_t, const int64_t*, int64_t, int64_t, int64_t, C*, int64_t);

template <typename T, typename C, int R, int... NV>
constexpr std::array<MicroFn<T, C>, sizeof...(NV)> micro_row(std::integer_sequence<int, NV...>) {
  return {&micro<T, C, R, NV + 1>...};
}

template <typename T, typename C, int... R>
constexpr std::array<std::array<MicroFn<T, C>, kNVDense>, sizeof...(R)> micro_table(std::integer_sequence<int, R...>) {
  return {micro_row<T, C, R + 1>(std::make_integer_sequence<int, kNVDense>{})...};
}

// micro_fns<T, C>()[r-1][nvec-1]
template <typename T, typename C>
const auto& micro_fns() {
  static const auto table = micro_table<T, C>(std::make_integer_sequence<int, kMR>{});
  return table;
}

// Depthwise (one channel per group): acc[g] += Σ_k a[k][g] · b[k][g] for `count` consecutive groups
// (<= NVEC vectors), vectorised across groups; the buffer then has one channel per group, no padding.
template <typename T, typename C, int NVEC>
void micro_dw(const T* a, int64_t bdelta, const int64_t* rows, int64_t nrows, int64_t len, int64_t ps, C* c,
              int64_t count) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int VL = Vec::size();
  Vec acc[NVEC];
  for (int v = 0; v < NVEC; ++v) acc[v] = Vec(T(0));
  for (int64_t t = 0; t < nrows; ++t) {
    const T* pa = a + rows[t];
    for (int64_t w = 0; w < len; ++w, pa += ps) {
      const T* pb = pa + bdelta;
      for (int v = 0; v < NVEC; ++v) {
        const int64_t n = std::min<int64_t>(VL, count - v * VL);
        acc[v] = at::vec::fmadd(Vec::loadu(pa + v * VL, n), Vec::loadu(pb + v * VL, n), acc[v]);
      }
    }
  }
  for (int v = 0; v < NVEC; ++v) {
    const int64_t n = std::min<int64_t>(VL, count - v * VL);
    if (n == VL) {
      add_to<T, C>(acc[v], c + v * VL);
    } else {
      T tmp[VL];
      acc[v].store(tmp);
      for (int64_t i = 0; i < n; ++i) c[v * VL + i] += C(tmp[i]);
    }
  }
}

template <typename T, typename C>
using MicroDwFn = void (*)(const T*, int64_t, const int64_t*, int64_t, int64_t, int64_t, C*, int64_t);

struct Geometry {
  int64_t groups, cg, cgp, ct;  // groups, channels per group, padded to the vector width, buffer channel stride
  int64_t k2, dim;              // kernel offsets, D (with bias)
  bool bias;
  int64_t buf_h, buf_w, chunk;  // phase buffer extent and samples per chunk
  // Where the products accumulate. Direct (1×1 kernels and Linear, cg a multiple of the vector width):
  // straight into A, rows of `dim`. Otherwise one (groups, cg, cgp) block per atom, atom_off[key][atom]
  // into one zeroed workspace, scattered into A's interleaved (c·k2 + i) layout once at the end.
  bool direct;
  // Depthwise (cg == 1, groups > 1): no channel padding (cgp = 1), items are blocks of groups.
  bool depthwise;
  std::vector<std::vector<int64_t>> atom_off;
};

// Positions of an atom, K block by K block: calls f(rows, nrows, len) with row offsets in the buffer.
// An atom that covers whole phase images is one contiguous run of positions (Linear: the batch).
template <class F>
void for_k_blocks(const Atom& atom, const Geometry& geo, int64_t nsamples, int64_t k_block, int64_t* rows, F&& f) {
  const int64_t bh = geo.buf_h, bw = geo.buf_w, ct = geo.ct;
  if (atom.h.lo == 0 && atom.h.hi == bh && atom.w.lo == 0 && atom.w.hi == bw) {
    const int64_t total = nsamples * bh * bw;
    for (int64_t k0 = 0; k0 < total; k0 += k_block) {
      rows[0] = k0 * ct;
      f(rows, int64_t(1), std::min(k_block, total - k0));
    }
    return;
  }
  const int64_t nh = atom.h.size(), len = atom.w.size(), total = nsamples * nh;
  const int64_t per_block = std::max<int64_t>(1, k_block / len);
  for (int64_t t0 = 0; t0 < total; t0 += per_block) {
    const int64_t nrows = std::min(per_block, total - t0);
    for (int64_t t = 0; t < nrows; ++t) {
      const int64_t n = (t0 + t) / nh, h = atom.h.lo + (t0 + t) % nh;
      rows[t] = ((n * bh + h) * bw + atom.w.lo) * ct;
    }
    f(rows, nrows, len);
  }
}

// One work item: rows [rb0, rb1) of the C×C products of one key and group over the packed chunk,
// accumulated into the atoms' blocks (type C: double for float inputs) or, when direct, into A itself.
template <typename T, typename C>
void run_item(const Key& key, int32_t key_index, const Geometry& geo, const T* buf, int64_t phase_stride,
              int64_t nsamples, int64_t g, int64_t rb0, int64_t rb1, int64_t* rowoff, C* acc) {
  constexpr int64_t VL = at::vec::Vectorized<T>::size();
  const auto& fns = micro_fns<T, C>();
  const int64_t cgp = geo.cgp, ct = geo.ct, bw = geo.buf_w;
  const T* buf_p = buf + key.phase_p * phase_stride + g * cgp;
  const T* buf_q = buf + key.phase_q * phase_stride + g * cgp;
  const int64_t shift = (key.dh * bw + key.dw) * ct;
  const int64_t col_lo0 = key.diag ? (rb0 / VL) * VL : 0;
  const int64_t k_block = std::clamp<int64_t>(kPanelBytes / (kNVDense * VL * int64_t(sizeof(T))), kKMin, kKMax);
  for (size_t ai = 0; ai < key.atoms.size(); ++ai) {
    // direct: acc is A itself (rows of dim); else the atom's (groups, cg, cgp) block
    C* target = geo.direct ? acc + g * geo.dim * geo.dim : acc + geo.atom_off[key_index][ai] + g * geo.cg * cgp;
    const int64_t ldc = geo.direct ? geo.dim : cgp;
    for_k_blocks(key.atoms[ai], geo, nsamples, k_block, rowoff, [&](const int64_t* rows, int64_t nrows, int64_t len) {
      // Column panels outer, row tiles inner: the panel's K block of the q operand (k_block ×
      // kNVDense·VL values) stays in L1 while every row tile of the item passes over it.
      for (int64_t n0 = col_lo0; n0 < cgp; n0 += kNVDense * VL) {
        const int nvec = static_cast<int>(std::min<int64_t>(kNVDense, (cgp - n0) / VL));
        for (int64_t m0 = rb0; m0 < rb1; m0 += kMR) {
          // diagonal keys: only tiles that reach the columns >= floor(row / VL)·VL of their rows
          if (key.diag && n0 + kNVDense * VL <= (m0 / VL) * VL) continue;
          const int r = static_cast<int>(std::min<int64_t>(kMR, rb1 - m0));
          const int64_t bdelta = (buf_q - buf_p) + shift + (n0 - m0);
          fns[r - 1][nvec - 1](buf_p + m0, bdelta, rows, nrows, len, ct, target + m0 * ldc + n0, ldc);
        }
      }
    });
  }
}

// Depthwise work item: groups [g0, g0 + count) of one key, vectorised across groups.
template <typename T, typename C>
void run_item_dw(const Key& key, int32_t key_index, const Geometry& geo, const T* buf, int64_t phase_stride,
                 int64_t nsamples, int64_t g0, int64_t count, int64_t* rowoff, C* acc) {
  constexpr int64_t VL = at::vec::Vectorized<T>::size();
  static const std::array<MicroDwFn<T, C>, kNV> fns = {&micro_dw<T, C, 1>, &micro_dw<T, C, 2>, &micro_dw<T, C, 3>,
                                                        &micro_dw<T, C, 4>};
  static_assert(kNV == 4, "one micro_dw per vector count");
  const int64_t ct = geo.ct;
  const T* buf_p = buf + key.phase_p * phase_stride + g0;
  const T* buf_q = buf + key.phase_q * phase_stride + g0;
  const int64_t bdelta = (buf_q - buf_p) + (key.dh * geo.buf_w + key.dw) * ct;
  const int64_t k_block = std::clamp<int64_t>(kPanelBytes / (kNV * VL * int64_t(sizeof(T))), kKMin, kKMax);
  const int nvec = static_cast<int>((count + VL - 1) / VL);
  for (size_t ai = 0; ai < key.atoms.size(); ++ai) {
    C* target = acc + geo.atom_off[key_index][ai] + g0;  // one element per group (cg = cgp = 1)
    for_k_blocks(key.atoms[ai], geo, nsamples, k_block, rowoff, [&](const int64_t* rows, int64_t nrows, int64_t len) {
      fns[nvec - 1](buf_p, bdelta, rows, nrows, len, ct, target, count);
    });
  }
}

// Column sums of offset i over the packed chunk, accumulated into sums (groups × cgp).
template <typename T>
void run_bias_item(const Plan& plan, const Geometry& geo, const T* buf, int64_t phase_stride, int64_t nsamples,
                   int64_t i, T* sums) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t VL = Vec::size();
  const auto& rect = plan.bias_rect[i];
  const T* base = buf + plan.offset_phase[i] * phase_stride;
  for (int64_t n = 0; n < nsamples; ++n)
    for (int64_t h = rect[0].lo; h < rect[0].hi; ++h)
      for (int64_t w = rect[1].lo; w < rect[1].hi; ++w) {
        const T* src = base + ((n * geo.buf_h + h) * geo.buf_w + w) * geo.ct;
        for (int64_t c = 0; c < geo.ct; c += VL) {
          const int64_t n = std::min<int64_t>(VL, geo.ct - c);
          (Vec::loadu(src + c, n) + Vec::loadu(sums + c, n)).store(sums + c, n);
        }
      }
}

// A[r][s] for r != s is computed in exactly one of (r, s), (s, r); copy it to the other, tile by tile.
template <typename T>
__attribute__((noinline)) void symmetric_fill(T* o, const Geometry& geo, const std::vector<uint8_t>& oriented) {
  constexpr int64_t VL = at::vec::Vectorized<T>::size();
  const int64_t dim = geo.dim, k2 = geo.k2, din = geo.cg * k2;
  // Per index r < din: its kernel offset and the start of its computed diagonal-block columns.
  std::vector<int32_t> off(size_t(dim), -1), chan(size_t(dim), 0), lo(size_t(dim), 0);
  for (int64_t r = 0; r < din; ++r) {
    off[r] = int32_t(r % k2);
    chan[r] = int32_t(r / k2);
    lo[r] = int32_t((r / k2 / VL) * VL);
  }
  auto computed = [&](int64_t r, int64_t s) {
    if (r >= din || s >= din) return s >= din;  // the bias column is computed, the bias row mirrored
    const int32_t p = off[r], q = off[s];
    return oriented[size_t(p * k2 + q)] && (p != q || chan[s] >= lo[r]);
  };
  constexpr int64_t B = 64;
  const int64_t nt = (dim + B - 1) / B;
  at::parallel_for(0, geo.groups * nt, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      T* og = o + (t / nt) * dim * dim;
      const int64_t ti = t % nt;
      for (int64_t tj = ti; tj < nt; ++tj)
        for (int64_t r = ti * B; r < std::min(dim, ti * B + B); ++r)
          for (int64_t s = std::max(r + 1, tj * B); s < std::min(dim, tj * B + B); ++s) {
            const T upper = og[r * dim + s], lower = og[s * dim + r];
            const T v = computed(r, s) ? upper : lower;  // a select, not a branch
            og[r * dim + s] = v;
            og[s * dim + r] = v;
          }
    }
  });
}

// A's computed entries from the atom blocks, row by row of A: row (c, p) gathers, for each q of
// an oriented block (p, q), the sum of that block's atoms' row c (contiguous) into columns (c2, q).
template <typename T, typename C>
__attribute__((noinline)) void scatter_atoms(T* o, const Plan& plan, const Geometry& geo, const C* acc) {
  constexpr int64_t VL = at::vec::Vectorized<T>::size();
  const int64_t dim = geo.dim, k2 = geo.k2, cg = geo.cg, cgp = geo.cgp;
  // Per block (p, q): the offsets of its atoms' blocks in acc.
  std::vector<std::vector<int64_t>> block_atoms(size_t(k2 * k2));
  for (size_t k = 0; k < plan.keys.size(); ++k) {
    const Key& key = plan.keys[k];
    for (size_t ai = 0; ai < key.atoms.size(); ++ai)
      for (int32_t pi : key.atoms[ai].pairs)
        block_atoms[size_t(key.pairs[pi][0] * k2 + key.pairs[pi][1])].push_back(geo.atom_off[k][ai]);
  }
  at::parallel_for(0, geo.groups * cg * k2, 16, [&](int64_t r0, int64_t r1) {
    std::vector<const C*> srcs;
    for (int64_t rr = r0; rr < r1; ++rr) {
      const int64_t g = rr / (cg * k2), c = (rr / k2) % cg, p = rr % k2;
      T* row = o + g * dim * dim + (c * k2 + p) * dim;
      for (int64_t q = 0; q < k2; ++q) {
        const auto& atoms = block_atoms[size_t(p * k2 + q)];
        if (atoms.empty()) continue;
        srcs.clear();
        for (int64_t a : atoms) srcs.push_back(acc + a + (g * cg + c) * cgp);
        for (int64_t c2 = p == q ? (c / VL) * VL : 0; c2 < cg; ++c2) {
          C v = 0;
          for (const C* src : srcs) v += src[c2];
          row[c2 * k2 + q] = static_cast<T>(v);
        }
      }
    }
  });
}

template <typename T>
void gram_impl(const at::Tensor& x4, const Plan& plan, const ConvDim& gh, const ConvDim& gw, int64_t groups,
               bool bias, at::Tensor& out) {
  constexpr int64_t VL = at::vec::Vectorized<T>::size();
  const int64_t n_total = x4.size(0), c_total = x4.size(1);
  Geometry geo;
  geo.groups = groups;
  geo.cg = c_total / groups;
  geo.depthwise = geo.cg == 1 && groups > 1;
  geo.cgp = geo.depthwise ? 1 : (geo.cg + VL - 1) / VL * VL;
  geo.ct = groups * geo.cgp;
  // Position stride of the buffer: a stride of an even number of cache lines maps successive positions to
  // a fraction of the L1 sets (a power of two like Linear 4096's 16 KB: all to one set, so a K block of the
  // micro-kernel's operands thrashed 8 ways); from 1 KB up, one line of padding makes the stride odd.
  constexpr int64_t kLine = 64 / int64_t(sizeof(T));
  const int64_t lines = (geo.ct + kLine - 1) / kLine;
  if (geo.ct * int64_t(sizeof(T)) >= 1024 && lines % 2 == 0) geo.ct = (lines + 1) * kLine;
  geo.k2 = plan.k2();
  geo.dim = geo.cg * geo.k2 + (bias ? 1 : 0);
  geo.bias = bias;
  geo.buf_h = plan.buf_h;
  geo.buf_w = plan.buf_w;
  geo.direct = geo.k2 == 1 && geo.cg % VL == 0;
  int64_t acc_len = 0;
  geo.atom_off.resize(plan.keys.size());
  for (size_t k = 0; k < plan.keys.size(); ++k)
    for (size_t a = 0; a < plan.keys[k].atoms.size(); ++a) {
      geo.atom_off[k].push_back(acc_len);
      acc_len += geo.direct ? 0 : groups * geo.cg * geo.cgp;
    }
  const int64_t dim = geo.dim, k2 = geo.k2, cg = geo.cg;
  T* o = out.data_ptr<T>();
  out.zero_();
  std::vector<uint8_t> oriented(size_t(k2 * k2), 0);
  for (const Key& key : plan.keys)
    for (const auto& pq : key.pairs) oriented[size_t(pq[0] * k2 + pq[1])] = 1;
  if (bias)
    for (int64_t g = 0; g < groups; ++g) o[g * dim * dim + dim * dim - 1] = static_cast<T>(n_total * plan.positions);

  const int64_t per_sample = plan.buf_h * plan.buf_w * geo.ct * int64_t(plan.phases.size()) * int64_t(sizeof(T));
  geo.chunk = std::clamp<int64_t>(kChunkBytes / std::max<int64_t>(per_sample, 1), 1, std::max<int64_t>(n_total, 1));
  if (n_total > 0 && cg > 0) {
    const auto opts = x4.options().dtype(c10::CppTypeToScalarType<T>::value);
    const int64_t phase_stride = geo.chunk * plan.buf_h * plan.buf_w * geo.ct;
    // Workspaces are ATen tensors (torch's allocator; bench/gram.py measures every byte anyway).
    at::Tensor buf = at::zeros({int64_t(plan.phases.size()), geo.chunk, plan.buf_h, plan.buf_w, geo.ct}, opts);
    // float inputs: the atoms accumulate in double (memory: one (groups, cg, cgp) block per atom)
    at::Tensor acc = at::zeros({acc_len}, opts.dtype(at::kDouble));
    at::Tensor sums = at::zeros({bias ? k2 : 0, geo.ct}, opts);
    // Work items: (key, group, row block) products, then one bias item per offset.
    struct Item { int32_t key; int64_t g, rb0, rb1; };
    std::vector<Item> items;
    for (size_t k = 0; k < plan.keys.size(); ++k) {
      if (plan.keys[k].atoms.empty()) continue;
      for (int64_t g = 0; g < groups; ++g)
        if (!geo.depthwise)
          for (int64_t rb = 0; rb < cg; rb += kRowBlock) items.push_back({int32_t(k), g, rb, std::min(cg, rb + kRowBlock)});
      if (geo.depthwise)  // (key, block of groups): g = first group, rb1 = number of groups
        for (int64_t g = 0; g < groups; g += kNV * VL) items.push_back({int32_t(k), g, 0, std::min(kNV * VL, groups - g)});
    }
    // Bigger items first (the diagonal keys compute a triangle): a better dynamic schedule.
    std::stable_sort(items.begin(), items.end(), [&](const Item& a, const Item& b) {
      auto cost = [&](const Item& it) { return plan.keys[it.key].diag ? geo.cgp - it.rb0 / 2 - it.rb1 / 2 : geo.cgp; };
      return cost(a) > cost(b);
    });
    const int64_t n_items = int64_t(items.size()) + (bias ? k2 : 0);
    const int nthreads = at::get_num_threads();
    const int64_t max_rows = kKMax + 1;
    at::Tensor rowoffs_t = at::empty({nthreads, max_rows}, x4.options().dtype(at::kLong));
    int64_t* rowoffs = rowoffs_t.data_ptr<int64_t>();
    const T* bp = buf.const_data_ptr<T>();
    double* ap = acc.data_ptr<double>();
    T* sp = sums.data_ptr<T>();
    at::Tensor x5 = x4.unflatten(1, {groups, cg});  // (N, G, Cg, H, W), a view for any strides
    for (int64_t n0 = 0; n0 < n_total; n0 += geo.chunk) {
      const int64_t ns = std::min(geo.chunk, n_total - n0);
      for (size_t f = 0; f < plan.phases.size(); ++f) {
        const int64_t ph = plan.phases[f][0], pw = plan.phases[f][1];
        at::Tensor src = x5.narrow(0, n0, ns).slice(3, ph, x5.size(3), gh.s).slice(4, pw, x5.size(4), gw.s);
        at::Tensor dst = buf.select(0, int64_t(f)).narrow(3, 0, groups * geo.cgp).unflatten(3, {groups, geo.cgp})
                             .narrow(0, 0, ns).narrow(1, 0, src.size(3)).narrow(2, 0, src.size(4))
                             .narrow(4, 0, cg).permute({0, 3, 4, 1, 2});
        dst.copy_(src);
      }
      std::atomic<int64_t> next{0};
      at::parallel_for(0, nthreads, 1, [&](int64_t, int64_t) {
        int64_t* rowoff = rowoffs + at::get_thread_num() * max_rows;
        for (int64_t it = next++; it < n_items; it = next++) {
          if (it < int64_t(items.size())) {
            const Item& item = items[it];
            if (geo.depthwise)
              run_item_dw<T, double>(plan.keys[item.key], item.key, geo, bp, phase_stride, ns, item.g, item.rb1,
                                     rowoff, ap);
            else if (geo.direct)
              run_item<T, T>(plan.keys[item.key], item.key, geo, bp, phase_stride, ns, item.g, item.rb0, item.rb1,
                             rowoff, o);
            else
              run_item<T, double>(plan.keys[item.key], item.key, geo, bp, phase_stride, ns, item.g, item.rb0,
                                  item.rb1, rowoff, ap);
          } else {
            const int64_t i = it - int64_t(items.size());
            run_bias_item<T>(plan, geo, bp, phase_stride, ns, i, sp + i * geo.ct);
          }
        }
      });
    }
    // Scatter the atoms into A's blocks (one orientation per unordered block pair; the diagonal
    // blocks' upper parts) and the bias column.
    if (!geo.direct) scatter_atoms<T, double>(o, plan, geo, ap);
    if (bias)
      for (int64_t g = 0; g < groups; ++g)
        for (int64_t i = 0; i < k2; ++i)
          for (int64_t c = 0; c < cg; ++c)
            o[g * dim * dim + (c * k2 + i) * dim + dim - 1] = sp[i * geo.ct + g * geo.cgp + c];
  }
  symmetric_fill<T>(o, geo, oriented);
}

// Rows [r0, r1) of the chunk's Uᵀ for group g: row r = (c, ki, kj) over positions (n, oh, ow); 0 where
// the window reads padding. The bias row (r = cg·k2) is all ones.
template <typename in_t, typename T>
void pack_rows(const at::Tensor& x4, int64_t n0, int64_t ns, int64_t g, int64_t cg, const ConvDim& gh,
               const ConvDim& gw, int64_t r0, int64_t r1, T* ut) {
  const in_t* x = x4.const_data_ptr<in_t>();
  const int64_t s0 = x4.stride(0), s1 = x4.stride(1), s2 = x4.stride(2), s3 = x4.stride(3);
  const int64_t ho = gh.out(), wo = gw.out(), positions = ns * ho * wo, k2 = gh.k * gw.k;
  for (int64_t r = r0; r < r1; ++r) {
    T* __restrict row = ut + r * positions;
    if (r == cg * k2) {  // bias
      std::fill(row, row + positions, T(1));
      continue;
    }
    const int64_t c = g * cg + r / k2, ki = r % k2 / gw.k, kj = r % gw.k;
    const int64_t dh = ki * gh.d - gh.p, dw = kj * gw.d - gw.p;
    // output columns whose input column is inside the image: ow in [lo, hi)
    const int64_t lo = std::clamp<int64_t>(dw >= 0 ? 0 : (-dw + gw.s - 1) / gw.s, 0, wo);
    const int64_t hi = std::clamp<int64_t>(gw.in - dw <= 0 ? 0 : (gw.in - dw + gw.s - 1) / gw.s, lo, wo);
    for (int64_t n = 0; n < ns; ++n)
      for (int64_t oh = 0; oh < ho; ++oh) {
        T* __restrict out = row + (n * ho + oh) * wo;
        const int64_t ih = oh * gh.s + dh;
        if (ih < 0 || ih >= gh.in) {
          std::fill(out, out + wo, T(0));
          continue;
        }
        const in_t* __restrict src = x + (n0 + n) * s0 + c * s1 + ih * s2 + dw * s3;
        const int64_t step = gw.s * s3;
        for (int64_t ow = 0; ow < lo; ++ow) out[ow] = T(0);
        if (step == 1) {  // the common case: a contiguous run the compiler vectorises
          for (int64_t ow = lo; ow < hi; ++ow) out[ow] = static_cast<T>(src[ow]);
        } else {
          for (int64_t ow = lo; ow < hi; ++ow) out[ow] = static_cast<T>(src[ow * step]);
        }
        for (int64_t ow = hi; ow < wo; ++ow) out[ow] = T(0);
      }
  }
}

template <typename T>
void gram_gemm(const at::Tensor& x4, const ConvDim& gh, const ConvDim& gw, int64_t groups, bool bias, at::Tensor& out) {
  const int64_t n_total = x4.size(0), cg = x4.size(1) / groups, k2 = gh.k * gw.k, dim = cg * k2 + (bias ? 1 : 0);
  const int64_t per_sample = gh.out() * gw.out();
  const int64_t chunk = std::clamp<int64_t>(kChunkBytes / std::max<int64_t>(dim * per_sample * int64_t(sizeof(T)), 1), 1,
                                            std::max<int64_t>(n_total, 1));
  const auto opts = x4.options().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor ut = at::empty({dim, chunk * per_sample}, opts);
  // float inputs: per-chunk float32 GEMMs summed in double (as the correlation path's blocks)
  at::Tensor acc = at::zeros({groups, dim, dim}, opts.dtype(at::kDouble));
  for (int64_t n0 = 0; n0 < n_total; n0 += chunk) {
    const int64_t ns = std::min(chunk, n_total - n0);
    T* up = ut.data_ptr<T>();  // rows of length ns * per_sample, packed from the start of the buffer
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(ns * per_sample, 1));
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x4.scalar_type(), "im2col_gram_pack", [&] {
        at::parallel_for(0, dim, grain, [&](int64_t r0, int64_t r1) {
          pack_rows<scalar_t, T>(x4, n0, ns, g, cg, gh, gw, r0, r1, up);
        });
      });
      at::Tensor packed = ut.view(-1).narrow(0, 0, dim * ns * per_sample).view({dim, ns * per_sample});
      for (int64_t k0 = 0; k0 < ns * per_sample; k0 += kGramGemmK) {
        at::Tensor blk = packed.narrow(1, k0, std::min(kGramGemmK, ns * per_sample - k0));
        acc.select(0, g).add_(at::mm(blk, blk.t()));
      }
    }
  }
  out.copy_(acc);
}

}  // namespace

void gram_correlation(const at::Tensor& x4, const ConvDim& gh, const ConvDim& gw, int64_t groups, bool bias,
                      at::Tensor& out) {
  const Plan plan = make_plan(gh, gw);
  if (x4.scalar_type() == at::kDouble) {
    gram_impl<double>(x4, plan, gh, gw, groups, bias, out);
  } else {
    gram_impl<float>(x4, plan, gh, gw, groups, bias, out);
  }
}

void gram_im2col_gemm(const at::Tensor& x4, const ConvDim& gh, const ConvDim& gw, int64_t groups, bool bias,
                      at::Tensor& out) {
  if (x4.scalar_type() == at::kDouble) {
    gram_gemm<double>(x4, gh, gw, groups, bias, out);
  } else {
    gram_gemm<float>(x4, gh, gw, groups, bias, out);
  }
}

}  // namespace avg_kernels::cpu::CPU_CAPABILITY
