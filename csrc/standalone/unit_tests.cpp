// Torch-free C++ unit tests of the shared kernel code (run by ctest, see CMakeLists.txt):
//   1. avg_slope<A> (activations.h), float and double, against the literal secant of each f in
//      long double on a grid of (x, d), with SPEC §1's bar;
//   2. the kernel's float16/bfloat16 conversions (avg_act_kernel.cuh): every 16-bit pattern,
//      and rounding to nearest even at every midpoint;
//   3. the grid-stride index logic: exhaustive exactly-once coverage for small n and many
//      launches; for n = 2^31 + 7 and 2^32 + 3 every thread of a production launch checked
//      against its arithmetic progression (64-bit offsets);
//   4. the host emulation of a launch (emulate_avg_act) against a plain loop, aligned and
//      misaligned, with guard elements around the output.
// Exit status 0 when every check passes; the first failures are printed.
#include <avg_kernels/activations.h>
#include <avg_kernels/dispatch.h>

#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "../cuda/avg_act_kernel.cuh"

using namespace avg_kernels;
using namespace avg_kernels::cuda;

namespace {

int g_failures = 0;
int g_checks = 0;

void check(bool ok, const std::string& what) {
  ++g_checks;
  if (!ok) {
    if (g_failures < 30) std::printf("FAIL: %s\n", what.c_str());
    ++g_failures;
  }
}

// ---- 1. math against long double ---------------------------------------------------------------
using LD = long double;

struct Cfg {
  const char* name;
  Act act;
  double p0, p1;
};

const Cfg kConfigs[] = {
    {"tanh", Act::Tanh, 0, 0},          {"sigmoid", Act::Sigmoid, 0, 0},      {"relu", Act::Relu, 0, 0},
    {"leaky_relu", Act::LeakyRelu, 0.01, 0}, {"leaky_relu(0.2)", Act::LeakyRelu, 0.2, 0},
    {"elu", Act::Elu, 1.0, 0},          {"elu(0.5)", Act::Elu, 0.5, 0},       {"gelu", Act::Gelu, 0, 0},
    {"gelu_tanh", Act::GeluTanh, 0, 0}, {"silu", Act::Silu, 0, 0},            {"softplus", Act::Softplus, 1, 20},
    {"softplus(2,10)", Act::Softplus, 2, 10}, {"hardswish", Act::Hardswish, 0, 0}, {"hardsigmoid", Act::Hardsigmoid, 0, 0},
    {"hardtanh", Act::Hardtanh, -1, 1}, {"hardtanh(0,6)", Act::Hardtanh, 0, 6}, {"hardtanh(-2.5,4)", Act::Hardtanh, -2.5, 4},
};

LD f_ld(const Cfg& c, LD x) {
  switch (c.act) {
    case Act::Tanh: return tanhl(x);
    case Act::Sigmoid: return 1.0L / (1.0L + expl(-x));
    case Act::Relu: return x > 0 ? x : 0.0L;
    case Act::LeakyRelu: return x > 0 ? x : LD(c.p0) * x;
    case Act::Elu: return x > 0 ? x : LD(c.p0) * expm1l(x);
    case Act::Gelu: return x * 0.5L * erfcl(-x / sqrtl(2.0L));
    case Act::GeluTanh: {
      const LD k = sqrtl(2.0L / 3.14159265358979323846264338327950288L);
      // 0.5 x (1 + tanh u) = x / (1 + e^{-2u}): the same function, without 1 + tanh u cancelling
      // in the negative tail (which would make the reference, not the kernel, wrong there).
      return x / (1.0L + expl(-2.0L * k * (x + 0.044715L * x * x * x)));
    }
    case Act::Silu: return x / (1.0L + expl(-x));
    case Act::Softplus: {
      const LD y = LD(c.p0) * x;
      return y > LD(c.p1) ? x : log1pl(expl(y)) / LD(c.p0);
    }
    case Act::Hardswish: return x * fminl(fmaxl(x + 3.0L, 0.0L), 6.0L) / 6.0L;
    case Act::Hardsigmoid: return fminl(fmaxl(x + 3.0L, 0.0L), 6.0L) / 6.0L;
    case Act::Hardtanh: return fminl(fmaxl(x, LD(c.p0)), LD(c.p1));  // bounds exact in float: as the kernels'
  }
  return 0;
}

template <class S>
S slope(const Cfg& c, S a, S b, S eps) {
  const ActParams<S> prm{S(c.p0), S(c.p1)};
  return dispatch_act(int64_t(c.act), [&](auto tag) { return avg_slope<decltype(tag)::value>(a, b, prm, eps); });
}

// The literal secant in long double is accurate to about 2^-64 (|f(a)| + |f(b)|) / |d| (the rounding
// of f, amplified by the cancellation): that term (times 4) is added to the bar; |d| >= 2e-7 keeps
// it below 1e-10, negligible for float and a few ulps for double near |x| = 30.
template <class S>
void test_slopes(const char* type, double rel, double abs_tol) {
  const S eps = S(1.1920929e-07);
  for (int id = 0; id < kNumActs; ++id) {  // every row of AVG_KERNELS_ACTIVATIONS has a case above
    bool found = false;
    for (const Cfg& c : kConfigs) found = found || int(c.act) == id;
    check(found, std::string("kConfigs has no case for ") + act_name(Act(id)));
  }
  for (const Cfg& c : kConfigs) {
    int bad = 0;
    double worst = 0;
    for (int i = 0; i <= 600; ++i) {
      const S a = S(-30.0 + 0.1 * i + 0.0123);
      for (int j = 0; j <= 80; ++j) {
        for (int sign = -1; sign <= 1; sign += 2) {
          const double d = sign * std::pow(10.0, -6.7 + 7.7 * j / 80.0);  // 2e-7 .. 10
          const S b = S(double(a) + d);
          if (!(std::fabs(double(b) - double(a)) > double(eps))) continue;
          const LD la = a, lb = b;
          const LD fa = f_ld(c, la), fb = f_ld(c, lb);
          const LD ref = (fb - fa) / (lb - la);
          const double ref_err = double(4 * LDBL_EPSILON * (fabsl(fa) + fabsl(fb)) / fabsl(lb - la));
          const double s = double(slope<S>(c, a, b, eps));
          const double err = std::fabs(s - double(ref));
          const double tol = rel * std::fabs(double(ref)) + abs_tol + ref_err;
          if (!(err <= tol)) {
            if (bad < 3)
              std::printf("  %s %s a=%.9g b=%.9g s=%.17g ref=%.17Lg\n", type, c.name, double(a), double(b), s, ref);
            ++bad;
          }
          worst = std::max(worst, err / tol);
        }
      }
    }
    check(bad == 0, std::string("avg_slope<") + type + "> " + c.name + ": " + std::to_string(bad) + " over the bar");
    std::printf("  avg_slope<%s> %-16s worst error / bar = %.3g\n", type, c.name, worst);
  }
}

// ---- 2. 16-bit conversions --------------------------------------------------------------------
double half_value(uint16_t h) {  // independent decoding, for finite h
  const int e = (h >> 10) & 31, m = h & 1023;
  const double v = e == 0 ? std::ldexp(double(m), -24) : std::ldexp(double(1024 + m), e - 25);
  return (h & 0x8000) ? -v : v;
}

void test_conversions() {
  int bad = 0;
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = half_bits_to_float(uint16_t(h));
    const int e = (h >> 10) & 31;
    if (e == 31) {
      bad += (h & 1023) ? !std::isnan(f) : !(std::isinf(f) && ((h & 0x8000) != 0) == std::signbit(f));
      const uint16_t back = float_to_half_bits(f);
      bad += (h & 1023) ? ((back & 0x7c00) != 0x7c00 || !(back & 1023)) : back != h;  // NaN stays NaN
      continue;
    }
    bad += double(f) != half_value(uint16_t(h)) || std::signbit(f) != ((h & 0x8000) != 0);
    bad += float_to_half_bits(f) != h;  // exact values convert back exactly
    // Midpoint to the next larger magnitude: ties to the even neighbour; just below / above it
    // to the nearer one.
    if ((h & 0x7fff) < 0x7bff) {
      const double lo = half_value(uint16_t(h)), hi = half_value(uint16_t(h + 1));
      const float mid = float((lo + hi) / 2);  // exact in float (one more bit)
      const uint16_t even = (h & 1) ? uint16_t(h + 1) : uint16_t(h);
      bad += float_to_half_bits(mid) != even;
      bad += float_to_half_bits(std::nextafter(mid, 0.0f)) != h;
      bad += float_to_half_bits(std::nextafter(mid, mid * 2)) != uint16_t(h + 1);
    }
  }
  // Overflow: 65504 is the largest half; [65520, inf) rounds to inf.
  bad += float_to_half_bits(65519.99f) != 0x7bff || float_to_half_bits(65520.0f) != 0x7c00;
  bad += float_to_half_bits(-1e30f) != 0xfc00 || float_to_half_bits(1e-30f) != 0;
  bad += float_to_half_bits(-1e-30f) != 0x8000 || float_to_half_bits(std::ldexp(1.0f, -25)) != 0;
  bad += float_to_half_bits(std::nextafter(std::ldexp(1.0f, -25), 1.0f)) != 1;
  check(bad == 0, "float16 conversions: " + std::to_string(bad) + " wrong");

  bad = 0;
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = bf16_bits_to_float(uint16_t(h));
    uint32_t u;
    std::memcpy(&u, &f, 4);
    bad += u != (h << 16);
    if (std::isnan(f)) {
      bad += !std::isnan(bf16_bits_to_float(float_to_bf16_bits(f)));
      continue;
    }
    bad += float_to_bf16_bits(f) != h;
    if ((h & 0x7fff) < 0x7f7f) {  // midpoint with the next larger magnitude (finite)
      const uint32_t mid_bits = (h << 16) | 0x8000u;
      float mid;
      std::memcpy(&mid, &mid_bits, 4);
      const uint16_t even = (h & 1) ? uint16_t(h + 1) : uint16_t(h);
      bad += float_to_bf16_bits(mid) != even;
      bad += float_to_bf16_bits(std::nextafter(mid, 0.0f)) != h;
      bad += float_to_bf16_bits(std::nextafter(mid, mid * 2)) != uint16_t(h + 1);
    }
  }
  check(bad == 0, "bfloat16 conversions: " + std::to_string(bad) + " wrong");
}

// ---- 3. index coverage ------------------------------------------------------------------------
template <int VEC>
struct CountBodyT {
  std::vector<uint8_t>* hits;
  void vec(int64_t i) {
    for (int64_t k = 0; k < VEC; ++k) ++(*hits)[size_t(i + k)];
  }
  void one(int64_t i) { ++(*hits)[size_t(i)]; }
};

template <int VEC>
void exhaustive_coverage(int64_t n, uint32_t grid, uint32_t block) {
  std::vector<uint8_t> hits(size_t(n + 8), 0);
  CountBodyT<VEC> body{&hits};
  emulate_launch(LaunchConfig{grid, block}, [&](int64_t tid, int64_t nt) { grid_stride<VEC>(n, tid, nt, body); });
  int64_t bad = 0;
  for (int64_t i = 0; i < n + 8; ++i) bad += hits[size_t(i)] != (i < n ? 1 : 0);
  check(bad == 0, "exhaustive coverage VEC=" + std::to_string(VEC) + " n=" + std::to_string(n) + " grid=" +
                      std::to_string(grid) + " block=" + std::to_string(block));
}

template <int VEC>
void progression_coverage(int64_t n, uint32_t grid, uint32_t block, int64_t t_begin, int64_t t_end) {
  const int64_t nt = grid_threads(grid, block);
  int64_t elements = 0, errors = 0, max_end = 0;
  for (int64_t t = t_begin; t < t_end; ++t) {
    const int64_t tid = global_thread_id(uint32_t(t / block), uint32_t(t % block), block);
    errors += tid != t;
    const CoverageCheck c = check_thread_coverage<VEC>(n, tid, nt);
    elements += c.elements;
    errors += c.errors;
    max_end = std::max(max_end, c.max_end);
  }
  const bool all = t_begin == 0 && t_end == nt;
  check(errors == 0 && (!all || (elements == n && max_end == n)),
        "progression coverage VEC=" + std::to_string(VEC) + " n=" + std::to_string(n) + " errors=" +
            std::to_string(errors) + " elements=" + std::to_string(elements));
}

void test_coverage() {
  const int64_t sizes[] = {0, 1, 2, 3, 7, 8, 9, 31, 33, 255, 257, 1023, 1025, 4097, 65537, 100003};
  const LaunchConfig cfgs[] = {{1, 1}, {1, 32}, {3, 96}, {1, 256}, {7, 256}, {1056, 256}, {5000, 1024}};
  for (int64_t n : sizes)
    for (const LaunchConfig& c : cfgs) {
      exhaustive_coverage<1>(n, c.grid, c.block);
      exhaustive_coverage<2>(n, c.grid, c.block);
      exhaustive_coverage<4>(n, c.grid, c.block);
      exhaustive_coverage<8>(n, c.grid, c.block);
    }
  // Beyond 2^31 and 2^32 elements: a production-like launch (132 SMs x 8 resident blocks).
  for (int64_t n : {(int64_t(1) << 31) + 7, (int64_t(1) << 32) + 3}) {
    for (int vec : {1, 2, 4, 8}) {
      const LaunchConfig c = launch_config(n, vec, 132, 8);
      check(c.grid == 1056 && c.block == 256, "production config for large n");
      const int64_t nt = grid_threads(c.grid, c.block);
      if (vec == 8) {  // every thread (n / 8 visits in all)
        progression_coverage<8>(n, c.grid, c.block, 0, nt);
      } else {  // first and last 2048 threads
        auto run = [&](int64_t lo, int64_t hi) {
          if (vec == 1) progression_coverage<1>(n, c.grid, c.block, lo, hi);
          if (vec == 2) progression_coverage<2>(n, c.grid, c.block, lo, hi);
          if (vec == 4) progression_coverage<4>(n, c.grid, c.block, lo, hi);
        };
        run(0, 2048);
        run(nt - 2048, nt);
      }
    }
    // The largest legal grid: 2^31 - 1 blocks of 1024 threads (ids beyond 2^41): the threads
    // around n - 1 and the very last one.
    const uint32_t big_grid = 0x7fffffffu, big_block = 1024;
    progression_coverage<1>(n, big_grid, big_block, n - 5000, n + 5000);
    progression_coverage<4>(n, big_grid, big_block, n / 4 - 5000, n / 4 + 5000);
    progression_coverage<4>(n, big_grid, big_block, 0, 3);
    progression_coverage<8>(n, big_grid, big_block, grid_threads(big_grid, big_block) - 3,
                            grid_threads(big_grid, big_block));
    // The last element is visited by the thread the arithmetic predicts, at its 64-bit offset.
    int64_t ranges[2 * 4];
    const int64_t cnt = record_thread_ranges<1>(n, n - 1, grid_threads(big_grid, big_block), ranges, 4);
    check(cnt == 1 && ranges[0] == n - 1 && ranges[1] == 1, "last element at its 64-bit offset");
  }
  // launch_config: a grid never larger than needed nor than one wave; enough threads for n.
  for (int64_t n : {int64_t(1), int64_t(255), int64_t(256), int64_t(257), int64_t(1) << 20, int64_t(1) << 40}) {
    for (int vec : {1, 2, 4, 8}) {
      const LaunchConfig c = launch_config(n, vec, 132, 8);
      const int64_t need = (n + 256 * vec - 1) / (256 * vec);
      check(c.block == 256 && int64_t(c.grid) == std::min<int64_t>(need, 1056), "launch_config");
    }
  }
}

// ---- 4. host emulation of the kernel ----------------------------------------------------------
void test_emulation() {
  const ActParams<float> prm{0, 0};
  const float eps = 1.1920929e-07f;
  for (int64_t n : {1, 3, 4, 5, 63, 64, 65, 1000, 4099}) {
    for (int offset : {0, 1}) {  // offset 1 element: misaligned, the scalar path
      for (const LaunchConfig& c : {LaunchConfig{1, 1}, LaunchConfig{1, 32}, LaunchConfig{64, 256}}) {
        // 16-byte aligned buffers with 8 guard elements on each side
        alignas(16) static float buf_g[5000], buf_x[5000], buf_xn[5000], buf_out[5000];
        for (int i = 0; i < 5000; ++i) {
          buf_g[i] = 0.5f + 0.001f * float(i % 97);
          buf_x[i] = -6.0f + 0.0031f * float(i);
          buf_xn[i] = buf_x[i] + ((i % 3) ? 0.37f : -1e-3f * float(i % 11));
          buf_out[i] = -12345.0f;
        }
        AvgActArgs<ElemF32> a{buf_g + 8 + offset, buf_x + 8 + offset, buf_xn + 8 + offset, buf_out + 8 + offset, n,
                              prm, EpsCut<float>::exactly(eps)};
        const bool vec = emulate_avg_act<Act::Tanh>(a, c);
        check(vec == (offset == 0), "vector path exactly when aligned");
        int bad = 0;
        for (int64_t i = 0; i < 5000; ++i) {
          const int64_t k = i - 8 - offset;
          if (k >= 0 && k < n) {
            const float want = a.grad_out[k] * avg_slope<Act::Tanh>(a.x[k], a.x_new[k], prm, eps);
            bad += buf_out[i] != want;
          } else {
            bad += buf_out[i] != -12345.0f;  // nothing written outside [0, n)
          }
        }
        check(bad == 0, "emulated tanh n=" + std::to_string(n) + " offset=" + std::to_string(offset));
      }
    }
  }
  // float16 through the kernel: loads, float math, one rounding on the store.
  alignas(16) static uint16_t hg[40], hx[40], hxn[40], hout[40];
  for (int i = 0; i < 40; ++i) {
    hg[i] = float_to_half_bits(1.0f + 0.25f * float(i % 5));
    hx[i] = float_to_half_bits(-3.0f + 0.15f * float(i));
    hxn[i] = float_to_half_bits(-2.0f + 0.1f * float(i));
    hout[i] = 0x7e00;
  }
  AvgActArgs<ElemF16> h{hg, hx, hxn, hout, 37, prm, EpsCut<float>::exactly(eps)};
  check(emulate_avg_act<Act::Sigmoid>(h, LaunchConfig{2, 2}), "float16 vector path");
  int bad = 0;
  for (int i = 0; i < 40; ++i) {
    const uint16_t want = i < 37 ? float_to_half_bits(half_bits_to_float(hg[i]) *
                                                      avg_slope<Act::Sigmoid>(half_bits_to_float(hx[i]),
                                                                              half_bits_to_float(hxn[i]), prm, eps))
                                 : uint16_t(0x7e00);
    bad += hout[i] != want;
  }
  check(bad == 0, "emulated float16 sigmoid");
  // A vector access through a misaligned pointer is refused by the emulation.
  alignas(16) static float probe[8] = {};
  bool threw = false;
  try {
    load_pack(probe + 1);
  } catch (const std::logic_error&) {
    threw = true;
  }
  check(threw, "misaligned vector access detected");
}

}  // namespace

int main() {
  std::printf("avg_slope vs long double literal secant:\n");
  test_slopes<float>("float", 1e-5, 1e-6);      // SPEC §1's float32 bar
  test_slopes<double>("double", 1e-12, 1e-15);
  test_conversions();
  test_coverage();
  test_emulation();
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
