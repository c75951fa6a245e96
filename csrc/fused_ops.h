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

#include <vector>

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

// The same RoPE with a position per row: row r of x's B * L rows (b, l)
// rotated for positions[r] (int32, B * L entries). A row gets the bits rope()
// gives it at offset + l == positions[r], so one call covers the rows of many
// sequences at their own positions (the batched engine's packed step).
mx::array rope_rows(
    const mx::array& x,
    const mx::array& positions,
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

// Attention of N decoding rows, each over its own cache, after storing its
// token's key and value: row i of k, v (1, N, Hkv, D) is written into slot
// slots[i] of buffers[2i], buffers[2i + 1] (1, Hkv, capacity_i, D,
// row-contiguous), then row i of q (1, N, H, D) attends to their first
// lengths[i] slots, with the bits attention(q[:, i:i+1], those slots, scale,
// false) gives it: one call for every decode row of a packed step instead of
// one per sequence. Returns (1, N, H, D).
//
// The buffers are written IN PLACE, as a KV cache's own storage (llama.cpp's
// way): the caller must hold the only copies and want them changed (the MLX
// caches' reserve_one / Attention._attend_rows). A functional write
// (SliceUpdate, then a view for the attention) is four graph nodes per cache
// and layer: ~600 per B=8 step, whose dispatch was ~10% of the step.
mx::array attention_rows_update(
    const mx::array& q,
    const mx::array& k,
    const mx::array& v,
    const std::vector<mx::array>& buffers,
    const std::vector<int>& slots,
    const std::vector<int>& lengths,
    float scale,
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

class RoPERowsCPU : public mx::Primitive {
 public:
  explicit RoPERowsCPU(mx::Stream stream) : mx::Primitive(stream) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs)
      override;
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override;
  const char* name() const override {
    return "MlxLlamaRoPERows";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return dynamic_cast<const RoPERowsCPU*>(&other) != nullptr;
  }
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

class AttentionRowsUpdateCPU : public mx::Primitive {
 public:
  AttentionRowsUpdateCPU(mx::Stream stream, float scale, std::vector<int> slots, std::vector<int> lengths)
      : mx::Primitive(stream), scale_(scale), slots_(std::move(slots)), lengths_(std::move(lengths)) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs)
      override;
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override;
  const char* name() const override {
    return "MlxLlamaAttentionRowsUpdate";
  }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  float scale_;
  std::vector<int> slots_, lengths_;
};

} // namespace mlx_llama
