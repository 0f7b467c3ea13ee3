// Python bindings of the CUDA extension `lowrank_kernels._C` (built by setup.py, or just in time
// by kernels/_ext.py under the same sources).  Argument checking that users see lives in
// kernels/_ext.py (ValueErrors shared with kernels.lowrank_matmul); the TORCH_CHECKs
// here are a backstop for direct calls.

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "lowrank_gemv.h"

namespace {

bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

// Multiprocessor count of `device` (the c10 headers suffice; ATen/cuda/CUDAContext.h would
// pull in the cuBLAS/cuSPARSE headers for this one number).
int sm_count(int device) {
  int n = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device);
  TORCH_CHECK(err == cudaSuccess, "lowrank_gemv: cudaDeviceGetAttribute failed: ", cudaGetErrorString(err));
  return n;
}

// y[T, out] = (x[T, in] · Vᵀ) · Uᵀ + bias, fp32 accumulation, output in x's dtype.
// pdl / cluster_down / cluster_up are tuning knobs for the benchmarks (0 = automatic).
torch::Tensor lowrank_gemv(const torch::Tensor& x, const torch::Tensor& U, const torch::Tensor& V,
                           const std::optional<torch::Tensor>& bias, bool pdl, int64_t cluster_down,
                           int64_t cluster_up) {
  TORCH_CHECK(x.is_cuda() && U.is_cuda() && V.is_cuda(), "lowrank_gemv: CUDA tensors required");
  TORCH_CHECK(x.dim() == 2 && U.dim() == 2 && V.dim() == 2, "lowrank_gemv: x [T, in], U [out, r], V [r, in]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "lowrank_gemv: bfloat16 or float16 only");
  TORCH_CHECK(U.scalar_type() == x.scalar_type() && V.scalar_type() == x.scalar_type(),
              "lowrank_gemv: x, U and V must share a dtype");
  const int64_t T = x.size(0), in = x.size(1), r = V.size(0), out = U.size(0);
  TORCH_CHECK(V.size(1) == in && U.size(1) == r, "lowrank_gemv: shape mismatch");
  TORCH_CHECK(x.stride(1) == 1 && U.stride(1) == 1 && V.stride(1) == 1, "lowrank_gemv: unit inner stride required");
  TORCH_CHECK(in < INT32_MAX && r < INT32_MAX && out < INT32_MAX && T < INT32_MAX, "lowrank_gemv: size too large");
  TORCH_CHECK(cluster_down >= 0 && cluster_down <= 8 && cluster_up >= 0 && cluster_up <= 8,
              "lowrank_gemv: cluster sizes are 0 (auto) or 1..8");
  const void* bias_ptr = nullptr;
  if (bias.has_value()) {
    const torch::Tensor& b = *bias;
    TORCH_CHECK(b.is_cuda() && b.dim() == 1 && b.size(0) == out && b.stride(0) == 1 &&
                    b.scalar_type() == x.scalar_type(),
                "lowrank_gemv: bias must be a contiguous [out] tensor of x's dtype");
    bias_ptr = b.data_ptr();
  }
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = torch::empty({T, out}, x.options());
  if (T == 0) return y;
  const int chunk = lowrank::lowrank_gemv_max_tokens_per_launch();
  auto t = torch::empty({std::min<int64_t>(T, chunk), r}, x.options().dtype(at::kFloat));

  lowrank::GemvArgs a{};
  a.x = x.data_ptr();
  a.V = V.data_ptr();
  a.U = U.data_ptr();
  a.bias = bias_ptr;
  a.y = y.data_ptr();
  a.t = t.data_ptr<float>();
  a.tokens = static_cast<int>(T);
  a.in_features = static_cast<int>(in);
  a.rank = static_cast<int>(r);
  a.out_features = static_cast<int>(out);
  a.ld_x = x.stride(0);
  a.ld_v = V.stride(0);
  a.ld_u = U.stride(0);
  a.ld_y = out;
  a.is_bf16 = x.scalar_type() == at::kBFloat16;
  // 16-byte loads need every row start 16-byte aligned: K % 8 == 0, aligned bases and strides.
  a.vec_down = in % 8 == 0 && a.ld_x % 8 == 0 && a.ld_v % 8 == 0 && aligned16(a.x) && aligned16(a.V);
  a.vec_up = r % 8 == 0 && a.ld_u % 8 == 0 && aligned16(a.U) && aligned16(a.t);
  a.pdl = pdl;
  a.sm_count = sm_count(x.get_device());
  a.cluster_down = static_cast<int>(cluster_down);
  a.cluster_up = static_cast<int>(cluster_up);
  const cudaError_t err = lowrank::lowrank_gemv_launch(a, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "lowrank_gemv: CUDA launch failed: ", cudaGetErrorString(err));
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lowrank-kit CUDA kernels (csrc/)";
  m.def("lowrank_gemv", &lowrank_gemv, "Fused low-rank decode GEMV: (x Vᵀ) Uᵀ + bias", py::arg("x"), py::arg("U"),
        py::arg("V"), py::arg("bias") = py::none(), py::arg("pdl") = true, py::arg("cluster_down") = 0,
        py::arg("cluster_up") = 0);
  m.def("max_tokens_per_launch", &lowrank::lowrank_gemv_max_tokens_per_launch);
}
