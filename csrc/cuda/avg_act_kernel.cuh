// The CUDA kernel of the averaged activation backward (SPEC §1), torch-free.
//
// Everything that can go wrong in an elementwise kernel (16-byte vector loads, the masked tail,
// the grid-stride loop, 64-bit offsets, float16/bfloat16 conversions) is written once here as
// __host__ __device__ code:
//   * on the GPU, the thin __global__ avg_act_kernel calls avg_act_thread() with blockIdx/threadIdx;
//   * on the host, emulate_launch() loops over every (block, thread) of a launch configuration and
//     calls the very same avg_act_thread(), so CPU tests execute the GPU's index/vector/tail logic
//     (csrc/cpu/cuda_emulation.cpp, tests/test_cuda_emulation.py, csrc/standalone/unit_tests.cpp).
// The per-element math is activations.h's avg_grad<A> (g * avg_slope<A>), in float for float16/bfloat16/float32
// and in double for float64.
//
// This header compiles as plain C++ (g++, no CUDA headers) when not under nvcc.
#pragma once

#include <stdint.h>
#include <string.h>

#include <stdexcept>
#include <type_traits>

#include <avg_kernels/activations.h>
#include <avg_kernels/half_bits.h>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define AK_HDI __host__ __device__ __forceinline__
#define AK_UNROLL _Pragma("unroll")
#else
#define AK_HDI inline
#define AK_UNROLL
#endif

namespace avg_kernels {
namespace cuda {

// Threads per block of every launch (a multiple of the warp size; 256 lets 8 blocks share an SM
// of 2048 threads, and every kernel declares it in __launch_bounds__).
constexpr int kThreads = 256;
// __launch_bounds__'s minimum resident blocks per SM: caps registers at 65536 / (3 * 256) = 85
// per thread. Without it ptxas targets 64 registers on sm_90 and spills in the float64 gelu
// vector kernel (12 bytes, measured with nvcc 13.0); 3 blocks = 768 threads per SM, each with
// three 16-byte loads in flight, is still far more than the bandwidth-latency product needs.
constexpr int kMinBlocksPerSM = 3;
// Bytes per vector access: one 128-bit load/store per tensor per iteration (LDG.128/STG.128).
constexpr int kVecBytes = 16;

// ---------------------------------------------------------------------------------------------
// Element types: how a tensor element is stored (storage) and computed (compute, SPEC §0).
// ---------------------------------------------------------------------------------------------
struct ElemF32 {
  using storage = float;
  using compute = float;
  static AK_HDI float load(float v) { return v; }
  static AK_HDI float store(float v) { return v; }
};
struct ElemF64 {
  using storage = double;
  using compute = double;
  static AK_HDI double load(double v) { return v; }
  static AK_HDI double store(double v) { return v; }
};
struct ElemF16 {  // raw IEEE binary16 bits
  using storage = uint16_t;
  using compute = float;
  static AK_HDI float load(uint16_t v) { return half_bits_to_float(v); }
  static AK_HDI uint16_t store(float v) { return float_to_half_bits(v); }
};
struct ElemBF16 {  // raw bfloat16 bits
  using storage = uint16_t;
  using compute = float;
  static AK_HDI float load(uint16_t v) { return bf16_bits_to_float(v); }
  static AK_HDI uint16_t store(float v) { return float_to_bf16_bits(v); }
};

// Elements per 16-byte vector: 4 floats, 2 doubles, 8 halves.
template <class E>
constexpr int kVecWidth = kVecBytes / int(sizeof(typename E::storage));

// ---------------------------------------------------------------------------------------------
// 16-byte packs.
// ---------------------------------------------------------------------------------------------
template <class S>
struct alignas(kVecBytes) Pack {
  S v[kVecBytes / sizeof(S)];
};

inline bool is_vec_aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % kVecBytes == 0; }

#if !defined(__CUDA_ARCH__)
// The host emulation refuses a vector access the GPU would fault on (misaligned 128-bit access).
inline void check_vec_aligned(const void* p) {
  if (!is_vec_aligned(p)) throw std::logic_error("avg_kernels emulation: misaligned 16-byte vector access");
}
#endif

template <class S>
AK_HDI Pack<S> load_pack(const S* p) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const Pack<S>*>(p);  // one LDG.E.128 (p is 16-byte aligned)
#else
  check_vec_aligned(p);
  Pack<S> r;
  memcpy(&r, p, sizeof r);
  return r;
#endif
}

template <class S>
AK_HDI void store_pack(S* p, const Pack<S>& r) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<Pack<S>*>(p) = r;  // one STG.E.128
#else
  check_vec_aligned(p);
  memcpy(p, &r, sizeof r);
#endif
}

// ---------------------------------------------------------------------------------------------
// Indexing: 64-bit thread ids and the grid-stride loop.
// ---------------------------------------------------------------------------------------------

// blockIdx.x * blockDim.x + threadIdx.x and gridDim.x * blockDim.x, in 64 bits: with the
// maximal grid (2^31 - 1 blocks of 1024 threads) both exceed 2^32.
AK_HDI int64_t global_thread_id(uint32_t block, uint32_t thread, uint32_t block_dim) {
  return int64_t(block) * int64_t(block_dim) + int64_t(thread);
}
AK_HDI int64_t grid_threads(uint32_t grid, uint32_t block_dim) { return int64_t(grid) * int64_t(block_dim); }

// The work of global thread `tid` among `nthreads` over n elements (all offsets int64_t):
//   VEC > 1: vectors v = tid, tid + nthreads, ... < n / VEC: body.vec(v * VEC) handles elements
//            [v * VEC, v * VEC + VEC) with 16-byte accesses; then the tail n - n % VEC .. n - 1,
//            again grid-strided (so any grid, even a single thread, covers it): body.one(i);
//   VEC == 1: elements i = tid, tid + nthreads, ... < n: body.one(i).
// Every element of [0, n) is visited by exactly one (thread, iteration).
template <int VEC, class Body>
AK_HDI void grid_stride(int64_t n, int64_t tid, int64_t nthreads, Body& body) {
  if constexpr (VEC == 1) {
    for (int64_t i = tid; i < n; i += nthreads) body.one(i);
  } else {
    const int64_t nvec = n / VEC;
    for (int64_t v = tid; v < nvec; v += nthreads) body.vec(v * VEC);
    for (int64_t i = nvec * VEC + tid; i < n; i += nthreads) body.one(i);
  }
}

// ---------------------------------------------------------------------------------------------
// The averaged activation backward: out[i] = grad_out[i] * avg_slope<A>(x[i], x_new[i]).
// ---------------------------------------------------------------------------------------------
template <class E>
struct AvgActArgs {
  using S = typename E::storage;
  using C = typename E::compute;
  const S* grad_out;
  const S* x;
  const S* x_new;
  S* out;  // contiguous, n elements
  int64_t n;
  ActParams<C> prm;
  EpsCut<C> eps;  // the fallback threshold, for the exact |d| <= eps decision (make_eps_cut)
};

// All four pointers 16-byte aligned: the vector path may run (decided once per launch).
template <class E>
inline bool can_vectorize(const AvgActArgs<E>& a) {
  return is_vec_aligned(a.grad_out) && is_vec_aligned(a.x) && is_vec_aligned(a.x_new) && is_vec_aligned(a.out);
}

template <Act A, class E>
struct AvgActBody {
  using S = typename E::storage;
  using C = typename E::compute;
  // Copies of the kernel arguments (no reference to the __global__ parameter, which would
  // force a copy of it into local memory).
  const S* g;
  const S* x;
  const S* xn;
  S* out;
  ActParams<C> prm;
  EpsCut<C> eps;

  AK_HDI S elem(S gv, S xv, S xnv) const {
    return E::store(avg_grad<A>(E::load(gv), E::load(xv), E::load(xnv), prm, eps));
  }
  AK_HDI void one(int64_t i) const { out[i] = elem(g[i], x[i], xn[i]); }
  AK_HDI void vec(int64_t i) const {
    const Pack<S> G = load_pack(g + i), X = load_pack(x + i), XN = load_pack(xn + i);
    Pack<S> R;
    AK_UNROLL
    for (int j = 0; j < kVecWidth<E>; ++j) R.v[j] = elem(G.v[j], X.v[j], XN.v[j]);
    store_pack(out + i, R);
  }
};

// One GPU thread's whole work. VEC is kVecWidth<E> (aligned) or 1 (scalar path).
template <Act A, class E, int VEC>
AK_HDI void avg_act_thread(const AvgActArgs<E>& a, int64_t tid, int64_t nthreads) {
  static_assert(VEC == 1 || VEC == kVecWidth<E>, "VEC is the 16-byte width or 1");
  AvgActBody<A, E> body{a.grad_out, a.x, a.x_new, a.out, a.prm, a.eps};
  grid_stride<VEC>(a.n, tid, nthreads, body);
}

#if defined(__CUDACC__)
template <Act A, class E, int VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) avg_act_kernel(AvgActArgs<E> a) {
  avg_act_thread<A, E, VEC>(a, global_thread_id(blockIdx.x, threadIdx.x, blockDim.x),
                            grid_threads(gridDim.x, blockDim.x));
}
#endif

// ---------------------------------------------------------------------------------------------
// Launch configuration (host).
// ---------------------------------------------------------------------------------------------
struct LaunchConfig {
  uint32_t grid;   // blocks
  uint32_t block;  // threads per block
};

// kThreads threads per block; blocks = min(ceil(n / (kThreads * vec)), one full wave), one wave
// being num_sms * blocks_per_sm blocks, blocks_per_sm the kernel's occupancy (what
// cudaOccupancyMaxActiveBlocksPerMultiprocessor reports for it: 3 to 8 on sm_80/sm_90 for these
// kernels, by their register counts). Small tensors get one vector per thread; large ones loop
// (grid-stride) over a grid that is exactly resident, so no block waits for a second wave,
// the per-thread setup is amortised and the grid never nears CUDA's 2^31 - 1 limit. n > 0.
inline LaunchConfig launch_config(int64_t n, int vec, int num_sms, int blocks_per_sm) {
  const int64_t per_block = int64_t(kThreads) * vec;
  const int64_t needed = (n + per_block - 1) / per_block;
  int64_t wave = int64_t(num_sms) * int64_t(blocks_per_sm);
  if (wave < 1) wave = 1;
  const int64_t grid = needed < wave ? needed : wave;
  return LaunchConfig{uint32_t(grid < 1 ? 1 : grid), uint32_t(kThreads)};
}

// ---------------------------------------------------------------------------------------------
// Host emulation of a launch: every (block, thread) of the grid runs avg_act_thread, in order.
// (Threads never communicate, so any order gives the GPU's result.)
// ---------------------------------------------------------------------------------------------
template <class ThreadFn>
inline void emulate_launch(LaunchConfig cfg, const ThreadFn& thread_fn) {
  const int64_t nthreads = grid_threads(cfg.grid, cfg.block);
  for (uint32_t b = 0; b < cfg.grid; ++b)
    for (uint32_t t = 0; t < cfg.block; ++t) thread_fn(global_thread_id(b, t, cfg.block), nthreads);
}

// Runs the kernel's logic on the host; returns true when the vector path ran.
template <Act A, class E>
inline bool emulate_avg_act(const AvgActArgs<E>& a, LaunchConfig cfg) {
  const bool vec = can_vectorize(a);
  if (vec) {
    emulate_launch(cfg, [&](int64_t tid, int64_t nt) { avg_act_thread<A, E, kVecWidth<E>>(a, tid, nt); });
  } else {
    emulate_launch(cfg, [&](int64_t tid, int64_t nt) { avg_act_thread<A, E, 1>(a, tid, nt); });
  }
  return vec;
}

// ---------------------------------------------------------------------------------------------
// Index coverage without memory: runs grid_stride for given threads with a body that records
// or checks the element ranges it is handed (no loads), for any n (e.g. > 2^32).
// ---------------------------------------------------------------------------------------------

// Checks that thread tid visits exactly the vectors tid, tid + T, ... < n / VEC (T = nthreads)
// and then exactly the tail elements nvec*VEC + tid, + T, ... < n, in that order; counts what it saw.
struct CoverageCheck {
  int64_t n, vec, tid, nthreads;
  int64_t next_vec;   // expected start of the next vector visit
  int64_t next_one;   // expected next single-element visit
  int64_t elements = 0, visits = 0, errors = 0, max_end = 0;
  AK_HDI void see(int64_t start, int64_t len, int64_t& expected, int64_t step) {
    if (start != expected || start < 0 || start + len > n) ++errors;
    expected = start + step;
    elements += len;
    ++visits;
    if (start + len > max_end) max_end = start + len;
  }
  AK_HDI void vec_visit(int64_t i) { see(i, vec, next_vec, nthreads * vec); }
  AK_HDI void one(int64_t i) {
    if (vec > 1 && next_vec < (n / vec) * vec) ++errors;  // a vector was skipped before the tail
    see(i, 1, next_one, nthreads);
  }
};

// grid_stride's body interface (vec(i), one(i)) forwarded to a checker/recorder's vec_visit/one.
template <class V>
struct VisitBody {
  V* v;
  AK_HDI void vec(int64_t i) { v->vec_visit(i); }
  AK_HDI void one(int64_t i) { v->one(i); }
};

template <int VEC>
inline CoverageCheck check_thread_coverage(int64_t n, int64_t tid, int64_t nthreads) {
  CoverageCheck c{n, VEC, tid, nthreads, tid * VEC, (n / VEC) * VEC + tid};
  if (VEC == 1) c.next_one = tid;
  VisitBody<CoverageCheck> body{&c};
  grid_stride<VEC>(n, tid, nthreads, body);
  // The loop must stop exactly when the next expected visit is past the end.
  if (VEC > 1 && c.next_vec < (n / VEC) * VEC) ++c.errors;
  if (c.next_one < n) ++c.errors;
  return c;
}

// Records every (start, length) the thread is handed, in order (for tests that inspect them).
struct RangeRecorder {
  int64_t* out;  // capacity pairs
  int64_t capacity;
  int64_t count = 0;
  int64_t vec;
  AK_HDI void put(int64_t start, int64_t len) {
    if (count < capacity) {
      out[2 * count] = start;
      out[2 * count + 1] = len;
    }
    ++count;
  }
  AK_HDI void vec_visit(int64_t i) { put(i, vec); }
  AK_HDI void one(int64_t i) { put(i, 1); }
};

template <int VEC>
inline int64_t record_thread_ranges(int64_t n, int64_t tid, int64_t nthreads, int64_t* out, int64_t capacity) {
  RangeRecorder r{out, capacity, 0, VEC};
  VisitBody<RangeRecorder> body{&r};
  grid_stride<VEC>(n, tid, nthreads, body);
  return r.count;
}

// Calls f(std::integral_constant<int, VEC>{}) for VEC in {1, 2, 4, 8}, the widths that occur.
template <class F>
inline void dispatch_vec(int64_t vec, F&& f) {
  switch (vec) {
    case 1: f(std::integral_constant<int, 1>{}); return;
    case 2: f(std::integral_constant<int, 2>{}); return;
    case 4: f(std::integral_constant<int, 4>{}); return;
    case 8: f(std::integral_constant<int, 8>{}); return;
  }
  throw std::invalid_argument("avg_kernels: vector width must be 1, 2, 4 or 8");
}

}  // namespace cuda
}  // namespace avg_kernels
