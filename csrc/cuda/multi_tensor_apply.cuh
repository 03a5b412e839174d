// A reusable multi-tensor launcher (the apex / PyTorch fused-optimizer idea), torch-free.
//
// A call over many tensors makes a fixed number of launches per dtype group instead of one per
// tensor: the host packs the tensors' addresses, element types and sizes, and a block -> (tensor,
// chunk) map, into a TensorTable passed BY VALUE as the kernel argument (__grid_constant__, so the
// kernel reads it from the constant bank without a local copy). Block b of a launch processes
// elements [c * chunk, min((c + 1) * chunk, numel)) of tensor block_tensor[b], c = block_chunk[b].
// A list that does not fit one table (MaxTensors tensors or MaxBlocks blocks) is split over several
// tables, one launch each ("one launch per chunk list"); a tensor whose chunks straddle two tables
// is carried over to the next one. Offsets are 64-bit everywhere (a tensor may exceed 2^31 elements).
//
// Everything below is __host__ __device__ or host code that compiles as plain C++ (g++, no CUDA
// headers), so the host emulation (csrc/cpu/ag_update_emulation.cpp) runs the very same planning,
// block-task, thread-loop, element I/O and block-reduction code as the GPU, one (block, thread) at a
// time. Only the __global__ wrappers live in the files that launch them (e.g. ag_update_kernel.cuh).
//
// Element types are runtime codes (float16, bfloat16, float32, float64) read from the table, so one
// kernel per arithmetic type (float / double) serves every dtype combination: the switch on a code is
// uniform across a block (one tensor per block), and nvcc compiles 2 kernels instead of 4^3.
#pragma once

#include <stdint.h>
#include <string.h>

#if !defined(__CUDACC_RTC__)
#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>
#endif

#include <avg_kernels/half_bits.h>

#if defined(__CUDACC__)
#define AK_MTA_HD __host__ __device__ __forceinline__
#define AK_MTA_UNROLL _Pragma("unroll")
#else
#define AK_MTA_HD inline
#define AK_MTA_UNROLL
#endif

namespace avg_kernels {
namespace mta {

// Element type codes stored in a TensorTable.
enum Dtype : uint8_t { kHalf = 0, kBFloat16 = 1, kFloat = 2, kDouble = 3 };

AK_MTA_HD int dtype_size(uint8_t dt) { return dt == kDouble ? 8 : dt == kFloat ? 4 : 2; }

// Threads per block of every multi-tensor launch (a power of two: the block reduction is a tree).
constexpr int kThreads = 512;
// Consecutive elements per thread and iteration: 16-byte accesses for float32 (8 for 16-bit types,
// 2 x 16 for float64) when a tensor's addresses allow it.
constexpr int kILP = 4;
// Elements per block (chunk) in production: 32 iterations of kThreads * kILP.
constexpr int64_t kChunk = 65536;

// Kernel-argument budget: 32764 bytes since CUDA 12.1 on Volta and newer, 4 KB before.
#if defined(__CUDACC__) && defined(CUDART_VERSION) && CUDART_VERSION < 12010
constexpr int kParamBytes = 4096;
constexpr int kMaxTensors3 = 48;
constexpr int kMaxBlocks3 = 160;
#else
constexpr int kParamBytes = 32764;
constexpr int kMaxTensors3 = 320;
constexpr int kMaxBlocks3 = 2048;
#endif

template <int Depth, int MaxTensors, int MaxBlocks>
struct TensorTable {
  static constexpr int depth = Depth;
  static constexpr int max_tensors = MaxTensors;
  static constexpr int max_blocks = MaxBlocks;
  static_assert(MaxTensors <= 65535, "block_tensor is 16-bit");

  void* addr[Depth][MaxTensors];
  int64_t numel[MaxTensors];
  uint8_t dtype[Depth][MaxTensors];
  uint16_t block_tensor[MaxBlocks];  // table slot of each block's tensor
  uint32_t block_chunk[MaxBlocks];   // chunk index within that tensor (offset = chunk index * chunk)
  int32_t n_tensors;
  int32_t n_blocks;
  int64_t first_block;  // global index of block 0 of this table among all blocks of the call
  int32_t slot_index[MaxTensors];  // host bookkeeping: position of each slot in the caller's list
};

// The table of the three-tensor ops (AG-1: θ, θ', ḡ; AG-2: θ'', θ, θ').
using Table3 = TensorTable<3, kMaxTensors3, kMaxBlocks3>;
static_assert(sizeof(Table3) <= kParamBytes, "TensorTable exceeds the kernel-argument limit");

// ---------------------------------------------------------------------------------------------
// Host planning.
// ---------------------------------------------------------------------------------------------
#if !defined(__CUDACC_RTC__)
template <int Depth>
struct TensorRef {
  void* addr[Depth];
  uint8_t dtype[Depth];
  int64_t numel;
  int32_t index;  // caller's list position (reported back through slot_index)
};

// Calls emit(table) for each table of the plan, in order; the first table's first_block is
// `first_block` (blocks are numbered consecutively across tables). Tensors with numel == 0 get no
// block; every other tensor gets ceil(numel / chunk) blocks (count_blocks), whatever the split.
// max_tensors / max_blocks (<= the table's capacity) may be lowered, e.g. by tests that want many
// tables from a short list. chunk must be a positive multiple of kILP.
template <class Table, class Emit>
void plan_tables(const std::vector<TensorRef<Table::depth>>& refs, int64_t chunk, int max_tensors, int max_blocks,
                 Emit&& emit, int64_t first_block = 0) {
  if (chunk <= 0 || chunk % kILP != 0)
    throw std::invalid_argument("multi_tensor_apply: chunk must be a positive multiple of " + std::to_string(kILP));
  if (max_tensors < 1 || max_tensors > Table::max_tensors || max_blocks < 1 || max_blocks > Table::max_blocks)
    throw std::invalid_argument("multi_tensor_apply: table limits out of range");
  Table t;
  t.n_tensors = 0;
  t.n_blocks = 0;
  t.first_block = first_block;
  auto put_tensor = [&](int slot, const TensorRef<Table::depth>& r) {
    for (int d = 0; d < Table::depth; ++d) {
      t.addr[d][slot] = r.addr[d];
      t.dtype[d][slot] = r.dtype[d];
    }
    t.numel[slot] = r.numel;
    t.slot_index[slot] = r.index;
  };
  for (const auto& r : refs) {
    if (r.numel <= 0) continue;
    const int64_t n_chunks = (r.numel + chunk - 1) / chunk;
    if (n_chunks > int64_t(UINT32_MAX)) throw std::invalid_argument("multi_tensor_apply: tensor too large for chunk");
    int slot = t.n_tensors++;
    put_tensor(slot, r);
    for (int64_t c = 0; c < n_chunks; ++c) {
      t.block_tensor[t.n_blocks] = uint16_t(slot);
      t.block_chunk[t.n_blocks] = uint32_t(c);
      ++t.n_blocks;
      const bool last_chunk = c == n_chunks - 1;
      if (t.n_blocks == max_blocks || (t.n_tensors == max_tensors && last_chunk)) {
        emit(static_cast<const Table&>(t));
        t.first_block += t.n_blocks;
        t.n_blocks = 0;
        if (last_chunk) {
          t.n_tensors = 0;
        } else {  // the rest of this tensor's chunks go to the next table, as its slot 0
          put_tensor(0, r);
          t.n_tensors = 1;
          slot = 0;
        }
      }
    }
  }
  if (t.n_blocks > 0) emit(static_cast<const Table&>(t));
}

template <int Depth>
int64_t count_blocks(const std::vector<TensorRef<Depth>>& refs, int64_t chunk) {
  int64_t n = 0;
  for (const auto& r : refs)
    if (r.numel > 0) n += (r.numel + chunk - 1) / chunk;
  return n;
}
#endif

// ---------------------------------------------------------------------------------------------
// Block and thread index logic (host and device).
// ---------------------------------------------------------------------------------------------
struct BlockTask {
  int slot;
  int64_t begin;
  int64_t end;
};

template <class Table>
AK_MTA_HD BlockTask block_task(const Table& t, int block, int64_t chunk) {
  const int slot = t.block_tensor[block];
  const int64_t begin = int64_t(t.block_chunk[block]) * chunk;
  const int64_t n = t.numel[slot];
  return {slot, begin, n - begin < chunk ? n : begin + chunk};
}

// Thread tid of nthreads handles the groups of kILP consecutive elements starting at
// begin + (tid + j * nthreads) * kILP, j = 0, 1, ...: f(i, count, whole) for each, count = kILP
// except at the end of the span, whole = count == kILP and `aligned` (one vector access per member).
// Consecutive threads touch consecutive groups (coalesced accesses).
template <class F>
AK_MTA_HD void for_groups(int64_t begin, int64_t end, int tid, int nthreads, bool aligned, F&& f) {
  for (int64_t i = begin + int64_t(tid) * kILP; i < end; i += int64_t(nthreads) * kILP) {
    const int count = end - i < kILP ? int(end - i) : kILP;
    f(i, count, aligned && count == kILP);
  }
}

// True when every address of a tensor's chunks is aligned for whole-group (kILP-element) accesses:
// chunks start at multiples of chunk (a multiple of kILP), so the base address decides.
AK_MTA_HD bool group_aligned(const void* p, uint8_t dt) {
  return (reinterpret_cast<uintptr_t>(p) % uintptr_t(kILP * dtype_size(dt))) == 0;
}

// float16 / bfloat16 <-> float: avg_kernels/half_bits.h (shared with the elementwise kernels).

// ---------------------------------------------------------------------------------------------
// Element I/O with runtime element types: a group of `count` (<= kILP) elements at index i of the
// tensor at `base`, converted to / from the arithmetic type Op. `whole` (count == kILP and the
// tensor group_aligned) uses one 8/16-byte access (two for float64); otherwise element by element.
// Results are rounded once: float64 -> float16/bfloat16 goes through float32, as PyTorch's does.
// ---------------------------------------------------------------------------------------------
template <int Bytes>
AK_MTA_HD void copy_group(void* dst, const void* src) {
#if defined(__CUDA_ARCH__)
  if constexpr (Bytes == 8) {
    *static_cast<uint2*>(dst) = *static_cast<const uint2*>(src);
  } else if constexpr (Bytes == 16) {
    *static_cast<uint4*>(dst) = *static_cast<const uint4*>(src);
  } else {
    static_assert(Bytes == 32, "group size");
    static_cast<uint4*>(dst)[0] = static_cast<const uint4*>(src)[0];
    static_cast<uint4*>(dst)[1] = static_cast<const uint4*>(src)[1];
  }
#else
  memcpy(dst, src, Bytes);
#endif
}

template <class Op>
AK_MTA_HD void load_group(const void* base, uint8_t dt, int64_t i, int count, bool whole, Op (&out)[kILP]) {
  switch (dt) {
    case kHalf:
    case kBFloat16: {
      alignas(8) uint16_t v[kILP];
      const uint16_t* p = static_cast<const uint16_t*>(base);
      if (whole) {
        copy_group<2 * kILP>(v, p + i);
      } else {
        AK_MTA_UNROLL
        for (int k = 0; k < kILP; ++k) v[k] = k < count ? p[i + k] : uint16_t(0);
      }
      AK_MTA_UNROLL
      for (int k = 0; k < kILP; ++k) out[k] = Op(dt == kHalf ? half_bits_to_float(v[k]) : bf16_bits_to_float(v[k]));
      break;
    }
    case kFloat: {
      alignas(16) float v[kILP];
      const float* p = static_cast<const float*>(base);
      if (whole) {
        copy_group<4 * kILP>(v, p + i);
      } else {
        AK_MTA_UNROLL
        for (int k = 0; k < kILP; ++k) v[k] = k < count ? p[i + k] : 0.0f;
      }
      AK_MTA_UNROLL
      for (int k = 0; k < kILP; ++k) out[k] = Op(v[k]);
      break;
    }
    default: {
      alignas(16) double v[kILP];
      const double* p = static_cast<const double*>(base);
      if (whole) {
        copy_group<8 * kILP>(v, p + i);
      } else {
        AK_MTA_UNROLL
        for (int k = 0; k < kILP; ++k) v[k] = k < count ? p[i + k] : 0.0;
      }
      AK_MTA_UNROLL
      for (int k = 0; k < kILP; ++k) out[k] = Op(v[k]);
      break;
    }
  }
}

template <class Op>
AK_MTA_HD void store_group(void* base, uint8_t dt, int64_t i, int count, bool whole, const Op (&x)[kILP]) {
  switch (dt) {
    case kHalf:
    case kBFloat16: {
      alignas(8) uint16_t v[kILP];
      AK_MTA_UNROLL
      for (int k = 0; k < kILP; ++k) v[k] = dt == kHalf ? float_to_half_bits(float(x[k])) : float_to_bf16_bits(float(x[k]));
      uint16_t* p = static_cast<uint16_t*>(base);
      if (whole) {
        copy_group<2 * kILP>(p + i, v);
      } else {
        AK_MTA_UNROLL
        for (int k = 0; k < kILP; ++k)
          if (k < count) p[i + k] = v[k];
      }
      break;
    }
    case kFloat: {
      alignas(16) float v[kILP];
      AK_MTA_UNROLL
      for (int k = 0; k < kILP; ++k) v[k] = float(x[k]);
      float* p = static_cast<float*>(base);
      if (whole) {
        copy_group<4 * kILP>(p + i, v);
      } else {
        AK_MTA_UNROLL
        for (int k = 0; k < kILP; ++k)
          if (k < count) p[i + k] = v[k];
      }
      break;
    }
    default: {
      alignas(16) double v[kILP];
      AK_MTA_UNROLL
      for (int k = 0; k < kILP; ++k) v[k] = double(x[k]);
      double* p = static_cast<double*>(base);
      if (whole) {
        copy_group<8 * kILP>(p + i, v);
      } else {
        AK_MTA_UNROLL
        for (int k = 0; k < kILP; ++k)
          if (k < count) p[i + k] = v[k];
      }
      break;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Deterministic block reduction of a pair of doubles: the fixed tree v[i] += v[i + s] for
// s = n/2, n/4, ..., 1. The device runs it with shared memory down to s = 32 and warp shuffles
// below (lane i adds lane i + s: the same additions in the same order); tree_sum2_host runs it
// serially. Both give bitwise the same result, independent of timing.
// ---------------------------------------------------------------------------------------------
#if !defined(__CUDACC_RTC__)
inline void tree_sum2_host(std::vector<double>& a, std::vector<double>& b) {
  for (size_t s = a.size() / 2; s > 0; s /= 2)
    for (size_t i = 0; i < s; ++i) {
      a[i] += a[i + s];
      b[i] += b[i + s];
    }
}
#endif

#if defined(__CUDACC__)
// Returns the block totals in thread 0 (other threads: partial values). NT: threads per block.
template <int NT>
__device__ __forceinline__ void block_tree_sum2(double& a, double& b) {
  static_assert(NT >= 64 && (NT & (NT - 1)) == 0, "power of two >= 64");
  __shared__ double sa[NT], sb[NT];
  const int tid = threadIdx.x;
  sa[tid] = a;
  sb[tid] = b;
  __syncthreads();
#pragma unroll
  for (int s = NT / 2; s >= 32; s >>= 1) {
    if (tid < s) {
      sa[tid] += sa[tid + s];
      sb[tid] += sb[tid + s];
    }
    __syncthreads();
  }
  if (tid < 32) {
    a = sa[tid];
    b = sb[tid];
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) {
      const double oa = __shfl_down_sync(0xffffffffu, a, s);
      const double ob = __shfl_down_sync(0xffffffffu, b, s);
      a += oa;
      b += ob;
    }
  }
}
#endif

}  // namespace mta
}  // namespace avg_kernels
