// Attention on AVX-512: see attention_avx512.h for the per-vector sequence.
#include "attention_avx512.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <utility>
#include <vector>

#include "kernels.h"

#if defined(__x86_64__)
#include "avx512_util.h"
#include "exp_cephes.h"
#endif

namespace mlx_llama {

#if defined(__x86_64__)
namespace {

constexpr int kKeys = 16; // keys per transposed block: one vector of scores
constexpr int kScoreVecs = 8; // query vectors per score tile: 16 accumulators
constexpr int kSumVecs = 4; // query vectors per weighted-sum tile: 16 accumulators for D = 64
constexpr int kRowBlock = 8; // query rows whose scores are held at once (L2-sized)

bool has_avx512f() {
  if (std::getenv("MLX_LLAMA_NO_AVX512") || !cpu_has_avx2()) {
    return false;
  }
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f");
}

// exp_avx2 (fused_ops.cpp) at 16 lanes: the same operations per element.
TARGET_AVX512 inline __m512 exp512(__m512 x) {
  namespace ce = cephes_exp;
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(ce::kLo)), _mm512_set1_ps(ce::kHi));
  const __m512 fx = _mm512_roundscale_ps(
      _mm512_fmadd_ps(x, _mm512_set1_ps(ce::kLog2e), _mm512_set1_ps(0.5f)), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(ce::kLn2Hi), x);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(ce::kLn2Lo), x);
  __m512 y = _mm512_set1_ps(ce::kPoly[0]);
  for (int i = 1; i < 6; ++i) {
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(ce::kPoly[i]));
  }
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.f)));
  const __m512i n = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(fx), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(n));
}

inline __mmask16 first_lanes(int n) {
  return static_cast<__mmask16>(n >= 16 ? 0xffff : (1u << n) - 1);
}

// Key block blk (keys blk * 16 .., rows of D floats k_stride apart)
// transposed: kt[d * 16 + i] = key blk * 16 + i, element d (zeros past T).
TARGET_AVX512 void transpose_keys(const float* k, int64_t k_stride, int T, int D, int blk, float* kt) {
  const int nk = std::min(kKeys, T - blk * kKeys);
  for (int d0 = 0; d0 < D; d0 += 16) {
    __m512i r[16];
    for (int i = 0; i < 16; ++i) {
      r[i] = i < nk ? _mm512_loadu_si512(k + (int64_t(blk) * kKeys + i) * k_stride + d0) : _mm512_setzero_si512();
    }
    transpose16(r);
    for (int j = 0; j < 16; ++j) {
      _mm512_store_si512(kt + (d0 + j) * kKeys, r[j]);
    }
  }
}

// Scores of NV query vectors qv[i] with the keys of blocks [0, nblk):
// p[i * p_stride + t] = (even-d chain + odd-d chain) * scale.
template <int NV>
TARGET_AVX512 void score_tile(const float* const* qv, const float* kt, int nblk, int D, float scale, float* p,
                              int64_t p_stride) {
  const __m512 sc = _mm512_set1_ps(scale);
  for (int blk = 0; blk < nblk; ++blk) {
    const float* kb = kt + int64_t(blk) * D * kKeys;
    __m512 a0[NV], a1[NV];
    for (int i = 0; i < NV; ++i) {
      a0[i] = _mm512_setzero_ps();
      a1[i] = _mm512_setzero_ps();
    }
    for (int d = 0; d < D; d += 2) {
      const __m512 k0 = _mm512_load_ps(kb + d * kKeys), k1 = _mm512_load_ps(kb + (d + 1) * kKeys);
      for (int i = 0; i < NV; ++i) {
        a0[i] = _mm512_fmadd_ps(_mm512_set1_ps(qv[i][d]), k0, a0[i]);
        a1[i] = _mm512_fmadd_ps(_mm512_set1_ps(qv[i][d + 1]), k1, a1[i]);
      }
    }
    for (int i = 0; i < NV; ++i) {
      _mm512_storeu_ps(p + i * p_stride + blk * kKeys, _mm512_mul_ps(_mm512_add_ps(a0[i], a1[i]), sc));
    }
  }
}

using ScoreFn = void (*)(const float* const*, const float*, int, int, float, float*, int64_t);

template <int... N>
constexpr std::array<ScoreFn, sizeof...(N)> score_tiles(std::integer_sequence<int, N...>) {
  return {score_tile<N + 1>...};
}

// p[0, n) = softmax(p[0, n)) in place: max, e^(p - max) and its sum in 16
// lanes (the last chunk masked), one reduction, one multiply by the inverse.
TARGET_AVX512 void softmax(float* p, int n) {
  __m512 mv = _mm512_set1_ps(-INFINITY);
  for (int t = 0; t < n; t += 16) {
    mv = _mm512_mask_max_ps(mv, first_lanes(n - t), mv, _mm512_maskz_loadu_ps(first_lanes(n - t), p + t));
  }
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mv));
  __m512 sum = _mm512_setzero_ps();
  for (int t = 0; t < n; t += 16) {
    const __mmask16 mk = first_lanes(n - t);
    const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, p + t), m));
    _mm512_mask_storeu_ps(p + t, mk, e);
    sum = _mm512_mask_add_ps(sum, mk, sum, e);
  }
  const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
  for (int t = 0; t < n; t += 16) {
    const __mmask16 mk = first_lanes(n - t);
    _mm512_mask_storeu_ps(p + t, mk, _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, p + t), inv));
  }
}

// acc[c] += a * vt[16c ..] for the nc vectors of one chunk of a value row.
TARGET_AVX512 inline void add_value(__m512 acc[4], float a, const float* vt, int nc) {
  const __m512 av = _mm512_set1_ps(a);
  for (int c = 0; c < 4; ++c) {
    if (c < nc) {
      acc[c] = _mm512_fmadd_ps(av, _mm512_loadu_ps(vt + 16 * c), acc[c]);
    }
  }
}

// y_i = sum_{t < n_i} p_i[t] v_t for NV vectors, 64 floats of D at a time:
// per element one FMA per key in t order from zero (the keys all share
// first, then each vector's own last ones).
template <int NV>
TARGET_AVX512 void sum_tile(const float* const* pv, const int* n, const float* v, int64_t v_stride, int D,
                            float* const* yv) {
  int common = n[0];
  for (int i = 1; i < NV; ++i) {
    common = std::min(common, n[i]);
  }
  for (int d0 = 0; d0 < D; d0 += 64) {
    const int nc = std::min(64, D - d0) / 16;
    __m512 acc[NV][4];
    for (int i = 0; i < NV; ++i) {
      for (int c = 0; c < 4; ++c) {
        acc[i][c] = _mm512_setzero_ps();
      }
    }
    for (int t = 0; t < common; ++t) {
      for (int i = 0; i < NV; ++i) {
        add_value(acc[i], pv[i][t], v + t * v_stride + d0, nc);
      }
    }
    for (int i = 0; i < NV; ++i) {
      for (int t = common; t < n[i]; ++t) {
        add_value(acc[i], pv[i][t], v + t * v_stride + d0, nc);
      }
      for (int c = 0; c < nc; ++c) {
        _mm512_storeu_ps(yv[i] + d0 + 16 * c, acc[i][c]);
      }
    }
  }
}

using SumFn = void (*)(const float* const*, const int*, const float*, int64_t, int, float* const*);

template <int... N>
constexpr std::array<SumFn, sizeof...(N)> sum_tiles(std::integer_sequence<int, N...>) {
  return {sum_tile<N + 1>...};
}

} // namespace

bool attention_avx512_supported(int D) {
  static const bool on = has_avx512f();
  return on && D % 16 == 0;
}

TARGET_AVX512 void attend_kv_head_avx512(
    const float* q, int64_t q_row, int L, int group, int D, const float* k, int64_t k_stride, const float* v,
    int64_t v_stride, int T, bool causal, float scale, float* y) {
  static constexpr auto scores = score_tiles(std::make_integer_sequence<int, kScoreVecs>{});
  static constexpr auto sums = sum_tiles(std::make_integer_sequence<int, kSumVecs>{});
  const int nblk = (T + kKeys - 1) / kKeys;
  const int64_t p_stride = int64_t(nblk) * kKeys;
  // Rows in several blocks share every key: all keys transposed once. One
  // block of rows (decode): each key block transposed into L1 and scored at
  // once, so the keys are read once (a long cache is a memory stream then).
  const bool once = L > kRowBlock;
  // The scratch of this thread, named once: each access to a thread_local in a
  // shared library is a __tls_get_addr call.
  struct Scratch {
    std::vector<float> kt_buf, p_buf;
    std::vector<const float*> qv;
    std::vector<float*> pv, yv;
    std::vector<int> n;
  };
  static thread_local Scratch tls;
  auto& [kt_buf, p_buf, qv, pv, yv, n] = tls;
  kt_buf.resize(size_t(once ? nblk : 1) * D * kKeys + 16);
  p_buf.resize(size_t(kRowBlock) * group * p_stride);
  float* kt = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(kt_buf.data()) + 63) & ~uintptr_t(63));
  if (once) {
    for (int blk = 0; blk < nblk; ++blk) {
      transpose_keys(k, k_stride, T, D, blk, kt + int64_t(blk) * D * kKeys);
    }
  }
  for (int l0 = 0; l0 < L; l0 += kRowBlock) {
    const int rows = std::min(kRowBlock, L - l0);
    const int nv = rows * group;
    qv.clear(), pv.clear(), yv.clear(), n.clear();
    for (int r = 0; r < rows; ++r) {
      const int keys = causal ? T - L + l0 + r + 1 : T;
      for (int h = 0; h < group; ++h) {
        const int64_t at = int64_t(l0 + r) * q_row + int64_t(h) * D;
        qv.push_back(q + at);
        yv.push_back(y + at);
        pv.push_back(p_buf.data() + (int64_t(r) * group + h) * p_stride);
        n.push_back(keys);
      }
    }
    // Up to the last key any vector of a tile sees (rows in order: the last has the most).
    auto blocks_of = [&](int i, int m) { return (n[i + m - 1] + kKeys - 1) / kKeys; };
    if (once) {
      for (int i = 0; i < nv; i += kScoreVecs) {
        const int m = std::min(kScoreVecs, nv - i);
        scores[m - 1](qv.data() + i, kt, blocks_of(i, m), D, scale, pv[i], p_stride);
      }
    } else {
      for (int blk = 0; blk < blocks_of(0, nv); ++blk) {
        transpose_keys(k, k_stride, T, D, blk, kt);
        for (int i = 0; i < nv; i += kScoreVecs) {
          const int m = std::min(kScoreVecs, nv - i);
          if (blk < blocks_of(i, m)) {
            scores[m - 1](qv.data() + i, kt, 1, D, scale, pv[i] + blk * kKeys, p_stride);
          }
        }
      }
    }
    for (int i = 0; i < nv; ++i) {
      softmax(pv[i], n[i]);
    }
    for (int i = 0; i < nv; i += kSumVecs) {
      const int m = std::min(kSumVecs, nv - i);
      sums[m - 1](pv.data() + i, n.data() + i, v, v_stride, D, yv.data() + i);
    }
  }
}

#else // not x86-64

bool attention_avx512_supported(int) {
  return false;
}
void attend_kv_head_avx512(const float*, int64_t, int, int, int, const float*, int64_t, const float*, int64_t, int,
                           bool, float, float*) {}

#endif

} // namespace mlx_llama
