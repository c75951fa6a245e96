// cblas_sgemm with one-row / one-column products forwarded to cblas_sgemv (blas_dispatch.cpp).
#pragma once

namespace mlx_llama {

// CBLAS signatures (enums passed as int: CblasRowMajor=101, CblasNoTrans=111, CblasTrans=112).
using SgemmFn = void (*)(int, int, int, int, int, int, float, const float*, int, const float*, int, float,
                         float*, int);
using SgemvFn = void (*)(int, int, int, int, float, const float*, int, const float*, int, float, float*, int);

// The sgemm/sgemv the dispatcher calls (OpenBLAS's); sgemv may be null (no forwarding).
void set_blas_pointers(SgemmFn sgemm, SgemvFn sgemv);

// How many calls went to sgemv so far (for tests and benchmarks).
long long gemv_calls();

extern "C" void mlx_llama_sgemm_dispatch(int order, int ta, int tb, int m, int n, int k, float alpha,
                                         const float* a, int lda, const float* b, int ldb, float beta,
                                         float* c, int ldc);

}  // namespace mlx_llama
