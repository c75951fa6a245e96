// Attention on AVX-512: the query vectors of one kv head against its keys
// transposed 16 at a time, so a score tile is FMAs with the query broadcast,
// not a horizontal sum per (query, key).
#pragma once

#include <cstdint>

namespace mlx_llama {

// Whether attend_kv_head_avx512 runs here for head size D: AVX-512 F on
// x86-64 (MLX_LLAMA_NO_AVX512=1 turns it off) and D a multiple of 16.
bool attention_avx512_supported(int D);

// softmax(q k^T * scale) v for the query vectors of one kv head: rows l in
// [0, L), heads h in [0, group), vector (l, h) at q + l * q_row + h * D and
// its output at y + l * q_row + h * D; row l attends to keys [0, n_l) with
// n_l = causal ? T - L + l + 1 : T, key t at k + t * k_stride (v likewise).
//
// Every vector goes through one fixed sequence: its score with key t is two
// FMA chains over the even and the odd d, summed, times scale; the softmax
// and the weighted sum of the values run over t in order. So a vector's
// output depends on its own q and keys only: not on L, the other vectors,
// the tiles it lands in or the thread (prefill chunks and decode rows agree).
void attend_kv_head_avx512(
    const float* q, int64_t q_row, int L, int group, int D, const float* k, int64_t k_stride, const float* v,
    int64_t v_stride, int T, bool causal, float scale, float* y);

} // namespace mlx_llama
