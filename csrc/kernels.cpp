// Quantized matmul kernels: see kernels.h for the data layout.
//
// Two paths:
//  * Exact: per weight row and group, unpack q to float32 (SIMD for 2/4/8 bits,
//    scalar bit-stream extraction otherwise), then
//      y[m, n] = sum_g s[n, g] * dot(x[m, g], q[n, g]) + b[n, g] * sum(x[m, g])
//    in float32.
//  * Q8 (AVX2 only): x is quantized to int8 per 32-element block (scale
//    d = max|x| / 127), stored in the "plane" order of the packed weights so
//    that a 32-byte load of packed weights splits into bits-wide planes with a
//    shift and a mask and meets its activations with _mm256_maddubs_epi16.
//    The bias term uses the exact float32 group sums of x.
//  * Q16 (AVX2 only, 8-bit weights): as Q8 with int16 activations per block
//    of 32 (d = max|x| / 32767) and _mm256_madd_epi16.
//
// Every output element is computed by one task with a fixed operation order
// that does not depend on the number of threads, so results are bit-identical
// for any thread count.
#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "panel_avx512.h"
#include "threadpool.h"

#if defined(__x86_64__) || defined(__i386__)
#define MLXL_X86 1
#include <immintrin.h>
#define TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#include "hsum_avx2.h"
#endif

#if defined(__aarch64__)
#include <arm_neon.h>
#endif

namespace mlx_llama {

bool cpu_has_avx2() {
#ifdef MLXL_X86
  static const bool v = [] {
    if (std::getenv("MLX_LLAMA_FORCE_SCALAR")) {
      return false;
    }
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c");
  }();
  return v;
#else
  return false;
#endif
}

namespace {

#if defined(__aarch64__)
// MLX_LLAMA_FORCE_SCALAR turns the NEON paths off too, as it does AVX2 on
// x86: tests/native compares them with the scalar ones on arm64.
bool neon_enabled() {
  static const bool v = std::getenv("MLX_LLAMA_FORCE_SCALAR") == nullptr;
  return v;
}
#endif

inline int ceil_div(int a, int b) {
  return (a + b - 1) / b;
}

#ifdef MLXL_X86 // the AVX2 paths' prefetches
inline int scale_bytes(ScaleType t) {
  return t == ScaleType::F32 ? 4 : 2;
}
#endif

float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h >> 15) << 31;
  const int exp = (h >> 10) & 0x1f;
  const uint32_t man = h & 0x3ff;
  float v;
  if (exp == 0) {
    v = std::ldexp(static_cast<float>(man), -24); // zero or subnormal
  } else if (exp == 31) {
    v = man ? NAN : INFINITY;
  } else {
    v = std::ldexp(static_cast<float>(man | 0x400), exp - 25);
  }
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits |= sign;
  std::memcpy(&v, &bits, 4);
  return v;
}

// n bf16 or f16 values to float32.
void half_params_scalar(const uint16_t* p, ScaleType t, int n, float* dst) {
  for (int i = 0; i < n; ++i) {
    if (t == ScaleType::BF16) {
      const uint32_t bits = uint32_t(p[i]) << 16;
      std::memcpy(dst + i, &bits, 4);
    } else {
      dst[i] = half_to_float(p[i]);
    }
  }
}

#ifdef MLXL_X86
TARGET_AVX2 void half_params_avx2(const uint16_t* p, ScaleType t, int n, float* dst) {
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i));
    const __m256 f = t == ScaleType::BF16
        ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16))
        : _mm256_cvtph_ps(v);
    _mm256_storeu_ps(dst + i, f);
  }
  half_params_scalar(p + i, t, n - i, dst + i);
}
#endif

// n scales (or biases) from element `offset` of a row-major parameter array,
// as float32: a pointer into the array itself when it is float32, else into
// `buf` (conversion from bf16/f16 is exact).
const float* params_f32(
    const void* p,
    ScaleType t,
    int64_t offset,
    int n,
    std::vector<float>& buf) {
  if (t == ScaleType::F32) {
    return static_cast<const float*>(p) + offset;
  }
  if (buf.size() < size_t(n)) {
    buf.resize(n);
  }
  const uint16_t* h = static_cast<const uint16_t*>(p) + offset;
#ifdef MLXL_X86
  if (cpu_has_avx2()) {
    half_params_avx2(h, t, n, buf.data());
    return buf.data();
  }
#endif
  half_params_scalar(h, t, n, buf.data());
  return buf.data();
}

// Value k of a packed row (little-endian bit stream), any bits in 1..8.
inline uint32_t extract_bits(const uint8_t* row, int64_t k, int bits) {
  int64_t bit = k * bits;
  const uint8_t* p = row + (bit >> 3);
  int shift = static_cast<int>(bit & 7);
  uint32_t v = p[0];
  if (shift + bits > 8) {
    v |= static_cast<uint32_t>(p[1]) << 8;
  }
  return (v >> shift) & ((1u << bits) - 1u);
}

// ---------------------------------------------------------------------------
// Exact path: unpack one group of a row to float32.
// ---------------------------------------------------------------------------

void unpack_group_scalar(
    const uint8_t* row,
    int k0,
    int g,
    int bits,
    float* out) {
  for (int i = 0; i < g; ++i) {
    out[i] = static_cast<float>(extract_bits(row, k0 + i, bits));
  }
}

float dot_scalar(const float* a, const float* b, int n) {
  // 8 independent partial sums (same association as the SIMD versions use
  // lane-wise, so scalar and SIMD agree closely).
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) {
      acc[j] += a[i + j] * b[i + j];
    }
  }
  float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) +
      ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; i < n; ++i) {
    s += a[i] * b[i];
  }
  return s;
}

#if defined(__aarch64__)
float dot_neon(const float* a, const float* b, int n) {
  float32x4_t a0 = vdupq_n_f32(0.f), a1 = vdupq_n_f32(0.f);
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    a0 = vfmaq_f32(a0, vld1q_f32(a + i), vld1q_f32(b + i));
    a1 = vfmaq_f32(a1, vld1q_f32(a + i + 4), vld1q_f32(b + i + 4));
  }
  float s = vaddvq_f32(vaddq_f32(a0, a1));
  for (; i < n; ++i) {
    s += a[i] * b[i];
  }
  return s;
}
#endif

#ifdef MLXL_X86
TARGET_AVX2 float dot_avx2(const float* a, const float* b, int n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), a0);
    a1 = _mm256_fmadd_ps(
        _mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), a1);
  }
  for (; i + 8 <= n; i += 8) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), a0);
  }
  float s = hsum256(_mm256_add_ps(a0, a1));
  for (; i < n; ++i) {
    s += a[i] * b[i];
  }
  return s;
}

// g is a multiple of 32 here.
TARGET_AVX2 void unpack_group_avx2(
    const uint8_t* row,
    int k0,
    int g,
    int bits,
    float* out) {
  if (bits == 4) {
    const uint32_t* w = reinterpret_cast<const uint32_t*>(row) + k0 / 8;
    const __m256i sh = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    const __m256i mask = _mm256_set1_epi32(0xF);
    for (int i = 0; i < g; i += 8) {
      __m256i v = _mm256_srlv_epi32(_mm256_set1_epi32(w[i / 8]), sh);
      _mm256_storeu_ps(
          out + i, _mm256_cvtepi32_ps(_mm256_and_si256(v, mask)));
    }
  } else if (bits == 8) {
    const uint8_t* w = row + k0;
    for (int i = 0; i < g; i += 8) {
      __m128i b8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + i));
      _mm256_storeu_ps(out + i, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b8)));
    }
  } else if (bits == 2) {
    const uint32_t* w = reinterpret_cast<const uint32_t*>(row) + k0 / 16;
    const __m256i sh0 = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    const __m256i sh1 = _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30);
    const __m256i mask = _mm256_set1_epi32(0x3);
    for (int i = 0; i < g; i += 16) {
      __m256i word = _mm256_set1_epi32(w[i / 16]);
      _mm256_storeu_ps(
          out + i,
          _mm256_cvtepi32_ps(
              _mm256_and_si256(_mm256_srlv_epi32(word, sh0), mask)));
      _mm256_storeu_ps(
          out + i + 8,
          _mm256_cvtepi32_ps(
              _mm256_and_si256(_mm256_srlv_epi32(word, sh1), mask)));
    }
  } else {
    unpack_group_scalar(row, k0, g, bits, out);
  }
}
#endif

#ifdef MLXL_X86
// dot(x[0:g], q[k0:k0+g]) as 8 lanes, q unpacked on the fly (BITS 2/4/8,
// g % 32 == 0) or, with BITS == 0, read as floats from an unpacked row (`row`
// then points at K floats). Both give the same float vectors in the same
// order, so an output is bit-identical whichever source its batch used.
template <int BITS>
TARGET_AVX2 inline __m256 fused_group_dot(
    const uint8_t* row,
    int k0,
    int g,
    const float* x) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  if constexpr (BITS == 0) {
    const float* q = reinterpret_cast<const float*>(row) + k0;
    for (int i = 0; i < g; i += 16) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(q + i), a0);
      a1 = _mm256_fmadd_ps(
          _mm256_loadu_ps(x + i + 8), _mm256_loadu_ps(q + i + 8), a1);
    }
  } else if constexpr (BITS == 4) {
    const uint32_t* w = reinterpret_cast<const uint32_t*>(row) + k0 / 8;
    const __m256i sh = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    const __m256i mask = _mm256_set1_epi32(0xF);
    for (int i = 0; i < g; i += 16) {
      __m256 q0 = _mm256_cvtepi32_ps(_mm256_and_si256(
          _mm256_srlv_epi32(_mm256_set1_epi32(w[i / 8]), sh), mask));
      __m256 q1 = _mm256_cvtepi32_ps(_mm256_and_si256(
          _mm256_srlv_epi32(_mm256_set1_epi32(w[i / 8 + 1]), sh), mask));
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), q0, a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), q1, a1);
    }
  } else if constexpr (BITS == 8) {
    const uint8_t* w = row + k0;
    for (int i = 0; i < g; i += 16) {
      __m256 q0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + i))));
      __m256 q1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + i + 8))));
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), q0, a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), q1, a1);
    }
  } else {
    static_assert(BITS == 2, "bits");
    const uint32_t* w = reinterpret_cast<const uint32_t*>(row) + k0 / 16;
    const __m256i sh0 = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    const __m256i sh1 = _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30);
    const __m256i mask = _mm256_set1_epi32(0x3);
    for (int i = 0; i < g; i += 16) {
      const __m256i word = _mm256_set1_epi32(w[i / 16]);
      __m256 q0 = _mm256_cvtepi32_ps(
          _mm256_and_si256(_mm256_srlv_epi32(word, sh0), mask));
      __m256 q1 = _mm256_cvtepi32_ps(
          _mm256_and_si256(_mm256_srlv_epi32(word, sh1), mask));
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), q0, a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), q1, a1);
    }
  }
  return _mm256_add_ps(a0, a1);
}

// One output y[m, n]: lane-wise sum_g s_g * dot_g, one horizontal sum at the
// end, plus the bias term.
template <int BITS>
TARGET_AVX2 float fused_row_dot(
    const uint8_t* row,
    const float* s,
    const float* b,
    const float* x,
    const float* xsum,
    int ng,
    int g) {
  __m256 acc = _mm256_setzero_ps();
  for (int gi = 0; gi < ng; ++gi) {
    acc = _mm256_fmadd_ps(
        _mm256_broadcast_ss(s + gi),
        fused_group_dot<BITS>(row, gi * g, g, x + gi * g),
        acc);
  }
  __m256 bacc = _mm256_setzero_ps();
  int gi = 0;
  for (; gi + 8 <= ng; gi += 8) {
    bacc = _mm256_fmadd_ps(
        _mm256_loadu_ps(b + gi), _mm256_loadu_ps(xsum + gi), bacc);
  }
  float r = hsum256(acc) + hsum256(bacc);
  for (; gi < ng; ++gi) {
    r += b[gi] * xsum[gi];
  }
  return r;
}

using FusedDot =
    float (*)(const uint8_t*, const float*, const float*, const float*, const float*, int, int);

FusedDot fused_dot_for(int bits) {
  switch (bits) {
    case 2:
      return fused_row_dot<2>;
    case 4:
      return fused_row_dot<4>;
    case 8:
      return fused_row_dot<8>;
    default:
      return nullptr;
  }
}
#endif

struct ExactCtx {
  const QMatmulArgs* a;
  const float* xsum; // M x (K / g)
  int row_bytes;
  int n_groups;
  bool avx2;
};

// Rows [n0, n1) for all M.
void exact_rows(const ExactCtx& c, int n0, int n1) {
  const QMatmulArgs& a = *c.a;
  const int g = a.group_size;
  std::vector<float> buf(g);
  std::vector<float> acc(a.M);
  std::vector<float> sbuf, bbuf;
#ifdef MLXL_X86
  // Few rows of x: unpack on the fly; more rows: unpack each weight row to
  // float32 once and read it back per activation row. The two give the same
  // bits (see fused_group_dot), so a row's result does not depend on M.
  const FusedDot fused =
      (c.avx2 && g % 32 == 0) ? fused_dot_for(a.bits) : nullptr;
  if (fused) {
    const bool unpack = a.M > 4;
    std::vector<float> qrow(unpack ? a.K : 0);
    const int pbytes = scale_bytes(a.stype);
    for (int n = n0; n < n1; ++n) {
      const uint8_t* row =
          reinterpret_cast<const uint8_t*>(a.w) + int64_t(n) * c.row_bytes;
      const float* s =
          params_f32(a.scales, a.stype, int64_t(n) * c.n_groups, c.n_groups, sbuf);
      const float* b =
          params_f32(a.biases, a.stype, int64_t(n) * c.n_groups, c.n_groups, bbuf);
      if (unpack) {
        for (int gi = 0; gi < c.n_groups; ++gi) {
          unpack_group_avx2(row, gi * g, g, a.bits, qrow.data() + gi * g);
        }
      } else {
        // Rows are too short for the hardware prefetcher (see q8_tile):
        // fetch the row after next while this one is computed.
        for (int off = 0; off < c.row_bytes; off += 64) {
          _mm_prefetch(
              reinterpret_cast<const char*>(row) + 2 * c.row_bytes + off,
              _MM_HINT_T0);
        }
        const int64_t pnext = (int64_t(n) + 2) * c.n_groups * pbytes;
        for (int off = 0; off < c.n_groups * pbytes; off += 64) {
          _mm_prefetch(static_cast<const char*>(a.scales) + pnext + off, _MM_HINT_T0);
          _mm_prefetch(static_cast<const char*>(a.biases) + pnext + off, _MM_HINT_T0);
        }
      }
      for (int m = 0; m < a.M; ++m) {
        const float* xm = a.x + int64_t(m) * a.K;
        const float* xsm = c.xsum + int64_t(m) * c.n_groups;
        a.y[int64_t(m) * a.N + n] = unpack
            ? fused_row_dot<0>(
                  reinterpret_cast<const uint8_t*>(qrow.data()), s, b, xm, xsm, c.n_groups, g)
            : fused(row, s, b, xm, xsm, c.n_groups, g);
      }
    }
    return;
  }
#endif
  for (int n = n0; n < n1; ++n) {
    const uint8_t* row =
        reinterpret_cast<const uint8_t*>(a.w) + int64_t(n) * c.row_bytes;
    const float* s =
        params_f32(a.scales, a.stype, int64_t(n) * c.n_groups, c.n_groups, sbuf);
    const float* b =
        params_f32(a.biases, a.stype, int64_t(n) * c.n_groups, c.n_groups, bbuf);
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int gi = 0; gi < c.n_groups; ++gi) {
      const int k0 = gi * g;
#ifdef MLXL_X86
      if (c.avx2 && g % 32 == 0) {
        unpack_group_avx2(row, k0, g, a.bits, buf.data());
      } else
#endif
      {
        unpack_group_scalar(row, k0, g, a.bits, buf.data());
      }
      for (int m = 0; m < a.M; ++m) {
        const float d = dot_f32(a.x + int64_t(m) * a.K + k0, buf.data(), g);
        acc[m] += s[gi] * d + b[gi] * c.xsum[int64_t(m) * c.n_groups + gi];
      }
    }
    for (int m = 0; m < a.M; ++m) {
      a.y[int64_t(m) * a.N + n] = acc[m];
    }
  }
}

// Exact per-group sums of x (shared by both paths).
void group_sums(const QMatmulArgs& a, float* xsum) {
  const int ng = a.K / a.group_size;
  for (int m = 0; m < a.M; ++m) {
    const float* xm = a.x + int64_t(m) * a.K;
    for (int gi = 0; gi < ng; ++gi) {
      const float* p = xm + gi * a.group_size;
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int i = 0;
      for (; i + 8 <= a.group_size; i += 8) {
        for (int j = 0; j < 8; ++j) {
          acc[j] += p[i + j];
        }
      }
      float sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) +
          ((acc[2] + acc[6]) + (acc[3] + acc[7]));
      for (; i < a.group_size; ++i) {
        sum += p[i];
      }
      xsum[int64_t(m) * ng + gi] = sum;
    }
  }
}

constexpr int kRowsPerTask = 32;

void qmatmul_exact(const QMatmulArgs& a) {
  const int ng = a.K / a.group_size;
  std::vector<float> xsum(int64_t(a.M) * ng);
  group_sums(a, xsum.data());
  ExactCtx c{&a, xsum.data(), a.K * a.bits / 8, ng, cpu_has_avx2()};
  const int n_tasks = ceil_div(a.N, kRowsPerTask);
  ThreadPool::instance().parallel_for(n_tasks, [&](int t, int) {
    int n0 = t * kRowsPerTask;
    exact_rows(c, n0, std::min(a.N, n0 + kRowsPerTask));
  });
}

// ---------------------------------------------------------------------------
// Q8 path (AVX2).
// ---------------------------------------------------------------------------
#ifdef MLXL_X86

struct Q8Ctx {
  const QMatmulArgs* a;
  const void* xq; // M x K, plane order: int8 (Q8) or int16 (Q16, 8 bits)
  const float* xs; // M x (K / E * 8): per-lane activation scales
  const float* xsum; // M x n_groups
  const float* xdq; // M x n_groups: sums of the int8-rounded activations
  int row_bytes;
  int n_groups;
  int n_chunks; // K / E
};

// One block of 32 activations rounded to integers in [-qmax, qmax]:
// q = round(x / d) with d = max|x| / qmax (round half to even, as
// _mm256_cvtps_epi32 does in the default rounding mode) into qi; returns d.
TARGET_AVX2 inline float quantize_block(const float* p, float qmax, __m256i qi[4]) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 v[4];
  __m256 amax = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(p + 8 * i);
    amax = _mm256_max_ps(amax, _mm256_and_ps(v[i], abs_mask));
  }
  __m128 m4 = _mm_max_ps(
      _mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  const float am = _mm_cvtss_f32(m4);
  const float db = am / qmax;
  const __m256 id = _mm256_set1_ps(db > 0.f ? qmax / am : 0.f);
  for (int i = 0; i < 4; ++i) {
    qi[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], id));
  }
  return db;
}

// Quantize row m of x into plane order for `bits`: int8 values q = round(x / d)
// per block of 32 with d = max|x| / 127.
TARGET_AVX2 void quantize_row(
    const float* x,
    int K,
    int bits,
    int group_size,
    int8_t* xq,
    float* xs,
    float* xdq_sum) {
  const int P = 8 / bits;
  const int E = 256 / bits;
  // Position of element `within` of a chunk in plane order: plane
  // within % P holds the elements that meet the weights' bits at that shift
  // (2 bits only: 8 and 4 bits are placed with vector stores below).
  uint8_t pos[128];
  if (bits == 2) {
    for (int w = 0; w < E; ++w) {
      pos[w] = static_cast<uint8_t>((w % P) * 32 + w / P);
    }
  }
  const int nb = K / 32;
  float dblk[1024];
  std::vector<float> dv;
  float* d = dblk;
  if (nb > 1024) {
    dv.resize(nb);
    d = dv.data();
  }
  for (int blk = 0; blk < nb; ++blk) {
    __m256i qi[4];
    const float db = quantize_block(x + blk * 32, 127.f, qi);
    d[blk] = db;
    __m256i isum = _mm256_setzero_si256();
    for (int i = 0; i < 4; ++i) {
      isum = _mm256_add_epi32(isum, qi[i]);
    }
    const __m256i q16a = _mm256_packs_epi32(qi[0], qi[1]);
    const __m256i q16b = _mm256_packs_epi32(qi[2], qi[3]);
    const __m256i q8 = _mm256_permutevar8x32_epi32(
        _mm256_packs_epi16(q16a, q16b),
        _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    const int k0 = blk * 32;
    int8_t* dst = xq + int64_t(k0 / E) * 32 * P;
    if (bits == 8) { // one plane: plain order
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), q8);
    } else if (bits == 4) {
      // Even elements to plane 0, odd ones to plane 1 (16 of each per block).
      const __m256i split = _mm256_permute4x64_epi64(
          _mm256_shuffle_epi8(
              q8,
              _mm256_setr_epi8(
                  0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                  0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15)),
          0xd8);
      int8_t* d = dst + (k0 % E) / 2;
      _mm_storeu_si128(
          reinterpret_cast<__m128i*>(d), _mm256_castsi256_si128(split));
      _mm_storeu_si128(
          reinterpret_cast<__m128i*>(d + 32), _mm256_extracti128_si256(split, 1));
    } else {
      alignas(32) int8_t q[32];
      _mm256_store_si256(reinterpret_cast<__m256i*>(q), q8);
      const uint8_t* ps = pos + k0 % E;
      for (int i = 0; i < 32; ++i) {
        dst[ps[i]] = q[i];
      }
    }
    __m128i s4 = _mm_add_epi32(
        _mm256_castsi256_si128(isum), _mm256_extracti128_si256(isum, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
    // Sum of the dequantized activations per weight group (see bias_vec).
    const int gi = k0 / group_size;
    if (k0 % group_size == 0) {
      xdq_sum[gi] = 0.f;
    }
    xdq_sum[gi] += db * static_cast<float>(_mm_cvtsi128_si32(s4));
  }
  const int n_chunks = K / E;
  for (int c = 0; c < n_chunks; ++c) {
    for (int l = 0; l < 8; ++l) {
      xs[c * 8 + l] = d[(c * E + 4 * P * l) / 32];
    }
  }
}

// Quantize row m of x for the Q16 path (8-bit weights): int16 values
// q = round(x / d) per block of 32 with d = max|x| / 32767, in plain order;
// xs as quantize_row writes it (one block per chunk at 8 bits).
TARGET_AVX2 void quantize_row16(const float* x, int K, int16_t* xq, float* xs) {
  for (int blk = 0; blk < K / 32; ++blk) {
    __m256i qi[4];
    const float db = quantize_block(x + blk * 32, 32767.f, qi);
    // packs interleaves the 128-bit lanes; the permute restores plain order.
    for (int h = 0; h < 2; ++h) {
      _mm256_storeu_si256(
          reinterpret_cast<__m256i*>(xq + blk * 32 + 16 * h),
          _mm256_permute4x64_epi64(
              _mm256_packs_epi32(qi[2 * h], qi[2 * h + 1]), 0xd8));
    }
    _mm256_storeu_ps(xs + blk * 8, _mm256_set1_ps(db));
  }
}

// Scale/bias loads from float32, bfloat16 or float16 storage (exact).
template <ScaleType ST>
TARGET_AVX2 inline float load1(const void* p, int64_t i) {
  if constexpr (ST == ScaleType::F32) {
    return static_cast<const float*>(p)[i];
  } else if constexpr (ST == ScaleType::BF16) {
    const uint32_t bits = uint32_t(static_cast<const uint16_t*>(p)[i]) << 16;
    float v;
    std::memcpy(&v, &bits, 4);
    return v;
  } else {
    return _mm_cvtss_f32(
        _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<const uint16_t*>(p)[i])));
  }
}

// n <= 8 values from element i into the low lanes of a vector, zeros above.
template <ScaleType ST>
TARGET_AVX2 inline __m256 load_n(const void* p, int64_t i, int n) {
  if (n == 8) {
    if constexpr (ST == ScaleType::F32) {
      return _mm256_loadu_ps(static_cast<const float*>(p) + i);
    } else {
      const __m128i v = _mm_loadu_si128(
          reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
      if constexpr (ST == ScaleType::BF16) {
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
      } else {
        return _mm256_cvtph_ps(v);
      }
    }
  }
  alignas(32) float tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int k = 0; k < n; ++k) {
    tmp[k] = load1<ST>(p, i + k);
  }
  return _mm256_load_ps(tmp);
}

// Weight scale per lane for chunk ch of the row whose scales start at element
// `row`. RK = E / g when E > g, else 1. cpg_shift = log2(g / E) when E <= g
// (group sizes and E are powers of two: no integer division in the inner loop).
template <int RK, ScaleType ST>
TARGET_AVX2 inline __m256 lane_scales(const void* s, int64_t row, int ch, int cpg_shift) {
  if constexpr (RK == 1) {
    return _mm256_set1_ps(load1<ST>(s, row + (ch >> cpg_shift)));
  } else if constexpr (RK == 2) {
    return _mm256_permutevar8x32_ps(
        load_n<ST>(s, row + ch * 2, 2), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
  } else {
    return _mm256_permutevar8x32_ps(
        load_n<ST>(s, row + ch * 4, 4), _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
  }
}

// The terms of y outside the integer dot products, for one (row, column),
// as 8 lanes to be summed:
//  * 8 bits: the kernel multiplies (q - 128) by the int8 activations, so
//      sum_g (b_g + 128 s_g) * xsum_g
//  * 2/4 bits: the kernel multiplies unsigned q; re-centring q around
//    c = 2^(bits-1) in exact arithmetic,
//      sum_g b_g * xsum_g + c * s_g * (xsum_g - xdqsum_g)
//    which moves c * sum(x - x_dq) of the activation rounding error back to
//    exact values (about halves the error of the int8 path).
template <int BITS, ScaleType ST>
TARGET_AVX2 inline __m256 bias_vec(
    const void* b,
    const void* s,
    int64_t row,
    const float* xsum,
    const float* xdq,
    int ng) {
  const __m256 cv = _mm256_set1_ps(static_cast<float>(1 << (BITS - 1)));
  __m256 acc = _mm256_setzero_ps();
  for (int i = 0; i < ng; i += 8) {
    // The tail (fewer than 8 groups) reads zeros past the end.
    const int n = std::min(8, ng - i);
    const __m256 sv = load_n<ST>(s, row + i, n);
    const __m256 bv = load_n<ST>(b, row + i, n);
    const __m256 xv = load_n<ScaleType::F32>(xsum, i, n);
    if constexpr (BITS == 8) {
      acc = _mm256_fmadd_ps(_mm256_fmadd_ps(sv, cv, bv), xv, acc);
    } else {
      const __m256 qv = load_n<ScaleType::F32>(xdq, i, n);
      acc = _mm256_fmadd_ps(bv, xv, acc);
      acc = _mm256_fmadd_ps(_mm256_mul_ps(sv, cv), _mm256_sub_ps(xv, qv), acc);
    }
  }
  return acc;
}

// Horizontal sums of four vectors: lane r of the result is the sum of v_r.
// Every row is reduced in the same order whichever slot it occupies, so tiles
// of 4, 2 or 1 rows give bit-identical results.
TARGET_AVX2 inline __m128 hsum4(__m256 v0, __m256 v1, __m256 v2, __m256 v3) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(v0, v1), _mm256_hadd_ps(v2, v3));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// AVX-VNNI (VEX-encoded, as on Zen 5 and Alder Lake and later): one
// instruction for what AVX2 does in two or four, with the same integer
// result (the AVX2 sums never saturate: see q8_tile), so the output bits do
// not depend on which runs. Inline asm: the AVX2 functions are not compiled
// for AVX-VNNI, and these are only reached when the CPU has it.
bool cpu_has_avxvnni() {
  static const bool v = [] {
    if (std::getenv("MLX_LLAMA_NO_VNNI")) {
      return false;
    }
    __builtin_cpu_init();
    return __builtin_cpu_supports("avxvnni") != 0;
  }();
  return v;
}

// acc + the sums of 4 adjacent u8 * s8 products per int32 lane.
TARGET_AVX2 inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
  asm("%{vex%} vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(u), "x"(s));
  return acc;
}

// acc + the sums of 2 adjacent s16 * s16 products per int32 lane.
TARGET_AVX2 inline __m256i dot_s16(__m256i acc, __m256i a, __m256i b) {
  asm("%{vex%} vpdpwssd %2, %1, %0" : "+x"(acc) : "x"(a), "x"(b));
  return acc;
}

// Bytes of weights to prefetch while a tile runs: [p, p + bytes), spread
// evenly over its chunks.
struct Prefetch {
  const char* p;
  int bytes;
};

// R weight rows x C activation rows over the whole K. Scales and biases are
// read as stored (ST) where the inner loop needs them: widening a tile's
// bf16 scales into a stack buffer first was 4-6% slower (4-bit GEMV, paired
// runs), as the loop then waited on their cache misses instead of overlapping
// them with the weights.
//
// X16 (BITS == 8 only): int16 activations. The weights' q - 128 is widened
// to int16 and meets the activations with _mm256_madd_epi16; a lane sums 4
// products of at most 128 * 32767, below 2^24, so its float conversion is
// exact too.
//
// VNNI: the integer dot products by dot_u8s8 / dot_s16. They equal the
// AVX2 ones because no _mm256_maddubs_epi16 sum saturates: at most
// 2 * 15 * 127 (4-bit), 2 * 128 * 127 (8-bit, |q - 128| by a signed
// activation) and P of them added in int16 stay below 2^15.
template <int BITS, int RK, int R, int C, ScaleType ST, bool X16 = false, bool VNNI = false>
TARGET_AVX2 void q8_tile(const Q8Ctx& c, int n0, int m0, Prefetch pf) {
  static_assert(!X16 || BITS == 8, "int16 activations are for 8-bit weights");
  constexpr int P = 8 / BITS;
  constexpr int E = 256 / BITS;
  const QMatmulArgs& a = *c.a;
  const int ng = c.n_groups;
  const void* sp = a.scales;
  const void* bp = a.biases;
  const int64_t row0 = int64_t(n0) * ng;
  const int cpg_shift = RK == 1 ? __builtin_ctz(a.group_size / E) : 0;
  const uint8_t* wr[R];
  int64_t sr[R]; // first scale/bias element of each row
  for (int r = 0; r < R; ++r) {
    wr[r] = reinterpret_cast<const uint8_t*>(a.w) +
        int64_t(n0 + r) * c.row_bytes;
    sr[r] = row0 + int64_t(r) * ng;
  }
  const int8_t* xr[C];
  const float* xsr[C];
  for (int j = 0; j < C; ++j) {
    xr[j] = static_cast<const int8_t*>(c.xq) +
        int64_t(m0 + j) * a.K * (X16 ? 2 : 1);
    xsr[j] = c.xs + int64_t(m0 + j) * c.n_chunks * 8;
  }
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < C; ++j) {
      acc[r][j] = _mm256_setzero_ps();
    }
  }
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i mask = _mm256_set1_epi8(static_cast<char>((1 << BITS) - 1));
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  const int n_chunks = c.n_chunks; // local: keeps acc[][] in registers
  // pf's lines spread over the chunks, Bresenham style (no division in the
  // loop): `due` gains pf_lines per chunk and pays n_chunks per line.
  const int pf_lines = ceil_div(pf.bytes, 64);
  const char* pf_p = pf.p;
  int due = 0;
  for (int ch = 0; ch < n_chunks; ++ch) {
    for (due += pf_lines; due >= n_chunks; due -= n_chunks) {
      _mm_prefetch(pf_p, _MM_HINT_T0);
      pf_p += 64;
    }
    for (int r = 0; r < R; ++r) {
      const __m256i raw =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr[r] + ch * 32));
      const __m256 wsv = lane_scales<RK, ST>(sp, sr[r], ch, cpg_shift);
      if constexpr (X16) {
        const __m256i qs = _mm256_xor_si256(raw, flip); // q - 128 as int8
        const __m256i w0 = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(qs));
        const __m256i w1 = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(qs, 1));
        for (int j = 0; j < C; ++j) {
          const __m256i* xp =
              reinterpret_cast<const __m256i*>(xr[j] + int64_t(ch) * 64);
          __m256i i32;
          if constexpr (VNNI) {
            i32 = dot_s16(
                dot_s16(_mm256_setzero_si256(), w0, _mm256_load_si256(xp)),
                w1,
                _mm256_load_si256(xp + 1));
          } else {
            i32 = _mm256_add_epi32(
                _mm256_madd_epi16(w0, _mm256_load_si256(xp)),
                _mm256_madd_epi16(w1, _mm256_load_si256(xp + 1)));
          }
          const __m256 xs = _mm256_load_ps(xsr[j] + ch * 8);
          acc[r][j] = _mm256_fmadd_ps(
              _mm256_cvtepi32_ps(i32), _mm256_mul_ps(wsv, xs), acc[r][j]);
        }
      } else if constexpr (BITS == 8) {
        const __m256i qs = _mm256_xor_si256(raw, flip); // q - 128 as int8
        const __m256i qa = _mm256_sign_epi8(qs, qs); // |q - 128|
        for (int j = 0; j < C; ++j) {
          const __m256i xv = _mm256_load_si256(
              reinterpret_cast<const __m256i*>(xr[j] + ch * 32));
          const __m256i xsg = _mm256_sign_epi8(xv, qs);
          const __m256i i32 = VNNI
              ? dot_u8s8(_mm256_setzero_si256(), qa, xsg)
              : _mm256_madd_epi16(_mm256_maddubs_epi16(qa, xsg), ones);
          const __m256 xs = _mm256_load_ps(xsr[j] + ch * 8);
          acc[r][j] = _mm256_fmadd_ps(
              _mm256_cvtepi32_ps(i32), _mm256_mul_ps(wsv, xs), acc[r][j]);
        }
      } else {
        __m256i wp[P];
        wp[0] = _mm256_and_si256(raw, mask);
        for (int p = 1; p < P; ++p) {
          wp[p] = _mm256_and_si256(_mm256_srli_epi16(raw, p * BITS), mask);
        }
        for (int j = 0; j < C; ++j) {
          const __m256i* xp =
              reinterpret_cast<const __m256i*>(xr[j] + int64_t(ch) * 32 * P);
          __m256i i32;
          if constexpr (VNNI) {
            i32 = dot_u8s8(_mm256_setzero_si256(), wp[0], _mm256_load_si256(xp));
            for (int p = 1; p < P; ++p) {
              i32 = dot_u8s8(i32, wp[p], _mm256_load_si256(xp + p));
            }
          } else {
            __m256i s16 = _mm256_maddubs_epi16(wp[0], _mm256_load_si256(xp));
            for (int p = 1; p < P; ++p) {
              s16 = _mm256_add_epi16(
                  s16, _mm256_maddubs_epi16(wp[p], _mm256_load_si256(xp + p)));
            }
            i32 = _mm256_madd_epi16(s16, ones);
          }
          const __m256 xs = _mm256_load_ps(xsr[j] + ch * 8);
          acc[r][j] = _mm256_fmadd_ps(
              _mm256_cvtepi32_ps(i32), _mm256_mul_ps(wsv, xs), acc[r][j]);
        }
      }
    }
  }
  for (int j = 0; j < C; ++j) {
    const float* xsum = c.xsum + int64_t(m0 + j) * ng;
    const float* xdq = c.xdq + int64_t(m0 + j) * ng;
    __m256 t[R];
    for (int r = 0; r < R; ++r) {
      t[r] = _mm256_add_ps(
          acc[r][j],
          bias_vec<BITS, ST>(bp, sp, sr[r], xsum, xdq, ng));
    }
    float* y = a.y + int64_t(m0 + j) * a.N + n0;
    for (int r = 0; r < R; r += 4) {
      alignas(16) float out[4];
      _mm_store_ps(
          out,
          hsum4(
              t[r],
              t[std::min(r + 1, R - 1)],
              t[std::min(r + 2, R - 1)],
              t[std::min(r + 3, R - 1)]));
      for (int i = 0; i < std::min(4, R - r); ++i) {
        y[r + i] = out[i];
      }
    }
  }
}

using TileFn = void (*)(const Q8Ctx&, int, int, Prefetch);

struct TileSet {
  // [c - 1]: wide tile (R = 4 for c <= 2, R = 2 for c >= 3), single row tile.
  TileFn wide[4];
  TileFn single[4];
  int wide_rows[4];
};

template <int BITS, int RK, ScaleType ST, bool X16, bool VNNI>
TileSet make_tiles() {
  return TileSet{
      {q8_tile<BITS, RK, 4, 1, ST, X16, VNNI>,
       q8_tile<BITS, RK, 4, 2, ST, X16, VNNI>,
       q8_tile<BITS, RK, 2, 3, ST, X16, VNNI>,
       q8_tile<BITS, RK, 2, 4, ST, X16, VNNI>},
      {q8_tile<BITS, RK, 1, 1, ST, X16, VNNI>,
       q8_tile<BITS, RK, 1, 2, ST, X16, VNNI>,
       q8_tile<BITS, RK, 1, 3, ST, X16, VNNI>,
       q8_tile<BITS, RK, 1, 4, ST, X16, VNNI>},
      {4, 4, 2, 2}};
}

template <ScaleType ST, bool VNNI>
const TileSet* tiles_for_isa(int bits, int g, bool x16) {
  static const TileSet t8 = make_tiles<8, 1, ST, false, VNNI>();
  static const TileSet t8_x16 = make_tiles<8, 1, ST, true, VNNI>();
  if (x16) {
    return &t8_x16;
  }
  static const TileSet t4_1 = make_tiles<4, 1, ST, false, VNNI>();
  static const TileSet t4_2 = make_tiles<4, 2, ST, false, VNNI>();
  static const TileSet t2_1 = make_tiles<2, 1, ST, false, VNNI>();
  static const TileSet t2_2 = make_tiles<2, 2, ST, false, VNNI>();
  static const TileSet t2_4 = make_tiles<2, 4, ST, false, VNNI>();
  const int E = 256 / bits;
  const int rk = E > g ? E / g : 1;
  switch (bits) {
    case 8:
      return &t8;
    case 4:
      return rk == 1 ? &t4_1 : &t4_2;
    case 2:
      return rk == 1 ? &t2_1 : (rk == 2 ? &t2_2 : &t2_4);
    default:
      return nullptr;
  }
}

template <ScaleType ST>
const TileSet* tiles_for_type(int bits, int g, bool x16) {
  return cpu_has_avxvnni() ? tiles_for_isa<ST, true>(bits, g, x16)
                           : tiles_for_isa<ST, false>(bits, g, x16);
}

const TileSet* tiles_for(int bits, int g, ScaleType t, bool x16) {
  switch (t) {
    case ScaleType::BF16:
      return tiles_for_type<ScaleType::BF16>(bits, g, x16);
    case ScaleType::F16:
      return tiles_for_type<ScaleType::F16>(bits, g, x16);
    default:
      return tiles_for_type<ScaleType::F32>(bits, g, x16);
  }
}

// Weight rows per task (the smallest block, see row_blocks): a multiple of
// every tile height (so tiles, and results, do not depend on the thread
// count), and long enough that few tiles start without the previous tile's
// prefetch (128 vs 32: 2-thread GEMV 8192x2048 0.52-0.59 vs 0.60-0.78 ms).
constexpr int kQ8RowsPerTask = 128;
constexpr int kQ8ColsPerTask = 64; // activation rows per task

// Task boundaries over the N weight rows (multiples of kQ8RowsPerTask),
// shrinking when one task covers all M activation rows (shrinking_blocks):
// 1-9% faster 4/8-bit GEMV than equal 128-row blocks, 1.5% faster 1B decode
// (paired in-process runs). Results do not depend on the blocks (each row is
// reduced alike in any tile).
std::vector<int> row_blocks(int N, int M, int threads) {
  return shrinking_blocks(N, kQ8RowsPerTask, M <= kQ8ColsPerTask, threads);
}

// Weight bytes per span (see q8_rows): small enough to stay in L1 next to
// the activations while every activation row of the task passes over them.
constexpr int kQ8SpanBytes = 16 * 1024;

// Weight rows per span: a multiple of 4 (every tile height), at least 4.
int span_rows(int row_bytes) {
  return std::max(4, kQ8SpanBytes / row_bytes / 4 * 4);
}

// Weight rows [n0, n1) x activation rows [m0, m1). The rows go in spans of a
// few weight rows, each applied to all the activation rows (in tiles of at
// most 4) before the next: the weights stream from memory once per call
// whatever M, instead of once per 4 activation rows. Rows are short (1 KB
// for K = 2048 at 4 bits), too short for the hardware prefetcher to lock on
// to interleaved streams, so the next span's weights are walked linearly by
// software prefetches spread over all of this span's tiles (its scales and
// biases are fetched up front: they are few).
TARGET_AVX2 void q8_rows(const Q8Ctx& c, const TileSet& ts, int n0, int n1, int m0, int m1) {
  const QMatmulArgs& a = *c.a;
  const int S = span_rows(c.row_bytes);
  const int pbytes = scale_bytes(a.stype);
  const char* w = reinterpret_cast<const char*>(a.w);
  // Tiles per span of `rows` weight rows.
  auto span_tiles = [&](int rows) {
    int t = 0;
    for (int m = m0; m < m1; m += 4) {
      const int R = ts.wide_rows[std::min(4, m1 - m) - 1];
      t += rows / R + rows % R;
    }
    return t;
  };
  for (int ns = n0; ns < n1; ns += S) {
    const int ne = std::min(n1, ns + S);
    const int next_rows = std::min(a.N, ne + S) - ne;
    const int64_t pnext = int64_t(ne) * c.n_groups * pbytes;
    for (int off = 0; off < next_rows * c.n_groups * pbytes; off += 64) {
      _mm_prefetch(static_cast<const char*>(a.scales) + pnext + off, _MM_HINT_T0);
      _mm_prefetch(static_cast<const char*>(a.biases) + pnext + off, _MM_HINT_T0);
    }
    const char* pf = w + int64_t(ne) * c.row_bytes;
    const int pf_bytes = next_rows * c.row_bytes;
    // Per tile, in whole cache lines.
    const int share = ceil_div(ceil_div(pf_bytes, span_tiles(ne - ns)), 64) * 64;
    int done = 0;
    auto next = [&]() {
      const Prefetch p{pf + done, std::max(0, std::min(share, pf_bytes - done))};
      done += p.bytes;
      return p;
    };
    for (int m = m0; m < m1; m += 4) {
      const int cols = std::min(4, m1 - m);
      const int R = ts.wide_rows[cols - 1];
      int n = ns;
      for (; n + R <= ne; n += R) {
        ts.wide[cols - 1](c, n, m, next());
      }
      for (; n < ne; ++n) {
        ts.single[cols - 1](c, n, m, next());
      }
    }
  }
}

// x16: int16 activations (Mode::Q16, 8-bit weights), else int8.
void qmatmul_q8(const QMatmulArgs& a, bool x16) {
  const int E = 256 / a.bits;
  const int ng = a.K / a.group_size;
  const int n_chunks = a.K / E;
  const TileSet* ts = tiles_for(a.bits, a.group_size, a.stype, x16);
  const int xbytes = x16 ? 2 : 1;

  // Scratch: quantized x (32-byte aligned rows; K is a multiple of 32).
  struct Scratch {
    std::vector<int8_t> xq;
    std::vector<float> xs, xsum, xdq;
  };
  static thread_local Scratch sc;
  const size_t xq_bytes = size_t(a.M) * a.K * xbytes + 64;
  if (sc.xq.size() < xq_bytes) {
    sc.xq.resize(xq_bytes);
  }
  const size_t xs_n = size_t(a.M) * n_chunks * 8 + 16;
  if (sc.xs.size() < xs_n) {
    sc.xs.resize(xs_n);
  }
  sc.xsum.resize(size_t(a.M) * ng);
  sc.xdq.resize(size_t(a.M) * ng);
  int8_t* xq = reinterpret_cast<int8_t*>(
      (reinterpret_cast<uintptr_t>(sc.xq.data()) + 31) & ~uintptr_t(31));
  float* xs = reinterpret_cast<float*>(
      (reinterpret_cast<uintptr_t>(sc.xs.data()) + 31) & ~uintptr_t(31));
  // Plain pointers: `sc` is thread-local, so pool threads must not name it.
  float* xsum = sc.xsum.data();
  float* xdq = sc.xdq.data();

  auto& pool = ThreadPool::instance();
  auto prep = [&](int m0, int m1) {
    for (int m = m0; m < m1; ++m) {
      if (x16) {
        quantize_row16(
            a.x + int64_t(m) * a.K,
            a.K,
            reinterpret_cast<int16_t*>(xq) + int64_t(m) * a.K,
            xs + int64_t(m) * n_chunks * 8);
        continue;
      }
      quantize_row(
          a.x + int64_t(m) * a.K,
          a.K,
          a.bits,
          a.group_size,
          xq + int64_t(m) * a.K,
          xs + int64_t(m) * n_chunks * 8,
          xdq + int64_t(m) * ng);
    }
  };
  if (a.M >= 16) {
    const int per = 8;
    pool.parallel_for(ceil_div(a.M, per), [&](int t, int) {
      prep(t * per, std::min(a.M, (t + 1) * per));
    });
  } else {
    prep(0, a.M);
  }
  group_sums(a, xsum);

  Q8Ctx c{
      &a,
      xq,
      xs,
      xsum,
      xdq,
      a.K * a.bits / 8,
      ng,
      n_chunks};
  const std::vector<int> bounds = row_blocks(a.N, a.M, pool.size());
  const int nt = static_cast<int>(bounds.size()) - 1;
  const int mt = ceil_div(a.M, kQ8ColsPerTask);
  pool.parallel_for(nt * mt, [&](int t, int) {
    const int nb = t / mt, mb = t % mt;
    const int n0 = bounds[nb];
    const int n1 = bounds[nb + 1];
    const int m0 = mb * kQ8ColsPerTask;
    const int m1 = std::min(a.M, m0 + kQ8ColsPerTask);
    q8_rows(c, *ts, n0, n1, m0, m1);
  });
}
#endif // MLXL_X86

} // namespace

float dot_f32(const float* a, const float* b, int n) {
#ifdef MLXL_X86
  if (cpu_has_avx2()) {
    return dot_avx2(a, b, n);
  }
#endif
#if defined(__aarch64__)
  if (neon_enabled()) {
    return dot_neon(a, b, n);
  }
#endif
  return dot_scalar(a, b, n);
}

bool q16_supported(int K, int group_size, int bits) {
  return bits == 8 && q8_supported(K, group_size, bits);
}

bool q8_supported(int K, int group_size, int bits) {
#ifdef MLXL_X86
  if (panel_supported(K, group_size, bits, Mode::Q8)) {
    return true;
  }
  if (!cpu_has_avx2()) {
    return false;
  }
  if (bits != 2 && bits != 4 && bits != 8) {
    return false;
  }
  if (group_size % 32 != 0) {
    return false;
  }
  const int E = 256 / bits;
  return K % E == 0 && K % 32 == 0;
#else
  (void)K;
  (void)group_size;
  (void)bits;
  return false;
#endif
}

void qmatmul(const QMatmulArgs& a, Mode mode) {
  if (a.M == 0 || a.N == 0) {
    return;
  }
#ifdef MLXL_X86
  if (panel_supported(a.K, a.group_size, a.bits, mode)) {
    qmatmul_panel(a, mode);
    return;
  }
  if (mode == Mode::Q8 && q8_supported(a.K, a.group_size, a.bits)) {
    qmatmul_q8(a, false);
    return;
  }
  if (mode == Mode::Q16 && q16_supported(a.K, a.group_size, a.bits)) {
    qmatmul_q8(a, true);
    return;
  }
#endif
  (void)mode;
  qmatmul_exact(a);
}

void dequantize_rows(
    const uint32_t* w,
    const void* scales,
    const void* biases,
    ScaleType stype,
    float* out,
    int N,
    int K,
    int group_size,
    int bits) {
  const int ng = K / group_size;
  const int row_bytes = K * bits / 8;
#ifdef MLXL_X86
  const bool avx2 = cpu_has_avx2();
#endif
  const int n_tasks = ceil_div(N, kRowsPerTask);
  ThreadPool::instance().parallel_for(n_tasks, [&](int t, int) {
    const int n0 = t * kRowsPerTask;
    const int n1 = std::min(N, n0 + kRowsPerTask);
    std::vector<float> sbuf, bbuf;
    for (int n = n0; n < n1; ++n) {
      const uint8_t* row =
          reinterpret_cast<const uint8_t*>(w) + int64_t(n) * row_bytes;
      float* o = out + int64_t(n) * K;
      const float* sr = params_f32(scales, stype, int64_t(n) * ng, ng, sbuf);
      const float* br = params_f32(biases, stype, int64_t(n) * ng, ng, bbuf);
      for (int gi = 0; gi < ng; ++gi) {
        const int k0 = gi * group_size;
#ifdef MLXL_X86
        if (avx2 && group_size % 32 == 0) {
          unpack_group_avx2(row, k0, group_size, bits, o + k0);
        } else
#endif
        {
          unpack_group_scalar(row, k0, group_size, bits, o + k0);
        }
        const float s = sr[gi];
        const float b = br[gi];
        for (int i = 0; i < group_size; ++i) {
          o[k0 + i] = s * o[k0 + i] + b;
        }
      }
    }
  });
}

#ifdef MLXL_X86
TARGET_AVX2 float read_sum_avx2(const float* p, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 = _mm256_add_ps(a0, _mm256_loadu_ps(p + i));
    a1 = _mm256_add_ps(a1, _mm256_loadu_ps(p + i + 8));
    a2 = _mm256_add_ps(a2, _mm256_loadu_ps(p + i + 16));
    a3 = _mm256_add_ps(a3, _mm256_loadu_ps(p + i + 24));
  }
  float s = hsum256(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; i < n; ++i) {
    s += p[i];
  }
  return s;
}
#endif

float read_probe(const float* p, int64_t n) {
  auto& pool = ThreadPool::instance();
  const int nt = pool.size();
  std::vector<float> part(nt, 0.f);
  const int64_t chunk = (n + nt - 1) / nt;
  pool.parallel_for(nt, [&](int t, int) {
    const int64_t lo = std::min<int64_t>(n, t * chunk);
    const int64_t hi = std::min<int64_t>(n, lo + chunk);
    float s = 0.f;
#ifdef MLXL_X86
    if (cpu_has_avx2()) {
      s = read_sum_avx2(p + lo, hi - lo);
    } else
#endif
    {
      for (int64_t i = lo; i < hi; ++i) {
        s += p[i];
      }
    }
    part[t] = s;
  });
  float s = 0.f;
  for (float v : part) {
    s += v;
  }
  return s;
}

const char* isa() {
#ifdef MLXL_X86
  return cpu_has_avx2() ? "avx2" : "scalar";
#elif defined(__aarch64__)
  return neon_enabled() ? "neon" : "scalar";
#else
  return "scalar";
#endif
}

} // namespace mlx_llama
