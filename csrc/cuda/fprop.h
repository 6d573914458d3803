// Interface between the op layer (ops.cu, which sees torch) and the CUTLASS kernel
// translation units (fprop_bf16.cu / fprop_fp16.cu, which see only CUTLASS).  Keeping the
// two apart means no translation unit parses both torch's and CUTLASS's headers, which
// keeps each nvcc invocation short and lets them compile in parallel.
#pragma once

#include <cuda_runtime_api.h>

namespace fusedres::cuda {

// One implicit-GEMM conv2d forward, NHWC activations and KRSC filter, with the epilogue
//   out[n,p,q,k] = act(scale[k] * acc[n,p,q,k] + bias[k] (+ residual[n,p,q,k]))
// where acc is the fp32 tensor-core accumulator.  The CUTLASS 2.x kernels take no `scale`: the
// per-channel BN scale is folded into `filter` by the caller (see ops.cu for why); the sm_90a
// kernels apply it to the fp32 accumulator.
struct FpropProblem {
  const void* input;     // (N, H, W, C)  fp16 / bf16, 16-byte aligned
  const void* filter;    // (K, R, S, C)  same dtype, 16-byte aligned
  const float* bias;     // (K,)          fp32, 32-byte aligned
  const float* scale = nullptr;  // (K,)   fp32, 16-byte aligned; sm_90a kernels only (else null)
  const void* residual;  // (N, P, Q, K)  same dtype, or nullptr
  void* output;          // (N, P, Q, K)  same dtype
  int N, H, W, C, K, R, S, P, Q;
  int pad_h, pad_w, stride_h, stride_w, dilation_h, dilation_w;
};

// What went wrong in a launch: the step ("can_implement", "cudaFuncSetAttribute",
// "launch", ...) and CUTLASS's status or CUDA's error string; both null on success.  Static strings, no allocation.
struct FpropError {
  const char* step = nullptr;
  const char* status = nullptr;
  explicit operator bool() const { return step != nullptr; }
};

// Launch on `stream`.  The caller also checks cudaGetLastError().
FpropError fprop_bf16(const FpropProblem& p, bool relu, cudaStream_t stream);
FpropError fprop_fp16(const FpropProblem& p, bool relu, cudaStream_t stream);

// The same conv through the sm_90a kernels (fprop_sm90.cuh: CUTLASS 3.x, TMA + wgmma), built
// only when FUSEDRES_CUDA_ARCHS names 90a (then FUSEDRES_HAVE_SM90A is defined).
FpropError fprop_sm90_bf16(const FpropProblem& p, bool relu, cudaStream_t stream);
FpropError fprop_sm90_fp16(const FpropProblem& p, bool relu, cudaStream_t stream);
// Their host-side checks alone (CUTLASS's can_implement; no CUDA call, so they run without a GPU).
FpropError fprop_sm90_bf16_check(const FpropProblem& p, bool relu);
FpropError fprop_sm90_fp16_check(const FpropProblem& p, bool relu);

// The 1x1 downsample conv of a residual block (no padding or dilation), which yields the
// same (N, P, Q, K) output as the main conv it is fused with.
struct DownsampleProblem {
  const void* input;   // (N, H, W, C)  same dtype as the main input, 16-byte aligned
  const void* filter;  // (K, 1, 1, C)  BN scale folded in
  int H, W, C, stride_h, stride_w;
};

// Block tail in ONE kernel: both implicit GEMMs accumulate into the same fp32 tile,
//   out = act(acc_main + acc_downsample + bias[k]),
// `main.bias` being shift + ds_shift and `main.residual` null.
FpropError block_tail_bf16(const FpropProblem& main, const DownsampleProblem& ds, bool relu,
                           cudaStream_t stream);
FpropError block_tail_fp16(const FpropProblem& main, const DownsampleProblem& ds, bool relu,
                           cudaStream_t stream);

// Channel-count alignment the kernels need: 128-bit accesses of 16-bit elements on the
// C (activation/filter) and K (output/residual/bias) dimensions.
constexpr int kAlignment = 8;
// CUTLASS's optimized activation iterator keeps one mask bit per filter row/column.
constexpr int kMaxFilterSize = 32;

}  // namespace fusedres::cuda
