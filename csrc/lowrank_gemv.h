// Host interface of the fused low-rank GEMV kernels (csrc/lowrank_gemv.cu).  Kept free of
// torch headers so the .cu file compiles with nvcc alone; csrc/bindings.cpp does the
// tensor checks and allocation.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace lowrank {

struct GemvArgs {
  const void* x;     // [tokens, in_features], row stride ld_x
  const void* V;     // [rank, in_features], row stride ld_v
  const void* U;     // [out_features, rank], row stride ld_u
  const void* bias;  // [out_features] or nullptr
  void* y;           // [tokens, out_features], row stride ld_y
  float* t;          // fp32 workspace, at least min(tokens, 8) * rank
  int tokens;
  int in_features;
  int rank;
  int out_features;
  int64_t ld_x;
  int64_t ld_v;
  int64_t ld_u;
  int64_t ld_y;
  bool is_bf16;      // else fp16
  bool vec_down;     // 16-byte loads legal for x and V (in_features % 8 == 0, aligned)
  bool vec_up;       // 16-byte loads legal for U and t (rank % 8 == 0, aligned)
  bool pdl;          // launch the up kernel with programmatic dependent launch
  int sm_count;
  int cluster_down;  // 0 = automatic, else 1, 2, 4 or 8
  int cluster_up;
};

// Enqueues the down and up kernels on `stream` (loops over chunks of 8 tokens).
cudaError_t lowrank_gemv_launch(const GemvArgs& args, cudaStream_t stream);

int lowrank_gemv_max_tokens_per_launch();

}  // namespace lowrank
