// fp8_convert.cuh: fp8 cache bytes -> the 16-bit values the tensor-core kernels read, exactly, in registers.
// Needs common.cuh (KV) and mma.cuh (pack2) before it. Included by prefill_attention.cu (version 2 over an fp8
// cache) and paged_attention_tc.cu (decode version 4, both its paths); decode kernels 2 and 3 have their own per-element path
// (paged_attention.cu: CacheType), the gather before the Hopper prefill its conversion instruction
// (cache_ops.cu).
//
// FMT 1 = e4m3 (e4m3fn), 2 = e5m2; DT 1 = float16, 2 = bfloat16.
//   e5m2 is float16's top byte (the same exponent bias): one byte permute.
//   e4m3 s.eeee.mmm becomes the float16 bits s.0eeee.mmm0000000, the value times 2^-8 (FP8_UNIT; subnormals
//   too, both formats' subnormals line up), so launchers multiply k_scale and v_scale by 256. NaN bytes of
//   e4m3 read as finite values: the cache write never stores one (it saturates).
//   bfloat16 goes through float32 (exact).

namespace pagedkv {

__device__ __forceinline__ unsigned prmt(unsigned x, unsigned sel) {  // bytes of (x, 0) picked by sel
  unsigned r;
  asm("prmt.b32 %0, %1, 0, %2;" : "=r"(r) : "r"(x), "r"(sel));
  return r;
}

// Four fp8 bytes -> four 16-bit values of type DT: lo = bytes 0, 1 (byte 0 in the low half), hi = bytes 2, 3.
template <int DT, int FMT>
__device__ __forceinline__ void fp8x4_to_16(unsigned x, unsigned& lo, unsigned& hi) {
  lo = prmt(x, 0x1404u);  // {0, b0, 0, b1}: each half = byte << 8
  hi = prmt(x, 0x3424u);  // {0, b2, 0, b3}
  if constexpr (FMT == 1) {
    lo = (lo & 0x80008000u) | ((lo >> 1) & 0x3f803f80u);
    hi = (hi & 0x80008000u) | ((hi >> 1) & 0x3f803f80u);
  }
  if constexpr (DT == 2) {
    lo = pack2<2>(KV<1>::to_float((unsigned short)(lo & 0xffffu)), KV<1>::to_float((unsigned short)(lo >> 16)));
    hi = pack2<2>(KV<1>::to_float((unsigned short)(hi & 0xffffu)), KV<1>::to_float((unsigned short)(hi >> 16)));
  }
}

// Byte k (0..3) of x and byte k of y: two fp8 values of two rows (two keys of one dimension) -> one register of
// two 16-bit values of DT, x's in the low half: the B fragment of a P V step built without a transpose in shared
// memory (decode version 4's register path). One byte permute puts each byte in its half's high byte; e4m3's
// shift drops the low byte, e5m2 clears it.
template <int DT, int FMT>
__device__ __forceinline__ unsigned fp8pair_to_16(unsigned x, unsigned y, int k) {
  unsigned r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(x), "r"(y), "r"(0x4400u + 0x1111u * k));  // {xk, xk, yk, yk}
  if constexpr (FMT == 1) {
    r = (r & 0x80008000u) | ((r >> 1) & 0x3f803f80u);
  } else {
    r &= 0xff00ff00u;
  }
  if constexpr (DT == 2) {
    r = pack2<2>(KV<1>::to_float((unsigned short)(r & 0xffffu)), KV<1>::to_float((unsigned short)(r >> 16)));
  }
  return r;
}

// One 16-byte chunk of fp8 bytes (16 elements) -> two 16-byte chunks of DT: a = elements 0-7, b = 8-15.
template <int DT, int FMT>
__device__ __forceinline__ void fp8x16_to_16(const uint4& raw, uint4& a, uint4& b) {
  fp8x4_to_16<DT, FMT>(raw.x, a.x, a.y);
  fp8x4_to_16<DT, FMT>(raw.y, a.z, a.w);
  fp8x4_to_16<DT, FMT>(raw.z, b.x, b.y);
  fp8x4_to_16<DT, FMT>(raw.w, b.z, b.w);
}

}  // namespace pagedkv
