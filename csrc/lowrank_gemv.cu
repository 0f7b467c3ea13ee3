// Decode-time fused low-rank GEMV:  y[T, out] = (x[T, in] · Vᵀ) · Uᵀ + b,  T = 1..8.
//
// Memory-bound: the floor is reading U [out, r] and V [r, in] once.  Two kernels:
//
//   down:  t[T, r]   (fp32) = x · Vᵀ         rows of V, K = in
//   up:    y[T, out]        = t · Uᵀ + b     rows of U, K = r
//
// Both are the same "skinny GEMM": a block owns 16 weight rows and all (≤ 8) tokens, and
// its warps stride over K in 32-element steps.  Each step is two m16n8k16 tensor-core
// MMAs, with the weights as the 16×16 A operand and the activations as the 16×8 B
// operand, so arithmetic never competes with the loads (CUDA-core FMAs would: at T=8
// the FMA rate needed is close to the H100's fp32 peak).
//
// Loads are 16 bytes per thread straight from global memory into the MMA fragments.
// That works because a dot product does not care about the order of k: thread (g, q)
// loads 8 consecutive elements k0+8q..k0+8q+7 of weight rows g and g+8 and of token g,
// and the two MMAs of a step read them as the logical k pairs the fragment layout
// expects ({0,1},{2,3} for the first MMA, {4,5},{6,7} for the second).  A and B use the
// same permutation, so the contraction is exact.  Every warp-wide load instruction
// reads 8 rows × 64 contiguous bytes: whole 32-byte sectors.
//
// K split: warps of a block split K; when the row tiles alone cannot fill the GPU the
// blocks of a thread-block cluster (≤ 8, Hopper) split K further and are reduced
// through distributed shared memory, so no atomics, zero-fill or counters are needed.
// The grid stays resident and loops over row tiles, prefetching across tile boundaries.
//
// The intermediate t stays fp32 in a tiny global buffer; the up kernel feeds it to the
// 16-bit MMA as hi + lo halves (two MMAs), keeping ~16 mantissa bits instead of the 8 a
// plain bf16 cast would keep.
//
// The up kernel is launched with programmatic dependent launch (PDL, sm_90): its blocks
// start while the down kernel is finishing, issue their first U loads, and only then
// wait (griddepcontrol.wait) for t.  That hides the launch gap between the kernels.

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "lowrank_gemv.h"

namespace cg = cooperative_groups;

namespace lowrank {
namespace {

constexpr int kRows = 16;    // weight rows per block (the MMA's M)
constexpr int kTok = 8;      // tokens per launch (the MMA's N)
constexpr int kStep = 32;    // K elements per warp step (two k16 MMAs)
constexpr int kWarps = 8;    // warps per block
constexpr int kUnroll = 4;   // steps whose loads are in flight together
constexpr int kThreads = kWarps * 32;
constexpr int kMaxCluster = 8;
constexpr int kBlocksPerSm = 2;  // launch-bounds occupancy target (caps registers at 128)

struct Frag {  // one step of one thread: 8 weights of rows g and g+8, 8 activations of token g
  uint4 w_lo;  // row g
  uint4 w_hi;  // row g + 8
};

template <typename T>
__device__ __forceinline__ uint32_t pack2(T a, T b);

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(__nv_bfloat16 a, __nv_bfloat16 b) {
  __nv_bfloat162 v = __halves2bfloat162(a, b);
  return *reinterpret_cast<uint32_t*>(&v);
}

template <>
__device__ __forceinline__ uint32_t pack2<__half>(__half a, __half b) {
  __half2 v = __halves2half2(a, b);
  return *reinterpret_cast<uint32_t*>(&v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }

// d += a · b for one m16n8k16 tile (fp32 accumulators).
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                                        uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                                 uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Streaming 16-byte load for weights: read once, so keep them from evicting t and x.
__device__ __forceinline__ uint4 ld_stream16(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// 8 consecutive 16-bit elements of `row` starting at k (zeros past K or past the last row).
template <typename T, bool VEC>
__device__ __forceinline__ uint4 load8(const T* __restrict__ base, int row, int nrows, int64_t ld, int k, int K) {
  if (row >= nrows || k >= K) return make_uint4(0u, 0u, 0u, 0u);
  const T* p = base + static_cast<int64_t>(row) * ld + k;
  if constexpr (VEC) {
    return ld_stream16(p);  // K % 8 == 0 and 16-byte aligned rows: k < K implies all 8 in range
  } else {
    T e[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) e[i] = (k + i < K) ? p[i] : from_float<T>(0.f);
    return make_uint4(pack2<T>(e[0], e[1]), pack2<T>(e[2], e[3]), pack2<T>(e[4], e[5]), pack2<T>(e[6], e[7]));
  }
}

// Activations of token `n` at k..k+7 as 16-bit pairs.  FP32 activations (the up kernel's
// t) come back as hi and lo halves: t ≈ hi + lo with ~16 significant bits.
template <typename T, bool VEC>
__device__ __forceinline__ void load_act16(const T* __restrict__ act, int n, int ntok, int64_t ld, int k, int K,
                                           uint4& out) {
  if (n >= ntok || k >= K) {
    out = make_uint4(0u, 0u, 0u, 0u);
    return;
  }
  const T* p = act + static_cast<int64_t>(n) * ld + k;
  if constexpr (VEC) {
    out = *reinterpret_cast<const uint4*>(p);  // small and reused by every block: keep cached
  } else {
    T e[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) e[i] = (k + i < K) ? p[i] : from_float<T>(0.f);
    out = make_uint4(pack2<T>(e[0], e[1]), pack2<T>(e[2], e[3]), pack2<T>(e[4], e[5]), pack2<T>(e[6], e[7]));
  }
}

template <typename T, bool VEC>
__device__ __forceinline__ void load_act32(const float* __restrict__ act, int n, int ntok, int64_t ld, int k, int K,
                                           uint4& hi, uint4& lo) {
  float v[8];
  if (n >= ntok || k >= K) {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = 0.f;
  } else {
    const float* p = act + static_cast<int64_t>(n) * ld + k;
    if constexpr (VEC) {
      float4 a = *reinterpret_cast<const float4*>(p);
      float4 b = *reinterpret_cast<const float4*>(p + 4);
      v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
      v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = (k + i < K) ? p[i] : 0.f;
    }
  }
  T h[8], l[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    h[i] = from_float<T>(v[i]);
    l[i] = from_float<T>(v[i] - to_float<T>(h[i]));
  }
  hi = make_uint4(pack2<T>(h[0], h[1]), pack2<T>(h[2], h[3]), pack2<T>(h[4], h[5]), pack2<T>(h[6], h[7]));
  lo = make_uint4(pack2<T>(l[0], l[1]), pack2<T>(l[2], l[3]), pack2<T>(l[4], l[5]), pack2<T>(l[6], l[7]));
}

// One step: the two MMAs that consume k0..k0+31 (see the permutation note at the top).
template <typename T>
__device__ __forceinline__ void mma_step(float (&acc)[4], const Frag& w, const uint4& a) {
  mma16816<T>(acc, w.w_lo.x, w.w_hi.x, w.w_lo.y, w.w_hi.y, a.x, a.y);
  mma16816<T>(acc, w.w_lo.z, w.w_hi.z, w.w_lo.w, w.w_hi.w, a.z, a.w);
}

// out[n, row] = Σ_k act[n, k] · W[row, k]  (+ bias[row]), 16 rows (one tile) at a time.
//
// The grid is sized to stay resident (about two blocks per SM); each cluster walks the
// row tiles tile0, tile0 + nclusters, ...  A warp's loads form one stream over its
// (tile, batch) sequence: the next batch's weights (possibly the next tile's) are
// requested before the current batch's MMAs and before the tile's reduction, so an SM
// never idles between tiles the way one-shot blocks do between block exits and launches.
//
// ACT_F32: activations are fp32 (up kernel, t) rather than T (down kernel, x).
// OUT_F32: write fp32 (t) rather than T (y).
// PDL_WAIT: issue the first weight loads, then wait for the previous grid (t's producer).
template <typename T, bool VEC, bool ACT_F32, bool OUT_F32, bool PDL_WAIT>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) skinny_gemm_kernel(
    const T* __restrict__ W, int nrows, int K, int64_t ldw,
    const void* __restrict__ act_ptr, int ntok, int64_t ld_act,
    void* __restrict__ out_ptr, int64_t ld_out, const T* __restrict__ bias) {
  __shared__ float red[kWarps][kTok * kRows];
  __shared__ float part[kTok * kRows];

  if constexpr (!PDL_WAIT) pdl_launch_dependents();  // let the up kernel's blocks get resident early

  const cg::cluster_group cluster = cg::this_cluster();
  const int csize = static_cast<int>(cluster.num_blocks());
  const int crank = static_cast<int>(cluster.block_rank());
  const int nclusters = static_cast<int>(gridDim.x) / csize;
  const int tile0 = blockIdx.x / csize;
  const int ntiles = (nrows + kRows - 1) / kRows;
  const int my_tiles = tile0 < ntiles ? (ntiles - tile0 + nclusters - 1) / nclusters : 0;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int tid = threadIdx.x;
  const int g = lane >> 2;  // MMA group: weight rows g and g+8, token g
  const int q = lane & 3;   // which 8-element slice of the 32-element step

  // Steps are dealt round-robin to the csize·kWarps warps working on a tile, so the warps
  // running at one time read neighbouring bytes of the same rows.  This split does not
  // depend on the tile.
  const int nsteps = (K + kStep - 1) / kStep;
  const int stride = csize * kWarps;
  const int first = crank * kWarps + warp;
  const int my_steps = first < nsteps ? (nsteps - first + stride - 1) / stride : 0;
  const int nbatch = (my_steps + kUnroll - 1) / kUnroll;
  const int total = my_tiles * nbatch;  // this warp's (tile, batch) sequence

  Frag wcur[kUnroll], wnext[kUnroll];
  auto load_w = [&](Frag (&f)[kUnroll], int idx) {
    const int row0 = (tile0 + (idx / nbatch) * nclusters) * kRows;
    const int batch = idx % nbatch;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int s = batch * kUnroll + u;
      const int k = (first + s * stride) * kStep + 8 * q;
      const bool live = s < my_steps;
      f[u].w_lo = load8<T, VEC>(W, live ? row0 + g : nrows, nrows, ldw, k, K);
      f[u].w_hi = load8<T, VEC>(W, live ? row0 + g + 8 : nrows, nrows, ldw, k, K);
    }
  };

  if (total > 0) load_w(wcur, 0);
  if constexpr (PDL_WAIT) pdl_wait();  // t is complete and visible after this

  int idx = 0;
  for (int j = 0; j < my_tiles; ++j) {
    const int row0 = (tile0 + j * nclusters) * kRows;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int b = 0; b < nbatch; ++b, ++idx) {
      // Activations first (L2 hits), then the next batch of weights, then the MMAs, so the
      // next batch's DRAM reads overlap this batch's math and the tile's reduction.
      uint4 a[kUnroll], alo[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int s = b * kUnroll + u;
        const int k = (first + s * stride) * kStep + 8 * q;
        const int n = s < my_steps ? g : ntok;  // dead steps load zeros
        if constexpr (ACT_F32) {
          load_act32<T, VEC>(static_cast<const float*>(act_ptr), n, ntok, ld_act, k, K, a[u], alo[u]);
        } else {
          load_act16<T, VEC>(static_cast<const T*>(act_ptr), n, ntok, ld_act, k, K, a[u]);
        }
      }
      if (idx + 1 < total) load_w(wnext, idx + 1);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        mma_step<T>(acc, wcur[u], a[u]);
        if constexpr (ACT_F32) mma_step<T>(acc, wcur[u], alo[u]);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) wcur[u] = wnext[u];
    }

    // Accumulator layout: acc[0..1] = (row g, tokens 2q, 2q+1); acc[2..3] = (row g+8, same).
    // Barrier reuse across tiles is safe: red[] is read only before the second barrier
    // of a tile, and every write of the next tile comes after it.
    red[warp][(2 * q) * kRows + g] = acc[0];
    red[warp][(2 * q + 1) * kRows + g] = acc[1];
    red[warp][(2 * q) * kRows + g + 8] = acc[2];
    red[warp][(2 * q + 1) * kRows + g + 8] = acc[3];
    __syncthreads();
    if (tid < kTok * kRows) {
      float s = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) s += red[w][tid];
      part[tid] = s;
    }
    if (csize > 1) {
      cluster.sync();  // every rank's part[] is written
      if (crank == 0 && tid < kTok * kRows) {
        float s = part[tid];
        for (int r = 1; r < csize; ++r) s += cluster.map_shared_rank(part, r)[tid];
        part[tid] = s;
      }
      cluster.sync();  // peers keep part[] unchanged until rank 0 has read it
    } else {
      __syncthreads();
    }
    const int n = tid / kRows;  // consecutive threads write consecutive rows of one token
    const int row = row0 + tid % kRows;
    if (crank == 0 && tid < kTok * kRows && n < ntok && row < nrows) {
      float v = part[tid];
      if constexpr (OUT_F32) {
        static_cast<float*>(out_ptr)[static_cast<int64_t>(n) * ld_out + row] = v;
      } else {
        if (bias != nullptr) v += to_float<T>(bias[row]);
        static_cast<T*>(out_ptr)[static_cast<int64_t>(n) * ld_out + row] = from_float<T>(v);
      }
    }
  }
}

template <typename Kern, typename... Args>
cudaError_t launch(Kern kernel, int clusters, int cluster, bool pdl, cudaStream_t stream, Args... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(clusters * cluster), 1, 1);
  cfg.blockDim = dim3(kThreads, 1, 1);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute attrs[2];
  int n = 0;
  attrs[n].id = cudaLaunchAttributeClusterDimension;
  attrs[n].val.clusterDim.x = static_cast<unsigned>(cluster);
  attrs[n].val.clusterDim.y = 1;
  attrs[n].val.clusterDim.z = 1;
  ++n;
  if (pdl) {
    attrs[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attrs[n].val.programmaticStreamSerializationAllowed = 1;
    ++n;
  }
  cfg.attrs = attrs;
  cfg.numAttrs = n;
  cudaError_t err = cudaLaunchKernelEx(&cfg, kernel, args...);
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

// Cluster size (K split across blocks) from a rough cost model: rounds of resident
// clusters over the row tiles, times the batches each warp streams per tile plus one for
// the reduction.  Every warp keeps at least one step.  `forced` (1, 2, 4, 8) overrides.
int pick_cluster(int tiles, int K, int sms, int forced) {
  if (forced > 0) return forced;
  const int nsteps = (K + kStep - 1) / kStep;
  const int capacity = kBlocksPerSm * sms;
  int best = 1;
  long best_cost = -1;
  for (int c = 1; c <= kMaxCluster; c *= 2) {
    if (c > 1 && nsteps < c * kWarps) break;
    const int resident = capacity / c > 0 ? capacity / c : 1;
    const long rounds = (tiles + resident - 1) / resident;
    const long steps = (nsteps + c * kWarps - 1) / (c * kWarps);
    const long cost = rounds * ((steps + kUnroll - 1) / kUnroll + 1);
    if (best_cost < 0 || cost < best_cost) {
      best_cost = cost;
      best = c;
    }
  }
  return best;
}

// Clusters launched: one per tile, capped to what stays resident at once.
int grid_clusters(int tiles, int cluster, int sms) {
  const int resident = (kBlocksPerSm * sms) / cluster;
  return tiles < resident ? tiles : (resident > 0 ? resident : 1);
}

template <typename T, bool VEC_DOWN, bool VEC_UP>
cudaError_t run_typed(const GemvArgs& a, cudaStream_t stream) {
  const int tiles_down = (a.rank + kRows - 1) / kRows;
  const int tiles_up = (a.out_features + kRows - 1) / kRows;
  const int c_down = pick_cluster(tiles_down, a.in_features, a.sm_count, a.cluster_down);
  const int c_up = pick_cluster(tiles_up, a.rank, a.sm_count, a.cluster_up);
  for (int t0 = 0; t0 < a.tokens; t0 += kTok) {
    const int nt = a.tokens - t0 < kTok ? a.tokens - t0 : kTok;
    const T* x = static_cast<const T*>(a.x) + static_cast<int64_t>(t0) * a.ld_x;
    T* y = static_cast<T*>(a.y) + static_cast<int64_t>(t0) * a.ld_y;
    cudaError_t err = launch(skinny_gemm_kernel<T, VEC_DOWN, false, true, false>,
                             grid_clusters(tiles_down, c_down, a.sm_count), c_down, false, stream,
                             static_cast<const T*>(a.V), a.rank, a.in_features, a.ld_v,
                             static_cast<const void*>(x), nt, a.ld_x,
                             static_cast<void*>(a.t), static_cast<int64_t>(a.rank), static_cast<const T*>(nullptr));
    if (err != cudaSuccess) return err;
    err = launch(skinny_gemm_kernel<T, VEC_UP, true, false, true>, grid_clusters(tiles_up, c_up, a.sm_count), c_up,
                 a.pdl, stream,
                 static_cast<const T*>(a.U), a.out_features, a.rank, a.ld_u,
                 static_cast<const void*>(a.t), nt, static_cast<int64_t>(a.rank),
                 static_cast<void*>(y), a.ld_y, static_cast<const T*>(a.bias));
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t dispatch_vec(const GemvArgs& a, cudaStream_t stream) {
  if (a.vec_down && a.vec_up) return run_typed<T, true, true>(a, stream);
  if (a.vec_down) return run_typed<T, true, false>(a, stream);
  if (a.vec_up) return run_typed<T, false, true>(a, stream);
  return run_typed<T, false, false>(a, stream);
}

}  // namespace

cudaError_t lowrank_gemv_launch(const GemvArgs& args, cudaStream_t stream) {
  if (args.tokens <= 0) return cudaSuccess;
  if (args.cluster_down > kMaxCluster || args.cluster_up > kMaxCluster) return cudaErrorInvalidValue;
  return args.is_bf16 ? dispatch_vec<__nv_bfloat16>(args, stream) : dispatch_vec<__half>(args, stream);
}

int lowrank_gemv_max_tokens_per_launch() { return kTok; }

}  // namespace lowrank
