// AVX-512 VNNI panel kernels: see panel_avx512.h for the arithmetic.
#include "panel_avx512.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

#include "threadpool.h"

#if defined(__x86_64__)
#include "avx512_util.h"
#endif

namespace mlx_llama {

#if defined(__x86_64__)
namespace {

bool cpu_has_avx512vnni() {
  if (std::getenv("MLX_LLAMA_NO_AVX512") || !cpu_has_avx2()) {
    return false;
  }
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512vnni");
}

std::atomic<bool>& enabled_flag() {
  static std::atomic<bool> on{cpu_has_avx512vnni()};
  return on;
}

constexpr int kCols = kPanelRows; // output columns per panel: one zmm of float32
constexpr int kMaxRows = 8; // activation rows per micro-kernel call
constexpr int kMaxPanels = 4; // panels packed (and per tile at most) at a time
constexpr int kPanelsPerTask = 8; // smallest task: 128 weight rows
constexpr int kRowsPerTask = 64; // activation rows per task
// How far ahead tiles prefetch weights packed at load. One distance for every
// row count: with the one-stream decode tile, 8 KB decodes 1.00-1.15x faster
// than the 2 KB the older four-panel tile wanted (paired in-process runs, 1B
// 4/8-bit, Zen 5), and batched decode B=8 was best at 8-16 KB.
constexpr int64_t kPrefetchAhead = 8192;

inline int ceil_div(int a, int b) {
  return (a + b - 1) / b;
}

// The activations of one call, prepared once (before the weight panels).
// Few rows (the decode tiles): row m's words at xq + m * xq_stride, its
// block values at [m * nb + b], its group sums at [m * G + g]. More rows
// (panel_tile): interleaved in groups of kMaxRows rows, word w of row r of
// group q at xq + q * kMaxRows * xq_stride + w * 4 * kMaxRows + r * 4, its
// block values at [(q * nb + b) * kMaxRows + r], its group sums likewise:
// a tile reaches all its rows from one pointer at constant offsets, where 8
// row pointers were kept on the stack and reloaded in the inner loop.
struct Acts {
  const int8_t* xq; // int8 (Q8) or int16 (Q16) values, xq_stride bytes per row
  const float* d; // block scales
  const int32_t* ci; // per block: -c * (sum of the block's integer activations)
  const float* xsum; // exact group sums of x
  int64_t xq_stride;
  int nb;
  int G;
};

// Cache lines of scales and as many of biases, prefetched a share at a time
// by a tile that runs before they are read: issued at once, they overflow
// the outstanding misses and come late (paired 1-thread GEMV from memory:
// 20-21 vs 24-25 GB/s at 4 bits).
struct ParamLines {
  const char* s;
  const char* b;
  int64_t lines;
};

// Chunk c of nc's share of the lines.
TARGET_AVX512 inline void prefetch_param_share(const ParamLines& p, int64_t c, int64_t nc) {
  for (int64_t l = c * p.lines / nc; l < (c + 1) * p.lines / nc; ++l) {
    _mm_prefetch(p.s + l * 64, _MM_HINT_T0);
    _mm_prefetch(p.b + l * 64, _MM_HINT_T0);
  }
}

// Packed weights and parameters of up to kMaxPanels consecutive panels.
struct PanelSet {
  const uint32_t* w; // panel v: w + v * panel_words, D vectors of 16 words
  const float* s; // panel v: s + v * panel_params, G x 16 scales
  const float* bb; // panel v: bb + v * panel_params, G x 16 (b + c s)
  int64_t panel_words;
  int panel_params;
  int cols; // output columns in these panels (<= 16 * panels)
  // Weights streamed from memory (packed at load): prefetch this many bytes
  // ahead of each block read; 0 when the panels were just packed into L1/L2.
  int64_t prefetch_bytes;
  // Scales and biases of the panels a set on, prefetched spread over this
  // tile's blocks (with prefetch_bytes).
  ParamLines next_params;
  // Parameters in the panel layout (weights packed at load): panel v's
  // scales at raw_s + v * panel_params elements of raw_type, group-major like
  // s, read and widened by the tile (s and bb unused); null: s and bb.
  const void* raw_s;
  const void* raw_b;
  ScaleType raw_type;
};

// Sum of 16 floats in a fixed order (the group sums' bits depend on it).
TARGET_AVX512 inline float sum_ps(__m512 v) {
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// One block of 32 activations rounded to integers in [-qmax, qmax]:
// q = round(x / d) with d = max|x| / qmax (round half to even); returns d.
TARGET_AVX512 inline float quantize_block(const float* p, float qmax, __m512i& q0, __m512i& q1) {
  const __m512 v0 = _mm512_loadu_ps(p);
  const __m512 v1 = _mm512_loadu_ps(p + 16);
  const float am = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
  const __m512 id = _mm512_set1_ps(am > 0.f ? qmax / am : 0.f);
  q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, id));
  q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, id));
  return am / qmax;
}

// Row x (K floats) into the layout the micro-kernel broadcasts from:
//  * 8 bits, int8: plain order (a 32-bit word is 4 consecutive k, like the
//    weights' words);
//  * 4 bits, int8: per block, its 16 even-k then its 16 odd-k values (a
//    weight word's low nibbles are its even k, the high nibbles the odd k);
//  * 4 bits, int8, `rows` layout (row_tile): per 128 k, the 64 even-k then
//    the 64 odd-k values (the low and high nibbles of 64 bytes of a row);
//  * 8 bits, int16 (x16): per 4 k, the order k0 k2 k1 k3 (a weight word's
//    bytes 0 and 2, then 1 and 3, meet them in vpdpwssd);
//  * 8 bits, int16, `rows` layout: per 64 k (16 words), the (k0, k2) pairs
//    of the 16 words, then their (k1, k3) pairs.
TARGET_AVX512 void quantize_row(
    const float* x, int K, int bits, bool x16, bool rows, int group_size, int8_t* xq, float* d,
    int32_t* ci, float* xsum) {
  const int c = 1 << (bits - 1);
  const __m512i k0213 = _mm512_set_epi16(
      31, 29, 30, 28, 27, 25, 26, 24, 23, 21, 22, 20, 19, 17, 18, 16,
      15, 13, 14, 12, 11, 9, 10, 8, 7, 5, 6, 4, 3, 1, 2, 0);
  const __m256i evens_odds = _mm256_setr_epi8(
      0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
      0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  const int bpg = group_size / 32;
  for (int b = 0; b < K / 32; ++b) {
    __m512i q0, q1;
    const float* p = x + b * 32;
    d[b] = quantize_block(p, x16 ? 32767.f : 127.f, q0, q1);
    ci[b] = -c * _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    const float s = sum_ps(_mm512_add_ps(_mm512_loadu_ps(p), _mm512_loadu_ps(p + 16)));
    xsum[b / bpg] = b % bpg == 0 ? s : xsum[b / bpg] + s;
    if (x16) {
      const __m512i v = _mm512_inserti64x4(
          _mm512_castsi256_si512(_mm512_cvtepi32_epi16(q0)), _mm512_cvtepi32_epi16(q1), 1);
      _mm512_storeu_si512(xq + b * 64, _mm512_permutexvar_epi16(k0213, v));
      if (rows && (b % 2 == 1 || b == K / 32 - 1)) {
        // Per 16 words: their (k0, k2) pairs, then their (k1, k3) pairs.
        int8_t* chunk = xq + (b / 2) * 128;
        const __m512i lo = _mm512_loadu_si512(chunk);
        const __m512i hi = b % 2 == 1 ? _mm512_loadu_si512(chunk + 64) : _mm512_setzero_si512();
        const __m512i evens = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
        const __m512i odds = _mm512_add_epi32(evens, _mm512_set1_epi32(1));
        _mm512_storeu_si512(chunk, _mm512_permutex2var_epi32(lo, evens, hi));
        _mm512_storeu_si512(chunk + 64, _mm512_permutex2var_epi32(lo, odds, hi));
      }
      continue;
    }
    const __m256i v = _mm256_inserti128_si256(
        _mm256_castsi128_si256(_mm512_cvtepi32_epi8(q0)), _mm512_cvtepi32_epi8(q1), 1);
    if (bits == 8) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + b * 32), v);
      continue;
    }
    const __m256i eo = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(v, evens_odds), 0xd8);
    if (!rows) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + b * 32), eo);
      continue;
    }
    int8_t* chunk = xq + (b / 4) * 128 + (b % 4) * 16;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(chunk), _mm256_castsi256_si128(eo));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(chunk + 64), _mm256_extracti128_si256(eo, 1));
  }
}

// 16 weight rows (rows >= `rows` read as zeros) of D words each into dst:
// D vectors, vector j = word j of the 16 rows. Prefetches `pf_bytes` from
// pf (the next panel) spread over the loop.
TARGET_AVX512 void pack_words(
    const uint32_t* w, int64_t D, int rows, uint32_t* dst, const char* pf, int64_t pf_bytes) {
  const int64_t steps = (D + 15) / 16;
  const int64_t pf_step = ((pf_bytes + steps - 1) / steps + 63) / 64 * 64;
  for (int64_t j0 = 0, s = 0; j0 < D; j0 += 16, ++s) {
    for (int64_t o = 0; o < pf_step && s * pf_step + o < pf_bytes; o += 64) {
      _mm_prefetch(pf + s * pf_step + o, _MM_HINT_T0);
    }
    const int nj = static_cast<int>(std::min<int64_t>(16, D - j0));
    const __mmask16 mask = static_cast<__mmask16>((1u << nj) - 1);
    __m512i r[16];
    for (int i = 0; i < 16; ++i) {
      r[i] = i < rows ? _mm512_maskz_loadu_epi32(mask, w + i * D + j0) : _mm512_setzero_si512();
    }
    transpose16(r);
    for (int t = 0; t < nj; ++t) {
      _mm512_storeu_si512(dst + (j0 + t) * kCols, r[t]);
    }
  }
}

// Group g of a vector of transposed 32-bit words of 16-bit values (two
// groups per word: g even in the low half) as float32 (exact).
TARGET_AVX512 inline __m512 widen_group(__m512i words, int g, ScaleType st) {
  if (st == ScaleType::BF16) {
    return _mm512_castsi512_ps(
        g % 2 == 0 ? _mm512_slli_epi32(words, 16) : _mm512_and_si512(words, _mm512_set1_epi32(int(0xffff0000u))));
  }
  return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(g % 2 == 0 ? words : _mm512_srli_epi32(words, 16)));
}

// 16 consecutive parameters p[e ..] of type st as float32 (exact).
TARGET_AVX512 inline __m512 load_params16(const void* p, int64_t e, ScaleType st) {
  if (st == ScaleType::F32) {
    return _mm512_loadu_ps(static_cast<const float*>(p) + e);
  }
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + e));
  if (st == ScaleType::BF16) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  return _mm512_cvtph_ps(h);
}

// Scales and b + c * s of 16 rows, group-major: ps[g * 16 + col]. One
// 16 x 16 transpose of 32-bit words takes 16 groups of float32 parameters,
// or 32 of 16-bit ones (two per word, widened after the transpose: half the
// shuffles of widening first, 3-7% faster 1-thread GEMV, paired runs).
TARGET_AVX512 void pack_params(
    const QMatmulArgs& a, int n0, int rows, float* ps, float* pbb) {
  const int G = a.K / a.group_size;
  const __m512 c = _mm512_set1_ps(static_cast<float>(1 << (a.bits - 1)));
  const bool f32 = a.stype == ScaleType::F32;
  const int per = f32 ? 16 : 32; // groups per 64 bytes
  for (int g0 = 0; g0 < G; g0 += per) {
    const int ng = std::min(per, G - g0);
    __m512i s[16], b[16];
    for (int i = 0; i < 16; ++i) {
      const int64_t e = int64_t(n0 + i) * G + g0;
      if (i >= rows) {
        s[i] = b[i] = _mm512_setzero_si512();
      } else if (f32) {
        const __mmask16 mask = static_cast<__mmask16>((1u << ng) - 1);
        s[i] = _mm512_maskz_loadu_epi32(mask, static_cast<const float*>(a.scales) + e);
        b[i] = _mm512_maskz_loadu_epi32(mask, static_cast<const float*>(a.biases) + e);
      } else {
        const __mmask32 mask = ng == 32 ? ~__mmask32(0) : static_cast<__mmask32>((1u << ng) - 1);
        s[i] = _mm512_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(a.scales) + e);
        b[i] = _mm512_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(a.biases) + e);
      }
    }
    transpose16(s);
    transpose16(b);
    for (int g = 0; g < ng; ++g) {
      const __m512 sv = f32 ? _mm512_castsi512_ps(s[g]) : widen_group(s[g / 2], g, a.stype);
      const __m512 bv = f32 ? _mm512_castsi512_ps(b[g]) : widen_group(b[g / 2], g, a.stype);
      _mm512_store_ps(ps + (g0 + g) * kCols, sv);
      _mm512_store_ps(pbb + (g0 + g) * kCols, _mm512_fmadd_ps(sv, c, bv));
    }
  }
}

inline int32_t word_at(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// The steps of the per-element sequence (panel_avx512.h), shared by every
// tile so that they agree bit for bit.
//
// A vector of 16 weight words split as its dot products take it: 4 bits,
// the low and high nibbles (even and odd k); 8 bits with int16 activations,
// bytes 0/2 and 1/3 widened to int16; 8 bits with int8 activations, as is.
struct Word {
  __m512i a, b;
};

template <int BITS, bool X16>
TARGET_AVX512 inline Word split_word(__m512i raw) {
  if constexpr (BITS == 4) {
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    return {_mm512_and_si512(raw, low4), _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4)};
  } else if constexpr (X16) {
    return {_mm512_and_si512(raw, _mm512_set1_epi32(0x00ff00ff)), _mm512_srli_epi16(raw, 8)};
  } else {
    return {raw, raw};
  }
}

// I + the products of word j of block b with one activation row whose
// words are WS bytes apart from xr on (4: plain, 4 * kMaxRows: interleaved).
template <int BITS, bool X16, int WS>
TARGET_AVX512 inline __m512i add_word(__m512i I, const Word& w, const int8_t* xr, int b, int j) {
  if constexpr (BITS == 4) {
    const int8_t* p = xr + (b * 8 + j) * WS;
    I = _mm512_dpbusd_epi32(I, w.a, _mm512_set1_epi32(word_at(p)));
    return _mm512_dpbusd_epi32(I, w.b, _mm512_set1_epi32(word_at(p + 4 * WS)));
  } else if constexpr (!X16) {
    return _mm512_dpbusd_epi32(I, w.a, _mm512_set1_epi32(word_at(xr + (b * 8 + j) * WS)));
  } else {
    const int8_t* p = xr + (b * 16 + 2 * j) * WS;
    I = _mm512_dpwssd_epi32(I, w.a, _mm512_set1_epi32(word_at(p)));
    return _mm512_dpwssd_epi32(I, w.b, _mm512_set1_epi32(word_at(p + WS)));
  }
}

// A block's integer sums I (started at ci) into its group's partial t:
// t = float(I) d for the group's first block, else t + float(I) d.
TARGET_AVX512 inline __m512 add_block(__m512 t, __m512i I, float d, bool first) {
  const __m512 f = _mm512_cvtepi32_ps(I);
  const __m512 dv = _mm512_set1_ps(d);
  return first ? _mm512_mul_ps(f, dv) : _mm512_fmadd_ps(f, dv, t);
}

// A group's partial t into the output: acc + t s + (b + c s) xsum.
TARGET_AVX512 inline __m512 add_group(__m512 acc, __m512 t, __m512 s, __m512 bb, float xsum) {
  acc = _mm512_fmadd_ps(t, s, acc);
  return _mm512_fmadd_ps(bb, _mm512_set1_ps(xsum), acc);
}

// R activation rows (m0 ..) x V panels of 16 columns (V * 16 columns; the
// last panel may have fewer), over all of K. Several panels per call give
// small R independent accumulator chains (a dpbusd chain is latency-bound
// with one row); one row reads one panel instead, its block's words split
// over CH integer chains (see panels_for_rows). The per-element sequence
// (panel_avx512.h) does not depend on R, V or CH: the integer sums are
// exact. IL: the activations interleaved by kMaxRows rows (Acts; the tile's
// rows within one group), else plain rows (few rows, weights packed at load:
// the interleaved layout of one row would take 8 times its cache lines).
template <int BITS, bool X16, int R, int V, bool IL>
TARGET_AVX512 void panel_tile(const Acts& x, const PanelSet& ps, int bpg, int m0, float* y, int64_t ldy) {
  constexpr int WPB = BITS == 4 ? 4 : 8; // weight words per block of 32 k
  constexpr int CH = R == 1 && V == 1 ? 4 : 1; // integer chains per (row, panel)
  constexpr int WS = IL ? 4 * kMaxRows : 4; // bytes between a row's words
  constexpr int64_t es = IL ? kMaxRows : 1; // between a row's per-block (per-group) values
  const int64_t q = IL ? m0 / kMaxRows : m0; // first row (IL: row group) of the tile
  const int64_t xr = IL ? 4 : x.xq_stride, dr = IL ? 1 : x.nb, gr = IL ? 1 : x.G; // between rows
  const int64_t r0 = IL ? m0 % kMaxRows : 0; // the tile's first row within its group
  const int8_t* xg = x.xq + q * es * x.xq_stride + r0 * 4;
  const float* dg = x.d + q * x.nb * es + r0;
  const int32_t* cg = x.ci + q * x.nb * es + r0;
  const float* sg = x.xsum + q * x.G * es + r0;
  const __m512i* wv[V];
  const float* sv[V];
  const float* bv[V];
  for (int v = 0; v < V; ++v) {
    wv[v] = reinterpret_cast<const __m512i*>(ps.w + v * ps.panel_words);
    sv[v] = ps.s + v * ps.panel_params;
    bv[v] = ps.bb + v * ps.panel_params;
  }
  __m512 acc[R][V];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < V; ++v) {
      acc[r][v] = _mm512_setzero_ps();
    }
  }
  const int G = x.G;
  for (int g = 0, b = 0; g < G; ++g) {
    __m512 t[R][V];
    for (int bi = 0; bi < bpg; ++bi, ++b) {
      if (ps.prefetch_bytes) {
        prefetch_param_share(ps.next_params, b, x.nb);
        // Each of the V streams prefetches its own bytes ahead: past its
        // panel's end that is the panel V on (the next tile's), not the one
        // its neighbour stream is reading already.
        int64_t ahead = int64_t(b) * WPB * 64 + ps.prefetch_bytes;
        if (ahead >= ps.panel_words * 4) {
          ahead += (V - 1) * ps.panel_words * 4;
        }
        for (int v = 0; v < V; ++v) {
          const char* at = reinterpret_cast<const char*>(wv[v]) + ahead;
          for (int l = 0; l < WPB; ++l) {
            _mm_prefetch(at + l * 64, _MM_HINT_T0);
          }
        }
      }
      __m512i I[CH][R][V];
      for (int r = 0; r < R; ++r) {
        for (int v = 0; v < V; ++v) {
          I[0][r][v] = _mm512_set1_epi32(cg[b * es + r * dr]);
          for (int c = 1; c < CH; ++c) {
            I[c][r][v] = _mm512_setzero_si512();
          }
        }
      }
      // Unrolled: GCC otherwise copies every accumulator between registers each
      // word (8-bit int16 M=8: ~10% of the tile's time, paired runs).
#pragma GCC unroll 8
      for (int j = 0; j < WPB; ++j) {
        for (int v = 0; v < V; ++v) {
          const Word w = split_word<BITS, X16>(_mm512_loadu_si512(wv[v] + b * WPB + j));
          for (int r = 0; r < R; ++r) {
            I[j % CH][r][v] = add_word<BITS, X16, WS>(I[j % CH][r][v], w, xg + r * xr, b, j);
          }
        }
      }
      for (int r = 0; r < R; ++r) {
        for (int v = 0; v < V; ++v) {
          for (int c = 1; c < CH; ++c) {
            I[0][r][v] = _mm512_add_epi32(I[0][r][v], I[c][r][v]);
          }
          t[r][v] = add_block(t[r][v], I[0][r][v], dg[b * es + r * dr], bi == 0);
        }
      }
    }
    for (int v = 0; v < V; ++v) {
      __m512 s, bb;
      if (ps.raw_s) {
        const int64_t e = v * int64_t(ps.panel_params) + g * kCols;
        s = load_params16(ps.raw_s, e, ps.raw_type);
        // b + c s with c = 2^(bits - 1), as pack_params computes it.
        bb = _mm512_fmadd_ps(s, _mm512_set1_ps(float(1 << (BITS - 1))), load_params16(ps.raw_b, e, ps.raw_type));
      } else {
        s = _mm512_load_ps(sv[v] + g * kCols);
        bb = _mm512_load_ps(bv[v] + g * kCols);
      }
      for (int r = 0; r < R; ++r) {
        acc[r][v] = add_group(acc[r][v], t[r][v], s, bb, sg[g * es + r * gr]);
      }
    }
  }
  for (int v = 0; v < V; ++v) {
    const int cols = std::min(kCols, ps.cols - v * kCols);
    const __mmask16 mask = static_cast<__mmask16>((1u << cols) - 1);
    for (int r = 0; r < R; ++r) {
      _mm512_mask_storeu_ps(y + int64_t(m0 + r) * ldy + v * kCols, mask, acc[r][v]);
    }
  }
}

// The next panel's bytes, prefetched by a decode tile while it runs: its
// weight rows and its scales and biases, each spread evenly over the tile's
// chunks.
struct NextPanel {
  const char* w;
  ParamLines params;
};

// Few activation rows (R <= kMaxDirectRows, decode): one panel straight from
// the weights, 16 words of its 16 rows at a time transposed in registers and
// consumed at once, instead of packed into a buffer for tiles to share: the
// buffer's store and reload would cost as much as the arithmetic of one row.
// The same per-element sequence as panel_tile, so the same bits.
template <int BITS, bool X16, int R>
TARGET_AVX512 void direct_tile(
    const Acts& x, const uint32_t* w, int64_t D, int rows, const float* ps, const float* pbb, int bpg,
    float* y, int64_t ldy, const NextPanel& next) {
  constexpr int WPB = BITS == 4 ? 4 : 8;
  const int64_t nc = (D + 15) / 16;
  __m512 acc[R], t[R];
  for (int r = 0; r < R; ++r) {
    acc[r] = _mm512_setzero_ps();
    t[r] = _mm512_setzero_ps();
  }
  for (int64_t j0 = 0; j0 < D; j0 += 16) {
    const int nj = static_cast<int>(std::min<int64_t>(16, D - j0));
    const __mmask16 mask = static_cast<__mmask16>((1u << nj) - 1);
    __m512i v[16];
    for (int i = 0; i < 16; ++i) {
      v[i] = i < rows ? _mm512_maskz_loadu_epi32(mask, w + i * D + j0) : _mm512_setzero_si512();
      _mm_prefetch(next.w + (j0 * 16 + i * 16) * 4, _MM_HINT_T0);
    }
    prefetch_param_share(next.params, j0 / 16, nc);
    transpose16(v);
#pragma GCC unroll 4
    for (int lb = 0; lb < 16 / WPB; ++lb) {
      if (lb * WPB >= nj) {
        break;
      }
      const int b = static_cast<int>(j0 / WPB) + lb;
      __m512i I[R];
      for (int r = 0; r < R; ++r) {
        I[r] = _mm512_set1_epi32(x.ci[int64_t(r) * x.nb + b]);
      }
#pragma GCC unroll 8
      for (int j = 0; j < WPB; ++j) {
        const Word w = split_word<BITS, X16>(v[lb * WPB + j]);
        for (int r = 0; r < R; ++r) {
          I[r] = add_word<BITS, X16, 4>(I[r], w, x.xq + int64_t(r) * x.xq_stride, b, j);
        }
      }
      const int bi = b % bpg, g = b / bpg;
      for (int r = 0; r < R; ++r) {
        t[r] = add_block(t[r], I[r], x.d[int64_t(r) * x.nb + b], bi == 0);
      }
      if (bi == bpg - 1) {
        const __m512 sv = _mm512_load_ps(ps + g * kCols);
        const __m512 bb = _mm512_load_ps(pbb + g * kCols);
        for (int r = 0; r < R; ++r) {
          acc[r] = add_group(acc[r], t[r], sv, bb, x.xsum[int64_t(r) * x.G + g]);
        }
      }
    }
  }
  const __mmask16 mask = static_cast<__mmask16>((1u << rows) - 1);
  for (int r = 0; r < R; ++r) {
    _mm512_mask_storeu_ps(y + int64_t(r) * ldy, mask, acc[r]);
  }
}

// Sums of the 4-lane quads of 16 vectors: out[q] lane i = the sum of lanes
// 4q .. 4q + 3 of P[i]. 32 shuffles, half a 16 x 16 transpose.
TARGET_AVX512 inline void quad_sums(const __m512i P[16], __m512i out[4]) {
  __m512i q[8], r[4];
  for (int i = 0; i < 8; ++i) {
    q[i] = _mm512_add_epi32(
        _mm512_unpacklo_epi32(P[2 * i], P[2 * i + 1]), _mm512_unpackhi_epi32(P[2 * i], P[2 * i + 1]));
  }
  // r[i], 128-bit lane L: quad L of rows 4i .. 4i + 3.
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_add_epi32(
        _mm512_unpacklo_epi64(q[2 * i], q[2 * i + 1]), _mm512_unpackhi_epi64(q[2 * i], q[2 * i + 1]));
  }
  const __m512i c0 = _mm512_shuffle_i32x4(r[0], r[1], 0x88);
  const __m512i c1 = _mm512_shuffle_i32x4(r[0], r[1], 0xdd);
  const __m512i c2 = _mm512_shuffle_i32x4(r[2], r[3], 0x88);
  const __m512i c3 = _mm512_shuffle_i32x4(r[2], r[3], 0xdd);
  out[0] = _mm512_shuffle_i32x4(c0, c2, 0x88);
  out[1] = _mm512_shuffle_i32x4(c1, c3, 0x88);
  out[2] = _mm512_shuffle_i32x4(c0, c2, 0xdd);
  out[3] = _mm512_shuffle_i32x4(c1, c3, 0xdd);
}

// 16 weight words of one row against the activation vectors that meet them
// in the `rows` layouts: 16 int32 partial sums (4 consecutive k per lane).
template <int BITS, bool X16>
TARGET_AVX512 inline __m512i row_dot(const Word& w, __m512i xa, __m512i xb) {
  const __m512i zero = _mm512_setzero_si512();
  if constexpr (BITS == 4) {
    return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, w.a, xa), w.b, xb);
  } else if constexpr (X16) {
    return _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(zero, w.a, xa), w.b, xb);
  } else {
    return _mm512_dpbusd_epi32(zero, w.a, xa);
  }
}

// One activation row (decode), one panel: each weight row's 64 bytes meet
// full vectors of activations (quantize_row's `rows` layouts), and quad_sums
// turns the 16 rows' partial sums into per-block sums of 16 columns — half
// the shuffles of transposing the weights first. Integer sums are exact, so
// the per-element sequence and bits are those of panel_tile.
template <int BITS, bool X16>
TARGET_AVX512 void row_tile(
    const Acts& x, const uint32_t* w, int64_t D, int rows, const float* ps, const float* pbb, int bpg,
    float* y, int64_t, const NextPanel& next) {
  const int64_t nc = (D + 15) / 16;
  __m512 acc = _mm512_setzero_ps(), t = _mm512_setzero_ps();
  for (int64_t j0 = 0; j0 < D; j0 += 16) {
    const int nj = static_cast<int>(std::min<int64_t>(16, D - j0));
    const __mmask16 mask = static_cast<__mmask16>((1u << nj) - 1);
    prefetch_param_share(next.params, j0 / 16, nc);
    // 4 bits and int16: per 16 words two activation vectors (even/odd k, or the (k0, k2) and (k1, k3)
    // pairs); 8 bits with int8: one.
    constexpr bool two = BITS == 4 || X16;
    const int8_t* xp = x.xq + j0 * (two ? 8 : 4);
    const __m512i xa = _mm512_loadu_si512(xp);
    const __m512i xb = two ? _mm512_loadu_si512(xp + 64) : _mm512_setzero_si512();
    __m512i P[16];
    for (int i = 0; i < 16; ++i) {
      const __m512i v = i < rows ? _mm512_maskz_loadu_epi32(mask, w + i * D + j0) : _mm512_setzero_si512();
      _mm_prefetch(next.w + (j0 * 16 + i * 16) * 4, _MM_HINT_T0);
      P[i] = row_dot<BITS, X16>(split_word<BITS, X16>(v), xa, xb);
    }
    __m512i quads[4];
    quad_sums(P, quads);
    constexpr int BPC = BITS == 4 ? 4 : 2; // blocks per 16 words
    const int b0 = static_cast<int>(j0 * BPC / 16);
    for (int lb = 0; lb < BPC && lb * 16 / BPC < nj; ++lb) {
      const int b = b0 + lb;
      __m512i sum;
      if constexpr (BITS == 4) {
        sum = quads[lb];
      } else {
        sum = _mm512_add_epi32(quads[2 * lb], quads[2 * lb + 1]);
      }
      const int bi = b % bpg, g = b / bpg;
      t = add_block(t, _mm512_add_epi32(sum, _mm512_set1_epi32(x.ci[b])), x.d[b], bi == 0);
      if (bi == bpg - 1) {
        acc = add_group(acc, t, _mm512_load_ps(ps + g * kCols), _mm512_load_ps(pbb + g * kCols), x.xsum[g]);
      }
    }
  }
  _mm512_mask_storeu_ps(y, static_cast<__mmask16>((1u << rows) - 1), acc);
}

using DirectFn = void (*)(
    const Acts&, const uint32_t*, int64_t, int, const float*, const float*, int, float*, int64_t, const NextPanel&);
constexpr int kMaxDirectRows = 4;

template <int BITS, bool X16, int... R>
constexpr std::array<DirectFn, sizeof...(R)> direct_of(std::integer_sequence<int, R...>) {
  return {direct_tile<BITS, X16, R + 1>...};
}

// [r - 1]: r activation rows.
template <int BITS, bool X16>
const DirectFn* direct_tiles() {
  static constexpr auto t = direct_of<BITS, X16>(std::make_integer_sequence<int, kMaxDirectRows>{});
  return t.data();
}

using TileFn = void (*)(const Acts&, const PanelSet&, int, int, float*, int64_t);

// Panels per tile for r activation rows: enough accumulators in flight. One
// row (decode) reads one panel, a single weight stream, and gets its chains
// from CH instead: four panels' streams ran the GEMV 15-25% slower from
// memory on a Zen 4 host (decode 8-bit 15 -> 20 tok/s); one chain alone is
// latency-bound on weights in cache.
constexpr int panels_for_rows(int r) {
  return r == 1 ? 1 : (r <= 2 ? 4 : (r <= 4 ? 2 : 1));
}

struct TileTable {
  TileFn wide[kMaxRows]; // [r - 1]: r rows x panels_for_rows(r) panels
  TileFn single[kMaxRows]; // [r - 1]: r rows x 1 panel
};

template <int BITS, bool X16, bool IL, int... R>
constexpr TileTable table_of(std::integer_sequence<int, R...>) {
  return {{panel_tile<BITS, X16, R + 1, panels_for_rows(R + 1), IL>...}, {panel_tile<BITS, X16, R + 1, 1, IL>...}};
}

// IL: interleaved activations (every M), else plain rows (M <= kMaxDirectRows).
template <int BITS, bool X16, bool IL>
const TileTable& tiles() {
  static constexpr TileTable t =
      table_of<BITS, X16, IL>(std::make_integer_sequence<int, IL ? kMaxRows : kMaxDirectRows>{});
  return t;
}

} // namespace

bool panel_kernels_enabled() {
  return enabled_flag().load(std::memory_order_relaxed);
}

void set_panel_kernels(bool on) {
  enabled_flag().store(on && cpu_has_avx512vnni(), std::memory_order_relaxed);
}

bool panel_supported(int K, int group_size, int bits, Mode mode) {
  if (!panel_kernels_enabled() || K % 32 != 0 || group_size % 32 != 0) {
    return false;
  }
  return mode == Mode::Q16 ? bits == 8 : (mode == Mode::Q8 && (bits == 4 || bits == 8));
}

void qmatmul_panel(const QMatmulArgs& a, Mode mode) {
  const bool x16 = mode == Mode::Q16;
  const int nb = a.K / 32;
  const int G = a.K / a.group_size;
  // Rows padded to 128 k: row_tile reads whole 64-byte vectors.
  const int64_t stride = int64_t(ceil_div(a.K, 128)) * 128 * (x16 ? 2 : 1);
  // Weights already in the panel layout: every M runs panel_tile on them.
  const bool rows_layout = a.M == 1 && !a.panels;

  struct Scratch {
    std::vector<int8_t> xq;
    std::vector<float> d, xsum;
    std::vector<int32_t> ci;
  };
  const bool interleaved = a.M > kMaxDirectRows; // Acts: panel_tile's layout
  const size_t scratch_rows = interleaved ? size_t(ceil_div(a.M, kMaxRows)) * kMaxRows : size_t(a.M);
  static thread_local Scratch sc;
  sc.xq.resize(scratch_rows * stride);
  sc.d.resize(scratch_rows * nb);
  sc.ci.resize(scratch_rows * nb);
  sc.xsum.resize(scratch_rows * G);
  const Acts x{sc.xq.data(), sc.d.data(), sc.ci.data(), sc.xsum.data(), stride, nb, G};
  int8_t* xq = sc.xq.data();
  float* d = sc.d.data();
  int32_t* ci = sc.ci.data();
  float* xsum = sc.xsum.data();

  auto& pool = ThreadPool::instance();
  const int64_t row_words = int64_t(a.K) * (x16 ? 2 : 1) / 4;
  auto prep = [&](int m0, int m1) {
    if (!interleaved) {
      for (int m = m0; m < m1; ++m) {
        quantize_row(
            a.x + int64_t(m) * a.K, a.K, a.bits, x16, rows_layout, a.group_size, xq + m * stride,
            d + int64_t(m) * nb, ci + int64_t(m) * nb, xsum + int64_t(m) * G);
      }
      return;
    }
    static thread_local Scratch tls_row; // one row, plain, then spread into the interleaved layout
    // Plain pointers and counts: through the thread_local (a __tls_get_addr call
    // per access in a shared library) and the closure, the word loop below took
    // ~115 of the 162 us of an M=8, K=8192, 8-bit call.
    Scratch& row = tls_row;
    row.xq.resize(stride);
    row.d.resize(nb);
    row.ci.resize(nb);
    row.xsum.resize(G);
    int8_t* rxq = row.xq.data();
    float* rd = row.d.data();
    int32_t* rci = row.ci.data();
    float* rxsum = row.xsum.data();
    const int64_t words = row_words;
    for (int m = m0; m < m1; ++m) {
      quantize_row(
          a.x + int64_t(m) * a.K, a.K, a.bits, x16, false, a.group_size, rxq, rd, rci, rxsum);
      const int64_t q = m / kMaxRows, r = m % kMaxRows;
      int8_t* dst = xq + q * kMaxRows * stride + r * 4;
      for (int64_t w = 0; w < words; ++w) {
        std::memcpy(dst + w * 4 * kMaxRows, rxq + w * 4, 4);
      }
      for (int b = 0; b < nb; ++b) {
        d[(q * nb + b) * kMaxRows + r] = rd[b];
        ci[(q * nb + b) * kMaxRows + r] = rci[b];
      }
      for (int g = 0; g < G; ++g) {
        xsum[(q * G + g) * kMaxRows + r] = rxsum[g];
      }
    }
  };
  if (a.M >= 16) {
    constexpr int per = 8;
    pool.parallel_for(ceil_div(a.M, per), [&](int t, int) { prep(t * per, std::min(a.M, (t + 1) * per)); });
  } else {
    prep(0, a.M);
  }

  const TileTable& tiles_ = interleaved
      ? (a.bits == 4 ? tiles<4, false, true>() : (x16 ? tiles<8, true, true>() : tiles<8, false, true>()))
      : (a.bits == 4 ? tiles<4, false, false>() : (x16 ? tiles<8, true, false>() : tiles<8, false, false>()));
  const DirectFn* direct =
      a.bits == 4 ? direct_tiles<4, false>() : (x16 ? direct_tiles<8, true>() : direct_tiles<8, false>());
  const int64_t D = int64_t(a.K) * a.bits / 32; // words per weight row
  const int panels = ceil_div(a.N, kCols);
  // Panels per task, shrinking when one task covers all M rows (shrinking_blocks).
  const std::vector<int> bounds = shrinking_blocks(panels, kPanelsPerTask, a.M <= kRowsPerTask, pool.size());
  const int nt = static_cast<int>(bounds.size()) - 1;
  const int mt = ceil_div(a.M, kRowsPerTask);
  const int bpg = a.group_size / 32;
  const int64_t panel_words = D * kCols;
  const int panel_params = G * kCols;
  const int pbytes = a.stype == ScaleType::F32 ? 4 : 2; // bytes per scale or bias
  pool.parallel_for(nt * mt, [&](int task, int) {
    struct PanelScratch {
      std::vector<uint32_t> w;
      std::vector<float> params;
    };
    static thread_local PanelScratch sp;
    const size_t wn = size_t(panel_words) * kMaxPanels + 16;
    const size_t pn = size_t(panel_params) * kMaxPanels * 2 + 16;
    if (sp.w.size() < wn) {
      sp.w.resize(wn);
    }
    if (sp.params.size() < pn) {
      sp.params.resize(pn);
    }
    auto align64 = [](auto* p) {
      return reinterpret_cast<decltype(p)>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63));
    };
    uint32_t* pw = align64(sp.w.data());
    float* s_p = align64(sp.params.data());
    float* bb_p = s_p + panel_params * kMaxPanels;
    const int nb_i = task / mt, mb = task % mt;
    const int m0 = mb * kRowsPerTask, m1 = std::min(a.M, m0 + kRowsPerTask);
    const int p_end = bounds[nb_i + 1];
    if (a.M <= kMaxDirectRows && !a.panels) {
      const DirectFn row = a.bits == 4 ? row_tile<4, false> : (x16 ? row_tile<8, true> : row_tile<8, false>);
      const DirectFn fn = rows_layout ? row : direct[a.M - 1];
      // The cache line holding row n's first scale (or bias).
      auto param_line = [&](const void* base, int n) {
        const uintptr_t at = reinterpret_cast<uintptr_t>(base) + uintptr_t(n) * G * pbytes;
        return reinterpret_cast<const char*>(at & ~uintptr_t(63));
      };
      for (int p = bounds[nb_i]; p < p_end; ++p) {
        const int n0 = p * kCols;
        const int rows = std::min(kCols, a.N - n0);
        pack_params(a, n0, rows, s_p, bb_p);
        // The next panel (the last one re-reads its own).
        const int nn = n0 + kCols < a.N ? n0 + kCols : n0;
        // From a line start, bytes / 64 + 2 lines cover the panel's bytes however they are aligned.
        const int64_t param_bytes = int64_t(std::min(nn + kCols, a.N) - nn) * G * pbytes;
        const NextPanel next{
            reinterpret_cast<const char*>(a.w + nn * D),
            {param_line(a.scales, nn), param_line(a.biases, nn), param_bytes / 64 + 2}};
        fn(x, a.w + n0 * D, D, rows, s_p, bb_p, bpg, a.y + n0, a.N, next);
      }
      return;
    }
    for (int p0 = bounds[nb_i]; p0 < p_end; p0 += kMaxPanels) {
      const int np = std::min(kMaxPanels, p_end - p0);
      const int n0 = p0 * kCols;
      const int cols = std::min(np * kCols, a.N - n0);
      // Packed here, or at load (a.panels: the weights stream in tile order).
      const uint32_t* wp = a.panels ? a.w + int64_t(p0) * panel_words : pw;
      if (!a.panels) {
        // The next panels' bytes, prefetched while these are packed.
        const int64_t next_n = std::min<int64_t>(a.N, n0 + 2 * kMaxPanels * kCols) - (n0 + np * kCols);
        const char* next = reinterpret_cast<const char*>(a.w + (n0 + np * kCols) * D);
        for (int v = 0; v < np; ++v) {
          const int rows = std::min(kCols, cols - v * kCols);
          pack_words(
              a.w + (n0 + v * kCols) * D, D, rows, pw + v * panel_words, next + v * (next_n * D * 4 / np),
              std::max<int64_t>(0, next_n) * D * 4 / np);
          pack_params(a, n0 + v * kCols, rows, s_p + v * panel_params, bb_p + v * panel_params);
        }
      }
      // Tile (rows m .. m + r, panels v ..): the set it reads and the call.
      auto tile = [&](int v, int m, int r, bool wide, int V) {
        // The parameters of the panels kMaxPanels on from this tile's.
        const int64_t nn0 = std::min<int64_t>(a.N, n0 + (kMaxPanels + v) * kCols);
        const int64_t nn1 = std::min<int64_t>(a.N, nn0 + (wide ? V : 1) * kCols);
        const int64_t ahead = a.panels ? kPrefetchAhead : 0;
        // Panel layout: this tile's parameters, panel p0 + v on.
        const int64_t pe = (int64_t(p0) + v) * panel_params * pbytes;
        const PanelSet set{
            wp + v * panel_words, s_p + v * panel_params, bb_p + v * panel_params,
            panel_words, panel_params, cols - v * kCols, ahead,
            {static_cast<const char*>(a.scales) + nn0 * G * pbytes,
             static_cast<const char*>(a.biases) + nn0 * G * pbytes, ((nn1 - nn0) * G * pbytes + 63) / 64},
            a.panels ? static_cast<const char*>(a.scales) + pe : nullptr,
            a.panels ? static_cast<const char*>(a.biases) + pe : nullptr, a.stype};
        (wide ? tiles_.wide : tiles_.single)[r - 1](x, set, bpg, m, a.y + n0 + v * kCols, a.N);
      };
      // Up to 8 rows (batched decode): one 8-row tile per panel reads each weight once. More
      // (prefill): 4-row x 2-panel tiles, 5-13% faster on weights in cache (fewer broadcasts per
      // dot product), panels outer and row blocks inner so that a block's panels are still in
      // L1/L2 for the next block.
      const int tile_rows = a.M <= kMaxRows ? kMaxRows : 4;
      const int V = panels_for_rows(std::min(tile_rows, m1 - m0));
      for (int v = 0; v < np; v += V) {
        const int nv = std::min(V, np - v);
        for (int m = m0; m < m1; m += tile_rows) {
          const int r = std::min(tile_rows, m1 - m);
          if (nv == V && panels_for_rows(r) == V) {
            tile(v, m, r, true, V);
          } else {
            for (int u = 0; u < nv; ++u) {
              tile(v + u, m, r, false, V);
            }
          }
        }
      }
    }
  });
}

#else // not x86-64: the panel kernels do not exist

bool panel_kernels_enabled() {
  return false;
}
void set_panel_kernels(bool) {}
bool panel_supported(int, int, int, Mode) {
  return false;
}
void qmatmul_panel(const QMatmulArgs&, Mode) {}

#endif

} // namespace mlx_llama
