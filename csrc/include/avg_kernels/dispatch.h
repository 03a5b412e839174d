// Host-side helpers shared by the CPU and CUDA launchers (no libtorch dependency).
#pragma once

#include <stdexcept>
#include <string>
#include <type_traits>

#include "activations.h"

namespace avg_kernels {

template <Act A>
using ActTag = std::integral_constant<Act, A>;

// Calls f(ActTag<A>{}) for the runtime id `act`, so each activation gets its own specialised loop.
template <class F>
decltype(auto) dispatch_act(int64_t act, F&& f) {
  switch (static_cast<Act>(act)) {
    case Act::Tanh: return f(ActTag<Act::Tanh>{});
    case Act::Sigmoid: return f(ActTag<Act::Sigmoid>{});
    case Act::Relu: return f(ActTag<Act::Relu>{});
    case Act::LeakyRelu: return f(ActTag<Act::LeakyRelu>{});
    case Act::Elu: return f(ActTag<Act::Elu>{});
    case Act::Gelu: return f(ActTag<Act::Gelu>{});
    case Act::GeluTanh: return f(ActTag<Act::GeluTanh>{});
    case Act::Silu: return f(ActTag<Act::Silu>{});
    case Act::Softplus: return f(ActTag<Act::Softplus>{});
  }
  throw std::invalid_argument("avg_kernels: unknown activation id " + std::to_string(act));
}

}  // namespace avg_kernels
