// The constants of the vector e^x (Cephes expf) that the AVX2 and AVX-512
// kernels share: one definition, so the two widths give the same bits.
#pragma once

namespace mlx_llama::cephes_exp {

// x is clamped to [kLo, kHi]: no overflow to inf, tiny results instead of denormals.
constexpr float kLo = -87.3f, kHi = 88.3f;
constexpr float kLog2e = 1.44269504088896341f;
// ln 2 in two parts for the range reduction x - n ln 2.
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
// The degree-5 polynomial on [-ln2/2, ln2/2], highest coefficient first (Horner).
constexpr float kPoly[] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                           4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

} // namespace mlx_llama::cephes_exp
