// Python bindings: mlx_llama._qmm_ext
#include <stdexcept>

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "attention_avx512.h"
#include "blas_dispatch.h"
#include "fused_ops.h"
#include "panel_avx512.h"
#include "qmm.h"
#include "threadpool.h"

namespace nb = nanobind;
namespace mx = mlx::core;
using namespace nb::literals;

namespace {

// A kernel mode's name as Python passes it.
mlx_llama::Mode parse_mode(const std::string& mode) {
  if (mode == "q8") {
    return mlx_llama::Mode::Q8;
  }
  if (mode == "q16") {
    return mlx_llama::Mode::Q16;
  }
  if (mode == "exact") {
    return mlx_llama::Mode::Exact;
  }
  throw std::invalid_argument("mode must be 'q8', 'q16' or 'exact'");
}

} // namespace

NB_MODULE(_qmm_ext, m) {
  m.doc() = "mlx-llama CPU kernels for MLX affine-quantized matmul";

  m.def(
      "quantized_matmul",
      [](const mx::array& x,
         const mx::array& w,
         const mx::array& scales,
         const mx::array& biases,
         int group_size,
         int bits,
         const std::string& mode,
         mx::StreamOrDevice s) {
        return mlx_llama::quantized_matmul(
            x, w, scales, biases, group_size, bits, parse_mode(mode), s);
      },
      "x"_a,
      "w"_a,
      "scales"_a,
      "biases"_a,
      nb::kw_only(),
      "group_size"_a,
      "bits"_a,
      "mode"_a = "q8",
      "stream"_a = nb::none(),
      "x @ dequantize(w, scales, biases).T on the CPU (MLX affine format).");

  m.def(
      "dequantize",
      &mlx_llama::dequantize,
      "w"_a,
      "scales"_a,
      "biases"_a,
      nb::kw_only(),
      "group_size"_a,
      "bits"_a,
      "stream"_a = nb::none(),
      "Dequantize to float32 on the CPU (multi-threaded).");

  m.def(
      "pack_panels",
      &mlx_llama::pack_panels,
      "w"_a,
      nb::kw_only(),
      "stream"_a = nb::none(),
      "Quantized weights (N x D uint32) in the panel layout the AVX-512 kernels stream: (N / 16, D, 16).");
  m.def(
      "panel_layout_supported",
      [](int K, int group_size, int bits, const std::string& mode) {
        return mlx_llama::panel_supported(K, group_size, bits, parse_mode(mode));
      },
      "K"_a,
      "group_size"_a,
      "bits"_a,
      "mode"_a,
      "Whether `mode` ('q8', 'q16' or 'exact') runs on the AVX-512 panel kernels for these parameters here.");
  m.def(
      "q8_supported",
      &mlx_llama::q8_supported,
      "K"_a,
      "group_size"_a,
      "bits"_a,
      "Whether the int8-activation fast path handles these parameters.");
  m.def(
      "q16_supported",
      &mlx_llama::q16_supported,
      "K"_a,
      "group_size"_a,
      "bits"_a,
      "Whether the int16-activation fast path (8-bit weights) handles these parameters.");

  m.def(
      "set_blas_pointers",
      [](uintptr_t sgemm, uintptr_t sgemv) {
        if (sgemm == 0) {
          throw std::invalid_argument("sgemm must be a function address");
        }
        mlx_llama::set_blas_pointers(reinterpret_cast<mlx_llama::SgemmFn>(sgemm),
                                     reinterpret_cast<mlx_llama::SgemvFn>(sgemv));
      },
      "sgemm_addr"_a,
      "sgemv_addr"_a,
      "Give sgemm_dispatch the cblas_sgemm / cblas_sgemv it calls (sgemv 0: no forwarding).");
  m.def(
      "sgemm_dispatch_address",
      [] { return reinterpret_cast<uintptr_t>(&mlx_llama::mlx_llama_sgemm_dispatch); },
      "Address of a cblas_sgemm that sends one-row/one-column products to sgemv.");
  m.def("gemv_calls", &mlx_llama::gemv_calls, "sgemm calls forwarded to sgemv so far.");

  m.def(
      "rms_norm",
      &mlx_llama::rms_norm,
      "x"_a,
      "weight"_a,
      "eps"_a,
      nb::kw_only(),
      "stream"_a = nb::none(),
      "x * rsqrt(mean(x^2, -1) + eps) * weight on the CPU, one graph node.");
  m.def(
      "rope",
      &mlx_llama::rope,
      "x"_a,
      "offset"_a,
      "periods"_a,
      nb::kw_only(),
      "stream"_a = nb::none(),
      "Half-split RoPE of x (B, L, H, D) at positions offset + l, one graph node.");
  m.def(
      "rope_rows",
      &mlx_llama::rope_rows,
      "x"_a,
      "positions"_a,
      "periods"_a,
      nb::kw_only(),
      "stream"_a = nb::none(),
      "Half-split RoPE of x (B, L, H, D), row r at positions[r] (int32, B * L), one graph node.");
  m.def(
      "swiglu",
      &mlx_llama::swiglu,
      "gate"_a,
      "up"_a,
      nb::kw_only(),
      "stream"_a = nb::none(),
      "silu(gate) * up on the CPU, one graph node.");
  m.def(
      "attention",
      &mlx_llama::attention,
      "q"_a,
      "k"_a,
      "v"_a,
      nb::kw_only(),
      "scale"_a,
      "causal"_a,
      "stream"_a = nb::none(),
      "softmax(q k^T * scale) v for q (B, L, H, D), k/v (B, Hkv, T, D) -> (B, L, H, D).");

  m.def(
      "attention_rows_update",
      &mlx_llama::attention_rows_update,
      "q"_a,
      "k"_a,
      "v"_a,
      "buffers"_a,
      nb::kw_only(),
      "slots"_a,
      "lengths"_a,
      "scale"_a,
      "stream"_a = nb::none(),
      "Row i of q (1, N, H, D) attends to the first lengths[i] slots of buffers[2i], buffers[2i+1] after row i's k, v (1, N, Hkv, D) are written into slot slots[i] IN PLACE -> (1, N, H, D), one graph node.");

  m.def("isa", &mlx_llama::isa, "SIMD level picked at runtime.");
  m.def(
      "panel_kernels",
      &mlx_llama::panel_kernels_enabled,
      "Whether the AVX-512 VNNI panel kernels run the integer modes (else the AVX2 tiles).");
  m.def(
      "attention_avx512",
      []() { return mlx_llama::attention_avx512_supported(64); },
      "Whether attention runs the AVX-512 tiles (head sizes that are multiples of 16; else AVX2 or scalar).");
  m.def(
      "set_panel_kernels",
      &mlx_llama::set_panel_kernels,
      "on"_a,
      "Turn the AVX-512 VNNI panel kernels on (where the CPU has them) or off.");

  m.def(
      "read_probe",
      [](mx::array a) {
        if (a.dtype() != mx::float32) {
          throw std::invalid_argument("read_probe expects float32");
        }
        a = mx::contiguous(a);
        a.eval();
        const float* p = a.data<float>();
        const int64_t n = static_cast<int64_t>(a.size());
        nb::gil_scoped_release nogil;
        return mlx_llama::read_probe(p, n);
      },
      "a"_a,
      "Sum an evaluated float32 array with all kernel threads (bandwidth probe).");

  m.def(
      "num_threads",
      [] { return mlx_llama::ThreadPool::instance().size(); },
      "Threads the kernels use (including the caller).");
  m.def(
      "set_num_threads",
      [](int n) { mlx_llama::ThreadPool::instance().resize(n); },
      "n"_a,
      "Resize the kernel thread pool (n >= 1 threads in total).");
  m.def(
      "set_spin_us",
      [](int us) { mlx_llama::ThreadPool::instance().set_spin_us(us); },
      "us"_a,
      "How long idle pool threads spin before sleeping.");
}
