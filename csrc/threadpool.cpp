#include "threadpool.h"

#include <chrono>
#include <cstdlib>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() asm volatile("yield" ::: "memory")
#else
#define CPU_RELAX() ((void)0)
#endif

namespace mlx_llama {

int default_num_threads() {
  if (const char* env = std::getenv("MLX_LLAMA_NUM_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) {
      return n;
    }
  }
  unsigned hc = std::thread::hardware_concurrency();
  return hc > 0 ? static_cast<int>(hc) : 1;
}

ThreadPool& ThreadPool::instance() {
  // Intentionally leaked: joining threads from a static destructor at
  // interpreter exit can deadlock.
  static ThreadPool* pool = new ThreadPool(default_num_threads());
  return *pool;
}

ThreadPool::ThreadPool(int n) {
  if (const char* env = std::getenv("MLX_LLAMA_SPIN_US")) {
    spin_us_.store(std::atoi(env));
  }
  start(n);
}

ThreadPool::~ThreadPool() {
  stop();
}

void ThreadPool::start(int n) {
  stop_.store(false);
  // Workers start from the current generation: one that starts late must
  // not skip a job published in between.
  const uint32_t gen = static_cast<uint32_t>(state_.load() >> 32);
  for (int i = 1; i < n; ++i) {
    workers_.emplace_back([this, i, gen] { worker_loop(i, gen); });
  }
}

void ThreadPool::stop() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_.store(true);
  }
  cv_.notify_all();
  for (auto& t : workers_) {
    t.join();
  }
  workers_.clear();
}

void ThreadPool::resize(int n) {
  std::lock_guard<std::mutex> call(call_mu_);
  if (n < 1) {
    n = 1;
  }
  if (n == size()) {
    return;
  }
  stop();
  start(n);
}

void ThreadPool::run_tasks(int thread_id) {
  const Task& fn = *job_;
  const int n = n_tasks_;
  for (;;) {
    int i = next_.fetch_add(1, std::memory_order_relaxed);
    if (i >= n) {
      break;
    }
    fn(i, thread_id);
  }
}

namespace {
constexpr uint64_t kClosed = uint64_t(1) << 31;
constexpr uint64_t kActiveMask = kClosed - 1;
inline uint32_t gen_of(uint64_t s) {
  return static_cast<uint32_t>(s >> 32);
}
} // namespace

void ThreadPool::worker_loop(int id, uint32_t seen) {
  for (;;) {
    // Spin for a while, then sleep.
    auto t0 = std::chrono::steady_clock::now();
    int spins = 0;
    while (gen_of(state_.load(std::memory_order_acquire)) == seen &&
           !stop_.load(std::memory_order_relaxed)) {
      CPU_RELAX();
      if (++spins % 64 == 0) {
        auto us = std::chrono::duration_cast<std::chrono::microseconds>(
                      std::chrono::steady_clock::now() - t0)
                      .count();
        if (us >= spin_us_.load(std::memory_order_relaxed)) {
          std::unique_lock<std::mutex> lk(mu_);
          sleepers_.fetch_add(1);
          cv_.wait(lk, [&] {
            return gen_of(state_.load(std::memory_order_acquire)) != seen ||
                stop_.load();
          });
          sleepers_.fetch_sub(1);
          break;
        }
      }
    }
    if (stop_.load()) {
      return;
    }
    // Join the job if it is still open.
    uint64_t s = state_.load(std::memory_order_acquire);
    seen = gen_of(s);
    bool joined = false;
    while (gen_of(s) == seen && !(s & kClosed)) {
      if (state_.compare_exchange_weak(
              s, s + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
        joined = true;
        break;
      }
    }
    if (joined) {
      run_tasks(id);
      state_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }
}

void ThreadPool::parallel_for(int n_tasks, const Task& fn) {
  if (n_tasks <= 0) {
    return;
  }
  std::unique_lock<std::mutex> call(call_mu_, std::try_to_lock);
  if (!call.owns_lock() || workers_.empty() || n_tasks == 1) {
    // Busy (another stream is using the pool) or nothing to share: run inline.
    for (int i = 0; i < n_tasks; ++i) {
      fn(i, 0);
    }
    return;
  }
  job_ = &fn;
  n_tasks_ = n_tasks;
  next_.store(0, std::memory_order_relaxed);
  bool wake;
  {
    // Publish under the lock: a worker either sees the new generation in its
    // wait predicate or is already counted in sleepers_ and gets notified.
    std::lock_guard<std::mutex> lk(mu_);
    const uint32_t gen = gen_of(state_.load()) + 1;
    state_.store(uint64_t(gen) << 32, std::memory_order_release);
    wake = sleepers_.load() > 0;
  }
  if (wake) {
    cv_.notify_all();
  }
  run_tasks(0);
  // Close the job, then wait for the workers that joined it.
  state_.fetch_or(kClosed, std::memory_order_acq_rel);
  while ((state_.load(std::memory_order_acquire) & kActiveMask) != 0) {
    CPU_RELAX();
  }
}

std::vector<int> shrinking_blocks(int n, int unit, bool shrink, int threads) {
  std::vector<int> bounds{0};
  for (int i = 0; i < n;) {
    int size = unit;
    if (shrink) {
      size = std::max(size, (n - i) / (2 * threads) / unit * unit);
    }
    i = std::min(n, i + size);
    bounds.push_back(i);
  }
  return bounds;
}

} // namespace mlx_llama
