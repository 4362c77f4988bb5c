// rms_norm.cu: Llama's RMSNorm, y = weight * (x / sqrt(mean(x^2) + eps)), one row per thread block, alone or
// fused with the residual add before it (x = x + y in place, then the norm of the sum).
//
// Versions:
//   rms_norm_kernel1       one thread block per row: float32 sum of squares, a block reduction, then the scale.
//                          Rounded as Hugging Face's LlamaRMSNorm: the normalised value is cast to the input type
//                          before it is multiplied by the weight.
//   add_rms_norm_kernel1   rms_norm_kernel1 (same loops, same reduction, same rounding) reading x + y instead of
//                          x, and writing that sum back: bitwise the result of the add followed by
//                          rms_norm_kernel1, with one launch (and one pass over x) fewer. A sum of two values of
//                          the type, computed in float32 and rounded once, is the type's correctly rounded sum
//                          (float16 and bfloat16: exact in float32, or the smaller is below half an ulp).
// Both are one template, rms_norm_rows<DT, ADD>, instantiated per type below.
//
// One launch replaces CuPy's reduction + elementwise pair (their host overhead dominates a prefill forward).
// The decoder calls the fused one between layers: x = x + attn @ wo; h = norm(x) and x = x + mlp; h = next
// layer's norm(x).
#include "common.cuh"

#define PAGEDKV_NORM_THREADS 256

// rms_norm_rows:
//   out      [num_rows, hidden], C-contiguous: the normalised rows
//   x        [num_rows, hidden], C-contiguous: the input (ADD: the residual stream, replaced by x + y)
//   y        [num_rows, hidden], C-contiguous: what is added (ADD only; unread otherwise)
//   weight   [hidden]
//   inv_hidden  1 / hidden;  eps  the variance epsilon
// grid: (num_rows), block: PAGEDKV_NORM_THREADS
template <int DT, bool ADD>
__device__ __forceinline__ void rms_norm_rows(typename pagedkv::KV<DT>::T* __restrict__ out,
                                              typename pagedkv::KV<DT>::T* __restrict__ x,
                                              const typename pagedkv::KV<DT>::T* __restrict__ y,
                                              const typename pagedkv::KV<DT>::T* __restrict__ weight,
                                              int hidden, float inv_hidden, float eps) {
  typedef pagedkv::KV<DT> kv;
  __shared__ float s_red[32];
  const long long row = blockIdx.x;
  typename kv::T* xr = x + row * hidden;
  // sum of squares in float32 (ADD: of the sum, rounded to the type and written back)
  float ss = 0.f;
  for (int i = threadIdx.x; i < hidden; i += PAGEDKV_NORM_THREADS) {
    float v;
    if constexpr (ADD) {
      const typename kv::T s = kv::from_float(kv::to_float(xr[i]) + kv::to_float(y[row * hidden + i]));
      xr[i] = s;
      v = kv::to_float(s);
    } else {
      v = kv::to_float(xr[i]);
    }
    ss = fmaf(v, v, ss);
  }
  const float inv_rms = rsqrtf(pagedkv::block_reduce<false>(ss, s_red) * inv_hidden + eps);
  // scale: round x * inv_rms to the input type, then multiply by the weight (ADD: each thread reads back what
  // it wrote)
  for (int i = threadIdx.x; i < hidden; i += PAGEDKV_NORM_THREADS) {
    const float normed = kv::to_float(kv::from_float(kv::to_float(xr[i]) * inv_rms));
    out[row * hidden + i] = kv::from_float(normed * kv::to_float(weight[i]));
  }
}

#define PAGEDKV_RMS_NORM(SUFFIX, DT)                                                                    \
  extern "C" __global__ void __launch_bounds__(PAGEDKV_NORM_THREADS)                                    \
      rms_norm_##SUFFIX(pagedkv::KV<DT>::T* out, const pagedkv::KV<DT>::T* x,                           \
                        const pagedkv::KV<DT>::T* weight, int hidden, float inv_hidden, float eps) {    \
    rms_norm_rows<DT, false>(out, const_cast<pagedkv::KV<DT>::T*>(x), nullptr, weight, hidden,          \
                             inv_hidden, eps);                                                          \
  }                                                                                                     \
  extern "C" __global__ void __launch_bounds__(PAGEDKV_NORM_THREADS)                                    \
      add_rms_norm_##SUFFIX(pagedkv::KV<DT>::T* out, pagedkv::KV<DT>::T* x,                             \
                            const pagedkv::KV<DT>::T* y, const pagedkv::KV<DT>::T* weight, int hidden,  \
                            float inv_hidden, float eps) {                                              \
    rms_norm_rows<DT, true>(out, x, y, weight, hidden, inv_hidden, eps);                                \
  }

PAGEDKV_RMS_NORM(f32, 0)
PAGEDKV_RMS_NORM(f16, 1)
PAGEDKV_RMS_NORM(bf16, 2)
