// Fused DDSPO loss kernels (forward and backward), pure CUDA: no torch headers, so this
// file compile-checks with plain nvcc. Host API and layout: kernels/ddspo_loss.cuh.
//
// The loss does a few FLOPs per byte, so everything here is about bytes:
//  * each input element is read exactly once per pass, with 16-byte vector loads and
//    stores when every row start is 16-byte aligned (the common case; else a scalar
//    path); every load of a step is issued before its first FMA or store (SASS checked
//    by tests/test_cuda_compile.py);
//  * the forward keeps model and target rows in L2 (default caching) and streams the
//    reference rows (evict-first): the backward, the next thing a training step runs,
//    re-reads the former, so when a batch's rows fit in L2 its reads come from there;
//  * forward splits each pair's rows into chunks so that even B = 1..8 pairs of
//    SDXL/SD3-sized rows give every SM several blocks; each block writes four fp32
//    partial sums, and one small block adds them in a fixed order (bit-reproducible for
//    a given shape and device, unlike float atomics) and does the per-pair math;
//  * backward reads model and targets once and writes the gradient once; the upstream
//    gradient is read from device memory, so the host never syncs.
// Block sizes (256 threads, 4 blocks per SM worth of chunks) are chosen on principle and
// await a sweep on a GPU.
#include "ddspo_loss.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Chunks per SM the plan aims for (latency hiding). Also the forward's launch bound: it
// caps registers at 64 a thread, a budget in which ptxas issues all of a step's loads
// before the first FMA (without it, it delays half of them behind the first FMAs).
constexpr int kBlocksPerSm = 4;

// Elements per 16-byte vector.
template <typename T>
struct Vec {
  static constexpr int n = 16 / sizeof(T);
};

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// One 16-byte vector load. STREAM marks data no later kernel reads again: evict-first
// (ld.global.cs) so it does not push lines out of L2 that are read again soon. The
// forward streams the reference rows; it keeps model and target rows (__ldg, default
// caching), which the backward, the next thing a training step runs, re-reads.
template <bool STREAM>
__device__ __forceinline__ uint4 load16(const void* p) {
  return STREAM ? __ldcs(static_cast<const uint4*>(p)) : __ldg(static_cast<const uint4*>(p));
}

// Element k of a loaded vector, as float (k is a compile-time constant after unrolling).
template <typename T>
__device__ __forceinline__ float elem(const uint4& raw, int k) {
  return to_f(reinterpret_cast<const T*>(&raw)[k]);
}

// Two values rounded to T, as the 32-bit word holding them (lower address in low bits).
__device__ __forceinline__ uint32_t bits16(__half x) { return __half_as_ushort(x); }
__device__ __forceinline__ uint32_t bits16(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }

template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b) {
  return bits16(from_f<T>(a)) | (bits16(from_f<T>(b)) << 16);
}

// One 16-byte store (STG.E.128). Spelled in PTX because the compiler cannot prove a
// row start plus `pair * N` elements 16-byte aligned and splits a plain uint4 store into
// four 4-byte stores; the host only takes this path when every row start is aligned.
template <typename T>
__device__ __forceinline__ void store16(T* p, const float (&v)[Vec<T>::n]) {
  uint32_t w[4];
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int k = 0; k < 4; ++k) w[k] = __float_as_uint(v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) w[k] = pack2<T>(v[2 * k], v[2 * k + 1]);
  }
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w[0]), "r"(w[1]),
               "r"(w[2]), "r"(w[3])
               : "memory");
}

__device__ __forceinline__ float warp_sum(float v) {
  // xor butterfly: every lane ends with the same, order-fixed sum.
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The block's sums of Q quantities, reduced in a fixed order, written as the partials of
// (pair, chunk): workspace laid out (4, B, n_chunks), quantity q at q * B * n_chunks.
template <int Q>
__device__ __forceinline__ void store_partials(const ddspo_fwd_args& a, int64_t n_chunks,
                                               int64_t pair, int64_t chunk,
                                               const float (&sums)[Q]) {
  __shared__ float red[Q][kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int q = 0; q < Q; ++q) {
    const float v = warp_sum(sums[q]);
    if (lane == 0) red[q][warp] = v;
  }
  __syncthreads();
  if (threadIdx.x < Q) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += red[threadIdx.x][w];
    a.workspace[(threadIdx.x * a.B + pair) * n_chunks + chunk] = s;
  }
}

// Kernel 1: grid = B * n_chunks blocks; block (pair, chunk) writes the four partial sums
// sum (m_w - t_w)^2, (m_l - t_l)^2, (r_w - t_w)^2, (r_l - t_l)^2 over its chunk into
// workspace laid out (4, B, n_chunks).
template <typename T, bool VEC, bool HAS_RW>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    fwd_partials(const ddspo_fwd_args a, const int64_t n_chunks, const int64_t chunk_len) {
  constexpr int V = Vec<T>::n;
  const int64_t pair = blockIdx.x / n_chunks;
  const int64_t chunk = blockIdx.x % n_chunks;
  // __restrict__: the rows are read-only here, so loads may be reordered freely.
  const T* __restrict__ mw = static_cast<const T*>(a.model) + pair * a.s_model;
  const T* __restrict__ ml = static_cast<const T*>(a.model) + (pair + a.B) * a.s_model;
  const T* __restrict__ tw = static_cast<const T*>(a.target_w) + pair * a.s_target_w;
  const T* __restrict__ tl = static_cast<const T*>(a.target_l) + pair * a.s_target_l;
  const T* __restrict__ rl = static_cast<const T*>(a.ref_l) + pair * a.s_ref_l;
  const T* __restrict__ rw = HAS_RW ? static_cast<const T*>(a.ref_w) + pair * a.s_ref_w : nullptr;
  const int64_t lo = chunk * chunk_len;
  const int64_t hi = lo + chunk_len < a.N ? lo + chunk_len : a.N;

  float s_mw = 0.f, s_ml = 0.f, s_rw = 0.f, s_rl = 0.f;
  for (int64_t i = lo + int64_t(threadIdx.x) * V; i < hi; i += int64_t(kThreads) * V) {
    if (VEC && i + V <= hi) {
      // All loads of the step are issued before the first FMA, and every FMA step needs
      // all of them, so the second half never waits behind the first half's math:
      // 80 (96 with ref_w) bytes per thread in flight.
      const uint4 r_tw = load16<false>(tw + i), r_mw = load16<false>(mw + i);
      const uint4 r_tl = load16<false>(tl + i), r_ml = load16<false>(ml + i);
      const uint4 r_rl = load16<true>(rl + i);
      const uint4 r_rw = HAS_RW ? load16<true>(rw + i) : r_rl;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const float t_w = elem<T>(r_tw, k), t_l = elem<T>(r_tl, k);
        const float d_mw = elem<T>(r_mw, k) - t_w, d_ml = elem<T>(r_ml, k) - t_l;
        const float d_rl = elem<T>(r_rl, k) - t_l;
        s_mw = fmaf(d_mw, d_mw, s_mw);
        s_ml = fmaf(d_ml, d_ml, s_ml);
        s_rl = fmaf(d_rl, d_rl, s_rl);
        if (HAS_RW) {
          const float d_rw = elem<T>(r_rw, k) - t_w;
          s_rw = fmaf(d_rw, d_rw, s_rw);
        }
      }
    } else {
      // Unaligned rows, or the last partial vector of a row.
      const int64_t end = i + V < hi ? i + V : hi;
      for (int64_t j = i; j < end; ++j) {
        const float t_w = to_f(tw[j]), t_l = to_f(tl[j]);
        const float d_mw = to_f(mw[j]) - t_w, d_ml = to_f(ml[j]) - t_l;
        const float d_rl = to_f(rl[j]) - t_l;
        s_mw = fmaf(d_mw, d_mw, s_mw);
        s_ml = fmaf(d_ml, d_ml, s_ml);
        s_rl = fmaf(d_rl, d_rl, s_rl);
        if (HAS_RW) {
          const float d_rw = to_f(rw[j]) - t_w;
          s_rw = fmaf(d_rw, d_rw, s_rw);
        }
      }
    }
  }

  store_partials<4>(a, n_chunks, pair, chunk, {s_mw, s_ml, s_rw, s_rl});
}

// Kernel 1 when the reference's row errors are given (ref_mse_in): only the policy's rows
// and the targets are read; the two model partials are written (finalize reads no more).
template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    fwd_partials_policy(const ddspo_fwd_args a, const int64_t n_chunks, const int64_t chunk_len) {
  constexpr int V = Vec<T>::n;
  const int64_t pair = blockIdx.x / n_chunks;
  const int64_t chunk = blockIdx.x % n_chunks;
  const T* __restrict__ mw = static_cast<const T*>(a.model) + pair * a.s_model;
  const T* __restrict__ ml = static_cast<const T*>(a.model) + (pair + a.B) * a.s_model;
  const T* __restrict__ tw = static_cast<const T*>(a.target_w) + pair * a.s_target_w;
  const T* __restrict__ tl = static_cast<const T*>(a.target_l) + pair * a.s_target_l;
  const int64_t lo = chunk * chunk_len;
  const int64_t hi = lo + chunk_len < a.N ? lo + chunk_len : a.N;

  float s_mw = 0.f, s_ml = 0.f;
  for (int64_t i = lo + int64_t(threadIdx.x) * V; i < hi; i += int64_t(kThreads) * V) {
    if (VEC && i + V <= hi) {
      const uint4 r_tw = load16<false>(tw + i), r_mw = load16<false>(mw + i);
      const uint4 r_tl = load16<false>(tl + i), r_ml = load16<false>(ml + i);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const float d_mw = elem<T>(r_mw, k) - elem<T>(r_tw, k);
        const float d_ml = elem<T>(r_ml, k) - elem<T>(r_tl, k);
        s_mw = fmaf(d_mw, d_mw, s_mw);
        s_ml = fmaf(d_ml, d_ml, s_ml);
      }
    } else {
      const int64_t end = i + V < hi ? i + V : hi;
      for (int64_t j = i; j < end; ++j) {
        const float d_mw = to_f(mw[j]) - to_f(tw[j]), d_ml = to_f(ml[j]) - to_f(tl[j]);
        s_mw = fmaf(d_mw, d_mw, s_mw);
        s_ml = fmaf(d_ml, d_ml, s_ml);
      }
    }
  }
  store_partials<2>(a, n_chunks, pair, chunk, {s_mw, s_ml});
}

// Per-pair math. log1pf keeps full relative accuracy for the tiny softplus of a
// confidently-right pair. setup.py builds without --use_fast_math, so `/`, expf and log1pf
// are the accurate versions; the divisions are spelled __fdiv_rn anyway so they stay
// IEEE-rounded should someone add that flag.
__device__ __forceinline__ void pair_math(float m_w, float m_l, float r_w, float r_l, float w,
                                          float beta, float inv_b, float n, float* z_out,
                                          float* wsp_out, float* coef_out) {
  const float z = -(0.5f * beta) * ((m_w - m_l) - (r_w - r_l));
  const float e = expf(-fabsf(z));  // in (0, 1]: never overflows, whatever beta is
  const float sp = fmaxf(-z, 0.f) + log1pf(e);                  // softplus(-z)
  const float sig = __fdiv_rn(z >= 0.f ? e : 1.f, 1.f + e);  // sigmoid(-z)
  *z_out = z;
  *wsp_out = w * sp;
  *coef_out = __fdiv_rn(((w * inv_b) * sig) * beta, n);
}

// Kernel 2: one block. Warp p % kWarps adds pair p's partials (lanes stride over chunks,
// then a fixed butterfly) and its lane 0 does the per-pair math; the loss is the sum of
// per-warp totals in warp order. Every order is fixed, so the result is reproducible.
__global__ void __launch_bounds__(kThreads)
    fwd_finalize(const ddspo_fwd_args a, const int64_t n_chunks) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float n = static_cast<float>(a.N);
  const float inv_b = __frcp_rn(static_cast<float>(a.B));
  float warp_loss = 0.f;
  for (int64_t p = warp; p < a.B; p += kWarps) {
    // Given reference errors: only the model's two partials were written.
    const int nq = a.ref_mse_in ? 2 : 4;
    float s[4] = {0.f, 0.f, 0.f, 0.f};
    for (int q = 0; q < nq; ++q) {
      const float* row = a.workspace + (q * a.B + p) * n_chunks;
      float v = 0.f;
      for (int64_t c = lane; c < n_chunks; c += 32) v += row[c];
      s[q] = warp_sum(v);
    }
    if (lane == 0) {
      const float m_w = __fdiv_rn(s[0], n), m_l = __fdiv_rn(s[1], n);
      const float r_w = a.ref_mse_in ? a.ref_mse_in[p] : __fdiv_rn(s[2], n);
      const float r_l = a.ref_mse_in ? a.ref_mse_in[a.B + p] : __fdiv_rn(s[3], n);
      const float w = a.weights ? a.weights[p] : 1.f;
      float z, wsp, coef;
      pair_math(m_w, m_l, r_w, r_l, w, a.beta, inv_b, n, &z, &wsp, &coef);
      a.model_mse[p] = m_w;
      a.model_mse[a.B + p] = m_l;
      a.ref_mse[p] = r_w;
      a.ref_mse[a.B + p] = r_l;
      a.margin[p] = z;
      a.grad_scale[p] = coef;
      a.grad_scale[a.B + p] = -coef;
      warp_loss += wsp;
    }
  }
  __shared__ float totals[kWarps];
  if (lane == 0) totals[warp] = warp_loss;
  __syncthreads();
  if (threadIdx.x == 0) {
    float t = 0.f;
    for (int w = 0; w < kWarps; ++w) t += totals[w];
    *a.loss = t * inv_b;
  }
}

// Backward: grid = B * tiles; block (pair, tile) writes one tile of both rows of the
// pair, so it never branches on which target a row uses.
template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads)
    bwd_kernel(const ddspo_bwd_args a, const int64_t tiles) {
  constexpr int V = Vec<T>::n;
  const int64_t pair = blockIdx.x / tiles;
  const int64_t tile = blockIdx.x % tiles;
  const int64_t i = (tile * kThreads + threadIdx.x) * V;
  if (i >= a.N) return;
  const float g = *a.grad_loss;
  const float c_w = g * a.grad_scale[pair];
  const float c_l = g * a.grad_scale[a.B + pair];
  // __restrict__: the gradient never aliases the inputs, so no load has to wait for a
  // store to retire, and the read-only rows may use the non-coherent path.
  const T* __restrict__ mw = static_cast<const T*>(a.model) + pair * a.s_model;
  const T* __restrict__ ml = static_cast<const T*>(a.model) + (pair + a.B) * a.s_model;
  const T* __restrict__ tw = static_cast<const T*>(a.target_w) + pair * a.s_target_w;
  const T* __restrict__ tl = static_cast<const T*>(a.target_l) + pair * a.s_target_l;
  T* __restrict__ gw = static_cast<T*>(a.grad_model) + pair * a.N;
  T* __restrict__ gl = static_cast<T*>(a.grad_model) + (pair + a.B) * a.N;
  if (VEC && i + V <= a.N) {
    // This pass is the rows' last reader: evict-first. All four loads go out before
    // the first store.
    const uint4 r_mw = load16<true>(mw + i), r_tw = load16<true>(tw + i);
    const uint4 r_ml = load16<true>(ml + i), r_tl = load16<true>(tl + i);
    float out[V];
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = c_w * (elem<T>(r_mw, k) - elem<T>(r_tw, k));
    store16<T>(gw + i, out);
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = c_l * (elem<T>(r_ml, k) - elem<T>(r_tl, k));
    store16<T>(gl + i, out);
  } else {
    const int64_t end = i + V < a.N ? i + V : a.N;
    for (int64_t j = i; j < end; ++j) {
      gw[j] = from_f<T>(c_w * (to_f(mw[j]) - to_f(tw[j])));
      gl[j] = from_f<T>(c_l * (to_f(ml[j]) - to_f(tl[j])));
    }
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename T>
bool rows_aligned(std::initializer_list<const void*> ptrs,
                  std::initializer_list<int64_t> strides) {
  for (const void* p : ptrs)
    if (p && !aligned16(p)) return false;
  for (int64_t s : strides)
    if ((s * static_cast<int64_t>(sizeof(T))) % 16 != 0) return false;
  return true;
}

template <typename T>
cudaError_t fwd_typed(const ddspo_fwd_args& a, const ddspo_fwd_plan& plan, cudaStream_t st) {
  const bool has_rw = a.ref_w != nullptr;
  const bool vec =
      plan.chunk_len % Vec<T>::n == 0 &&
      rows_aligned<T>({a.model, a.target_w, a.target_l, a.ref_w, a.ref_l},
                      {a.s_model, a.s_target_w, a.s_target_l, has_rw ? a.s_ref_w : 0,
                       a.s_ref_l});
  const dim3 grid(static_cast<unsigned>(a.B * plan.n_chunks));
  if (a.ref_mse_in && vec)
    fwd_partials_policy<T, true><<<grid, kThreads, 0, st>>>(a, plan.n_chunks, plan.chunk_len);
  else if (a.ref_mse_in)
    fwd_partials_policy<T, false><<<grid, kThreads, 0, st>>>(a, plan.n_chunks, plan.chunk_len);
  else if (vec && has_rw)
    fwd_partials<T, true, true><<<grid, kThreads, 0, st>>>(a, plan.n_chunks, plan.chunk_len);
  else if (vec)
    fwd_partials<T, true, false><<<grid, kThreads, 0, st>>>(a, plan.n_chunks, plan.chunk_len);
  else if (has_rw)
    fwd_partials<T, false, true><<<grid, kThreads, 0, st>>>(a, plan.n_chunks, plan.chunk_len);
  else
    fwd_partials<T, false, false><<<grid, kThreads, 0, st>>>(a, plan.n_chunks, plan.chunk_len);
  // A failed launch stays pending for the caller's check; do not queue the next kernel.
  if (cudaPeekAtLastError() != cudaSuccess) return cudaSuccess;
  fwd_finalize<<<1, kThreads, 0, st>>>(a, plan.n_chunks);
  return cudaSuccess;
}

template <typename T>
cudaError_t bwd_typed(const ddspo_bwd_args& a, cudaStream_t st) {
  const int64_t tile = int64_t(kThreads) * Vec<T>::n;
  const int64_t tiles = (a.N + tile - 1) / tile;
  const bool vec = rows_aligned<T>({a.model, a.target_w, a.target_l, a.grad_model},
                                   {a.s_model, a.s_target_w, a.s_target_l, a.N});
  const dim3 grid(static_cast<unsigned>(a.B * tiles));
  if (vec)
    bwd_kernel<T, true><<<grid, kThreads, 0, st>>>(a, tiles);
  else
    bwd_kernel<T, false><<<grid, kThreads, 0, st>>>(a, tiles);
  return cudaSuccess;
}

int elem_size(ddspo_dtype dt) { return dt == DDSPO_F32 ? 4 : 2; }

}  // namespace

extern "C" {

ddspo_fwd_plan ddspo_fwd_make_plan(int64_t B, int64_t N, ddspo_dtype dtype, int num_sms,
                                   int64_t n_chunks_hint) {
  const int64_t tile = int64_t(kThreads) * (16 / elem_size(dtype));
  const int64_t tiles = N > 0 ? (N + tile - 1) / tile : 1;
  int64_t want = n_chunks_hint > 0
                     ? n_chunks_hint
                     : (int64_t(kBlocksPerSm) * (num_sms > 0 ? num_sms : 1) + B - 1) /
                           (B > 0 ? B : 1);
  if (want < 1) want = 1;
  if (want > tiles) want = tiles;
  ddspo_fwd_plan plan;
  // Whole tiles per chunk keep every chunk start 16-byte aligned for the vector path.
  plan.chunk_len = ((tiles + want - 1) / want) * tile;
  plan.n_chunks = N > 0 ? (N + plan.chunk_len - 1) / plan.chunk_len : 1;
  return plan;
}

size_t ddspo_fwd_workspace_floats(int64_t B, int64_t n_chunks) {
  return static_cast<size_t>(4 * B * n_chunks);
}

cudaError_t ddspo_fwd_launch(const ddspo_fwd_args* args, const ddspo_fwd_plan* plan,
                             ddspo_dtype dtype, cudaStream_t stream) {
  if (args->B <= 0 || args->N <= 0 || plan->n_chunks <= 0) return cudaErrorInvalidValue;
  if (args->B * plan->n_chunks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  switch (dtype) {
    case DDSPO_F32: return fwd_typed<float>(*args, *plan, stream);
    case DDSPO_F16: return fwd_typed<__half>(*args, *plan, stream);
    case DDSPO_BF16: return fwd_typed<__nv_bfloat16>(*args, *plan, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t ddspo_bwd_launch(const ddspo_bwd_args* args, ddspo_dtype dtype,
                             cudaStream_t stream) {
  if (args->B <= 0 || args->N <= 0) return cudaSuccess;  // nothing to write
  const int64_t tile = int64_t(kThreads) * (16 / elem_size(dtype));
  if (args->B * ((args->N + tile - 1) / tile) > 0x7fffffffLL)
    return cudaErrorInvalidConfiguration;
  switch (dtype) {
    case DDSPO_F32: return bwd_typed<float>(*args, stream);
    case DDSPO_F16: return bwd_typed<__half>(*args, stream);
    case DDSPO_BF16: return bwd_typed<__nv_bfloat16>(*args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // extern "C"
