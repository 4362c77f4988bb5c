// cache_ops.cu: writes into the paged KV cache and block copies for copy-on-write.
//
// Versions:
//   write_kv_kernel1      one thread block per token; copies its K and V rows into slot_mapping[token]
//   write_kv_fp8_kernel   write_kv_kernel1 quantizing to fp8 (e4m3 / e5m2): q = fp8(sat(x / scale)),
//                         round-to-nearest-even, saturated to the format's finite max (no inf / NaN from
//                         finite input); 8 elements per thread step (one 16-, 32- or 8-byte load, an
//                         8-byte store)
//   copy_blocks_kernel1   one thread block per (pair, layer, K|V); copies one whole block, every layer in
//                         one launch
//   dequant_gather_fp8_kernel  the fp8 blocks a prefill reads, gathered into a 16-bit scratch pool in table
//                         order (scratch block i * max_blocks + j = sequence i's j-th block), each element
//                         DT(fp8 * mul): the Hopper prefill kernels (16-bit caches only) then run over it
//   check_index_kernel    one reduction over an index array: the first entry outside [lo, hi) (GPU-side
//                         range check used by the launchers; one small device->host read)
//
// The copies move raw words of type W (16, 4, 2 or 1 bytes): the launcher picks the widest word that
// divides a row, so they are dtype-agnostic (fp8 pools are uint8 bytes) and use 16-byte loads whenever
// the rows allow it.
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
PAGEDKV_CACHE_OPS(w1, unsigned char)

// ---- fp8 quantization (sm_89+: cvt to e4m3x2 / e5m2x2) ---------------------------------------------
// Format codes (template parameter FMT), the same numbers pagedkv/fp8.py passes: 1 = e4m3 (e4m3fn: no inf,
// finite max 448), 2 = e5m2 (finite max 57344).

// Two floats -> two fp8 bytes, `lo` in the low byte; .satfinite: a magnitude past the finite max (inf
// included) becomes the finite max with its sign, NaN stays NaN. Round to nearest even.
// NOTE: below sm_89 this file must still compile (its other kernels run there): the conversion is then a
// trap, never reached (the launchers refuse fp8 on such a GPU first).
template <int FMT>
__device__ __forceinline__ unsigned short fp8x2_from_float(float lo, float hi) {
  unsigned short r = 0;
#if __CUDA_ARCH__ >= 890
  if constexpr (FMT == 1) asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
  else asm("cvt.rn.satfinite.e5m2x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
#else
  __trap();
#endif
  return r;
}

// x / y, IEEE round to nearest (what the host's float32 division computes), whatever the compile flags.
__device__ __forceinline__ float div_rn(float x, float y) {
  float r;
  asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(x), "f"(y));
  return r;
}

// Eight consecutive input elements of type KV<DT>::T as floats (two 16-byte loads for float32, one for
// 16-bit types).
template <int DT>
__device__ __forceinline__ void load8(const typename pagedkv::KV<DT>::T* p, float* x) {
  if constexpr (DT == 0) {
    const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
    x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w; x[4] = b.x; x[5] = b.y; x[6] = b.z; x[7] = b.w;
  } else {
    pagedkv::unpack16<DT>(*reinterpret_cast<const uint4*>(p), x);
  }
}

// write_kv_fp8_kernel: write_kv_kernel1 with quantization. Stored byte = fp8(sat(x / scale)) (x / scale
// rounded to float32 first, IEEE division (div.rn.f32), as the host reference does).
//   k_cache, v_cache  [num_blocks, num_kv_heads, block_size, head_dim] uint8 (fp8 bytes; one layer)
//   k, v              [num_tokens, num_kv_heads, head_dim] KV<DT>::T, C-contiguous, 16-byte aligned
//   slot_mapping      [num_tokens] int64, block_id * block_size + offset, or -1
//   k_scale, v_scale  finite, > 0
// grid: (num_tokens), block: any multiple of 32; head_dim % 8 == 0
template <int DT, int FMT>
__device__ __forceinline__ void write_kv_fp8_kernel(unsigned char* __restrict__ k_cache,
                                                    unsigned char* __restrict__ v_cache,
                                                    const typename pagedkv::KV<DT>::T* __restrict__ k,
                                                    const typename pagedkv::KV<DT>::T* __restrict__ v,
                                                    const long long* __restrict__ slot_mapping, int num_kv_heads,
                                                    int block_size, int head_dim, float k_scale, float v_scale) {
  const long long token = blockIdx.x;
  const long long slot = slot_mapping[token];
  if (slot < 0) return;
  const long long block = slot / block_size, offset = slot % block_size;
  const int row_groups = head_dim / 8, n = num_kv_heads * row_groups;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const int head = i / row_groups, e = (i - head * row_groups) * 8;
    const long long src = (token * num_kv_heads + head) * head_dim + e;
    const long long dst = ((block * num_kv_heads + head) * block_size + offset) * head_dim + e;
#pragma unroll
    for (int kv = 0; kv < 2; ++kv) {  // K, then V
      float x[8];
      load8<DT>((kv == 0 ? k : v) + src, x);
      const float scale = kv == 0 ? k_scale : v_scale;
      unsigned short b[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = fp8x2_from_float<FMT>(div_rn(x[2 * j], scale), div_rn(x[2 * j + 1], scale));
      *reinterpret_cast<uint2*>((kv == 0 ? k_cache : v_cache) + dst) =
          make_uint2(b[0] | ((unsigned)b[1] << 16), b[2] | ((unsigned)b[3] << 16));
    }
  }
}

#define PAGEDKV_WRITE_KV_FP8(SUFFIX, DT, FMT)                                                            \
  extern "C" __global__ void write_kv_fp8_##SUFFIX(                                                     \
      unsigned char* k_cache, unsigned char* v_cache, const pagedkv::KV<DT>::T* k,                       \
      const pagedkv::KV<DT>::T* v, const long long* slot_mapping, int num_kv_heads, int block_size,     \
      int head_dim, float k_scale, float v_scale) {                                                      \
    write_kv_fp8_kernel<DT, FMT>(k_cache, v_cache, k, v, slot_mapping, num_kv_heads, block_size, head_dim, \
                                 k_scale, v_scale);                                                      \
  }

PAGEDKV_WRITE_KV_FP8(f32_e4m3, 0, 1)
PAGEDKV_WRITE_KV_FP8(f16_e4m3, 1, 1)
PAGEDKV_WRITE_KV_FP8(bf16_e4m3, 2, 1)
PAGEDKV_WRITE_KV_FP8(f32_e5m2, 0, 2)
PAGEDKV_WRITE_KV_FP8(f16_e5m2, 1, 2)
PAGEDKV_WRITE_KV_FP8(bf16_e5m2, 2, 2)

// Two fp8 bytes (`lo` the low byte) -> two floats, exactly (every e4m3 / e5m2 value, NaN included, is a float16).
template <int FMT>
__device__ __forceinline__ float2 fp8x2_to_float2(unsigned short x) {
  unsigned h = 0;
#if __CUDA_ARCH__ >= 890
  if constexpr (FMT == 1) asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h) : "h"(x));
  else asm("cvt.rn.f16x2.e5m2x2 %0, %1;" : "=r"(h) : "h"(x));
#else
  __trap();
#endif
  return make_float2(pagedkv::KV<1>::to_float((unsigned short)(h & 0xffffu)),
                     pagedkv::KV<1>::to_float((unsigned short)(h >> 16)));
}

// dequant_gather_fp8_kernel: scratch[i * max_blocks + j] = DT(cache[block_tables[i, j]] * mul) for every block
// j < ceil(context_lens[i] / block_size) of every sequence i with new tokens (query_start_loc[i+1] >
// query_start_loc[i]: the blocks prefill reads; other scratch blocks are left as they are, never read).
//   k_out, v_out      [num_seqs * max_blocks, num_kv_heads, block_size, head_dim] KV<DT>::T
//   k_cache, v_cache  [num_blocks, num_kv_heads, block_size, head_dim] uint8 (fp8 bytes)
//   k_mul, v_mul      the factor of each element (the launcher folds k_scale into the softmax scale: k_mul 1)
// grid: (max_blocks, num_seqs, 2), blockIdx.z = 0 for K, 1 for V; block: any multiple of 32;
// block_bytes (= num_kv_heads * block_size * head_dim) % 8 == 0; 8 bytes in, 16 (16-bit DT) out per step
template <int DT, int FMT>
__device__ __forceinline__ void dequant_gather_fp8_kernel(
    typename pagedkv::KV<DT>::T* __restrict__ k_out, typename pagedkv::KV<DT>::T* __restrict__ v_out,
    const unsigned char* __restrict__ k_cache, const unsigned char* __restrict__ v_cache,
    const int* __restrict__ block_tables, const int* __restrict__ query_start_loc,
    const int* __restrict__ context_lens, int max_blocks, int block_size, long long block_bytes, float k_mul,
    float v_mul) {
  static_assert(DT == 1 || DT == 2, "16-bit outputs only");
#if __CUDA_ARCH__ >= 890  // NOTE: no fp8 below sm_89 (the launcher refuses first); cvt to bfloat16 needs sm_80
  const int seq = blockIdx.y, j = blockIdx.x;
  if (query_start_loc[seq + 1] <= query_start_loc[seq] || (long long)j * block_size >= context_lens[seq]) return;
  const long long dst_block = (long long)seq * max_blocks + j;
  const long long src_block = block_tables[dst_block];
  const bool is_v = blockIdx.z == 1;
  const float mul = is_v ? v_mul : k_mul;
  const uint2* src = reinterpret_cast<const uint2*>((is_v ? v_cache : k_cache) + src_block * block_bytes);
  uint4* dst = reinterpret_cast<uint4*>((is_v ? v_out : k_out) + dst_block * block_bytes);
  for (long long i = threadIdx.x; i < block_bytes / 8; i += blockDim.x) {
    const uint2 raw = src[i];
    const unsigned short b[4] = {(unsigned short)(raw.x & 0xffffu), (unsigned short)(raw.x >> 16),
                                 (unsigned short)(raw.y & 0xffffu), (unsigned short)(raw.y >> 16)};
    unsigned w[4];
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      const float2 f = fp8x2_to_float2<FMT>(b[p]);
      w[p] = pagedkv::KV<DT>::from_float(f.x * mul) | ((unsigned)pagedkv::KV<DT>::from_float(f.y * mul) << 16);
    }
    dst[i] = make_uint4(w[0], w[1], w[2], w[3]);
  }
#else
  __trap();
#endif
}

#define PAGEDKV_DEQUANT_GATHER_FP8(SUFFIX, DT, FMT)                                                        \
  extern "C" __global__ void dequant_gather_fp8_##SUFFIX(                                                 \
      pagedkv::KV<DT>::T* k_out, pagedkv::KV<DT>::T* v_out, const unsigned char* k_cache,                  \
      const unsigned char* v_cache, const int* block_tables, const int* query_start_loc,                   \
      const int* context_lens, int max_blocks, int block_size, long long block_bytes, float k_mul,         \
      float v_mul) {                                                                                       \
    dequant_gather_fp8_kernel<DT, FMT>(k_out, v_out, k_cache, v_cache, block_tables, query_start_loc,      \
                                       context_lens, max_blocks, block_size, block_bytes, k_mul, v_mul);   \
  }

PAGEDKV_DEQUANT_GATHER_FP8(f16_e4m3, 1, 1)
PAGEDKV_DEQUANT_GATHER_FP8(bf16_e4m3, 2, 1)
PAGEDKV_DEQUANT_GATHER_FP8(f16_e5m2, 1, 2)
PAGEDKV_DEQUANT_GATHER_FP8(bf16_e5m2, 2, 2)

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
