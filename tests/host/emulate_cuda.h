// emulate_cuda.h -- just enough of CUDA to run tinyinfer's shipped kernels (cuda/*.cu) on a CPU, for
// the tests/host/emulate_*.cpp programs. Not a simulator of timing, only of semantics:
//   - a CTA is blockDim.x cooperative fibers (ucontext) on one OS thread; a fiber runs until it reaches
//     a barrier, so __syncthreads is a real barrier (counter + generation) over them;
//   - a cluster's CTAs run together (their fibers interleave), so barrier.cluster and reads of another
//     CTA's shared memory (mapa) behave as on sm_90; clusters run one after another;
//   - warp-collective operations (shuffles, and mma / ldmatrix in emulate_ptx.h) exchange values
//     through a per-warp, double-buffered slot array between warp barriers (warp_gather);
//   - cp.async is *deferred*: copies queue in the issuing thread's open group and happen only when
//     cp.async.wait_group retires that group, so a kernel that reads a stage before waiting for it
//     sees stale data here, as it could on a GPU; src-size 0 copies write zeros and read nothing;
//     every copy that does read is bounds-checked against the registered global buffers;
//   - shared memory starts as 0xff bytes (a NaN pattern) in every CTA;
//   - __half / __nv_bfloat16 are 16-bit bit patterns with round-to-nearest-even conversions.
// Kernels may use dynamic shared memory only (TI_DYNAMIC_SMEM): a `__shared__` array would be a
// per-fiber local here. Plain C++17 + POSIX ucontext.
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
#define __forceinline__ inline
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
struct alignas(16) uint4 { uint32_t x, y, z, w; };
struct alignas(8) uint2 { uint32_t x, y; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline uint4 make_uint4(uint32_t x, uint32_t y, uint32_t z, uint32_t w) { return {x, y, z, w}; }

inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t __float_as_uint(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline uint32_t float_bits(float f) { return __float_as_uint(f); }

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
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }
inline __half __ushort_as_half(unsigned short b) { return __half{b}; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short b) { return __nv_bfloat16{b}; }
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
template <typename T> inline T __ldg(const T* p) { return *p; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }

namespace emu {

// A barrier among fibers: the last to arrive advances the generation; the others yield until it moves.
struct Barrier {
  int size = 0, arrived = 0;
  unsigned generation = 0;
};

constexpr int kSlotBytes = 64;  // per thread and buffer: the largest value one warp_gather moves

struct Cta {
  Barrier all;
  std::vector<Barrier> warps;
  std::vector<char> exchange;  // [2 buffers][threads][kSlotBytes]
  std::vector<char> smem_storage;
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
  Cta* cta = nullptr;
  int cluster_rank = 0;
  unsigned exchange_phase = 0;  // which exchange buffer this lane's warp uses next
  std::vector<Copy> open_group;
  std::deque<std::vector<Copy>> committed;
  ucontext_t ctx;
  std::vector<char> stack;
  bool done = false;
};
inline FiberState* current = nullptr;
inline ucontext_t scheduler_ctx;
inline dim3 grid_dim, block_dim;
inline std::vector<Cta>* cluster_ctas = nullptr;  // the CTAs of the running cluster, by rank
inline Barrier* cluster_barrier = nullptr;

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

// Every lane of the calling warp passes `mine`; each receives all 32 values (lane order). One warp
// barrier: the two buffers alternate, and a buffer is rewritten only after every lane has passed the
// next barrier, i.e. finished reading it.
template <typename V>
inline void warp_gather(const V& mine, V (&all)[32]) {
  static_assert(sizeof(V) <= kSlotBytes, "warp_gather slot too small");
  Cta& c = *current->cta;
  const int t = static_cast<int>(current->thread_idx.x), warp = t / 32;
  const size_t threads = c.warps.size() * 32;
  char* buf = c.exchange.data() + (current->exchange_phase & 1) * threads * kSlotBytes;
  ++current->exchange_phase;
  std::memcpy(buf + size_t(t) * kSlotBytes, &mine, sizeof(V));
  barrier_wait(c.warps[warp]);
  for (int l = 0; l < 32; ++l) std::memcpy(&all[l], buf + size_t(warp * 32 + l) * kSlotBytes, sizeof(V));
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

// Starts every fiber of one cluster (CTAs x0, y0 .. y0 + ranks - 1, z) and runs them round-robin, each
// until it blocks at a barrier or finishes.
inline void run_cluster(std::vector<FiberState>& fibers, std::vector<Cta>& ctas, int threads, size_t smem_bytes,
                        dim3 first) {
  for (Cta& c : ctas) std::memset(c.smem, 0xff, smem_bytes);
  for (size_t i = 0; i < fibers.size(); ++i) {
    FiberState& f = fibers[i];
    const int rank = static_cast<int>(i / threads);
    f.thread_idx = dim3(static_cast<unsigned>(i % threads));
    f.block_idx = dim3(first.x, first.y + rank, first.z);
    f.cta = &ctas[rank];
    f.cluster_rank = rank;
    f.exchange_phase = 0;
    f.done = false;
    f.open_group.clear();
    f.committed.clear();
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  for (int live = 1; live > 0;) {
    live = 0;
    for (FiberState& f : fibers) {
      if (f.done) continue;
      current = &f;
      swapcontext(&scheduler_ctx, &f.ctx);
      live += !f.done;
    }
  }
  for (const Cta& c : ctas)
    if (c.all.arrived != 0) std::printf("a CTA finished with threads still waiting at __syncthreads\n");
}

// Runs fn as every CTA of `grid` (`threads` fibers each, `smem_bytes` of dynamic shared memory).
// CTAs whose blockIdx.y differ only inside an aligned group of `cluster_y` form one cluster and run
// together; clusters run one after another.
inline void run_grid(dim3 grid, int threads, size_t smem_bytes, const std::function<void()>& fn,
                     int cluster_y = 1) {
  grid_dim = grid;
  block_dim = dim3(threads);
  fiber_body = &fn;
  std::vector<Cta> ctas(cluster_y);
  Barrier cluster;
  cluster.size = threads * cluster_y;
  cluster_ctas = &ctas;
  cluster_barrier = &cluster;
  for (Cta& c : ctas) {
    c.all.size = threads;
    c.warps.resize((threads + 31) / 32);
    for (Barrier& w : c.warps) w.size = 32;
    c.exchange.resize(2 * c.warps.size() * 32 * kSlotBytes);
    c.smem_storage.resize(smem_bytes + 16);
    c.smem = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(c.smem_storage.data()) + 15) / 16 * 16);
  }
  std::vector<FiberState> fibers(size_t(threads) * cluster_y);
  for (FiberState& f : fibers) f.stack.resize(256 * 1024);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y0 = 0; y0 < grid.y; y0 += cluster_y)
      for (unsigned x = 0; x < grid.x; ++x) run_cluster(fibers, ctas, threads, smem_bytes, dim3(x, y0, z));
  cluster_ctas = nullptr;
  cluster_barrier = nullptr;
}

}  // namespace emu

#define threadIdx (emu::current->thread_idx)
#define blockIdx (emu::current->block_idx)
#define gridDim (emu::grid_dim)
#define blockDim (emu::block_dim)
#define TI_DYNAMIC_SMEM(name) char* name = emu::current->cta->smem

inline void __syncthreads() { emu::barrier_wait(emu::current->cta->all); }
inline void __syncwarp(unsigned /*mask*/ = 0xffffffffu) {
  emu::barrier_wait(emu::current->cta->warps[threadIdx.x / 32]);
}

template <typename V>
inline V __shfl_xor_sync(unsigned /*mask*/, V v, int lane_mask) {
  V all[32];
  emu::warp_gather(v, all);
  return all[(threadIdx.x % 32) ^ lane_mask];
}
template <typename V>
inline V __shfl_sync(unsigned /*mask*/, V v, int src_lane) {
  V all[32];
  emu::warp_gather(v, all);
  return all[src_lane & 31];
}
