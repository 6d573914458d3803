// The fp16 sm_90a conv kernels (ReLU and identity epilogues); see fprop_sm90.cuh.
#include "fprop_sm90.cuh"

namespace fusedres::cuda {

FpropError fprop_sm90_fp16(const FpropProblem& p, bool relu, cudaStream_t stream) {
  return relu ? sm90::run_fprop<cutlass::half_t, true>(p, stream) : sm90::run_fprop<cutlass::half_t, false>(p, stream);
}

FpropError fprop_sm90_fp16_check(const FpropProblem& p, bool relu) {
  return relu ? sm90::check_fprop<cutlass::half_t, true>(p) : sm90::check_fprop<cutlass::half_t, false>(p);
}

}  // namespace fusedres::cuda
