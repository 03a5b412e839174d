// float16 / bfloat16 <-> float conversions on raw 16-bit patterns, host and device, torch-free.
// Round to nearest even (IEEE). The device uses the hardware conversions (cvt); the host versions
// are exact bit manipulations, so host emulations of GPU kernels round exactly like the GPU
// (tests compare them with PyTorch's own conversions over every 16-bit pattern).
#pragma once

#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define AK_BITS_HD __host__ __device__ __forceinline__
#else
#define AK_BITS_HD inline
#endif

namespace avg_kernels {

AK_BITS_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
#endif
}

AK_BITS_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
#endif
}

AK_BITS_HD float half_bits_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: man * 2^-24, exact in float
    const float v = float(man) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  if (exp == 31) return bits_float(sign | 0x7f800000u | (man << 13));  // inf / NaN (payload kept)
  return bits_float(sign | ((exp + 112u) << 23) | (man << 13));
#endif
}

AK_BITS_HD uint16_t float_to_half_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(f));
#else
  const uint32_t u = float_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u);  // NaN -> quiet NaN
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (a >= 0x38800000u) {  // normal half: rebias the exponent, round the 13 dropped bits to even
    const uint32_t r = a - (112u << 23) + 0xfffu + ((a >> 13) & 1u);
    return uint16_t(sign | (r >> 13));
  }
  // Subnormal half (|f| < 2^-14): the result is m * 2^(e-126) units of 2^-24, m the 24-bit
  // significand, e the biased float exponent; round the shifted-out bits to nearest even.
  const uint32_t e = a >> 23;
  const uint32_t shift = 126u - e;  // >= 14
  if (shift > 24u) return sign;     // < 2^-25: rounds to zero (2^-25 itself ties to even 0)
  const uint32_t m = (a & 0x7fffffu) | (e ? 0x800000u : 0u);
  uint32_t q = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (q & 1u))) ++q;
  return uint16_t(sign | q);
#endif
}

AK_BITS_HD float bf16_bits_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __bfloat162float(__ushort_as_bfloat16(h));
#else
  return bits_float(uint32_t(h) << 16);
#endif
}

AK_BITS_HD uint16_t float_to_bf16_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t(((u >> 16) & 0x8000u) | 0x7fc0u);  // quiet NaN
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);  // round to nearest even (inf stays inf)
#endif
}

}  // namespace avg_kernels
