// Host-side helpers shared by the CPU and CUDA launchers (no libtorch dependency).
#pragma once

#include <stdexcept>
#include <string>
#include <type_traits>

#include "activations.h"

namespace avg_kernels {

template <Act A>
using ActTag = std::integral_constant<Act, A>;

// Calls f(ActTag<A>{}) for the runtime id `act`, so each activation gets its own specialised loop:
// one case per row of AVG_KERNELS_ACTIVATIONS (activations.h).
template <class F>
decltype(auto) dispatch_act(int64_t act, F&& f) {
  switch (static_cast<Act>(act)) {
#define AK_DISPATCH_CASE(E, id, name, bounded) \
  case Act::E:                                 \
    return f(ActTag<Act::E>{});
    AVG_KERNELS_ACTIVATIONS(AK_DISPATCH_CASE)
#undef AK_DISPATCH_CASE
  }
  throw std::invalid_argument("avg_kernels: unknown activation id " + std::to_string(act));
}

}  // namespace avg_kernels
