// The CUDA launch emulation shared by tests/ops/cuda_emulation.cpp and
// tests/ops/cuda_grouped_emulation.cpp: include it before the kernels' .cuh.
//
// Each CUDA block runs as `threads` std::threads that share the kernel's __shared__ arrays
// (function statics: blocks run one after another) and meet at a std::barrier for
// __syncthreads(), so the kernels' own indexing, tiling, masking and Philox draws are what is
// tested.
#pragma once

#include <barrier>
#include <functional>
#include <thread>
#include <vector>

namespace emu {
struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local Dim3 threadIdx;
inline thread_local Dim3 blockIdx;
inline std::barrier<>* block_barrier = nullptr;

// Runs kernel() once per thread of every block of `grid`, blocks in order.
inline void launch(Dim3 grid, unsigned threads, const std::function<void()>& kernel) {
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        std::barrier<> barrier(threads);
        block_barrier = &barrier;
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (unsigned t = 0; t < threads; ++t) {
          pool.emplace_back([&, t] {
            blockIdx = {x, y, z};
            threadIdx = {t, 0, 0};
            kernel();
          });
        }
        for (auto& thread : pool) thread.join();
      }
    }
  }
}
}  // namespace emu

using emu::blockIdx;
using emu::threadIdx;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static
#define __syncthreads() emu::block_barrier->arrive_and_wait()
