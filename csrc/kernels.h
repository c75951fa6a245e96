// CPU kernels for y = x @ dequantize(w, scales, biases).T in MLX's affine
// quantization format:
//   w:       N x (K * bits / 32) uint32, values packed little-endian as one
//            continuous bit stream per row (value k at bit k * bits)
//   scales:  N x (K / group_size) float32, bfloat16 or float16
//   biases:  N x (K / group_size), the same type as scales
//   w_hat[n, k] = scales[n, k / g] * q[n, k] + biases[n, k / g]
// x is M x K float32 (row-major), y is M x N float32.
//
// Batch invariance: in every mode, row i of y is bit-identical for any M
// (and any thread count) to what the kernels give for row i of x alone: each
// output element is reduced in one fixed order that depends only on K, the
// group size and the bit width (tests/test_batch_invariance.py).
#pragma once

#include <cstdint>

namespace mlx_llama {

enum class Mode : int {
  // float32 activations, float32 accumulation (matches mx.quantized_matmul
  // to ~1e-6 relative).
  Exact = 0,
  // Activations quantized to int8 per block of 32 (like llama.cpp's Q8_0),
  // integer dot products, float32 accumulation across blocks.
  Q8 = 1,
  // Activations quantized to int16 per block of 32 (d = max|x| / 32767),
  // integer dot products with vpmaddwd: 8-bit weights only (elsewhere the
  // exact path). Its activation rounding is ~1/256 of Q8's, so an 8-bit model
  // keeps the exact kernel's error at the int8 kernel's speed.
  Q16 = 2,
};

// Storage type of scales and biases. Checkpoints store them in bf16/f16:
// reading them as such saves half a bit per weight of memory traffic (10% of
// a 4-bit GEMV) and converts exactly to float32.
enum class ScaleType : int { F32 = 0, BF16 = 1, F16 = 2 };

// Weight rows per panel of the panel layout (QMatmulArgs::panels).
constexpr int kPanelRows = 16;

struct QMatmulArgs {
  const float* x;
  const uint32_t* w;
  const void* scales;
  const void* biases;
  ScaleType stype;
  float* y;
  int M;
  int N;
  int K;
  int group_size;
  int bits;
  // w, scales and biases in the panel layout (pack_panels): w (N / 16) x D x
  // 16 words, word j of weight rows 16p .. 16p + 15 side by side at w + (p *
  // D + j) * 16, where D = K * bits / 32; scales and biases likewise (N / 16)
  // x G x 16. Only the AVX-512 panel kernels read it (panel_supported).
  bool panels = false;
};

// Whether `mode` has a fast path for these parameters; when it does not,
// qmatmul silently uses the exact path.
bool q8_supported(int K, int group_size, int bits);
bool q16_supported(int K, int group_size, int bits);

void qmatmul(const QMatmulArgs& a, Mode mode);

// out: N x K float32
void dequantize_rows(
    const uint32_t* w,
    const void* scales,
    const void* biases,
    ScaleType stype,
    float* out,
    int N,
    int K,
    int group_size,
    int bits);

// Sum of n floats read with all pool threads (a memory-read bandwidth probe
// for the benchmarks; the result only defeats dead-code elimination).
float read_probe(const float* p, int64_t n);

// Whether the AVX2+FMA code paths run (false on other CPUs, or when
// MLX_LLAMA_FORCE_SCALAR is set).
bool cpu_has_avx2();

// sum a[i] * b[i] in float32 with the widest SIMD the CPU has.
float dot_f32(const float* a, const float* b, int n);

// "avx2", "neon" or "scalar": the SIMD level the kernels picked at runtime
// (MLX_LLAMA_FORCE_SCALAR picks "scalar" on every CPU).
const char* isa();

} // namespace mlx_llama
