// bench_ops.cu: the read ceiling for experiments/kernel_bench.py.
//
// Versions:
//   read_ceiling_kernel1  a read-only reduction: every 16-byte vector of a large buffer is loaded once
//                         (coalesced, 8 independent loads in flight per thread); the only write is a
//                         never-taken branch that keeps the loads alive. bytes / time = the read ceiling.
#include "common.cuh"

// read_ceiling_kernel1:
//   src     [n_vec] 16-byte vectors, read once
//   sink    [1] uint32, written only if the XOR of everything equals `magic` (practically never)
// grid-stride; any grid and block size
extern "C" __global__ void read_ceiling_kernel1(const uint4* __restrict__ src, long long n_vec,
                                                unsigned magic, unsigned* __restrict__ sink) {
  const int UNROLL = 8;
  const long long stride = (long long)gridDim.x * blockDim.x;
  unsigned acc = 0;
  long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  for (; i + (UNROLL - 1) * stride < n_vec; i += UNROLL * stride) {
    uint4 v[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) v[u] = src[i + u * stride];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  for (; i < n_vec; i += stride) {
    const uint4 v = src[i];
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == magic) sink[0] = acc;
}
