// A vectorised, multi-threaded elementwise map for contiguous buffers: out[i] = f(in_k[i]...),
// with f written once for at::vec::Vectorized<opmath_t>. Float16/BFloat16 are widened to float
// (two float registers per reduced-precision register) and rounded once on the store.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <tuple>
#include <type_traits>

namespace avg_kernels::cpu {

// Transcendental-heavy maps are worth threading at smaller sizes than ATen's 32768 default.
constexpr int64_t kGrain = 4096;

#if defined(__GNUC__)
#define AK_FLATTEN __attribute__((flatten))
#else
#define AK_FLATTEN
#endif

namespace detail {

// One thread's part [begin, end) of parallel_map. f and the pointers are taken by value: as locals
// they stay in registers (read through references, they were reloaded after every store to out).
// flatten: f and everything it calls are inlined into the loop, so the math's constants are set up
// once per range, not per vector in an out-of-line call (GCC keeps functions as big as avg_slope out
// of line otherwise).
template <typename scalar_t, typename F, typename... In>
AK_FLATTEN void map_range(int64_t begin, int64_t end, const F f, scalar_t* out, const In*... in) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<opmath_t>;
  using SVec = at::vec::Vectorized<scalar_t>;
  int64_t i = begin;
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    for (; i + Vec::size() <= end; i += Vec::size()) f(Vec::loadu(in + i)...).store(out + i);
    if (i < end) {  // tail: partial loads zero-fill the unused lanes
      const int64_t c = end - i;
      f(Vec::loadu(in + i, c)...).store(out + i, c);
    }
  } else {
    auto step = [&](const auto&... v) {
      auto lo_hi = std::make_tuple(at::vec::convert_to_float<scalar_t>(v)...);
      auto r0 = std::apply([&](const auto&... p) { return f(std::get<0>(p)...); }, lo_hi);
      auto r1 = std::apply([&](const auto&... p) { return f(std::get<1>(p)...); }, lo_hi);
      return at::vec::convert_from_float<scalar_t>(r0, r1);
    };
    for (; i + SVec::size() <= end; i += SVec::size()) step(SVec::loadu(in + i)...).store(out + i);
    if (i < end) {
      const int64_t c = end - i;
      step(SVec::loadu(in + i, c)...).store(out + i, c);
    }
  }
}

}  // namespace detail

// out[i] = f(in[i]...) over [0, n), threaded. f should capture by value (see detail::map_range).
template <typename scalar_t, typename F, typename... In>
void parallel_map(scalar_t* out, int64_t n, const F& f, const In*... in) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    detail::map_range(begin, end, f, out, in...);
  });
}

}  // namespace avg_kernels::cpu
