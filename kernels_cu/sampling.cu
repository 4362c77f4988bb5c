// sampling.cu: one token id per row of logits [B, V] on the device, capturable in a CUDA graph: greedy
// (temperature 0: argmax), or temperature + min-p + top-k + top-p, drawn by Gumbel-max with noise from
// Philox4x32-10 keyed by (seed, step, token). One thread block per row; no sort of the vocabulary.
//
// Versions:
//   sample_kernel1   one block of PAGEDKV_SAMPLE_THREADS per row, every stage a pass over the row (L2):
//                      greedy              1 pass: argmax (lowest index among equal maxima)
//                      filtered rows       pass 1: max, each thread's own max, a float softmax sum;
//                                          top-k: radix select of the k-th largest logit on its sort key
//                                            (8-bit digits: 2 passes for 16-bit logits, 4 for float32),
//                                            only tokens >= the k-th largest thread maximum take part;
//                                          top-p: radix select on fixed-point probability mass (same digits),
//                                            only tokens above a bound from the sorted thread maxima take part
//                                            (the pass falls back to every token when the bound was too high);
//                      draw                1 pass: argmax over kept tokens of logit / T + Gumbel noise
//                    Measured (experiments/gpu_run_sampler.sh; H200, V = 128256 float16, L2 flushed, launch
//                    included), B = 128: greedy 20 us, T=1 64 us, top-k 50 70 us, min-p 34 us, top-p 0.95 153 us
//                    (cupy.argmax: 189 us). NOTE: one block per row, so B = 1 costs as much as B = 128 (one SM
//                    does the row's work); splitting a row over several blocks would cut small-batch latency.
//                    A row processed by logits_process.cu (penalties, masks) is read from its float32 copy.
//
// The distribution (pagedkv/engine/runner/sampler.py implements the same steps in NumPy, the test reference):
//   x = logits as float32, z = x * (1 / T) (float32 reciprocal, then multiply), m = max(x) * (1 / T)
//   A  = {i : z_i - m >= logf(min_p)}  ∩  {i : x_i >= the k-th largest x, when 0 < top_k < V}
//   Q_i = rint(expf(z_i - m) * 2^40)   (integer mass: sums are exact, so the kernel is deterministic)
//   kept = {i in A : sum of Q_j over j in A with x_j > x_i  <  ceil(double(sum_A Q) * double(top_p))}
//   token = argmax over kept of z_i + g_i (lowest index on ties), g_i = -logf(-logf(u_i)),
//   u_i = (2 * (w_i >> 9) + 1) * 2^-24, w_i = word i % 4 of Philox4x32-10(ctr = (i / 4, step lo, step hi, 0),
//   key = (seed lo, seed hi)).
// Every filter keeps whole ties (a value is kept or dropped with all its copies); -0.0 equals +0.0.
// Products and sums that must round as NumPy's do use __fmul_rn / __fsub_rn / __fadd_rn (never fused).
// Logits must not be NaN (a NaN row yields some index in [0, V)).
#include "common.cuh"

#define PAGEDKV_SAMPLE_THREADS 1024
#define PAGEDKV_SAMPLE_BINS 256
#define PAGEDKV_MASS_SCALE 1099511627776.f  // 2^40: fixed-point scale of a token's probability mass

namespace pagedkv {

// ---- sort keys: an unsigned order of the logits' bit patterns (radix select works on these) -----------

template <int DT> struct SampleKey;

template <> struct SampleKey<0> {
  static const int BITS = 32;
  static __device__ __forceinline__ unsigned of(float x) {
    unsigned b = __float_as_uint(x);
    b = b == 0x80000000u ? 0u : b;  // -0.0 sorts as +0.0
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  }
  static __device__ __forceinline__ float value(unsigned k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
  }
};

template <int DT> struct SampleKey {  // float16, bfloat16: the raw 16-bit word
  static const int BITS = 16;
  static __device__ __forceinline__ unsigned of(unsigned short h) {
    unsigned b = h == 0x8000u ? 0u : h;
    return (b & 0x8000u) ? (~b & 0xffffu) : (b | 0x8000u);
  }
  static __device__ __forceinline__ float value(unsigned k) {
    return KV<DT>::to_float((unsigned short)((k & 0x8000u) ? (k & 0x7fffu) : (~k & 0xffffu)));
  }
};

// ---- Philox4x32-10 (Salmon et al., SC'11; Random123's constants and round order) ----------------------

__device__ __forceinline__ uint4 philox4x32_10(uint4 c, unsigned k0, unsigned k1) {
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    if (r) { k0 += 0x9E3779B9u; k1 += 0xBB67AE85u; }
    const unsigned lo0 = 0xD2511F53u * c.x, hi0 = __umulhi(0xD2511F53u, c.x);
    const unsigned lo1 = 0xCD9E8D57u * c.z, hi1 = __umulhi(0xCD9E8D57u, c.z);
    c = uint4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
  }
  return c;
}

__device__ __forceinline__ float gumbel(unsigned w) {
  const float u = __uint2float_rn(((w >> 9) << 1) | 1u) * 5.9604644775390625e-08f;  // odd / 2^24, in (0, 1)
  return -logf(-logf(u));
}

// *(hi:lo) += q with two native 32-bit shared atomics (a 64-bit shared atomic add is a compare-and-swap
// loop); the carry out of the low word is counted exactly, so the sum is exact and order-independent.
__device__ __forceinline__ void atomic_add_split(unsigned* lo, unsigned* hi, unsigned long long q) {
  const unsigned ql = (unsigned)q, old = atomicAdd(lo, ql);
  const unsigned qh = (unsigned)(q >> 32) + (old + ql < old ? 1u : 0u);
  if (qh) atomicAdd(hi, qh);
}

__device__ __forceinline__ unsigned long long mass_of(float z_minus_m) {
  return __float2ull_rn(expf(z_minus_m) * PAGEDKV_MASS_SCALE);
}

// ---- row access: chunks of 8 tokens, 16-byte loads where the row allows ------------------------------

// Loads tokens 8c .. 8c+7 (those < V) of `row` into r; returns how many are valid.
template <int DT>
__device__ __forceinline__ int load_chunk(const typename KV<DT>::T* row, int c, int V, bool vec,
                                          typename KV<DT>::T* r) {
  const int base = c * 8, n = min(8, V - base);
  if (vec && n == 8) {
    const uint4* p = reinterpret_cast<const uint4*>(row + base);
    if constexpr (DT == 0) {
      const uint4 a = p[0], b = p[1];
      const unsigned w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
      for (int j = 0; j < 8; ++j) r[j] = __uint_as_float(w[j]);
    } else {
      const uint4 a = p[0];
      const unsigned w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        r[2 * j] = (unsigned short)(w[j] & 0xffffu);
        r[2 * j + 1] = (unsigned short)(w[j] >> 16);
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) r[j] = j < n ? row[base + j] : r[0];
  }
  return n;
}

// ---- block reductions beyond common.cuh ----------------------------------------------------------------

__device__ __forceinline__ void argmax_update(float& bv, int& bi, float v, int i) {
  if (v > bv || (v == bv && i < bi)) { bv = v; bi = i; }
}

// Block-wide argmax (lowest index among equal values); every thread gets the index.
__device__ __forceinline__ int block_argmax(float v, int i, float* s_v, int* s_i) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1)
    argmax_update(v, i, __shfl_xor_sync(0xffffffffu, v, o), __shfl_xor_sync(0xffffffffu, i, o));
  __syncthreads();
  if (lane == 0) { s_v[warp] = v; s_i[warp] = i; }
  __syncthreads();
  v = s_v[lane];
  i = s_i[lane];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1)
    argmax_update(v, i, __shfl_xor_sync(0xffffffffu, v, o), __shfl_xor_sync(0xffffffffu, i, o));
  return i;
}

__device__ __forceinline__ unsigned long long block_sum_u64(unsigned long long x, unsigned long long* s) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  __syncthreads();
  if (lane == 0) s[warp] = x;
  __syncthreads();
  x = s[lane];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Inclusive prefix sum over the block in thread order (float).
__device__ __forceinline__ float block_scan(float x, float* s) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const float t = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += t;
  }
  __syncthreads();
  if (lane == 31) s[warp] = x;
  __syncthreads();
  float w = s[lane], before = 0.f;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const float t = __shfl_up_sync(0xffffffffu, w, o);
    if (lane >= o) w += t;
  }
  before = __shfl_sync(0xffffffffu, w, (warp + 31) & 31);
  return warp ? x + before : x;
}

// Sorts PAGEDKV_SAMPLE_THREADS floats of shared memory in descending order (bitonic network).
__device__ __forceinline__ void block_sort_desc(float* s) {
  const int t = threadIdx.x;
  for (int k = 2; k <= PAGEDKV_SAMPLE_THREADS; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      const int u = t ^ j;
      if (u > t) {
        const float a = s[t], b = s[u];
        if (((t & k) == 0) ? (a < b) : (a > b)) { s[t] = b; s[u] = a; }
      }
      __syncthreads();
    }
  }
}

// Warp 0 only: walking the digits from 255 down with a running total that starts at `base`, the digit
// where the total first reaches `target` (above < target <= above + v[digit]); writes it and `above`.
// Lane l holds digits 255 - 8l .. 248 - 8l. Integer counts: exactly one digit qualifies when the
// histogram's total reaches the target.
template <typename C>
__device__ __forceinline__ void pick_digit(const C* v, C base, C target, int* s_digit, C* s_above) {
  const int lane = threadIdx.x;
  C local[8], sum = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) { local[j] = v[255 - 8 * lane - j]; sum += local[j]; }
  C incl = sum;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const C t = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += t;
  }
  C above = base + (incl - sum);
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    if (above < target && target <= above + local[j]) { *s_digit = 255 - 8 * lane - j; *s_above = above; }
    above += local[j];
  }
}

// ---- the kernel ------------------------------------------------------------------------------------------

struct SampleShared {
  float tmax[PAGEDKV_SAMPLE_THREADS];  // each thread's largest logit, then sorted descending
  unsigned count[PAGEDKV_SAMPLE_BINS];
  unsigned mass_lo[PAGEDKV_SAMPLE_BINS], mass_hi[PAGEDKV_SAMPLE_BINS];  // 64-bit sums as two 32-bit words
  unsigned long long mass[PAGEDKV_SAMPLE_BINS];
  unsigned long long red64[32];
  float red[32];
  int red_i[32];
  int digit;
  unsigned count_above;
  unsigned long long mass_above;
};

// sample_kernel1:
//   out          [B] int32: the token of each row
//   x_row        this block's row of V logits, unit stride (float32 / float16 / bfloat16)
//   vec          1 when the row starts 16-byte aligned (16-byte loads), else 0
//   temperature  [B] float32 (<= 0: greedy);  top_k [B] int32 (<= 0 or >= V: off);
//   top_p        [B] float32 (>= 1: off);  min_p [B] float32 (<= 0: off);
//   seed         [B] uint64 (Philox key);  step [B] int64 (Philox counter: the branch's generated tokens)
// grid: (B), block: PAGEDKV_SAMPLE_THREADS
template <int DT>
__device__ __forceinline__ void sample_kernel1(int* __restrict__ out, const typename KV<DT>::T* __restrict__ x_row,
                                               int V, int vec,
                                               const float* __restrict__ temperature, const int* __restrict__ top_k,
                                               const float* __restrict__ top_p, const float* __restrict__ min_p,
                                               const unsigned long long* __restrict__ seed,
                                               const long long* __restrict__ step) {
  typedef KV<DT> kv;
  typedef typename kv::T T;
  typedef SampleKey<DT> key;
  __shared__ SampleShared sh;
  const int row = blockIdx.x, tid = threadIdx.x, num_chunks = (V + 7) >> 3;
  const bool vec_ok = vec != 0;
  const float temp = temperature[row];
  T r[8];

  // greedy: argmax
  if (!(temp > 0.f)) {
    float bv = PAGEDKV_NEG_INF;
    int bi = 0x7fffffff;
    for (int c = tid; c < num_chunks; c += PAGEDKV_SAMPLE_THREADS) {
      const int n = load_chunk<DT>(x_row, c, V, vec_ok, r);
      for (int j = 0; j < n; ++j) argmax_update(bv, bi, kv::to_float(r[j]), 8 * c + j);
    }
    const int best = block_argmax(bv, bi, sh.red, sh.red_i);
    if (tid == 0) out[row] = best < V ? best : 0;
    return;
  }
  const float inv_t = __frcp_rn(temp);
  const int k = top_k[row];
  const float p = top_p[row], mp = min_p[row];
  const bool use_k = k > 0 && k < V, use_p = p < 1.f, use_minp = mp > 0.f;
  float m = 0.f, lmp = PAGEDKV_NEG_INF, t = PAGEDKV_NEG_INF;  // max z, log(min_p), keep x >= t

  if (use_k || use_p || use_minp) {
    // pass 1: max logit, this thread's max, a float softmax sum (online) for the top-p bound
    float tmax = PAGEDKV_NEG_INF, om = PAGEDKV_NEG_INF, os = 0.f;
    for (int c = tid; c < num_chunks; c += PAGEDKV_SAMPLE_THREADS) {
      const int n = load_chunk<DT>(x_row, c, V, vec_ok, r);
      for (int j = 0; j < n; ++j) {
        const float x = kv::to_float(r[j]);
        tmax = fmaxf(tmax, x);
        if (use_p && x != PAGEDKV_NEG_INF) {
          const float z = x * inv_t;
          if (z > om) { os = os * expf(om - z) + 1.f; om = z; } else { os += expf(z - om); }
        }
      }
    }
    sh.tmax[tid] = tmax;
    m = __fmul_rn(block_reduce<true>(tmax, sh.red), inv_t);
    const float s_float = block_reduce<false>(om == PAGEDKV_NEG_INF ? 0.f : os * expf(om - m), sh.red);
    if (use_minp) lmp = logf(mp);
    if (use_k || use_p) block_sort_desc(sh.tmax);  // ends with __syncthreads

    // top-k: the k-th largest logit; only tokens >= the k-th largest thread maximum can be it
    if (use_k) {
      const float lower = k <= PAGEDKV_SAMPLE_THREADS ? sh.tmax[k - 1] : PAGEDKV_NEG_INF;
      unsigned prefix = 0, mask = 0, rank = k;
      for (int shift = key::BITS - 8; shift >= 0; shift -= 8) {
        if (tid < PAGEDKV_SAMPLE_BINS) sh.count[tid] = 0;
        __syncthreads();
        for (int c = tid; c < num_chunks; c += PAGEDKV_SAMPLE_THREADS) {
          const int n = load_chunk<DT>(x_row, c, V, vec_ok, r);
          for (int j = 0; j < n; ++j) {
            const unsigned kk = key::of(r[j]);
            if (kv::to_float(r[j]) >= lower && (kk & mask) == prefix) atomicAdd(&sh.count[(kk >> shift) & 255u], 1u);
          }
        }
        __syncthreads();
        if (tid < 32) pick_digit<unsigned>(sh.count, 0u, rank, &sh.digit, &sh.count_above);
        __syncthreads();
        prefix |= (unsigned)sh.digit << shift;
        mask |= 255u << shift;
        rank -= sh.count_above;
      }
      t = key::value(prefix);
    }

    // top-p: the smallest logit whose strictly-larger kept mass is < ceil(S * top_p)
    if (use_p) {
      // bound: the thread maxima (kept ones) whose float mass first reaches top_p * the float sum
      const float v = sh.tmax[tid];
      const float dv = __fsub_rn(__fmul_rn(v, inv_t), m);
      const float incl = block_scan(v >= t && dv >= lmp ? expf(dv) : 0.f, sh.red);
#ifdef PAGEDKV_SAMPLE_FORCE_RETRY  // test hook: the tightest bound (the largest logit) forces the fallback pass
      const int j = 0 * (int)block_reduce<false>(incl, sh.red);
#else
      const int j = (int)block_reduce<false>(incl < p * s_float ? 1.f : 0.f, sh.red);
#endif
      float lower = fmaxf(t, j < PAGEDKV_SAMPLE_THREADS ? sh.tmax[j] : PAGEDKV_NEG_INF);
      unsigned prefix = 0, mask = 0;
      unsigned long long base = 0, target = 0;
      for (int shift = key::BITS - 8; shift >= 0; shift -= 8) {
        for (;;) {
          if (tid < PAGEDKV_SAMPLE_BINS) { sh.mass_lo[tid] = 0; sh.mass_hi[tid] = 0; }
          __syncthreads();
          unsigned long long s_part = 0;
          for (int c = tid; c < num_chunks; c += PAGEDKV_SAMPLE_THREADS) {
            const int n = load_chunk<DT>(x_row, c, V, vec_ok, r);
            for (int jj = 0; jj < n; ++jj) {
              const float x = kv::to_float(r[jj]);
              const float d = __fsub_rn(__fmul_rn(x, inv_t), m);
              if (!(x >= t && d >= lmp)) continue;
              const unsigned kk = key::of(r[jj]);
              const bool in_hist = x >= lower && (kk & mask) == prefix;
              if (mask != 0 && !in_hist) continue;
              const unsigned long long q = mass_of(d);
              s_part += q;
              if (in_hist) atomic_add_split(&sh.mass_lo[(kk >> shift) & 255u], &sh.mass_hi[(kk >> shift) & 255u], q);
            }
          }
          if (mask == 0) {  // first digit: the exact sum S over A and the integer target
            const unsigned long long s_int = block_sum_u64(s_part, sh.red64);
            target = (unsigned long long)ceil(__ull2double_rn(s_int) * (double)p);
          }
          __syncthreads();
          if (tid < PAGEDKV_SAMPLE_BINS) sh.mass[tid] = ((unsigned long long)sh.mass_hi[tid] << 32) | sh.mass_lo[tid];
          __syncthreads();
          unsigned long long total = 0;
          if (tid < 32) {
            unsigned long long w = 0;
            for (int b = tid; b < PAGEDKV_SAMPLE_BINS; b += 32) w += sh.mass[b];
            for (int o = 16; o > 0; o >>= 1) w += __shfl_xor_sync(0xffffffffu, w, o);
            if (tid == 0) sh.red64[0] = w;
          }
          __syncthreads();
          total = sh.red64[0];
          __syncthreads();
          if (base + total >= target || lower <= t) break;
          lower = t;  // NOTE: the bound was too high (float sums): redo this digit over every kept token
        }
        if (tid < 32) pick_digit<unsigned long long>(sh.mass, base, target, &sh.digit, &sh.mass_above);
        __syncthreads();
        prefix |= (unsigned)sh.digit << shift;
        mask |= 255u << shift;
        base = sh.mass_above;
      }
      t = key::value(prefix);
    }
  }

  // draw: argmax over kept tokens of z + Gumbel noise
  const unsigned long long sd = seed[row];
  const unsigned long long st = (unsigned long long)step[row];
  const unsigned k0 = (unsigned)sd, k1 = (unsigned)(sd >> 32), c1 = (unsigned)st, c2 = (unsigned)(st >> 32);
  float bv = PAGEDKV_NEG_INF;
  int bi = 0x7fffffff;
  for (int c = tid; c < num_chunks; c += PAGEDKV_SAMPLE_THREADS) {
    const int n = load_chunk<DT>(x_row, c, V, vec_ok, r);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float z[4];
      bool any = false;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float x = 4 * h + j < n ? kv::to_float(r[4 * h + j]) : __int_as_float(0x7fc00000);
        z[j] = __fmul_rn(x, inv_t);
        const bool keep = x >= t && __fsub_rn(z[j], m) >= lmp;
        z[j] = keep ? z[j] : __int_as_float(0x7fc00000);  // NaN: never selected
        any |= keep;
      }
      if (!any) continue;
      const uint4 w4 = philox4x32_10(uint4{(unsigned)(2 * c + h), c1, c2, 0u}, k0, k1);
      const unsigned w[4] = {w4.x, w4.y, w4.z, w4.w};
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (z[j] == z[j]) argmax_update(bv, bi, __fadd_rn(z[j], gumbel(w[j])), 8 * c + 4 * h + j);
    }
  }
  const int best = block_argmax(bv, bi, sh.red, sh.red_i);
  if (tid == 0) out[row] = best < V ? best : 0;
}

}  // namespace pagedkv

// The kernels: row r samples from logits row r, or, when flags[r] & 1 (logits_process.cu's PAGEDKV_LP_PROCESS),
// from processed[proc_row[r]] (float32 [P, V], rows V apart; vec_processed: 16-byte aligned rows).
// flags == nullptr: no row is processed.
#define PAGEDKV_SAMPLE(SUFFIX, DT)                                                                            \
  extern "C" __global__ void __launch_bounds__(PAGEDKV_SAMPLE_THREADS, 1)                                     \
      sample_##SUFFIX(int* out, const pagedkv::KV<DT>::T* logits, long long row_stride, int vocab_size,       \
                      int vec, const float* temperature, const int* top_k, const float* top_p,                \
                      const float* min_p, const unsigned long long* seed, const long long* step,              \
                      const float* processed, const int* flags, const int* proc_row, int vec_processed) {     \
    const int row = blockIdx.x;                                                                               \
    if (flags != nullptr && (flags[row] & 1)) {                                                               \
      pagedkv::sample_kernel1<0>(out, processed + (long long)proc_row[row] * vocab_size, vocab_size,          \
                                 vec_processed, temperature, top_k, top_p, min_p, seed, step);                \
      return;                                                                                                 \
    }                                                                                                         \
    pagedkv::sample_kernel1<DT>(out, logits + row * row_stride, vocab_size, vec, temperature, top_k, top_p,   \
                                min_p, seed, step);                                                           \
  }

PAGEDKV_SAMPLE(f32, 0)
PAGEDKV_SAMPLE(f16, 1)
PAGEDKV_SAMPLE(bf16, 2)
