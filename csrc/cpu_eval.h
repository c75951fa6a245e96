// The prologue every eval_cpu of ours shares.
#pragma once

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/stream.h"
#include "mlx/utils.h"

namespace mlx_llama {

namespace mx = mlx::core;

// Allocates the outputs and registers every array with the stream's encoder
// so MLX keeps them alive until the dispatched work runs. Inputs named in
// `contiguous` (indices) must be row-contiguous: the graph builder made them
// so.
inline mx::cpu::CommandEncoder& prepare_cpu_eval(
    const mx::Stream& stream,
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs,
    std::initializer_list<int> contiguous) {
  for (int i : contiguous) {
    if (!inputs[i].flags().row_contiguous) {
      throw std::runtime_error(
          "[mlx_llama] internal error: non-contiguous input");
    }
  }
  for (auto& out : outputs) {
    out.set_data(mx::allocator::malloc(out.nbytes()));
  }
  auto& enc = mx::cpu::get_command_encoder(stream);
  for (auto& in : inputs) {
    enc.set_input_array(in);
  }
  for (auto& out : outputs) {
    enc.set_output_array(out);
  }
  return enc;
}

// The stream of `s`, which must be a CPU stream: "[mlx_llama.<what>] only CPU
// streams are supported" otherwise, followed by "; use <instead>" when given.
inline mx::Stream require_cpu_stream(
    mx::StreamOrDevice s,
    const char* what,
    const char* instead = nullptr) {
  mx::Stream stream = mx::to_stream(s);
  if (stream.device.type != mx::Device::cpu) {
    std::string msg = std::string("[mlx_llama.") + what +
        "] only CPU streams are supported";
    if (instead) {
      msg += std::string("; use ") + instead;
    }
    throw std::invalid_argument(msg);
  }
  return stream;
}

// `a` row-contiguous, adding a Contiguous node only when it is not known to
// be: evaluated weights usually are already.
inline mx::array contiguous_if_needed(const mx::array& a, const mx::Stream& s) {
  if (a.is_available() && a.flags().row_contiguous) {
    return a;
  }
  return mx::contiguous(a, false, s);
}

// `a` as float32 and row-contiguous, adding graph ops only when needed.
inline mx::array as_f32_contiguous(const mx::array& a, const mx::Stream& s) {
  return contiguous_if_needed(
      a.dtype() == mx::float32 ? a : mx::astype(a, mx::float32, s), s);
}

// Pointer to `a`'s float32 elements in row-major order: the array's own data
// when it is row-contiguous, else a copy in `scratch`. Lets primitives take
// strided inputs (views) without a Contiguous op in the graph.
inline const float* row_major_f32(const mx::array& a, std::vector<float>& scratch) {
  if (a.flags().row_contiguous) {
    return a.data<float>();
  }
  scratch.resize(a.size());
  const int nd = a.ndim();
  const float* base = a.data<float>();
  // Copy runs of the last axis: one memcpy each when it is unit-stride (slices
  // of a fused projection's output), else element by element.
  const int64_t run = nd > 0 ? a.shape(nd - 1) : 1;
  const int64_t step = nd > 0 ? a.strides()[nd - 1] : 1;
  std::vector<int64_t> idx(std::max(nd - 1, 0), 0);
  for (size_t i = 0; i < a.size(); i += run) {
    int64_t off = 0;
    for (int d = 0; d + 1 < nd; ++d) {
      off += idx[d] * a.strides()[d];
    }
    if (step == 1) {
      std::memcpy(scratch.data() + i, base + off, run * sizeof(float));
    } else {
      for (int64_t j = 0; j < run; ++j) {
        scratch[i + j] = base[off + j * step];
      }
    }
    for (int d = nd - 2; d >= 0; --d) {
      if (++idx[d] < a.shape(d)) {
        break;
      }
      idx[d] = 0;
    }
  }
  return scratch.data();
}

} // namespace mlx_llama
