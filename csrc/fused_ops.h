// RMSNorm, RoPE, SwiGLU and attention as one MLX primitive each on the CPU.
//
// MLX's CPU backend has no kernels for mx.fast.rms_norm / rope /
// scaled_dot_product_attention: it expands them into 11, 27 and 12 small ops;
// its compiled SiLU calls libm's exp and fma per element.
// A LLaMA decode step then has ~2300 graph nodes, and their per-node cost
// (graph building, scheduling, allocation) is ~15 ms of a 1B model's token.
// These primitives do each in one node. CPU streams only: callers use mx.fast
// elsewhere.
#pragma once

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mlx_llama {

namespace mx = mlx::core;

// x * rsqrt(mean(x^2, -1) + eps) * weight, in float32. x: (..., D).
mx::array rms_norm(
    const mx::array& x,
    const mx::array& weight,
    float eps,
    mx::StreamOrDevice s = {});

// Half-split ("rotate_half") RoPE on x: (B, L, H, D) with positions
// offset + l; angle = position / periods[i] for pair (i, i + D/2), as
// mx.fast.rope(..., freqs=periods) computes it.
mx::array rope(
    const mx::array& x,
    int offset,
    const mx::array& periods,
    mx::StreamOrDevice s = {});

// silu(gate) * up, elementwise in float32.
mx::array swiglu(const mx::array& gate, const mx::array& up, mx::StreamOrDevice s = {});

// softmax(q k^T * scale) v for q: (B, L, H, D) and k, v: (B, Hkv, T, D)
// (any strides; H a multiple of Hkv). causal: query l sees keys
// t <= T - L + l. Returns (B, L, H, D).
mx::array attention(
    const mx::array& q,
    const mx::array& k,
    const mx::array& v,
    float scale,
    bool causal,
    mx::StreamOrDevice s = {});

class RMSNormCPU : public mx::Primitive {
 public:
  RMSNormCPU(mx::Stream stream, float eps) : mx::Primitive(stream), eps_(eps) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs)
      override;
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override;
  const char* name() const override {
    return "MlxLlamaRMSNorm";
  }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  float eps_;
};

class RoPECPU : public mx::Primitive {
 public:
  RoPECPU(mx::Stream stream, int offset) : mx::Primitive(stream), offset_(offset) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs)
      override;
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override;
  const char* name() const override {
    return "MlxLlamaRoPE";
  }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  int offset_;
};

class SwiGLUCPU : public mx::Primitive {
 public:
  explicit SwiGLUCPU(mx::Stream stream) : mx::Primitive(stream) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs)
      override;
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override;
  const char* name() const override {
    return "MlxLlamaSwiGLU";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return dynamic_cast<const SwiGLUCPU*>(&other) != nullptr;
  }
};

class AttentionCPU : public mx::Primitive {
 public:
  AttentionCPU(mx::Stream stream, float scale, bool causal)
      : mx::Primitive(stream), scale_(scale), causal_(causal) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs)
      override;
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override;
  const char* name() const override {
    return "MlxLlamaAttention";
  }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  float scale_;
  bool causal_;
};

} // namespace mlx_llama
