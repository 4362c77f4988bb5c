// paged_attention_tc.cu: decode attention (one query token per sequence) over a paged KV cache, on tensor cores.
//
// Versions (the numbering continues paged_attention.cu's kernels 1-3; opt-in, version=4):
//   paged_attention_tc_kernel  (version 4) mma.sync m16n8k16 for q.k and p.v of a GQA group. One thread block
//                              per (KV partition, KV head, sequence); the group's query heads (G = num_qo_heads
//                              / num_kv_heads, 1..8) are the rows of the MMA's A operand, padded to 16 (the
//                              padding rows are zero and never written). K/V tiles of BLOCK_N = 64 keys are
//                              gathered row by row through the block table into a cp.async ring of STAGES
//                              stages; warp w owns keys 16w .. 16w + 15 of every tile and keeps its own online
//                              softmax (FlashAttention-2 style, registers only); the four warps merge in shared
//                              memory at the end. Split-K: the partition count of kernel 2's plan (shapes
//                              only); each sequence cut into that many pieces of its own length (the length
//                              split, split_tokens 0) or of the table's capacity (split_tokens > 0); a sequence
//                              cut into several partitions leaves partials, merged in the same launch by the
//                              partition that finishes last (kernel 3's fence / count / merge).
//   Float16 / bfloat16 q with a cache of q's type, or an fp8 cache (CT 3 = e4m3, 4 = e5m2: uint8 bytes): the
//   cp.async stages hold the raw bytes and each warp converts its 16 rows of K and V into a 16-bit tile of its
//   own before the MMAs (fp8_convert.cuh, as prefill_attention_v2_fp8_kernel: e5m2 = the top byte of a
//   float16, e4m3 = float16 bits s.0eeee.mmm0000000 = value * 2^-8, the 2^8 and k_scale folded into the
//   softmax scale; under bfloat16 q through float32, exact).
//   fp8 register path (FRAG 1, opt-in: decode_tc.FP8_PATHS "registers"): no converted tile. Each lane reads the
//   raw bytes its MMA fragments need straight from the stage (rows padded by 16 bytes: no bank conflicts at
//   head_dim 128; at 64, 2-way on one lane pair of each quarter-warp's K read) and
//   converts them in registers. K: the head dimension is permuted for Q and K alike (a dot product does not
//   care), so that lane t's fragments of all k16 steps are the HEAD_DIM / 4 contiguous bytes t * HEAD_DIM / 4 ..
//   of its key's row (4 bytes a step: b0 = bytes 0, 1, b1 = bytes 2, 3). V: the output dimensions are permuted
//   (n8 tile j, column c = dimension c * HEAD_DIM / 8 + j), so that lane g's B columns of all n8 tiles are the
//   HEAD_DIM / 8 contiguous bytes g * HEAD_DIM / 8 .. of its 4 key rows (2t, 2t + 1, 2t + 8, 2t + 9); byte j of
//   two rows makes one B register (fp8pair_to_16: one byte permute and the conversion). The permutation is undone
//   when the warps' O rows are staged for their merge. Without the tile path's conversion rows, 3 blocks fit an
//   SM at head_dim 128 (2 on the tile path).
//
// Layouts (one layer):
//   q             [batch, num_qo_heads, HEAD_DIM]  float16 / bfloat16
//   k_cache       [num_blocks, num_kv_heads, block_size, HEAD_DIM]  (v_cache alike), C-contiguous, q's type or
//                 uint8 fp8 bytes
//   block_tables  [batch, max_blocks] int32; entries past a sequence's ceil(len / block_size) are never read
//   context_lens  [batch] int32, in [1, max_blocks * block_size]
//   out           [batch, num_qo_heads, HEAD_DIM]
// Query head h reads KV head h / G. block_size is a power of two (passed as its log2). Block ids are widened to
// 64 bits before they are multiplied into offsets. HEAD_DIM: 64 or 128 (pagedkv.kernels.decode_tc.HEAD_DIMS).
//
// One thread block, one tile of 64 keys (16-bit cache; fp8: the same after the per-warp conversion):
//
//              keys of the tile  0 ........ 15 16 ....... 31 32 ....... 47 48 ....... 63
//                                [  warp 0   ][  warp 1   ][  warp 2   ][  warp 3   ]
//   A = Q   16 x HEAD_DIM    rows 0..G-1 = the group's query heads, rows G..15 = 0 (registers, loaded once)
//   per warp:  S = Q K^T     16 x 16: HEAD_DIM / 16 k-steps x 2 n8 tiles (B = K rows via ldmatrix)
//              mask          keys >= the partition's end -> -inf (the last tile only)
//              softmax       row max over the quad, p = exp2(s c - m c), l, O rescaled when a max moved
//              O += P V      16 x HEAD_DIM: P from the S accumulators (one k16 step), B = V via ldmatrix.trans
//   end:       the 4 warps' (m, l, O) merged in shared memory by log-sum-exp -> out, or a partial
//
// Fragments (PTX ISA, mma.m16n8k16 .row.col; g = lane / 4, t = lane % 4): a[0] = Q[g][2t..], a[2] = Q[g][2t+8..]
// (a[1], a[3]: rows g + 8 >= G: zero); S accumulator d[0..1] = S[g][keys 2t, 2t+1] (d[2..3]: padding rows);
// that accumulator of keys 0-7 and 8-15 is the A fragment of P for the one k16 step of P V. Rows g >= G carry
// zero q, finite scores, and are never written.
//
// Compile-time options (-D): PAGEDKV_TC_STAGES16 (3) / PAGEDKV_TC_STAGES8 (4): cp.async stages of a 16-bit /
// fp8 cache, both fp8 paths (pagedkv.kernels.decode_tc mirrors them and the shared memory sizes).
#include "common.cuh"
#include "mma.cuh"
#include "fp8_convert.cuh"
#include "split_merge.cuh"

#ifndef PAGEDKV_TC_STAGES16
#define PAGEDKV_TC_STAGES16 3  // 16-bit cache: 34 KB a stage at head_dim 128 (K + V, padded rows)
#endif
#ifndef PAGEDKV_TC_STAGES8
#define PAGEDKV_TC_STAGES8 4   // fp8 cache: 16 KB a stage at head_dim 128 (raw bytes)
#endif
#define PAGEDKV_TC_THREADS 128
#define PAGEDKV_TC_WARPS 4
#define PAGEDKV_TC_WARP_N 16                                   // keys per warp per tile
#define PAGEDKV_TC_BLOCK_N (PAGEDKV_TC_WARPS * PAGEDKV_TC_WARP_N)  // keys per tile
#define PAGEDKV_TC_MAX_GROUP 8                                 // query heads per KV head (A rows used)

using pagedkv::KV;

namespace decode_tc {

// Compile-time shape of a version-4 thread block (mirrored by pagedkv.kernels.decode_tc.smem_bytes). FRAG: how
// an fp8 cache reaches the MMAs: 0 a converted 16-bit tile per warp and ldmatrix, 1 fragments built in registers.
template <int DT, int HEAD_DIM, int CT, int FRAG = 0>
struct Tc {
  static constexpr bool FP8 = CT == 3 || CT == 4;
  static constexpr bool REGS = FRAG == 1;                     // the fp8 register path
  static constexpr int FMT = CT == 3 ? 1 : CT == 4 ? 2 : 0;   // fp8_convert.cuh's format code
  static constexpr int THREADS = PAGEDKV_TC_THREADS, BLOCK_N = PAGEDKV_TC_BLOCK_N, WARP_N = PAGEDKV_TC_WARP_N;
  static constexpr int STAGES = FP8 ? PAGEDKV_TC_STAGES8 : PAGEDKV_TC_STAGES16;
  static constexpr int ROW = HEAD_DIM + 8;                    // 16-bit shared row, elements (+16 bytes)
  static constexpr int CPR = HEAD_DIM / 8;                    // 16-byte chunks per 16-bit row
  static constexpr int CPR8 = HEAD_DIM / 16;                  // 16-byte chunks per fp8 row
  static constexpr int ROW8 = HEAD_DIM + (REGS ? 16 : 0);      // fp8 shared row, bytes (register path: padded)
  static constexpr int KB = HEAD_DIM / 4, VB = HEAD_DIM / 8;   // register path: bytes a lane reads of a K / V row
  static constexpr int CHUNKS = BLOCK_N * (FP8 ? CPR8 : CPR);  // copies per tile (K; V alike)
  static constexpr int LOADS = CHUNKS / THREADS;               // per thread
  static constexpr int CONV = WARP_N * CPR8 / 32;              // fp8 chunks a lane converts per tile (K; V alike)
  static constexpr int KSTEPS = HEAD_DIM / 16;                // k16 steps of Q K^T
  static constexpr int NT_O = HEAD_DIM / 8;                   // n8 tiles of O
  // shared memory: the pipeline (16-bit: [STAGES][BLOCK_N][ROW] K, then V; fp8: [STAGES][BLOCK_N][ROW8]
  // bytes K, then V, then (tile path) per warp [WARP_N][ROW] K and V converted), then [STAGES][BLOCK_N] int64
  // row offsets
  static constexpr int STAGE_BYTES = FP8 ? BLOCK_N * ROW8 : BLOCK_N * ROW * 2;  // K (or V) of one stage
  static constexpr int CONV_BYTES = FP8 && !REGS ? PAGEDKV_TC_WARPS * 2 * WARP_N * ROW * 2 : 0;
  static constexpr int PIPE_BYTES = 2 * STAGES * STAGE_BYTES + CONV_BYTES;
  // after the loop the pipeline is reused: [WARPS][MAX_GROUP][HEAD_DIM] O, [WARPS][MAX_GROUP][2] (m, l),
  // [MAX_GROUP][2] (M, out factor / L) of the merge + a dump slot per thread, [THREADS] float4 merge sums
  static constexpr int END_BYTES = PAGEDKV_TC_WARPS * PAGEDKV_TC_MAX_GROUP * (HEAD_DIM + 2) * 4 +
                                   (PAGEDKV_TC_MAX_GROUP * 2 + THREADS) * 4 + THREADS * 16;
  static constexpr int SMEM_BYTES = (PIPE_BYTES > END_BYTES ? PIPE_BYTES : END_BYTES) + STAGES * BLOCK_N * 8;
  // NOTE: blocks per SM the registers are capped for: at head_dim 128 shared memory allows 2 (3 on the fp8
  // register path: <= 168 registers), at 64 4 (<= 128 registers)
  static constexpr int MIN_BLOCKS = HEAD_DIM > 64 ? (REGS ? 3 : 2) : 4;
  static_assert(HEAD_DIM == 64 || HEAD_DIM == 128, "version 4: head_dim 64 or 128");
  static_assert(DT == 1 || DT == 2, "version 4: float16 or bfloat16 q");
  static_assert(CT == DT || FP8, "version 4: a cache of q's type, or fp8");
  static_assert(FRAG == 0 || (REGS && FP8), "version 4: the register path (FRAG 1) reads an fp8 cache");
  static_assert(CHUNKS % THREADS == 0 && (WARP_N * CPR8) % 32 == 0 && BLOCK_N <= THREADS, "tile shapes");
};

template <int CT> struct TcCache { typedef unsigned short T; };
template <> struct TcCache<3> { typedef unsigned char T; };
template <> struct TcCache<4> { typedef unsigned char T; };

}  // namespace decode_tc

// ================================================================================================
// paged_attention_tc_kernel (version 4): tensor-core decode attention for one GQA group, split-K.
//   out          [batch, num_qo_heads, HEAD_DIM]  DT; rows of a sequence written once (directly, or by the merge)
//   part_out     [batch * num_kv_heads * num_partitions, PAGEDKV_TC_MAX_GROUP, HEAD_DIM] float32: unnormalised
//                partial O (rows 0 .. group_size - 1 used) of each (sequence, KV head, partition), slot (seq * num_kv_heads + kv_head) * num_partitions
//                + partition; unused (may be a 1-element dummy) when num_partitions == 1
//   part_ml      [same slots, PAGEDKV_TC_MAX_GROUP, 2] float32: (max in log2 units, sum of exp2(s - max)) per head
//   counters     [batch * num_kv_heads] int32, zero before the launch and zero after it: finished partitions of
//                each (sequence, KV head); the one that brings the count to the sequence's live partitions
//                merges and resets it (so a captured CUDA graph replays)
//   q, k_cache, v_cache, block_tables, context_lens: see the file header (cache elements: TcCache<CT>::T)
//   num_qo_heads, num_kv_heads;  group_size  num_qo_heads / num_kv_heads, 1..8
//   log2_block_size, max_blocks  the block size's log2, block_tables' columns
//   split_tokens  tokens per partition, a multiple of BLOCK_N (the capacity split: the same cut for every
//                sequence; the launcher's default), or 0: each sequence cut into num_partitions pieces of its
//                own length, rounded up to whole tiles (the length split: ceil(len / (num_partitions * BLOCK_N))
//                * BLOCK_N tokens);
//                sequence s has ceil(len / partition_tokens) live partitions (those at or past its end exit)
//   scale_log2   softmax scale * log2(e), times k_scale * unit for an fp8 cache (unit = 256 for e4m3, whose
//                converted tile holds value * 2^-8, else 1): p = exp2(s * scale_log2 - m * scale_log2)
//   v_factor     v_scale * unit for an fp8 cache, 1 otherwise: multiplies O / l at the end
// FRAG (fp8 caches): 0 the converted tile, 1 the register path (file header)
// grid: (num_partitions, num_kv_heads, batch), block: PAGEDKV_TC_THREADS, dynamic shared memory:
// Tc<DT, HEAD_DIM, CT, FRAG>::SMEM_BYTES
// ================================================================================================
template <int DT, int HEAD_DIM, int CT, int FRAG = 0>
__global__ void __launch_bounds__(PAGEDKV_TC_THREADS, (decode_tc::Tc<DT, HEAD_DIM, CT, FRAG>::MIN_BLOCKS))
paged_attention_tc_kernel(unsigned short* __restrict__ out, float* __restrict__ part_out,
                          float* __restrict__ part_ml, int* __restrict__ counters, const unsigned short* __restrict__ q,
                          const typename decode_tc::TcCache<CT>::T* __restrict__ k_cache,
                          const typename decode_tc::TcCache<CT>::T* __restrict__ v_cache,
                          const int* __restrict__ block_tables, const int* __restrict__ context_lens,
                          int num_qo_heads, int num_kv_heads, int group_size, int log2_block_size, int max_blocks,
                          int split_tokens, float scale_log2, float v_factor) {
  using pagedkv::ldsm_x4;
  using pagedkv::ldsm_x4_trans;
  using pagedkv::mma_16816;
  using pagedkv::pack2;
  typedef decode_tc::Tc<DT, HEAD_DIM, CT, FRAG> S;
  constexpr int THREADS = S::THREADS, BLOCK_N = S::BLOCK_N, WARP_N = S::WARP_N, STAGES = S::STAGES;
  constexpr int ROW = S::ROW, KSTEPS = S::KSTEPS, NT_O = S::NT_O, MG = PAGEDKV_TC_MAX_GROUP;
  constexpr int TPR = HEAD_DIM / 4;  // float4 columns of an output row

  extern __shared__ uint4 smem[];
  unsigned char* const s_bytes = reinterpret_cast<unsigned char*>(smem);
  const int pipe_end = S::PIPE_BYTES > S::END_BYTES ? S::PIPE_BYTES : S::END_BYTES;
  long long* const s_off = reinterpret_cast<long long*>(s_bytes + pipe_end);
  const unsigned s_k = pagedkv::smem_u32(smem);          // stage s: K at s_k + s * STAGE_BYTES
  const unsigned s_v = s_k + STAGES * S::STAGE_BYTES;    // ... V at s_v + s * STAGE_BYTES
  __shared__ int s_last;                                 // this block merges the sequence's partitions

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;  // mma fragment coordinates: row g, column pair t4
  const int part = blockIdx.x, kv_head = blockIdx.y, seq = blockIdx.z, num_parts = gridDim.x;
  const int len = context_lens[seq];
  const int partition_tokens =
      split_tokens > 0 ? split_tokens : max(1, (len + num_parts * BLOCK_N - 1) / (num_parts * BLOCK_N)) * BLOCK_N;
  const int start = part * partition_tokens;
  if (start >= len) return;  // a partition past this sequence's end (uniform over the block)
  const int end = min(len, start + partition_tokens);
  const int num_tiles = (end - start + BLOCK_N - 1) / BLOCK_N;
  const int num_live = (len + partition_tokens - 1) / partition_tokens;  // partitions this sequence has
  const int* block_table = block_tables + (long long)seq * max_blocks;
  const int head0 = kv_head * group_size;

  // K/V tile n = keys start + n * BLOCK_N + row. The element offset of each row (block id widened to 64 bits;
  // -1 at or past `end`) is worked out by thread `row` and kept in s_off[stage]: the block id of tile
  // n + STAGES is read early in iteration n, the offset stored at its end (prefill v2's scheme: the table
  // lookup's latency hides behind a tile's math)
  const long long block_elems = ((long long)num_kv_heads << log2_block_size) * HEAD_DIM;
  const long long head_off = ((long long)kv_head << log2_block_size) * HEAD_DIM;
  const int in_block_mask = (1 << log2_block_size) - 1;
  int next_id = -1;
  auto load_id = [&](int n) {
    const int key = start + n * BLOCK_N + tid;
    next_id = tid < BLOCK_N && key < end ? block_table[key >> log2_block_size] : -1;
  };
  auto store_offset = [&](int n) {
    if (tid < BLOCK_N) {
      const int key = start + n * BLOCK_N + tid;
      s_off[(n % STAGES) * BLOCK_N + tid] =
          next_id >= 0 ? next_id * block_elems + head_off + (long long)(key & in_block_mask) * HEAD_DIM : -1;
    }
  };
  auto issue = [&](int n) {  // rows at or past `end` are zero-filled (nothing read)
    const int stage = n % STAGES;
#pragma unroll
    for (int i = 0; i < S::LOADS; ++i) {
      const int c = tid + i * THREADS;
      if constexpr (S::FP8) {  // raw rows of HEAD_DIM bytes (ROW8 apart)
        const int r = c / S::CPR8, col = c - r * S::CPR8;
        const long long off = s_off[stage * BLOCK_N + r];
        const bool valid = off >= 0;
        const long long src = valid ? off + col * 16 : 0;
        const unsigned dst = stage * S::STAGE_BYTES + r * S::ROW8 + col * 16;
        pagedkv::cp_async16(s_k + dst, k_cache + src, valid);
        pagedkv::cp_async16(s_v + dst, v_cache + src, valid);
      } else {  // 16-bit rows padded to ROW elements
        const int r = c / S::CPR, col = c - r * S::CPR;
        const long long off = s_off[stage * BLOCK_N + r];
        const bool valid = off >= 0;
        const long long src = valid ? off + col * 8 : 0;
        const unsigned dst = stage * S::STAGE_BYTES + (r * ROW + col * 8) * 2;
        pagedkv::cp_async16(s_k + dst, k_cache + src, valid);
        pagedkv::cp_async16(s_v + dst, v_cache + src, valid);
      }
    }
  };

  // prologue: the offsets of tiles 0 .. STAGES - 1, then STAGES - 1 tiles in flight (common.cuh)
  pagedkv::ring_prologue<STAGES>(num_tiles, load_id, store_offset, issue);

  // load q: the A fragments of every k16 step, rows g (< group_size; the rest zero) straight from global memory
  // (a[0] = Q[g][16ks + 2t, +1], a[2] = Q[g][16ks + 8 + 2t, +1]; a[1], a[3] are the zero rows g + 8). The fp8
  // register path permutes the head dimension as its K fragments do: a[0] = Q[g][t KB + 4ks, +1], a[2] =
  // Q[g][t KB + 4ks + 2, +3] (one 8-byte load)
  unsigned q_frag[KSTEPS][2];
  {
    const bool real = g < group_size;
    const unsigned* q_row =
        reinterpret_cast<const unsigned*>(q + ((long long)seq * num_qo_heads + head0 + (real ? g : 0)) * HEAD_DIM);
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks) {
      if constexpr (S::REGS) {
        const uint2 w = real ? reinterpret_cast<const uint2*>(q_row)[(S::KB * t4 + 4 * ks) / 4] : make_uint2(0u, 0u);
        q_frag[ks][0] = w.x;
        q_frag[ks][1] = w.y;
      } else {
        q_frag[ks][0] = real ? q_row[ks * 8 + t4] : 0u;
        q_frag[ks][1] = real ? q_row[ks * 8 + 4 + t4] : 0u;
      }
    }
  }

  // this warp's ldmatrix lane addresses (bytes, relative to its 16 key rows): K keys (lane & 7) + 8 * bit 4,
  // dims + 8 * bit 3 (registers 0, 1 = keys 0-7, 2, 3 = keys 8-15); V transposed: keys (lane & 7) + 8 * bit 3,
  // dims + 8 * bit 4 (registers 0, 1 = dims 0-7, 2, 3 = dims 8-15) -- prefill v2's k_lane / v_lane
  const unsigned k_lane = ((((lane >> 4) & 1) * 8 + (lane & 7)) * ROW + ((lane >> 3) & 1) * 8) * 2;
  const unsigned v_lane = ((((lane >> 3) & 1) * 8 + (lane & 7)) * ROW + ((lane >> 4) & 1) * 8) * 2;
  // fp8: this warp's converted K and V rows ([WARP_N][ROW] each) after the raw stages
  const unsigned s_conv = s_k + 2 * STAGES * S::STAGE_BYTES + warp * 2 * WARP_N * ROW * 2;
  unsigned short* const conv_ptr =
      reinterpret_cast<unsigned short*>(s_bytes + 2 * STAGES * S::STAGE_BYTES + warp * 2 * WARP_N * ROW * 2);

  float o_acc[NT_O][4];  // O: [n8 tile of dims][d0, d1 = row g, dims 8j + 2t, +1; d2, d3 = padding row g + 8]
#pragma unroll
  for (int j = 0; j < NT_O; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) o_acc[j][e] = 0.f;
  float m_run = PAGEDKV_NEG_INF, l_run = 0.f;  // row g: running max (raw scores), this lane's partial sum
  const float c = scale_log2;

  // walk the tiles
  for (int n = 0; n < num_tiles; ++n) {
    const bool more = pagedkv::ring_step<STAGES>(n, num_tiles, load_id, issue);  // common.cuh
    const int stage = n % STAGES;
    const int key0 = start + n * BLOCK_N + warp * WARP_N;  // this warp's first key
    if (key0 < end) {  // warp-uniform: a warp whose keys all lie past the end skips the tile
      unsigned k_base = 0, v_base = 0;
      // register path: this warp's raw rows; K words of keys g and 8 + g (bytes KB t .. KB t + KB - 1), V words
      // of keys 2t, 2t + 1, 2t + 8, 2t + 9 (bytes VB g .. VB g + VB - 1), read before the MMAs need them
      unsigned kw[2][S::REGS ? S::KB / 4 : 1], vw[4][S::REGS ? S::VB / 4 : 1];
      if constexpr (S::REGS) {
        const unsigned char* rk = s_bytes + stage * S::STAGE_BYTES + warp * WARP_N * S::ROW8;
        const unsigned char* rv = rk + STAGES * S::STAGE_BYTES;
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
          for (int ch = 0; ch < S::KB / 16; ++ch) {
            const uint4 x = *reinterpret_cast<const uint4*>(rk + (8 * j + g) * S::ROW8 + S::KB * t4 + 16 * ch);
            kw[j][4 * ch] = x.x; kw[j][4 * ch + 1] = x.y; kw[j][4 * ch + 2] = x.z; kw[j][4 * ch + 3] = x.w;
          }
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const unsigned char* src = rv + (2 * t4 + (r & 1) + 8 * (r >> 1)) * S::ROW8 + S::VB * g;
          if constexpr (S::VB == 16) {
            const uint4 x = *reinterpret_cast<const uint4*>(src);
            vw[r][0] = x.x; vw[r][1] = x.y; vw[r][2] = x.z; vw[r][3] = x.w;
          } else {
            const uint2 x = *reinterpret_cast<const uint2*>(src);
            vw[r][0] = x.x; vw[r][1] = x.y;
          }
        }
      } else if constexpr (S::FP8) {
        // convert this warp's 16 raw rows of K and V into its own 16-bit rows (lane: chunks lane, lane + 32, ..)
        const unsigned char* rk = s_bytes + stage * S::STAGE_BYTES + warp * WARP_N * S::ROW8;
#pragma unroll
        for (int i = 0; i < S::CONV; ++i) {
          const int ch = lane + i * 32, r = ch / S::CPR8, col = ch - r * S::CPR8;
#pragma unroll
          for (int kv = 0; kv < 2; ++kv) {
            const uint4 raw =
                *reinterpret_cast<const uint4*>(rk + kv * STAGES * S::STAGE_BYTES + r * S::ROW8 + col * 16);
            uint4 a, b;
            pagedkv::fp8x16_to_16<DT, S::FMT>(raw, a, b);
            uint4* dst = reinterpret_cast<uint4*>(conv_ptr + (kv * WARP_N + r) * ROW + col * 16);
            dst[0] = a;
            dst[1] = b;
          }
        }
        __syncwarp();  // the converted rows are read by other lanes' ldmatrix
        k_base = s_conv;
        v_base = s_conv + WARP_N * ROW * 2;
      } else {  // 16-bit cache
        k_base = s_k + stage * S::STAGE_BYTES + warp * WARP_N * ROW * 2;
        v_base = s_v + stage * S::STAGE_BYTES + warp * WARP_N * ROW * 2;
      }

      // S = Q K^T: s[j] = keys 8j .. 8j + 7 of the warp's 16
      float s[2][4];
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] = 0.f;
#pragma unroll
      for (int ks = 0; ks < KSTEPS; ++ks) {
        const unsigned a[4] = {q_frag[ks][0], 0u, q_frag[ks][1], 0u};
        if constexpr (S::REGS) {  // b0 = K[key][t KB + 4ks, +1], b1 = K[key][t KB + 4ks + 2, +3]: word ks
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            unsigned b0, b1;
            pagedkv::fp8x4_to_16<DT, S::FMT>(kw[j][ks], b0, b1);
            mma_16816<DT>(s[j], a, b0, b1);
          }
        } else {
          unsigned b[4];
          ldsm_x4(b, k_base + k_lane + ks * 16 * 2);
          mma_16816<DT>(s[0], a, b[0], b[1]);
          mma_16816<DT>(s[1], a, b[2], b[3]);
        }
      }

      // mask: keys at or past the partition's end (their rows were zero-filled) -> -inf
      if (key0 + WARP_N > end) {  // warp-uniform
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e)
            s[j][e] = pagedkv::select(key0 + 8 * j + 2 * t4 + e < end, s[j][e], PAGEDKV_NEG_INF);
      }

      // online softmax update, row g (the quad of lanes 4g .. 4g + 3 shares it)
      float mx = fmaxf(fmaxf(s[0][0], s[0][1]), fmaxf(s[1][0], s[1][1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_run, mx);
      // NOTE: an active warp sees at least one real key, so m_new is finite; the guard keeps -inf - -inf away
      const float shift = m_new == PAGEDKV_NEG_INF ? 0.f : m_new * c;
      const float alpha = m_new == m_run ? 1.f : exp2f(m_run * c - shift);  // 0 on the warp's first tile
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          s[j][e] = exp2f(fmaf(s[j][e], c, -shift));
          sum += s[j][e];
        }
      l_run = l_run * alpha + sum;
      m_run = m_new;
      if (__any_sync(0xffffffffu, alpha != 1.f)) {  // warp-uniform: skip the rescale when no max moved
#pragma unroll
        for (int j = 0; j < NT_O; ++j) {
          o_acc[j][0] *= alpha;
          o_acc[j][1] *= alpha;
        }
      }

      // O += P V: the accumulators of keys 0-7 and 8-15 are the A fragment of the one k16 step
      const unsigned a[4] = {pack2<DT>(s[0][0], s[0][1]), 0u, pack2<DT>(s[1][0], s[1][1]), 0u};
      if constexpr (S::REGS) {  // n8 tile j, column g = dimension VB g + j: byte j of the 4 key rows
#pragma unroll
        for (int j = 0; j < NT_O; ++j) {
          const unsigned b0 = pagedkv::fp8pair_to_16<DT, S::FMT>(vw[0][j / 4], vw[1][j / 4], j % 4);
          const unsigned b1 = pagedkv::fp8pair_to_16<DT, S::FMT>(vw[2][j / 4], vw[3][j / 4], j % 4);
          mma_16816<DT>(o_acc[j], a, b0, b1);
        }
      } else {
#pragma unroll
        for (int dp = 0; dp < NT_O / 2; ++dp) {  // dims 16dp .. 16dp + 15: two n8 tiles from one ldmatrix
          unsigned b[4];
          ldsm_x4_trans(b, v_base + v_lane + dp * 16 * 2);
          mma_16816<DT>(o_acc[2 * dp], a, b[0], b[1]);
          mma_16816<DT>(o_acc[2 * dp + 1], a, b[2], b[3]);
        }
      }
    }
    if (more) store_offset(n + STAGES);  // read after the next iteration's barrier
  }
  pagedkv::cp_async_wait<0>();
  __syncthreads();  // every warp is done with the pipeline: it becomes the merge's scratch

  // stage the warps' (m, l, O) rows: [WARPS][MG][HEAD_DIM] O, [WARPS][MG][2] (m in log2 units, l); then the
  // merge's scratch: [MG][2] (max, out factor / sum) + a dump slot per thread, and THREADS float4 sums
  float* const s_o = reinterpret_cast<float*>(smem);
  float* const s_ml = s_o + PAGEDKV_TC_WARPS * MG * HEAD_DIM;
  float* const s_p = s_ml + PAGEDKV_TC_WARPS * MG * 2;
  float4* const s_acc = reinterpret_cast<float4*>(s_p + 2 * MG + THREADS);
  {
    float l = l_run;
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    float* row = s_o + (warp * MG + g) * HEAD_DIM;  // rows g >= group_size: padding, never read
    if constexpr (S::REGS) {  // o_acc[j][e] = O[g][VB (2t + e) + j]: this lane's dims 2 VB t .. 2 VB t + 2 VB - 1
#pragma unroll
      for (int e = 0; e < 2; ++e)
#pragma unroll
        for (int i = 0; i < NT_O / 4; ++i)
          *reinterpret_cast<float4*>(row + S::VB * (2 * t4 + e) + 4 * i) =
              make_float4(o_acc[4 * i][e], o_acc[4 * i + 1][e], o_acc[4 * i + 2][e], o_acc[4 * i + 3][e]);
    } else {
#pragma unroll
      for (int j = 0; j < NT_O; ++j)
        *reinterpret_cast<float2*>(row + 2 * t4 + 8 * j) = make_float2(o_acc[j][0], o_acc[j][1]);
    }
    if (t4 == 0) {
      s_ml[(warp * MG + g) * 2] = m_run * c;  // -inf for a warp that saw no key
      s_ml[(warp * MG + g) * 2 + 1] = l;
    }
  }
  __syncthreads();

  // merge the 4 warps (log-sum-exp) per (head, float4 column): the output (one live partition) or this
  // partition's partial (rows of MG heads per slot: split_merge.cuh's layout with GT = MG)
  const bool split = num_live > 1;
  const long long slot0 = ((long long)seq * num_kv_heads + kv_head) * num_parts, slot = slot0 + part;
  for (int i = tid; i < group_size * TPR; i += THREADS) {
    const int h = i / TPR, col = i - h * TPR;
    float m = PAGEDKV_NEG_INF, l = 0.f;
#pragma unroll
    for (int w = 0; w < PAGEDKV_TC_WARPS; ++w)
      pagedkv::combine_ml(m, l, s_ml[(w * MG + h) * 2], s_ml[(w * MG + h) * 2 + 1]);
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int w = 0; w < PAGEDKV_TC_WARPS; ++w) {
      const float mw = s_ml[(w * MG + h) * 2];
      const float wt = pagedkv::select(mw == m, 1.f, exp2f(mw - m));  // 0 for a warp without keys (m finite)
      const float4 x = reinterpret_cast<const float4*>(s_o + (w * MG + h) * HEAD_DIM)[col];
      acc.x = fmaf(wt, x.x, acc.x); acc.y = fmaf(wt, x.y, acc.y);
      acc.z = fmaf(wt, x.z, acc.z); acc.w = fmaf(wt, x.w, acc.w);
    }
    if (!split) {
      const float inv = v_factor / l;
      unsigned short* o = out + ((long long)seq * num_qo_heads + head0 + h) * HEAD_DIM + 4 * col;
      *reinterpret_cast<uint2*>(o) =
          make_uint2(pack2<DT>(acc.x * inv, acc.y * inv), pack2<DT>(acc.z * inv, acc.w * inv));
    } else {
      reinterpret_cast<float4*>(part_out + (slot * MG + h) * HEAD_DIM)[col] = acc;
      if (col == 0) {
        part_ml[(slot * MG + h) * 2] = m;
        part_ml[(slot * MG + h) * 2 + 1] = l;
      }
    }
  }
  if (!split) return;  // uniform

  // write partial, then count it (threadFenceReduction's pattern); the last partition merges and resets
  __threadfence();  // this thread's partial is visible to the whole device ...
  __syncthreads();  // ... for every thread of the block, before thread 0 counts the partition
  int* const counter = counters + (long long)seq * num_kv_heads + kv_head;
  if (tid == 0) s_last = atomicAdd(counter, 1) == num_live - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();  // the other partitions' partials are read after their counts were seen
  if (tid == 0) *counter = 0;  // every live partition has counted: reset for the next launch (graph replay)
  // the partitions' partials (slots slot0 .. slot0 + num_live - 1) -> out, kernels 2 and 3's merge
  pagedkv::merge_pieces<DT, HEAD_DIM, MG, THREADS>(out, part_out, part_ml, slot0, 1, 0, num_live, seq, head0,
                                                   group_size, num_qo_heads, v_factor, s_p, 2 * MG, s_acc);
}

