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
//                              between two blocks are merged (paged_attention_v3_merge_kernel).
//   check_block_tables_kernel  GPU-side range check of block_tables / context_lens (one reduction).
//
// The balanced plan of kernel 3 (computed again by every thread block from context_lens, so a captured CUDA
// graph replays with new lengths; the launch shape depends on shapes and the device only):
//
//   work units = tiles (TILE_TOKENS tokens of one sequence for one head group), laid end to end,
//   head group-major:   hg 0: [seq 0 | seq 1 | seq 2 ...]  hg 1: [seq 0 | seq 1 | ...] ...
//
//     units   |s0: 5 tiles |s1|s2: 9 tiles          |s3 |s0 (hg 1)  |s1|s2 ...
//             |====:====:==|==|=:====:====:====:=|==|===|===:=====:=|==|====...
//     blocks  |  block 0   |  block 1   |  block 2   |  block 3   |  block 4  ...
//             <-- K units -><-- K units -> ...     K = max(ceil(units / blocks), min_tiles)
//
//   Block b streams units [b*K, (b+1)*K) through its cp.async pipeline: s0 and s1 end inside block 0 and
//   1, so their outputs are written directly; s2 spans blocks 1..2 (pieces: its first tiles in block 1,
//   the rest in block 2). Each piece leaves an unnormalised partial (max, sum, sum p*V) in slot
//   2*block + (piece starts the sequence ? 1 : 0); the block holding a split sequence's first piece records
//   (sequence, heads, pieces) in merge_desc[block], and the merge kernel combines exactly those pieces.
//   A short sequence is one piece; a long one gets as many as its length needs.
//
// Compile-time options (-D, one cached module per set; pagedkv/kernels.py mirrors the defaults):
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

// NOTE: min blocks per SM caps registers (4 blocks: <= 128 registers for GT <= 4; 3 blocks for GT = 8,
// 2 for GT = 8 with head_dim >= 160, which spilled at the 3-block cap); with the cap ptxas reports no
// spills for any instantiation (tests/test_kernels_compile.py checks it).
#define PAGEDKV_V2_MIN_BLOCKS(HEAD_DIM, GT) ((GT) <= 4 ? 4 : ((HEAD_DIM) >= 160 ? 2 : 3))
// Kernel 3 holds a few more values across the tile loop; at the 3-block cap (168 registers) its 16-bit
// GT = 8 instantiations spilled 4-16 bytes on sm_90 for the head dims whose rows are not 8 or 16
// vectors, and 8 bytes for head_dim 128 on sm_80: those get 2 blocks per SM.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define PAGEDKV_V3_TIGHT 1
#else
#define PAGEDKV_V3_TIGHT 0
#endif
#define PAGEDKV_V3_MIN_BLOCKS(DT, HEAD_DIM, GT)                                                    \
  ((GT) <= 4 ? 4                                                                                   \
   : ((HEAD_DIM) >= 160 || ((DT) != 0 && (PAGEDKV_V3_TIGHT || ((HEAD_DIM) != 64 && (HEAD_DIM) != 128))) ? 2 : 3))

using pagedkv::KV;

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
// A tile is TILE_TOKENS rows (tokens) x VPR 16-byte vectors (VPR = row bytes / 16) of K, and the same of V.
// Thread layout for the math: lane_col = tid % LPR owns vectors lane_col + j*LPR (j < CPT) of each row it
// touches; row group rg = tid / LPR handles rows rg, rg + RG, ...  LPR (lanes per row) is the power of two
// >= VPR, capped at 32, so a row's partial dots meet by xor shuffles inside an LPR-lane group.
// NOTE: when VPR is not a power of two (head_dim 80, 96, 112, 160, 192: 10, 12, 14, 20, 24 vectors of
// half precision) the lanes past VPR idle in the math (up to 3/8 of them, at 80 and 160); the copies
// into shared memory use every thread (flat vector index), so the bytes in flight do not shrink. The
// alternative, LPR = the largest power of two dividing VPR, keeps every lane busy but gives 32-64 row
// groups and a cross-row-group reduction 4-8x larger.
// ================================================================================================
template <int DT, int HEAD_DIM>
struct TileShape {
  static const int VEC = pagedkv::Vec<DT>::N;                 // elements per 16-byte vector
  static const int VPR = HEAD_DIM / VEC;                       // 16-byte vectors per K/V row
  static const int LPR = VPR > 16 ? 32 : VPR > 8 ? 16 : VPR > 4 ? 8 : VPR > 2 ? 4 : 2;  // lanes per row
  static const int CPT = (VPR + LPR - 1) / LPR;                // vectors per lane per row
  static const bool PADDED = CPT * LPR != VPR;                 // some lanes idle in the last column
  static const int RG = PAGEDKV_V2_THREADS / LPR;              // row groups
  static const int ROW_GROUP_BYTES = VPR * 16 * RG;
  static const int ROWS_RAW = (PAGEDKV_V2_TILE_BYTES + ROW_GROUP_BYTES / 2) / ROW_GROUP_BYTES;
  static const int ROWS = ROWS_RAW < 1 ? 1 : ROWS_RAW;        // rows per thread per tile
  static const int TILE_TOKENS = ROWS * RG;
  static const int TILE_VECS = TILE_TOKENS * VPR;
  static const int LOADS = (TILE_VECS + PAGEDKV_V2_THREADS - 1) / PAGEDKV_V2_THREADS;  // cp.async per thread
  static const int SR = (TILE_TOKENS + 31) / 32;               // softmax rows per lane
  static_assert(HEAD_DIM % (VEC * 2) == 0 && VPR >= 2 && VPR <= 64, "head_dim: a multiple of 16 up to 256");
};

// Issue the 16-byte copies of one K tile and one V tile: rows t0 .. t0 + TILE_TOKENS - 1 of a sequence,
// rows at or past `end` zero-filled (nothing read). Thread tid copies flat vectors tid, tid + THREADS, ...
//   s_dst        shared address (smem_u32) of the stage's K tile; its V tile is v_delta bytes further
//   head_off     kv_head * block_size * HEAD_DIM (elements);  block_elems = num_kv_heads * block_size * HEAD_DIM
template <int DT, int HEAD_DIM>
__device__ __forceinline__ void issue_kv_tile(unsigned s_dst, unsigned v_delta,
                                              const typename KV<DT>::T* __restrict__ k_cache,
                                              const typename KV<DT>::T* __restrict__ v_cache,
                                              const int* __restrict__ block_table, int t0, int end,
                                              long long block_elems, long long head_off, int log2_block_size) {
  typedef TileShape<DT, HEAD_DIM> S;
  const int mask = (1 << log2_block_size) - 1;
  if constexpr (PAGEDKV_V2_THREADS % S::VPR == 0 && S::TILE_VECS % PAGEDKV_V2_THREADS == 0) {
    // NOTE: a thread always copies the same column, so the column part of the address and the shared
    // address are worked out once, not per copy
    const long long col_off = head_off + (threadIdx.x % S::VPR) * S::VEC;
    const unsigned dst = s_dst + threadIdx.x * 16;
#pragma unroll
    for (int i = 0; i < S::LOADS; ++i) {
      const int token = t0 + threadIdx.x / S::VPR + i * (PAGEDKV_V2_THREADS / S::VPR);
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
        const int row = v / S::VPR, col = v - row * S::VPR;
        const int token = t0 + row;
        const bool valid = token < end;
        long long off = 0;
        if (valid)
          off = (long long)block_table[token >> log2_block_size] * block_elems + head_off + (token & mask) * HEAD_DIM +
                col * S::VEC;
        pagedkv::cp_async16(s_dst + v * 16, k_cache + off, valid);
        pagedkv::cp_async16(s_dst + v_delta + v * 16, v_cache + off, valid);
      }
    }
  }
}

// The per-thread state of one (sequence piece, query-head tile): q in registers (log2 units), the fp32
// accumulator, and the online-softmax running max and sum (owned by warp w for heads w, w + NW, ...).
template <int DT, int HEAD_DIM, int GT>
struct TileAttention {
  typedef TileShape<DT, HEAD_DIM> S;
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
  //   s_p [GT][TT] scores then probabilities; s_alpha [GT]. Two __syncthreads inside; the caller's barrier
  //   before the next call orders this call's reads of s_p against the next call's writes.
  __device__ __forceinline__ void step(const uint4* k_tile, const uint4* v_tile, float* s_p, float* s_alpha,
                                       int valid) {
    // q.k over the tile: partial dots over this lane's columns, then a shuffle reduction across the row
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const int row = rg + r * RG;
      float dot[GT];
#pragma unroll
      for (int g = 0; g < GT; ++g) dot[g] = 0.f;
#pragma unroll
      for (int j = 0; j < CPT; ++j) {
        if (!live(j)) continue;
        float x[VEC];
        pagedkv::unpack16<DT>(k_tile[row * VPR + lane_col + j * LPR], x);
#pragma unroll
        for (int g = 0; g < GT; ++g)
#pragma unroll
          for (int e = 0; e < VEC; ++e) dot[g] = fmaf(q[j][g][e], x[e], dot[g]);
      }
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
            const float send = upper ? dot[i] : dot[i + half];
            const float keep = upper ? dot[i + half] : dot[i];
            dot[i] = keep + __shfl_xor_sync(0xffffffffu, send, o);
          }
          if (upper) g_owned += half;
        }
#pragma unroll
        for (int o = LPR / GT / 2; o > 0; o >>= 1) dot[0] += __shfl_xor_sync(0xffffffffu, dot[0], o);
        if ((lane_col & (LPR / GT - 1)) == 0) s_p[g_owned * TT + row] = row < valid ? dot[0] : PAGEDKV_NEG_INF;
      } else {
#pragma unroll
        for (int g = 0; g < GT; ++g) {
#pragma unroll
          for (int o = LPR / 2; o > 0; o >>= 1) dot[g] += __shfl_xor_sync(0xffffffffu, dot[g], o);
          if (lane_col == 0) s_p[g * TT + row] = row < valid ? dot[g] : PAGEDKV_NEG_INF;
        }
      }
    }
    __syncthreads();

    // online softmax update: warp w owns query heads w, w + NW, ...; rows lane, lane + 32, ...
#pragma unroll
    for (int i = 0; i < GW; ++i) {
      const int g = warp + i * NW;
      if (g < GT) {
        float s[SR], mx = PAGEDKV_NEG_INF;
#pragma unroll
        for (int r = 0; r < SR; ++r) {
          const int row = lane + 32 * r;
          s[r] = row < TT ? s_p[g * TT + row] : PAGEDKV_NEG_INF;
          mx = fmaxf(mx, s[r]);
        }
        const float m_new = fmaxf(m_run[i], pagedkv::warp_max(mx));  // finite: a tile has a valid row
        const float alpha = m_run[i] == m_new ? 1.f : exp2f(m_run[i] - m_new);  // 0 on the first tile
        float psum = 0.f;
#pragma unroll
        for (int r = 0; r < SR; ++r) {
          const int row = lane + 32 * r;
          const float p = exp2f(s[r] - m_new);
          psum += p;
          if (row < TT) s_p[g * TT + row] = p;
        }
        l_run[i] = l_run[i] * alpha + pagedkv::warp_sum(psum);
        m_run[i] = m_new;
        if (lane == 0) s_alpha[g] = alpha;
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
      for (int j = 0; j < CPT; ++j) {
        if (!live(j)) continue;
        float x[VEC];
        pagedkv::unpack16<DT>(v_tile[row * VPR + lane_col + j * LPR], x);  // zero-filled past `valid`
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
template <int DT, int HEAD_DIM, int GT>
struct TileSmem {
  typedef TileShape<DT, HEAD_DIM> S;
  static const int PIPE = 2 * PAGEDKV_V2_STAGES * S::TILE_VECS * 16;   // K and V stages
  static const int RED = S::RG * GT * HEAD_DIM * 4;                    // cross-row-group reduction
  static const int SMALL = 4 * (GT * S::TILE_TOKENS + GT + 2 * GT);    // s_p, s_alpha, s_ml
  static const int Q = PAGEDKV_V2_STAGES * GT * S::VPR * 16;           // kernel 3: q rows per stage
  static const int META = 2 * PAGEDKV_V2_STAGES * 8 * 4;              // kernel 3: tile descriptor ring
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
// grid: (num_partitions, num_kv_heads * q_tiles, batch), block: PAGEDKV_V2_THREADS,
// dynamic shared memory: max(PIPE, RED) + SMALL (TileSmem)
// ================================================================================================
template <int DT, int HEAD_DIM, int GT>
__global__ void __launch_bounds__(PAGEDKV_V2_THREADS, PAGEDKV_V2_MIN_BLOCKS(HEAD_DIM, GT))
paged_attention_v2_kernel(typename KV<DT>::T* __restrict__ out, float* __restrict__ part_out,
                          float* __restrict__ part_max, float* __restrict__ part_sum,
                          const typename KV<DT>::T* __restrict__ q,
                          const typename KV<DT>::T* __restrict__ k_cache,
                          const typename KV<DT>::T* __restrict__ v_cache,
                          const int* __restrict__ block_tables, const int* __restrict__ context_lens,
                          int num_qo_heads, int num_kv_heads, int group_size, int log2_block_size,
                          int max_blocks, int partition_tokens, float scale_log2) {
  typedef KV<DT> kv;
  typedef TileAttention<DT, HEAD_DIM, GT> A;
  typedef TileSmem<DT, HEAD_DIM, GT> M;
  const int TT = A::TT, TILE_VECS = A::S::TILE_VECS, STAGES = PAGEDKV_V2_STAGES;

  // shared memory: [STAGES][TILE_VECS] K, then V (reused for the final cross-row-group reduction),
  // then scores/probabilities [GT][TT], alpha [GT], (max, sum) [GT][2]
  extern __shared__ uint4 smem[];
  float* s_red = reinterpret_cast<float*>(smem);  // [RG][GT][HEAD_DIM], after the loop only
  float* s_p = reinterpret_cast<float*>(reinterpret_cast<char*>(smem) + (M::PIPE > M::RED ? M::PIPE : M::RED));
  float* s_alpha = s_p + GT * TT;
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
           scale_log2);
  a.reset();

  const long long block_elems = ((long long)num_kv_heads << log2_block_size) * HEAD_DIM;
  const long long head_off = ((long long)kv_head << log2_block_size) * HEAD_DIM;
  const unsigned s_base = pagedkv::smem_u32(smem), v_delta = STAGES * TILE_VECS * 16;
  auto load_tile = [&](int tile, int stage) {
    issue_kv_tile<DT, HEAD_DIM>(s_base + stage * TILE_VECS * 16, v_delta, k_cache, v_cache, block_table,
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
      out[head_row * HEAD_DIM + d] = kv::from_float(sum / s_ml[2 * g + 1]);
    else
      part_out[(head_row * num_partitions + part) * HEAD_DIM + d] = sum;
  }
}

// ================================================================================================
// paged_attention_v2_reduce_kernel: merge a sequence's partitions by log-sum-exp.
//   out                         [batch, num_qo_heads, HEAD_DIM]
//   part_out, part_max, part_sum: as written by paged_attention_v2_kernel
//   only the first ceil(context_len / partition_tokens) partitions of a sequence are read
// grid: (num_qo_heads, batch), block: PAGEDKV_REDUCE_THREADS, dynamic shared memory: num_partitions floats
//
//   out = sum_p w_p * part_out[p] / sum_p w_p * part_sum[p],   w_p = exp2(part_max[p] - max_p part_max[p])
//
// Thread layout of the weighted sum: TPR = HEAD_DIM / 4 threads read one partition's row with 16-byte
// loads; the block reads RPB = THREADS / TPR partitions at once (8 for HEAD_DIM 128), so a 64-partition
// merge waits out a few memory latencies, not 64. The RPB partial sums meet in shared memory at the end.
// ================================================================================================
template <int DT, int HEAD_DIM>
__global__ void __launch_bounds__(PAGEDKV_REDUCE_THREADS)
paged_attention_v2_reduce_kernel(typename KV<DT>::T* __restrict__ out, const float* __restrict__ part_out,
                                 const float* __restrict__ part_max, const float* __restrict__ part_sum,
                                 const int* __restrict__ context_lens, int num_qo_heads, int num_partitions,
                                 int partition_tokens) {
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
  const float inv_l = 1.f / pagedkv::block_reduce<false>(l, s_red);  // its barriers also publish s_w

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
// (picture in the file header), made by every thread block from context_lens.
//   out          [batch, num_qo_heads, HEAD_DIM]        sequences that end in the block that began them
//   part_out     [2 * gridDim.x, GT, HEAD_DIM] float32  pieces of split sequences (slot 2*block + first)
//   part_ml      [2 * gridDim.x, GT, 2] float32         (running max in log2 units, sum) of each piece
//   merge_desc   [gridDim.x, 4] int32                   (seq, head0, num_q, pieces) of the split sequence
//                                                       whose first piece is this block's; pieces = 0: none
//   q, k_cache, v_cache, block_tables, context_lens: see the file header; batch = rows of context_lens
//   group_size, scale_log2: as kernel 2;  min_tiles: the fewest tiles a block is given (pieces >= this)
// grid: (num_blocks) = resident thread blocks of the device, block: PAGEDKV_V2_THREADS,
// dynamic shared memory: PIPE + Q + RED + SMALL + META (TileSmem)
//
// Each thread block walks its units in order; the copies run STAGES - 1 tiles ahead of the math, across
// sequence and head-group boundaries (a new piece's q rows travel with its first tile), so the pipeline
// never drains between pieces. Per tile, the issuing side leaves a descriptor in shared memory
// (sequence, heads, valid rows, first/last-of-piece flags) for the math side.
// ================================================================================================
#define PAGEDKV_TILE_FIRST 1       // first tile of this block's piece of the sequence
#define PAGEDKV_TILE_LAST 2        // last tile of the piece
#define PAGEDKV_TILE_SEQ_START 4   // the tile is the sequence's first
#define PAGEDKV_TILE_SEQ_END 8     // the tile is the sequence's last

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

template <int DT, int HEAD_DIM, int GT>
__global__ void __launch_bounds__(PAGEDKV_V2_THREADS, PAGEDKV_V3_MIN_BLOCKS(DT, HEAD_DIM, GT))
paged_attention_v3_kernel(typename KV<DT>::T* __restrict__ out, float* __restrict__ part_out,
                          float* __restrict__ part_ml, int* __restrict__ merge_desc,
                          const typename KV<DT>::T* __restrict__ q,
                          const typename KV<DT>::T* __restrict__ k_cache,
                          const typename KV<DT>::T* __restrict__ v_cache,
                          const int* __restrict__ block_tables, const int* __restrict__ context_lens,
                          int batch, int num_qo_heads, int num_kv_heads, int group_size, int log2_block_size,
                          int max_blocks, int min_tiles, float scale_log2) {
  typedef KV<DT> kv;
  typedef TileAttention<DT, HEAD_DIM, GT> A;
  typedef TileSmem<DT, HEAD_DIM, GT> M;
  const int TT = A::TT, VPR = A::VPR, VEC = A::VEC, TILE_VECS = A::S::TILE_VECS, STAGES = PAGEDKV_V2_STAGES;
  const int QV = GT * VPR;  // q vectors of one piece

  // shared memory: K stages, V stages, q stages [STAGES][GT][VPR], s_red [RG][GT][HEAD_DIM], s_p [GT][TT],
  // s_alpha [GT], s_ml [GT][2], tile descriptors [2 * STAGES][8] int
  extern __shared__ uint4 smem[];
  uint4* s_q = smem + 2 * STAGES * TILE_VECS;
  float* s_red = reinterpret_cast<float*>(s_q + STAGES * QV);
  float* s_p = s_red + M::RED / 4;
  float* s_alpha = s_p + GT * TT;
  float* s_ml = s_alpha + GT;
  int* s_meta = reinterpret_cast<int*>(s_ml + 2 * GT);
  __shared__ int s_scan[PAGEDKV_V2_THREADS / 32];
  __shared__ int s_start[2];
  __shared__ int s_walk[4];  // thread 0's walk: (seq, head group, item's first unit, seq's length)

  const int tid = threadIdx.x;
  const int q_tiles = (group_size + GT - 1) / GT, num_hg = num_kv_heads * q_tiles;
  auto tiles_of = [&](int len) { return len > 0 ? (len + TT - 1) / TT : 0; };

  // plan: tiles of every sequence (thread t sums a contiguous chunk), scanned across the block
  const int chunk = (batch + PAGEDKV_V2_THREADS - 1) / PAGEDKV_V2_THREADS;
  const int lo = min(tid * chunk, batch), hi = min(lo + chunk, batch);
  int local = 0;
  for (int i = lo; i < hi; ++i) local += tiles_of(context_lens[i]);
  int total;
  const int before = block_exclusive_scan(local, s_scan, total);
  // NOTE: unit counts are 64-bit only here; a block's own units and offsets fit 32 bits
  const long long units = (long long)num_hg * total;
  const int per_block = (int)max((units + gridDim.x - 1) / gridDim.x, (long long)max(min_tiles, 1));
  const long long u0 = (long long)blockIdx.x * per_block;
  if (u0 >= units) {  // nothing for this block (uniform: every thread leaves)
    if (tid < 4) merge_desc[4 * blockIdx.x + tid] = 0;
    return;
  }
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

  // The walk over this block's units: thread 0 describes unit u (its item, tile and flags) into the
  // descriptor ring a full pipeline ahead; the copies and the math read the descriptors.
  // NOTE: the walk's state lives in shared memory, not in every thread's registers (the math is at the
  // register cap), and one thread reads context_lens instead of all of them.
  if (tid == 0) { s_walk[0] = s_start[0]; s_walk[1] = hg0; s_walk[2] = s_start[1]; s_walk[3] = context_lens[s_start[0]]; }
  auto describe = [&](int u) {  // thread 0 only
    int w_seq = s_walk[0], w_hg = s_walk[1], w_item = s_walk[2], w_len = s_walk[3];
    int w_n = tiles_of(w_len);
    while (u >= w_item + w_n) {  // next item (zero-length ones are stepped over)
      w_item += w_n;
      if (++w_seq == batch) { w_seq = 0; ++w_hg; }
      w_len = context_lens[w_seq];
      w_n = tiles_of(w_len);
    }
    s_walk[0] = w_seq; s_walk[1] = w_hg; s_walk[2] = w_item; s_walk[3] = w_len;
    const int j = u - w_item;
    const int kv_head = w_hg / q_tiles, q_tile = w_hg - kv_head * q_tiles;
    int* meta = s_meta + (u % (2 * STAGES)) * 8;
    meta[0] = w_seq; meta[1] = kv_head * group_size + q_tile * GT; meta[2] = min(GT, group_size - q_tile * GT);
    meta[3] = j * TT; meta[4] = w_len; meta[6] = kv_head;
    meta[5] = (u == 0 || j == 0 ? PAGEDKV_TILE_FIRST : 0) | (u == num_units - 1 || j == w_n - 1 ? PAGEDKV_TILE_LAST : 0) |
              (j == 0 ? PAGEDKV_TILE_SEQ_START : 0) | (j == w_n - 1 ? PAGEDKV_TILE_SEQ_END : 0);
    if (u == num_units - 1) {  // this block's last unit: does a split sequence start in this block?
      // its pieces: this block's, then one per following block up to the one holding its last tile
      const int pieces = w_item >= 0 && j < w_n - 1 ? (w_item + w_n - 1) / per_block + 1 : 0;
      *reinterpret_cast<int4*>(merge_desc + 4 * blockIdx.x) = make_int4(w_seq, meta[1], meta[2], pieces);
    }
  };

  const long long block_elems = ((long long)num_kv_heads << log2_block_size) * HEAD_DIM;
  const unsigned s_base = pagedkv::smem_u32(smem), v_delta = STAGES * TILE_VECS * 16;
  const unsigned s_qbase = pagedkv::smem_u32(s_q);
  auto issue = [&](int u) {  // every thread: the copies of unit u (K, V, and q if a piece starts)
    const int* meta = s_meta + (u % (2 * STAGES)) * 8;
    const int seq = meta[0], t0 = meta[3], len = meta[4], kv_head = meta[6], stage = u % STAGES;
    issue_kv_tile<DT, HEAD_DIM>(s_base + stage * TILE_VECS * 16, v_delta, k_cache, v_cache,
                                block_tables + (long long)seq * max_blocks, t0, len, block_elems,
                                ((long long)kv_head << log2_block_size) * HEAD_DIM, log2_block_size);
    if (meta[5] & PAGEDKV_TILE_FIRST) {  // the piece's q rows ride with its first tile (rows past num_q: 0)
      const int head0 = meta[1], num_q = meta[2];
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
    // descriptor u + STAGES goes to the ring slot of unit u - STAGES, which nobody reads any more
    if (tid == 0 && u + STAGES < num_units) describe(u + STAGES);
    if (u + STAGES - 1 < num_units) issue(u + STAGES - 1);
    pagedkv::cp_async_commit();
    const int* meta = s_meta + (u % (2 * STAGES)) * 8;
    const int flags = meta[5];  // the same for every thread: the branches below never diverge
    if (flags & PAGEDKV_TILE_FIRST) {  // load q, clear the accumulator
      a.load_q(s_q + stage * QV, GT, scale_log2);
      a.reset();
      seq_start = flags & PAGEDKV_TILE_SEQ_START;
    }
    a.step(smem + stage * TILE_VECS, smem + STAGES * TILE_VECS + stage * TILE_VECS, s_p, s_alpha,
           min(meta[4] - meta[3], TT));
    if (flags & PAGEDKV_TILE_LAST) {  // write the output, or this piece's partial
      const int seq = meta[0], head0 = meta[1], num_q = meta[2];
      const bool whole = seq_start && (flags & PAGEDKV_TILE_SEQ_END);
      const long long slot = 2LL * blockIdx.x + (seq_start ? 1 : 0);
      // NOTE: s_red and s_ml were last read after the previous piece's last tile; every tile since
      // passed three barriers, so writing them now is safe
      a.stage(s_red, s_ml);
      __syncthreads();
      for (int i = tid; i < num_q * HEAD_DIM; i += PAGEDKV_V2_THREADS) {
        const int g = i / HEAD_DIM, d = i - g * HEAD_DIM;
        const float sum = A::reduced_row(s_red, g, d);
        if (whole)
          out[((long long)seq * num_qo_heads + head0 + g) * HEAD_DIM + d] = kv::from_float(sum / s_ml[2 * g + 1]);
        else
          part_out[(slot * GT + g) * HEAD_DIM + d] = sum;
      }
      if (!whole && tid < 2 * num_q) part_ml[slot * GT * 2 + tid] = s_ml[tid];
    }
  }
  pagedkv::cp_async_wait<0>();  // only empty groups can be pending here
}

// ================================================================================================
// paged_attention_v3_merge_kernel: combine the pieces of each sequence kernel 3 split, by log-sum-exp.
//   out            [batch, num_qo_heads, HEAD_DIM]
//   part_out, part_ml, merge_desc: as written by paged_attention_v3_kernel (num_blocks = its grid)
//   gt             the GT of that kernel (rows per slot)
// grid: (gt, num_blocks), block: PAGEDKV_MERGE_THREADS. Block (g, b) merges query head g of the sequence
// whose first piece block b computed, if any: pieces are slots 2b + 1, 2(b+1), 2(b+2), ... (one per block).
//
//   out = sum_p w_p * o_p / sum_p w_p * l_p,   w_p = exp2(m_p - max_p m_p)
// ================================================================================================
template <int DT, int HEAD_DIM>
__global__ void __launch_bounds__(PAGEDKV_MERGE_THREADS)
paged_attention_v3_merge_kernel(typename KV<DT>::T* __restrict__ out, const float* __restrict__ part_out,
                                const float* __restrict__ part_ml, const int* __restrict__ merge_desc,
                                int num_qo_heads, int gt) {
  constexpr int TPR = HEAD_DIM / 4, RPB = PAGEDKV_MERGE_THREADS / TPR;
  static_assert(HEAD_DIM % 4 == 0 && RPB >= 1, "a row must split into float4s");
  __shared__ float s_red[32];
  __shared__ float4 s_acc[RPB][TPR];
  const int g = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
  const int4 desc = reinterpret_cast<const int4*>(merge_desc)[b];  // (seq, head0, num_q, pieces)
  const int n = desc.w;
  if (n == 0 || g >= desc.z) return;  // uniform per block
  auto slot = [&](int p) { return 2LL * (b + p) + (p == 0 ? 1 : 0); };

  float m = PAGEDKV_NEG_INF;
  for (int p = tid; p < n; p += PAGEDKV_MERGE_THREADS) m = fmaxf(m, part_ml[(slot(p) * gt + g) * 2]);
  m = pagedkv::block_reduce<true>(m, s_red);
  float l = 0.f;
  for (int p = tid; p < n; p += PAGEDKV_MERGE_THREADS) {
    const float* ml = part_ml + (slot(p) * gt + g) * 2;
    l += exp2f(ml[0] - m) * ml[1];
  }
  const float inv_l = 1.f / pagedkv::block_reduce<false>(l, s_red);

  // weighted sum: thread (r, c) adds columns 4c..4c+3 of pieces r, r + RPB, ...
  const int r = tid / TPR, c = tid % TPR;
  if (r < RPB) {
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 4
    for (int p = r; p < n; p += RPB) {
      const long long s = slot(p) * gt + g;
      const float w = exp2f(part_ml[s * 2] - m);
      const float4 x = reinterpret_cast<const float4*>(part_out + s * HEAD_DIM)[c];
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
    typename KV<DT>::T* o = out + ((long long)desc.x * num_qo_heads + desc.y + g) * HEAD_DIM + 4 * tid;
    o[0] = KV<DT>::from_float(sum.x * inv_l);
    o[1] = KV<DT>::from_float(sum.y * inv_l);
    o[2] = KV<DT>::from_float(sum.z * inv_l);
    o[3] = KV<DT>::from_float(sum.w * inv_l);
  }
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
