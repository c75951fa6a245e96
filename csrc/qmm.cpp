#include "qmm.h"

#include <sstream>
#include <stdexcept>

#include "mlx/utils.h"

#include "cpu_eval.h"
#include "panel_avx512.h"
#include "threadpool.h"

namespace mlx_llama {

namespace {

void check_params(int group_size, int bits) {
  if (bits < 2 || bits > 8 || bits == 7) {
    std::ostringstream msg;
    msg << "[mlx_llama.quantized_matmul] bits must be 2, 3, 4, 5, 6 or 8, got "
        << bits;
    throw std::invalid_argument(msg.str());
  }
  if (group_size != 32 && group_size != 64 && group_size != 128) {
    std::ostringstream msg;
    msg << "[mlx_llama.quantized_matmul] group_size must be 32, 64 or 128, got "
        << group_size;
    throw std::invalid_argument(msg.str());
  }
}

// Weight rows of w: 2-D MLX layout or 3-D panel layout.
int rows_of(const mx::array& w) {
  return w.ndim() == 3 ? w.shape(0) * kPanelRows : w.shape(0);
}

// Validates shapes and returns (N, K).
std::pair<int, int> check_weights(
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    int group_size,
    int bits) {
  check_params(group_size, bits);
  const bool panels = w.ndim() == 3; // pack_panels' layout, for all three
  if (w.dtype() != mx::uint32 || (w.ndim() != 2 && !(panels && w.shape(2) == kPanelRows))) {
    throw std::invalid_argument(
        "[mlx_llama.quantized_matmul] w must be a 2-D uint32 array (or 3-D (N / 16, D, 16) from pack_panels)");
  }
  const int N = rows_of(w);
  const int64_t K64 = int64_t(w.shape(1)) * 32 / bits;
  if ((int64_t(w.shape(1)) * 32) % bits != 0 || K64 % group_size != 0) {
    throw std::invalid_argument(
        "[mlx_llama.quantized_matmul] packed width does not match bits/group_size");
  }
  const int K = static_cast<int>(K64);
  const mx::Shape sshape = panels ? mx::Shape{N / kPanelRows, K / group_size, kPanelRows}
                                  : mx::Shape{N, K / group_size};
  if (scales.shape() != sshape || biases.shape() != sshape) {
    std::ostringstream msg;
    msg << "[mlx_llama.quantized_matmul] scales and biases must have shape ("
        << N << ", " << K / group_size << ") for w of shape (" << N << ", "
        << w.shape(1) << "), bits=" << bits << ", group_size=" << group_size
        << (panels ? ", all three in the panel layout" : "");
    throw std::invalid_argument(msg.str());
  }
  if (!mx::issubdtype(scales.dtype(), mx::floating) ||
      !mx::issubdtype(biases.dtype(), mx::floating)) {
    throw std::invalid_argument(
        "[mlx_llama.quantized_matmul] scales and biases must be floating point");
  }
  return {N, K};
}

// Scales and biases as the kernels read them: kept in float32, bfloat16 or
// float16 when both share one of those types (checkpoints store bf16/f16, and
// reading them as such saves memory traffic), else cast to float32.
std::pair<mx::array, mx::array> scale_params(
    const mx::array& scales,
    const mx::array& biases,
    const mx::Stream& s) {
  const mx::Dtype t = scales.dtype();
  if (t == biases.dtype() &&
      (t == mx::float32 || t == mx::bfloat16 || t == mx::float16)) {
    return {contiguous_if_needed(scales, s), contiguous_if_needed(biases, s)};
  }
  return {as_f32_contiguous(scales, s), as_f32_contiguous(biases, s)};
}

ScaleType scale_type(const mx::array& a) {
  if (a.dtype() == mx::bfloat16) {
    return ScaleType::BF16;
  }
  return a.dtype() == mx::float16 ? ScaleType::F16 : ScaleType::F32;
}

// N rows of D elements from the panel layout back to rows.
template <typename T>
void unpack_panels(const T* p, int N, int64_t D, std::vector<T>& out) {
  out.resize(size_t(N) * D);
  for (int64_t n = 0; n < N; ++n) {
    const T* src = p + (n / kPanelRows) * D * kPanelRows + n % kPanelRows;
    for (int64_t j = 0; j < D; ++j) {
      out[n * D + j] = src[j * kPanelRows];
    }
  }
}

// A weight and its parameters restored to MLX's layout, for kernels that
// read rows (the mode or the CPU path changed after load; dequantize).
struct RowCopy {
  std::vector<uint32_t> w;
  std::vector<uint16_t> s16, b16;
  std::vector<float> s32, b32;

  void restore(const uint32_t*& w_, const void*& s_, const void*& b_, ScaleType st, int N, int K, int g, int bits) {
    unpack_panels(w_, N, int64_t(K) * bits / 32, w);
    w_ = w.data();
    if (st == ScaleType::F32) {
      unpack_panels(static_cast<const float*>(s_), N, K / g, s32);
      unpack_panels(static_cast<const float*>(b_), N, K / g, b32);
      s_ = s32.data();
      b_ = b32.data();
    } else {
      unpack_panels(static_cast<const uint16_t*>(s_), N, K / g, s16);
      unpack_panels(static_cast<const uint16_t*>(b_), N, K / g, b16);
      s_ = s16.data();
      b_ = b16.data();
    }
  }
};

} // namespace

mx::array quantized_matmul(
    const mx::array& x,
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    int group_size,
    int bits,
    Mode mode,
    mx::StreamOrDevice s_) {
  auto s = require_cpu_stream(s_, "quantized_matmul", "mx.quantized_matmul on the GPU");
  auto [N, K] = check_weights(w, scales, biases, group_size, bits);
  if (x.ndim() < 1 || x.shape(-1) != K) {
    std::ostringstream msg;
    msg << "[mlx_llama.quantized_matmul] x's last dimension must be " << K
        << " (w has shape (" << N << ", " << w.shape(1) << ") at " << bits
        << " bits)";
    throw std::invalid_argument(msg.str());
  }
  if (!mx::issubdtype(x.dtype(), mx::floating)) {
    throw std::invalid_argument(
        "[mlx_llama.quantized_matmul] x must be floating point");
  }
  const mx::Dtype out_dtype = x.dtype();
  // x may stay strided: eval_cpu copies it then (rare; no graph op).
  auto xf = x.dtype() == mx::float32 ? x : mx::astype(x, mx::float32, s);
  auto wc = contiguous_if_needed(w, s);
  auto [sf, bf] = scale_params(scales, biases, s);
  mx::Shape out_shape = x.shape();
  out_shape.back() = N;
  auto out = mx::array(
      out_shape,
      mx::float32,
      std::make_shared<QuantizedMatmulCPU>(s, group_size, bits, mode),
      {xf, wc, sf, bf});
  if (out_dtype != mx::float32) {
    out = mx::astype(out, out_dtype, s);
  }
  return out;
}

std::vector<mx::Shape> QuantizedMatmulCPU::output_shapes(
    const std::vector<mx::array>& inputs) {
  mx::Shape out_shape = inputs[0].shape();
  out_shape.back() = rows_of(inputs[1]);
  return {out_shape};
}

void QuantizedMatmulCPU::eval_cpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  auto& x = inputs[0];
  auto& w = inputs[1];
  auto& scales = inputs[2];
  auto& biases = inputs[3];
  auto& out = outputs[0];
  auto& enc = prepare_cpu_eval(stream(), inputs, outputs, {1, 2, 3});

  const int K = x.shape(-1);
  const int M = static_cast<int>(K > 0 ? x.size() / K : 0);
  const int N = rows_of(w);
  QMatmulArgs args{
      nullptr,
      w.data<uint32_t>(),
      scales.data<void>(),
      biases.data<void>(),
      scale_type(scales),
      out.data<float>(),
      M,
      N,
      K,
      group_size_,
      bits_,
      w.ndim() == 3};
  enc.dispatch([args, x, mode = mode_]() mutable {
    std::vector<float> scratch;
    args.x = row_major_f32(x, scratch);
    RowCopy rows;
    if (args.panels && !panel_supported(args.K, args.group_size, args.bits, mode)) {
      // Another kernel than the panels' (the mode or the CPU path changed
      // after load): the rows back in MLX's layout for this call.
      rows.restore(args.w, args.scales, args.biases, args.stype, args.N, args.K, args.group_size, args.bits);
      args.panels = false;
    }
    qmatmul(args, mode);
  });
}

void QuantizedMatmulCPU::eval_gpu(
    const std::vector<mx::array>&,
    std::vector<mx::array>&) {
  throw std::runtime_error(
      "[mlx_llama.quantized_matmul] has no GPU implementation; use "
      "mx.quantized_matmul on GPU streams");
}

bool QuantizedMatmulCPU::is_equivalent(const mx::Primitive& other) const {
  auto* o = dynamic_cast<const QuantizedMatmulCPU*>(&other);
  return o && o->group_size_ == group_size_ && o->bits_ == bits_ &&
      o->mode_ == mode_;
}

mx::array dequantize(
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    int group_size,
    int bits,
    mx::StreamOrDevice s_) {
  auto s = require_cpu_stream(s_, "dequantize");
  auto [N, K] = check_weights(w, scales, biases, group_size, bits);
  auto [sf, bf] = scale_params(scales, biases, s);
  return mx::array(
      {N, K},
      mx::float32,
      std::make_shared<DequantizeCPU>(s, group_size, bits),
      {contiguous_if_needed(w, s), sf, bf});
}

void DequantizeCPU::eval_cpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  auto& w = inputs[0];
  auto& scales = inputs[1];
  auto& biases = inputs[2];
  auto& out = outputs[0];
  auto& enc = prepare_cpu_eval(stream(), inputs, outputs, {0, 1, 2});
  enc.dispatch([w,
                wp = w.data<uint32_t>(),
                sp = scales.data<void>(),
                bp = biases.data<void>(),
                st = scale_type(scales),
                op = out.data<float>(),
                N = out.shape(0),
                K = out.shape(1),
                g = group_size_,
                b = bits_]() {
    RowCopy rows;
    const uint32_t* w_ = wp;
    const void *s_ = sp, *b_ = bp;
    if (w.ndim() == 3) {
      rows.restore(w_, s_, b_, st, N, K, g, b);
    }
    dequantize_rows(w_, s_, b_, st, op, N, K, g, b);
  });
}

void DequantizeCPU::eval_gpu(
    const std::vector<mx::array>&,
    std::vector<mx::array>&) {
  throw std::runtime_error("[mlx_llama.dequantize] has no GPU implementation");
}

bool DequantizeCPU::is_equivalent(const mx::Primitive& other) const {
  auto* o = dynamic_cast<const DequantizeCPU*>(&other);
  return o && o->group_size_ == group_size_ && o->bits_ == bits_;
}

namespace {

// Rows of D elements into the panel layout, panel by panel (in place: each
// panel's rows are copied out first).
template <typename T>
void to_panels(const T* src, T* dst, int panels, int64_t D, bool in_place) {
  ThreadPool::instance().parallel_for(panels, [&](int p, int) {
    static thread_local std::vector<T> rows;
    const T* from = src + p * D * kPanelRows;
    if (in_place) {
      rows.assign(from, from + D * kPanelRows);
      from = rows.data();
    }
    T* to = dst + p * D * kPanelRows;
    for (int64_t j = 0; j < D; ++j) {
      for (int i = 0; i < kPanelRows; ++i) {
        to[j * kPanelRows + i] = from[i * D + j];
      }
    }
  });
}

} // namespace

mx::array pack_panels(const mx::array& w, mx::StreamOrDevice s_) {
  auto s = require_cpu_stream(s_, "pack_panels");
  if ((w.itemsize() != 4 && w.itemsize() != 2) || w.ndim() != 2 || w.shape(0) % kPanelRows != 0) {
    throw std::invalid_argument(
        "[mlx_llama.pack_panels] expects a 2-D array of 16- or 32-bit elements with a multiple of 16 rows");
  }
  return mx::array(
      {w.shape(0) / kPanelRows, w.shape(1), kPanelRows},
      w.dtype(),
      std::make_shared<PackPanelsCPU>(s),
      {contiguous_if_needed(w, s)});
}

void PackPanelsCPU::eval_cpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  auto& w = inputs[0];
  auto& out = outputs[0];
  const bool in_place = w.is_donatable() && w.flags().row_contiguous;
  if (in_place) {
    // w's buffer under out's own (row-contiguous, 3-D) strides.
    out.copy_shared_buffer(w, {int64_t(out.shape(1)) * kPanelRows, kPanelRows, 1}, w.flags(), w.data_size());
  } else {
    out.set_data(mx::allocator::malloc(out.nbytes()));
  }
  auto& enc = mx::cpu::get_command_encoder(stream());
  enc.set_input_array(w);
  enc.set_output_array(out);
  const int panels = out.shape(0);
  const int64_t D = out.shape(1);
  if (w.itemsize() == 4) {
    enc.dispatch([src = w.data<uint32_t>(), dst = out.data<uint32_t>(), panels, D, in_place]() {
      to_panels(src, dst, panels, D, in_place);
    });
  } else {
    enc.dispatch([src = w.data<uint16_t>(), dst = out.data<uint16_t>(), panels, D, in_place]() {
      to_panels(src, dst, panels, D, in_place);
    });
  }
}

void PackPanelsCPU::eval_gpu(
    const std::vector<mx::array>&,
    std::vector<mx::array>&) {
  throw std::runtime_error("[mlx_llama.pack_panels] has no GPU implementation");
}

} // namespace mlx_llama
