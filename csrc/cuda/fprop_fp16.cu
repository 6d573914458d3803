// The fp16 CUTLASS conv kernels (ReLU and identity epilogues), single and block tail; see fprop_impl.cuh.
#include "fprop_impl.cuh"

namespace fusedres::cuda {

FpropError fprop_fp16(const FpropProblem& p, bool relu, cudaStream_t stream) {
  return relu ? run_fprop<cutlass::half_t, true>(p, stream) : run_fprop<cutlass::half_t, false>(p, stream);
}

FpropError block_tail_fp16(const FpropProblem& main, const DownsampleProblem& ds, bool relu,
                          cudaStream_t stream) {
  return relu ? run_block_tail<cutlass::half_t, true>(main, ds, stream)
              : run_block_tail<cutlass::half_t, false>(main, ds, stream);
}

}  // namespace fusedres::cuda
