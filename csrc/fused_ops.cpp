#include "fused_ops.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <vector>

#include "attention_avx512.h"
#include "cpu_eval.h"
#include "exp_cephes.h"
#include "kernels.h"
#include "threadpool.h"

#if defined(__x86_64__) || defined(__i386__)
#define MLXL_X86 1
#include <immintrin.h>
#define TARGET_AVX2 __attribute__((target("avx2,fma")))
#include "hsum_avx2.h"
#endif

namespace mlx_llama {

namespace {

// ---------------------------------------------------------------------------
// Vector helpers: AVX2 versions and scalar twins with the same meaning.
// ---------------------------------------------------------------------------

void swiglu_scalar(const float* g, const float* u, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    y[i] = g[i] * u[i] / (1.f + std::exp(-g[i]));
  }
}

#ifdef MLXL_X86
TARGET_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// y += a * x
TARGET_AVX2 void axpy_avx2(float a, const float* x, float* y, int n) {
  const __m256 av = _mm256_set1_ps(a);
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(
        y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  }
  for (; i < n; ++i) {
    y[i] += a * x[i];
  }
}

// The dot products of `nh` query rows (q + i * q_stride) with one key, each
// reduced exactly as kernels.cpp's dot_f32 reduces it (two accumulators
// over 16-float chunks, the 8-float tail into the first, then the same
// horizontal sum): results are bit-identical to dot_f32's, whichever rows
// share the call. D is a multiple of 8.
template <int NH>
TARGET_AVX2 inline void dots_avx2(const float* q, int64_t q_stride, const float* k, int D, float* out) {
  __m256 a0[NH], a1[NH];
  for (int i = 0; i < NH; ++i) {
    a0[i] = _mm256_setzero_ps();
    a1[i] = _mm256_setzero_ps();
  }
  int d = 0;
  for (; d + 16 <= D; d += 16) {
    const __m256 k0 = _mm256_loadu_ps(k + d), k1 = _mm256_loadu_ps(k + d + 8);
    for (int i = 0; i < NH; ++i) {
      a0[i] = _mm256_fmadd_ps(_mm256_loadu_ps(q + i * q_stride + d), k0, a0[i]);
      a1[i] = _mm256_fmadd_ps(_mm256_loadu_ps(q + i * q_stride + d + 8), k1, a1[i]);
    }
  }
  if (d < D) {
    const __m256 k0 = _mm256_loadu_ps(k + d);
    for (int i = 0; i < NH; ++i) {
      a0[i] = _mm256_fmadd_ps(_mm256_loadu_ps(q + i * q_stride + d), k0, a0[i]);
    }
  }
  for (int i = 0; i < NH; ++i) {
    out[i] = hsum256(_mm256_add_ps(a0[i], a1[i]));
  }
}

// y (D floats) = sum_t a[t] * v_t over t in [0, n), accumulated in t order
// with one FMA per element and step, as repeated axpy_avx2 calls on a
// zeroed y do (the same bits), but in registers, 64 floats at a time.
TARGET_AVX2 void weighted_sum_avx2(const float* a, const float* v, int64_t v_stride, int n, int D, float* y) {
  for (int d0 = 0; d0 < D; d0 += 64) {
    const int nc = std::min(64, D - d0) / 8;
    __m256 acc[8];
    for (int c = 0; c < 8; ++c) {
      acc[c] = _mm256_setzero_ps();
    }
    for (int t = 0; t < n; ++t) {
      const __m256 at = _mm256_set1_ps(a[t]);
      const float* vt = v + t * v_stride + d0;
      for (int c = 0; c < 8; ++c) {
        if (c < nc) {
          acc[c] = _mm256_fmadd_ps(at, _mm256_loadu_ps(vt + 8 * c), acc[c]);
        }
      }
    }
    for (int c = 0; c < nc; ++c) {
      _mm256_storeu_ps(y + d0 + 8 * c, acc[c]);
    }
  }
}

// e^x (Cephes expf: range reduction to [-ln2/2, ln2/2] and a degree-5
// polynomial; ~1 ulp), x clamped to [-87.3, 88.3]: no overflow to inf, and
// tiny results instead of denormals.
TARGET_AVX2 inline __m256 exp_avx2(__m256 x) {
  namespace ce = cephes_exp;
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(ce::kLo)), _mm256_set1_ps(ce::kHi));
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(ce::kLog2e), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(ce::kLn2Hi), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(ce::kLn2Lo), x);
  __m256 y = _mm256_set1_ps(ce::kPoly[0]);
  for (int i = 1; i < 6; ++i) {
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(ce::kPoly[i]));
  }
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i n = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}

// p[i] = exp(p[i] - m); returns the sum.
TARGET_AVX2 float exp_sub_sum_avx2(float* p, int n, float m) {
  const __m256 mv = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(p + i), mv));
    _mm256_storeu_ps(p + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  float s = hsum(acc);
  for (; i < n; ++i) {
    p[i] = std::exp(p[i] - m);
    s += p[i];
  }
  return s;
}

// y = silu(g) * u = g * u / (1 + e^-g) for 8 values.
TARGET_AVX2 inline __m256 swiglu8(__m256 gv, __m256 uv) {
  const __m256 e = exp_avx2(_mm256_xor_ps(gv, _mm256_set1_ps(-0.f)));
  return _mm256_div_ps(_mm256_mul_ps(gv, uv), _mm256_add_ps(_mm256_set1_ps(1.f), e));
}

// The tail (fewer than 8 values) goes through the same vector code via a
// padded copy: an element's result must not depend on where the task or the
// array ends (batch invariance: a row's tail is no tail inside a batch).
TARGET_AVX2 void swiglu_avx2(const float* g, const float* u, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(y + i, swiglu8(_mm256_loadu_ps(g + i), _mm256_loadu_ps(u + i)));
  }
  if (i < n) {
    alignas(32) float gt[8] = {0, 0, 0, 0, 0, 0, 0, 0}, ut[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::copy(g + i, g + n, gt);
    std::copy(u + i, u + n, ut);
    _mm256_store_ps(gt, swiglu8(_mm256_load_ps(gt), _mm256_load_ps(ut)));
    std::copy(gt, gt + (n - i), y + i);
  }
}
#endif

void swiglu_any(const float* g, const float* u, float* y, int64_t n) {
#ifdef MLXL_X86
  if (cpu_has_avx2()) {
    swiglu_avx2(g, u, y, n);
    return;
  }
#endif
  swiglu_scalar(g, u, y, n);
}

void axpy_any(float a, const float* x, float* y, int n) {
#ifdef MLXL_X86
  if (cpu_has_avx2()) {
    axpy_avx2(a, x, y, n);
    return;
  }
#endif
  for (int i = 0; i < n; ++i) {
    y[i] += a * x[i];
  }
}

float exp_sub_sum_any(float* p, int n, float m) {
#ifdef MLXL_X86
  if (cpu_has_avx2()) {
    return exp_sub_sum_avx2(p, n, m);
  }
#endif
  float s = 0.f;
  for (int i = 0; i < n; ++i) {
    p[i] = std::exp(p[i] - m);
    s += p[i];
  }
  return s;
}

// One query row of one head over keys [0, n) (k_t = kb + t * k_stride, the
// same for v): yr = softmax(qr k^T * scale) v, in the generic code's order.
// p: n floats of scratch.
void attend_head(const float* qr, const float* kb, int64_t k_stride, const float* vb, int64_t v_stride,
                 int n, int D, float scale, float* p, float* yr) {
  float m = -INFINITY;
  for (int t = 0; t < n; ++t) {
    p[t] = dot_f32(qr, kb + t * k_stride, D) * scale;
    m = std::max(m, p[t]);
  }
  const float inv = 1.f / exp_sub_sum_any(p, n, m);
  std::fill(yr, yr + D, 0.f);
  for (int t = 0; t < n; ++t) {
    axpy_any(p[t] * inv, vb + t * v_stride, yr, D);
  }
}

#ifdef MLXL_X86
// attend_head for the `group` query heads at q0 (D floats apart) that share
// one kv head, into y0 (the same layout): per head the same operations in
// the same order (the same bits), 3-4x faster (the heads share each key
// load, no call per key, outputs kept in registers). D is a multiple of 8;
// p: scratch of group rows of p_stride >= n floats.
TARGET_AVX2 void attend_group_avx2(const float* q0, const float* kb, int64_t k_stride, const float* vb,
                                   int64_t v_stride, int n, int group, int D, float scale, float* p,
                                   int64_t p_stride, float* y0) {
  float s[4];
  for (int t = 0; t < n; ++t) {
    const float* kt = kb + t * k_stride;
    int h = 0;
    for (; h + 4 <= group; h += 4) {
      dots_avx2<4>(q0 + h * D, D, kt, D, s);
      for (int i = 0; i < 4; ++i) {
        p[(h + i) * p_stride + t] = s[i] * scale;
      }
    }
    for (; h < group; ++h) {
      dots_avx2<1>(q0 + h * D, D, kt, D, s);
      p[h * p_stride + t] = s[0] * scale;
    }
  }
  for (int h = 0; h < group; ++h) {
    float* ph = p + h * p_stride;
    float m = -INFINITY;
    for (int t = 0; t < n; ++t) {
      m = std::max(m, ph[t]);
    }
    const float inv = 1.f / exp_sub_sum_any(ph, n, m);
    for (int t = 0; t < n; ++t) {
      ph[t] *= inv;
    }
    weighted_sum_avx2(ph, vb, v_stride, n, D, y0 + h * D);
  }
}
#endif

// f(i0, i1) over [0, n) in pool tasks of `per_task` items (parallel_for runs
// a single task inline).
template <typename F>
void for_ranges(int64_t n, int64_t per_task, F&& f) {
  const int n_tasks = static_cast<int>((n + per_task - 1) / per_task);
  ThreadPool::instance().parallel_for(n_tasks, [&](int t, int) {
    f(t * per_task, std::min(n, (t + 1) * per_task));
  });
}

// Rows per pool task for row-wise ops: enough work to pay for a hand-off.
constexpr int64_t kRowsPerTask = 16;

// cos (c[0, D/2)) and sin (c[D/2, D)) of the angles pos / periods[i]: the
// angle in float32 as MLX forms it, the trigonometry in double.
void rope_table(float pos, const float* periods, int half, float* c) {
  for (int i = 0; i < half; ++i) {
    const float ang = pos * (1.f / periods[i]);
    c[i] = static_cast<float>(std::cos(double(ang)));
    c[half + i] = static_cast<float>(std::sin(double(ang)));
  }
}

// y = RoPE(x) for `rows` rows of H heads of D floats, row r rotated by the
// cos/sin table cs + table_of(r) * D (rope_table's layout).
template <typename TableOf>
void rope_apply(const float* xp, float* y, int64_t rows, int H, int D, const float* cs, TableOf table_of) {
  const int half = D / 2;
  for_ranges(rows, kRowsPerTask, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* c = cs + size_t(table_of(r)) * D;
      const float* sn = c + half;
      for (int h = 0; h < H; ++h) {
        const float* xr = xp + (r * H + h) * D;
        float* yr = y + (r * H + h) * D;
        for (int i = 0; i < half; ++i) {
          const float x1 = xr[i], x2 = xr[i + half];
          yr[i] = x1 * c[i] - x2 * sn[i];
          yr[i + half] = x1 * sn[i] + x2 * c[i];
        }
      }
    }
  });
}

void check_float32_cpu(const mx::array& a, const char* what, const mx::Stream& s) {
  require_cpu_stream(s, what, "mx.fast");
  if (a.dtype() != mx::float32) {
    throw std::invalid_argument(std::string("[mlx_llama.") + what +
                                "] expects float32 inputs");
  }
}

void no_gpu(const char* what) {
  throw std::runtime_error(std::string("[mlx_llama.") + what +
                           "] has no GPU implementation; use mx.fast");
}

} // namespace

// ---------------------------------------------------------------------------
// RMSNorm
// ---------------------------------------------------------------------------

mx::array rms_norm(
    const mx::array& x,
    const mx::array& weight,
    float eps,
    mx::StreamOrDevice s_) {
  auto s = mx::to_stream(s_);
  check_float32_cpu(x, "rms_norm", s);
  if (x.ndim() < 1 || weight.ndim() != 1 || weight.shape(0) != x.shape(-1)) {
    throw std::invalid_argument(
        "[mlx_llama.rms_norm] weight must have shape (D,) for x of shape (..., D)");
  }
  return mx::array(
      x.shape(),
      mx::float32,
      std::make_shared<RMSNormCPU>(s, eps),
      {x, as_f32_contiguous(weight, s)});
}

void RMSNormCPU::eval_cpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  auto& enc = prepare_cpu_eval(stream(), inputs, outputs, {1});
  enc.dispatch([x = inputs[0],
                w = inputs[1].data<float>(),
                y = outputs[0].data<float>(),
                eps = eps_]() {
    std::vector<float> scratch;
    const float* xp = row_major_f32(x, scratch);
    const int D = x.shape(-1);
    const int rows = D > 0 ? static_cast<int>(x.size() / D) : 0;
    for_ranges(rows, kRowsPerTask, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const float* xr = xp + int64_t(r) * D;
        float* yr = y + int64_t(r) * D;
        const float ms = dot_f32(xr, xr, D) / static_cast<float>(D);
        const float inv = 1.f / std::sqrt(ms + eps);
        for (int i = 0; i < D; ++i) {
          yr[i] = xr[i] * inv * w[i];
        }
      }
    });
  });
}

void RMSNormCPU::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  no_gpu("rms_norm");
}

bool RMSNormCPU::is_equivalent(const mx::Primitive& other) const {
  auto* o = dynamic_cast<const RMSNormCPU*>(&other);
  return o && o->eps_ == eps_;
}

// ---------------------------------------------------------------------------
// RoPE
// ---------------------------------------------------------------------------

static void check_rope_args(const mx::array& x, const mx::array& periods, const char* what, const mx::Stream& s) {
  check_float32_cpu(x, what, s);
  if (x.ndim() != 4 || x.shape(-1) % 2 != 0 || periods.ndim() != 1 ||
      periods.shape(0) * 2 != x.shape(-1)) {
    throw std::invalid_argument(std::string("[mlx_llama.") + what +
                                "] x must be (B, L, H, D) with D even and periods (D/2,)");
  }
}

mx::array rope(
    const mx::array& x,
    int offset,
    const mx::array& periods,
    mx::StreamOrDevice s_) {
  auto s = mx::to_stream(s_);
  check_rope_args(x, periods, "rope", s);
  return mx::array(
      x.shape(),
      mx::float32,
      std::make_shared<RoPECPU>(s, offset),
      {x, as_f32_contiguous(periods, s)});
}

void RoPECPU::eval_cpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  auto& enc = prepare_cpu_eval(stream(), inputs, outputs, {1});
  enc.dispatch([x = inputs[0],
                periods = inputs[1].data<float>(),
                y = outputs[0].data<float>(),
                offset = offset_]() {
    std::vector<float> scratch;
    const float* xp = row_major_f32(x, scratch);
    const int B = x.shape(0), L = x.shape(1), H = x.shape(2), D = x.shape(3);
    std::vector<float> cs(size_t(L) * D);
    for (int l = 0; l < L; ++l) {
      rope_table(static_cast<float>(offset + l), periods, D / 2, cs.data() + size_t(l) * D);
    }
    rope_apply(xp, y, int64_t(B) * L, H, D, cs.data(), [L](int64_t r) { return r % L; });
  });
}

void RoPECPU::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  no_gpu("rope");
}

bool RoPECPU::is_equivalent(const mx::Primitive& other) const {
  auto* o = dynamic_cast<const RoPECPU*>(&other);
  return o && o->offset_ == offset_;
}

mx::array rope_rows(
    const mx::array& x,
    const mx::array& positions,
    const mx::array& periods,
    mx::StreamOrDevice s_) {
  auto s = mx::to_stream(s_);
  check_rope_args(x, periods, "rope_rows", s);
  if (positions.dtype() != mx::int32 || positions.ndim() != 1 ||
      positions.shape(0) != x.shape(0) * x.shape(1)) {
    throw std::invalid_argument(
        "[mlx_llama.rope_rows] positions must be int32 of shape (B * L,) for x (B, L, H, D)");
  }
  return mx::array(
      x.shape(),
      mx::float32,
      std::make_shared<RoPERowsCPU>(s),
      {x, contiguous_if_needed(positions, s), as_f32_contiguous(periods, s)});
}

void RoPERowsCPU::eval_cpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  auto& enc = prepare_cpu_eval(stream(), inputs, outputs, {1, 2});
  enc.dispatch([x = inputs[0],
                positions = inputs[1].data<int32_t>(),
                periods = inputs[2].data<float>(),
                y = outputs[0].data<float>()]() {
    std::vector<float> scratch;
    const float* xp = row_major_f32(x, scratch);
    const int64_t rows = int64_t(x.shape(0)) * x.shape(1);
    const int H = x.shape(2), D = x.shape(3);
    std::vector<float> cs(size_t(rows) * D);
    for (int64_t r = 0; r < rows; ++r) {
      rope_table(static_cast<float>(positions[r]), periods, D / 2, cs.data() + size_t(r) * D);
    }
    rope_apply(xp, y, rows, H, D, cs.data(), [](int64_t r) { return r; });
  });
}

void RoPERowsCPU::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  no_gpu("rope_rows");
}

// ---------------------------------------------------------------------------
// SwiGLU
// ---------------------------------------------------------------------------

mx::array swiglu(const mx::array& gate, const mx::array& up, mx::StreamOrDevice s_) {
  auto s = mx::to_stream(s_);
  check_float32_cpu(gate, "swiglu", s);
  check_float32_cpu(up, "swiglu", s);
  if (gate.shape() != up.shape()) {
    throw std::invalid_argument("[mlx_llama.swiglu] gate and up must have the same shape");
  }
  return mx::array(gate.shape(), mx::float32, std::make_shared<SwiGLUCPU>(s), {gate, up});
}

void SwiGLUCPU::eval_cpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  auto& enc = prepare_cpu_eval(stream(), inputs, outputs, {});
  enc.dispatch([g = inputs[0], u = inputs[1], y = outputs[0].data<float>()]() {
    std::vector<float> gs, us;
    const float* gp = row_major_f32(g, gs);
    const float* up = row_major_f32(u, us);
    // Elements per task: a hand-off to the pool costs about as much as
    // computing a few thousand.
    for_ranges(static_cast<int64_t>(g.size()), int64_t(1) << 14, [&](int64_t i0, int64_t i1) {
      swiglu_any(gp + i0, up + i0, y + i0, i1 - i0);
    });
  });
}

void SwiGLUCPU::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  no_gpu("swiglu");
}

// ---------------------------------------------------------------------------
// Attention
// ---------------------------------------------------------------------------

namespace {

// k and v (B, Hkv, T, D) as pointers and (B, Hkv, T) strides. The cache
// hands views of its buffers: any strides along B, H and T are read in
// place, but D must be unit-stride (else row-major copies in ks, vs).
struct KVView {
  const float* k;
  const float* v;
  std::array<int64_t, 3> k_strides, v_strides;
};

KVView kv_view(const mx::array& k, const mx::array& v, std::vector<float>& ks, std::vector<float>& vs) {
  const bool direct = k.strides()[3] == 1 && v.strides()[3] == 1;
  auto strides = [&](const mx::array& a) -> std::array<int64_t, 3> {
    if (direct) {
      return {a.strides()[0], a.strides()[1], a.strides()[2]};
    }
    return {int64_t(a.shape(1)) * a.shape(2) * a.shape(3), int64_t(a.shape(2)) * a.shape(3), a.shape(3)};
  };
  return {direct ? k.data<float>() : row_major_f32(k, ks), direct ? v.data<float>() : row_major_f32(v, vs),
          strides(k), strides(v)};
}

} // namespace

mx::array attention(
    const mx::array& q,
    const mx::array& k,
    const mx::array& v,
    float scale,
    bool causal,
    mx::StreamOrDevice s_) {
  auto s = mx::to_stream(s_);
  for (auto* a : {&q, &k, &v}) {
    check_float32_cpu(*a, "attention", s);
    if (a->ndim() != 4) {
      throw std::invalid_argument("[mlx_llama.attention] inputs must be 4-D");
    }
  }
  const int B = q.shape(0), L = q.shape(1), H = q.shape(2), D = q.shape(3);
  if (k.shape() != v.shape() || k.shape(0) != B || k.shape(3) != D ||
      k.shape(1) < 1 || H % k.shape(1) != 0) {
    std::ostringstream msg;
    msg << "[mlx_llama.attention] q (B, L, H, D) and k, v (B, Hkv, T, D) do not "
           "match: q "
        << q.shape() << ", k " << k.shape() << ", v " << v.shape();
    throw std::invalid_argument(msg.str());
  }
  if (causal && k.shape(2) < L) {
    throw std::invalid_argument(
        "[mlx_llama.attention] causal attention needs at least L keys");
  }
  return mx::array(
      {B, L, H, D},
      mx::float32,
      std::make_shared<AttentionCPU>(s, scale, causal),
      {q, k, v});
}

void AttentionCPU::eval_cpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  auto& enc = prepare_cpu_eval(stream(), inputs, outputs, {});
  enc.dispatch([q = inputs[0],
                k = inputs[1],
                v = inputs[2],
                y = outputs[0].data<float>(),
                scale = scale_,
                causal = causal_]() {
    std::vector<float> qs, ks, vs;
    const float* qp = row_major_f32(q, qs);
    const KVView kv = kv_view(k, v, ks, vs);
    const float *kp = kv.k, *vp = kv.v;
    const auto &kst = kv.k_strides, &vst = kv.v_strides;
    const int B = q.shape(0), L = q.shape(1), H = q.shape(2), D = q.shape(3);
    const int Hkv = k.shape(1), T = k.shape(2);
    const int group = H / Hkv;
    if (attention_avx512_supported(D)) {
      // One task per (batch, kv head), all its rows and query heads at once.
      ThreadPool::instance().parallel_for(B * Hkv, [&](int task, int) {
        const int b = task / Hkv, kh = task % Hkv;
        const int64_t at = (int64_t(b) * L * H + kh * group) * D;
        attend_kv_head_avx512(qp + at, int64_t(H) * D, L, group, D, kp + b * kst[0] + kh * kst[1], kst[2],
                              vp + b * vst[0] + kh * vst[1], vst[2], T, causal, scale, y + at);
      });
      return;
    }
#ifdef MLXL_X86
    if (cpu_has_avx2() && D % 8 == 0) {
      // One task per (batch, kv head): its query heads share each key load.
      // Per query row and head the same operations as the generic loop
      // below, in the same order: the same bits, 3-4x faster (no call per
      // key, outputs kept in registers).
      ThreadPool::instance().parallel_for(B * Hkv, [&](int task, int) {
        const int b = task / Hkv, kh = task % Hkv;
        const float* kb = kp + b * kst[0] + kh * kst[1];
        const float* vb = vp + b * vst[0] + kh * vst[1];
        std::vector<float> p(size_t(group) * T);
        for (int l = 0; l < L; ++l) {
          const int64_t row = (int64_t(b) * L + l) * H + kh * group;
          attend_group_avx2(qp + row * D, kb, kst[2], vb, vst[2], causal ? T - L + l + 1 : T,
                            group, D, scale, p.data(), T, y + row * D);
        }
      });
      return;
    }
#endif
    ThreadPool::instance().parallel_for(B * H, [&](int task, int) {
      const int b = task / H, h = task % H, kh = h / group;
      const float* kb = kp + b * kst[0] + kh * kst[1];
      const float* vb = vp + b * vst[0] + kh * vst[1];
      std::vector<float> p(T);
      for (int l = 0; l < L; ++l) {
        const int64_t row = (int64_t(b) * L + l) * H + h;
        attend_head(qp + row * D, kb, kst[2], vb, vst[2], causal ? T - L + l + 1 : T, D, scale,
                    p.data(), y + row * D);
      }
    });
  });
}

void AttentionCPU::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  no_gpu("attention");
}

bool AttentionCPU::is_equivalent(const mx::Primitive& other) const {
  auto* o = dynamic_cast<const AttentionCPU*>(&other);
  return o && o->scale_ == scale_ && o->causal_ == causal_;
}

namespace {

// Row i of q (1, N, H, D, row-major at qp) over keys [0, T[i]) of views[i]
// into y: one task per (row, kv head), as attention() is per (batch, kv head).
void attend_rows(const float* qp, const std::vector<KVView>& views, const std::vector<int>& T, int H, int Hkv, int D,
                 float scale, float* y) {
  const int N = static_cast<int>(views.size()), group = H / Hkv;
  if (attention_avx512_supported(D)) {
    ThreadPool::instance().parallel_for(N * Hkv, [&](int task, int) {
      const int i = task / Hkv, kh = task % Hkv;
      const KVView& kv = views[i];
      const int64_t at = (int64_t(i) * H + kh * group) * D;
      attend_kv_head_avx512(qp + at, int64_t(H) * D, 1, group, D, kv.k + kh * kv.k_strides[1], kv.k_strides[2],
                            kv.v + kh * kv.v_strides[1], kv.v_strides[2], T[i], false, scale, y + at);
    });
    return;
  }
#ifdef MLXL_X86
  if (cpu_has_avx2() && D % 8 == 0) {
    ThreadPool::instance().parallel_for(N * Hkv, [&](int task, int) {
      const int i = task / Hkv, kh = task % Hkv;
      const KVView& kv = views[i];
      std::vector<float> p(size_t(group) * T[i]);
      const int64_t row = int64_t(i) * H + kh * group;
      attend_group_avx2(qp + row * D, kv.k + kh * kv.k_strides[1], kv.k_strides[2], kv.v + kh * kv.v_strides[1],
                        kv.v_strides[2], T[i], group, D, scale, p.data(), T[i], y + row * D);
    });
    return;
  }
#endif
  ThreadPool::instance().parallel_for(N * H, [&](int task, int) {
    const int i = task / H, h = task % H, kh = h / group;
    const KVView& kv = views[i];
    std::vector<float> p(T[i]);
    const int64_t row = int64_t(i) * H + h;
    attend_head(qp + row * D, kv.k + kh * kv.k_strides[1], kv.k_strides[2], kv.v + kh * kv.v_strides[1],
                kv.v_strides[2], T[i], D, scale, p.data(), y + row * D);
  });
}

} // namespace

mx::array attention_rows_update(
    const mx::array& q,
    const mx::array& k,
    const mx::array& v,
    const std::vector<mx::array>& buffers,
    const std::vector<int>& slots,
    const std::vector<int>& lengths,
    float scale,
    mx::StreamOrDevice s_) {
  auto s = mx::to_stream(s_);
  for (auto* a : {&q, &k, &v}) {
    check_float32_cpu(*a, "attention_rows_update", s);
  }
  if (q.ndim() != 4 || q.shape(0) != 1 || k.ndim() != 4 || k.shape() != v.shape() || k.shape(0) != 1 ||
      k.shape(1) != q.shape(1) || k.shape(3) != q.shape(3) || k.shape(2) < 1 || q.shape(2) % k.shape(2) != 0) {
    std::ostringstream msg;
    msg << "[mlx_llama.attention_rows_update] q (1, N, H, D) and k, v (1, N, Hkv, D) do not match: q " << q.shape()
        << ", k " << k.shape() << ", v " << v.shape();
    throw std::invalid_argument(msg.str());
  }
  const int N = q.shape(1), Hkv = k.shape(2), D = q.shape(3);
  if (buffers.size() != size_t(2) * N || slots.size() != size_t(N) || lengths.size() != size_t(N)) {
    throw std::invalid_argument(
        "[mlx_llama.attention_rows_update] needs a key and a value buffer, a slot and a length per row");
  }
  std::vector<mx::array> inputs{q, k, v};
  for (size_t j = 0; j < buffers.size(); ++j) {
    const mx::array& b = buffers[j];
    const int i = static_cast<int>(j / 2);
    check_float32_cpu(b, "attention_rows_update", s);
    if (b.ndim() != 4 || b.shape(0) != 1 || b.shape(1) != Hkv || b.shape(3) != D ||
        b.shape() != buffers[j & ~size_t(1)].shape() || slots[i] < 0 || slots[i] >= lengths[i] ||
        lengths[i] > b.shape(2)) {
      std::ostringstream msg;
      msg << "[mlx_llama.attention_rows_update] row " << i << ": buffer " << b.shape() << ", slot " << slots[i]
          << " and length " << lengths[i] << " do not fit (1, " << Hkv << ", capacity, " << D << ")";
      throw std::invalid_argument(msg.str());
    }
    inputs.push_back(b);
  }
  return mx::array(q.shape(), mx::float32, std::make_shared<AttentionRowsUpdateCPU>(s, scale, slots, lengths),
                   inputs);
}

void AttentionRowsUpdateCPU::eval_cpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  for (size_t j = 3; j < inputs.size(); ++j) {
    if (!inputs[j].flags().row_contiguous || inputs[j].data_size() != inputs[j].size()) {
      throw std::runtime_error("[mlx_llama.attention_rows_update] internal error: a KV buffer is not contiguous");
    }
  }
  auto& enc = prepare_cpu_eval(stream(), inputs, outputs, {});
  enc.dispatch([inputs = std::vector<mx::array>(inputs), y = outputs[0].data<float>(), slots = slots_,
                lengths = lengths_, scale = scale_]() mutable {
    const mx::array &q = inputs[0], &k = inputs[1], &v = inputs[2];
    const int N = q.shape(1), H = q.shape(2), D = q.shape(3), Hkv = k.shape(2);
    std::vector<float> ks, vs, qs;
    const float* kp = row_major_f32(k, ks);
    const float* vp = row_major_f32(v, vs);
    std::vector<KVView> views;
    for (int i = 0; i < N; ++i) {
      // The caches' own buffers, written in place (see fused_ops.h).
      float* kb = inputs[3 + 2 * i].data<float>();
      float* vb = inputs[4 + 2 * i].data<float>();
      const int64_t cap = inputs[3 + 2 * i].shape(2);
      for (int h = 0; h < Hkv; ++h) {
        std::memcpy(kb + (h * cap + slots[i]) * D, kp + (int64_t(i) * Hkv + h) * D, sizeof(float) * D);
        std::memcpy(vb + (h * cap + slots[i]) * D, vp + (int64_t(i) * Hkv + h) * D, sizeof(float) * D);
      }
      views.push_back({kb, vb, {Hkv * cap * D, cap * D, D}, {Hkv * cap * D, cap * D, D}});
    }
    attend_rows(row_major_f32(q, qs), views, lengths, H, Hkv, D, scale, y);
  });
}

void AttentionRowsUpdateCPU::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  no_gpu("attention_rows_update");
}

bool AttentionRowsUpdateCPU::is_equivalent(const mx::Primitive&) const {
  return false; // it writes its inputs: two such nodes are never interchangeable
}

} // namespace mlx_llama
