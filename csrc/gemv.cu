// Batch-1..4 decode GEMV: y[m, n] = scale[n] * sum_k W[n, k] * x[m, k] + bias[n].
//
// At decode a linear layer reads its whole weight once; the time is the weight's bytes over the
// memory bandwidth, provided enough bytes are in flight. Each thread block owns ROWS output
// rows; its THREADS threads walk K together (16-byte weight loads, consecutive threads on
// consecutive vectors, so a warp reads 512 contiguous bytes of one row per load) and issue
// ROWS * UNROLL independent weight loads before using any of them. Partial sums are float32,
// reduced with warp shuffles, then across the block's warps through shared memory.
//
// Weights are fp16/bf16 (the activation dtype) or 8-bit (fp8 e4m3 / int8) with a float32
// per-output-row scale, which commutes with the sum and is applied once at the end.
//
// Built without torch headers: the host entry points below take raw device pointers and a
// cudaStream_t (loaded from Python with ctypes, see minivllm/csrc_ops). Launches allocate
// nothing and never synchronise, so they can be captured in a CUDA graph. On Hopper and later
// they use programmatic dependent launch: the kernel may start while the previous kernel in
// the stream finishes, issues its first weight loads (no kernel writes weights), and only then
// waits for the previous kernel (griddepcontrol.wait) before it reads x or writes y.

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <stdint.h>

namespace {

// Activation dtypes (x, bias, y) and weight kinds, as passed by the Python wrapper.
enum ActDtype : int { kActF16 = 0, kActBF16 = 1 };
enum WeightKind : int { kWeightSame = 0, kWeightFP8 = 1, kWeightINT8 = 2 };
// What the kernel multiplies the weight by.
enum InputOp : int { kInPlain = 0, kInSiluMul = 1, kInRmsNorm = 2 };

struct GemvArgs {
  const void* x;
  const void* w;
  const void* bias;    // may be null
  const float* scale;  // null for 16-bit weights
  void* out;
  int64_t stride_x;        // elements
  int64_t stride_w_bytes;  // bytes between weight rows
  int64_t stride_out;      // elements
  int n;
  int k;
  // kInRmsNorm only.
  const void* residual;    // may be null (no residual add)
  const void* norm_weight;
  void* residual_out;      // x + residual, written by block 0; null without residual
  int64_t stride_res;      // elements
  int64_t stride_res_out;  // elements
  float eps;
};

// ---- programmatic dependent launch (no-ops before sm_90) ---------------------------------------
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Returns once every earlier kernel in the stream has completed and its writes are visible.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// ---- dtype helpers ----------------------------------------------------------------------------
template <int AT> struct Act;

template <> struct Act<kActF16> {
  using T = __half;
  static __device__ __forceinline__ float2 unpack2(uint32_t w) {
    __half2_raw r;
    r.x = static_cast<unsigned short>(w & 0xffffu);
    r.y = static_cast<unsigned short>(w >> 16);
    return __half22float2(__half2(r));
  }
  static __device__ __forceinline__ float to_float(T v) { return __half2float(v); }
  static __device__ __forceinline__ T from_float(float v) { return __float2half_rn(v); }
  // Two floats rounded to the dtype (round to nearest even), packed low-first.
  static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
};

template <> struct Act<kActBF16> {
  using T = __nv_bfloat16;
  // bf16 is the top half of a float32: widening is a shift or a mask, exact.
  static __device__ __forceinline__ float2 unpack2(uint32_t w) {
    return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
  }
  static __device__ __forceinline__ float to_float(T v) { return __bfloat162float(v); }
  static __device__ __forceinline__ T from_float(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
};

// ---- fused input ops, instruction for instruction as Triton 3.x lowers them on sm_90 -------
// (tl.exp: multiply by log2(e), ex2.approx; fp32 '/': div.full; tl.rsqrt: rsqrt.approx.ftz),
// so that the rounded intermediates agree with the Triton GEMV's, not just come close.
__device__ __forceinline__ float triton_exp(float v) {
  float r;
  asm("ex2.approx.f32 %0, %1;" : "=f"(r) : "f"(v * 1.4426950408889634f));
  return r;
}

__device__ __forceinline__ float triton_div(float a, float b) {
  float r;
  asm("div.full.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

__device__ __forceinline__ float triton_rsqrt(float v) {
  float r;
  asm("rsqrt.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
  return r;
}

// silu(gate) * up for 8 packed activations: silu rounded to the dtype, then the product.
template <int AT>
__device__ __forceinline__ uint4 silu_mul8(const uint4& gate, const uint4& up) {
  const uint32_t g[4] = {gate.x, gate.y, gate.z, gate.w};
  const uint32_t u[4] = {up.x, up.y, up.z, up.w};
  uint32_t out[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 gf = Act<AT>::unpack2(g[i]), uf = Act<AT>::unpack2(u[i]);
    const float2 sf = Act<AT>::unpack2(Act<AT>::pack2(triton_div(gf.x, 1.0f + triton_exp(-gf.x)),
                                                      triton_div(gf.y, 1.0f + triton_exp(-gf.y))));
    out[i] = Act<AT>::pack2(sf.x * uf.x, sf.y * uf.y);
  }
  return make_uint4(out[0], out[1], out[2], out[3]);
}

// round(x + r) for 8 packed activations (x exactly, without a residual).
template <int AT>
__device__ __forceinline__ uint4 add8(const uint4& x, const uint4& r) {
  const uint32_t a[4] = {x.x, x.y, x.z, x.w};
  const uint32_t b[4] = {r.x, r.y, r.z, r.w};
  uint32_t out[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 af = Act<AT>::unpack2(a[i]), bf = Act<AT>::unpack2(b[i]);
    out[i] = Act<AT>::pack2(af.x + bf.x, af.y + bf.y);
  }
  return make_uint4(out[0], out[1], out[2], out[3]);
}

// sumsq + the squares of 8 packed activations.
template <int AT>
__device__ __forceinline__ float sum_squares8(const uint4& v, float sumsq) {
  const uint32_t a[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = Act<AT>::unpack2(a[i]);
    sumsq = fmaf(f.x, f.x, sumsq);
    sumsq = fmaf(f.y, f.y, sumsq);
  }
  return sumsq;
}

// round(round(v * rstd) * w) for 8 packed activations and norm weights.
template <int AT>
__device__ __forceinline__ uint4 normalise8(const uint4& v, const uint4& w, float rstd) {
  const uint32_t a[4] = {v.x, v.y, v.z, v.w};
  const uint32_t b[4] = {w.x, w.y, w.z, w.w};
  uint32_t out[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 n = Act<AT>::unpack2(Act<AT>::pack2(Act<AT>::unpack2(a[i]).x * rstd,
                                                     Act<AT>::unpack2(a[i]).y * rstd));
    const float2 wf = Act<AT>::unpack2(b[i]);
    out[i] = Act<AT>::pack2(n.x * wf.x, n.y * wf.y);
  }
  return make_uint4(out[0], out[1], out[2], out[3]);
}

// Weight elements per 16-byte load, and their float32 values.
template <int AT, int WK> struct Weight;

template <int AT> struct Weight<AT, kWeightSame> {
  static constexpr int kPerVec = 8;
  static __device__ __forceinline__ void unpack(const uint4& v, float* f) {
    const float2 a = Act<AT>::unpack2(v.x), b = Act<AT>::unpack2(v.y);
    const float2 c = Act<AT>::unpack2(v.z), d = Act<AT>::unpack2(v.w);
    f[0] = a.x; f[1] = a.y; f[2] = b.x; f[3] = b.y;
    f[4] = c.x; f[5] = c.y; f[6] = d.x; f[7] = d.y;
  }
};

// fp8 e4m3 -> fp16 pairs with the hardware conversion (exact: every e4m3 value is an fp16).
__device__ __forceinline__ void fp8x4_to_float(uint32_t w, float* f) {
  const __half2_raw lo = __nv_cvt_fp8x2_to_halfraw2(
      static_cast<__nv_fp8x2_storage_t>(w & 0xffffu), __NV_E4M3);
  const __half2_raw hi = __nv_cvt_fp8x2_to_halfraw2(
      static_cast<__nv_fp8x2_storage_t>(w >> 16), __NV_E4M3);
  const float2 a = __half22float2(__half2(lo)), b = __half22float2(__half2(hi));
  f[0] = a.x; f[1] = a.y; f[2] = b.x; f[3] = b.y;
}

template <int AT> struct Weight<AT, kWeightFP8> {
  static constexpr int kPerVec = 16;
  static __device__ __forceinline__ void unpack(const uint4& v, float* f) {
    fp8x4_to_float(v.x, f); fp8x4_to_float(v.y, f + 4);
    fp8x4_to_float(v.z, f + 8); fp8x4_to_float(v.w, f + 12);
  }
};

// int8 -> float without the (slow) integer-to-float converter: flip the sign bit so the byte is
// b + 128 in [0, 255], place it in the mantissa of 2^23 (0x4B000000) with one byte permute,
// and subtract 2^23 + 128. Exact.
__device__ __forceinline__ void int8x4_to_float(uint32_t w, float* f) {
  const uint32_t biased = w ^ 0x80808080u;
  const float offset = 8388736.0f;  // 2^23 + 128
  f[0] = __uint_as_float(__byte_perm(biased, 0x4B000000u, 0x7540)) - offset;
  f[1] = __uint_as_float(__byte_perm(biased, 0x4B000000u, 0x7541)) - offset;
  f[2] = __uint_as_float(__byte_perm(biased, 0x4B000000u, 0x7542)) - offset;
  f[3] = __uint_as_float(__byte_perm(biased, 0x4B000000u, 0x7543)) - offset;
}

template <int AT> struct Weight<AT, kWeightINT8> {
  static constexpr int kPerVec = 16;
  static __device__ __forceinline__ void unpack(const uint4& v, float* f) {
    int8x4_to_float(v.x, f); int8x4_to_float(v.y, f + 4);
    int8x4_to_float(v.z, f + 8); int8x4_to_float(v.w, f + 12);
  }
};

// Weights are read once per call: stream them (evict-first) so they do not push the
// activations and the KV cache out of L1/L2.
__device__ __forceinline__ uint4 load_weight(const uint4* p) { return __ldcs(p); }

// The j-th 16-byte vector of activations (8 values) under weight vector v of row m of x.
template <typename T, int kVec>
__device__ __forceinline__ uint4 load_x(const T* x, int64_t stride_x, int m, int v, int j) {
  return reinterpret_cast<const uint4*>(x + m * stride_x + static_cast<int64_t>(v) * kVec)[j];
}

// acc[r][m] += dot(weight vector of row r, activations of row m) over one 16-byte weight load.
template <int AT, int WK, int M, int ROWS>
__device__ __forceinline__ void accumulate(const uint4 (&xr)[M][Weight<AT, WK>::kPerVec / 8],
                                           const uint4 (&wv)[ROWS], float (&acc)[ROWS][M]) {
  constexpr int kVec = Weight<AT, WK>::kPerVec;
  float xf[M][kVec];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int j = 0; j < kVec / 8; ++j) {
      const uint4 xv = xr[m][j];
      const float2 p0 = Act<AT>::unpack2(xv.x), p1 = Act<AT>::unpack2(xv.y);
      const float2 p2 = Act<AT>::unpack2(xv.z), p3 = Act<AT>::unpack2(xv.w);
      float* f = &xf[m][j * 8];
      f[0] = p0.x; f[1] = p0.y; f[2] = p1.x; f[3] = p1.y;
      f[4] = p2.x; f[5] = p2.y; f[6] = p3.x; f[7] = p3.y;
    }
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    float wf[kVec];
    Weight<AT, WK>::unpack(wv[r], wf);
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int j = 0; j < kVec; ++j) acc[r][m] = fmaf(wf[j], xf[m][j], acc[r][m]);
  }
}

// kInRmsNorm: the block's M input rows, normalised, into `staged` ([M][K] of T, shared memory).
// Called by every thread of the block once (it synchronises); x is the previous kernel's
// output, so the caller has waited for it.
template <int AT, int M, int THREADS>
__device__ __forceinline__ void stage_rms_norm(const GemvArgs& a, uint4* staged) {
  using T = typename Act<AT>::T;
  constexpr int kWarps = THREADS / 32;
  __shared__ float warp_sumsq[kWarps][M];
  const int nvec = a.k / 8;  // 16-byte activation vectors per row
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const bool add_residual = a.residual != nullptr;
  const bool write_residual = add_residual && a.residual_out != nullptr && blockIdx.x == 0;
  // Pass 1: v = round(x + residual), its float32 sum of squares, and (block 0) residual_out.
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const uint4* xr = reinterpret_cast<const uint4*>(static_cast<const T*>(a.x) + m * a.stride_x);
    const uint4* rr = reinterpret_cast<const uint4*>(static_cast<const T*>(a.residual) +
                                                     m * a.stride_res);
    uint4* outr = reinterpret_cast<uint4*>(static_cast<T*>(a.residual_out) + m * a.stride_res_out);
    float sumsq = 0.0f;
    for (int i = threadIdx.x; i < nvec; i += THREADS) {
      uint4 v = xr[i];
      if (add_residual) v = add8<AT>(v, rr[i]);
      if (write_residual) outr[i] = v;
      staged[m * nvec + i] = v;
      sumsq = sum_squares8<AT>(v, sumsq);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sumsq += __shfl_xor_sync(0xffffffffu, sumsq, off);
    if (lane == 0) warp_sumsq[warp][m] = sumsq;
  }
  __syncthreads();
  // Pass 2: round(round(v * rstd) * norm_weight), in place. Every thread sums the warps' partial
  // sums in the same order, so all agree on rstd.
  const uint4* nw = static_cast<const uint4*>(a.norm_weight);
#pragma unroll
  for (int m = 0; m < M; ++m) {
    float sumsq = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sumsq += warp_sumsq[w][m];
    const float rstd = triton_rsqrt(triton_div(sumsq, static_cast<float>(a.k)) + a.eps);
    for (int i = threadIdx.x; i < nvec; i += THREADS)
      staged[m * nvec + i] = normalise8<AT>(staged[m * nvec + i], nw[i], rstd);
  }
  __syncthreads();
}

// Prefetch into L2 the weight vectors a thread loads first for `tile` (kInRmsNorm: they are in
// flight while the block waits for the previous kernel and stages its input).
template <int ROWS, int THREADS, int UNROLL>
__device__ __forceinline__ void prefetch_first_weights(const GemvArgs& a, int tile, int nvec) {
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int n = min(tile * ROWS + r, a.n - 1);
    const uint8_t* row = static_cast<const uint8_t*>(a.w) + static_cast<int64_t>(n) * a.stride_w_bytes;
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int v = threadIdx.x + u * THREADS;
      if (v < nvec) asm volatile("prefetch.global.L2 [%0];" ::"l"(row + static_cast<int64_t>(v) * 16));
    }
  }
}

// ---- the kernel -------------------------------------------------------------------------------
template <int AT, int WK, int IN, int M, int ROWS, int THREADS, int UNROLL>
__global__ void __launch_bounds__(THREADS) gemv_kernel(const GemvArgs a) {
  using A = Act<AT>;
  using T = typename A::T;
  using W = Weight<AT, WK>;
  constexpr int kVec = W::kPerVec;     // weight elements per 16-byte load
  constexpr int kXLoads = kVec / 8;    // 16-byte activation loads (8 values) per weight load
  constexpr int kWarps = THREADS / 32;
  // 16-byte input loads per activation vector: gate and up for silu_and_mul.
  constexpr int kInLoads = IN == kInSiluMul ? 2 : 1;
  static_assert(THREADS % 32 == 0, "whole warps");
  static_assert(ROWS * M <= THREADS, "one thread per output in the final reduction");
  // Prefetch all of an iteration's activation vectors when they fit in 64 registers.
  constexpr bool kPrefetchX = UNROLL * M * kXLoads * kInLoads <= 16;

  // The next kernel may launch now; it waits for this one to finish before reading y.
  pdl_launch_dependents();

  __shared__ float partial[kWarps][ROWS * M];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nvec = a.k / kVec;
  const int ntiles = (a.n + ROWS - 1) / ROWS;
  const T* x = static_cast<const T*>(a.x);
  int64_t stride_x = a.stride_x;
  bool waited = false;
  if constexpr (IN == kInRmsNorm) {
    extern __shared__ uint4 staged[];  // [M][K] of T: the normalised input rows
    prefetch_first_weights<ROWS, THREADS, UNROLL>(a, blockIdx.x, nvec);
    pdl_wait();
    waited = true;
    stage_rms_norm<AT, M, THREADS>(a, staged);
    x = reinterpret_cast<const T*>(staged);
    stride_x = a.k;
  }
  // The j-th 16-byte vector of input row m under weight vector v, after the input op.
  auto input = [&](int m, int v, int j) -> uint4 {
    if constexpr (IN == kInSiluMul) {
      return silu_mul8<AT>(load_x<T, kVec>(x, stride_x, m, v, j),
                           load_x<T, kVec>(x + a.k, stride_x, m, v, j));
    } else {
      return load_x<T, kVec>(x, stride_x, m, v, j);
    }
  };

  for (int tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
    const int n0 = tile * ROWS;
    // Rows past N read row N-1 (valid memory, result dropped): no predicate per load.
    const uint4* wrow[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const int n = min(n0 + r, a.n - 1);
      wrow[r] = reinterpret_cast<const uint4*>(static_cast<const uint8_t*>(a.w) +
                                               static_cast<int64_t>(n) * a.stride_w_bytes);
    }
    float acc[ROWS][M];
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
      for (int m = 0; m < M; ++m) acc[r][m] = 0.0f;

    for (int v0 = threadIdx.x; v0 < nvec; v0 += THREADS * UNROLL) {
      // All of this iteration's weight loads are issued before any is used.
      uint4 wv[UNROLL][ROWS];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const int v = v0 + u * THREADS;
#pragma unroll
        for (int r = 0; r < ROWS; ++r)
          wv[u][r] = v < nvec ? load_weight(wrow[r] + v) : make_uint4(0u, 0u, 0u, 0u);
      }
      if (!waited) {  // x is the previous kernel's output: wait for it only now
        pdl_wait();
        waited = true;
      }
      if constexpr (kPrefetchX) {
        // Every activation load of the iteration in flight at once, too (L2 round trips).
        uint4 xr[UNROLL][M][kXLoads];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
          const int v = v0 + u * THREADS;
#pragma unroll
          for (int m = 0; m < M; ++m)
#pragma unroll
            for (int j = 0; j < kXLoads; ++j)
              xr[u][m][j] = v < nvec ? input(m, v, j) : make_uint4(0u, 0u, 0u, 0u);
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u)
          if (v0 + u * THREADS < nvec) accumulate<AT, WK, M, ROWS>(xr[u], wv[u], acc);
      } else {  // many rows of 8-bit weights: registers would not hold all of x
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
          const int v = v0 + u * THREADS;
          if (v < nvec) {
            uint4 xr[M][kXLoads];
#pragma unroll
            for (int m = 0; m < M; ++m)
#pragma unroll
              for (int j = 0; j < kXLoads; ++j) xr[m][j] = input(m, v, j);
            accumulate<AT, WK, M, ROWS>(xr, wv[u], acc);
          }
        }
      }
    }
    if (!waited) {  // threads with no weight vector (K smaller than the block) still must wait
      pdl_wait();
      waited = true;
    }

#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
      for (int m = 0; m < M; ++m) {
        float s = acc[r][m];
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
        acc[r][m] = s;
      }
    if (lane == 0) {
#pragma unroll
      for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int m = 0; m < M; ++m) partial[warp][r * M + m] = acc[r][m];
    }
    __syncthreads();
    if (threadIdx.x < ROWS * M) {
      const int r = threadIdx.x / M, m = threadIdx.x % M;
      const int n = n0 + r;
      if (n < a.n) {
        float y = 0.0f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) y += partial[w][threadIdx.x];
        if (a.scale != nullptr) y *= a.scale[n];
        if (a.bias != nullptr) y += A::to_float(static_cast<const T*>(a.bias)[n]);
        static_cast<T*>(a.out)[m * a.stride_out + n] = A::from_float(y);
      }
    }
    __syncthreads();  // partial is reused by the next tile
  }
}

// ---- launch ---------------------------------------------------------------------------------
// Tile/unroll variants, selectable at launch so one GPU run can compare them.
struct Variant {
  int rows, threads, unroll;
};
constexpr Variant kVariants[] = {
    {2, 128, 4},  // 0: 8 loads in flight per thread
    {4, 64, 4},   // 1: 16 loads in flight, narrow blocks (more blocks per SM)
    {1, 256, 4},  // 2: one row per block, wide: most blocks for small N
    {8, 64, 2},   // 3: 16 loads in flight, a block covers K = 1024 bf16 in one step
};
constexpr int kNumVariants = sizeof(kVariants) / sizeof(kVariants[0]);

template <int AT, int WK, int IN, int M, int ROWS, int THREADS, int UNROLL>
int launch(const GemvArgs& a, int num_sms, int persistent, int use_pdl, cudaStream_t stream) {
  auto kernel = gemv_kernel<AT, WK, IN, M, ROWS, THREADS, UNROLL>;
  const int ntiles = (a.n + ROWS - 1) / ROWS;
  // kInRmsNorm stages the normalised rows in shared memory (the caller keeps it <= 48 KiB).
  const size_t smem = IN == kInRmsNorm ? static_cast<size_t>(M) * a.k * sizeof(typename Act<AT>::T) : 0;
  int grid = ntiles;
  if (persistent) {  // at most one wave of resident blocks, each looping over tiles
    // Queried once per instantiation (thread-safe static), so later launches, e.g. during a
    // CUDA-graph capture, make no runtime call besides the launch. Staged rows depend on K:
    // that occupancy is asked per launch (a query, no stream work: capture-safe).
    static const int per_sm_no_smem = [] {
      int blocks = 0;
      if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(
              &blocks, gemv_kernel<AT, WK, IN, M, ROWS, THREADS, UNROLL>, THREADS, 0) != cudaSuccess)
        blocks = 1;
      return blocks > 0 ? blocks : 1;
    }();
    int per_sm = per_sm_no_smem;
    if (smem > 0) {
      per_sm = 0;
      if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, THREADS, smem) != cudaSuccess)
        per_sm = 1;
      per_sm = per_sm > 0 ? per_sm : 1;
    }
    const int wave = per_sm * num_sms;
    grid = ntiles < wave ? ntiles : wave;
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(grid), 1, 1);
  config.blockDim = dim3(THREADS, 1, 1);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attr;
  config.numAttrs = use_pdl ? 1 : 0;
  const cudaError_t err = cudaLaunchKernelEx(&config, kernel, a);
  if (err != cudaSuccess) cudaGetLastError();  // reported to the caller; do not leave it pending
  return static_cast<int>(err);
}

// The launch knobs passed through the dispatch levels below.
struct LaunchOpts {
  int variant, num_sms, persistent, use_pdl;
  cudaStream_t stream;
};

template <int AT, int WK, int IN, int M>
int dispatch_variant(const GemvArgs& a, const LaunchOpts& o) {
  switch (o.variant) {
#define MINIVLLM_GEMV_VARIANT(i)                                                               \
  case i:                                                                                      \
    return launch<AT, WK, IN, M, kVariants[i].rows, kVariants[i].threads, kVariants[i].unroll>( \
        a, o.num_sms, o.persistent, o.use_pdl, o.stream);
    MINIVLLM_GEMV_VARIANT(0)
    MINIVLLM_GEMV_VARIANT(1)
    MINIVLLM_GEMV_VARIANT(2)
    MINIVLLM_GEMV_VARIANT(3)
#undef MINIVLLM_GEMV_VARIANT
    default:
      return -1;
  }
}

template <int AT, int WK, int IN>
int dispatch_rows(const GemvArgs& a, int m, const LaunchOpts& o) {
  // The fused input ops are built for one row only: the model fuses them at batch-1 decode,
  // and every (row count x variant) instantiation adds to the JIT build.
  if constexpr (IN != kInPlain) {
    return m == 1 ? dispatch_variant<AT, WK, IN, 1>(a, o) : -1;
  } else {
    switch (m) {
      case 1: return dispatch_variant<AT, WK, IN, 1>(a, o);
      case 2: return dispatch_variant<AT, WK, IN, 2>(a, o);
      case 3: return dispatch_variant<AT, WK, IN, 3>(a, o);
      case 4: return dispatch_variant<AT, WK, IN, 4>(a, o);
      default: return -1;
    }
  }
}

template <int AT, int WK>
int dispatch_input(const GemvArgs& a, int input_op, int m, const LaunchOpts& o) {
  switch (input_op) {
    case kInPlain: return dispatch_rows<AT, WK, kInPlain>(a, m, o);
    case kInSiluMul: return dispatch_rows<AT, WK, kInSiluMul>(a, m, o);
    case kInRmsNorm: return dispatch_rows<AT, WK, kInRmsNorm>(a, m, o);
    default: return -1;
  }
}

template <int AT>
int dispatch_weight(const GemvArgs& a, int weight_kind, int input_op, int m, const LaunchOpts& o) {
  switch (weight_kind) {
    case kWeightSame: return dispatch_input<AT, kWeightSame>(a, input_op, m, o);
    case kWeightFP8: return dispatch_input<AT, kWeightFP8>(a, input_op, m, o);
    case kWeightINT8: return dispatch_input<AT, kWeightINT8>(a, input_op, m, o);
    default: return -1;
  }
}

// Most shared memory kInRmsNorm may stage (the default per-block limit: no opt-in needed).
constexpr int64_t kMaxStagedBytes = 48 * 1024;

}  // namespace

extern "C" {

// Number of tile/unroll variants; minivllm_gemv_variant fills in one's parameters.
int minivllm_gemv_num_variants() { return kNumVariants; }

int minivllm_gemv_variant(int i, int* rows, int* threads, int* unroll) {
  if (i < 0 || i >= kNumVariants) return -1;
  *rows = kVariants[i].rows;
  *threads = kVariants[i].threads;
  *unroll = kVariants[i].unroll;
  return 0;
}

// y[m, n] = scale[n] * sum_k w[n, k] * in[m, k] + bias[n] for m < num_rows (1..4), enqueued on
// `stream`, where `in` is x (input_op 0), silu(gate) * up for x = [gate | up] of width 2k (1),
// or rms_norm(x + residual) * norm_weight (2; residual may be null; residual_out, when not null,
// receives x + residual). The fused input ops (1, 2) take one row. The caller has validated shapes, dtypes and 16-byte alignment (see
// minivllm/csrc_ops/cuda_gemv.py). Returns 0, a cudaError_t, or -1 for an unsupported combination.
int minivllm_gemv(const void* x, int64_t stride_x, int act_dtype, const void* w,
                  int64_t stride_w_bytes, int weight_kind, const void* bias, const float* scale,
                  void* out, int64_t stride_out, int num_rows, int n, int k, int input_op,
                  const void* residual, int64_t stride_res, const void* norm_weight,
                  void* residual_out, int64_t stride_res_out, float eps, int variant,
                  int num_sms, int persistent, int use_pdl, void* stream) {
  if (n <= 0 || k < 0) return -1;
  if (input_op == kInRmsNorm &&
      (norm_weight == nullptr || k % 8 != 0 || static_cast<int64_t>(num_rows) * k * 2 > kMaxStagedBytes))
    return -1;
  GemvArgs a;
  a.x = x;
  a.w = w;
  a.bias = bias;
  a.scale = scale;
  a.out = out;
  a.stride_x = stride_x;
  a.stride_w_bytes = stride_w_bytes;
  a.stride_out = stride_out;
  a.n = n;
  a.k = k;
  a.residual = residual;
  a.norm_weight = norm_weight;
  a.residual_out = residual_out;
  a.stride_res = stride_res;
  a.stride_res_out = stride_res_out;
  a.eps = eps;
  const LaunchOpts o = {variant, num_sms, persistent, use_pdl, static_cast<cudaStream_t>(stream)};
  switch (act_dtype) {
    case kActF16: return dispatch_weight<kActF16>(a, weight_kind, input_op, num_rows, o);
    case kActBF16: return dispatch_weight<kActBF16>(a, weight_kind, input_op, num_rows, o);
    default: return -1;
  }
}

// Loads one kernel without launching anything (so it is safe during a graph capture): returns
// the cudaError_t that launches would hit, e.g. a driver older than this runtime, or 0.
int minivllm_gemv_probe() {
  cudaFuncAttributes attr;
  return static_cast<int>(cudaFuncGetAttributes(
      &attr, gemv_kernel<kActBF16, kWeightSame, kInPlain, 1, kVariants[0].rows,
                         kVariants[0].threads, kVariants[0].unroll>));
}

const char* minivllm_cuda_error_string(int err) {
  return cudaGetErrorString(static_cast<cudaError_t>(err));
}

}  // extern "C"
