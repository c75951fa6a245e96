// Standalone check of the CPU kernels in csrc/kernels.cpp, without MLX or
// Python, so that the arm64 (NEON) build can run under qemu-aarch64 in CI and
// the x86 build natively (AVX2).
//
//   kernel_driver [--expect-isa ISA] [--write FILE | --against FILE]
//
// Every result is checked against a double-precision reference computed here
// (our own bit packing, dequantization and matmul), within the bounds the x86
// tests use (tests/test_qmatmul.py):
//   exact mode   |y - ref| <= 1e-5 * sum_k |x_k| |w_hat_k|
//   q8 mode      the exact bound + sum_k |s_k (q_k - 2^(bits-1))| d_k / 2, d_k
//                = max|x| / 127 over k's block of 32 (x rounded to int8)
//   dequantize   |w - ref| <= 2^-23 (|s q| + |b|)   (two float32 roundings)
//   dot_f32      |d - ref| <= (n + 2) 2^-24 sum |a_i b_i|
// and bit-identical where the kernels promise it: across thread counts, for
// bf16/f16 scales vs their float32 values, and in q8 mode vs exact mode where
// q8 has no fast path. --write saves every result; a second run with
// MLX_LLAMA_FORCE_SCALAR=1 and --against FILE compares its (scalar) results
// with the saved SIMD ones within the same bounds. Exit status 1 on a failure.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "kernels.h"
#include "threadpool.h"

using namespace mlx_llama;

namespace {

// splitmix64: the same data from every compiler and standard library.
struct Rng {
  uint64_t s;
  uint64_t next() {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  float uniform() { // [-1, 1)
    return static_cast<float>(next() >> 40) * 0x1p-23f - 1.f;
  }
  int below(int n) {
    return static_cast<int>(next() % uint64_t(n));
  }
};

// A random bf16 or f16 value of magnitude in [2^e0, 2^(e1+1)), and its value.
uint16_t random_half(Rng& r, ScaleType t, int e0, int e1, float* value) {
  const int e = e0 + r.below(e1 - e0 + 1);
  const uint16_t sign = r.below(2) ? 0x8000 : 0;
  uint16_t h;
  if (t == ScaleType::BF16) {
    h = sign | uint16_t((e + 127) << 7) | uint16_t(r.below(128));
    const uint32_t bits = uint32_t(h) << 16;
    std::memcpy(value, &bits, 4);
  } else {
    const int man = r.below(1024);
    h = sign | uint16_t((e + 15) << 10) | uint16_t(man);
    *value = std::ldexp(static_cast<float>(man | 0x400), e - 10) * (sign ? -1.f : 1.f);
  }
  return h;
}

struct Problem {
  int bits, g, M, N, K;
  ScaleType half; // storage of sh/bh, checked against the float32 copies s/b
  std::vector<float> x; // M x K
  std::vector<int> q; // N x K
  std::vector<uint32_t> w; // q packed as MLX does
  std::vector<uint16_t> sh, bh; // N x K / g
  std::vector<float> s, b;
  std::string name;
};

// Value k of row n at bit k * bits of the row's little-endian bit stream.
std::vector<uint32_t> pack(const std::vector<int>& q, int N, int K, int bits) {
  const int words = K * bits / 32;
  std::vector<uint32_t> w(size_t(N) * words, 0);
  for (int n = 0; n < N; ++n) {
    uint32_t* row = w.data() + size_t(n) * words;
    for (int k = 0; k < K; ++k) {
      const uint64_t v = uint64_t(q[size_t(n) * K + k]) << ((k * bits) % 32);
      row[k * bits / 32] |= static_cast<uint32_t>(v);
      if (v >> 32) {
        row[k * bits / 32 + 1] |= static_cast<uint32_t>(v >> 32);
      }
    }
  }
  return w;
}

Problem make_problem(Rng& r, int bits, int g, int M, int N, int K) {
  Problem p{bits, g, M, N, K, r.below(2) ? ScaleType::BF16 : ScaleType::F16, {}, {}, {}, {}, {}, {}, {}, {}};
  char name[64]; // snprintf: GCC 12's -O3 -Wrestrict misfires on "b" + std::string
  std::snprintf(name, sizeof name, "b%d g%d M%d N%d K%d", bits, g, M, N, K);
  p.name = name;
  // Blocks of 32 with magnitudes over 2^-3..2^3 (q8 scales each block), and
  // one all-zero block (its q8 scale is 0).
  p.x.resize(size_t(M) * K);
  for (size_t blk = 0; blk < p.x.size() / 32; ++blk) {
    const float mag = std::ldexp(1.f, r.below(7) - 3);
    for (size_t i = 0; i < 32; ++i) {
      p.x[blk * 32 + i] = blk == 1 ? 0.f : mag * r.uniform();
    }
  }
  p.q.resize(size_t(N) * K);
  for (int& v : p.q) {
    v = r.below(1 << bits);
  }
  p.w = pack(p.q, N, K, bits);
  const size_t ng = size_t(N) * (K / g);
  p.sh.resize(ng);
  p.bh.resize(ng);
  p.s.resize(ng);
  p.b.resize(ng);
  for (size_t i = 0; i < ng; ++i) {
    p.sh[i] = random_half(r, p.half, -8, -4, &p.s[i]);
    p.bh[i] = random_half(r, p.half, -4, -1, &p.b[i]);
  }
  return p;
}

std::vector<float> run_qmatmul(const Problem& p, Mode mode, bool half, int threads) {
  ThreadPool::instance().resize(threads);
  std::vector<float> y(size_t(p.M) * p.N, NAN);
  const QMatmulArgs a{p.x.data(), p.w.data(),
                      half ? static_cast<const void*>(p.sh.data()) : p.s.data(),
                      half ? static_cast<const void*>(p.bh.data()) : p.b.data(),
                      half ? p.half : ScaleType::F32, y.data(), p.M, p.N, p.K, p.g, p.bits};
  qmatmul(a, mode);
  return y;
}

std::vector<float> run_dequantize(const Problem& p, bool half, int threads) {
  ThreadPool::instance().resize(threads);
  std::vector<float> out(size_t(p.N) * p.K, NAN);
  dequantize_rows(p.w.data(),
                  half ? static_cast<const void*>(p.sh.data()) : p.s.data(),
                  half ? static_cast<const void*>(p.bh.data()) : p.b.data(),
                  half ? p.half : ScaleType::F32, out.data(), p.N, p.K, p.g, p.bits);
  return out;
}

class Checker {
 public:
  std::map<std::string, std::vector<float>> other; // the --against run's results
  std::ofstream* save = nullptr;
  int passed = 0, failed = 0;
  std::map<std::string, double> worst; // per kind: max |error| / bound

  // got within tol of ref, and within pair_tol of the other run's result.
  void close(const std::string& kind, const std::string& name, const std::vector<float>& got,
             const std::vector<double>& ref, const std::vector<double>& tol,
             const std::vector<double>& pair_tol) {
    within(kind, name + " vs reference", got, ref, tol);
    if (save) {
      const uint32_t len = static_cast<uint32_t>(name.size());
      const uint64_t n = got.size();
      save->write(reinterpret_cast<const char*>(&len), 4).write(name.data(), len);
      save->write(reinterpret_cast<const char*>(&n), 8);
      save->write(reinterpret_cast<const char*>(got.data()), std::streamsize(n * 4));
    }
    if (!other.empty()) {
      auto it = other.find(name);
      if (it == other.end() || it->second.size() != got.size()) {
        fail(name + ": missing from the --against file");
        return;
      }
      within(kind + " vs other ISA", name + " vs other ISA",
             got, std::vector<double>(it->second.begin(), it->second.end()), pair_tol);
      other.erase(it);
    }
  }

  void same(const std::string& name, const std::vector<float>& a, const std::vector<float>& b) {
    if (a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * 4) == 0) {
      ++passed;
    } else {
      fail(name + ": not bit-identical");
    }
  }

  void fail(const std::string& msg) {
    ++failed;
    if (failed <= 20) {
      std::printf("FAIL %s\n", msg.c_str());
    }
  }

 private:
  void within(const std::string& kind, const std::string& what, const std::vector<float>& got,
              const std::vector<double>& ref, const std::vector<double>& tol) {
    double& w = worst[kind];
    for (size_t i = 0; i < got.size(); ++i) {
      const double err = std::fabs(double(got[i]) - ref[i]);
      if (!(err <= tol[i])) { // NaN fails too
        char buf[160];
        std::snprintf(buf, sizeof buf, " [%zu]: %.9g, expected %.9g +- %.3g", i, got[i], ref[i], tol[i]);
        fail(what + buf);
        return;
      }
      if (tol[i] > 0) {
        w = std::max(w, err / tol[i]);
      }
    }
    ++passed;
  }
};

void check_qmatmul(Checker& c, const Problem& p) {
  const int ng = p.K / p.g;
  const double center = std::ldexp(1.0, p.bits - 1);
  std::vector<double> ref(size_t(p.M) * p.N), tol_exact(ref.size()), tol_q8(ref.size());
  for (int m = 0; m < p.M; ++m) {
    const float* x = p.x.data() + size_t(m) * p.K;
    std::vector<double> d(p.K / 32); // q8's step per block: max|x| / 127
    for (int k = 0; k < p.K; ++k) {
      d[k / 32] = std::max(d[k / 32], std::fabs(double(x[k])) / 127.0);
    }
    for (int n = 0; n < p.N; ++n) {
      double y = 0, mag = 0, q8 = 0;
      for (int k = 0; k < p.K; ++k) {
        const size_t gi = size_t(n) * ng + k / p.g;
        const double q = p.q[size_t(n) * p.K + k];
        const double wh = double(p.s[gi]) * q + double(p.b[gi]);
        y += double(x[k]) * wh;
        mag += std::fabs(double(x[k]) * wh);
        q8 += std::fabs(double(p.s[gi]) * (q - center)) * d[k / 32] / 2.0;
      }
      const size_t i = size_t(m) * p.N + n;
      ref[i] = y;
      tol_exact[i] = 1e-5 * mag;
      tol_q8[i] = tol_exact[i] + q8;
    }
  }
  const bool q8 = q8_supported(p.K, p.g, p.bits);
  std::vector<float> exact;
  for (Mode mode : {Mode::Exact, Mode::Q8}) {
    const std::string name = "qmatmul " + p.name + (mode == Mode::Q8 ? " q8" : " exact");
    const std::vector<float> y = run_qmatmul(p, mode, false, 1);
    for (int t : {2, 3}) {
      c.same(name + " threads " + std::to_string(t) + " vs 1", run_qmatmul(p, mode, false, t), y);
    }
    c.same(name + " half scales vs float32", run_qmatmul(p, mode, true, 2), y);
    if (mode == Mode::Exact) {
      c.close("exact", name, y, ref, tol_exact, tol_exact);
      exact = y;
    } else if (q8) {
      c.close("q8", name, y, ref, tol_q8, tol_q8);
    } else {
      c.same(name + " (no q8 path) vs exact", y, exact);
      // The other run may have had a q8 path (SIMD vs scalar): the q8 bound.
      c.close("q8", name, y, ref, tol_exact, tol_q8);
    }
  }
}

void check_dequantize(Checker& c, const Problem& p) {
  const std::string name = "dequantize " + p.name;
  const std::vector<float> out = run_dequantize(p, false, 1);
  for (int t : {2, 3}) {
    c.same(name + " threads " + std::to_string(t) + " vs 1", run_dequantize(p, false, t), out);
  }
  c.same(name + " half scales vs float32", run_dequantize(p, true, 2), out);
  std::vector<double> ref(out.size()), tol(out.size());
  for (size_t i = 0; i < out.size(); ++i) {
    const size_t gi = i / p.K * (p.K / p.g) + i % p.K / p.g;
    const double sq = double(p.s[gi]) * p.q[i];
    ref[i] = sq + double(p.b[gi]);
    tol[i] = 0x1p-23 * (std::fabs(sq) + std::fabs(double(p.b[gi])));
  }
  c.close("dequantize", name, out, ref, tol, tol);
}

void check_dot(Checker& c, Rng& r, int n) {
  std::vector<float> a(n), b(n);
  double ref = 0, mag = 0;
  for (int i = 0; i < n; ++i) {
    a[i] = r.uniform();
    b[i] = r.uniform();
    ref += double(a[i]) * b[i];
    mag += std::fabs(double(a[i]) * b[i]);
  }
  const std::vector<double> tol{(n + 2) * 0x1p-24 * mag};
  c.close("dot_f32", "dot_f32 n" + std::to_string(n), {dot_f32(a.data(), b.data(), n)}, {ref}, tol, tol);
}

std::map<std::string, std::vector<float>> load(const char* path) {
  std::map<std::string, std::vector<float>> m;
  std::ifstream f(path, std::ios::binary);
  uint32_t len;
  while (f.read(reinterpret_cast<char*>(&len), 4)) {
    std::string name(len, '\0');
    uint64_t n = 0;
    f.read(name.data(), len).read(reinterpret_cast<char*>(&n), 8);
    std::vector<float> v(n);
    f.read(reinterpret_cast<char*>(v.data()), std::streamsize(n * 4));
    m[name] = std::move(v);
  }
  return m;
}

} // namespace

int main(int argc, char** argv) {
  const char* expect_isa = nullptr;
  const char* write_path = nullptr;
  const char* against_path = nullptr;
  for (int i = 1; i < argc; i += 2) {
    const std::string opt = argv[i];
    const char** dst = opt == "--expect-isa" ? &expect_isa
        : opt == "--write"                   ? &write_path
        : opt == "--against"                 ? &against_path
                                             : nullptr;
    if (!dst || i + 1 == argc) {
      std::fprintf(stderr, "usage: %s [--expect-isa ISA] [--write FILE | --against FILE]\n", argv[0]);
      return 2;
    }
    *dst = argv[i + 1];
  }
  if (expect_isa && std::strcmp(isa(), expect_isa) != 0) {
    std::printf("FAIL kernels picked ISA %s, expected %s\n", isa(), expect_isa);
    return 1;
  }
  Checker c;
  std::ofstream save;
  if (write_path) {
    save.open(write_path, std::ios::binary);
    c.save = &save;
  }
  if (against_path) {
    c.other = load(against_path);
    if (c.other.empty()) {
      std::printf("FAIL no results in %s\n", against_path);
      return 1;
    }
  }
  Rng r{20};
  for (int bits : {2, 3, 4, 5, 6, 8}) {
    for (int g : {32, 64, 128}) {
      // Odd N (not a multiple of any tile height); K of 3 groups (no q8 path
      // for some bits) and of 256 or more (q8 paths with several groups per
      // 256-bit chunk of packed weights for g < 256 / bits).
      for (int M = 1; M <= 8; ++M) {
        check_qmatmul(c, make_problem(r, bits, g, M, 37, 3 * g));
        check_qmatmul(c, make_problem(r, bits, g, M, 13, 2 * std::max(g, 128)));
      }
      if (g == 64) {
        // Several row blocks whose sizes depend on the thread count (GEMV),
        // and M >= 16 (activations quantized in parallel).
        check_qmatmul(c, make_problem(r, bits, g, 1, 2101, 256));
        check_qmatmul(c, make_problem(r, bits, g, 17, 133, 256));
      }
      check_dequantize(c, make_problem(r, bits, g, 1, 37, 3 * g));
    }
  }
  for (int n : {0, 1, 7, 8, 9, 15, 16, 17, 31, 33, 64, 100, 1000, 4097}) {
    check_dot(c, r, n);
  }
  for (const auto& kv : c.other) {
    c.fail(kv.first + ": in the --against file but not computed");
  }
  std::string worst;
  for (const auto& [kind, ratio] : c.worst) {
    char buf[96];
    std::snprintf(buf, sizeof buf, "%s%s %.2g", worst.empty() ? "" : ", ", kind.c_str(), ratio);
    worst += buf;
  }
  std::printf("kernel_driver (isa %s%s): %d checks passed, %d failed; worst error / bound: %s\n",
              isa(), against_path ? ", against the saved results" : "", c.passed, c.failed, worst.c_str());
  return c.failed ? 1 : 0;
}
