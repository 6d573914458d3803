// Hopper-native (sm_90a) eval conv kernels: CUTLASS 3.x ConvUniversal, TMA im2col loads and
// wgmma (KernelImplicitTmaWarpSpecializedSm90, picked by the collective builder), and a TMA
// warp-specialized epilogue computing
//   out[n,p,q,k] = act(scale[k] * acc[n,p,q,k] + bias[k] + beta * residual[n,p,q,k])
// in fp32 (PerColLinCombPerColBiasEltAct: one GEMM column per output channel), so the eval BN's
// scale multiplies the fp32 accumulator instead of being folded into a 16-bit filter (no fp16
// range limit, no filter-sized fold per call).  The interface is fprop.h's FpropProblem, as for
// the CUTLASS 2.x kernels of fprop_impl.cuh: `scale` and `bias` are the fp32 scale and shift
// (a null `scale` means 1), beta is 1 with a residual and 0 without one (the epilogue then
// reads no source).
//
// Only compiled when FUSEDRES_CUDA_ARCHS names 90a (setup.py), and only called when
// FUSEDRES_CUDA_SM90A is set on an sm_90 device (ops.cu): these kernels have not run on a GPU yet.
// Compiled for other architectures (setup.py's sm_80 and compute_90 passes), CUTLASS leaves the
// kernel body empty (it prints an error on the device); ops.cu never launches them there.
//
// check_fprop must accept a problem before it runs: CUTLASS's can_implement does not look at the
// pointers or the traversal strides, and with NDEBUG a TMA descriptor that cannot be encoded is
// not reported (the kernel would launch with it and the host would see success).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cute/tensor.hpp"
#include "cutlass/kernel_hardware_info.hpp"  // before the conv builders, which use it undeclared
#include "cutlass/conv/collective/collective_builder.hpp"
#include "cutlass/conv/convnd_problem_shape.hpp"
#include "cutlass/conv/convolution.h"
#include "cutlass/conv/device/conv_universal_adapter.hpp"
#include "cutlass/conv/dispatch_policy.hpp"
#include "cutlass/conv/kernel/conv_universal.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/epilogue/thread/activation.h"
#include "fprop.h"

namespace fusedres::cuda::sm90 {

using namespace cute;

// 128x128x64 tiles: 182 registers, 6 stages, no spills (ptxas, nvcc 13.0); 128x256 spills.
template <class T, template <class> class Act>
struct FpropKernel {
  static constexpr cutlass::conv::Operator kOp = cutlass::conv::Operator::kFprop;
  using TileShape = Shape<_128, _128, Shape<_64>>;
  using ClusterShape = Shape<_1, _1, _1>;
  using Layout = cutlass::layout::TensorNHWC;  // activations NHWC, filter KRSC, output NPQK
  using Fusion = cutlass::epilogue::fusion::PerColLinCombPerColBiasEltAct<Act, T, float, float, T, float>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, T, Layout, kAlignment, T, Layout,
      kAlignment, cutlass::epilogue::TmaWarpSpecialized, Fusion>::CollectiveOp;
  using Mainloop = typename cutlass::conv::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, kOp, T, Layout, kAlignment, T, Layout, kAlignment,
      float, TileShape, ClusterShape,
      cutlass::conv::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::conv::collective::KernelScheduleAuto>::CollectiveOp;
  using Problem = cutlass::conv::ConvProblemShape<kOp, Mainloop::DispatchPolicy::NumSpatialDimensions>;
  using Kernel = cutlass::conv::kernel::ConvUniversal<Problem, Mainloop, Epilogue>;
  using Conv = cutlass::conv::device::ConvUniversalAdapter<Kernel>;
};

template <class Conv, class Problem>
typename Conv::Arguments arguments(const FpropProblem& p, const Problem& shape) {
  using T = typename Conv::ElementA;
  using StrideC = typename Conv::ConvKernel::StrideC;
  using StrideD = typename Conv::ConvKernel::StrideD;
  // The output's strides in CuTe's (NPQ..., K) order, from the problem's packed NPQK strides.
  StrideC stride_c{};
  StrideD stride_d{};
  cute::for_each(cute::make_seq<cute::rank<0>(StrideC{})>{}, [&](auto i) {
    cute::get<0, i>(stride_c) = shape.stride_C[Problem::RankT - 2 - i];
  });
  cute::for_each(cute::make_seq<cute::rank<0>(StrideD{})>{}, [&](auto i) {
    cute::get<0, i>(stride_d) = shape.stride_C[Problem::RankT - 2 - i];
  });
  typename Conv::Arguments args{
      shape,
      {static_cast<const T*>(p.input), static_cast<const T*>(p.filter)},
      // Without a residual, beta = 0 and the epilogue reads no source; C still names valid memory
      // of the right extent (the output), since a TMA descriptor is made for it either way.
      {{}, static_cast<const T*>(p.residual != nullptr ? p.residual : p.output), stride_c,
       static_cast<T*>(p.output), stride_d}};
  auto& fusion = args.epilogue.thread;
  fusion.alpha = 1.0f;  // where scale is null
  fusion.alpha_ptr = p.scale;
  fusion.beta = p.residual != nullptr ? 1.0f : 0.0f;
  fusion.bias_ptr = p.bias;
  return args;
}

template <class T, bool Relu>
using KernelFor = std::conditional_t<Relu, FpropKernel<T, cutlass::epilogue::thread::ReLu>,
                                     FpropKernel<T, cutlass::epilogue::thread::Identity>>;

template <class K>
typename K::Problem problem_shape(const FpropProblem& p) {
  return typename K::Problem(cutlass::conv::Mode::kCrossCorrelation, {p.N, p.H, p.W, p.C}, {p.K, p.R, p.S, p.C},
                             {p.pad_h, p.pad_w}, {p.pad_h, p.pad_w}, {p.stride_h, p.stride_w},
                             {p.dilation_h, p.dilation_w}, 1);
}

// Host-side checks only (no CUDA call): whether the kernel takes this problem.
template <class T, bool Relu>
FpropError check_fprop(const FpropProblem& p) {
  using K = KernelFor<T, Relu>;
  using Conv = typename K::Conv;
  // TMA's limits that can_implement leaves out: 16-byte aligned global addresses, and im2col
  // traversal strides of 1 to 8 (cuTensorMapEncodeIm2col).
  for (const void* ptr : {p.input, p.filter, static_cast<const void*>(p.output), p.residual,
                          static_cast<const void*>(p.scale), static_cast<const void*>(p.bias)}) {
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) {
      return {"alignment", "TMA needs 16-byte aligned tensors"};
    }
  }
  if (p.stride_h > 8 || p.stride_w > 8) {
    return {"stride", "TMA im2col traverses with strides of at most 8"};
  }
  const typename K::Problem shape = problem_shape<K>(p);
  if (shape.shape_C[1] != p.P || shape.shape_C[2] != p.Q) {
    return {"output shape", "the sm_90a kernel's P/Q differ from the caller's"};
  }
  const cutlass::Status status = Conv::can_implement(arguments<Conv>(p, shape));
  if (status != cutlass::Status::kSuccess) {
    return {"can_implement", cutlassGetStatusString(status)};
  }
  return {};
}

template <class T, bool Relu>
FpropError run_fprop(const FpropProblem& p, cudaStream_t stream) {
  using K = KernelFor<T, Relu>;
  using Conv = typename K::Conv;
  if (FpropError err = check_fprop<T, Relu>(p)) {
    return err;
  }
  typename Conv::Arguments args = arguments<Conv>(p, problem_shape<K>(p));
  if (Conv::get_workspace_size(args) != 0) {
    return {"workspace", "the sm_90a kernel asks for a workspace"};
  }
  Conv conv;
  cutlass::Status status = conv.initialize(args, nullptr, stream);
  if (status != cutlass::Status::kSuccess) {
    return {"initialize", cutlassGetStatusString(status)};
  }
  status = conv.run(stream);
  if (status != cutlass::Status::kSuccess) {
    return {"launch", cutlassGetStatusString(status)};
  }
  return {};
}

}  // namespace fusedres::cuda::sm90
