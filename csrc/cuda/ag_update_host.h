// Host glue between the torch-facing ops and the torch-free launch sequence of ag_update_kernel.cuh:
// the checked, prepared tensor lists (csrc/ag_lists.h) become the two arithmetic groups of
// TensorRefs. Shared by the CUDA ops (ag_update.cu) and their host emulation
// (csrc/cpu/ag_update_emulation.cpp), so the emulation exercises the same grouping.
#pragma once

#include <ATen/ATen.h>

#include "../ag_lists.h"
#include "ag_update_kernel.cuh"

namespace avg_kernels::ag_cuda {

inline uint8_t dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return mta::kHalf;
    case at::kBFloat16: return mta::kBFloat16;
    case at::kFloat: return mta::kFloat;
    case at::kDouble: return mta::kDouble;
    default: TORCH_CHECK_TYPE(false, "multi_tensor_apply: unsupported dtype ", t);
  }
}

// groups[0]: entries computed in float, groups[1]: entries with a float64 member (SPEC §2).
inline void make_groups(const ag::Prepared<3>& prep, Refs (&groups)[2]) {
  for (const auto& e : prep.entries) {
    mta::TensorRef<3> r;
    for (int d = 0; d < 3; ++d) {
      r.addr[d] = e.ptr[d];
      r.dtype[d] = dtype_code(e.dtype[d]);
    }
    r.numel = e.numel;
    r.index = int32_t(e.index);
    groups[ag::wants_double(e) ? 1 : 0].push_back(r);
  }
}

}  // namespace avg_kernels::ag_cuda
