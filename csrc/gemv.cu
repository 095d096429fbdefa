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
};

template <> struct Act<kActBF16> {
  using T = __nv_bfloat16;
  // bf16 is the top half of a float32: widening is a shift or a mask, exact.
  static __device__ __forceinline__ float2 unpack2(uint32_t w) {
    return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
  }
  static __device__ __forceinline__ float to_float(T v) { return __bfloat162float(v); }
  static __device__ __forceinline__ T from_float(float v) { return __float2bfloat16_rn(v); }
};

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

// ---- the kernel -------------------------------------------------------------------------------
template <int AT, int WK, int M, int ROWS, int THREADS, int UNROLL>
__global__ void __launch_bounds__(THREADS) gemv_kernel(const GemvArgs a) {
  using A = Act<AT>;
  using T = typename A::T;
  using W = Weight<AT, WK>;
  constexpr int kVec = W::kPerVec;     // weight elements per 16-byte load
  constexpr int kXLoads = kVec / 8;    // 16-byte activation loads (8 values) per weight load
  constexpr int kWarps = THREADS / 32;
  static_assert(THREADS % 32 == 0, "whole warps");
  static_assert(ROWS * M <= THREADS, "one thread per output in the final reduction");
  // Prefetch all of an iteration's activation vectors when they fit in 64 registers.
  constexpr bool kPrefetchX = UNROLL * M * kXLoads <= 16;

  // The next kernel may launch now; it waits for this one to finish before reading y.
  pdl_launch_dependents();

  __shared__ float partial[kWarps][ROWS * M];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nvec = a.k / kVec;
  const int ntiles = (a.n + ROWS - 1) / ROWS;
  const T* x = static_cast<const T*>(a.x);
  bool waited = false;

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
              xr[u][m][j] = v < nvec ? load_x<T, kVec>(x, a.stride_x, m, v, j)
                                     : make_uint4(0u, 0u, 0u, 0u);
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
              for (int j = 0; j < kXLoads; ++j) xr[m][j] = load_x<T, kVec>(x, a.stride_x, m, v, j);
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

template <int AT, int WK, int M, int ROWS, int THREADS, int UNROLL>
int launch(const GemvArgs& a, int num_sms, int persistent, int use_pdl, cudaStream_t stream) {
  auto kernel = gemv_kernel<AT, WK, M, ROWS, THREADS, UNROLL>;
  const int ntiles = (a.n + ROWS - 1) / ROWS;
  int grid = ntiles;
  if (persistent) {  // at most one wave of resident blocks, each looping over tiles
    // Queried once per instantiation (thread-safe static), so later launches, e.g. during a
    // CUDA-graph capture, make no runtime call besides the launch.
    static const int per_sm = [] {
      int blocks = 0;
      if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(
              &blocks, gemv_kernel<AT, WK, M, ROWS, THREADS, UNROLL>, THREADS, 0) != cudaSuccess)
        blocks = 1;
      return blocks > 0 ? blocks : 1;
    }();
    const int wave = per_sm * num_sms;
    grid = ntiles < wave ? ntiles : wave;
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(grid), 1, 1);
  config.blockDim = dim3(THREADS, 1, 1);
  config.dynamicSmemBytes = 0;
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

template <int AT, int WK, int M>
int dispatch_variant(const GemvArgs& a, int variant, int sms, int persistent, int pdl,
                     cudaStream_t s) {
  switch (variant) {
#define MINIVLLM_GEMV_VARIANT(i)                                                         \
  case i:                                                                                \
    return launch<AT, WK, M, kVariants[i].rows, kVariants[i].threads, kVariants[i].unroll>( \
        a, sms, persistent, pdl, s);
    MINIVLLM_GEMV_VARIANT(0)
    MINIVLLM_GEMV_VARIANT(1)
    MINIVLLM_GEMV_VARIANT(2)
    MINIVLLM_GEMV_VARIANT(3)
#undef MINIVLLM_GEMV_VARIANT
    default:
      return -1;
  }
}

template <int AT, int WK>
int dispatch_rows(const GemvArgs& a, int m, int variant, int sms, int persistent, int pdl,
                  cudaStream_t s) {
  switch (m) {
    case 1: return dispatch_variant<AT, WK, 1>(a, variant, sms, persistent, pdl, s);
    case 2: return dispatch_variant<AT, WK, 2>(a, variant, sms, persistent, pdl, s);
    case 3: return dispatch_variant<AT, WK, 3>(a, variant, sms, persistent, pdl, s);
    case 4: return dispatch_variant<AT, WK, 4>(a, variant, sms, persistent, pdl, s);
    default: return -1;
  }
}

template <int AT>
int dispatch_weight(const GemvArgs& a, int weight_kind, int m, int variant, int sms,
                    int persistent, int pdl, cudaStream_t s) {
  switch (weight_kind) {
    case kWeightSame: return dispatch_rows<AT, kWeightSame>(a, m, variant, sms, persistent, pdl, s);
    case kWeightFP8: return dispatch_rows<AT, kWeightFP8>(a, m, variant, sms, persistent, pdl, s);
    case kWeightINT8: return dispatch_rows<AT, kWeightINT8>(a, m, variant, sms, persistent, pdl, s);
    default: return -1;
  }
}

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

// y[m, n] = scale[n] * sum_k w[n, k] * x[m, k] + bias[n] for m < num_rows (1..4), enqueued on
// `stream`. The caller has validated shapes, dtypes and 16-byte alignment (see
// minivllm/csrc_ops/cuda_gemv.py). Returns 0, a cudaError_t, or -1 for an unsupported combination.
int minivllm_gemv(const void* x, int64_t stride_x, int act_dtype, const void* w,
                  int64_t stride_w_bytes, int weight_kind, const void* bias, const float* scale,
                  void* out, int64_t stride_out, int num_rows, int n, int k, int variant,
                  int num_sms, int persistent, int use_pdl, void* stream) {
  if (n <= 0 || k < 0) return -1;
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
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (act_dtype) {
    case kActF16:
      return dispatch_weight<kActF16>(a, weight_kind, num_rows, variant, num_sms, persistent, use_pdl, s);
    case kActBF16:
      return dispatch_weight<kActBF16>(a, weight_kind, num_rows, variant, num_sms, persistent, use_pdl, s);
    default:
      return -1;
  }
}

// Loads one kernel without launching anything (so it is safe during a graph capture): returns
// the cudaError_t that launches would hit, e.g. a driver older than this runtime, or 0.
int minivllm_gemv_probe() {
  cudaFuncAttributes attr;
  return static_cast<int>(cudaFuncGetAttributes(
      &attr, gemv_kernel<kActBF16, kWeightSame, 1, kVariants[0].rows, kVariants[0].threads,
                         kVariants[0].unroll>));
}

const char* minivllm_cuda_error_string(int err) {
  return cudaGetErrorString(static_cast<cudaError_t>(err));
}

}  // extern "C"
