// prefill_attention_sm90.cu: causal prefill attention over a paged KV cache on Hopper (sm_90a), in the
// FlashAttention-3 structure. Compiles for sm_90a only (wgmma, setmaxnreg): pagedkv/kernels_prefill_sm90.py
// builds it with its own NVRTC call. The plan (heaviest-first work list) and the range check are the
// kernels of prefill_attention.cu; the launch contract (arrays, work list, grid from shapes only) is
// version 2's, so the op is captured in CUDA graphs the same way.
//
// Versions (numbered after prefill_attention.cu's 1-3, one number per prefill kernel of the project):
//   prefill_attention_v4_kernel  warp-specialized: thread block = 3 warpgroups. Warpgroup 0 is the producer
//                                (setmaxnreg.dec: 56 registers): it gathers Q and the paged K/V tiles through
//                                the block table with 16-byte cp.async into 128-byte-swizzled shared tiles,
//                                a STAGES-deep ring per K and V guarded by mbarriers (full: the copies landed,
//                                cp.async.mbarrier.arrive; empty: both consumers are done with the stage).
//                                Warpgroups 1 and 2 are consumers (setmaxnreg.inc: 224 registers), 64 GQA-packed
//                                query rows each: S = Q K^T and O += P V as wgmma (Q, K, V from shared memory
//                                descriptors, P from registers), online softmax in registers; intra-warpgroup
//                                overlap (S(n) and P(n-1) V(n-1) issued back to back, the softmax of S(n) runs
//                                while P V is on the tensor cores) and ping-pong between the two consumers
//                                (named barriers order their GEMM issue, so one's softmax overlaps the other's
//                                GEMMs). 128 x 128 tiles, causal tiles skipped, the diagonal masked.
//                                One thread block per work item. The default at head_dim 128.
//   prefill_attention_v5_kernel  version 4 made persistent (one block per SM walks the heaviest-first work
//                                list in snake order; the K/V ring runs on across items, the producer
//                                gathering the next item's tiles while the consumers finish the current one;
//                                q_empty guards the Q tile, which also stages the output), with the softmax
//                                on ex2.approx.ftz (one MUFU op; exp2f adds a 3-instruction range fix-up per
//                                score) and row max / sum over 4 partials. The default at head_dim 64: +5 % at
//                                8k / 32k over version 4; at head_dim 128 it measured 17 % slower than version 4
//                                in every variant (persistent or not, ping-pong or not, exp2f or not), cause
//                                not found yet (NOTES_prefill.md).
//
// Compile-time options (-D): PAGEDKV_SM90_PINGPONG (1): order the consumers' GEMM issue with named barriers;
// PAGEDKV_SM90_STAGES: the K/V ring depth (the launcher's template argument, 2 at head_dim 128, 4 at 64;
// passed as a define only so that a variant gets its own module); version 5 only: PAGEDKV_SM90_FAST_EXP (1):
// ex2.approx.ftz instead of exp2f; PAGEDKV_SM90_PERSISTENT (1): read by the launcher only: 0 launches one
// block per work item. Not yet measured (a benchmark variant, off by default so that the default stays the
// measured kernel): PAGEDKV_SM90_V4_FAST_EXP (0): version 4 on ex2.approx.ftz.
// NOTE: the SASS of both versions shows ptxas placing the 64 MUFU.EX2 of a tile after the wait for
// P(n-1) V(n-1) (only the mask and the row max run between the two waits), so a consumer's exponentials
// overlap the other consumer's GEMMs (ping-pong) but not its own P V; a register fence plus __syncwarp after
// the exponentials did not move them (ptxas, nvcc 13.0).
//
// Layouts (one layer) and metadata: as prefill_attention.cu (its header draws them):
//   q, out           [num_tokens, num_qo_heads, HEAD_DIM]
//   k_cache, v_cache [num_blocks, num_kv_heads, block_size, HEAD_DIM], C-contiguous
//   block_tables     [num_seqs, max_blocks] int32; query_start_loc [num_seqs + 1]; context_lens [num_seqs]
//   work_list        [capacity, 2] int32 from prefill_plan_kernel (block_m = block_n = 128)
//
// Shared memory (base rounded up to 1024 bytes: the swizzle pattern repeats every 8 rows x 128 bytes):
//   Q  [HEAD_DIM / 64][128 rows][128 B]              one 64-element column block after the other
//   K  [STAGES][HEAD_DIM / 64][128 keys][128 B]      (V alike)
//   mbarriers: q_full, (version 5: q_empty,) k_full[STAGES], v_full[STAGES], k_empty[STAGES], v_empty[STAGES]
// 128-byte swizzle: 16-byte chunk c (0..7) of row r of a column block sits at r * 128 + ((c ^ (r % 8)) * 16),
// the layout wgmma reads as K-major (Q, K: rows = M / N, 64 elements of K per row) and as MN-major (V: rows =
// keys = the K of P V, 64 head dims per row) alike:
//   K-major  descriptor: start + 32 bytes per k16 step inside a column block, SBO = 1024 (8 rows)
//   MN-major descriptor: start + 2048 bytes per k16 step (16 keys), LBO = 128 keys * 128 B (next 64 dims),
//                        SBO = 1024 (next 8 keys)
#include "common.cuh"
#include "mma.cuh"

#ifndef PAGEDKV_SM90_PINGPONG
#define PAGEDKV_SM90_PINGPONG 1
#endif
#ifndef PAGEDKV_SM90_FAST_EXP
#define PAGEDKV_SM90_FAST_EXP 1  // version 5
#endif
#ifndef PAGEDKV_SM90_V4_FAST_EXP
#define PAGEDKV_SM90_V4_FAST_EXP 0  // version 4 (not yet measured on: the default keeps the measured kernel)
#endif
#define PAGEDKV_SM90_THREADS 384
#define PAGEDKV_SM90_BLOCK_M 128
#define PAGEDKV_SM90_BLOCK_N 128
#define PAGEDKV_SM90_PRODUCER_REGS 56
#define PAGEDKV_SM90_CONSUMER_REGS 224

namespace sm90 {

// ---- mbarriers, named barriers, fences -----------------------------------------------------------------

__device__ __forceinline__ void mbar_init(unsigned bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"(bar), "r"(count) : "memory");
}

__device__ __forceinline__ void mbar_arrive(unsigned bar) {
  asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" :: "r"(bar) : "memory");
}

// The barrier's pending count drops by one when every cp.async this thread issued so far has landed.
__device__ __forceinline__ void mbar_arrive_cp_async(unsigned bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" :: "r"(bar) : "memory");
}

// Wait for the completion of the barrier's phase of this parity (k-th completion: parity k & 1).
__device__ __forceinline__ void mbar_wait(unsigned bar, unsigned parity) {
  asm volatile("{\n.reg .pred done;\nWAIT:\n"
               "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
               "@!done bra WAIT;\n}\n" :: "r"(bar), "r"(parity) : "memory");
}

__device__ __forceinline__ void bar_sync(int id, int count) {
  asm volatile("bar.sync %0, %1;\n" :: "r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void bar_arrive(int id, int count) {
  asm volatile("bar.arrive %0, %1;\n" :: "r"(id), "r"(count) : "memory");
}

__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" :: "n"(N) : "memory");
}

// Pin registers in program order around asynchronous wgmma (the compiler sees the asm as synchronous):
// reads after a wait_group stay after it.
template <int J>
__device__ __forceinline__ void reg_fence(float (&r)[J][4]) {
#pragma unroll
  for (int j = 0; j < J; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(r[j][e]) :: "memory");
}

// 64-bit descriptor of a 128-byte-swizzled shared-memory operand (PTX ISA "matrix descriptor"):
// start >> 4 in bits 0-13, LBO >> 4 in 16-29, SBO >> 4 in 32-45, layout 1 (128B swizzle) in bits 62-63.
__device__ __forceinline__ unsigned long long desc_sw128(unsigned addr, unsigned lbo, unsigned sbo) {
  return (unsigned long long)((addr & 0x3FFFF) >> 4) | ((unsigned long long)((lbo & 0x3FFFF) >> 4) << 16) |
         ((unsigned long long)((sbo & 0x3FFFF) >> 4) << 32) | (1ull << 62);
}

// 2^x: one MUFU op (ftz: results under 2^-126 become 0, far below what a 16-bit P keeps; 2^-inf = 0)
template <bool FAST = PAGEDKV_SM90_FAST_EXP>
__device__ __forceinline__ float exp2_fast(float x) {
  if constexpr (FAST) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
  } else {
    return exp2f(x);
  }
}

// Byte offset of 16-byte chunk c (0 .. HEAD_DIM / 8 - 1) of row r in a swizzled tile of `rows` rows.
__device__ __forceinline__ unsigned swz(int r, int c, int rows) {
  return (c >> 3) * rows * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4);
}

using pagedkv::pack2;  // mma.cuh

// ---- wgmma wrappers (sm_90a), generated per shape for float16 and bfloat16 by one macro ------------------
// D[64 x N] (+)= A[64 x 16] B[16 x N] with f32 accumulators; d[j][e] = this thread's fragment: n8 tile j, the
// m16n8 C layout of its warp's 16 rows (e 0-1: row lane / 4, e 2-3: row lane / 4 + 8).
//   ss: A and B K-major in shared memory (descriptors);  rs: A in registers (the m16n8k16 A fragment of the
//   warp's 16 rows), B MN-major in shared memory (imm-trans-b = 1). scale-d = `accumulate` (0: D = A B).
#define PKV_D4(j) "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])
#define PKV_D64 PKV_D4(0), PKV_D4(1), PKV_D4(2), PKV_D4(3), PKV_D4(4), PKV_D4(5), PKV_D4(6), PKV_D4(7)
#define PKV_D128 PKV_D64, PKV_D4(8), PKV_D4(9), PKV_D4(10), PKV_D4(11), PKV_D4(12), PKV_D4(13), PKV_D4(14), PKV_D4(15)
#define PKV_R10(a) "%" #a "0, %" #a "1, %" #a "2, %" #a "3, %" #a "4, %" #a "5, %" #a "6, %" #a "7, %" #a "8, %" #a "9"
#define PKV_R64 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, " PKV_R10(1) ", " PKV_R10(2) ", %30, %31}"
#define PKV_R128 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, " PKV_R10(1) ", " PKV_R10(2) ", " PKV_R10(3) ", " \
  PKV_R10(4) ", " PKV_R10(5) ", %60, %61, %62, %63}"

#define PKV_WGMMA(N, OUTS, REGS, IA, IB, IP)                                                                     \
  template <int DT>                                                                                              \
  __device__ __forceinline__ void wgmma_ss_m64n##N##k16(float (&d)[N / 8][4], unsigned long long desc_a,          \
                                                       unsigned long long desc_b, int accumulate) {              \
    if constexpr (DT == 1)                                                                                       \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #IP ", 0;\nwgmma.mma_async.sync.aligned.m64n" #N          \
                   "k16.f32.f16.f16 " REGS ", %" #IA ", %" #IB ", p, 1, 1, 0, 0;\n}\n"                           \
                   : OUTS : "l"(desc_a), "l"(desc_b), "r"(accumulate));                                          \
    else                                                                                                         \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #IP ", 0;\nwgmma.mma_async.sync.aligned.m64n" #N          \
                   "k16.f32.bf16.bf16 " REGS ", %" #IA ", %" #IB ", p, 1, 1, 0, 0;\n}\n"                         \
                   : OUTS : "l"(desc_a), "l"(desc_b), "r"(accumulate));                                          \
  }

#define PKV_WGMMA_RS(N, OUTS, REGS, A0, A1, A2, A3, IB, IP)                                                      \
  template <int DT>                                                                                              \
  __device__ __forceinline__ void wgmma_rs_m64n##N##k16(float (&d)[N / 8][4], const unsigned (&a)[4],            \
                                                       unsigned long long desc_b, int accumulate) {              \
    if constexpr (DT == 1)                                                                                       \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #IP ", 0;\nwgmma.mma_async.sync.aligned.m64n" #N          \
                   "k16.f32.f16.f16 " REGS ", {%" #A0 ", %" #A1 ", %" #A2 ", %" #A3 "}, %" #IB ", p, 1, 1, 1;\n}\n" \
                   : OUTS : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate));          \
    else                                                                                                         \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #IP ", 0;\nwgmma.mma_async.sync.aligned.m64n" #N          \
                   "k16.f32.bf16.bf16 " REGS ", {%" #A0 ", %" #A1 ", %" #A2 ", %" #A3 "}, %" #IB ", p, 1, 1, 1;\n}\n" \
                   : OUTS : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate));          \
  }

PKV_WGMMA(128, PKV_D128, PKV_R128, 64, 65, 66)                 // S = Q K^T over 128 keys
PKV_WGMMA_RS(64, PKV_D64, PKV_R64, 32, 33, 34, 35, 36, 37)     // O += P V, head_dim 64
PKV_WGMMA_RS(128, PKV_D128, PKV_R128, 64, 65, 66, 67, 68, 69)  // O += P V, head_dim 128

// Element offset of packed row pr of a sequence in q / out: token pr / group, query head kv_head * group + pr % group.
template <int HEAD_DIM>
__device__ __forceinline__ long long packed_row(int q_start, int pr, int group, int num_qo_heads, int kv_head) {
  const int token = pr / group;
  return ((long long)(q_start + token) * num_qo_heads + kv_head * group + (pr - token * group)) * HEAD_DIM;
}

// Work index of this thread block's round r: snake order over the grid (round 0 left to right, round 1 right
// to left, ...), so that the heaviest-first list deals every block near-equal total work. With a grid of
// num_work blocks (not persistent) round 0 is the whole walk.
__device__ __forceinline__ int work_index(int round) {
  const int g = gridDim.x, b = blockIdx.x;
  return round * g + ((round & 1) ? g - 1 - b : b);
}

// One work item: a query tile of BLOCK_M packed rows of one sequence and KV head.
struct Item {
  int kv_head, q_start, rows, m0, num_cached, kv_end, num_tiles;
};

// Item of work index w (w = item * num_kv_heads + kv_head, the heaviest items of every KV head first);
// false past the last item (every later index is empty too: the plan puts empty items last).
template <int BLOCK_M, int BLOCK_N>
__device__ __forceinline__ bool load_item(int w, int num_work, const int* __restrict__ work_list,
                                          const int* __restrict__ query_start_loc,
                                          const int* __restrict__ context_lens, int num_kv_heads, int group,
                                          int& seq, Item& it) {
  if (w >= num_work) return false;
  const int item = w / num_kv_heads;
  seq = work_list[2 * item];
  if (seq < 0) return false;
  it.kv_head = w - item * num_kv_heads;
  it.q_start = query_start_loc[seq];
  const int n_new = query_start_loc[seq + 1] - it.q_start;
  it.num_cached = context_lens[seq] - n_new;
  it.rows = n_new * group;  // packed rows of the sequence
  it.m0 = work_list[2 * item + 1] * BLOCK_M;
  const int m_end = min(it.rows, it.m0 + BLOCK_M);
  it.kv_end = it.num_cached + (m_end - 1) / group + 1;  // keys the tile attends: [0, kv_end)
  it.num_tiles = (it.kv_end + BLOCK_N - 1) / BLOCK_N;
  return true;
}

// The consumer warp's write-out: O / l (l summed over the quad) into the warp's own 16 rows (from r0) of the Q
// tile (swizzled, 16-bit; the tile is free once the last PV is in registers), then 16-byte row chunks to out;
// packed rows from wm0 at or past `rows` are not written. Called after fence_proxy_async by versions 4 and 5.
template <int DT, int HEAD_DIM, int BLOCK_M>
__device__ __forceinline__ void store_output(const float (&o)[HEAD_DIM / 8][4], const float (&l_run)[2],
                                             unsigned char* smem_bytes, int r0, int wm0, int rows, int lane,
                                             unsigned short* __restrict__ out, int q_start, int group,
                                             int num_qo_heads, int kv_head) {
  constexpr int NT_O = HEAD_DIM / 8, CPR = HEAD_DIM / 8;
  const int g = lane >> 2, t4 = lane & 3;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float l = l_run[h];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const float inv = 1.f / l;
    const int r = r0 + g + 8 * h;
#pragma unroll
    for (int j = 0; j < NT_O; ++j)
      *reinterpret_cast<unsigned*>(smem_bytes + swz(r, j, BLOCK_M) + 4 * t4) =
          pack2<DT>(o[j][2 * h] * inv, o[j][2 * h + 1] * inv);
  }
  __syncwarp();
#pragma unroll
  for (int i = lane; i < 16 * CPR; i += 32) {
    const int r = i / CPR, col = i % CPR, pr = wm0 + r;
    if (pr < rows) {
      unsigned short* dst = out + packed_row<HEAD_DIM>(q_start, pr, group, num_qo_heads, kv_head) + col * 8;
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(smem_bytes + swz(r0 + r, col, BLOCK_M));
    }
  }
}

}  // namespace sm90

// ================================================================================================
// prefill_attention_v4_kernel: causal prefill, warp-specialized wgmma (sm_90a), float16 / bfloat16,
// HEAD_DIM 64 or 128.
//   out          [num_tokens, num_qo_heads, HEAD_DIM] (DT) out: only rows some sequence owns are written
//   q            [num_tokens, num_qo_heads, HEAD_DIM] (DT)
//   k_cache      [num_blocks, num_kv_heads, 1 << log2_block_size, HEAD_DIM] (DT); v_cache alike
//   block_tables [num_seqs, max_blocks] int32
//   query_start_loc [num_seqs + 1] int32, context_lens [num_seqs] int32
//   work_list    [capacity, 2] int32 from prefill_plan_kernel(block_m = 128, block_n = 128): (sequence, query
//                tile), heaviest first; sequence -1 = no work
//   num_qo_heads, num_kv_heads, group = num_qo_heads / num_kv_heads, log2_block_size, max_blocks
//   scale_log2   softmax scale * log2(e) > 0
// grid: capacity * num_kv_heads (blockIdx.x = item * num_kv_heads + kv_head), block: 384 (3 warpgroups),
// dynamic shared memory: PAGEDKV_SM90_V4_SMEM_BYTES(HEAD_DIM, STAGES)
// ================================================================================================
#define PAGEDKV_SM90_V4_SMEM_BYTES(HEAD_DIM, STAGES) \
  (1024 + (PAGEDKV_SM90_BLOCK_M + 2 * (STAGES) * PAGEDKV_SM90_BLOCK_N) * (HEAD_DIM) * 2 + 8 * (1 + 4 * (STAGES)))

template <int DT, int HEAD_DIM, int STAGES>
__global__ void __launch_bounds__(PAGEDKV_SM90_THREADS, 1)
prefill_attention_v4_kernel(unsigned short* __restrict__ out, const unsigned short* __restrict__ q,
                            const unsigned short* __restrict__ k_cache, const unsigned short* __restrict__ v_cache,
                            const int* __restrict__ block_tables, const int* __restrict__ query_start_loc,
                            const int* __restrict__ context_lens, const int* __restrict__ work_list,
                            int num_qo_heads, int num_kv_heads, int group, int log2_block_size, int max_blocks,
                            float scale_log2) {
  static_assert(HEAD_DIM == 64 || HEAD_DIM == 128, "wgmma shapes exist for head_dim 64 and 128");
  constexpr int BLOCK_M = PAGEDKV_SM90_BLOCK_M, BLOCK_N = PAGEDKV_SM90_BLOCK_N;
  constexpr int CPR = HEAD_DIM / 8;                   // 16-byte chunks per row
  constexpr int TILE = BLOCK_N * HEAD_DIM * 2;        // bytes of one K (or V) stage
  constexpr int NT_S = BLOCK_N / 8, NT_O = HEAD_DIM / 8, KSTEPS = HEAD_DIM / 16, PSTEPS = BLOCK_N / 16;

  // work item: (sequence, query tile) of this KV head
  const int tid = threadIdx.x;
  const int item = blockIdx.x / num_kv_heads, kv_head = blockIdx.x - item * num_kv_heads;
  const int seq = work_list[2 * item];
  if (seq < 0) return;  // past the last work item (uniform over the block)
  const int tile = work_list[2 * item + 1];
  const int q_start = query_start_loc[seq];
  const int n_new = query_start_loc[seq + 1] - q_start;
  const int num_cached = context_lens[seq] - n_new;
  const int rows = n_new * group;                           // packed rows of this sequence
  const int m0 = tile * BLOCK_M, m_end = min(rows, m0 + BLOCK_M);
  const int kv_end = num_cached + (m_end - 1) / group + 1;  // keys this tile attends: [0, kv_end)
  const int num_tiles = (kv_end + BLOCK_N - 1) / BLOCK_N;

  // shared memory: tiles from a 1024-byte aligned base, then the mbarriers
  extern __shared__ uint4 smem[];
  const unsigned base = (pagedkv::smem_u32(smem) + 1023) & ~1023u;
  const unsigned s_q = base, s_k = s_q + BLOCK_M * HEAD_DIM * 2, s_v = s_k + STAGES * TILE;
  const unsigned q_full = s_v + STAGES * TILE, k_full = q_full + 8, v_full = k_full + 8 * STAGES;
  const unsigned k_empty = v_full + 8 * STAGES, v_empty = k_empty + 8 * STAGES;
  unsigned char* const smem_bytes = reinterpret_cast<unsigned char*>(smem) + (base - pagedkv::smem_u32(smem));
  if (tid == 0) {
    sm90::mbar_init(q_full, 128);
    for (int s = 0; s < STAGES; ++s) {
      sm90::mbar_init(k_full + 8 * s, 128);  // one cp.async arrive per producer thread
      sm90::mbar_init(v_full + 8 * s, 128);
      sm90::mbar_init(k_empty + 8 * s, 8);   // one arrive per consumer warp
      sm90::mbar_init(v_empty + 8 * s, 8);
    }
  }
  __syncthreads();

  if (tid < 128) {
    // ---- producer warpgroup: Q, then K(0), then K(n) and V(n - 1) for n = 1 .., then the last V --------
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" :: "n"(PAGEDKV_SM90_PRODUCER_REGS));
    const int lane = tid & 31, warp = tid >> 5;
    // load q: chunk c = i * 128 + tid -> packed row c / CPR, chunk c % CPR (rows past the sequence zero-filled)
#pragma unroll 4
    for (int i = 0; i < CPR; ++i) {
      const int c = i * 128 + tid, r = c / CPR, col = c % CPR, pr = m0 + r;
      const bool valid = pr < rows;
      const unsigned short* src =
          valid ? q + sm90::packed_row<HEAD_DIM>(q_start, pr, group, num_qo_heads, kv_head) + col * 8 : q;
      pagedkv::cp_async16(s_q + sm90::swz(r, col, BLOCK_M), src, valid);
    }
    sm90::mbar_arrive_cp_async(q_full);

    // K/V tile n: warp w copies keys 32w .. 32w + 31 of the tile; lane l looks up key 32w + l in the block
    // table (its element offset, -1 at or past kv_end: zero-filled, never read) and the warp shares the
    // offsets by shuffles: iteration i copies rows 32w + i * RPI + l / CPR, chunk l % CPR (whole rows per
    // lane group: coalesced reads, one 128-byte shared line per 8 lanes: conflict-free writes)
    constexpr int RPI = 32 / CPR;
    const int* block_table = block_tables + (long long)seq * max_blocks;
    const long long block_elems = ((long long)num_kv_heads << log2_block_size) * HEAD_DIM;
    const long long head_off = ((long long)kv_head << log2_block_size) * HEAD_DIM;
    const int in_block_mask = (1 << log2_block_size) - 1;
    auto row_offset = [&](int n) -> long long {
      const int key = n * BLOCK_N + warp * 32 + lane;
      if (key >= kv_end) return -1;
      return block_table[key >> log2_block_size] * block_elems + head_off + (long long)(key & in_block_mask) * HEAD_DIM;
    };
    auto copy_tile = [&](const unsigned short* __restrict__ cache, unsigned dst_stage, long long off) {
#pragma unroll
      for (int i = 0; i < CPR; ++i) {
        const int rl = i * RPI + lane / CPR, col = lane % CPR, r = warp * 32 + rl;
        const long long o = __shfl_sync(0xffffffffu, off, rl);
        pagedkv::cp_async16(dst_stage + sm90::swz(r, col, BLOCK_N), cache + (o >= 0 ? o + col * 8 : 0), o >= 0);
      }
    };
    auto load = [&](const unsigned short* __restrict__ cache, unsigned s_ring, unsigned full, unsigned empty, int n,
                    long long off) {
      const int stage = n % STAGES;
      if (n >= STAGES) sm90::mbar_wait(empty + 8 * stage, ((n / STAGES) - 1) & 1);
      copy_tile(cache, s_ring + stage * TILE, off);
      sm90::mbar_arrive_cp_async(full + 8 * stage);
    };
    long long off_prev = row_offset(0);
    load(k_cache, s_k, k_full, k_empty, 0, off_prev);
    for (int n = 1; n < num_tiles; ++n) {
      const long long off = row_offset(n);
      load(k_cache, s_k, k_full, k_empty, n, off);
      load(v_cache, s_v, v_full, v_empty, n - 1, off_prev);
      off_prev = off;
    }
    load(v_cache, s_v, v_full, v_empty, num_tiles - 1, off_prev);
    pagedkv::cp_async_wait<0>();
    return;
  }

  // ---- consumer warpgroups 1, 2: 64 packed rows each -----------------------------------------------------
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" :: "n"(PAGEDKV_SM90_CONSUMER_REGS));
  const int cw = (tid >> 7) - 1, wt = tid & 127, lane = tid & 31, warp = wt >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const int wm0 = m0 + cw * 64 + warp * 16;            // this warp's first packed row
  const int warp_first_pos = num_cached + wm0 / group;  // the smallest position among its rows
  int pos[2];                                           // positions of this thread's rows g and g + 8
#pragma unroll
  for (int h = 0; h < 2; ++h) pos[h] = num_cached + (wm0 + g + 8 * h) / group;
  const unsigned q_wg = s_q + cw * 64 * 128;  // this warpgroup's 64 rows of each column block

  float o[NT_O][4], s[NT_S][4], m_run[2], l_run[2], alpha[2];
  unsigned pa[PSTEPS][4];  // P of the previous tile: the A fragments of its P V
#pragma unroll
  for (int j = 0; j < NT_O; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[j][e] = 0.f;
#pragma unroll
  for (int h = 0; h < 2; ++h) { m_run[h] = PAGEDKV_NEG_INF; l_run[h] = 0.f; }
#pragma unroll
  for (int j = 0; j < NT_S; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[j][e] = 0.f;

  // ping-pong: consumer cw issues its GEMMs after bar(1 + cw) and then lets the other one go
  const int my_bar = 1 + cw, other_bar = 2 - cw;
  auto turn_begin = [&]() { if (PAGEDKV_SM90_PINGPONG) sm90::bar_sync(my_bar, 256); };
  auto turn_end = [&]() { if (PAGEDKV_SM90_PINGPONG) sm90::bar_arrive(other_bar, 256); };
  if (PAGEDKV_SM90_PINGPONG && cw == 1) sm90::bar_arrive(other_bar, 256);  // consumer 0 goes first

  auto release = [&](unsigned bar) {  // this warp is done with a stage (its wgmma reads completed)
    __syncwarp();
    if (lane == 0) sm90::mbar_arrive(bar);
  };
  auto wait_full = [&](unsigned full, int n) {
    sm90::mbar_wait(full + 8 * (n % STAGES), (n / STAGES) & 1);
    sm90::fence_proxy_async();  // cp.async (generic proxy) writes -> wgmma (async proxy) reads
  };
  auto issue_qk = [&](int n) {  // S = Q K(n)^T; the first k16 step overwrites S
    const unsigned k_tile = s_k + (n % STAGES) * TILE;
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks) {
      const unsigned koff = (ks & 3) * 32;  // 16 elements along the 128-byte row of column block ks / 4
      sm90::wgmma_ss_m64n128k16<DT>(s, sm90::desc_sw128(q_wg + (ks >> 2) * BLOCK_M * 128 + koff, 16, 1024),
                                   sm90::desc_sw128(k_tile + (ks >> 2) * BLOCK_N * 128 + koff, 16, 1024), ks);
    }
    sm90::wgmma_commit();
  };
  auto issue_pv = [&](int n) {  // O += P(n) V(n)
    const unsigned v_tile = s_v + (n % STAGES) * TILE;
#pragma unroll
    for (int kk = 0; kk < PSTEPS; ++kk) {
      const unsigned long long desc = sm90::desc_sw128(v_tile + kk * 16 * 128, BLOCK_N * 128, 1024);
      if constexpr (HEAD_DIM == 64) sm90::wgmma_rs_m64n64k16<DT>(o, pa[kk], desc, 1);
      else sm90::wgmma_rs_m64n128k16<DT>(o, pa[kk], desc, 1);
    }
    sm90::wgmma_commit();
  };
  // mask the diagonal, then the online softmax statistics of S(n): p = exp2(s * c - m * c) in place, the row
  // sums rescaled by alpha = exp2((m_old - m_new) * c); returns whether a row of this warp moved its max
  auto softmax = [&](int n) -> bool {
    sm90::reg_fence(s);
    const int n0 = n * BLOCK_N;
    if (n0 + BLOCK_N - 1 > warp_first_pos) {
#pragma unroll
      for (int j = 0; j < NT_S; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (n0 + j * 8 + 2 * t4 + (e & 1) > pos[e >> 1]) s[j][e] = PAGEDKV_NEG_INF;
    }
    bool moved = false;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float mx = PAGEDKV_NEG_INF;
#pragma unroll
      for (int j = 0; j < NT_S; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * h], s[j][2 * h + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_run[h], mx);
      // NOTE: every row sees key 0 in tile 0, so m_new is finite; the guard keeps -inf - -inf out anyway
      const float shift = m_new == PAGEDKV_NEG_INF ? 0.f : m_new * scale_log2;
      alpha[h] = m_new == m_run[h] ? 1.f : sm90::exp2_fast<PAGEDKV_SM90_V4_FAST_EXP>(m_run[h] * scale_log2 - shift);
      moved |= alpha[h] != 1.f;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < NT_S; ++j)
#pragma unroll
        for (int e = 2 * h; e < 2 * h + 2; ++e) {
          const float p = sm90::exp2_fast<PAGEDKV_SM90_V4_FAST_EXP>(fmaf(s[j][e], scale_log2, -shift));
          s[j][e] = p;
          sum += p;
        }
      l_run[h] = l_run[h] * alpha[h] + sum;
      m_run[h] = m_new;
    }
    return moved;
  };
  auto rescale = [&](bool moved) {
    if (__any_sync(0xffffffffu, moved)) {
#pragma unroll
      for (int j = 0; j < NT_O; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[j][e] *= alpha[e >> 1];
    }
  };
  auto pack_p = [&]() {
#pragma unroll
    for (int kk = 0; kk < PSTEPS; ++kk) {
      pa[kk][0] = sm90::pack2<DT>(s[2 * kk][0], s[2 * kk][1]);          // row g,     keys 2t, 2t+1
      pa[kk][1] = sm90::pack2<DT>(s[2 * kk][2], s[2 * kk][3]);          // row g + 8, keys 2t, 2t+1
      pa[kk][2] = sm90::pack2<DT>(s[2 * kk + 1][0], s[2 * kk + 1][1]);  // row g,     keys 2t+8, 2t+9
      pa[kk][3] = sm90::pack2<DT>(s[2 * kk + 1][2], s[2 * kk + 1][3]);  // row g + 8, keys 2t+8, 2t+9
    }
  };

  sm90::mbar_wait(q_full, 0);
  sm90::fence_proxy_async();

  // tile 0: S(0), softmax, P(0)
  wait_full(k_full, 0);
  turn_begin();
  sm90::wgmma_fence();
  issue_qk(0);
  turn_end();
  sm90::wgmma_wait<0>();
  release(k_empty);
  softmax(0);
  pack_p();
  // tiles 1 ..: S(n) and P(n-1) V(n-1) in flight together; the softmax of S(n) runs under P V
  for (int n = 1; n < num_tiles; ++n) {
    wait_full(k_full, n);
    wait_full(v_full, n - 1);  // NOTE: before the GEMMs: a wait loop between two wgmma would serialize them
    turn_begin();
    sm90::wgmma_fence();
    issue_qk(n);
    issue_pv(n - 1);
    turn_end();
    sm90::wgmma_wait<1>();  // S(n) landed
    release(k_empty + 8 * (n % STAGES));
    const bool moved = softmax(n);
    sm90::wgmma_wait<0>();  // P(n-1) V(n-1) is in O: pa and the V stage are free
    sm90::reg_fence(o);
    release(v_empty + 8 * ((n - 1) % STAGES));
    rescale(moved);
    pack_p();
  }
  // the last tile's P V
  wait_full(v_full, num_tiles - 1);
  if (PAGEDKV_SM90_PINGPONG) sm90::bar_sync(my_bar, 256);
  sm90::wgmma_fence();
  issue_pv(num_tiles - 1);
  if (PAGEDKV_SM90_PINGPONG && cw == 0) sm90::bar_arrive(other_bar, 256);  // consumer 1 issues the last GEMM
  sm90::wgmma_wait<0>();
  sm90::reg_fence(o);

  // write out: O / l (l summed over the quad) into this warp's own 16 rows of the Q tile (swizzled, 16-bit),
  // then 16-byte row chunks to out; rows past the sequence are not written
  sm90::fence_proxy_async();
  const int r0 = cw * 64 + warp * 16;  // the warp's first row in the tile
  sm90::store_output<DT, HEAD_DIM, BLOCK_M>(o, l_run, smem_bytes, r0, wm0, rows, lane, out, q_start, group,
                                            num_qo_heads, kv_head);
}

// ================================================================================================
// prefill_attention_v5_kernel: version 4, persistent, with the faster softmax (float16 / bfloat16, HEAD_DIM 64
// or 128).
//   out          [num_tokens, num_qo_heads, HEAD_DIM] (DT) out: only rows some sequence owns are written
//   q            [num_tokens, num_qo_heads, HEAD_DIM] (DT)
//   k_cache      [num_blocks, num_kv_heads, 1 << log2_block_size, HEAD_DIM] (DT); v_cache alike
//   block_tables [num_seqs, max_blocks] int32
//   query_start_loc [num_seqs + 1] int32, context_lens [num_seqs] int32
//   work_list    [capacity, 2] int32 from prefill_plan_kernel(block_m = 128, block_n = 128): (sequence, query
//                tile), heaviest first; sequence -1 = no work
//   num_work     capacity * num_kv_heads: work index w = item * num_kv_heads + kv_head
//   num_qo_heads, num_kv_heads, group = num_qo_heads / num_kv_heads, log2_block_size, max_blocks
//   scale_log2   softmax scale * log2(e) > 0
// grid: min(num_work, number of SMs) (persistent: each block walks work indices in snake order, see
// work_index), or num_work (one item per block); block: 384 (3 warpgroups); dynamic shared memory:
// PAGEDKV_SM90_V5_SMEM_BYTES(HEAD_DIM, STAGES).
// The K/V ring runs on across items: the producer gathers the next item's tiles while the consumers finish
// the current one; it reloads Q after both consumers have written their output out of the Q tile (q_empty).
// ================================================================================================
#define PAGEDKV_SM90_V5_SMEM_BYTES(HEAD_DIM, STAGES) \
  (1024 + (PAGEDKV_SM90_BLOCK_M + 2 * (STAGES) * PAGEDKV_SM90_BLOCK_N) * (HEAD_DIM) * 2 + 8 * (2 + 4 * (STAGES)))

template <int DT, int HEAD_DIM, int STAGES>
__global__ void __launch_bounds__(PAGEDKV_SM90_THREADS, 1)
prefill_attention_v5_kernel(unsigned short* __restrict__ out, const unsigned short* __restrict__ q,
                            const unsigned short* __restrict__ k_cache, const unsigned short* __restrict__ v_cache,
                            const int* __restrict__ block_tables, const int* __restrict__ query_start_loc,
                            const int* __restrict__ context_lens, const int* __restrict__ work_list, int num_work,
                            int num_qo_heads, int num_kv_heads, int group, int log2_block_size, int max_blocks,
                            float scale_log2) {
  static_assert(HEAD_DIM == 64 || HEAD_DIM == 128, "wgmma shapes exist for head_dim 64 and 128");
  constexpr int BLOCK_M = PAGEDKV_SM90_BLOCK_M, BLOCK_N = PAGEDKV_SM90_BLOCK_N;
  constexpr int CPR = HEAD_DIM / 8;                   // 16-byte chunks per row
  constexpr int TILE = BLOCK_N * HEAD_DIM * 2;        // bytes of one K (or V) stage
  constexpr int NT_S = BLOCK_N / 8, NT_O = HEAD_DIM / 8, KSTEPS = HEAD_DIM / 16, PSTEPS = BLOCK_N / 16;
  const int tid = threadIdx.x;

  // shared memory: tiles from a 1024-byte aligned base, then the mbarriers
  extern __shared__ uint4 smem[];
  const unsigned base = (pagedkv::smem_u32(smem) + 1023) & ~1023u;
  const unsigned s_q = base, s_k = s_q + BLOCK_M * HEAD_DIM * 2, s_v = s_k + STAGES * TILE;
  const unsigned q_full = s_v + STAGES * TILE, q_empty = q_full + 8, k_full = q_empty + 8;
  const unsigned v_full = k_full + 8 * STAGES, k_empty = v_full + 8 * STAGES, v_empty = k_empty + 8 * STAGES;
  unsigned char* const smem_bytes = reinterpret_cast<unsigned char*>(smem) + (base - pagedkv::smem_u32(smem));
  if (tid == 0) {
    sm90::mbar_init(q_full, 128);  // one cp.async arrive per producer thread
    sm90::mbar_init(q_empty, 8);   // one arrive per consumer warp
    for (int s = 0; s < STAGES; ++s) {
      sm90::mbar_init(k_full + 8 * s, 128);
      sm90::mbar_init(v_full + 8 * s, 128);
      sm90::mbar_init(k_empty + 8 * s, 8);
      sm90::mbar_init(v_empty + 8 * s, 8);
    }
  }
  __syncthreads();
  int seq;
  sm90::Item it;

  if (tid < 128) {
    // ---- producer warpgroup: per item K(0), Q, then K(n) and V(n - 1) for n = 1 .., then the last V ---
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" :: "n"(PAGEDKV_SM90_PRODUCER_REGS));
    const int lane = tid & 31, warp = tid >> 5;
    constexpr int RPI = 32 / CPR;  // rows per copy instruction of a warp
    const long long block_elems = ((long long)num_kv_heads << log2_block_size) * HEAD_DIM;
    const int in_block_mask = (1 << log2_block_size) - 1;
    int kt = 0, vt = 0;  // K / V tiles loaded so far, all items together (ring slot = count % STAGES)
    for (int round = 0; sm90::load_item<BLOCK_M, BLOCK_N>(sm90::work_index(round), num_work, work_list,
                                                          query_start_loc, context_lens, num_kv_heads, group, seq,
                                                          it); ++round) {
      // K/V tile n: warp w copies keys 32w .. 32w + 31 of the tile; lane l looks up key 32w + l in the block
      // table (its element offset, -1 at or past kv_end: zero-filled, never read) and the warp shares the
      // offsets by shuffles: iteration i copies rows 32w + i * RPI + l / CPR, chunk l % CPR (whole rows per
      // lane group: coalesced reads, one 128-byte shared line per 8 lanes: conflict-free writes)
      const int* block_table = block_tables + (long long)seq * max_blocks;
      const long long head_off = ((long long)it.kv_head << log2_block_size) * HEAD_DIM;
      auto row_offset = [&](int n) -> long long {
        const int key = n * BLOCK_N + warp * 32 + lane;
        if (key >= it.kv_end) return -1;
        return block_table[key >> log2_block_size] * block_elems + head_off +
               (long long)(key & in_block_mask) * HEAD_DIM;
      };
      auto load = [&](const unsigned short* __restrict__ cache, unsigned s_ring, unsigned full, unsigned empty,
                      int& count, long long off) {
        const int stage = count % STAGES;
        if (count >= STAGES) sm90::mbar_wait(empty + 8 * stage, ((count / STAGES) - 1) & 1);
        const unsigned dst = s_ring + stage * TILE;
#pragma unroll
        for (int i = 0; i < CPR; ++i) {
          const int rl = i * RPI + lane / CPR, col = lane % CPR, r = warp * 32 + rl;
          const long long o = __shfl_sync(0xffffffffu, off, rl);
          pagedkv::cp_async16(dst + sm90::swz(r, col, BLOCK_N), cache + (o >= 0 ? o + col * 8 : 0), o >= 0);
        }
        sm90::mbar_arrive_cp_async(full + 8 * stage);
        ++count;
      };
      long long off_prev = row_offset(0);
      load(k_cache, s_k, k_full, k_empty, kt, off_prev);  // K(0) may land while the consumers finish an item

      // load q once both consumers are done with the previous item's Q tile (they stage their output there):
      // chunk c = i * 128 + tid -> packed row c / CPR, chunk c % CPR (rows past the sequence zero-filled)
      if (round > 0) sm90::mbar_wait(q_empty, (round - 1) & 1);
#pragma unroll 4
      for (int i = 0; i < CPR; ++i) {
        const int c = i * 128 + tid, r = c / CPR, col = c % CPR, pr = it.m0 + r;
        const bool valid = pr < it.rows;
        const unsigned short* src =
            valid ? q + sm90::packed_row<HEAD_DIM>(it.q_start, pr, group, num_qo_heads, it.kv_head) + col * 8 : q;
        pagedkv::cp_async16(s_q + sm90::swz(r, col, BLOCK_M), src, valid);
      }
      sm90::mbar_arrive_cp_async(q_full);
      for (int n = 1; n < it.num_tiles; ++n) {
        const long long off = row_offset(n);
        load(k_cache, s_k, k_full, k_empty, kt, off);
        load(v_cache, s_v, v_full, v_empty, vt, off_prev);
        off_prev = off;
      }
      load(v_cache, s_v, v_full, v_empty, vt, off_prev);
    }
    pagedkv::cp_async_wait<0>();
    return;
  }

  // ---- consumer warpgroups 1, 2: 64 packed rows each -----------------------------------------------------
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" :: "n"(PAGEDKV_SM90_CONSUMER_REGS));
  const int cw = (tid >> 7) - 1, wt = tid & 127, lane = tid & 31, warp = wt >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const int r0 = cw * 64 + warp * 16;         // this warp's first row in the tile
  const unsigned q_wg = s_q + cw * 64 * 128;  // this warpgroup's 64 rows of each column block
  // ping-pong: consumer cw issues its GEMMs after bar(1 + cw) and then lets the other one go
  const int my_bar = 1 + cw, other_bar = 2 - cw;

  float o[NT_O][4], s[NT_S][4], m_run[2], l_run[2], alpha[2];
  unsigned pa[PSTEPS][4];  // P of the previous tile: the A fragments of its P V
#pragma unroll
  for (int j = 0; j < NT_S; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[j][e] = 0.f;
  int kc = 0, vc = 0;  // K / V tiles consumed so far, all items together

  auto turn_begin = [&]() { if (PAGEDKV_SM90_PINGPONG) sm90::bar_sync(my_bar, 256); };
  auto turn_end = [&]() { if (PAGEDKV_SM90_PINGPONG) sm90::bar_arrive(other_bar, 256); };
  auto release = [&](unsigned bar) {  // this warp is done with a stage (its wgmma reads completed)
    __syncwarp();
    if (lane == 0) sm90::mbar_arrive(bar);
  };
  auto wait_full = [&](unsigned full, int count) {
    sm90::mbar_wait(full + 8 * (count % STAGES), (count / STAGES) & 1);
    sm90::fence_proxy_async();  // cp.async (generic proxy) writes -> wgmma (async proxy) reads
  };
  auto issue_qk = [&](int count) {  // S = Q K^T for K stage count % STAGES; the first k16 step overwrites S
    const unsigned k_tile = s_k + (count % STAGES) * TILE;
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks) {
      const unsigned koff = (ks & 3) * 32;  // 16 elements along the 128-byte row of column block ks / 4
      sm90::wgmma_ss_m64n128k16<DT>(s, sm90::desc_sw128(q_wg + (ks >> 2) * BLOCK_M * 128 + koff, 16, 1024),
                                   sm90::desc_sw128(k_tile + (ks >> 2) * BLOCK_N * 128 + koff, 16, 1024), ks);
    }
    sm90::wgmma_commit();
  };
  auto issue_pv = [&](int count) {  // O += P V for V stage count % STAGES
    const unsigned v_tile = s_v + (count % STAGES) * TILE;
#pragma unroll
    for (int kk = 0; kk < PSTEPS; ++kk) {
      const unsigned long long desc = sm90::desc_sw128(v_tile + kk * 16 * 128, BLOCK_N * 128, 1024);
      if constexpr (HEAD_DIM == 64) sm90::wgmma_rs_m64n64k16<DT>(o, pa[kk], desc, 1);
      else sm90::wgmma_rs_m64n128k16<DT>(o, pa[kk], desc, 1);
    }
    sm90::wgmma_commit();
  };
  auto rescale = [&](bool moved) {
    if (__any_sync(0xffffffffu, moved)) {
#pragma unroll
      for (int j = 0; j < NT_O; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[j][e] *= alpha[e >> 1];
    }
  };
  auto pack_p = [&]() {
#pragma unroll
    for (int kk = 0; kk < PSTEPS; ++kk) {
      pa[kk][0] = sm90::pack2<DT>(s[2 * kk][0], s[2 * kk][1]);          // row g,     keys 2t, 2t+1
      pa[kk][1] = sm90::pack2<DT>(s[2 * kk][2], s[2 * kk][3]);          // row g + 8, keys 2t, 2t+1
      pa[kk][2] = sm90::pack2<DT>(s[2 * kk + 1][0], s[2 * kk + 1][1]);  // row g,     keys 2t+8, 2t+9
      pa[kk][3] = sm90::pack2<DT>(s[2 * kk + 1][2], s[2 * kk + 1][3]);  // row g + 8, keys 2t+8, 2t+9
    }
  };

  for (int round = 0; sm90::load_item<BLOCK_M, BLOCK_N>(sm90::work_index(round), num_work, work_list,
                                                        query_start_loc, context_lens, num_kv_heads, group, seq,
                                                        it); ++round) {
    const int wm0 = it.m0 + r0;                              // this warp's first packed row
    const int warp_first_pos = it.num_cached + wm0 / group;  // the smallest position among its rows
    int pos[2];                                              // positions of this thread's rows g and g + 8
#pragma unroll
    for (int h = 0; h < 2; ++h) pos[h] = it.num_cached + (wm0 + g + 8 * h) / group;
#pragma unroll
    for (int j = 0; j < NT_O; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[j][e] = 0.f;
#pragma unroll
    for (int h = 0; h < 2; ++h) { m_run[h] = PAGEDKV_NEG_INF; l_run[h] = 0.f; }

    // mask the diagonal, then the online softmax statistics of S(n): p = exp2(s * c - m * c) in place, the
    // row sums rescaled by alpha = exp2((m_old - m_new) * c); returns whether a row of this warp moved its max
    auto softmax = [&](int n) -> bool {
      sm90::reg_fence(s);
      const int n0 = n * BLOCK_N;
      if (n0 + BLOCK_N - 1 > warp_first_pos) {
#pragma unroll
        for (int j = 0; j < NT_S; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (n0 + j * 8 + 2 * t4 + (e & 1) > pos[e >> 1]) s[j][e] = PAGEDKV_NEG_INF;
      }
      bool moved = false;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        // NOTE: row max and sum over 4 independent partials (dependency chains of NT_S / 4 instead of NT_S:
        // two consumer warps per scheduler leave little else to issue while a chain waits)
        float mx4[4] = {PAGEDKV_NEG_INF, PAGEDKV_NEG_INF, PAGEDKV_NEG_INF, PAGEDKV_NEG_INF};
#pragma unroll
        for (int j = 0; j < NT_S; ++j) mx4[j & 3] = fmaxf(mx4[j & 3], fmaxf(s[j][2 * h], s[j][2 * h + 1]));
        float mx = fmaxf(fmaxf(mx4[0], mx4[1]), fmaxf(mx4[2], mx4[3]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m_run[h], mx);
        // NOTE: every row sees key 0 in tile 0, so m_new is finite; the guard keeps -inf - -inf out anyway
        const float shift = m_new == PAGEDKV_NEG_INF ? 0.f : m_new * scale_log2;
        alpha[h] = m_new == m_run[h] ? 1.f : sm90::exp2_fast(m_run[h] * scale_log2 - shift);
        moved |= alpha[h] != 1.f;
        float sum4[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int j = 0; j < NT_S; ++j)
#pragma unroll
          for (int e = 2 * h; e < 2 * h + 2; ++e) {
            const float p = sm90::exp2_fast(fmaf(s[j][e], scale_log2, -shift));
            s[j][e] = p;
            sum4[j & 3] += p;
          }
        l_run[h] = l_run[h] * alpha[h] + ((sum4[0] + sum4[1]) + (sum4[2] + sum4[3]));
        m_run[h] = m_new;
      }
        return moved;
    };

    if (PAGEDKV_SM90_PINGPONG && cw == 1) sm90::bar_arrive(other_bar, 256);  // consumer 0 goes first
    sm90::mbar_wait(q_full, round & 1);
    sm90::fence_proxy_async();

    // tile 0: S(0), softmax, P(0)
    wait_full(k_full, kc);
    turn_begin();
    sm90::wgmma_fence();
    issue_qk(kc);
    turn_end();
    sm90::wgmma_wait<0>();
    release(k_empty + 8 * (kc % STAGES));
    ++kc;
    softmax(0);
    pack_p();
    // tiles 1 ..: S(n) and P(n-1) V(n-1) in flight together; the softmax of S(n) runs under P V
    for (int n = 1; n < it.num_tiles; ++n) {
      wait_full(k_full, kc);
      wait_full(v_full, vc);  // NOTE: before the GEMMs: a wait loop between two wgmma would serialize them
      turn_begin();
      sm90::wgmma_fence();
      issue_qk(kc);
      issue_pv(vc);
      turn_end();
      sm90::wgmma_wait<1>();  // S(n) landed
      release(k_empty + 8 * (kc % STAGES));
      ++kc;
      const bool moved = softmax(n);
      sm90::wgmma_wait<0>();  // P(n-1) V(n-1) is in O: pa and the V stage are free
      sm90::reg_fence(o);
      release(v_empty + 8 * (vc % STAGES));
      ++vc;
      rescale(moved);
      pack_p();
    }
    // the last tile's P V
    wait_full(v_full, vc);
    if (PAGEDKV_SM90_PINGPONG) sm90::bar_sync(my_bar, 256);
    sm90::wgmma_fence();
    issue_pv(vc);
    if (PAGEDKV_SM90_PINGPONG && cw == 0) sm90::bar_arrive(other_bar, 256);  // consumer 1 issues the last GEMM
    sm90::wgmma_wait<0>();
    sm90::reg_fence(o);
    release(v_empty + 8 * (vc % STAGES));
    ++vc;

    // write out: O / l (l summed over the quad) into this warp's own 16 rows of the Q tile (swizzled, 16-bit),
    // then 16-byte row chunks to out; rows past the sequence are not written. Then the Q tile is free.
    sm90::fence_proxy_async();
    sm90::store_output<DT, HEAD_DIM, BLOCK_M>(o, l_run, smem_bytes, r0, wm0, it.rows, lane, out, it.q_start, group,
                                              num_qo_heads, it.kv_head);
    release(q_empty);
  }
}
