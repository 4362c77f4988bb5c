// paged_attention.cu: decode attention (one query token per sequence) over a paged KV cache.
//
// Versions:
//   paged_attention_v1_kernel  two passes, correctness first. One thread block per (query head, sequence);
//                              pass 1 writes every q.k score to a global scratch row and finds the max,
//                              pass 2 turns the scores into probabilities and sums probability * V.
//   paged_attention_v2_kernel  one pass, tuned. One thread block per (head group, partition, sequence):
//                              K/V tiles are staged into shared memory with 16-byte cp.async in a
//                              multi-stage pipeline, softmax is online (running max and sum, the accumulator
//                              rescaled), fp32 accumulation, and every query head of a GQA group is served
//                              from the same K/V read. Split-K from the table's capacity: every sequence is
//                              cut into the same number of partitions (host-side plan);
//                              paged_attention_v2_reduce_kernel merges them by log-sum-exp.
//   paged_attention_v3_kernel  kernel 2's tile loop in a persistent grid with a batch-balanced plan made on
//                              the device from context_lens (picture below): one thread block per resident
//                              slot, each streams an equal share of the batch's K/V tiles, crossing from one
//                              sequence to the next without draining its pipeline; only sequences cut
//                              between blocks are merged, in the same launch, by the block whose piece of
//                              the sequence finishes last. Its `mode` argument: 3 = that walk (version 3);
//                              2 = the partition plan: kernel 2's per-item loop (sequence, head group,
//                              partition of part_tokens) over the same persistent grid, items from an atomic
//                              queue, split sequences merged by their last partition (no second launch);
//                              0 = the dispatcher (the default): every block computes the same choice from
//                              context_lens (near-uniform lengths or small pieces -> 2, else 3), so a captured
//                              CUDA graph chooses again at every replay.
//   Kernels 2 and 3 read float32/float16/bfloat16 caches, or fp8 (e4m3, e5m2) caches of raw bytes under
//   float16/bfloat16 queries (template parameter CT, dequantized in registers: CacheType below).
//   check_block_tables_kernel  GPU-side range check of block_tables / context_lens (one reduction).
//
// The balanced plan of kernel 3, computed again by every thread block from context_lens (so a captured CUDA
// graph replays with new lengths; the grid depends on the device and shapes only). Work units are tiles
// (TILE_TOKENS tokens of one sequence for one head group of GT query heads), laid end to end head
// group-major, and cut into equal runs of K units, one run per resident thread block:
//
//     unit    0      7      14     21     28     35
//             |      |      |      |      |      |
//     items   aaaaabbcccccccccdddaaaaabbcccccccccddd     a..d: sequences 0..3 of 5, 2, 9 and 3 tiles,
//             <-- head group 0 -><-- head group 1 ->     for head groups 0 and 1: 38 units
//     blocks  [  0  ][  1  ][  2  ][  3  ][  4  ][5]     6 blocks, K = max(ceil(38 / 6), min_tiles) = 7
//
//   Block b streams units [b*K, (b+1)*K) through one cp.async pipeline. a and b of head group 0 lie inside
//   block 0: written directly. c of head group 0 is cut over blocks 1 and 2 (a long sequence gets as many
//   pieces as its length needs; a short one usually one): each piece leaves an unnormalised partial
//   (max, sum, sum p*V) in slot 2*block + (piece starts the sequence ? 1 : 0), here slots 3 and 4, and the
//   block whose piece finishes last merges them (counters[1], the sequence's first block, counts pieces).
//   Merges here: c/hg 0 (blocks 1-2), a/hg 1 (blocks 2-3), c/hg 1 (blocks 3-4). Only a block's first and
//   last pieces can belong to split sequences, hence two partial slots per block.
//   (tests/test_kernels.py::test_balanced_plan_picture checks these numbers; pagedkv.kernels.decode_plan mirrors
//   the plan on the host.)
//
// Compile-time options (-D, one cached module per set; pagedkv/kernels/decode_plan.py mirrors the defaults):
//   PAGEDKV_V2_TILE_BYTES (4096) and PAGEDKV_V2_STAGES (4): tile size and cp.async pipeline depth (kernels
//   2 and 3); PAGEDKV_V2_BUTTERFLY (1): reduce-scatter shuffles for the GQA dots; PAGEDKV_V2_LAZY_RESCALE (1).
//   Measurements behind the defaults: NOTES.md.
//
// Layouts (one layer):
//   q             [batch, num_qo_heads, HEAD_DIM]
//   k_cache       [num_blocks, num_kv_heads, block_size, HEAD_DIM]    (v_cache alike), C-contiguous
//   block_tables  [batch, max_blocks] int32; entries past a sequence's ceil(len / block_size) are never read
//   context_lens  [batch] int32, in [1, max_blocks * block_size]
//   out           [batch, num_qo_heads, HEAD_DIM]
// Query head h reads KV head h / (num_qo_heads / num_kv_heads). block_size is a power of two (passed as
// its log2). Block ids are widened to 64 bits before they are multiplied into offsets. HEAD_DIM is any
// multiple of 16 up to 256 (pagedkv.kernels.HEAD_DIMS lists the instantiated ones).
#include "common.cuh"
#include "split_merge.cuh"

#ifndef PAGEDKV_V2_TILE_BYTES
#define PAGEDKV_V2_TILE_BYTES 4096  // target bytes of K (and of V) per pipeline stage
#endif
#ifndef PAGEDKV_V2_STAGES
#define PAGEDKV_V2_STAGES 4         // pipeline depth: STAGES - 1 tiles are in flight while one is used
#endif
#ifndef PAGEDKV_V2_BUTTERFLY
#define PAGEDKV_V2_BUTTERFLY 1      // q.k row sums by reduce-scatter shuffles (0: one shuffle tree per head)
#endif
#ifndef PAGEDKV_V2_LAZY_RESCALE
#define PAGEDKV_V2_LAZY_RESCALE 1   // skip the accumulator rescale when the running max did not move
#endif
#define PAGEDKV_V1_THREADS 128
#define PAGEDKV_V2_THREADS 128      // kernels 2 and 3
#define PAGEDKV_REDUCE_THREADS 256  // kernel 2's split-K merge
#define PAGEDKV_MERGE_THREADS 128   // kernel 3's merge
#define PAGEDKV_MIN_PART_TOKENS 256 // the partition plan (kernel 3's mode 2) never cuts pieces shorter than this

// NOTE: min blocks per SM caps registers (4 blocks: <= 128 registers for GT <= 4; 3 blocks for GT = 8,
// 2 for GT = 8 with head_dim >= 160, which spilled at the 3-block cap); with the cap ptxas reports no
// spills for any instantiation (tests/test_kernels_compile.py checks it).
#define PAGEDKV_V2_MIN_BLOCKS(HEAD_DIM, GT) ((GT) <= 4 ? 4 : ((HEAD_DIM) >= 160 ? 2 : 3))
// Kernel 3 holds more values across its tile loop (the walk, the in-kernel merge); at the 3-block cap
// (168 registers) its 16-bit GT = 8 instantiations spilled 4-36 bytes (sm_80, sm_90): they get 2 blocks.
#define PAGEDKV_V3_MIN_BLOCKS(DT, HEAD_DIM, GT) ((GT) <= 4 ? 4 : ((DT) != 0 || (HEAD_DIM) >= 160 ? 2 : 3))

using pagedkv::KV;

// ---- cache element types of kernels 2 and 3 (template parameter CT) ------------------------------
// CT = DT for float32 / float16 / bfloat16 caches (codes 0, 1, 2); 3 = fp8 e4m3 (e4m3fn), 4 = fp8 e5m2, with
// q and out float16 or bfloat16. An fp8 cache holds raw bytes: x = float(byte) * scale (per-layer k_scale,
// v_scale). The math reads a tile row in "math vectors" of VEC = 8 elements (4 for float32): 16 bytes of a
// 16-bit cache, 8 bytes of an fp8 one, so q and the accumulator take the same registers for every cache
// type; the copies into shared memory always move 16 bytes (16 fp8 elements).
//
// Dequantization in registers, exact for every finite byte:
//   e5m2: the byte is the top byte of the float16 with the same value (same exponent bias, 2 mantissa
//         bits): one byte permute gives two halves.
//   e4m3: byte s.eeee.mmm -> float16 bits s.0eeee.mmm0000000 (permute, shift, lop3) is the value times 2^-8
//         (subnormals included: float16 subnormals are exact); the 2^8 (UNIT) is folded into the k scale
//         (q's pre-scale) and the v scale (the output). PAGEDKV_FP8_HW_CVT=1 uses the sm_89+ conversion
//         instruction cvt.rn.f16x2.e4m3x2 instead (UNIT 1; NaN bytes stay NaN).
// Then float16 -> float32 (cvt.f32.f16) per element, as for a float16 cache.
#ifndef PAGEDKV_FP8_HW_CVT
#define PAGEDKV_FP8_HW_CVT 0
#endif
#if PAGEDKV_FP8_HW_CVT && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
#define PAGEDKV_E4M3_HW 1
#else
#define PAGEDKV_E4M3_HW 0
#endif

__device__ __forceinline__ unsigned byte_perm(unsigned x, unsigned sel) {
  unsigned r;
  asm("prmt.b32 %0, %1, 0, %2;" : "=r"(r) : "r"(x), "r"(sel));
  return r;
}

// two float16 (a packed pair) -> two floats
__device__ __forceinline__ void half2_to_float2(unsigned h, float& lo, float& hi) {
  lo = KV<1>::to_float((unsigned short)(h & 0xffffu));
  hi = KV<1>::to_float((unsigned short)(h >> 16));
}

template <int CT> struct CacheType {  // float32 / float16 / bfloat16: the math vector is one 16-byte load
  typedef typename KV<CT>::T T;
  typedef uint4 MathVec;
  static const int EB = sizeof(T);        // bytes per element
  static const int VEC = 16 / EB;         // elements per math vector
  static __device__ __forceinline__ float unit() { return 1.f; }
  static __device__ __forceinline__ void unpack(const MathVec& v, float* x) { pagedkv::unpack16<CT>(v, x); }
};

template <> struct CacheType<3> {  // fp8 e4m3
  typedef unsigned char T;
  typedef uint2 MathVec;
  static const int EB = 1, VEC = 8;
  static __device__ __forceinline__ float unit() { return PAGEDKV_E4M3_HW ? 1.f : 256.f; }
  static __device__ __forceinline__ unsigned to_half2(unsigned w, unsigned sel) {  // bytes of sel -> 2 halves
#if PAGEDKV_E4M3_HW
    unsigned h;
    const unsigned short pair = (unsigned short)byte_perm(w, sel);
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h) : "h"(pair));
    return h;
#else
    const unsigned d = byte_perm(w, sel == 0x10 ? 0x1404u : 0x3424u);  // [0, b_lo, 0, b_hi]
    return (d & 0x80008000u) | ((d >> 1) & 0x3f803f80u);
#endif
  }
  static __device__ __forceinline__ void unpack(const MathVec& v, float* x) {
    const unsigned w[2] = {v.x, v.y};
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      half2_to_float2(to_half2(w[i], 0x10), x[4 * i], x[4 * i + 1]);
      half2_to_float2(to_half2(w[i], 0x32), x[4 * i + 2], x[4 * i + 3]);
    }
  }
};

template <> struct CacheType<4> {  // fp8 e5m2
  typedef unsigned char T;
  typedef uint2 MathVec;
  static const int EB = 1, VEC = 8;
  static __device__ __forceinline__ float unit() { return 1.f; }
  static __device__ __forceinline__ void unpack(const MathVec& v, float* x) {
    const unsigned w[2] = {v.x, v.y};
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      half2_to_float2(byte_perm(w[i], 0x1404u), x[4 * i], x[4 * i + 1]);
      half2_to_float2(byte_perm(w[i], 0x3424u), x[4 * i + 2], x[4 * i + 3]);
    }
  }
};

// q/out type DT with cache type CT: the same type, or an fp8 cache under float16/bfloat16 queries
template <int DT, int CT> struct ValidPair {
  static const bool value = DT == CT || ((CT == 3 || CT == 4) && (DT == 1 || DT == 2));
};

// Address of token `token` of a sequence, head `kv_head`, in a [num_blocks, num_kv_heads, bs, HEAD_DIM] cache.
//
//   logical token t ──► block_table[t / bs] = physical block b ──► cache[b, kv_head, t % bs, :]
//
// The only difference from dense attention: the K/V row of token t is found through one indirection.
template <int HEAD_DIM>
__device__ __forceinline__ long long token_offset(const int* block_table, int token, int kv_head,
                                                  int num_kv_heads, int log2_block_size) {
  const long long block = block_table[token >> log2_block_size];  // widen before multiplying
  const int in_block = token & ((1 << log2_block_size) - 1);
  return (((block * num_kv_heads + kv_head) << log2_block_size) + in_block) * HEAD_DIM;
}

// ================================================================================================
// paged_attention_v1_kernel: two-pass decode attention, one thread block per (query head, sequence).
//   out          [batch, num_qo_heads, HEAD_DIM]
//   logits       [batch, num_qo_heads, max_context] float32 scratch (max_context = max_blocks * block_size)
//   q, k_cache, v_cache, block_tables, context_lens: see the file header
//   scale        softmax scale (usually HEAD_DIM ** -0.5)
// grid: (num_qo_heads, batch), block: PAGEDKV_V1_THREADS
// ================================================================================================
template <int DT, int HEAD_DIM>
__global__ void __launch_bounds__(PAGEDKV_V1_THREADS)
paged_attention_v1_kernel(typename KV<DT>::T* __restrict__ out, float* __restrict__ logits,
                          const typename KV<DT>::T* __restrict__ q,
                          const typename KV<DT>::T* __restrict__ k_cache,
                          const typename KV<DT>::T* __restrict__ v_cache,
                          const int* __restrict__ block_tables, const int* __restrict__ context_lens,
                          int num_qo_heads, int num_kv_heads, int log2_block_size, int max_blocks,
                          float scale) {
  typedef KV<DT> kv;
  __shared__ float s_q[HEAD_DIM];
  __shared__ float s_red[32];
  const int head = blockIdx.x, seq = blockIdx.y;
  const int kv_head = head / (num_qo_heads / num_kv_heads);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = PAGEDKV_V1_THREADS / 32;
  const int context_len = context_lens[seq];
  const int* block_table = block_tables + (long long)seq * max_blocks;
  float* row = logits + ((long long)seq * num_qo_heads + head) * ((long long)max_blocks << log2_block_size);

  // load q (scaled) into shared memory
  for (int d = threadIdx.x; d < HEAD_DIM; d += PAGEDKV_V1_THREADS)
    s_q[d] = kv::to_float(q[((long long)seq * num_qo_heads + head) * HEAD_DIM + d]) * scale;
  __syncthreads();

  // pass 1: one warp per token; lane i reads dims i, i+32, ... of that token's K row (coalesced)
  float local_max = PAGEDKV_NEG_INF;
  for (int t = warp; t < context_len; t += num_warps) {
    const typename kv::T* k = k_cache + token_offset<HEAD_DIM>(block_table, t, kv_head, num_kv_heads,
                                                               log2_block_size);
    float dot = 0.f;
#pragma unroll
    for (int d = lane; d < HEAD_DIM; d += 32) dot += s_q[d] * kv::to_float(k[d]);
    dot = pagedkv::warp_sum(dot);
    if (lane == 0) row[t] = dot;
    local_max = fmaxf(local_max, dot);
  }
  const float max_logit = pagedkv::block_reduce<true>(local_max, s_red);  // also orders row[] writes

  // pass 2a: probabilities exp(s - max) and their sum
  float local_sum = 0.f;
  for (int t = threadIdx.x; t < context_len; t += PAGEDKV_V1_THREADS) {
    const float p = expf(row[t] - max_logit);
    row[t] = p;
    local_sum += p;
  }
  const float inv_sum = 1.f / pagedkv::block_reduce<false>(local_sum, s_red);

  // pass 2b: out[d] = sum_t p[t] * V[t, d]; thread d walks the tokens (reads of one V row are coalesced)
  for (int d = threadIdx.x; d < HEAD_DIM; d += PAGEDKV_V1_THREADS) {
    float acc = 0.f;
    for (int t = 0; t < context_len; ++t) {
      const typename kv::T* v = v_cache + token_offset<HEAD_DIM>(block_table, t, kv_head, num_kv_heads,
                                                                 log2_block_size);
      acc += row[t] * kv::to_float(v[d]);
    }
    out[((long long)seq * num_qo_heads + head) * HEAD_DIM + d] = kv::from_float(acc * inv_sum);
  }
}

// ================================================================================================
// The tile machinery of kernels 2 and 3.
//
// A tile is TILE_TOKENS rows (tokens) of K, and the same of V, in shared memory row after row. The copies
// move flat 16-byte vectors (CVPR = row bytes / 16 per row); the math reads a row as VPR math vectors of VEC
// elements (CacheType: 16 bytes of a 16/32-bit cache, 8 bytes of an fp8 one).
// Thread layout for the math: lane_col = tid % LPR owns vectors lane_col + j*LPR (j < CPT) of each row it
// touches; row group rg = tid / LPR handles rows rg, rg + RG, ...  LPR (lanes per row) is the power of two
// >= VPR, capped at 32, so a row's partial dots meet by xor shuffles inside an LPR-lane group.
// NOTE: when VPR is not a power of two (head_dim 80, 96, 112, 160, 192: 10, 12, 14, 20, 24 vectors of
// half precision) the lanes past VPR idle in the math (up to 3/8 of them, at 80 and 160); the copies
// into shared memory use every thread (flat vector index), so the bytes in flight do not shrink. The
// alternative, LPR = the largest power of two dividing VPR, keeps every lane busy but gives 32-64 row
// groups and a cross-row-group reduction 4-8x larger.
// ================================================================================================
template <int CT, int HEAD_DIM>
struct TileShape {
  static const int EB = CacheType<CT>::EB;                     // bytes per cache element
  static const int VEC = CacheType<CT>::VEC;                   // elements per math vector
  static const int VPR = HEAD_DIM / VEC;                       // math vectors per K/V row
  static const int CVEC = 16 / EB;                             // elements per 16-byte copy
  static const int CVPR = HEAD_DIM * EB / 16;                  // 16-byte copies per row
  static const int LPR = VPR > 16 ? 32 : VPR > 8 ? 16 : VPR > 4 ? 8 : VPR > 2 ? 4 : 2;  // lanes per row
  static const int CPT = (VPR + LPR - 1) / LPR;                // vectors per lane per row
  static const bool PADDED = CPT * LPR != VPR;                 // some lanes idle in the last column
  static const int RG = PAGEDKV_V2_THREADS / LPR;              // row groups
  static const int ROW_GROUP_BYTES = HEAD_DIM * EB * RG;
  static const int ROWS_RAW = (PAGEDKV_V2_TILE_BYTES + ROW_GROUP_BYTES / 2) / ROW_GROUP_BYTES;
  static const int ROWS = ROWS_RAW < 1 ? 1 : ROWS_RAW;        // rows per thread per tile
  static const int TILE_TOKENS = ROWS * RG;
  static const int TILE_VECS = TILE_TOKENS * CVPR;             // 16-byte copies per tile (K or V)
  static const int LOADS = (TILE_VECS + PAGEDKV_V2_THREADS - 1) / PAGEDKV_V2_THREADS;  // cp.async per thread
  static const int SR = (TILE_TOKENS + 31) / 32;               // softmax rows per lane
  static_assert(HEAD_DIM % 16 == 0 && VPR >= 2 && VPR <= 64, "head_dim: a multiple of 16 up to 256");
};

// Issue the 16-byte copies of one K tile and one V tile: rows t0 .. t0 + TILE_TOKENS - 1 of a sequence,
// rows at or past `end` zero-filled (nothing read). Thread tid copies flat vectors tid, tid + THREADS, ...
//   s_dst        shared address (smem_u32) of the stage's K tile; its V tile is v_delta bytes further
//   head_off     kv_head * block_size * HEAD_DIM (elements);  block_elems = num_kv_heads * block_size * HEAD_DIM
template <int CT, int HEAD_DIM>
__device__ __forceinline__ void issue_kv_tile(unsigned s_dst, unsigned v_delta,
                                              const typename CacheType<CT>::T* __restrict__ k_cache,
                                              const typename CacheType<CT>::T* __restrict__ v_cache,
                                              const int* __restrict__ block_table, int t0, int end,
                                              long long block_elems, long long head_off, int log2_block_size) {
  typedef TileShape<CT, HEAD_DIM> S;
  const int mask = (1 << log2_block_size) - 1;
  if constexpr (PAGEDKV_V2_THREADS % S::CVPR == 0 && S::TILE_VECS % PAGEDKV_V2_THREADS == 0) {
    // NOTE: a thread always copies the same column, so the column part of the address and the shared
    // address are worked out once, not per copy
    const long long col_off = head_off + (threadIdx.x % S::CVPR) * S::CVEC;
    const unsigned dst = s_dst + threadIdx.x * 16;
#pragma unroll
    for (int i = 0; i < S::LOADS; ++i) {
      const int token = t0 + threadIdx.x / S::CVPR + i * (PAGEDKV_V2_THREADS / S::CVPR);
      const bool valid = token < end;
      long long off = 0;
      if (valid)  // block id widened to 64 bits before the multiply
        off = (long long)block_table[token >> log2_block_size] * block_elems + col_off + (token & mask) * HEAD_DIM;
      pagedkv::cp_async16(dst + i * PAGEDKV_V2_THREADS * 16, k_cache + off, valid);
      pagedkv::cp_async16(dst + v_delta + i * PAGEDKV_V2_THREADS * 16, v_cache + off, valid);
    }
  } else {
#pragma unroll
    for (int i = 0; i < S::LOADS; ++i) {
      const int v = threadIdx.x + i * PAGEDKV_V2_THREADS;
      if (v < S::TILE_VECS) {
        const int row = v / S::CVPR, col = v - row * S::CVPR;
        const int token = t0 + row;
        const bool valid = token < end;
        long long off = 0;
        if (valid)
          off = (long long)block_table[token >> log2_block_size] * block_elems + head_off + (token & mask) * HEAD_DIM +
                col * S::CVEC;
        pagedkv::cp_async16(s_dst + v * 16, k_cache + off, valid);
        pagedkv::cp_async16(s_dst + v_delta + v * 16, v_cache + off, valid);
      }
    }
  }
}

// The per-thread state of one (sequence piece, query-head tile): q in registers (log2 units), the fp32
// accumulator, and the online-softmax running max and sum (owned by warp w for heads w, w + NW, ...).
// q is DT (16-byte vectors of VEC elements: the math vector's width for every valid (DT, CT) pair); the
// tiles are CT, read as CacheType<CT>::MathVec.
template <int DT, int HEAD_DIM, int GT, int CT = DT>
struct TileAttention {
  typedef TileShape<CT, HEAD_DIM> S;
  typedef typename CacheType<CT>::MathVec MV;
  static_assert(ValidPair<DT, CT>::value && 16 / sizeof(typename KV<DT>::T) == S::VEC, "q/cache type pair");
  static const int VEC = S::VEC, VPR = S::VPR, LPR = S::LPR, CPT = S::CPT, RG = S::RG, ROWS = S::ROWS;
  static const int TT = S::TILE_TOKENS, SR = S::SR;
  static const int NW = PAGEDKV_V2_THREADS / 32, GW = (GT + NW - 1) / NW;  // query heads per warp (softmax)

  int tid, lane, warp, lane_col, rg;
  float q[CPT][GT][VEC];
  float acc[CPT][GT][VEC];
  float m_run[GW], l_run[GW];

  __device__ __forceinline__ TileAttention() {
    tid = threadIdx.x; lane = tid & 31; warp = tid >> 5; lane_col = tid % LPR; rg = tid / LPR;
  }
  __device__ __forceinline__ bool live(int j) const { return !S::PADDED || lane_col + j * LPR < VPR; }
  // this lane's vector column j, clamped into the row when padded (a finite value, multiplied by q = 0)
  __device__ __forceinline__ int col(int j) const {
    return !S::PADDED ? lane_col + j * LPR : min(lane_col + j * LPR, VPR - 1);
  }

  // q rows: row g at rows[g * VPR] (16-byte vectors, global or shared memory); rows >= num_q read as 0
  __device__ __forceinline__ void load_q(const uint4* rows, int num_q, float scale_log2) {
#pragma unroll
    for (int g = 0; g < GT; ++g)
#pragma unroll
      for (int j = 0; j < CPT; ++j) {
        float x[VEC];
        if (g < num_q && live(j)) {
          pagedkv::unpack16<DT>(rows[g * VPR + lane_col + j * LPR], x);
        } else {
#pragma unroll
          for (int e = 0; e < VEC; ++e) x[e] = 0.f;
        }
#pragma unroll
        for (int e = 0; e < VEC; ++e) q[j][g][e] = x[e] * scale_log2;
      }
  }

  __device__ __forceinline__ void clear() {  // q too: between pieces (kernel 3)
#pragma unroll
    for (int j = 0; j < CPT; ++j)
#pragma unroll
      for (int g = 0; g < GT; ++g)
#pragma unroll
        for (int e = 0; e < VEC; ++e) q[j][g][e] = 0.f;
    reset();
  }

  __device__ __forceinline__ void reset() {
#pragma unroll
    for (int j = 0; j < CPT; ++j)
#pragma unroll
      for (int g = 0; g < GT; ++g)
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[j][g][e] = 0.f;
#pragma unroll
    for (int i = 0; i < GW; ++i) { m_run[i] = PAGEDKV_NEG_INF; l_run[i] = 0.f; }
  }

  // One staged tile: q.k, online softmax, p*V. Rows >= valid are masked (their V rows are zero-filled).
  //   s_p [GT][TT] scores then probabilities, then THREADS dump slots (one per thread); s_alpha [GT]. Two
  //   __syncthreads inside; the caller's barrier before the next call orders this call's reads of s_p
  //   against the next call's writes.
  // NOTE: no lane-dependent branch may sit next to the shuffles (see pagedkv::select): padded columns read
  // a clamped (finite) vector and multiply it by q = 0, and a lane that owns no score stores it into its
  // own dump slot instead of skipping the store.
  __device__ __forceinline__ void step(const uint4* k_tile16, const uint4* v_tile16, float* s_p, float* s_alpha,
                                       int valid) {
    const MV* k_tile = reinterpret_cast<const MV*>(k_tile16);
    const MV* v_tile = reinterpret_cast<const MV*>(v_tile16);
    // q.k over the tile: partial dots over this lane's columns, then a shuffle reduction across the row
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const int row = rg + r * RG;
      float dot[GT];
#pragma unroll
      for (int g = 0; g < GT; ++g) dot[g] = 0.f;
#pragma unroll
      for (int j = 0; j < CPT; ++j) {
        float x[VEC];
        CacheType<CT>::unpack(k_tile[row * VPR + col(j)], x);
#pragma unroll
        for (int g = 0; g < GT; ++g)
#pragma unroll
          for (int e = 0; e < VEC; ++e) dot[g] = fmaf(q[j][g][e], x[e], dot[g]);
      }
      const int dump = GT * TT + tid;
      if constexpr (PAGEDKV_V2_BUTTERFLY && LPR >= GT) {
        // reduce-scatter: each xor step trades half of the remaining heads' partials, so the row's GT dots
        // take log2(GT) + ... shuffles in all instead of GT * log2(LPR); lane_col then holds head g's total
        int g_owned = 0;
#pragma unroll
        for (int s = 0; (GT >> s) > 1; ++s) {
          const int half = GT >> (s + 1), o = LPR >> (s + 1);
          const bool upper = lane_col & o;
#pragma unroll
          for (int i = 0; i < half; ++i) {
            const float send = pagedkv::select(upper, dot[i], dot[i + half]);
            const float keep = pagedkv::select(upper, dot[i + half], dot[i]);
            dot[i] = keep + __shfl_xor_sync(0xffffffffu, send, o);
          }
          g_owned += pagedkv::select(upper, half, 0);
        }
#pragma unroll
        for (int o = LPR / GT / 2; o > 0; o >>= 1) dot[0] += __shfl_xor_sync(0xffffffffu, dot[0], o);
        s_p[pagedkv::select((lane_col & (LPR / GT - 1)) == 0, g_owned * TT + row, dump)] =
            pagedkv::select(row < valid, dot[0], PAGEDKV_NEG_INF);
      } else {
#pragma unroll
        for (int g = 0; g < GT; ++g) {
#pragma unroll
          for (int o = LPR / 2; o > 0; o >>= 1) dot[g] += __shfl_xor_sync(0xffffffffu, dot[g], o);
          s_p[pagedkv::select(lane_col == 0, g * TT + row, dump)] = pagedkv::select(row < valid, dot[g], PAGEDKV_NEG_INF);
        }
      }
    }
    __syncthreads();

    // online softmax update: warp w owns query heads w, w + NW, ...; rows lane, lane + 32, ...
    // (branch-free like q.k: lanes past the tile read and write their own dump slot, never a row)
    const int dump = GT * TT + tid, alpha_at = GT * TT + PAGEDKV_V2_THREADS;  // s_alpha = s_p + alpha_at
#pragma unroll
    for (int i = 0; i < GW; ++i) {
      const int g = warp + i * NW;
      if (g < GT) {  // warp-uniform
        float s[SR], mx = PAGEDKV_NEG_INF;
#pragma unroll
        for (int r = 0; r < SR; ++r) {
          const int row = lane + 32 * r;
          s[r] = pagedkv::select(row < TT, s_p[pagedkv::select(row < TT, g * TT + row, dump)], PAGEDKV_NEG_INF);
          mx = fmaxf(mx, s[r]);
        }
        const float m_new = fmaxf(m_run[i], pagedkv::warp_max(mx));  // finite: a tile has a valid row
        const float alpha = pagedkv::select(m_run[i] == m_new, 1.f, exp2f(m_run[i] - m_new));  // 0 on the first tile
        float psum = 0.f;
#pragma unroll
        for (int r = 0; r < SR; ++r) {
          const int row = lane + 32 * r;
          const float p = exp2f(s[r] - m_new);
          psum += p;
          s_p[pagedkv::select(row < TT, g * TT + row, dump)] = p;
        }
        l_run[i] = l_run[i] * alpha + pagedkv::warp_sum(psum);
        m_run[i] = m_new;
        s_p[pagedkv::select(lane == 0, alpha_at + g, dump)] = alpha;
      }
    }
    __syncthreads();

    // rescale the accumulator, then acc += p * V over this thread's rows
#pragma unroll
    for (int g = 0; g < GT; ++g) {
      const float alpha = s_alpha[g];
      // NOTE: alpha is the same for the whole block, so this branch never diverges; once the running max
      // settles most tiles skip the multiply
      if (!PAGEDKV_V2_LAZY_RESCALE || alpha != 1.f) {
#pragma unroll
        for (int j = 0; j < CPT; ++j)
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[j][g][e] *= alpha;
      }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const int row = rg + r * RG;
#pragma unroll
      for (int j = 0; j < CPT; ++j) {  // padded columns accumulate garbage that stage() never stores
        float x[VEC];
        CacheType<CT>::unpack(v_tile[row * VPR + col(j)], x);  // zero-filled past `valid`
#pragma unroll
        for (int g = 0; g < GT; ++g) {
          const float p = s_p[g * TT + row];
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[j][g][e] = fmaf(p, x[e], acc[j][g][e]);
        }
      }
    }
  }

  // The accumulator to s_red [RG][GT][HEAD_DIM] and (running max, sum) to s_ml [GT][2]; the caller
  // synchronises, then sums the RG rows (reduced_row).
  __device__ __forceinline__ void stage(float* s_red, float* s_ml) const {
#pragma unroll
    for (int g = 0; g < GT; ++g)
#pragma unroll
      for (int j = 0; j < CPT; ++j) {
        if (!live(j)) continue;
#pragma unroll
        for (int e = 0; e < VEC; e += 4)
          *reinterpret_cast<float4*>(s_red + (rg * GT + g) * HEAD_DIM + (lane_col + j * LPR) * VEC + e) =
              make_float4(acc[j][g][e], acc[j][g][e + 1], acc[j][g][e + 2], acc[j][g][e + 3]);
      }
#pragma unroll
    for (int i = 0; i < GW; ++i) {
      const int g = warp + i * NW;
      if (g < GT && lane == 0) { s_ml[2 * g] = m_run[i]; s_ml[2 * g + 1] = l_run[i]; }
    }
  }

  static __device__ __forceinline__ float reduced_row(const float* s_red, int g, int d) {
    float sum = 0.f;
#pragma unroll
    for (int r = 0; r < RG; ++r) sum += s_red[(r * GT + g) * HEAD_DIM + d];
    return sum;
  }
};

// Shared memory of kernels 2 and 3 in bytes (mirrored by pagedkv.kernels.v2_smem_bytes / v3_smem_bytes).
template <int DT, int HEAD_DIM, int GT, int CT = DT>
struct TileSmem {
  typedef TileShape<CT, HEAD_DIM> S;
  static const int PIPE = 2 * PAGEDKV_V2_STAGES * S::TILE_VECS * 16;   // K and V stages
  // cross-row-group reduction; at least THREADS float4 (kernel 3's merge reuses it)
  static const int RED = S::RG * GT * HEAD_DIM * 4 > PAGEDKV_V2_THREADS * 16 ? S::RG * GT * HEAD_DIM * 4
                                                                            : PAGEDKV_V2_THREADS * 16;
  static const int SMALL = 4 * (GT * S::TILE_TOKENS + PAGEDKV_V2_THREADS + 3 * GT);  // s_p + dump, s_alpha, s_ml
  static const int Q = PAGEDKV_V2_STAGES * GT * S::VPR * 16;           // kernel 3: q rows per stage
  static const int META = 2 * PAGEDKV_V2_STAGES * 16 * 4;             // kernel 3: tile descriptor ring
};

// ================================================================================================
// paged_attention_v2_kernel: one-pass tiled decode attention with split-K (capacity plan).
//   out          [batch, num_qo_heads, HEAD_DIM]                  written when num_partitions == 1
//   part_out     [batch, num_qo_heads, num_partitions, HEAD_DIM]  float32, unnormalised partial sums
//   part_max     [batch, num_qo_heads, num_partitions]            running max (log2 units) per partition
//   part_sum     [batch, num_qo_heads, num_partitions]            sum of exp2(s - part_max)
//   q, k_cache, v_cache, block_tables, context_lens: see the file header
//   group_size   num_qo_heads / num_kv_heads; this block serves query heads
//                kv_head * group_size + q_tile * GT ... (+ GT - 1, clipped to the group)
//   partition_tokens  tokens per partition, a multiple of the tile
//   scale_log2   softmax scale * log2(e): scores are kept in log2 units so exp2 does the softmax
//   k_scale, v_scale  the cache's dequantization scales (fp8: x = float(byte) * scale; 1 otherwise);
//                the partials (part_out) are in units of v_scale / CacheType::unit(), the output is not
// grid: (num_partitions, num_kv_heads * q_tiles, batch), block: PAGEDKV_V2_THREADS,
// dynamic shared memory: max(PIPE, RED) + SMALL (TileSmem)
// ================================================================================================
template <int DT, int HEAD_DIM, int GT, int CT = DT>
__global__ void __launch_bounds__(PAGEDKV_V2_THREADS, PAGEDKV_V2_MIN_BLOCKS(HEAD_DIM, GT))
paged_attention_v2_kernel(typename KV<DT>::T* __restrict__ out, float* __restrict__ part_out,
                          float* __restrict__ part_max, float* __restrict__ part_sum,
                          const typename KV<DT>::T* __restrict__ q,
                          const typename CacheType<CT>::T* __restrict__ k_cache,
                          const typename CacheType<CT>::T* __restrict__ v_cache,
                          const int* __restrict__ block_tables, const int* __restrict__ context_lens,
                          int num_qo_heads, int num_kv_heads, int group_size, int log2_block_size,
                          int max_blocks, int partition_tokens, float scale_log2, float k_scale, float v_scale) {
  typedef KV<DT> kv;
  typedef TileAttention<DT, HEAD_DIM, GT, CT> A;
  typedef TileSmem<DT, HEAD_DIM, GT, CT> M;
  const int TT = A::TT, TILE_VECS = A::S::TILE_VECS, STAGES = PAGEDKV_V2_STAGES;

  // shared memory: [STAGES][TILE_VECS] K, then V (reused for the final cross-row-group reduction),
  // then scores/probabilities [GT][TT], alpha [GT], (max, sum) [GT][2]
  extern __shared__ uint4 smem[];
  float* s_red = reinterpret_cast<float*>(smem);  // [RG][GT][HEAD_DIM], after the loop only
  float* s_p = reinterpret_cast<float*>(reinterpret_cast<char*>(smem) + (M::PIPE > M::RED ? M::PIPE : M::RED));
  float* s_alpha = s_p + GT * TT + PAGEDKV_V2_THREADS;
  float* s_ml = s_alpha + GT;

  const int tid = threadIdx.x;
  const int part = blockIdx.x, seq = blockIdx.z;
  const int q_tiles = (group_size + GT - 1) / GT;
  const int kv_head = blockIdx.y / q_tiles, q_tile = blockIdx.y % q_tiles;
  const int head0 = kv_head * group_size + q_tile * GT;
  const int num_q = min(GT, group_size - q_tile * GT);  // query heads this block really serves
  const int num_partitions = gridDim.x;

  const int context_len = context_lens[seq];
  const int start = part * partition_tokens;
  if (start >= context_len) return;  // a partition past this sequence's end: the reduce never reads it
  const int end = min(context_len, start + partition_tokens);
  const int num_tiles = (end - start + TT - 1) / TT;
  const int* block_table = block_tables + (long long)seq * max_blocks;

  // load q: this thread's columns for every query head of the tile, pre-scaled into log2 units
  A a;
  a.load_q(reinterpret_cast<const uint4*>(q + ((long long)seq * num_qo_heads + head0) * HEAD_DIM), num_q,
           scale_log2 * k_scale * CacheType<CT>::unit());
  a.reset();

  const long long block_elems = ((long long)num_kv_heads << log2_block_size) * HEAD_DIM;
  const long long head_off = ((long long)kv_head << log2_block_size) * HEAD_DIM;
  const unsigned s_base = pagedkv::smem_u32(smem), v_delta = STAGES * TILE_VECS * 16;
  auto load_tile = [&](int tile, int stage) {
    issue_kv_tile<CT, HEAD_DIM>(s_base + stage * TILE_VECS * 16, v_delta, k_cache, v_cache, block_table,
                                start + tile * TT, end, block_elems, head_off, log2_block_size);
  };

  // prologue: STAGES - 1 tiles in flight
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < num_tiles) load_tile(s, s);
    pagedkv::cp_async_commit();
  }

  for (int tile = 0; tile < num_tiles; ++tile) {
    pagedkv::cp_async_wait<STAGES - 2>();  // this tile's group has landed (one group per iteration)
    __syncthreads();                         // ... for every thread; the stage read last iteration is free
    if (tile + STAGES - 1 < num_tiles) load_tile(tile + STAGES - 1, (tile + STAGES - 1) % STAGES);
    pagedkv::cp_async_commit();
    const int stage = tile % STAGES, t0 = start + tile * TT;
    a.step(smem + stage * TILE_VECS, smem + STAGES * TILE_VECS + stage * TILE_VECS, s_p, s_alpha, end - t0);
  }
  pagedkv::cp_async_wait<0>();
  __syncthreads();  // the pipeline buffers become the reduction buffer

  // reduce the accumulator across row groups, then write the output (one partition) or this partition's
  // unnormalised partial
  a.stage(s_red, s_ml);
  __syncthreads();
  if (num_partitions > 1 && tid < num_q) {
    const long long idx = ((long long)seq * num_qo_heads + head0 + tid) * num_partitions + part;
    part_max[idx] = s_ml[2 * tid];
    part_sum[idx] = s_ml[2 * tid + 1];
  }
  for (int i = tid; i < num_q * HEAD_DIM; i += PAGEDKV_V2_THREADS) {
    const int g = i / HEAD_DIM, d = i % HEAD_DIM;
    const float sum = A::reduced_row(s_red, g, d);
    const long long head_row = (long long)seq * num_qo_heads + head0 + g;
    if (num_partitions == 1)
      out[head_row * HEAD_DIM + d] = kv::from_float(sum * (v_scale * CacheType<CT>::unit() / s_ml[2 * g + 1]));
    else
      part_out[(head_row * num_partitions + part) * HEAD_DIM + d] = sum;
  }
}

// ================================================================================================
// paged_attention_v2_reduce_kernel: merge a sequence's partitions by log-sum-exp.
//   out                         [batch, num_qo_heads, HEAD_DIM]
//   part_out, part_max, part_sum: as written by paged_attention_v2_kernel
//   only the first ceil(context_len / partition_tokens) partitions of a sequence are read
//   v_scale: kernel 2's (the cache type CT is a template parameter, as for kernel 2)
// grid: (num_qo_heads, batch), block: PAGEDKV_REDUCE_THREADS, dynamic shared memory: num_partitions floats
//
//   out = sum_p w_p * part_out[p] / sum_p w_p * part_sum[p],   w_p = exp2(part_max[p] - max_p part_max[p])
//
// Thread layout of the weighted sum: TPR = HEAD_DIM / 4 threads read one partition's row with 16-byte
// loads; the block reads RPB = THREADS / TPR partitions at once (8 for HEAD_DIM 128), so a 64-partition
// merge waits out a few memory latencies, not 64. The RPB partial sums meet in shared memory at the end.
// ================================================================================================
template <int DT, int HEAD_DIM, int CT = DT>
__global__ void __launch_bounds__(PAGEDKV_REDUCE_THREADS)
paged_attention_v2_reduce_kernel(typename KV<DT>::T* __restrict__ out, const float* __restrict__ part_out,
                                 const float* __restrict__ part_max, const float* __restrict__ part_sum,
                                 const int* __restrict__ context_lens, int num_qo_heads, int num_partitions,
                                 int partition_tokens, float v_scale) {
  constexpr int TPR = HEAD_DIM / 4, RPB = PAGEDKV_REDUCE_THREADS / TPR;
  static_assert(HEAD_DIM % 4 == 0 && RPB >= 1, "a row must split into float4s");
  extern __shared__ float s_w[];  // [num_partitions] weights w_p
  __shared__ float s_red[32];
  __shared__ float4 s_acc[RPB][TPR];
  const int head = blockIdx.x, seq = blockIdx.y, tid = threadIdx.x;
  const long long head_row = (long long)seq * num_qo_heads + head;
  const int n = (context_lens[seq] + partition_tokens - 1) / partition_tokens;
  const float* pm = part_max + head_row * num_partitions;
  const float* ps = part_sum + head_row * num_partitions;

  // global max over the partitions, then each partition's weight and the total sum
  float m = PAGEDKV_NEG_INF;
  for (int p = tid; p < n; p += PAGEDKV_REDUCE_THREADS) m = fmaxf(m, pm[p]);
  m = pagedkv::block_reduce<true>(m, s_red);
  float l = 0.f;
  for (int p = tid; p < n; p += PAGEDKV_REDUCE_THREADS) {
    const float w = exp2f(pm[p] - m);
    s_w[p] = w;
    l += w * ps[p];
  }
  // (its barriers also publish s_w); v_scale: the partials are in units of v_scale / unit (kernel 2)
  const float inv_l = v_scale * CacheType<CT>::unit() / pagedkv::block_reduce<false>(l, s_red);

  // weighted sum of the partial outputs: thread (r, c) adds columns 4c..4c+3 of partitions r, r + RPB, ...
  const int r = tid / TPR, c = tid % TPR;
  if (r < RPB) {
    const float4* rows = reinterpret_cast<const float4*>(part_out + head_row * num_partitions * HEAD_DIM) + c;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 4  // NOTE: independent loads in flight; the partitions' order of summation is fixed
    for (int p = r; p < n; p += RPB) {
      const float w = s_w[p];
      const float4 x = rows[(long long)p * TPR];
      acc.x = fmaf(w, x.x, acc.x); acc.y = fmaf(w, x.y, acc.y);
      acc.z = fmaf(w, x.z, acc.z); acc.w = fmaf(w, x.w, acc.w);
    }
    s_acc[r][c] = acc;
  }
  __syncthreads();
  if (tid < TPR) {
    float4 sum = s_acc[0][tid];
#pragma unroll
    for (int i = 1; i < RPB; ++i) {
      const float4 x = s_acc[i][tid];
      sum.x += x.x; sum.y += x.y; sum.z += x.z; sum.w += x.w;
    }
    typename KV<DT>::T* o = out + head_row * HEAD_DIM + 4 * tid;
    o[0] = KV<DT>::from_float(sum.x * inv_l);
    o[1] = KV<DT>::from_float(sum.y * inv_l);
    o[2] = KV<DT>::from_float(sum.z * inv_l);
    o[3] = KV<DT>::from_float(sum.w * inv_l);
  }
}

// ================================================================================================
// paged_attention_v3_kernel: kernel 2's tile loop in a persistent grid with the batch-balanced plan
// (picture in the file header), made by every thread block from context_lens; split sequences are merged
// by the block whose piece finishes last (no second launch).
//   out          [batch, num_qo_heads, HEAD_DIM]
//   part_out     [2 * gridDim.x, GT, HEAD_DIM] float32  pieces of split sequences (slot 2*block + first)
//   part_ml      [2 * gridDim.x, GT, 2] float32         (running max in log2 units, sum) of each piece
//   counters     [gridDim.x] int32, zero before the launch and zero after it: finished pieces of the
//                split sequence whose first piece is block b's (the last one to finish merges and resets)
//   q, k_cache, v_cache, block_tables, context_lens: see the file header; batch = rows of context_lens
//   group_size, scale_log2: as kernel 2;  min_tiles: the fewest tiles a block is given
// grid: (num_blocks) = resident thread blocks of the device, block: PAGEDKV_V2_THREADS,
// dynamic shared memory: PIPE + Q + RED + SMALL + META (TileSmem)
//
// Each thread block walks its units in order; the copies run STAGES - 1 tiles ahead of the math, across
// sequence and head-group boundaries (a new piece's q rows travel with its first tile), so the pipeline
// never drains between pieces. Per tile, thread 0 leaves a descriptor in shared memory (sequence, heads,
// tokens, first/last-of-piece flags, the split it belongs to) for the copies and the math.
//
// Merging (threadFenceReduction's pattern): a piece of a split sequence writes its partial, every thread
// fences, and thread 0 counts the piece in counters[first block]; the block that brings the count to the
// number of pieces reads all partials (ld.global.cg, past L1), writes the output and resets the counter.
// ================================================================================================
#define PAGEDKV_TILE_FIRST 1       // first tile of this block's piece of the sequence
#define PAGEDKV_TILE_LAST 2        // last tile of the piece
#define PAGEDKV_TILE_SEQ_START 4   // the tile is the sequence's first
#define PAGEDKV_META 16            // ints per tile descriptor
// descriptor fields
#define PAGEDKV_M_SEQ 0
#define PAGEDKV_M_HEAD0 1          // first query head of the head group
#define PAGEDKV_M_NUM_Q 2          // query heads of the head group (<= GT)
#define PAGEDKV_M_T0 3             // first token of the tile
#define PAGEDKV_M_LEN 4            // the sequence's length
#define PAGEDKV_M_FLAGS 5
#define PAGEDKV_M_KV_HEAD 6
#define PAGEDKV_M_SPLIT_BLOCK 7    // the block holding the sequence's first piece
#define PAGEDKV_M_PIECES 8         // blocks the sequence is cut over (1: not split)

// Block-wide exclusive prefix sum of one int per thread; also returns the total. Uses s_scan[NW].
__device__ __forceinline__ int block_exclusive_scan(int x, int* s_scan, int& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = blockDim.x >> 5;
  int incl = x;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  if (lane == 31) s_scan[warp] = incl;
  __syncthreads();
  int before = incl - x;
  total = 0;
  for (int w = 0; w < num_warps; ++w) {
    const int t = s_scan[w];
    if (w < warp) before += t;
    total += t;
  }
  return before;
}

// Block-wide max and min of one int per thread (redux.sync, sm_80+), after block_exclusive_scan (it reuses
// s_scan[NW .. 3 NW)). Every thread gets both.
__device__ __forceinline__ void block_max_min(int mx, int mn, int* s_scan, int& out_max, int& out_min) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = blockDim.x >> 5;
  asm("redux.sync.max.s32 %0, %0, 0xffffffff;" : "+r"(mx));
  asm("redux.sync.min.s32 %0, %0, 0xffffffff;" : "+r"(mn));
  if (lane == 0) { s_scan[num_warps + warp] = mx; s_scan[2 * num_warps + warp] = mn; }
  __syncthreads();
  out_max = s_scan[num_warps];
  out_min = s_scan[2 * num_warps];
  for (int w = 1; w < num_warps; ++w) {
    out_max = max(out_max, s_scan[num_warps + w]);
    out_min = min(out_min, s_scan[2 * num_warps + w]);
  }
}

// combine_ml and merge_pieces (the merge of a split sequence's partials): split_merge.cuh
using pagedkv::merge_pieces;

template <int DT, int HEAD_DIM, int GT, int CT = DT>
__global__ void __launch_bounds__(PAGEDKV_V2_THREADS, PAGEDKV_V3_MIN_BLOCKS(DT, HEAD_DIM, GT))
paged_attention_v3_kernel(typename KV<DT>::T* __restrict__ out, float* __restrict__ part_out,
                          float* __restrict__ part_ml, int* __restrict__ counters,
                          const typename KV<DT>::T* __restrict__ q,
                          const typename CacheType<CT>::T* __restrict__ k_cache,
                          const typename CacheType<CT>::T* __restrict__ v_cache,
                          const int* __restrict__ block_tables, const int* __restrict__ context_lens,
                          int batch, int num_qo_heads, int num_kv_heads, int group_size, int log2_block_size,
                          int max_blocks, int min_tiles, float scale_log2, float k_scale, float v_scale, int mode,
                          int max_parts) {
  typedef KV<DT> kv;
  typedef TileAttention<DT, HEAD_DIM, GT, CT> A;
  typedef TileSmem<DT, HEAD_DIM, GT, CT> M;
  const int TT = A::TT, VPR = A::VPR, VEC = A::VEC, TILE_VECS = A::S::TILE_VECS, STAGES = PAGEDKV_V2_STAGES;
  const int QV = GT * VPR;  // q vectors of one piece
  const float q_scale = scale_log2 * k_scale * CacheType<CT>::unit(), v_factor = v_scale * CacheType<CT>::unit();

  // shared memory: K stages, V stages, q stages [STAGES][GT][VPR], s_red [RG][GT][HEAD_DIM], s_p [GT][TT]
  // + one dump slot per thread, s_alpha [GT], s_ml [GT][2], tile descriptors [2 * STAGES][PAGEDKV_META] int
  extern __shared__ uint4 smem[];
  uint4* s_q = smem + 2 * STAGES * TILE_VECS;
  float* s_red = reinterpret_cast<float*>(s_q + STAGES * QV);
  float* s_p = s_red + M::RED / 4;
  float* s_alpha = s_p + GT * TT + PAGEDKV_V2_THREADS;
  float* s_ml = s_alpha + GT;
  int* s_meta = reinterpret_cast<int*>(s_ml + 2 * GT);
  __shared__ int s_scan[4 * PAGEDKV_V2_THREADS / 32];
  __shared__ int s_start[2];
  // thread 0's walk: seq, head group, the item's first unit (relative to this block's first), the seq's
  // length and tiles, the head group's first query head, query heads, KV head
  __shared__ int s_walk[8];
  __shared__ int s_per_block;
  __shared__ int s_last;     // this block finished a split sequence's last piece: it merges
  __shared__ int s_item[2];  // partition plan: the next item, double-buffered

  const int tid = threadIdx.x;
  const int q_tiles = (group_size + GT - 1) / GT, num_hg = num_kv_heads * q_tiles;
  auto tiles_of = [&](int len) { return len > 0 ? (len + TT - 1) / TT : 0; };

  // plan: tiles of every sequence (thread t sums a contiguous chunk), scanned across the block; the
  // longest and shortest lengths
  const int chunk = (batch + PAGEDKV_V2_THREADS - 1) / PAGEDKV_V2_THREADS;
  const int lo = min(tid * chunk, batch), hi = min(lo + chunk, batch);
  int local = 0, local_max = 0, local_min = 0x7fffffff;
  for (int i = lo; i < hi; ++i) {
    const int len = context_lens[i];
    local += tiles_of(len);
    local_max = max(local_max, len);
    local_min = min(local_min, len);
  }
  int total, max_len, min_len;
  const int before = block_exclusive_scan(local, s_scan, total);
  block_max_min(local_max, local_min, s_scan, max_len, min_len);
  if (total == 0) return;  // nothing to attend (uniform)

  // The dispatcher (mode 0), the same decision in every block: the partition plan (kernel 2's, below) when
  // the lengths are nearly equal or its pieces are small against a block's share, else the balanced walk.
  // Partitions: the fewest (thread t tries t + 1) whose items fill >= 95 % of their last wave over the grid,
  // else the fullest; whole tiles, at least PAGEDKV_MIN_PART_TOKENS, at most max_parts
  // (pagedkv.decode_plan.dispatch mirrors this).
  const int grid = gridDim.x;
  int use_mode = mode, parts = 1, part_tokens = 0;
  if (mode != 3) {  // uniform
    const int items0 = num_hg * batch;
    const int pmax = max(1, min(min(max_parts, PAGEDKV_V2_THREADS), max_len / PAGEDKV_MIN_PART_TOKENS));
    int key = -1;
    if (tid < pmax) {
      const int pt = ((max_len + tid) / (tid + 1) + TT - 1) / TT * TT;
      const int np = (max_len + pt - 1) / pt;
      const long long items = (long long)items0 * np, waves = (items + grid - 1) / grid;
      key = 20 * items >= 19 * grid * waves ? (1 << 30) + (1023 - np)
                                             : (int)(items * 65536 / (grid * waves)) * 1024 + (1023 - np);
    }
    asm("redux.sync.max.s32 %0, %0, 0xffffffff;" : "+r"(key));
    const int lane = tid & 31, warp = tid >> 5, num_warps = PAGEDKV_V2_THREADS / 32;
    if (lane == 0) s_scan[3 * num_warps + warp] = key;
    __syncthreads();
    for (int w = 0; w < num_warps; ++w) key = max(key, s_scan[3 * num_warps + w]);
    parts = 1023 - (key & 1023);
    part_tokens = ((max_len + parts - 1) / parts + TT - 1) / TT * TT;
    const long long work = (long long)num_hg * total;  // tiles
    const bool near_uniform = (long long)(max_len - min_len) * 8 <= max_len;
    if (mode == 0) use_mode = near_uniform || 5LL * tiles_of(min(max_len, part_tokens)) * grid <= work ? 2 : 3;
  }
  if (blockIdx.x == 0 && tid == 0) counters[2] = use_mode | (parts << 8);  // the choice, for tests and benchmarks

  const long long block_elems = ((long long)num_kv_heads << log2_block_size) * HEAD_DIM;
  const unsigned s_base = pagedkv::smem_u32(smem), v_delta = STAGES * TILE_VECS * 16;

  if (use_mode == 2) {
    // Partition plan: kernel 2's tile loop over items (sequence, head group, partition) of part_tokens
    // tokens, handed out by an atomic queue (counters[0]) as thread blocks free up; a sequence cut into
    // several partitions leaves partials in slots item (of [batch * num_hg * parts]) and the partition that
    // finishes last merges them (counters[4 + seq * num_hg + hg]). The last block out resets the queue.
    // NOTE: a block whose first item (its index) is past the end takes nothing from the queue but still
    // counts itself out, so the reset waits for every block.
    const int items = num_hg * batch * parts;
    int* seq_counters = counters + 4;
    int item = blockIdx.x;  // every block's first item is its own index; the queue hands out grid, grid + 1, ...
    for (int it = 1; item < items; ++it) {
      int next = 0;
      if (tid == 0) next = grid + atomicAdd(counters, 1);  // used after this item: its latency hides behind it
      const int part = item % parts, rest = item / parts, hg = rest % num_hg, seq = rest / num_hg;
      const int len = context_lens[seq], start = part * part_tokens;
      if (start < len) {  // uniform
        const int kv_head = hg / q_tiles, q_tile = hg - kv_head * q_tiles;
        const int head0 = kv_head * group_size + q_tile * GT, num_q = min(GT, group_size - q_tile * GT);
        const int end = min(len, start + part_tokens), num_tiles = (end - start + TT - 1) / TT;
        const int n_parts = (len + part_tokens - 1) / part_tokens;
        const int* block_table = block_tables + (long long)seq * max_blocks;
        const long long head_off = ((long long)kv_head << log2_block_size) * HEAD_DIM;
        A a;
        a.load_q(reinterpret_cast<const uint4*>(q + ((long long)seq * num_qo_heads + head0) * HEAD_DIM), num_q,
                 q_scale);
        a.reset();
        auto load_tile = [&](int tile, int stage) {
          issue_kv_tile<CT, HEAD_DIM>(s_base + stage * TILE_VECS * 16, v_delta, k_cache, v_cache, block_table,
                                      start + tile * TT, end, block_elems, head_off, log2_block_size);
        };
#pragma unroll
        for (int st = 0; st < STAGES - 1; ++st) {
          if (st < num_tiles) load_tile(st, st);
          pagedkv::cp_async_commit();
        }
        for (int tile = 0; tile < num_tiles; ++tile) {
          pagedkv::cp_async_wait<STAGES - 2>();
          __syncthreads();
          if (tile + STAGES - 1 < num_tiles) load_tile(tile + STAGES - 1, (tile + STAGES - 1) % STAGES);
          pagedkv::cp_async_commit();
          const int stage = tile % STAGES, t0 = start + tile * TT;
          a.step(smem + stage * TILE_VECS, smem + STAGES * TILE_VECS + stage * TILE_VECS, s_p, s_alpha, end - t0);
        }
        pagedkv::cp_async_wait<0>();
        // s_red and s_ml were last read before the previous item's last barrier
        a.stage(s_red, s_ml);
        a.clear();
        __syncthreads();
        const long long slot = item;
        for (int i = tid; i < num_q * HEAD_DIM; i += PAGEDKV_V2_THREADS) {
          const int g = i / HEAD_DIM, d = i - g * HEAD_DIM;
          const float sum = A::reduced_row(s_red, g, d);
          if (n_parts == 1)
            out[((long long)seq * num_qo_heads + head0 + g) * HEAD_DIM + d] = kv::from_float(sum * (v_factor / s_ml[2 * g + 1]));
          else
            part_out[(slot * GT + g) * HEAD_DIM + d] = sum;
        }
        if (n_parts > 1) {  // uniform
          if (tid < 2 * num_q) part_ml[slot * GT * 2 + tid] = s_ml[tid];
          __threadfence();
          __syncthreads();
          if (tid == 0) s_last = atomicAdd(seq_counters + rest, 1) == n_parts - 1;
          __syncthreads();
          if (s_last) {
            __threadfence();
            merge_pieces<DT, HEAD_DIM, GT, PAGEDKV_V2_THREADS>(out, part_out, part_ml, (long long)rest * parts, 1, 0,
                                                               n_parts, seq, head0, num_q, num_qo_heads, v_factor,
                                                               s_p, GT * TT, reinterpret_cast<float4*>(s_red));
            if (tid == 0) seq_counters[rest] = 0;
          }
        }
      }
      if (tid == 0) s_item[it & 1] = next;
      __syncthreads();
      item = s_item[it & 1];
    }
    if (tid == 0) {  // the last block out resets the queue for the next launch (a graph replays)
      __threadfence();
      if (atomicAdd(counters + 1, 1) == grid - 1) { counters[0] = 0; counters[1] = 0; }
    }
    return;
  }

  // The balanced walk (kernel 3's own plan; picture in the file header)
  counters += 4;  // split counters
  // NOTE: unit counts are 64-bit only here; a block's own units and offsets fit 32 bits
  const long long units = (long long)num_hg * total;
  const int per_block = (int)max((units + gridDim.x - 1) / gridDim.x, (long long)max(min_tiles, 1));
  const long long u0 = (long long)blockIdx.x * per_block;
  if (u0 >= units) return;  // nothing for this block (uniform: every thread leaves)
  const int num_units = (int)min((long long)per_block, units - u0);  // this block: units u0 .. u0 + num_units - 1
  // the sequence holding unit u0: found by the one thread whose chunk covers it
  const int hg0 = (int)(u0 / total), s0 = (int)(u0 - (long long)hg0 * total);
  if (before <= s0 && s0 < before + local) {
    int cum = before;
    for (int i = lo; i < hi; ++i) {
      const int n = tiles_of(context_lens[i]);
      if (s0 < cum + n) { s_start[0] = i; s_start[1] = cum - s0; break; }
      cum += n;
    }
  }
  __syncthreads();

  // The walk over this block's units: thread 0 describes unit u (its item, tile, flags, split) into the
  // descriptor ring a full pipeline ahead; the copies and the math read the descriptors.
  // NOTE: the walk's state lives in shared memory, not in every thread's registers (the math is at the
  // register cap), and one thread reads context_lens instead of all of them. Per tile it costs a few
  // shared loads and stores: the item's fields are worked out when the walk enters it, the split (32-bit
  // floor divisions) only at a piece's last tile. (With two 64-bit divisions per tile it cost kernel 3
  // 22 % more instructions than kernel 2, all on warp 0, and the other warps waited at the barriers.)
  auto enter = [&](int seq, int hg, int item) {  // thread 0: the walk enters item (hg, seq)
    const int len = context_lens[seq], kv_head = hg / q_tiles, q_tile = hg - kv_head * q_tiles;
    s_walk[0] = seq; s_walk[1] = hg; s_walk[2] = item; s_walk[3] = len; s_walk[4] = tiles_of(len);
    s_walk[5] = kv_head * group_size + q_tile * GT; s_walk[6] = min(GT, group_size - q_tile * GT);
    s_walk[7] = kv_head;
  };
  if (tid == 0) { enter(s_start[0], hg0, s_start[1]); s_per_block = per_block; }
  auto floor_div = [](int a, int b) { return a >= 0 ? a / b : -((b - 1 - a) / b); };
  auto describe = [&](int u) {  // thread 0 only
    int item = s_walk[2], n = s_walk[4];
    if (u >= item + n) {  // the next item holding u (zero-length ones are stepped over)
      int seq = s_walk[0], hg = s_walk[1];
      do {
        item += n;
        if (++seq == batch) { seq = 0; ++hg; }
        n = tiles_of(context_lens[seq]);
      } while (u >= item + n);
      enter(seq, hg, item);
    }
    const int j = u - item;
    const bool last = u == num_units - 1 || j == n - 1;
    int* meta = s_meta + (u % (2 * STAGES)) * PAGEDKV_META;
    meta[PAGEDKV_M_SEQ] = s_walk[0];
    meta[PAGEDKV_M_HEAD0] = s_walk[5];
    meta[PAGEDKV_M_NUM_Q] = s_walk[6];
    meta[PAGEDKV_M_T0] = j * TT;
    meta[PAGEDKV_M_LEN] = s_walk[3];
    meta[PAGEDKV_M_KV_HEAD] = s_walk[7];
    meta[PAGEDKV_M_FLAGS] = (u == 0 || j == 0 ? PAGEDKV_TILE_FIRST : 0) | (last ? PAGEDKV_TILE_LAST : 0) |
                            (j == 0 ? PAGEDKV_TILE_SEQ_START : 0);
    if (last) {  // the blocks the item is cut over, relative to this one: floor((item + t) / per_block)
      const int per = s_per_block, first = floor_div(item, per);
      meta[PAGEDKV_M_SPLIT_BLOCK] = blockIdx.x + first;
      meta[PAGEDKV_M_PIECES] = floor_div(item + n - 1, per) - first + 1;
    }
  };

  const unsigned s_qbase = pagedkv::smem_u32(s_q);
  auto issue = [&](int u) {  // every thread: the copies of unit u (K, V, and q if a piece starts)
    const int* meta = s_meta + (u % (2 * STAGES)) * PAGEDKV_META;
    const int seq = meta[PAGEDKV_M_SEQ], t0 = meta[PAGEDKV_M_T0], stage = u % STAGES;
    issue_kv_tile<CT, HEAD_DIM>(s_base + stage * TILE_VECS * 16, v_delta, k_cache, v_cache,
                                block_tables + (long long)seq * max_blocks, t0, meta[PAGEDKV_M_LEN], block_elems,
                                ((long long)meta[PAGEDKV_M_KV_HEAD] << log2_block_size) * HEAD_DIM, log2_block_size);
    if (meta[PAGEDKV_M_FLAGS] & PAGEDKV_TILE_FIRST) {  // the piece's q rows ride with its first tile (rows past num_q: 0)
      const int head0 = meta[PAGEDKV_M_HEAD0], num_q = meta[PAGEDKV_M_NUM_Q];
      const typename kv::T* q_rows = q + ((long long)seq * num_qo_heads + head0) * HEAD_DIM;
      for (int v = tid; v < QV; v += PAGEDKV_V2_THREADS) {
        const int g = v / VPR, col = v - g * VPR;
        pagedkv::cp_async16(s_qbase + (stage * QV + v) * 16, q_rows + (g < num_q ? g * HEAD_DIM + col * VEC : 0),
                            g < num_q);
      }
    }
  };

  // prologue: descriptors of units 0 .. STAGES - 1, then STAGES - 1 tiles in flight
  if (tid == 0)
    for (int u = 0; u < STAGES && u < num_units; ++u) describe(u);
  __syncthreads();
#pragma unroll
  for (int u = 0; u < STAGES - 1; ++u) {
    if (u < num_units) issue(u);
    pagedkv::cp_async_commit();
  }

  A a;
  bool seq_start = false;  // the current piece began with the sequence's first tile
  for (int u = 0; u < num_units; ++u) {
    const int stage = u % STAGES;
    pagedkv::cp_async_wait<STAGES - 2>();  // this tile's group has landed (one group per iteration)
    __syncthreads();  // ... for every thread; the stage read last iteration is free; descriptors published
    if (u + STAGES - 1 < num_units) issue(u + STAGES - 1);
    pagedkv::cp_async_commit();
    const int* meta = s_meta + (u % (2 * STAGES)) * PAGEDKV_META;
    const int flags = meta[PAGEDKV_M_FLAGS];  // the same for every thread: the branches below never diverge
    if (flags & PAGEDKV_TILE_FIRST) {  // load q, clear the accumulator
      a.load_q(s_q + stage * QV, GT, q_scale);
      a.reset();
      seq_start = flags & PAGEDKV_TILE_SEQ_START;
    }
    a.step(smem + stage * TILE_VECS, smem + STAGES * TILE_VECS + stage * TILE_VECS, s_p, s_alpha,
           min(meta[PAGEDKV_M_LEN] - meta[PAGEDKV_M_T0], TT));
    // descriptor u + STAGES (read after the next barrier) goes to the ring slot of unit u - STAGES, which
    // nobody reads any more. NOTE: here, at the end of the math, thread 0's walk overlaps the wait for the
    // next tile instead of holding up this tile's barriers
    if (tid == 0 && u + STAGES < num_units) describe(u + STAGES);
    if (!(flags & PAGEDKV_TILE_LAST)) continue;

    // the piece ends: write the output, or this piece's partial (and merge if it was the last piece)
    const int seq = meta[PAGEDKV_M_SEQ], head0 = meta[PAGEDKV_M_HEAD0], num_q = meta[PAGEDKV_M_NUM_Q];
    const int pieces = meta[PAGEDKV_M_PIECES], split_block = meta[PAGEDKV_M_SPLIT_BLOCK];
    const long long slot = 2LL * blockIdx.x + (seq_start ? 1 : 0);
    // NOTE: s_red and s_ml were last read after the previous piece's last tile; every tile since passed
    // three barriers, so writing them now is safe
    a.stage(s_red, s_ml);
    // NOTE: the next tile starts a new piece (it reloads q and clears the accumulator); clearing them now
    // tells the compiler they are dead, which frees their registers for the merge below
    a.clear();
    __syncthreads();
    for (int i = tid; i < num_q * HEAD_DIM; i += PAGEDKV_V2_THREADS) {
      const int g = i / HEAD_DIM, d = i - g * HEAD_DIM;
      const float sum = A::reduced_row(s_red, g, d);
      if (pieces == 1)
        out[((long long)seq * num_qo_heads + head0 + g) * HEAD_DIM + d] = kv::from_float(sum * (v_factor / s_ml[2 * g + 1]));
      else
        part_out[(slot * GT + g) * HEAD_DIM + d] = sum;
    }
    if (pieces == 1) continue;
    if (tid < 2 * num_q) part_ml[slot * GT * 2 + tid] = s_ml[tid];
    __threadfence();  // this thread's partial is visible to the whole device ...
    __syncthreads();  // ... for every thread, before the piece is counted
    if (tid == 0) s_last = atomicAdd(counters + split_block, 1) == pieces - 1;
    __syncthreads();
    if (s_last) {  // uniform: every other piece is written
      __threadfence();
      merge_pieces<DT, HEAD_DIM, GT, PAGEDKV_V2_THREADS>(out, part_out, part_ml, 2LL * split_block, 2, 1, pieces,
                                                         seq, head0, num_q, num_qo_heads, v_factor, s_p, GT * TT,
                                                         reinterpret_cast<float4*>(s_red));
      if (tid == 0) counters[split_block] = 0;  // ready for the next launch
    }
  }
  pagedkv::cp_async_wait<0>();  // only empty groups can be pending here
}

// ================================================================================================
// check_block_tables_kernel: GPU-side range check, one reduction over the whole table.
//   bad[0] = min seq with context_lens[seq] outside [1, max_blocks * block_size]
//   bad[1] = min flat index seq * max_blocks + j of a *used* entry (j < ceil(len / block_size))
//            outside [0, num_blocks)
//   both preset to UINT64_MAX by the caller
// grid-stride over batch * max_blocks
// ================================================================================================
extern "C" __global__ void check_block_tables_kernel(const int* __restrict__ block_tables,
                                                     const int* __restrict__ context_lens, int batch,
                                                     int max_blocks, int num_blocks, int block_size,
                                                     unsigned long long* __restrict__ bad) {
  const long long total = (long long)batch * max_blocks;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    const int seq = (int)(i / max_blocks), j = (int)(i % max_blocks);
    const int len = context_lens[seq];
    if (len < 1 || len > (long long)max_blocks * block_size) {
      if (j == 0) atomicMin(bad, (unsigned long long)seq);
      continue;
    }
    const int id = block_tables[i];
    if (j < (len + block_size - 1) / block_size && (id < 0 || id >= num_blocks))
      atomicMin(bad + 1, (unsigned long long)i);
  }
}
