// add_rms_norm.cu: the residual add fused with the RMSNorm after it, one row per thread block:
//   x = x + y (in place, rounded to x's type), out = weight * (x / sqrt(mean(x^2) + eps))
//
// Versions:
//   add_rms_norm_kernel1   rms_norm.cu's rms_norm_kernel1 (same loops, same reduction, same rounding) reading
//                          x + y instead of x, and writing that sum back: bitwise the result of the add followed
//                          by rms_norm_kernel1, with one launch (and one pass over x) fewer. A sum of two values
//                          of the type, computed in float32 and rounded once, is the type's correctly rounded sum
//                          (float16 and bfloat16: exact in float32, or the smaller is below half an ulp).
//
// The decoder calls it between layers: x = x + attn @ wo; h = norm(x) and x = x + mlp; h = next layer's norm(x).
#include "common.cuh"

#define PAGEDKV_NORM_THREADS 256

// add_rms_norm_kernel1:
//   out      [num_rows, hidden], C-contiguous: the normalised sum
//   x        [num_rows, hidden], C-contiguous: the residual stream, replaced by x + y
//   y        [num_rows, hidden], C-contiguous: what is added
//   weight   [hidden]
//   inv_hidden  1 / hidden;  eps  the variance epsilon
// grid: (num_rows), block: PAGEDKV_NORM_THREADS
template <int DT>
__device__ __forceinline__ void add_rms_norm_kernel1(typename pagedkv::KV<DT>::T* __restrict__ out,
                                                     typename pagedkv::KV<DT>::T* __restrict__ x,
                                                     const typename pagedkv::KV<DT>::T* __restrict__ y,
                                                     const typename pagedkv::KV<DT>::T* __restrict__ weight,
                                                     int hidden, float inv_hidden, float eps) {
  typedef pagedkv::KV<DT> kv;
  __shared__ float s_red[32];
  const long long row = blockIdx.x;
  typename kv::T* xr = x + row * hidden;
  const typename kv::T* yr = y + row * hidden;
  // the sum, rounded to the type and written back; its sum of squares in float32
  float ss = 0.f;
  for (int i = threadIdx.x; i < hidden; i += PAGEDKV_NORM_THREADS) {
    const typename kv::T s = kv::from_float(kv::to_float(xr[i]) + kv::to_float(yr[i]));
    xr[i] = s;
    const float v = kv::to_float(s);
    ss = fmaf(v, v, ss);
  }
  const float inv_rms = rsqrtf(pagedkv::block_reduce<false>(ss, s_red) * inv_hidden + eps);
  // scale: round x * inv_rms to the type, then multiply by the weight (each thread reads back what it wrote)
  for (int i = threadIdx.x; i < hidden; i += PAGEDKV_NORM_THREADS) {
    const float normed = kv::to_float(kv::from_float(kv::to_float(xr[i]) * inv_rms));
    out[row * hidden + i] = kv::from_float(normed * kv::to_float(weight[i]));
  }
}

#define PAGEDKV_ADD_RMS_NORM(SUFFIX, DT)                                                                \
  extern "C" __global__ void __launch_bounds__(PAGEDKV_NORM_THREADS)                                    \
      add_rms_norm_##SUFFIX(pagedkv::KV<DT>::T* out, pagedkv::KV<DT>::T* x,                             \
                            const pagedkv::KV<DT>::T* y, const pagedkv::KV<DT>::T* weight, int hidden,  \
                            float inv_hidden, float eps) {                                              \
    add_rms_norm_kernel1<DT>(out, x, y, weight, hidden, inv_hidden, eps);                               \
  }

PAGEDKV_ADD_RMS_NORM(f32, 0)
PAGEDKV_ADD_RMS_NORM(f16, 1)
PAGEDKV_ADD_RMS_NORM(bf16, 2)
