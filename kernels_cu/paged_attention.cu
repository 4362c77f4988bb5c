// paged_attention.cu: decode attention (one query token per sequence) over a paged KV cache.
//
// Versions:
//   paged_attention_v1_kernel  two passes, correctness first. One thread block per (query head, sequence);
//                              pass 1 writes every q.k score to a global scratch row and finds the max,
//                              pass 2 turns the scores into probabilities and sums probability * V.
//   paged_attention_v2_kernel  one pass, tuned. One thread block per (KV head, query-head tile, partition,
//                              sequence): K/V tiles are staged into shared memory with 16-byte cp.async in a
//                              multi-stage pipeline, softmax is online (running max and sum, the accumulator
//                              rescaled), fp32 accumulation, and every query head of a GQA group is served
//                              from the same K/V read. Split-K: a long context is cut into partitions that
//                              run in parallel; paged_attention_v2_reduce_kernel merges them by log-sum-exp.
//   check_block_tables_kernel  GPU-side range check of block_tables / context_lens (one reduction).
//
// Kernel 2 compile-time options (-D, one cached module per set; pagedkv/kernels.py mirrors the defaults):
//   PAGEDKV_V2_TILE_BYTES (4096) and PAGEDKV_V2_STAGES (4): tile size and cp.async pipeline depth;
//   PAGEDKV_V2_BUTTERFLY (1): reduce-scatter shuffles for the GQA dots; PAGEDKV_V2_LAZY_RESCALE (1).
//   Measurements behind the defaults: NOTES.md.
//
// Layouts (one layer):
//   q             [batch, num_qo_heads, HEAD_DIM]
//   k_cache       [num_blocks, num_kv_heads, block_size, HEAD_DIM]    (v_cache alike), C-contiguous
//   block_tables  [batch, max_blocks] int32; entries past a sequence's ceil(len / block_size) are never read
//   context_lens  [batch] int32, in [1, max_blocks * block_size]
//   out           [batch, num_qo_heads, HEAD_DIM]
// Query head h reads KV head h / (num_qo_heads / num_kv_heads). block_size is a power of two (passed as
// its log2). Block ids are widened to 64 bits before they are multiplied into offsets.
#include "common.cuh"

#ifndef PAGEDKV_V2_TILE_BYTES
#define PAGEDKV_V2_TILE_BYTES 4096  // bytes of K (and of V) per pipeline stage
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
#define PAGEDKV_V2_THREADS 128

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
// paged_attention_v2_kernel: one-pass tiled decode attention with split-K.
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
// dynamic shared memory: v2_smem_bytes below (mirrored in pagedkv/kernels.py)
//
// Thread layout inside a tile of TILE_TOKENS rows x VPR 16-byte vectors (VPR = row bytes / 16):
//   lane_col = tid % LPR owns vectors lane_col + j*LPR (j < CPT) of each row it touches;
//   row group rg = tid / LPR handles rows rg, rg + RG, ...   The same threads do q.k (reduced across the
//   LPR lanes of a row with shuffles) and p*V (reduced across row groups once, at the end).
// ================================================================================================
template <int DT, int HEAD_DIM>
struct V2Shape {
  static const int VEC = pagedkv::Vec<DT>::N;
  static const int VPR = HEAD_DIM / VEC;                       // 16-byte vectors per K/V row
  static const int LPR = VPR < 32 ? VPR : 32;                   // lanes per row
  static const int CPT = VPR / LPR;                             // vectors per lane per row
  static const int RG = PAGEDKV_V2_THREADS / LPR;               // row groups
  static const int TILE_TOKENS = PAGEDKV_V2_TILE_BYTES / (VPR * 16);
  static const int TILE_VECS = TILE_TOKENS * VPR;
  static const int ROWS = TILE_TOKENS / RG;                     // rows per thread per tile
  static const int LOADS = TILE_VECS / PAGEDKV_V2_THREADS;      // cp.async per thread per tile (K; V alike)
};

// NOTE: min blocks per SM caps registers (4 blocks: <= 128 registers for GT <= 4; 3 blocks for GT = 8,
// 2 for GT = 8 with head_dim 256, which spilled 4 bytes on sm_80 at the 3-block cap);
// with the cap ptxas reports no spills for any instantiation (tests/test_kernels_compile.py checks it).
template <int DT, int HEAD_DIM, int GT>
__global__ void __launch_bounds__(PAGEDKV_V2_THREADS, GT <= 4 ? 4 : (HEAD_DIM == 256 ? 2 : 3))
paged_attention_v2_kernel(typename KV<DT>::T* __restrict__ out, float* __restrict__ part_out,
                          float* __restrict__ part_max, float* __restrict__ part_sum,
                          const typename KV<DT>::T* __restrict__ q,
                          const typename KV<DT>::T* __restrict__ k_cache,
                          const typename KV<DT>::T* __restrict__ v_cache,
                          const int* __restrict__ block_tables, const int* __restrict__ context_lens,
                          int num_qo_heads, int num_kv_heads, int group_size, int log2_block_size,
                          int max_blocks, int partition_tokens, float scale_log2) {
  typedef KV<DT> kv;
  typedef V2Shape<DT, HEAD_DIM> S;
  const int VEC = S::VEC, VPR = S::VPR, LPR = S::LPR, CPT = S::CPT, RG = S::RG;
  const int TILE_TOKENS = S::TILE_TOKENS, TILE_VECS = S::TILE_VECS, ROWS = S::ROWS, STAGES = PAGEDKV_V2_STAGES;
  const int NW = PAGEDKV_V2_THREADS / 32, GW = (GT + NW - 1) / NW;  // query heads per warp in the softmax
  static_assert(ROWS >= 1 && TILE_VECS % PAGEDKV_V2_THREADS == 0, "tile too small for the thread block");
  static_assert(TILE_TOKENS <= 32, "the softmax step gives one row per lane");

  // shared memory: [STAGES][TILE_VECS] K, then V (reused for the final cross-row-group reduction),
  // then scores/probabilities [GT][TILE_TOKENS], alpha [GT], running sum [GT]
  extern __shared__ uint4 smem[];
  uint4* s_k = smem;
  uint4* s_v = smem + STAGES * TILE_VECS;
  float* s_red = reinterpret_cast<float*>(smem);  // [RG][GT][HEAD_DIM], after the loop only
  const int pipe_bytes = 2 * STAGES * TILE_VECS * 16, red_bytes = RG * GT * HEAD_DIM * 4;
  float* s_p = reinterpret_cast<float*>(reinterpret_cast<char*>(smem) + (pipe_bytes > red_bytes ? pipe_bytes : red_bytes));
  float* s_alpha = s_p + GT * TILE_TOKENS;
  float* s_l = s_alpha + GT;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int lane_col = tid % LPR, rg = tid / LPR;
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
  const int num_tiles = (end - start + TILE_TOKENS - 1) / TILE_TOKENS;
  const int* block_table = block_tables + (long long)seq * max_blocks;

  // load q: this thread's columns for every query head of the tile, pre-scaled into log2 units
  float q_reg[CPT][GT][VEC];
#pragma unroll
  for (int g = 0; g < GT; ++g)
#pragma unroll
    for (int j = 0; j < CPT; ++j) {
      float x[VEC];
      if (g < num_q) {
        const uint4 raw = *reinterpret_cast<const uint4*>(
            q + ((long long)seq * num_qo_heads + head0 + g) * HEAD_DIM + (lane_col + j * LPR) * VEC);
        pagedkv::unpack16<DT>(raw, x);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) x[e] = 0.f;
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) q_reg[j][g][e] = x[e] * scale_log2;
    }

  float acc[CPT][GT][VEC];
#pragma unroll
  for (int j = 0; j < CPT; ++j)
#pragma unroll
    for (int g = 0; g < GT; ++g)
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[j][g][e] = 0.f;
  float m_run[GW], l_run[GW];  // owned by warp `warp` for query heads warp + i*NW
#pragma unroll
  for (int i = 0; i < GW; ++i) { m_run[i] = PAGEDKV_NEG_INF; l_run[i] = 0.f; }

  // issue the 16-byte copies of one K tile and one V tile (rows past `end` are zero-filled, never read).
  // NOTE: a thread always copies the same column (VPR divides the thread count), so the kv-head and
  // column part of the address and the shared-memory address are worked out once, not per copy.
  static_assert(PAGEDKV_V2_THREADS % VPR == 0, "a thread must keep its column");
  const long long block_elems = ((long long)num_kv_heads << log2_block_size) * HEAD_DIM;
  const long long head_col_off = ((long long)kv_head << log2_block_size) * HEAD_DIM + (tid % VPR) * VEC;
  const unsigned s_dst = pagedkv::smem_u32(smem) + tid * 16;
  auto load_tile = [&](int tile, int stage) {
    const int t0 = start + tile * TILE_TOKENS;
#pragma unroll
    for (int i = 0; i < S::LOADS; ++i) {
      const int token = t0 + tid / VPR + i * (PAGEDKV_V2_THREADS / VPR);
      const bool valid = token < end;
      long long off = 0;
      if (valid)  // block id widened to 64 bits before the multiply
        off = (long long)block_table[token >> log2_block_size] * block_elems + head_col_off +
              (token & ((1 << log2_block_size) - 1)) * HEAD_DIM;
      const unsigned dst = s_dst + (stage * TILE_VECS + i * PAGEDKV_V2_THREADS) * 16;
      pagedkv::cp_async16(dst, k_cache + off, valid);
      pagedkv::cp_async16(dst + STAGES * TILE_VECS * 16, v_cache + off, valid);
    }
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
    const int stage = tile % STAGES, t0 = start + tile * TILE_TOKENS;
    const uint4* k_tile = s_k + stage * TILE_VECS;
    const uint4* v_tile = s_v + stage * TILE_VECS;

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
        pagedkv::unpack16<DT>(k_tile[row * VPR + lane_col + j * LPR], x);
#pragma unroll
        for (int g = 0; g < GT; ++g)
#pragma unroll
          for (int e = 0; e < VEC; ++e) dot[g] = fmaf(q_reg[j][g][e], x[e], dot[g]);
      }
#if PAGEDKV_V2_BUTTERFLY
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
      if ((lane_col & (LPR / GT - 1)) == 0) s_p[g_owned * TILE_TOKENS + row] = t0 + row < end ? dot[0] : PAGEDKV_NEG_INF;
#else
#pragma unroll
      for (int g = 0; g < GT; ++g) {
#pragma unroll
        for (int o = LPR / 2; o > 0; o >>= 1) dot[g] += __shfl_xor_sync(0xffffffffu, dot[g], o);
        if (lane_col == 0) s_p[g * TILE_TOKENS + row] = t0 + row < end ? dot[g] : PAGEDKV_NEG_INF;
      }
#endif
    }
    __syncthreads();

    // online softmax update: warp w owns query heads w, w + NW, ...; one tile row per lane
#pragma unroll
    for (int i = 0; i < GW; ++i) {
      const int g = warp + i * NW;
      if (g < GT) {
        const float s = lane < TILE_TOKENS ? s_p[g * TILE_TOKENS + lane] : PAGEDKV_NEG_INF;
        const float m_new = fmaxf(m_run[i], pagedkv::warp_max(s));  // finite: a tile has a valid row
        const float p = exp2f(s - m_new);
        const float alpha = m_run[i] == m_new ? 1.f : exp2f(m_run[i] - m_new);  // 0 on the first tile
        l_run[i] = l_run[i] * alpha + pagedkv::warp_sum(p);
        m_run[i] = m_new;
        if (lane < TILE_TOKENS) s_p[g * TILE_TOKENS + lane] = p;
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
        float x[VEC];
        pagedkv::unpack16<DT>(v_tile[row * VPR + lane_col + j * LPR], x);  // zero-filled past `end`
#pragma unroll
        for (int g = 0; g < GT; ++g) {
          const float p = s_p[g * TILE_TOKENS + row];
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[j][g][e] = fmaf(p, x[e], acc[j][g][e]);
        }
      }
    }
  }
  pagedkv::cp_async_wait<0>();
  __syncthreads();  // the pipeline buffers become the reduction buffer

  // reduce the accumulator across row groups: s_red[rg][g][d]
#pragma unroll
  for (int g = 0; g < GT; ++g)
#pragma unroll
    for (int j = 0; j < CPT; ++j)
#pragma unroll
      for (int e = 0; e < VEC; e += 4)
        *reinterpret_cast<float4*>(s_red + (rg * GT + g) * HEAD_DIM + (lane_col + j * LPR) * VEC + e) =
            make_float4(acc[j][g][e], acc[j][g][e + 1], acc[j][g][e + 2], acc[j][g][e + 3]);
#pragma unroll
  for (int i = 0; i < GW; ++i) {
    const int g = warp + i * NW;
    if (g < GT && lane == 0) s_l[g] = l_run[i];
    if (g < num_q && lane == 0 && num_partitions > 1) {
      const long long idx = ((long long)seq * num_qo_heads + head0 + g) * num_partitions + part;
      part_max[idx] = m_run[i];
      part_sum[idx] = l_run[i];
    }
  }
  __syncthreads();

  // write the output (one partition) or this partition's unnormalised partial
  for (int i = tid; i < num_q * HEAD_DIM; i += PAGEDKV_V2_THREADS) {
    const int g = i / HEAD_DIM, d = i % HEAD_DIM;
    float sum = 0.f;
#pragma unroll
    for (int r = 0; r < RG; ++r) sum += s_red[(r * GT + g) * HEAD_DIM + d];
    const long long head_row = (long long)seq * num_qo_heads + head0 + g;
    if (num_partitions == 1)
      out[head_row * HEAD_DIM + d] = kv::from_float(sum / s_l[g]);
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
#define PAGEDKV_REDUCE_THREADS 256

template <int DT, int HEAD_DIM>
__global__ void __launch_bounds__(PAGEDKV_REDUCE_THREADS)
paged_attention_v2_reduce_kernel(typename KV<DT>::T* __restrict__ out, const float* __restrict__ part_out,
                                 const float* __restrict__ part_max, const float* __restrict__ part_sum,
                                 const int* __restrict__ context_lens, int num_qo_heads, int num_partitions,
                                 int partition_tokens) {
  constexpr int TPR = HEAD_DIM / 4, RPB = PAGEDKV_REDUCE_THREADS / TPR;
  static_assert(HEAD_DIM % 4 == 0 && PAGEDKV_REDUCE_THREADS % TPR == 0, "a row must split into float4s");
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
