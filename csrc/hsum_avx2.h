// The horizontal sum of 8 floats that dot_f32 (kernels.cpp) uses, shared
// with the attention kernel (fused_ops.cpp), whose dot products must match
// dot_f32's bit for bit. x86 only; include after <immintrin.h>.
#pragma once

namespace mlx_llama {

// (lo + hi) per lane, then the pair sums, then the two pairs.
__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  __m128 sh = _mm_movehdup_ps(lo);
  __m128 s = _mm_add_ps(lo, sh);
  sh = _mm_movehl_ps(sh, s);
  s = _mm_add_ss(s, sh);
  return _mm_cvtss_f32(s);
}

} // namespace mlx_llama
