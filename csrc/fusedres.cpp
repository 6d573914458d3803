// The fusedres::*_cuda operator schemas and the Python module stub for fusedres._C.
//
// Importing fusedres._C loads this shared library, whose static initialisers register
// the schemas below and (ops.cu) their CUDA implementations with the dispatcher; the
// fake (meta) implementations are registered from Python in fusedres/backends/cuda.py.
// There is no pybind: the module object is empty, everything goes through torch.ops.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Called by `import fusedres._C`; the import only has to load the library.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "fusedres CUDA kernels, exposed as torch.ops.fusedres.*", -1,
      nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fusedres, m) {
  // act(conv2d(x, weight) * scale[k] + shift[k] (+ residual)); x and residual channels_last,
  // bf16/fp16; output channels_last (N, K, P, Q).  With mean/var (an eval BatchNorm's running
  // statistics) scale/shift are its weight/bias: (conv - mean) * scale / sqrt(var + eps) + shift.
  m.def(
      "conv_bn_act_cuda(Tensor x, Tensor weight, Tensor scale, Tensor shift, Tensor? residual, "
      "Tensor? mean, Tensor? var, float eps, int[2] stride, int[2] padding, int[2] dilation, "
      "int groups, bool relu) -> Tensor");
  // act(conv2d(y, weight) * scale + shift + conv2d_1x1(x, ds_weight, ds_stride) * ds_scale
  //     + ds_shift); same layout rules.
  m.def(
      "block_tail_cuda(Tensor y, Tensor weight, Tensor scale, Tensor shift, Tensor x, "
      "Tensor ds_weight, Tensor ds_scale, Tensor ds_shift, Tensor? mean, Tensor? var, float eps, "
      "Tensor? ds_mean, Tensor? ds_var, float ds_eps, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, int[2] ds_stride, bool relu) -> Tensor");
}
