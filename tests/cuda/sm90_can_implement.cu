// Host-only driver for tests/test_sm90a_build.py: reads conv problems from stdin, one per line
//   N H W C K R S pad_h pad_w stride_h stride_w dilation_h dilation_w P Q
// and prints, per line, CUTLASS's host-side verdict for the four sm_90a kernels (bf16/fp16 x
// ReLU/identity): "ok" or "step: status".  Linked against the kernels' object files; makes no
// CUDA call, so it runs on a machine without a GPU.
#include <cstdio>
#include <iostream>
#include <string>

#include "fprop.h"

using fusedres::cuda::FpropError;
using fusedres::cuda::FpropProblem;

static std::string verdict(const FpropError& e) {
  return e ? std::string(e.step) + ": " + e.status : std::string("ok");
}

int main() {
  FpropProblem p{};
  static char dummy[16] __attribute__((aligned(256)));
  static float bias[1] __attribute__((aligned(256)));
  while (std::cin >> p.N >> p.H >> p.W >> p.C >> p.K >> p.R >> p.S >> p.pad_h >> p.pad_w >> p.stride_h >>
         p.stride_w >> p.dilation_h >> p.dilation_w >> p.P >> p.Q) {
    // Aligned stand-in pointers: can_implement looks at alignment, never at the data.
    p.input = dummy;
    p.filter = dummy;
    p.output = dummy;
    p.residual = dummy;
    p.bias = bias;
    p.scale = bias;
    std::cout << verdict(fusedres::cuda::fprop_sm90_bf16_check(p, true)) << " | "
              << verdict(fusedres::cuda::fprop_sm90_bf16_check(p, false)) << " | "
              << verdict(fusedres::cuda::fprop_sm90_fp16_check(p, true)) << " | "
              << verdict(fusedres::cuda::fprop_sm90_fp16_check(p, false)) << "\n";
  }
  return 0;
}
