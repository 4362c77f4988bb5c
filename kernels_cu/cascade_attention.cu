// cascade_attention.cu: decode attention split in two passes merged by log-sum-exp, so that a run of KV
// blocks that many sequences share (a prefix-cached document, the prompt of n sampled branches) is read once
// per step for the whole group instead of once per sequence (issue 17). NOTE: over 400 lines: one operation's
// three kernels, which share the layouts below and the partials' format.
//
// Versions (one operation, three kernels that compose it):
//   cascade_rows_kernel     version 1: one thread block per (row, KV head, head tile) on CUDA cores, every
//                           dtype: the keys [begin[row], end[row]) of one decode row through its own block
//                           table, returning (O, log-sum-exp). The per-sequence suffix pass; with begin = 0 and
//                           end = the prefix length it is also the naive prefix pass (float32, and a GPU oracle).
//   cascade_prefix_kernel   version 2: the prefix pass on tensor cores (float16 / bfloat16): the decode queries
//                           of every sequence of a group, GQA-packed per KV head (group size x query heads per
//                           KV head rows), against the group's shared blocks, no causal mask; mma.sync m16n8k16,
//                           ldmatrix (.trans for V), cp.async multi-stage K/V tiles (prefill v2's structure).
//                           The prefix is cut into num_splits equal runs of tiles (grid.z) for parallelism when
//                           the group is small; each split leaves a normalised partial (O, LSE).
//   cascade_merge_kernel    merge_attn_states: out = sum_i e^(lse_i - L) O_i / sum_i e^(lse_i - L) over a row's
//                           partials (the prefix splits and the suffix); optionally writes L = log sum e^lse_i.
// The rows kernel can also merge the prefix partials in its epilogue (`out` set: two launches per layer); the
// launcher uses the separate merge: faster on the H100 (kernels_cu/NOTES_cascade.md, device call 2).
//
// Layouts (one layer):
//   q               [num_rows, num_qo_heads, HEAD_DIM]            one decode query per row
//   k_cache         [num_blocks, num_kv_heads, block_size, HEAD_DIM]   (v_cache alike), C-contiguous
//   block_tables    [num_rows, max_blocks] int32; entries past a row's ceil(len / block_size) never read
//   context_lens    [num_rows] int32: keys of a row (its new token included)
//   group_starts    [num_groups + 1] int32, non-decreasing: group g owns entries group_starts[g] ..
//                   group_starts[g + 1] - 1 of group_rows
//   group_rows      [>= group_starts[num_groups]] int32: row ids, grouped
//   prefix_lens     [num_groups] int32: keys 0 .. prefix_lens[g] - 1 are shared by every row of group g (the
//                   same block ids head each of their tables); <= 0: the group has no prefix pass
//   suffix_starts   [num_rows] int32: the first key of a row's own pass (its group's prefix length, 0 for a row
//                   in no group)
//   o_part          [num_parts, num_rows, num_qo_heads, HEAD_DIM] float32 partial outputs, normalised
//   lse_part        [num_parts, num_rows, num_qo_heads] float32 natural log-sum-exp of scale * q.k (-inf:
//                   the part saw no key; its O is then never read)
// Query head h reads KV head h / group, group = num_qo_heads / num_kv_heads. block_size is a power of two
// (passed as its log2); block ids are widened to 64 bits before they are multiplied into offsets.
//
// One step of cascade decode (parts 0 .. num_splits - 1 = the prefix splits, part num_splits = the suffix):
//
//     keys of row r   |<------ shared prefix (whole blocks) ------>|<- own suffix ->|
//                     0                                            suffix_starts[r]   context_lens[r]
//     prefix kernel   one read per (group, KV head, split) for all the group's rows -> parts 0 .. S-1
//     rows kernel     one read per row                                               -> part S
//     merge kernel    parts 0 .. S of grouped rows, part S only of the others         -> out (model dtype)
//
// Launch shapes depend on array shapes only (num_rows, num_groups, num_splits), never on device values, so
// the three launches can be captured in a CUDA graph and replayed with new groups and lengths: the prefix
// kernel launches (tile_capacity, num_kv_heads, num_splits) blocks, tile_capacity = ceil(num_rows * group /
// BLOCK_M) + num_groups >= the query tiles of any grouping of the rows; blocks past the real tiles exit.
//
// Prefix kernel, one thread block = (group g, query tile, KV head, split):
//   packed row p = local * group + j  ->  query head kv_head * group + j of row group_rows[group_starts[g] +
//   local]; keys of split s: tiles [s * per, min((s + 1) * per, T)) of the T = ceil(prefix_len / BLOCK_N)
//   64-key tiles, per = ceil(T / num_splits), gathered through the table of the group's first row (every row
//   of the group holds the same ids there). Keys >= prefix_len are zero-filled and masked to -inf.
#include "common.cuh"
#include "mma.cuh"

#define PAGEDKV_CASCADE_ROWS_THREADS 128
#define PAGEDKV_CASCADE_MERGE_THREADS 128
#define PAGEDKV_LN2 0.6931471805599453f

using pagedkv::KV;

namespace cascade {

// ---- tensor-core helpers (sm_80+): mma.cuh ----------------------------------------------------------
using pagedkv::ldsm_x4;
using pagedkv::ldsm_x4_trans;
using pagedkv::mma_16816;
using pagedkv::pack2;

// The work item of prefix-kernel block `tile`: (group, first packed row, packed rows of the group, the group's
// first entry in group_rows), or group -1 past the last tile. Warp 0 scans the groups' tile counts 32 at a
// time (one load per lane, a shuffle scan), the other warps wait at the barrier; item lives in shared memory.
__device__ __forceinline__ void find_tile(const int* group_starts, const int* prefix_lens, int num_groups,
                                          int group, int block_m, int tile, int (&item)[4]) {
  const int lane = threadIdx.x & 31;
  if (threadIdx.x < 32) {
    int base = 0;
    bool found = false;
    for (int c = 0; c < num_groups && !found; c += 32) {  // uniform over the warp
      const int i = c + lane;
      int a = 0, n = 0, t = 0;
      if (i < num_groups) {
        a = group_starts[i];
        n = (group_starts[i + 1] - a) * group;
        t = prefix_lens[i] > 0 && n > 0 ? (n + block_m - 1) / block_m : 0;
      }
      int incl = t;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += y;
      }
      const int rel = tile - base, excl = incl - t;
      const bool mine = i < num_groups && rel >= excl && rel < incl;
      if (mine) { item[0] = i; item[1] = (rel - excl) * block_m; item[2] = n; item[3] = a; }
      found = __ballot_sync(0xffffffffu, mine) != 0;
      base += __shfl_sync(0xffffffffu, incl, 31);
    }
    if (lane == 0 && !found) item[0] = -1;
  }
  __syncthreads();
}

}  // namespace cascade

// ================================================================================================
// cascade_prefix_kernel: the shared prefix of each group against all its rows' queries, tensor cores.
//   o_part, lse_part    parts 0 .. num_splits - 1 (see the file header); rows of groups with a prefix only
//   q, k_cache, v_cache, block_tables, group_starts, group_rows, prefix_lens: see the file header
//   num_rows            q's rows (the stride of a part)
//   group               num_qo_heads / num_kv_heads
//   scale_log2          softmax scale * log2(e) > 0
// grid: (tile_capacity, num_kv_heads, num_splits), block: NUM_WARPS * 32, dynamic shared memory: SMEM_BYTES
//   = [BLOCK_M][ROW] Q + [STAGES][BLOCK_N][ROW] K + [STAGES][BLOCK_N][ROW] V + [STAGES][BLOCK_N] int64 offsets
// ================================================================================================
template <int DT, int HEAD_DIM, int M_TILES, int STAGES>
struct Prefix {
  static constexpr int NUM_WARPS = 4, THREADS = 128, BLOCK_N = 64;
  static constexpr int WARP_M = 16 * M_TILES, BLOCK_M = NUM_WARPS * WARP_M;
  static constexpr int ROW = HEAD_DIM + 8, CPR = HEAD_DIM / 8;
  static constexpr int KV_CHUNKS = BLOCK_N * CPR, KV_LOADS = (KV_CHUNKS + THREADS - 1) / THREADS;
  static constexpr int Q_CHUNKS = BLOCK_M * CPR, Q_LOADS = (Q_CHUNKS + THREADS - 1) / THREADS;
  static constexpr int KSTEPS = HEAD_DIM / 16;
  // NOTE: as prefill v2: a large O accumulator leaves no room for 64 keys of S, so the tile is processed in
  // two 32-key halves (one more O rescale per tile, same loads)
  static constexpr int SUB_N = M_TILES * HEAD_DIM >= 224 ? 32 : BLOCK_N;
  static constexpr int NT_S = SUB_N / 8, NT_O = HEAD_DIM / 8;
  static constexpr bool Q_IN_REGS = M_TILES * HEAD_DIM <= 128;
  static constexpr int QF_M = Q_IN_REGS ? M_TILES : 1, QF_K = Q_IN_REGS ? KSTEPS : 1;
  static constexpr int SMEM_BYTES = (BLOCK_M + 2 * STAGES * BLOCK_N) * ROW * 2 + STAGES * BLOCK_N * 8;
  static_assert(HEAD_DIM % 16 == 0 && STAGES >= 2, "tile shapes");
};

template <int DT, int HEAD_DIM, int M_TILES, int STAGES>
__global__ void __launch_bounds__(128, 2)
cascade_prefix_kernel(float* __restrict__ o_part, float* __restrict__ lse_part, const unsigned short* __restrict__ q,
                      const unsigned short* __restrict__ k_cache, const unsigned short* __restrict__ v_cache,
                      const int* __restrict__ block_tables, const int* __restrict__ group_starts,
                      const int* __restrict__ group_rows, const int* __restrict__ prefix_lens, int num_groups,
                      int num_rows, int num_qo_heads, int num_kv_heads, int group, int log2_block_size,
                      int max_blocks, float scale_log2) {
  typedef Prefix<DT, HEAD_DIM, M_TILES, STAGES> P;
  constexpr int THREADS = P::THREADS, WARP_M = P::WARP_M, BLOCK_M = P::BLOCK_M, BLOCK_N = P::BLOCK_N;
  constexpr int ROW = P::ROW, CPR = P::CPR, NT_S = P::NT_S, NT_O = P::NT_O, SUB_N = P::SUB_N;

  extern __shared__ uint4 smem[];
  long long* const s_off = reinterpret_cast<long long*>(reinterpret_cast<unsigned short*>(smem) +
                                                        (BLOCK_M + 2 * STAGES * BLOCK_N) * ROW);
  const unsigned s_q = pagedkv::smem_u32(smem);
  const unsigned s_k = s_q + BLOCK_M * ROW * 2;
  const unsigned s_v = s_k + STAGES * BLOCK_N * ROW * 2;

  // work item: (group, query tile) x KV head x split
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g4 = lane >> 2, t4 = lane & 3;
  const int kv_head = blockIdx.y, split = blockIdx.z, num_splits = gridDim.z;
  __shared__ int s_item[4];
  cascade::find_tile(group_starts, prefix_lens, num_groups, group, BLOCK_M, blockIdx.x, s_item);
  const int grp = s_item[0], m0 = s_item[1], rows = s_item[2], first = s_item[3];
  if (grp < 0) return;  // past the last tile (uniform over the block)
  const int prefix_len = prefix_lens[grp];
  const int total_tiles = (prefix_len + BLOCK_N - 1) / BLOCK_N;
  const int per = (total_tiles + num_splits - 1) / num_splits;
  const int tile0 = split * per, num_tiles = min(total_tiles, tile0 + per) - tile0;
  const int key_end = prefix_len - tile0 * BLOCK_N;  // keys of this split: [0, key_end) relative to tile0
  const int* block_table = block_tables + (long long)group_rows[first] * max_blocks;
  const long long part_rows = (long long)num_rows * num_qo_heads;  // (row, head) pairs per part

  // the (row, head) pair of packed row pr of this tile, or -1 past the group's rows
  auto pair_of = [&](int pr) -> long long {
    const int m = m0 + pr;
    if (m >= rows) return -1;
    const int local = m / group;
    return (long long)group_rows[first + local] * num_qo_heads + kv_head * group + (m - local * group);
  };

  if (num_tiles <= 0) {  // an empty split: its partials say "no keys"
    for (int pr = tid; pr < BLOCK_M; pr += THREADS) {
      const long long pair = pair_of(pr);
      if (pair >= 0) lse_part[split * part_rows + pair] = PAGEDKV_NEG_INF;
    }
    return;
  }

  // load q: BLOCK_M packed rows (rows past the group zero-filled), one cp.async group
#pragma unroll
  for (int i = 0; i < P::Q_LOADS; ++i) {
    const int c = tid + i * THREADS;
    if (P::Q_CHUNKS % THREADS == 0 || c < P::Q_CHUNKS) {
      const int r = c / CPR, col = c - r * CPR;
      const long long pair = pair_of(r);
      const unsigned short* src = pair >= 0 ? q + pair * HEAD_DIM + col * 8 : q;
      pagedkv::cp_async16(s_q + (r * ROW + col * 8) * 2, src, pair >= 0);
    }
  }
  pagedkv::cp_async_commit();

  // K/V tiles: the element offset of each key row (64-bit; -1 at or past key_end) is computed by thread
  // `row` one iteration ahead and kept in shared memory (slot = the tile's stage), as prefill v2 does
  const long long block_elems = ((long long)num_kv_heads << log2_block_size) * HEAD_DIM;
  const long long head_off = ((long long)kv_head << log2_block_size) * HEAD_DIM;
  const int in_block_mask = (1 << log2_block_size) - 1;
  int next_id = -1;
  auto load_id = [&](int n) {
    const int key = n * BLOCK_N + tid;
    next_id = tid < BLOCK_N && key < key_end ? block_table[(tile0 * BLOCK_N + key) >> log2_block_size] : -1;
  };
  auto store_offset = [&](int n) {
    if (tid < BLOCK_N) {
      const int key = tile0 * BLOCK_N + n * BLOCK_N + tid;
      s_off[(n % STAGES) * BLOCK_N + tid] =
          next_id >= 0 ? next_id * block_elems + head_off + (long long)(key & in_block_mask) * HEAD_DIM : -1;
    }
  };
  auto issue = [&](int n) {
    const int stage = n % STAGES;
#pragma unroll
    for (int i = 0; i < P::KV_LOADS; ++i) {
      const int c = tid + i * THREADS;
      if (P::KV_CHUNKS % THREADS == 0 || c < P::KV_CHUNKS) {
        const int r = c / CPR, col = c - r * CPR;
        const long long off = s_off[stage * BLOCK_N + r];
        const bool valid = off >= 0;
        const long long src = valid ? off + col * 8 : 0;
        const unsigned dst = ((stage * BLOCK_N + r) * ROW + col * 8) * 2;
        pagedkv::cp_async16(s_k + dst, k_cache + src, valid);
        pagedkv::cp_async16(s_v + dst, v_cache + src, valid);
      }
    }
  };
  pagedkv::ring_prologue<STAGES>(num_tiles, load_id, store_offset, issue);

  // lane addresses for ldmatrix (as prefill v2): Q rows (lane & 15), dims + 8 for lanes 16-31; K keys
  // (lane & 7) + 8 * bit 4, dims + 8 * bit 3; V (transposed) keys (lane & 7) + 8 * bit 3, dims + 8 * bit 4
  unsigned q_frag[P::QF_M][P::QF_K][4];
  const unsigned q_lane = s_q + ((warp * WARP_M + (lane & 15)) * ROW + (lane >> 4) * 8) * 2;
  const unsigned k_lane = ((((lane >> 4) & 1) * 8 + (lane & 7)) * ROW + ((lane >> 3) & 1) * 8) * 2;
  const unsigned v_lane = ((((lane >> 3) & 1) * 8 + (lane & 7)) * ROW + ((lane >> 4) & 1) * 8) * 2;
  if constexpr (P::Q_IN_REGS) {
    pagedkv::cp_async_wait<STAGES - 1>();
    __syncthreads();
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
      for (int ks = 0; ks < P::KSTEPS; ++ks) cascade::ldsm_x4(q_frag[mt][ks], q_lane + (mt * 16 * ROW + ks * 16) * 2);
  }

  float o_acc[M_TILES][NT_O][4];
  float m_run[M_TILES][2], l_run[M_TILES][2];
#pragma unroll
  for (int mt = 0; mt < M_TILES; ++mt) {
#pragma unroll
    for (int j = 0; j < NT_O; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) o_acc[mt][j][e] = 0.f;
#pragma unroll
    for (int h = 0; h < 2; ++h) { m_run[mt][h] = PAGEDKV_NEG_INF; l_run[mt][h] = 0.f; }
  }

  for (int n = 0; n < num_tiles; ++n) {
    const bool more = pagedkv::ring_step<STAGES>(n, num_tiles, load_id, issue);  // common.cuh
#pragma unroll
    for (int sub = 0; sub < BLOCK_N / SUB_N; ++sub) {
      const int n0 = n * BLOCK_N + sub * SUB_N;
      if (n0 < key_end) {  // uniform: the last tile's second half may lie past the prefix
        const unsigned off = ((n % STAGES) * BLOCK_N + sub * SUB_N) * ROW * 2;
        // S = Q K^T
        float s[M_TILES][NT_S][4];
#pragma unroll
        for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
          for (int j = 0; j < NT_S; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[mt][j][e] = 0.f;
#pragma unroll
        for (int ks = 0; ks < P::KSTEPS; ++ks) {
          unsigned a[M_TILES][4];
#pragma unroll
          for (int mt = 0; mt < M_TILES; ++mt) {
            if constexpr (P::Q_IN_REGS) {
#pragma unroll
              for (int e = 0; e < 4; ++e) a[mt][e] = q_frag[mt][ks][e];
            } else {
              cascade::ldsm_x4(a[mt], q_lane + (mt * 16 * ROW + ks * 16) * 2);
            }
          }
#pragma unroll
          for (int np = 0; np < NT_S / 2; ++np) {
            unsigned b[4];
            cascade::ldsm_x4(b, s_k + off + k_lane + (np * 16 * ROW + ks * 16) * 2);
#pragma unroll
            for (int mt = 0; mt < M_TILES; ++mt) {
              cascade::mma_16816<DT>(s[mt][2 * np], a[mt], b[0], b[1]);
              cascade::mma_16816<DT>(s[mt][2 * np + 1], a[mt], b[2], b[3]);
            }
          }
        }
        // mask keys past the prefix (only the split's last tile)
        if (n0 + SUB_N > key_end) {
#pragma unroll
          for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
            for (int j = 0; j < NT_S; ++j)
#pragma unroll
              for (int e = 0; e < 4; ++e)
                if (n0 + j * 8 + 2 * t4 + (e & 1) >= key_end) s[mt][j][e] = PAGEDKV_NEG_INF;
        }
        // online softmax (every row sees key n0 >= 0 of its first tile: m is finite after it)
        bool moved = false;
        float alpha[M_TILES][2];
#pragma unroll
        for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            float mx = PAGEDKV_NEG_INF;
#pragma unroll
            for (int j = 0; j < NT_S; ++j) mx = fmaxf(mx, fmaxf(s[mt][j][2 * h], s[mt][j][2 * h + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float m_new = fmaxf(m_run[mt][h], mx);
            const float shift = m_new * scale_log2;
            alpha[mt][h] = m_new == m_run[mt][h] ? 1.f : exp2f(m_run[mt][h] * scale_log2 - shift);
            moved |= alpha[mt][h] != 1.f;
            float sum = 0.f;
#pragma unroll
            for (int j = 0; j < NT_S; ++j)
#pragma unroll
              for (int e = 2 * h; e < 2 * h + 2; ++e) {
                const float p = exp2f(fmaf(s[mt][j][e], scale_log2, -shift));
                s[mt][j][e] = p;
                sum += p;
              }
            l_run[mt][h] = l_run[mt][h] * alpha[mt][h] + sum;
            m_run[mt][h] = m_new;
          }
        if (__any_sync(0xffffffffu, moved)) {
#pragma unroll
          for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
            for (int j = 0; j < NT_O; ++j)
#pragma unroll
              for (int e = 0; e < 4; ++e) o_acc[mt][j][e] *= alpha[mt][e >> 1];
        }
        // O += P V
#pragma unroll
        for (int kk = 0; kk < NT_S / 2; ++kk) {
          unsigned a[M_TILES][4];
#pragma unroll
          for (int mt = 0; mt < M_TILES; ++mt) {
            a[mt][0] = cascade::pack2<DT>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
            a[mt][1] = cascade::pack2<DT>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
            a[mt][2] = cascade::pack2<DT>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
            a[mt][3] = cascade::pack2<DT>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
          }
#pragma unroll
          for (int dp = 0; dp < NT_O / 2; ++dp) {
            unsigned b[4];
            cascade::ldsm_x4_trans(b, s_v + off + v_lane + (kk * 16 * ROW + dp * 16) * 2);
#pragma unroll
            for (int mt = 0; mt < M_TILES; ++mt) {
              cascade::mma_16816<DT>(o_acc[mt][2 * dp], a[mt], b[0], b[1]);
              cascade::mma_16816<DT>(o_acc[mt][2 * dp + 1], a[mt], b[2], b[3]);
            }
          }
        }
      }
    }
    if (more) store_offset(n + STAGES);
  }
  pagedkv::cp_async_wait<0>();

  // write partial: O / l (float32) and lse = ln(l) + m * scale, from the fragments (rows g, g + 8)
#pragma unroll
  for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float l = l_run[mt][h];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const long long pair = pair_of(warp * WARP_M + mt * 16 + h * 8 + g4);
      if (pair >= 0) {
        const float inv = 1.f / l;
        float* dst = o_part + (split * part_rows + pair) * HEAD_DIM + 2 * t4;
#pragma unroll
        for (int j = 0; j < NT_O; ++j)
          *reinterpret_cast<float2*>(dst + j * 8) = make_float2(o_acc[mt][j][2 * h] * inv, o_acc[mt][j][2 * h + 1] * inv);
        if (t4 == 0) lse_part[split * part_rows + pair] = (log2f(l) + m_run[mt][h] * scale_log2) * PAGEDKV_LN2;
      }
    }
}

// ================================================================================================
// cascade_rows_kernel: keys [begin[row], end[row]) of each row through its own block table, CUDA cores; with
// `out` set, the row's prefix partials are merged in (the suffix pass and the merge in one launch).
//   o_part, lse_part  (out == nullptr) [num_rows, num_qo_heads(, HEAD_DIM)] float32: this pass's normalised O
//                     and natural log-sum-exp (0 and -inf for an empty range)
//   out               [num_rows, num_qo_heads, HEAD_DIM] DT, or nullptr: out = merge(prefix parts 0 .. P - 1,
//                     this pass) for rows with begin[row] > 0 (in a group), this pass alone for the others
//   prefix_o, prefix_lse  [P, num_rows, num_qo_heads(, HEAD_DIM)] float32 from cascade_prefix_kernel (out only)
//   q, k_cache, v_cache, block_tables: see the file header
//   begin    [num_rows] int32 first key, or nullptr for 0; end [num_rows] int32 one past the last key
//   scale_log2  softmax scale * log2(e)
// grid: (num_rows, num_kv_heads, ceil(group / GT)), block: PAGEDKV_CASCADE_ROWS_THREADS. A thread block holds
// GT query heads of one KV head; each 16-byte chunk of a key row goes to one lane (LPR lanes per key row,
// KPW key rows per warp at a time, UNROLL rounds in flight); each (warp, key slot) keeps its own online softmax,
// merged at the end. The row's block ids are staged in shared memory TABLE_CHUNK at a time, so a round waits
// for one global load (K/V), not two (table, then K/V).
// ================================================================================================
#define PAGEDKV_CASCADE_TABLE_CHUNK 256
template <int DT, int HEAD_DIM, int GT, int UNROLL>
__global__ void __launch_bounds__(PAGEDKV_CASCADE_ROWS_THREADS)
cascade_rows_kernel(float* __restrict__ o_part, float* __restrict__ lse_part, typename KV<DT>::T* __restrict__ out,
                    const float* __restrict__ prefix_o, const float* __restrict__ prefix_lse, int num_prefix_parts,
                    const typename KV<DT>::T* __restrict__ q, const typename KV<DT>::T* __restrict__ k_cache,
                    const typename KV<DT>::T* __restrict__ v_cache, const int* __restrict__ block_tables,
                    const int* __restrict__ begin, const int* __restrict__ end, int num_rows, int num_qo_heads,
                    int num_kv_heads, int log2_block_size, int max_blocks, float scale_log2) {
  typedef KV<DT> kv;
  constexpr int NW = PAGEDKV_CASCADE_ROWS_THREADS / 32;
  constexpr int VE = pagedkv::Vec<DT>::N;                      // elements per 16-byte chunk
  constexpr int CHUNKS = HEAD_DIM / VE;                        // chunks per key row
  constexpr int LPR = CHUNKS >= 32 ? 32 : CHUNKS > 8 ? (CHUNKS > 16 ? 32 : 16) : (CHUNKS > 4 ? 8 : (CHUNKS > 2 ? 4 : 2));
  constexpr int CPL = (CHUNKS + LPR - 1) / LPR;                // chunks per lane
  constexpr int KPW = 32 / LPR;                                // key rows per warp at a time
  constexpr int SLOTS = NW * KPW;                              // independent softmax states per block
  static_assert(HEAD_DIM % VE == 0, "head_dim");
  __shared__ float s_m[SLOTS][GT], s_l[SLOTS][GT];
  __shared__ float s_acc[SLOTS][GT][HEAD_DIM];
  __shared__ int s_ids[PAGEDKV_CASCADE_TABLE_CHUNK];

  const int row = blockIdx.x, kv_head = blockIdx.y;
  const int group = num_qo_heads / num_kv_heads;
  const int h0 = blockIdx.z * GT;  // first query head of this block within the KV head's group
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int sub = lane / LPR, cl = lane % LPR;
  const int slot = warp * KPW + sub;
  const int key_begin = begin ? begin[row] : 0, key_end = end[row];
  const int* block_table = block_tables + (long long)row * max_blocks;

  // load q (scaled by scale * log2 e) into registers: this lane's chunks of each of the GT heads
  float qr[GT][CPL * VE];
#pragma unroll
  for (int h = 0; h < GT; ++h)
#pragma unroll
    for (int c = 0; c < CPL; ++c) {
      const int chunk = cl + c * LPR;
      const bool ok = chunk < CHUNKS && h0 + h < group;
      uint4 raw = make_uint4(0, 0, 0, 0);
      if (ok) raw = *reinterpret_cast<const uint4*>(q + ((long long)row * num_qo_heads + kv_head * group + h0 + h) *
                                                   HEAD_DIM + chunk * VE);
      pagedkv::unpack16<DT>(raw, &qr[h][c * VE]);
#pragma unroll
      for (int e = 0; e < VE; ++e) qr[h][c * VE + e] *= scale_log2;
    }

  float m[GT], l[GT], acc[GT][CPL * VE];
#pragma unroll
  for (int h = 0; h < GT; ++h) {
    m[h] = PAGEDKV_NEG_INF;
    l[h] = 0.f;
#pragma unroll
    for (int i = 0; i < CPL * VE; ++i) acc[h][i] = 0.f;
  }
  const long long block_elems = ((long long)num_kv_heads << log2_block_size) * HEAD_DIM;
  const long long head_off = ((long long)kv_head << log2_block_size) * HEAD_DIM;
  const int in_block_mask = (1 << log2_block_size) - 1;

  // walk the keys a table chunk at a time; in a chunk, UNROLL key rows per slot in flight: load all, then q.k
  // and the online softmax of each
  const int first_block = key_begin >> log2_block_size;
  for (int c0 = first_block; (c0 << log2_block_size) < key_end; c0 += PAGEDKV_CASCADE_TABLE_CHUNK) {
    const int c_end = min(key_end, (c0 + PAGEDKV_CASCADE_TABLE_CHUNK) << log2_block_size);
    const int num_ids = ((c_end - 1) >> log2_block_size) - c0 + 1;
    __syncthreads();  // the previous chunk's ids are no longer read
    for (int i = tid; i < num_ids; i += PAGEDKV_CASCADE_ROWS_THREADS) s_ids[i] = block_table[c0 + i];
    __syncthreads();
    const int k0 = max(key_begin, c0 << log2_block_size);
    for (int base = k0 + slot; base - slot < c_end; base += UNROLL * SLOTS) {  // uniform over the block
      uint4 kr[UNROLL][CPL], vr[UNROLL][CPL];
      bool ok[UNROLL];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const int key = base + u * SLOTS;
        ok[u] = key < c_end;
        long long off = 0;
        if (ok[u]) off = (long long)s_ids[(key >> log2_block_size) - c0] * block_elems + head_off +
                         (long long)(key & in_block_mask) * HEAD_DIM;
#pragma unroll
        for (int c = 0; c < CPL; ++c) {
          const int chunk = cl + c * LPR;
          kr[u][c] = vr[u][c] = make_uint4(0, 0, 0, 0);
          if (ok[u] && chunk < CHUNKS) {
            kr[u][c] = *reinterpret_cast<const uint4*>(k_cache + off + chunk * VE);
            vr[u][c] = *reinterpret_cast<const uint4*>(v_cache + off + chunk * VE);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        float kf[CPL * VE], vf[CPL * VE];
#pragma unroll
        for (int c = 0; c < CPL; ++c) {
          pagedkv::unpack16<DT>(kr[u][c], &kf[c * VE]);
          pagedkv::unpack16<DT>(vr[u][c], &vf[c * VE]);
        }
#pragma unroll
        for (int h = 0; h < GT; ++h) {
          float dot = 0.f;
#pragma unroll
          for (int i = 0; i < CPL * VE; ++i) dot = fmaf(qr[h][i], kf[i], dot);
#pragma unroll
          for (int o = LPR / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
          // online softmax of this slot (log2 domain); an invalid key changes nothing
          const float s = pagedkv::select(ok[u], dot, PAGEDKV_NEG_INF);
          const float m_new = fmaxf(m[h], s);
          const float alpha = m_new == PAGEDKV_NEG_INF ? 1.f : exp2f(m[h] - m_new);
          const float p = m_new == PAGEDKV_NEG_INF ? 0.f : exp2f(s - m_new);
          l[h] = l[h] * alpha + p;
#pragma unroll
          for (int i = 0; i < CPL * VE; ++i) acc[h][i] = fmaf(acc[h][i], alpha, p * vf[i]);
          m[h] = m_new;
        }
      }
    }
  }

  // merge the slots: O = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s
  if (cl == 0) {
#pragma unroll
    for (int h = 0; h < GT; ++h) { s_m[slot][h] = m[h]; s_l[slot][h] = l[h]; }
  }
#pragma unroll
  for (int h = 0; h < GT; ++h)
#pragma unroll
    for (int c = 0; c < CPL; ++c) {
      const int chunk = cl + c * LPR;
      if (chunk < CHUNKS)
#pragma unroll
        for (int e = 0; e < VE; ++e) s_acc[slot][h][chunk * VE + e] = acc[h][c * VE + e];
    }
  __syncthreads();
  const long long pairs = (long long)num_rows * num_qo_heads;
  const int parts = out && begin && key_begin > 0 ? num_prefix_parts : 0;  // prefix parts merged into this row
  for (int i = tid; i < GT * HEAD_DIM; i += PAGEDKV_CASCADE_ROWS_THREADS) {
    const int h = i / HEAD_DIM, d = i - h * HEAD_DIM;
    if (h0 + h >= group) continue;
    float mx = PAGEDKV_NEG_INF;
#pragma unroll
    for (int s = 0; s < SLOTS; ++s) mx = fmaxf(mx, s_m[s][h]);
    float num = 0.f, den = 0.f;
    if (mx != PAGEDKV_NEG_INF) {
#pragma unroll
      for (int s = 0; s < SLOTS; ++s) {
        const float w = exp2f(s_m[s][h] - mx);  // 0 for a slot without keys
        num = fmaf(w, s_acc[s][h][d], num);
        den = fmaf(w, s_l[s][h], den);
      }
    }
    const long long pair = (long long)row * num_qo_heads + kv_head * group + h0 + h;
    const float lse = den > 0.f ? (log2f(den) + mx) * PAGEDKV_LN2 : PAGEDKV_NEG_INF;
    if (!out) {
      o_part[pair * HEAD_DIM + d] = den > 0.f ? num / den : 0.f;
      if (d == 0) lse_part[pair] = lse;
      continue;
    }
    // fused merge: weights e^(lse_p - L) over the prefix parts and this pass (a part with -inf carries no keys)
    float big = lse;
    for (int p = 0; p < parts; ++p) big = fmaxf(big, prefix_lse[p * pairs + pair]);
    float total = 0.f, o = 0.f;
    if (big != PAGEDKV_NEG_INF) {
      if (den > 0.f) {
        const float w = expf(lse - big);
        total = w;
        o = w * (num / den);
      }
      for (int p = 0; p < parts; ++p) {
        const float lp = prefix_lse[p * pairs + pair];
        if (lp == PAGEDKV_NEG_INF) continue;
        const float w = expf(lp - big);
        total += w;
        o = fmaf(w, prefix_o[(p * pairs + pair) * HEAD_DIM + d], o);
      }
    }
    out[pair * HEAD_DIM + d] = kv::from_float(total > 0.f ? o / total : 0.f);
  }
}

// ================================================================================================
// cascade_merge_kernel: merge_attn_states over num_parts partials per (row, head).
//   out           [num_rows, num_qo_heads, HEAD_DIM] DT out
//   lse_out       [num_rows, num_qo_heads] float32 out, or nullptr
//   o_part        [num_parts, num_rows, num_qo_heads, HEAD_DIM] float32; lse_part [num_parts, num_rows, num_qo_heads]
//   suffix_starts [num_rows] int32 or nullptr: a row with suffix_starts[row] <= 0 (in no group) merges only its
//                 last part (the prefix parts were not written for it); nullptr: every part counts
// A part with lse = -inf carries no keys: its O is never read (it may be stale). A row whose parts are all
// empty gets O = 0 and lse = -inf.
// grid: ceil(num_rows * num_qo_heads / 4), block: PAGEDKV_CASCADE_MERGE_THREADS (one warp per (row, head)).
// ================================================================================================
template <int DT, int HEAD_DIM>
__global__ void __launch_bounds__(PAGEDKV_CASCADE_MERGE_THREADS)
cascade_merge_kernel(typename KV<DT>::T* __restrict__ out, float* __restrict__ lse_out, const float* __restrict__ o_part,
                     const float* __restrict__ lse_part, const int* __restrict__ suffix_starts, int num_parts,
                     int num_rows, int num_qo_heads) {
  typedef KV<DT> kv;
  const long long pairs = (long long)num_rows * num_qo_heads;
  const long long pair = (long long)blockIdx.x * (PAGEDKV_CASCADE_MERGE_THREADS / 32) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (pair >= pairs) return;
  const int row = (int)(pair / num_qo_heads);
  const int first = suffix_starts && suffix_starts[row] <= 0 ? num_parts - 1 : 0;
  float mx = PAGEDKV_NEG_INF;
  for (int p = first; p < num_parts; ++p) mx = fmaxf(mx, lse_part[p * pairs + pair]);
  float den = 0.f, acc[(HEAD_DIM + 31) / 32];
#pragma unroll
  for (int i = 0; i < (HEAD_DIM + 31) / 32; ++i) acc[i] = 0.f;
  if (mx != PAGEDKV_NEG_INF) {
    for (int p = first; p < num_parts; ++p) {
      const float lse = lse_part[p * pairs + pair];
      if (lse == PAGEDKV_NEG_INF) continue;  // uniform over the warp
      const float w = expf(lse - mx);
      den += w;
      const float* src = o_part + (p * pairs + pair) * HEAD_DIM;
#pragma unroll
      for (int i = 0; i < (HEAD_DIM + 31) / 32; ++i)
        if (lane + 32 * i < HEAD_DIM) acc[i] = fmaf(w, src[lane + 32 * i], acc[i]);
    }
  }
  const float inv = den > 0.f ? 1.f / den : 0.f;
#pragma unroll
  for (int i = 0; i < (HEAD_DIM + 31) / 32; ++i)
    if (lane + 32 * i < HEAD_DIM) out[pair * HEAD_DIM + lane + 32 * i] = kv::from_float(acc[i] * inv);
  if (lse_out && lane == 0) lse_out[pair] = den > 0.f ? mx + logf(den) : PAGEDKV_NEG_INF;
}
