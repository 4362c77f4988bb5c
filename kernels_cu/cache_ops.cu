// cache_ops.cu: writes into the paged KV cache and block copies for copy-on-write.
//
// Versions:
//   write_kv_kernel1      one thread block per token; copies its K and V rows into slot_mapping[token]
//   copy_blocks_kernel1   one thread block per (pair, layer, K|V); copies one whole block, every layer in
//                         one launch
//   check_index_kernel    one reduction over an index array: the first entry outside [lo, hi) (GPU-side
//                         range check used by the launchers; one small device->host read)
//
// Every kernel moves raw words of type W (16, 4 or 2 bytes): the launcher picks the widest word that
// divides a row, so the copies are dtype-agnostic and use 16-byte loads whenever the rows allow it.
// Offsets are 64-bit: pools outgrow 2^31 elements.
#include "common.cuh"

// write_kv_kernel1: write each token's K and V rows into its cache slot (slot -1: skip).
//   k_cache, v_cache  [num_blocks, num_kv_heads, block_size, row_words]  (W words; one layer)
//   k, v              [num_tokens, num_kv_heads, row_words], C-contiguous
//   slot_mapping      [num_tokens] int64, block_id * block_size + offset, or -1
// grid: (num_tokens), block: any multiple of 32
template <typename W>
__device__ __forceinline__ void write_kv_kernel1(W* __restrict__ k_cache, W* __restrict__ v_cache,
                                                 const W* __restrict__ k, const W* __restrict__ v,
                                                 const long long* __restrict__ slot_mapping,
                                                 int num_kv_heads, int block_size, int row_words) {
  const long long token = blockIdx.x;
  const long long slot = slot_mapping[token];
  if (slot < 0) return;
  const long long block = slot / block_size, offset = slot % block_size;
  const int n = num_kv_heads * row_words;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const int head = i / row_words, w = i - head * row_words;
    const long long src = (token * num_kv_heads + head) * row_words + w;
    const long long dst = ((block * num_kv_heads + head) * block_size + offset) * row_words + w;
    k_cache[dst] = k[src];
    v_cache[dst] = v[src];
  }
}

// copy_blocks_kernel1: pool[layer, dst[i]] = pool[layer, src[i]] for every layer, K and V.
//   k_pool, v_pool    [num_layers, num_blocks, block_words]  (W words; block_words = heads*block_size*head_dim)
//   src_ids, dst_ids  [num_pairs] int64
// grid: (num_pairs, num_layers, 2), blockIdx.z = 0 for K, 1 for V
template <typename W>
__device__ __forceinline__ void copy_blocks_kernel1(W* __restrict__ k_pool, W* __restrict__ v_pool,
                                                    const long long* __restrict__ src_ids,
                                                    const long long* __restrict__ dst_ids,
                                                    long long num_blocks, long long block_words) {
  W* pool = blockIdx.z == 0 ? k_pool : v_pool;
  const long long layer_base = (long long)blockIdx.y * num_blocks;
  const W* src = pool + (layer_base + src_ids[blockIdx.x]) * block_words;
  W* dst = pool + (layer_base + dst_ids[blockIdx.x]) * block_words;
  for (long long i = threadIdx.x; i < block_words; i += blockDim.x) dst[i] = src[i];
}

#define PAGEDKV_CACHE_OPS(SUFFIX, W)                                                                 \
  extern "C" __global__ void write_kv_##SUFFIX(W* k_cache, W* v_cache, const W* k, const W* v,       \
                                               const long long* slot_mapping, int num_kv_heads,      \
                                               int block_size, int row_words) {                      \
    write_kv_kernel1<W>(k_cache, v_cache, k, v, slot_mapping, num_kv_heads, block_size, row_words);  \
  }                                                                                                  \
  extern "C" __global__ void copy_blocks_##SUFFIX(W* k_pool, W* v_pool, const long long* src_ids,    \
                                                  const long long* dst_ids, long long num_blocks,    \
                                                  long long block_words) {                           \
    copy_blocks_kernel1<W>(k_pool, v_pool, src_ids, dst_ids, num_blocks, block_words);               \
  }

PAGEDKV_CACHE_OPS(w16, uint4)
PAGEDKV_CACHE_OPS(w4, unsigned int)
PAGEDKV_CACHE_OPS(w2, unsigned short)

// check_index_kernel: bad[0] = min i such that ids[i] is outside [lo, hi), else left as is.
//   ids   [n] int64;  bad  [1] int64, set to n (or larger) by the caller before the launch
// grid-stride; one atomicMin per bad entry.
extern "C" __global__ void check_index_kernel(const long long* __restrict__ ids, long long n, long long lo,
                                              long long hi, unsigned long long* __restrict__ bad) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    const long long x = ids[i];
    if (x < lo || x >= hi) atomicMin(bad, (unsigned long long)i);
  }
}
