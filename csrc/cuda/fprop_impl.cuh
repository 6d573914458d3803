// The CUTLASS kernel behind every fusedres CUDA op: a CUTLASS 2.x implicit-GEMM conv2d
// forward (tensor cores, mma.sync, fp32 accumulation) whose epilogue computes
//
//   Z = act(1 * acc + beta * residual + bias[k]),   beta = 1 with a residual, else 0
//
// in fp32 before a single rounding to the output dtype.  CUTLASS's stock
// `LinearCombinationBiasElementwise` output op does exactly this inside
// `EpilogueWithBroadcast`: the bias is the broadcast vector (one fp32 per output channel,
// stride 0 across rows) and the residual is the epilogue's source tensor, which the
// epilogue skips reading when beta == 0.  So residual / no residual is one kernel; only
// the activation is a template parameter, giving two kernels per dtype.
//
// Tile choice: 128x128x64 threadblock, 64x64x64 warps (4 warps), 3 stages.  It is
// CUTLASS's stock sm80 fp16/bf16 fprop configuration: 128 fp32 accumulators per thread
// fit without spills (scripts/wheel_smoke.sh checks the ptxas report), and 96 KiB of shared
// memory, which the device wrapper opts into.  On sm_90 these sm_80 kernels run via
// mma.sync (no TMA/wgmma).
//
// Included only by fprop_bf16.cu / fprop_fp16.cu, each of which instantiates one dtype.
#pragma once

#include <type_traits>

#include "cutlass/conv/conv2d_problem_size.h"
#include "cutlass/conv/device/implicit_gemm_convolution.h"
#include "cutlass/conv/kernel/default_conv2d_fprop_with_broadcast.h"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/thread/activation.h"
#include "cutlass/epilogue/thread/linear_combination_bias_elementwise.h"
#include "cutlass/gemm/threadblock/threadblock_swizzle.h"

#include "fprop.h"

namespace fusedres::cuda {

template <typename Element, bool kRelu>
struct FpropKernel {
  using Layout = cutlass::layout::TensorNHWC;
  using Activation = std::conditional_t<kRelu, cutlass::epilogue::thread::ReLu<float>,
                                        cutlass::epilogue::thread::Identity<float>>;
  using OutputOp = cutlass::epilogue::thread::LinearCombinationBiasElementwise<
      Element,  // ElementC: output and residual
      float,    // accumulator
      float,    // compute
      Element,  // ElementZ: the stored result
      Element,  // ElementT: unused (not stored)
      kAlignment, Activation, cutlass::plus<float>,
      /*StoreT=*/false,
      /*ElementVector=*/float>;  // the BN shift stays fp32 until the final rounding
  using Kernel = typename cutlass::conv::kernel::DefaultConv2dFpropWithBroadcast<
      Element, Layout, Element, Layout, Element, Layout, float, cutlass::arch::OpClassTensorOp,
      cutlass::arch::Sm80, cutlass::gemm::GemmShape<128, 128, 64>,
      cutlass::gemm::GemmShape<64, 64, 64>, cutlass::gemm::GemmShape<16, 8, 16>, OutputOp,
      cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, /*Stages=*/3,
      cutlass::arch::OpMultiplyAdd, cutlass::conv::IteratorAlgorithm::kOptimized,
      cutlass::conv::StrideSupport::kStrided, kAlignment, kAlignment>::Kernel;
  using Device = cutlass::conv::device::ImplicitGemmConvolution<Kernel>;
};

template <typename Element, bool kRelu>
FpropError run_fprop(const FpropProblem& p, cudaStream_t stream) {
  using K = FpropKernel<Element, kRelu>;
  using Layout = typename K::Layout;
  cutlass::conv::Conv2dProblemSize problem(p.N, p.H, p.W, p.C, p.K, p.R, p.S, p.P, p.Q, p.pad_h,
                                           p.pad_w, p.stride_h, p.stride_w, p.dilation_h,
                                           p.dilation_w, cutlass::conv::Mode::kCrossCorrelation,
                                           /*split_k_slices=*/1, /*groups=*/1);
  auto* x = static_cast<Element*>(const_cast<void*>(p.input));
  auto* w = static_cast<Element*>(const_cast<void*>(p.filter));
  auto* out = static_cast<Element*>(p.output);
  // Without a residual the epilogue never reads C (beta == 0); point it at the output so
  // the reference is still a valid tensor.
  auto* res = p.residual ? static_cast<Element*>(const_cast<void*>(p.residual)) : out;
  cutlass::Tensor4DCoord out_extent(p.N, p.P, p.Q, p.K);
  typename K::Device::Arguments args(
      problem, {x, Layout::packed(cutlass::Tensor4DCoord(p.N, p.H, p.W, p.C))},
      {w, Layout::packed(cutlass::Tensor4DCoord(p.K, p.R, p.S, p.C))},
      {res, Layout::packed(out_extent)}, {out, Layout::packed(out_extent)},
      typename K::OutputOp::Params(/*alpha=*/1.0f, /*beta=*/p.residual ? 1.0f : 0.0f),
      cutlass::conv::SplitKMode::kSerial,
      /*ptr_Vector=*/const_cast<float*>(p.bias),
      /*ptr_Tensor=*/nullptr,
      /*ldr=*/0,  // row stride 0: the same bias row for every output pixel
      /*ldt=*/0);

  typename K::Device op;
  cutlass::Status status = K::Device::can_implement(args);
  if (status != cutlass::Status::kSuccess) return {"can_implement", cutlassGetStatusString(status)};
  // Serial split-K with one slice needs no workspace; refuse rather than run without one.
  if (K::Device::get_workspace_size(args) != 0) return {"get_workspace_size", "nonzero workspace"};
  status = op.initialize(args, /*workspace=*/nullptr, stream);
  if (status != cutlass::Status::kSuccess) return {"initialize", cutlassGetStatusString(status)};
  status = op.run(stream);
  if (status != cutlass::Status::kSuccess) return {"run", cutlassGetStatusString(status)};
  return {};
}

}  // namespace fusedres::cuda
