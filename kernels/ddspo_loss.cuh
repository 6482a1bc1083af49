// C launcher API of the fused DDSPO loss kernels (kernels/ddspo_loss.cu).
//
// Deliberately free of torch and of device code: csrc/cuda_ops.cpp (compiled by the host
// compiler) includes it, and kernels/*.cu compile with plain nvcc. Math and layout are
// docs/internals.md section 1: `model` is (2B, N), the targets and reference rows are
// (B, N); every row has unit element stride, row strides are free (in elements).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum ddspo_dtype { DDSPO_F32 = 0, DDSPO_F16 = 1, DDSPO_BF16 = 2 } ddspo_dtype;

// How the forward pass splits each pair's rows: `n_chunks` chunks of `chunk_len` elements
// (the last one shorter), so that B * n_chunks blocks fill the device. The caller
// allocates a float workspace of `ddspo_fwd_workspace_floats(B, n_chunks)` elements.
typedef struct ddspo_fwd_plan {
  int64_t n_chunks;
  int64_t chunk_len;
} ddspo_fwd_plan;

// `n_chunks_hint` <= 0 picks the count from `num_sms`; > 0 forces it (tests, sweeps).
ddspo_fwd_plan ddspo_fwd_make_plan(int64_t B, int64_t N, ddspo_dtype dtype, int num_sms,
                                   int64_t n_chunks_hint);
size_t ddspo_fwd_workspace_floats(int64_t B, int64_t n_chunks);

typedef struct ddspo_fwd_args {
  const void* model;     // (2B, N), row stride s_model
  const void* target_w;  // (B, N)
  const void* target_l;  // (B, N)
  const void* ref_w;     // (B, N) or NULL: ref_w == target_w, r_w = 0 and nothing is read
  const void* ref_l;     // (B, N), or NULL when ref_mse_in is given
  const float* ref_mse_in;  // (2B,) contiguous fp32 [r_w ; r_l], or NULL: the reference's
                            // row errors given (a reference cache); then no row is read
  const float* weights;  // (B,) contiguous fp32, or NULL for all ones
  int64_t B, N;
  int64_t s_model, s_target_w, s_target_l, s_ref_w, s_ref_l;  // row strides, elements
  float beta;
  float* workspace;      // ddspo_fwd_workspace_floats(B, plan.n_chunks) floats
  // outputs, fp32, contiguous
  float* loss;           // ()
  float* model_mse;      // (2B,)
  float* ref_mse;        // (2B,)
  float* margin;         // (B,)
  float* grad_scale;     // (2B,)
} ddspo_fwd_args;

typedef struct ddspo_bwd_args {
  const float* grad_loss;   // () on the device: read there, so no host sync
  const void* model;        // (2B, N), row stride s_model
  const void* target_w;     // (B, N)
  const void* target_l;     // (B, N)
  const float* grad_scale;  // (2B,) contiguous
  void* grad_model;         // (2B, N) contiguous, model's dtype
  int64_t B, N;
  int64_t s_model, s_target_w, s_target_l;
} ddspo_bwd_args;

// Both launchers return an error for invalid arguments and otherwise cudaSuccess without
// consuming the runtime's error state: a failed launch is reported by the caller's
// cudaGetLastError() (torch: C10_CUDA_KERNEL_LAUNCH_CHECK()).
cudaError_t ddspo_fwd_launch(const ddspo_fwd_args* args, const ddspo_fwd_plan* plan,
                             ddspo_dtype dtype, cudaStream_t stream);
cudaError_t ddspo_bwd_launch(const ddspo_bwd_args* args, ddspo_dtype dtype,
                             cudaStream_t stream);

#ifdef __cplusplus
}
#endif
