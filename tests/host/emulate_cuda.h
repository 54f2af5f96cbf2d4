// emulate_cuda.h -- just enough of CUDA to run cuda/paged_attention.cu's kernels on a CPU, for
// tests/host/emulate_paged_attention.cpp. Not a simulator of timing, only of semantics:
//   - a CTA is 128 (blockDim.x) cooperative fibers (ucontext) on one OS thread; a fiber runs until
//     it reaches a barrier, so __syncthreads is a real barrier (counter + generation) over them;
//   - __shfl_xor_sync exchanges through a per-warp slot array between two per-warp barriers;
//   - cp.async is *deferred*: copies queue in the issuing thread's open group and happen only when
//     cp.async.wait_group retires that group, so a kernel that reads a stage before waiting for it
//     sees stale data here, as it could on a GPU; src-size 0 copies write zeros and read nothing;
//     every copy that does read is bounds-checked against the registered global buffers;
//   - __half / __nv_bfloat16 are 16-bit bit patterns with round-to-nearest-even conversions.
// Plain C++17 + POSIX ucontext.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <ucontext.h>
#include <vector>

#define __host__
#define __device__
#define __global__
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

using std::max;
using std::min;

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
struct uint4 { uint32_t x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }

inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

struct __nv_bfloat16 { uint16_t bits; };
struct __half { uint16_t bits; };
struct __half2 { __half x, y; };

inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float(uint32_t(h.bits) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u = float_bits(f);
  if (std::isnan(f)) return {uint16_t((u >> 16) | 0x40)};
  u += 0x7fff + ((u >> 16) & 1);  // round to nearest even
  return {uint16_t(u >> 16)};
}
inline float __half2float(__half h) {
  _Float16 v; std::memcpy(&v, &h.bits, 2); return static_cast<float>(v);
}
inline __half __float2half_rn(float f) {
  _Float16 v = static_cast<_Float16>(f);  // IEEE round-to-nearest-even
  __half h; std::memcpy(&h.bits, &v, 2); return h;
}
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }

namespace emu {

// A barrier among fibers: the last to arrive advances the generation; the others yield until it moves.
struct Barrier {
  int size = 0, arrived = 0;
  unsigned generation = 0;
};

struct Cta {
  Barrier all;
  std::vector<Barrier> warps;
  std::vector<float> exchange;
  char* smem = nullptr;
};

struct Copy { void* dst; const void* src; bool valid; };

struct Region { const char* begin; const char* end; };
inline std::vector<Region>& readable() { static std::vector<Region> r; return r; }
inline void register_readable(const void* p, size_t bytes) {
  readable().push_back({static_cast<const char*>(p), static_cast<const char*>(p) + bytes});
}
inline int& violations() { static int v = 0; return v; }

// Per-fiber state ("thread-local" to the emulated CUDA thread).
struct FiberState {
  dim3 thread_idx, block_idx;
  std::vector<Copy> open_group;
  std::deque<std::vector<Copy>> committed;
  ucontext_t ctx;
  std::vector<char> stack;
  bool done = false;
};
inline Cta* cta = nullptr;
inline FiberState* current = nullptr;
inline ucontext_t scheduler_ctx;

inline void yield() { swapcontext(&current->ctx, &scheduler_ctx); }
inline void barrier_wait(Barrier& b) {
  const unsigned gen = b.generation;
  if (++b.arrived == b.size) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  while (b.generation == gen) yield();
}

inline void cp_async_16(void* dst, const void* src, bool valid) { current->open_group.push_back({dst, src, valid}); }
inline void cp_async_commit() {
  current->committed.push_back(std::move(current->open_group));
  current->open_group.clear();
}
inline void cp_async_wait(int n) {
  auto& committed = current->committed;
  while (static_cast<int>(committed.size()) > n) {
    for (const Copy& c : committed.front()) {
      if (!c.valid) { std::memset(c.dst, 0, 16); continue; }
      const char* s = static_cast<const char*>(c.src);
      bool ok = false;
      for (const Region& r : readable()) ok = ok || (s >= r.begin && s + 16 <= r.end);
      if (!ok) {
        if (++violations() <= 5) std::printf("cp.async reads outside every input buffer: %p\n", c.src);
        std::memset(c.dst, 0xff, 16);
        continue;
      }
      std::memcpy(c.dst, c.src, 16);
    }
    committed.pop_front();
  }
}

inline const std::function<void()>* fiber_body = nullptr;
inline void fiber_entry() {
  (*fiber_body)();
  cp_async_wait(0);
  current->done = true;
  swapcontext(&current->ctx, &scheduler_ctx);
}

// Runs fn as every CTA of `grid`, one CTA at a time: `threads` fibers per CTA, scheduled round-robin
// (each runs until it blocks at a barrier or finishes).
inline void run_grid(dim3 grid, int threads, size_t smem_bytes, const std::function<void()>& fn) {
  Cta c;
  c.all.size = threads;
  c.warps.resize((threads + 31) / 32);
  for (Barrier& w : c.warps) w.size = 32;
  c.exchange.resize(threads);
  std::vector<char> smem(smem_bytes + 16);
  c.smem = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(smem.data()) + 15) / 16 * 16);
  cta = &c;
  fiber_body = &fn;
  std::vector<FiberState> fibers(threads);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        std::memset(c.smem, 0xff, smem_bytes);  // garbage, like a GPU's fresh shared memory
        for (int t = 0; t < threads; ++t) {
          FiberState& f = fibers[t];
          f.thread_idx = dim3(t);
          f.block_idx = dim3(x, y, z);
          f.done = false;
          f.open_group.clear();
          f.committed.clear();
          f.stack.resize(256 * 1024);
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.data();
          f.ctx.uc_stack.ss_size = f.stack.size();
          f.ctx.uc_link = nullptr;
          makecontext(&f.ctx, fiber_entry, 0);
        }
        for (int live = threads; live > 0;) {
          live = 0;
          for (FiberState& f : fibers) {
            if (f.done) continue;
            current = &f;
            swapcontext(&scheduler_ctx, &f.ctx);
            live += !f.done;
          }
        }
        if (c.all.arrived != 0) std::printf("a CTA finished with threads still waiting at __syncthreads\n");
      }
}

}  // namespace emu

#define threadIdx (emu::current->thread_idx)
#define blockIdx (emu::current->block_idx)
#define TI_DYNAMIC_SMEM(name) char* name = emu::cta->smem

inline void __syncthreads() { emu::barrier_wait(emu::cta->all); }

inline float __shfl_xor_sync(unsigned /*mask*/, float v, int lane_mask) {
  const int t = static_cast<int>(threadIdx.x), warp = t / 32, lane = t % 32;
  emu::cta->exchange[t] = v;
  emu::barrier_wait(emu::cta->warps[warp]);
  const float r = emu::cta->exchange[warp * 32 + (lane ^ lane_mask)];
  emu::barrier_wait(emu::cta->warps[warp]);
  return r;
}
