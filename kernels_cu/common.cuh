// common.cuh: helpers shared by every pagedkv kernel.
//
// No CUDA header is included on purpose: the same text compiles under NVRTC (cupy.RawModule) and nvcc
// without an include path. Half and bfloat16 values travel as raw 16-bit words (unsigned short); the
// conversions below are single PTX instructions (sm_80+).
//
// Element type codes (template parameter DT), the same numbers pagedkv/kernels/compile.py passes:
//   0 = float32, 1 = float16, 2 = bfloat16
#pragma once

#define PAGEDKV_NEG_INF __int_as_float(0xff800000)

namespace pagedkv {

template <int DT> struct KV;

template <> struct KV<0> {
  typedef float T;
  static __device__ __forceinline__ float to_float(T x) { return x; }
  static __device__ __forceinline__ T from_float(float x) { return x; }
};

template <> struct KV<1> {
  typedef unsigned short T;
  static __device__ __forceinline__ float to_float(T x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
    return f;
  }
  static __device__ __forceinline__ T from_float(float x) {
    T h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
  }
};

template <> struct KV<2> {
  typedef unsigned short T;
  static __device__ __forceinline__ float to_float(T x) { return __uint_as_float(((unsigned)x) << 16); }
  static __device__ __forceinline__ T from_float(float x) {
    T h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
  }
};

// Elements per 16-byte vector: 4 floats or 8 halves.
template <int DT> struct Vec { static const int N = 16 / sizeof(typename KV<DT>::T); };

// Unpack one 16-byte vector into Vec<DT>::N floats.
template <int DT> __device__ __forceinline__ void unpack16(const uint4& v, float* x);

template <> __device__ __forceinline__ void unpack16<0>(const uint4& v, float* x) {
  x[0] = __uint_as_float(v.x); x[1] = __uint_as_float(v.y);
  x[2] = __uint_as_float(v.z); x[3] = __uint_as_float(v.w);
}

template <> __device__ __forceinline__ void unpack16<1>(const uint4& v, float* x) {
  const unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    x[2 * i] = KV<1>::to_float((unsigned short)(w[i] & 0xffffu));
    x[2 * i + 1] = KV<1>::to_float((unsigned short)(w[i] >> 16));
  }
}

template <> __device__ __forceinline__ void unpack16<2>(const uint4& v, float* x) {
  const unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    x[2 * i] = __uint_as_float(w[i] << 16);
    x[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

// c ? a : b without a branch. NOTE: nvcc/NVRTC 13 turned a plain ?: (or an if around a store) next to
// shuffles into two divergent copies of the code, each with its own shuffles (kernel 2's q.k: 1.5x slower,
// 3.3x for the non-butterfly variant); an asm selp is opaque to that transformation.
__device__ __forceinline__ float select(bool c, float a, float b) {
  float r;
  asm("{ .reg .pred p; setp.ne.u32 p, %3, 0; selp.f32 %0, %1, %2, p; }" : "=f"(r) : "f"(a), "f"(b), "r"((unsigned)c));
  return r;
}

__device__ __forceinline__ int select(bool c, int a, int b) {
  int r;
  asm("{ .reg .pred p; setp.ne.u32 p, %3, 0; selp.b32 %0, %1, %2, p; }" : "=r"(r) : "r"(a), "r"(b), "r"((unsigned)c));
  return r;
}

// Loads that bypass L1 (ld.global.cg): data another thread block wrote during this launch.
__device__ __forceinline__ float ld_cg(const float* p) {
  float x;
  asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(x) : "l"(p));
  return x;
}

__device__ __forceinline__ float4 ld_cg4(const float4* p) {
  float4 x;
  asm volatile("ld.global.cg.v4.f32 {%0, %1, %2, %3}, [%4];" : "=f"(x.x), "=f"(x.y), "=f"(x.z), "=f"(x.w) : "l"(p));
  return x;
}

// ---- warp and block reductions ------------------------------------------------------------------

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Block-wide max / sum; `scratch` holds >= 32 floats of shared memory. Every thread gets the result.
template <bool IS_MAX>
__device__ __forceinline__ float block_reduce(float x, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = (blockDim.x + 31) >> 5;
  x = IS_MAX ? warp_max(x) : warp_sum(x);
  __syncthreads();  // NOTE: scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = lane < num_warps ? scratch[lane] : (IS_MAX ? PAGEDKV_NEG_INF : 0.f);
  return IS_MAX ? warp_max(x) : warp_sum(x);
}

// ---- cp.async: 16-byte global -> shared copies that bypass registers (sm_80+) ---------------------

__device__ __forceinline__ unsigned smem_u32(const void* p) {
  unsigned r;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
  return r;
}

// Copy 16 bytes to shared address `dst` (from smem_u32), or write 16 zero bytes when !valid (nothing is
// read from `src` then).
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(dst), "l"(src), "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" :: "n"(N));
}

// The prologue of a paged cp.async ring of STAGES stages (prefill version 2, the cascade kernels, decode
// version 4): the row offsets of tiles 0 .. STAGES - 1 (load_id(n) reads tile n's block ids, store_offset(n)
// keeps their offsets in shared memory; past num_tiles every row is past the end and gets -1), a barrier, then
// tiles 0 .. STAGES - 2 in flight, one cp.async group each (empty groups past num_tiles keep the group count
// per iteration fixed for cp_async_wait<STAGES - 2> in the tile loop).
template <int STAGES, class LoadId, class StoreOffset, class Issue>
__device__ __forceinline__ void ring_prologue(int num_tiles, LoadId&& load_id, StoreOffset&& store_offset,
                                              Issue&& issue) {
#pragma unroll
  for (int s = 0; s < STAGES; ++s) {
    load_id(s);
    store_offset(s);
  }
  __syncthreads();
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < num_tiles) issue(s);
    cp_async_commit();
  }
}

// The head of iteration n of that ring's tile loop: wait until tile n has landed (one group per iteration) for
// every thread, so the stage read in iteration n - 1 is free; issue tile n + STAGES - 1 into it; read the
// block ids of tile n + STAGES. Returns whether that tile exists: the loop stores its offsets at the end of
// the iteration (store_offset), after every thread has issued from the slot they replace.
template <int STAGES, class LoadId, class Issue>
__device__ __forceinline__ bool ring_step(int n, int num_tiles, LoadId&& load_id, Issue&& issue) {
  cp_async_wait<STAGES - 2>();
  __syncthreads();
  if (n + STAGES - 1 < num_tiles) issue(n + STAGES - 1);
  cp_async_commit();
  const bool more = n + STAGES < num_tiles;
  if (more) load_id(n + STAGES);
  return more;
}

}  // namespace pagedkv
