// logits_process.cu: vLLM's logits processors on the device, before the sampler (captured in the step graph):
// grammar bitmask, allowed_token_ids, logit_bias, min_tokens, bad_words, repetition / frequency / presence
// penalties; and the per-sequence token counts they read, updated from each step's sampled tokens.
//
// Versions:
//   process_logits_kernel1   one block per sample row: a dense pass over the vocabulary (masks + penalties,
//                            float32 out), then the sparse fix-ups (bias entries recomputed, bans set -inf)
//   count_tokens_kernel1     one thread per sample row: counts[state][token] += 1, history ring updated
//
// The order (vLLM's sampler):  x = float32(logits)
//   masks      x_i = -inf unless grammar bit i (mask rows) and allowed bit i (allowed_token_ids) are set
//   bias       x_i += bias_i                              (logit_bias)
//   bans       x_i = -inf for EOS/stop ids while step < min_tokens, and for the last token of each bad word
//              whose prefix equals the output's tail
//   penalties  tokens of the prompt or the output: x / r if x > 0 else x * r   (repetition_penalty r)
//              x -= f * count; x -= p * (count > 0)                (frequency f, presence p: output only)
// Bans commute with the penalties (-inf stays -inf), so they are applied last.
//
// Per-sequence state (rows of the SequenceTables, `state_row`):
//   counts   [S, V] int32: bits 0..29 the token's count in the output, bit 30 set when it is in the prompt
//   history  [S, H] int32: output token j at j % H (the last H output tokens, for bad words)
//   lists    [S, L] int32: header (PAGEDKV_LP_HEADER words) then logit_bias pairs, stop ids, bad words:
//            0 n_bias | 1 n_stop | 2 n_bad | 3 has_allowed | 4 min_tokens | 5 presence | 6 frequency |
//            7 repetition (floats as bits) | bias (id, bits) * n_bias | stop ids | (len, ids...) * n_bad
//   allowed  [S, W] uint32 bitmask (W = ceil(V / 32)), read when has_allowed
#include "common.cuh"

#define PAGEDKV_LP_HEADER 8
#define PAGEDKV_LP_PROCESS 1  // flags: the row is processed into processed[proc_row]
#define PAGEDKV_LP_STATE 2    // flags: state_row names the sequence's state (penalties, lists, allowed)
#define PAGEDKV_LP_UPDATE 4   // flags: the sampled token is counted into state_row
#define PAGEDKV_LP_MASK 8     // flags: grammar[mask_row] masks the row
#define PAGEDKV_LP_PROMPT_BIT 0x40000000
#define PAGEDKV_LP_COUNT_MASK 0x3fffffff

namespace pagedkv {

struct RowPenalty {
  float presence, frequency, repetition;
  const int* counts;  // the sequence's counts row, or nullptr
};

__device__ __forceinline__ bool bit_set(const unsigned* mask, int i) { return (mask[i >> 5] >> (i & 31)) & 1u; }

__device__ __forceinline__ float penalize(float x, int c, const RowPenalty& p) {
  const int n = c & PAGEDKV_LP_COUNT_MASK;
  if ((c != 0) && p.repetition != 1.f) x = x > 0.f ? __fdiv_rn(x, p.repetition) : __fmul_rn(x, p.repetition);
  x = __fsub_rn(x, __fmul_rn(p.frequency, (float)n));
  return __fsub_rn(x, n > 0 ? p.presence : 0.f);
}

// The masked value of token i (grammar, allowed) before bias and penalties.
template <int DT>
__device__ __forceinline__ float masked(const typename KV<DT>::T* x, int i, const unsigned* grammar,
                                        const unsigned* allowed) {
  if ((grammar && !bit_set(grammar, i)) || (allowed && !bit_set(allowed, i))) return PAGEDKV_NEG_INF;
  return KV<DT>::to_float(x[i]);
}

// process_logits_kernel1:
//   processed  [P, V] float32: row proc_row[r] receives row r processed
//   logits     [B, V] rows `row_stride` elements apart (float32 / float16 / bfloat16)
//   flags, proc_row, state_row, mask_row  [B] int32;  step [B] int64: output tokens before this one
//   counts [S, V], history [S, H], lists [S, L], allowed [S, W], grammar [G, W]: see the file header
// grid: (B), block: any multiple of 32 (256)
template <int DT>
__device__ __forceinline__ void process_logits_kernel1(
    float* __restrict__ processed, const typename KV<DT>::T* __restrict__ logits, long long row_stride, int V,
    const int* __restrict__ flags, const int* __restrict__ proc_row, const int* __restrict__ state_row,
    const int* __restrict__ mask_row, const long long* __restrict__ step, const int* __restrict__ counts,
    const int* __restrict__ history, int H, const int* __restrict__ lists, int L,
    const unsigned* __restrict__ allowed, const unsigned* __restrict__ grammar, int W) {
  const int r = blockIdx.x, f = flags[r];
  if (!(f & PAGEDKV_LP_PROCESS)) return;
  const typename KV<DT>::T* x = logits + r * row_stride;
  float* y = processed + (long long)proc_row[r] * V;
  const unsigned* g = (f & PAGEDKV_LP_MASK) ? grammar + (long long)mask_row[r] * W : nullptr;
  const int s = (f & PAGEDKV_LP_STATE) ? state_row[r] : -1;
  const int* hdr = s >= 0 ? lists + (long long)s * L : nullptr;
  const unsigned* a = (hdr && hdr[3]) ? allowed + (long long)s * W : nullptr;
  RowPenalty p{0.f, 0.f, 1.f, nullptr};
  if (hdr) p = RowPenalty{__int_as_float(hdr[5]), __int_as_float(hdr[6]), __int_as_float(hdr[7]),
                          counts + (long long)s * V};

  // dense: masks and penalties
  for (int i = threadIdx.x; i < V; i += blockDim.x) {
    const float v = masked<DT>(x, i, g, a);
    y[i] = p.counts ? penalize(v, p.counts[i], p) : v;
  }
  if (!hdr) return;
  __syncthreads();

  // logit_bias: the biased entries again, bias before the penalties (ids are distinct)
  const int n_bias = hdr[0], n_stop = hdr[1], n_bad = hdr[2];
  const int* data = hdr + PAGEDKV_LP_HEADER;
  for (int e = threadIdx.x; e < n_bias; e += blockDim.x) {
    const int id = data[2 * e];
    const float v = __fadd_rn(masked<DT>(x, id, g, a), __int_as_float(data[2 * e + 1]));
    y[id] = penalize(v, p.counts[id], p);
  }
  __syncthreads();

  // bans: stop ids before min_tokens, bad words whose prefix ends the output
  const long long out_len = step[r];
  if (out_len < hdr[4])
    for (int e = threadIdx.x; e < n_stop; e += blockDim.x) y[data[2 * n_bias + e]] = PAGEDKV_NEG_INF;
  if (threadIdx.x == 0 && n_bad > 0) {
    const int* w = data + 2 * n_bias + n_stop;
    const int* hist = history + (long long)s * H;
    for (int b = 0; b < n_bad; ++b) {
      const int len = w[0], prefix = len - 1;
      bool match = prefix <= out_len;
      for (int j = 0; match && j < prefix; ++j) match = hist[(out_len - prefix + j) % H] == w[1 + j];
      if (match) y[w[len]] = PAGEDKV_NEG_INF;
      w += 1 + len;
    }
  }
}

// count_tokens_kernel1:
//   tokens [B] int32 (the step's samples);  flags, state_row [B] int32;  step [B] int64
//   counts [S, V] int32, history [S, H] int32: the sampled token counted, and stored at step % H
// grid: (ceil(B / 128)), block: 128
__device__ __forceinline__ void count_tokens_kernel1(const int* __restrict__ tokens, const int* __restrict__ flags,
                                                     const int* __restrict__ state_row,
                                                     const long long* __restrict__ step, int* __restrict__ counts,
                                                     int* __restrict__ history, int H, int V, int B) {
  const int r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= B || !(flags[r] & PAGEDKV_LP_UPDATE)) return;
  const long long s = state_row[r];
  const int t = tokens[r];
  atomicAdd(counts + s * V + t, 1);
  history[s * H + step[r] % H] = t;
}

}  // namespace pagedkv

#define PAGEDKV_PROCESS(SUFFIX, DT)                                                                              \
  extern "C" __global__ void process_logits_##SUFFIX(                                                            \
      float* processed, const pagedkv::KV<DT>::T* logits, long long row_stride, int V, const int* flags,         \
      const int* proc_row, const int* state_row, const int* mask_row, const long long* step, const int* counts,  \
      const int* history, int H, const int* lists, int L, const unsigned* allowed, const unsigned* grammar,      \
      int W) {                                                                                                   \
    pagedkv::process_logits_kernel1<DT>(processed, logits, row_stride, V, flags, proc_row, state_row, mask_row,  \
                                        step, counts, history, H, lists, L, allowed, grammar, W);                \
  }

PAGEDKV_PROCESS(f32, 0)
PAGEDKV_PROCESS(f16, 1)
PAGEDKV_PROCESS(bf16, 2)

extern "C" __global__ void count_tokens(const int* tokens, const int* flags, const int* state_row,
                                        const long long* step, int* counts, int* history, int H, int V, int B) {
  pagedkv::count_tokens_kernel1(tokens, flags, state_row, step, counts, history, H, V, B);
}
