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
// the activation is a template parameter: two conv kernels per dtype, and two more for the
// block tail below.
//
// Tile choice: 128x128x32 threadblock, 64x64x32 warps (4 warps), 4 stages (64 KiB of
// shared memory, which the launch opts into).  128 fp32 accumulators per thread; the
// k = 32 tile keeps the activation iterator's per-thread state small enough that even the
// two-pass block-tail kernel fits in 255 registers without spilling (a k = 64 tile spilled
// there; scripts/wheel_smoke.sh checks the ptxas report).  On sm_90 these sm_80 kernels
// run via mma.sync (no TMA/wgmma).
//
// The block tail with its downsample conv (DualFpropKernel below) runs both implicit GEMMs
// in one kernel: each threadblock runs the stock CUTLASS mainloop over the main conv, then
// again over the 1x1 downsample conv into the same accumulators (the two convs share the
// output tile, hence the M = N*P*Q and N = K coordinates), then one epilogue.  The
// mainloop type is the same for both (only iterator parameters differ), and it drains its
// cp.async pipeline and synchronises before returning, so the second pass can reuse the
// shared memory.
//
// Included only by fprop_bf16.cu / fprop_fp16.cu, each of which instantiates one dtype.
#pragma once

#include <atomic>
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
      cutlass::arch::Sm80, cutlass::gemm::GemmShape<128, 128, 32>,
      cutlass::gemm::GemmShape<64, 64, 32>, cutlass::gemm::GemmShape<16, 8, 16>, OutputOp,
      cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, /*Stages=*/4,
      cutlass::arch::OpMultiplyAdd, cutlass::conv::IteratorAlgorithm::kOptimized,
      cutlass::conv::StrideSupport::kStrided, kAlignment, kAlignment>::Kernel;
  using Device = cutlass::conv::device::ImplicitGemmConvolution<Kernel>;
};

// One threadblock of the fused block tail; `Base` is FpropKernel<...>::Kernel, whose
// Params describe the main conv (and the epilogue) and whose types this reuses.
template <typename Base>
struct DualFpropKernel {
  using Mma = typename Base::Mma;
  using Epilogue = typename Base::Epilogue;
  using SharedStorage = typename Base::SharedStorage;
  using ThreadblockSwizzle = typename Base::ThreadblockSwizzle;
  using OutputParam = typename Base::ConvOutputIteratorParameter;
  static int const kThreadCount = Base::kThreadCount;

  struct Params {
    typename Base::Params main;
    cutlass::conv::Conv2dProblemSize problem_ds;
    typename Mma::IteratorA::Params iterator_A_ds;
    typename Mma::IteratorA::Element const* ptr_A_ds;
    typename Mma::IteratorB::Params iterator_B_ds;
    typename Mma::IteratorB::Element const* ptr_B_ds;
    int gemm_k_iterations_ds;
  };

  // Runs one implicit-GEMM mainloop into `accumulators`.  Everything but the accumulators
  // is recomputed from blockIdx/threadIdx per pass instead of being kept live across the
  // first mainloop: the 128 fp32 accumulators plus the pipeline already use ~254 of the
  // 255 registers, and anything else live across a pass spills.
  template <typename ParamsA, typename ParamsB>
  CUTLASS_DEVICE static void mainloop(ParamsA const& params_A, ParamsB const& params_B,
                                      cutlass::conv::Conv2dProblemSize const& problem,
                                      typename Mma::IteratorA::Element const* ptr_A,
                                      typename Mma::IteratorB::Element const* ptr_B,
                                      int gemm_k_iterations, int swizzle_log_tile,
                                      SharedStorage& shared_storage,
                                      typename Mma::FragmentC& accumulators) {
    ThreadblockSwizzle swizzle;
    const cutlass::gemm::GemmCoord tile = swizzle.get_tile_offset(swizzle_log_tile);
    const int thread_idx = threadIdx.x;
    typename Mma::IteratorA iterator_A(params_A, problem, ptr_A, thread_idx,
                                       cutlass::MatrixCoord(tile.m() * Mma::Shape::kM, 0));
    typename Mma::IteratorB iterator_B(params_B, problem, ptr_B, thread_idx,
                                       cutlass::MatrixCoord(0, tile.n() * Mma::Shape::kN));
    Mma mma(shared_storage.main_loop, thread_idx, cutlass::canonical_warp_idx_sync(),
            threadIdx.x % 32);
    mma(gemm_k_iterations, accumulators, iterator_A, iterator_B, accumulators);
  }

  CUTLASS_DEVICE
  void operator()(Params const& params, SharedStorage& shared_storage) {
    {
      ThreadblockSwizzle swizzle;
      const cutlass::gemm::GemmCoord tile = swizzle.get_tile_offset(params.main.swizzle_log_tile);
      if (params.main.grid_tiled_shape.m() <= tile.m() ||
          params.main.grid_tiled_shape.n() <= tile.n()) {
        return;
      }
    }
    typename Mma::FragmentC accumulators;
    accumulators.clear();
    mainloop(params.main.iterator_A, params.main.iterator_B, params.main.problem_size,
             params.main.ptr_A, params.main.ptr_B, params.main.gemm_k_iterations,
             params.main.swizzle_log_tile, shared_storage, accumulators);
    mainloop(params.iterator_A_ds, params.iterator_B_ds, params.problem_ds, params.ptr_A_ds,
             params.ptr_B_ds, params.gemm_k_iterations_ds, params.main.swizzle_log_tile,
             shared_storage, accumulators);

    ThreadblockSwizzle swizzle;
    const cutlass::gemm::GemmCoord tile = swizzle.get_tile_offset(params.main.swizzle_log_tile);
    const int thread_idx = threadIdx.x;
    const int warp_idx = cutlass::canonical_warp_idx_sync();
    const int lane_idx = threadIdx.x % 32;
    const cutlass::MatrixCoord offset(tile.m() * Mma::Shape::kM, tile.n() * Mma::Shape::kN);
    const auto extent = OutputParam::extent(params.main.problem_size);
    typename Epilogue::OutputTileIterator iterator_D(params.main.iterator_D, params.main.ptr_D,
                                                     extent, thread_idx, offset);
    // Never read: the output op has beta == 0.
    typename Epilogue::OutputTileIterator iterator_C(params.main.iterator_C, params.main.ptr_C,
                                                     extent, thread_idx, offset);
    typename Epilogue::TensorTileIterator tensor_iterator(params.main.params_Tensor, nullptr,
                                                          extent, thread_idx, offset);
    // The bias row is shared by every output row (ldr == 0).
    auto* bias = static_cast<typename Epilogue::ElementVector*>(params.main.ptr_Vector) +
                 offset.column();
    typename Base::EpilogueOutputOp output_op(params.main.output_op);
    Epilogue epilogue(shared_storage.epilogue, thread_idx, warp_idx, lane_idx);
    epilogue(output_op, bias, iterator_D, accumulators, iterator_C, tensor_iterator, extent,
             offset);
  }
};

// Launches cutlass::Kernel<Kernel> over a grid of `tiles` threadblock tiles.  The opt-in
// to more than 48 KiB of dynamic shared memory is set once per kernel and device rather
// than per launch (as CUTLASS's device wrapper does): it is host-side state, and setting
// it once keeps launches cheap and free of non-stream API calls during CUDA graph capture.
template <typename Kernel>
FpropError launch(const typename Kernel::Params& params, cutlass::gemm::GemmCoord tiles,
                  cudaStream_t stream) {
  constexpr int smem = static_cast<int>(sizeof(typename Kernel::SharedStorage));
  if constexpr (smem >= (48 << 10)) {
    constexpr int kMaxDevices = 64;
    static std::atomic<bool> attribute_set[kMaxDevices] = {};
    int device = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) return {"cudaGetDevice", cudaGetErrorString(err)};
    if (device >= kMaxDevices || !attribute_set[device].load(std::memory_order_acquire)) {
      err = cudaFuncSetAttribute(cutlass::Kernel<Kernel>,
                                 cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
      if (err != cudaSuccess) return {"cudaFuncSetAttribute", cudaGetErrorString(err)};
      if (device < kMaxDevices) attribute_set[device].store(true, std::memory_order_release);
    }
  }
  typename Kernel::ThreadblockSwizzle swizzle;
  const dim3 grid = swizzle.get_grid_shape(tiles);
  cutlass::Kernel<Kernel><<<grid, dim3(Kernel::kThreadCount, 1, 1), smem, stream>>>(params);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return {"launch", cudaGetErrorString(err)};
  return {};
}

template <typename Element, bool kRelu>
typename FpropKernel<Element, kRelu>::Device::Arguments fprop_arguments(const FpropProblem& p) {
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
  return typename K::Device::Arguments(
      problem, {x, Layout::packed(cutlass::Tensor4DCoord(p.N, p.H, p.W, p.C))},
      {w, Layout::packed(cutlass::Tensor4DCoord(p.K, p.R, p.S, p.C))},
      {res, Layout::packed(out_extent)}, {out, Layout::packed(out_extent)},
      typename K::OutputOp::Params(/*alpha=*/1.0f, /*beta=*/p.residual ? 1.0f : 0.0f),
      cutlass::conv::SplitKMode::kSerial,
      /*ptr_Vector=*/const_cast<float*>(p.bias),
      /*ptr_Tensor=*/nullptr,
      /*ldr=*/0,  // row stride 0: the same bias row for every output pixel
      /*ldt=*/0);
}

template <typename Element, bool kRelu>
FpropError run_fprop(const FpropProblem& p, cudaStream_t stream) {
  if (p.scale != nullptr) return {"arguments", "the CUTLASS 2.x kernels take a folded filter, not a scale"};
  using K = FpropKernel<Element, kRelu>;
  const auto args = fprop_arguments<Element, kRelu>(p);
  const cutlass::Status status = K::Device::can_implement(args);
  if (status != cutlass::Status::kSuccess) return {"can_implement", cutlassGetStatusString(status)};
  // Serial split-K with one slice: no workspace, no semaphore.
  const typename K::Kernel::Params params(args);
  return launch<typename K::Kernel>(params, params.grid_tiled_shape, stream);
}

template <typename Element, bool kRelu>
FpropError run_block_tail(const FpropProblem& main, const DownsampleProblem& ds,
                          cudaStream_t stream) {
  if (main.scale != nullptr) return {"arguments", "the CUTLASS 2.x kernels take a folded filter, not a scale"};
  using K = FpropKernel<Element, kRelu>;
  using Dual = DualFpropKernel<typename K::Kernel>;
  using Mma = typename Dual::Mma;
  const auto args = fprop_arguments<Element, kRelu>(main);
  // The downsample conv as a problem of its own: checked like any conv, and the source of
  // the second mainloop's iterator parameters.
  FpropProblem dp = main;
  dp.input = ds.input;
  dp.filter = ds.filter;
  dp.H = ds.H;
  dp.W = ds.W;
  dp.C = ds.C;
  dp.R = dp.S = 1;
  dp.pad_h = dp.pad_w = 0;
  dp.dilation_h = dp.dilation_w = 1;
  dp.stride_h = ds.stride_h;
  dp.stride_w = ds.stride_w;
  const auto ds_args = fprop_arguments<Element, kRelu>(dp);

  cutlass::Status status = K::Device::can_implement(args);
  if (status == cutlass::Status::kSuccess) status = K::Device::can_implement(ds_args);
  if (status != cutlass::Status::kSuccess) return {"can_implement", cutlassGetStatusString(status)};

  typename Dual::Params params;
  params.main = typename K::Kernel::Params(args);
  params.problem_ds = ds_args.problem_size;
  params.iterator_A_ds = Mma::IteratorA::getParams(ds_args.problem_size, ds_args.ref_A.layout());
  params.ptr_A_ds = ds_args.ref_A.data();
  params.iterator_B_ds = typename Mma::IteratorB::Params(ds_args.problem_size, ds_args.ref_B.layout());
  params.ptr_B_ds = ds_args.ref_B.data();
  params.gemm_k_iterations_ds = cutlass::conv::implicit_gemm_k_iterations(
      cutlass::conv::Operator::kFprop, Mma::Shape::kK, ds_args.problem_size);

  return launch<Dual>(params, params.main.grid_tiled_shape, stream);
}

}  // namespace fusedres::cuda
