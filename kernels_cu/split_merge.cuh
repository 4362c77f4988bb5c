// split_merge.cuh: the merge of a split-K sequence's partials, shared by the decode kernels that split a
// sequence across thread blocks and let the block that finishes last merge (paged_attention.cu: kernel 3's
// walk and partition plan; paged_attention_tc.cu: version 4). Needs common.cuh (KV, select, ld_cg) before it.

namespace pagedkv {

// (m, l) <- the log-sum-exp combination of (m, l) and (m2, l2), maxima in log2 units: both sums rescaled to the
// larger max (an empty (-inf, 0) side contributes nothing)
__device__ __forceinline__ void combine_ml(float& m, float& l, float m2, float l2) {
  const float mx = fmaxf(m, m2);
  l = l * pagedkv::select(m == mx, 1.f, exp2f(m - mx)) + l2 * pagedkv::select(m2 == mx, 1.f, exp2f(m2 - mx));
  m = mx;
}

// Merge the `pieces` partials of one split sequence into out, by the whole thread block of THREADS threads.
// Partial rows: part_out [slot][GT][HEAD_DIM] float32, part_ml [slot][GT][2] (max in log2 units, sum). Piece p's slot:
// slot0 + p * slot_step + (p == 0 ? first_extra : 0) (the walk: 2 * (b_first + p) + (p == 0); the partition
// plan: item index). Partials are read past L1; out = sum / total * out_factor (the v scale).
//   s_p    shared scratch: [GT][2] (max, 1 / sum) per head at s_p[0 ..], a dump slot per thread at
//          s_p[dump_at + tid] (dump_at >= 2 * GT);  s_acc: THREADS float4 of shared scratch
template <int DT, int HEAD_DIM, int GT, int THREADS>
__device__ __forceinline__ void merge_pieces(typename KV<DT>::T* __restrict__ out, const float* part_out,
                                             const float* part_ml, long long slot0, int slot_step, int first_extra,
                                             int pieces, int seq, int head0, int num_q, int num_qo_heads,
                                             float out_factor, float* s_p, int dump_at, float4* s_acc) {
  float* s_mw = s_p;
  constexpr int NW = THREADS / 32, GW = (GT + NW - 1) / NW, TPR = HEAD_DIM / 4;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  auto slot = [&](int p) { return slot0 + (long long)p * slot_step + (p == 0 ? first_extra : 0); };
  // per head: M = max_p m_p and L = sum_p 2^(m_p - M) l_p; warp w owns heads w, w + NW; lanes stride pieces
#pragma unroll
  for (int i = 0; i < GW; ++i) {
    const int g = warp + i * NW;
    if (g < num_q) {  // warp-uniform
      float m = PAGEDKV_NEG_INF, l = 0.f;
      for (int p = lane; p < pieces; p += 32) {
        const float* ml = part_ml + (slot(p) * GT + g) * 2;
        combine_ml(m, l, pagedkv::ld_cg(ml), pagedkv::ld_cg(ml + 1));
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, o), l2 = __shfl_xor_sync(0xffffffffu, l, o);
        combine_ml(m, l, m2, l2);
      }
      // lane 0 writes (max, 1 / sum) to s_mw = s_p[0 .. 2 GT); the others to their dump slot (branch-free)
      const int dump = dump_at + tid;
      s_p[pagedkv::select(lane == 0, 2 * g, dump)] = m;
      s_p[pagedkv::select(lane == 0, 2 * g + 1, dump)] = out_factor / l;
    }
  }
  __syncthreads();
  // weighted sum of the partial rows: item (head g, float4 column c); rows of pieces in parallel
  const int items = num_q * TPR;
  const int rows = max(1, THREADS / items);  // pieces summed side by side
  for (int base = 0; base < items; base += THREADS) {  // more than one pass only when rows == 1
    const int r = rows > 1 ? tid / items : 0, i = rows > 1 ? tid % items : base + tid;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    if (r < rows && i < items) {
      const int g = i / TPR, c = i - g * TPR;
      const float mx = s_mw[2 * g];
      // NOTE: MERGE_BATCH pieces' loads in flight at once (a piece past the end reads piece r again with
      // weight 0): a 64-piece merge waits out 8 L2 latencies, not 16 (1 x 32768 merges 63-66 pieces). 16
      // (measured in device call 2) spilled 4-44 bytes at the 128-register cap (sm_80 and sm_90, head dim
      // 80 and GT 1-4 among others)
      constexpr int MERGE_BATCH = 8;
      for (int p0 = r; p0 < pieces; p0 += MERGE_BATCH * rows) {
        float w[MERGE_BATCH];
        float4 x[MERGE_BATCH];
#pragma unroll
        for (int k = 0; k < MERGE_BATCH; ++k) {
          const int p = p0 + k * rows;
          const long long sg = slot(p < pieces ? p : r) * GT + g;
          w[k] = pagedkv::ld_cg(part_ml + sg * 2);
          x[k] = pagedkv::ld_cg4(reinterpret_cast<const float4*>(part_out + sg * HEAD_DIM) + c);
        }
#pragma unroll
        for (int k = 0; k < MERGE_BATCH; ++k) {
          w[k] = pagedkv::select(p0 + k * rows < pieces, exp2f(w[k] - mx), 0.f);
          acc.x = fmaf(w[k], x[k].x, acc.x); acc.y = fmaf(w[k], x[k].y, acc.y);
          acc.z = fmaf(w[k], x[k].z, acc.z); acc.w = fmaf(w[k], x[k].w, acc.w);
        }
      }
    }
    if (rows > 1) {  // uniform
      s_acc[tid] = acc;
      __syncthreads();
      if (tid < items) {
        for (int k = 1; k < rows; ++k) {
          const float4 x = s_acc[k * items + tid];
          acc.x += x.x; acc.y += x.y; acc.z += x.z; acc.w += x.w;
        }
      }
    }
    if ((rows > 1 ? tid : i) < items) {
      const int it = rows > 1 ? tid : i, g = it / TPR, c = it - g * TPR;
      const float inv_l = s_mw[2 * g + 1];
      typename KV<DT>::T* o = out + ((long long)seq * num_qo_heads + head0 + g) * HEAD_DIM + 4 * c;
      o[0] = KV<DT>::from_float(acc.x * inv_l);
      o[1] = KV<DT>::from_float(acc.y * inv_l);
      o[2] = KV<DT>::from_float(acc.z * inv_l);
      o[3] = KV<DT>::from_float(acc.w * inv_l);
    }
  }
}

}  // namespace pagedkv
