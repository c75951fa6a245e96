// MLX primitive wrapping the CPU quantized matmul kernels.
#pragma once

#include "mlx/ops.h"
#include "mlx/primitives.h"

#include "kernels.h"

namespace mlx_llama {

namespace mx = mlx::core;

// x @ dequantize(w, scales, biases, group_size, bits).T for MLX's affine
// format (transpose=True). x: (..., K) floating; returns (..., N) in x's
// dtype. Computed in float32. CPU streams only.
mx::array quantized_matmul(
    const mx::array& x,
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    int group_size,
    int bits,
    Mode mode,
    mx::StreamOrDevice s = {});

// Dequantize to float32 (N x K), multi-threaded.
mx::array dequantize(
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    int group_size,
    int bits,
    mx::StreamOrDevice s = {});

// w (N x D, 16- or 32-bit elements, N a multiple of 16: packed weights,
// scales or biases in MLX's layout) in the panel layout the AVX-512 kernels
// stream (QMatmulArgs::panels): (N / 16, D, 16). Rearranged in place when
// w's buffer can be donated (a model's weights at load: no second copy of
// the largest tensor), else into a new buffer.
mx::array pack_panels(const mx::array& w, mx::StreamOrDevice s = {});

class PackPanelsCPU : public mx::Primitive {
 public:
  explicit PackPanelsCPU(mx::Stream stream) : mx::Primitive(stream) {}

  void eval_cpu(
      const std::vector<mx::array>& inputs,
      std::vector<mx::array>& outputs) override;
  void eval_gpu(
      const std::vector<mx::array>& inputs,
      std::vector<mx::array>& outputs) override;

  const char* name() const override {
    return "MlxLlamaPackPanels";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return dynamic_cast<const PackPanelsCPU*>(&other) != nullptr;
  }
};

class QuantizedMatmulCPU : public mx::Primitive {
 public:
  QuantizedMatmulCPU(mx::Stream stream, int group_size, int bits, Mode mode)
      : mx::Primitive(stream),
        group_size_(group_size),
        bits_(bits),
        mode_(mode) {}

  void eval_cpu(
      const std::vector<mx::array>& inputs,
      std::vector<mx::array>& outputs) override;
  void eval_gpu(
      const std::vector<mx::array>& inputs,
      std::vector<mx::array>& outputs) override;

  std::vector<mx::Shape> output_shapes(
      const std::vector<mx::array>& inputs) override;

  const char* name() const override {
    return "MlxLlamaQuantizedMatmul";
  }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  int group_size_;
  int bits_;
  Mode mode_;
};

class DequantizeCPU : public mx::Primitive {
 public:
  DequantizeCPU(mx::Stream stream, int group_size, int bits)
      : mx::Primitive(stream), group_size_(group_size), bits_(bits) {}

  void eval_cpu(
      const std::vector<mx::array>& inputs,
      std::vector<mx::array>& outputs) override;
  void eval_gpu(
      const std::vector<mx::array>& inputs,
      std::vector<mx::array>& outputs) override;

  const char* name() const override {
    return "MlxLlamaDequantize";
  }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  int group_size_;
  int bits_;
};

} // namespace mlx_llama
