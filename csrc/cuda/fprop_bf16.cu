// The bf16 CUTLASS conv kernels (ReLU and identity epilogues); see fprop_impl.cuh.
#include "fprop_impl.cuh"

namespace fusedres::cuda {

FpropError fprop_bf16(const FpropProblem& p, bool relu, cudaStream_t stream) {
  return relu ? run_fprop<cutlass::bfloat16_t, true>(p, stream) : run_fprop<cutlass::bfloat16_t, false>(p, stream);
}

}  // namespace fusedres::cuda
