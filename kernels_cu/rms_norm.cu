// rms_norm.cu: Llama's RMSNorm, y = weight * (x / sqrt(mean(x^2) + eps)), one row per thread block.
//
// Versions:
//   rms_norm_kernel1   one thread block per row: float32 sum of squares, a block reduction, then the scale.
//                      Rounded as Hugging Face's LlamaRMSNorm: the normalised value is cast to the input type
//                      before it is multiplied by the weight.
//
// One launch replaces CuPy's reduction + elementwise pair (their host overhead dominates a prefill forward).
#include "common.cuh"

#define PAGEDKV_NORM_THREADS 256

// rms_norm_kernel1:
//   out, x   [num_rows, hidden], C-contiguous
//   weight   [hidden]
//   inv_hidden  1 / hidden;  eps  the variance epsilon
// grid: (num_rows), block: PAGEDKV_NORM_THREADS
template <int DT>
__device__ __forceinline__ void rms_norm_kernel1(typename pagedkv::KV<DT>::T* __restrict__ out,
                                                 const typename pagedkv::KV<DT>::T* __restrict__ x,
                                                 const typename pagedkv::KV<DT>::T* __restrict__ weight,
                                                 int hidden, float inv_hidden, float eps) {
  typedef pagedkv::KV<DT> kv;
  __shared__ float s_red[32];
  const long long row = blockIdx.x;
  const typename kv::T* xr = x + row * hidden;
  // sum of squares in float32
  float ss = 0.f;
  for (int i = threadIdx.x; i < hidden; i += PAGEDKV_NORM_THREADS) {
    const float v = kv::to_float(xr[i]);
    ss = fmaf(v, v, ss);
  }
  const float inv_rms = rsqrtf(pagedkv::block_reduce<false>(ss, s_red) * inv_hidden + eps);
  // scale: round x * inv_rms to the input type, then multiply by the weight
  for (int i = threadIdx.x; i < hidden; i += PAGEDKV_NORM_THREADS) {
    const float normed = kv::to_float(kv::from_float(kv::to_float(xr[i]) * inv_rms));
    out[row * hidden + i] = kv::from_float(normed * kv::to_float(weight[i]));
  }
}

#define PAGEDKV_RMS_NORM(SUFFIX, DT)                                                                    \
  extern "C" __global__ void __launch_bounds__(PAGEDKV_NORM_THREADS)                                    \
      rms_norm_##SUFFIX(pagedkv::KV<DT>::T* out, const pagedkv::KV<DT>::T* x,                           \
                        const pagedkv::KV<DT>::T* weight, int hidden, float inv_hidden, float eps) {    \
    rms_norm_kernel1<DT>(out, x, weight, hidden, inv_hidden, eps);                                      \
  }

PAGEDKV_RMS_NORM(f32, 0)
PAGEDKV_RMS_NORM(f16, 1)
PAGEDKV_RMS_NORM(bf16, 2)
