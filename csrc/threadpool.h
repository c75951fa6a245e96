// Persistent thread pool for the quantized matmul kernels.
//
// One process-wide pool of (num_threads - 1) workers; the calling thread takes
// part in every parallel_for. Workers spin briefly after each job (decode issues
// hundreds of small matmuls back to back, and a futex wake-up costs more than a
// small GEMV), then sleep on a condition variable. The spin is short (50 us,
// $MLX_LLAMA_SPIN_US): on an oversubscribed machine spinning steals the core
// the MLX stream thread needs (measured: 2000 us spin cut decode speed ~2x).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace mlx_llama {

class ThreadPool {
 public:
  using Task = std::function<void(int task, int thread)>;

  static ThreadPool& instance();

  // Run fn(i, thread_id) for i in [0, n_tasks). Tasks are handed out
  // dynamically; each task runs exactly once. thread_id < size().
  void parallel_for(int n_tasks, const Task& fn);

  int size() const {
    return static_cast<int>(workers_.size()) + 1;
  }

  // Restart the pool with n threads in total (n >= 1).
  void resize(int n);

  // How long idle workers spin before sleeping, in microseconds.
  void set_spin_us(int us) {
    spin_us_.store(us, std::memory_order_relaxed);
  }
  int spin_us() const {
    return spin_us_.load(std::memory_order_relaxed);
  }

  ~ThreadPool();

 private:
  explicit ThreadPool(int n);
  void start(int n);
  void stop();
  void worker_loop(int id, uint32_t seen);
  void run_tasks(int thread_id);

  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::mutex call_mu_; // one parallel_for at a time
  // state_: generation (high 32 bits) | closed flag (bit 31) | number of
  // workers inside the current job (low 31 bits). Workers join a job only
  // while it is open, so the caller never waits for a worker that was not
  // scheduled in time: it runs the remaining tasks itself, closes the job and
  // waits only for the workers that joined.
  std::atomic<uint64_t> state_{0};
  std::atomic<int> next_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<int> spin_us_{50};
  std::atomic<bool> stop_{false};
  const Task* job_ = nullptr;
  int n_tasks_ = 0;
};

int default_num_threads();

// Task boundaries over n items in blocks of `unit` items (the last may be
// shorter). With `shrink`, blocks shrink as the work runs out: each a
// 1/(2 * threads) share of the items left, in whole units, at least one
// unit — long blocks keep a prefetch streaming, short ones at the end keep
// the threads finishing together.
std::vector<int> shrinking_blocks(int n, int unit, bool shrink, int threads);

} // namespace mlx_llama
