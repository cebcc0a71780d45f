// Runs the CUDA kernels of ../kernels.cu on the CPU, for the tests: every CUDA thread of a
// block is a std::thread, blocks run one after another, and a warp's shuffles meet at a
// barrier of its 32 threads. It supports what kernels.cu may use (1-D blocks of whole
// warps, shuffles, the grid built-ins) and nothing else: no shared memory, no
// __syncthreads. A kernel that broke kernels.cu's rules (a lane skipping a shuffle its warp
// takes) would deadlock here, as it would misbehave on a GPU.
#pragma once
#include <barrier>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <math.h>
#include <memory>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace emu {

struct Warp {
    std::barrier<> meet{32};
    double slot[32];
};

inline thread_local dim3 thread_idx, block_idx;
inline dim3 block_dim, grid_dim;
inline thread_local Warp* warp = nullptr;
inline thread_local unsigned lane = 0;

// Every lane posts its value, then reads its partner's; the second meeting keeps a fast
// lane from overwriting a slot before a slow one has read it. A double holds a float or a
// double exactly.
template <class T> T shfl_xor(T v, unsigned mask) {
    warp->slot[lane] = (double)v;
    warp->meet.arrive_and_wait();
    T r = (T)warp->slot[lane ^ mask];
    warp->meet.arrive_and_wait();
    return r;
}

template <class K, class... A> void launch(dim3 grid, dim3 block, K kernel, A... args) {
    if (block.x % 32 != 0 || block.y != 1 || block.z != 1) {
        std::fprintf(stderr, "emulate: blocks must be 1-D, whole warps\n");
        std::abort();
    }
    grid_dim = grid;
    block_dim = block;
    for (unsigned by = 0; by < grid.y; by++) {
        for (unsigned bx = 0; bx < grid.x; bx++) {
            std::vector<std::unique_ptr<Warp>> warps;
            for (unsigned w = 0; w < block.x / 32; w++) warps.push_back(std::make_unique<Warp>());
            std::vector<std::thread> threads;
            for (unsigned tx = 0; tx < block.x; tx++) {
                threads.emplace_back([&, tx, bx, by] {
                    thread_idx = dim3(tx);
                    block_idx = dim3(bx, by);
                    warp = warps[tx / 32].get();
                    lane = tx % 32;
                    kernel(args...);
                });
            }
            for (auto& t : threads) t.join();
        }
    }
}

}  // namespace emu

#define __global__
#define __device__
#define __forceinline__ inline
#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)

template <class T> inline T __shfl_xor_sync(unsigned, T v, unsigned mask) {
    return emu::shfl_xor(v, mask);
}

__device__ __forceinline__ float __uint_as_float(unsigned b) { return std::bit_cast<float>(b); }
__device__ __forceinline__ unsigned __float_as_uint(float x) { return std::bit_cast<unsigned>(x); }
