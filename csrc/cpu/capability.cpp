// See capability.h. Compiled at the default level (no SIMD flags): runs on any x86-64 CPU.
#include "capability.h"

#include <c10/util/Exception.h>

#include <atomic>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <cpuid.h>
#define AVG_KERNELS_X86 1
#endif

namespace avg_kernels::cpu {
namespace {

std::atomic<const Kernels*> g_kernels{nullptr};

#ifdef AVG_KERNELS_X86
// XCR0 through xgetbv, without -mxsave (this file has no ISA flags).
uint64_t read_xcr0() {
  uint32_t eax = 0, edx = 0;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (uint64_t(edx) << 32) | eax;
}
#endif

}  // namespace

const Kernels& kernels() {
  const Kernels* k = g_kernels.load(std::memory_order_acquire);
  TORCH_CHECK(k != nullptr,
              "avg_kernels: no CPU kernels are installed (avg_kernels._C was imported without avg_kernels/_build.py "
              "choosing a capability level; import avg_kernels instead)");
  return *k;
}

void set_kernels(const Kernels* table) {
  if (table != nullptr) {
    TORCH_CHECK(table->abi == kKernelsAbi && table->size == sizeof(Kernels),
                "avg_kernels: the CPU kernel module of level '", table->level, "' was built from other sources (table ABI ",
                table->abi, ", ", table->size, " bytes; this avg_kernels._C expects ", kKernelsAbi, ", ", sizeof(Kernels),
                "): rebuild with `pip install --no-build-isolation -e .`");
  }
  g_kernels.store(table, std::memory_order_release);
}

std::string active_level() {
  const Kernels* k = g_kernels.load(std::memory_order_acquire);
  return k ? k->level : "";
}

std::map<std::string, bool> cpu_features() {
  std::map<std::string, bool> f;
#ifdef AVG_KERNELS_X86
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27);
  f["sse4_2"] = c & (1u << 20);
  f["popcnt"] = c & (1u << 23);
  f["fma"] = c & (1u << 12);
  f["avx"] = c & (1u << 28);
  f["f16c"] = c & (1u << 29);
  const uint64_t xcr0 = osxsave ? read_xcr0() : 0;
  f["os_avx"] = (xcr0 & 0x6) == 0x6;           // SSE and AVX (ymm) state
  f["os_avx512"] = (xcr0 & 0xe6) == 0xe6;      // + opmask, zmm0-15 upper halves, zmm16-31
  unsigned a7 = 0, b7 = 0, c7 = 0, d7 = 0;
  if (__get_cpuid_count(7, 0, &a7, &b7, &c7, &d7)) {
    f["avx2"] = b7 & (1u << 5);
    f["avx512f"] = b7 & (1u << 16);
    f["avx512dq"] = b7 & (1u << 17);
    f["avx512bw"] = b7 & (1u << 30);
    f["avx512vl"] = b7 & (1u << 31);
  }
#endif
  return f;
}

}  // namespace avg_kernels::cpu
