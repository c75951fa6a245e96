// cblas_sgemm forward: one-row / one-column products go to cblas_sgemv.
//
// MLX runs every float matmul as cblas_sgemm, also the one-row products of
// decoding, and OpenBLAS's sgemm with M=1 runs 3-10x slower than its sgemv.
// mlx_llama/blas.py binds libmlx.so's cblas_sgemm slot to sgemm_dispatch below
// after handing it OpenBLAS's sgemm and sgemv (set_blas_pointers).  Plain C:
// no Python, no GIL, safe on MLX's worker thread.
#include "blas_dispatch.h"

#include <atomic>
#include <cstdint>
#include <utility>

namespace mlx_llama {
namespace {

enum : int { kRowMajor = 101, kColMajor = 102, kNoTrans = 111, kTrans = 112 };

std::atomic<SgemmFn> g_sgemm{nullptr};
std::atomic<SgemvFn> g_sgemv{nullptr};
std::atomic<long long> g_gemv_calls{0};

}  // namespace

void set_blas_pointers(SgemmFn sgemm, SgemvFn sgemv) {
  g_sgemm.store(sgemm, std::memory_order_release);
  g_sgemv.store(sgemv, std::memory_order_release);
}

long long gemv_calls() { return g_gemv_calls.load(std::memory_order_relaxed); }

extern "C" void mlx_llama_sgemm_dispatch(int order, int ta, int tb, int m, int n, int k, float alpha,
                                         const float* a, int lda, const float* b, int ldb, float beta,
                                         float* c, int ldc) {
  SgemmFn sgemm = g_sgemm.load(std::memory_order_acquire);
  SgemvFn sgemv = g_sgemv.load(std::memory_order_acquire);
  if (order == kColMajor) {
    // Column-major C = op(A)·op(B) is row-major Cᵀ = op(B)ᵀ·op(A)ᵀ: swap the operands.
    order = kRowMajor;
    std::swap(ta, tb);
    std::swap(m, n);
    std::swap(a, b);
    std::swap(lda, ldb);
  }
  const bool ok = sgemv != nullptr && order == kRowMajor && k > 0 &&
                  (ta == kNoTrans || ta == kTrans) && (tb == kNoTrans || tb == kTrans);
  if (ok && m == 1 && n > 1) {
    // c(1×n) = alpha·a(1×k)·op(b) + beta·c  ⇔  c = alpha·op(b)ᵀ·a + beta·c
    const int inc_a = ta == kNoTrans ? 1 : lda;  // a's k entries: a row, or a column of a k×1 matrix
    g_gemv_calls.fetch_add(1, std::memory_order_relaxed);
    if (tb == kTrans) {  // b stored n×k
      sgemv(kRowMajor, kNoTrans, n, k, alpha, b, ldb, a, inc_a, beta, c, 1);
    } else {  // b stored k×n
      sgemv(kRowMajor, kTrans, k, n, alpha, b, ldb, a, inc_a, beta, c, 1);
    }
    return;
  }
  if (ok && n == 1 && m > 1) {
    // c(m×1) = alpha·op(a)(m×k)·b(k×1) + beta·c; c's entries are ldc apart.
    const int inc_b = tb == kNoTrans ? ldb : 1;
    g_gemv_calls.fetch_add(1, std::memory_order_relaxed);
    if (ta == kNoTrans) {  // a stored m×k
      sgemv(kRowMajor, kNoTrans, m, k, alpha, a, lda, b, inc_b, beta, c, ldc);
    } else {  // a stored k×m
      sgemv(kRowMajor, kTrans, k, m, alpha, a, lda, b, inc_b, beta, c, ldc);
    }
    return;
  }
  sgemm(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

}  // namespace mlx_llama
