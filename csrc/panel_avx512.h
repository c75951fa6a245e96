// AVX-512 VNNI kernels for the integer modes (Q8: 4- and 8-bit weights, Q16:
// 8-bit weights), for any number of activation rows M.
//
// Weights come in MLX's layout (see kernels.h) or, rearranged once at load,
// in the panel layout (QMatmulArgs::panels): 16 weight rows (a "panel")
// transposed by 32-bit words, word j of the 16 rows side by side, so one
// 64-byte vector holds 4 (8-bit) or 8 (4-bit) consecutive k of 16 output
// columns. From MLX's layout each call builds that in a thread-local buffer
// (or in registers, for few rows); in the panel layout the tiles stream it
// straight from memory. An activation word
// broadcast to all lanes (vpdpbusd / vpdpwssd with a memory operand) then adds
// its products into 16 columns at once, and the integer sums of a whole block
// of 32 k stay in one register until they meet the block's scale:
//
//   y[m, n] = sum_g ( s[n,g] * sum_{b in g} float(I[m,n,b]) * d[m,b] )
//             + (b[n,g] + c s[n,g]) * xsum[m,g]
//   I[m,n,b] = sum_{k in b} (q[n,k] - c) * xq[m,k]     (exact int32)
//
// with c = 2^(bits-1), d[m,b] the activation block's scale and xsum the exact
// float32 group sums of x. Every output element goes through this sequence
// whatever M, the tile it lands in and the thread count: row i of y is
// bit-identical for any M (batch invariance by construction).
#pragma once

#include "kernels.h"

namespace mlx_llama {

// Whether the CPU has AVX-512 F/BW/VNNI and the panel kernels are on
// (MLX_LLAMA_NO_AVX512=1 or set_panel_kernels(false) turn them off).
bool panel_kernels_enabled();
void set_panel_kernels(bool on);

// Whether qmatmul_panel handles these parameters in `mode` on this CPU.
bool panel_supported(int K, int group_size, int bits, Mode mode);

void qmatmul_panel(const QMatmulArgs& a, Mode mode);

} // namespace mlx_llama
