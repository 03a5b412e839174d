// The CPU capability level in use: which level's kernel table (kernels.h) the ops of avg_kernels._C call.
// avg_kernels/_build.py chooses the level from cpu_features() and installs its table at import.
#pragma once

#include <map>
#include <string>

#include "kernels.h"

namespace avg_kernels::cpu {

// The installed table; raises (RuntimeError) when none is installed.
const Kernels& kernels();

// Installs `table` (checked against this build's kKernelsAbi and sizeof(Kernels)); nullptr uninstalls.
void set_kernels(const Kernels* table);

// The installed level's name, or "" when none is.
std::string active_level();

// What the running CPU and OS support, by cpuid and xgetbv (x86-64; empty elsewhere): sse4_2, popcnt,
// avx, fma, f16c, avx2, avx512f, avx512dq, avx512vl, avx512bw, and os_avx / os_avx512 (the OS saves
// the ymm / zmm and mask registers: XCR0).
std::map<std::string, bool> cpu_features();

}  // namespace avg_kernels::cpu
