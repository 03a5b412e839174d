// One entry of a multi-tensor op's flat buffers (SPEC §2): element k of every member is the same logical
// element. Made by prepare() in ag_lists.h; consumed by the CPU kernels (csrc/cpu/kernels/ag_update.cpp)
// and the CUDA launcher. Light (no ATen): the CPU kernel table (csrc/cpu/kernels.h) names it.
#pragma once

#include <c10/core/ScalarType.h>

#include <array>
#include <cstdint>

namespace avg_kernels::ag {

template <int Depth>
struct FlatEntry {
  std::array<void*, Depth> ptr;
  std::array<c10::ScalarType, Depth> dtype;
  int64_t numel;
  int64_t index;  // position in the user's lists
};

// float64 arithmetic when any member is float64 (SPEC §2), else float32.
template <int Depth>
bool wants_double(const FlatEntry<Depth>& e) {
  for (int r = 0; r < Depth; ++r)
    if (e.dtype[r] == c10::kDouble) return true;
  return false;
}

}  // namespace avg_kernels::ag
