// CUDA implementations of fusedres::conv_bn_act_cuda and fusedres::block_tail_cuda
// (schemas in csrc/fusedres.cpp): input checks, BN-scale folding, batch chunking, and the
// calls into the CUTLASS kernels of fprop_{bf16,fp16}.cu (and, built with 90a and asked for with
// FUSEDRES_CUDA_SM90A=1 on an sm_90 GPU, the CUTLASS 3.x kernels of fprop_sm90_{bf16,fp16}.cu).
//
// On the sm_90a path (use_sm90a) the BN scale multiplies the fp32 accumulator in the CUTLASS 3.x
// epilogue instead, and a K-thread kernel computes the fp32 scale and shift (affine_vectors).
//
// Why the BN scale is folded into the filter instead of applied in the epilogue (2.x):
// CUTLASS 2.x's conv epilogues take alpha as a scalar (its per-channel-scaling output ops
// exist only for the 3.x collective epilogues), so act(conv(x, W) * scale + shift) runs as
// act(conv(x, W * scale) + shift).  The fold is one small kernel per call over the filter
// (W * scale in fp32, one rounding to the activation dtype) that also writes the fp32 shift,
// the epilogue's broadcast bias.  Given an eval BN's running statistics it normalises them
// itself (scale / sqrt(var + eps), shift - mean * scale), so a conv costs two launches and no
// host-side arithmetic.  Not a cache: a cache keyed on scale/shift *values* would need a
// device-to-host comparison (a sync) on every call.
//
// block_tail runs as ONE kernel (DualFpropKernel in fprop_impl.cuh): per output tile, the
// main conv's implicit GEMM and the 1x1 downsample conv's implicit GEMM accumulate into the
// same fp32 accumulators, and one epilogue adds shift + ds_shift and applies the
// activation.  Both filters are folded with their own BN scale first (two fold launches).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <string>

#include "fprop.h"

namespace fusedres::cuda {
namespace {

// A per-output-channel vector (scale, shift or BN statistics) of any float dtype, read as fp32.
struct ChannelVec {
  const void* ptr = nullptr;
  int64_t stride = 0;
  int dtype = 0;  // 0 fp32, 1 bf16, 2 fp16

  __device__ float operator[](int64_t k) const {
    const int64_t i = k * stride;
    switch (dtype) {
      case 1: return static_cast<float>(static_cast<const c10::BFloat16*>(ptr)[i]);
      case 2: return static_cast<float>(static_cast<const c10::Half*>(ptr)[i]);
      default: return static_cast<const float*>(ptr)[i];
    }
  }
};

ChannelVec channel_vec(const at::Tensor& t) {
  ChannelVec v;
  v.ptr = t.const_data_ptr();
  v.stride = t.stride(0);
  v.dtype = t.scalar_type() == at::kBFloat16 ? 1 : t.scalar_type() == at::kHalf ? 2 : 0;
  return v;
}

// The per-channel affine of one branch: out = conv * scale + shift, where with BN statistics
// (has_stats) scale/shift are the BN's weight/bias and
//   scale_eff = scale / sqrt(var + eps),  shift_eff = shift - mean * scale_eff   (fp32).
struct Affine {
  ChannelVec scale, shift, mean, var;
  float eps = 0.f;
  bool has_stats = false;

  __device__ float scale_eff(int64_t k) const {
    return has_stats ? scale[k] / sqrtf(var[k] + eps) : scale[k];
  }
  __device__ float shift_eff(int64_t k, float s) const {
    return has_stats ? shift[k] - mean[k] * s : shift[k];
  }
};

// out[k, r, s, c] (KRSC, i.e. a channels_last (K, C, R, S) tensor) = w[k, c, r, s] * scale_eff[k],
// computed in fp32 and rounded once; the first K threads also write bias[k] (= shift_eff[k],
// or += when accumulate_bias, for the block tail's second branch).  Reads `w` through its
// strides, so an NCHW or a channels_last filter both work.  One launch per branch covers
// the whole BN fold: nothing else runs on the host's behalf.
template <typename T>
__global__ void _fold_weight_kernel(const T* __restrict__ w, Affine affine, T* __restrict__ out,
                                    float* __restrict__ bias, bool accumulate_bias, int64_t total,
                                    int64_t K, int64_t C, int64_t R, int64_t S, int64_t sk,
                                    int64_t sc, int64_t sr, int64_t ss) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += step) {
    int64_t t = i;
    const int64_t c = t % C;
    t /= C;
    const int64_t s = t % S;
    t /= S;
    const int64_t r = t % R;
    const int64_t k = t / R;
    out[i] = T(static_cast<float>(w[k * sk + c * sc + r * sr + s * ss]) * affine.scale_eff(k));
    if (i < K) {
      const float b = affine.shift_eff(i, affine.scale_eff(i));
      bias[i] = accumulate_bias ? bias[i] + b : b;
    }
  }
}

template <typename T>
at::Tensor fold_weight(const at::Tensor& weight, const Affine& affine, at::Tensor& bias,
                       bool accumulate_bias, cudaStream_t stream) {
  const int64_t K = weight.size(0), C = weight.size(1), R = weight.size(2), S = weight.size(3);
  at::Tensor out =
      at::empty({K, C, R, S}, weight.options().memory_format(at::MemoryFormat::ChannelsLast));
  const int64_t total = weight.numel();
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, 4096);
  _fold_weight_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(weight.const_data_ptr()), affine, static_cast<T*>(out.mutable_data_ptr()),
      bias.mutable_data_ptr<float>(), accumulate_bias, total, K, C, R, S, weight.stride(0),
      weight.stride(1), weight.stride(2), weight.stride(3));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// scale_out[k] = scale_eff[k], shift_out[k] = shift_eff[k] (fp32): the BN affine for an epilogue
// that scales the fp32 accumulator itself (the sm_90a kernels), one launch of K threads.
__global__ void _affine_vectors_kernel(Affine affine, float* __restrict__ scale_out,
                                       float* __restrict__ shift_out, int64_t K) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k < K) {
    const float s = affine.scale_eff(k);
    scale_out[k] = s;
    shift_out[k] = affine.shift_eff(k, s);
  }
}

void affine_vectors(const Affine& affine, at::Tensor& scale_out, at::Tensor& shift_out,
                    cudaStream_t stream) {
  const int64_t K = scale_out.size(0);
  constexpr int kThreads = 256;
  _affine_vectors_kernel<<<static_cast<unsigned>((K + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      affine, scale_out.mutable_data_ptr<float>(), shift_out.mutable_data_ptr<float>(), K);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_cuda_tensor(const char* name, const at::Tensor& t, const at::Tensor& x,
                       const char* x_name) {
  TORCH_CHECK(t.is_cuda(), "fusedres cuda: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == x.device(), "fusedres cuda: ", name, " is on ", t.device(), " but ",
              x_name, " is on ", x.device());
}

void check_activation(const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 4, "fusedres cuda: ", name, " must be 4-D (N, C, H, W), got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf,
              "fusedres cuda: ", name, " must be bfloat16 or float16, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(at::MemoryFormat::ChannelsLast), "fusedres cuda: ", name,
              " must be channels_last-contiguous (x.contiguous(memory_format=torch.channels_last))");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0, "fusedres cuda: ", name,
              " data must be 16-byte aligned for 128-bit loads");
}

// Checks one conv's operands; returns the output spatial size.
std::pair<int64_t, int64_t> check_conv(const char* x_name, const at::Tensor& x,
                                       const char* w_name, const at::Tensor& weight,
                                       const char* s_name, const at::Tensor& scale,
                                       const char* b_name, const at::Tensor& shift,
                                       at::IntArrayRef stride, at::IntArrayRef padding,
                                       at::IntArrayRef dilation, int64_t groups) {
  check_activation(x_name, x);
  check_cuda_tensor(x_name, x, x, x_name);
  check_cuda_tensor(w_name, weight, x, x_name);
  check_cuda_tensor(s_name, scale, x, x_name);
  check_cuda_tensor(b_name, shift, x, x_name);
  TORCH_CHECK(weight.dim() == 4, "fusedres cuda: ", w_name, " must be 4-D (K, C, R, S), got ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "fusedres cuda: ", w_name, " dtype ",
              weight.scalar_type(), " does not match ", x_name, " dtype ", x.scalar_type());
  TORCH_CHECK(groups == 1, "fusedres cuda: groups must be 1 (grouped conv is not implemented), got ",
              groups);
  TORCH_CHECK(weight.size(1) == x.size(1), "fusedres cuda: ", w_name, " expects ",
              weight.size(1), " input channels but ", x_name, " has ", x.size(1));
  const int64_t K = weight.size(0);
  TORCH_CHECK(x.size(1) % kAlignment == 0 && K % kAlignment == 0, "fusedres cuda: in/out channels (",
              x.size(1), ", ", K, ") must be multiples of ", kAlignment,
              " for the kernels' 128-bit accesses");
  TORCH_CHECK(weight.size(2) <= kMaxFilterSize && weight.size(3) <= kMaxFilterSize,
              "fusedres cuda: ", w_name, " spatial size must be at most ", kMaxFilterSize,
              ", got ", weight.sizes());
  for (const auto& [n, v] : {std::pair{s_name, &scale}, std::pair{b_name, &shift}}) {
    TORCH_CHECK(v->dim() == 1 && v->size(0) == K, "fusedres cuda: ", n, " must have shape (", K,
                ",), got ", v->sizes());
    TORCH_CHECK(v->scalar_type() == at::kFloat || v->scalar_type() == x.scalar_type(),
                "fusedres cuda: ", n, " must be float32 or ", x.scalar_type(), ", got ",
                v->scalar_type());
  }
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "fusedres cuda: stride, padding and dilation must have 2 elements");
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1 && dilation[0] >= 1 && dilation[1] >= 1 &&
                  padding[0] >= 0 && padding[1] >= 0,
              "fusedres cuda: invalid stride=", stride, " padding=", padding,
              " dilation=", dilation);
  const int64_t P =
      (x.size(2) + 2 * padding[0] - dilation[0] * (weight.size(2) - 1) - 1) / stride[0] + 1;
  const int64_t Q =
      (x.size(3) + 2 * padding[1] - dilation[1] * (weight.size(3) - 1) - 1) / stride[1] + 1;
  TORCH_CHECK(P >= 1 && Q >= 1, "fusedres cuda: ", x_name, " spatial size ",
              x.sizes().slice(2), " is too small for this kernel/padding");
  return {P, Q};
}

// CUTLASS's iterators use 32-bit offsets and refuse tensors of 2 GiB or more, so the batch
// is split into chunks under that size.  channels_last tensors are contiguous per sample,
// so a chunk is a pointer offset (no copies).  Returns the samples per chunk.
int64_t batch_chunk(std::initializer_list<const at::Tensor*> per_sample_tensors,
                    const at::Tensor& filter) {
  constexpr int64_t kMaxBytes = (int64_t{1} << 31) - 1;
  int64_t per_sample = 0, N = 0;
  for (const at::Tensor* t : per_sample_tensors) {
    N = t->size(0);
    per_sample = std::max(per_sample, t->numel() / N * t->element_size());
  }
  TORCH_CHECK(per_sample <= kMaxBytes && filter.numel() * filter.element_size() <= kMaxBytes,
              "fusedres cuda: one sample or the filter is 2 GiB or larger, beyond the "
              "kernels' 32-bit offsets");
  return std::max<int64_t>(1, std::min<int64_t>(N, kMaxBytes / per_sample));
}

// Pointer to sample n0 of a channels_last (or any per-sample contiguous) tensor.
const void* sample_ptr(const at::Tensor& t, int64_t n0) {
  return static_cast<const char*>(t.const_data_ptr()) + n0 * (t.numel() / t.size(0)) * t.element_size();
}

FpropProblem conv_problem(const at::Tensor& x, const at::Tensor& filter, const at::Tensor& bias,
                          const at::Tensor& out, at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation) {
  FpropProblem p;
  p.filter = filter.const_data_ptr();
  p.bias = bias.const_data_ptr<float>();
  p.residual = nullptr;
  p.H = static_cast<int>(x.size(2));
  p.W = static_cast<int>(x.size(3));
  p.C = static_cast<int>(x.size(1));
  p.K = static_cast<int>(filter.size(0));
  p.R = static_cast<int>(filter.size(2));
  p.S = static_cast<int>(filter.size(3));
  p.P = static_cast<int>(out.size(2));
  p.Q = static_cast<int>(out.size(3));
  p.pad_h = static_cast<int>(padding[0]);
  p.pad_w = static_cast<int>(padding[1]);
  p.stride_h = static_cast<int>(stride[0]);
  p.stride_w = static_cast<int>(stride[1]);
  p.dilation_h = static_cast<int>(dilation[0]);
  p.dilation_w = static_cast<int>(dilation[1]);
  return p;
}

void check_cutlass(const FpropError& err, const FpropProblem& p) {
  TORCH_CHECK(!err, "fusedres cuda: CUTLASS conv failed at ", err.step, ": ", err.status,
              " (N=", p.N, " C=", p.C, " H=", p.H, " W=", p.W, " K=", p.K, " R=", p.R,
              " S=", p.S, ")");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Whether this conv takes the sm_90a kernels (fprop_sm90.cuh): built in (FUSEDRES_CUDA_ARCHS
// with 90a), asked for (FUSEDRES_CUDA_SM90A=1, or =require, which makes a conv they refuse an
// error instead of a fall-back, for the device check; read once: they have not run on a GPU yet,
// so nothing selects them by default) and an sm_90 device (sm_90a SASS runs on compute
// capability 9.0 only).  The device's capability is looked up once per device.
enum class Sm90a { kOff, kOn, kRequired };

Sm90a sm90a_mode() {
  static const Sm90a mode = [] {
    const char* v = std::getenv("FUSEDRES_CUDA_SM90A");
    const std::string s = v != nullptr ? v : "";
    return s == "1" ? Sm90a::kOn : s == "require" ? Sm90a::kRequired : Sm90a::kOff;
  }();
  return mode;
}

bool use_sm90a(const at::Tensor& x) {
#ifdef FUSEDRES_HAVE_SM90A
  if (sm90a_mode() == Sm90a::kOff) {
    return false;
  }
  constexpr int kMaxDevices = 64;
  static std::array<std::atomic<int8_t>, kMaxDevices> is_sm90{};  // 0 unknown, 1 yes, 2 no
  const int dev = x.get_device();
  if (dev < 0 || dev >= kMaxDevices) {
    return false;
  }
  int8_t known = is_sm90[dev].load(std::memory_order_relaxed);
  if (known == 0) {
    int major = 0, minor = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
    known = (major == 9 && minor == 0) ? 1 : 2;
    is_sm90[dev].store(known, std::memory_order_relaxed);
  }
  TORCH_CHECK(known == 1 || sm90a_mode() != Sm90a::kRequired,
              "fusedres cuda: FUSEDRES_CUDA_SM90A=require, but device ", dev, " is not compute capability 9.0");
  return known == 1;
#else
  (void)x;
  TORCH_CHECK(sm90a_mode() != Sm90a::kRequired,
              "fusedres cuda: FUSEDRES_CUDA_SM90A=require, but this build has no sm_90a kernels "
              "(build with FUSEDRES_CUDA_ARCHS=\"80;90a\")");
  return false;
#endif
}

// One conv launch: the sm_90a kernel when `sm90a` (the caller has checked that it takes the
// problem: sm90a_takes), else the CUTLASS 2.x kernel.
FpropError fprop(const FpropProblem& p, bool bf16, bool relu, cudaStream_t stream, bool sm90a) {
#ifdef FUSEDRES_HAVE_SM90A
  if (sm90a) {
    return bf16 ? fprop_sm90_bf16(p, relu, stream) : fprop_sm90_fp16(p, relu, stream);
  }
#else
  TORCH_CHECK(!sm90a, "fusedres cuda: this build has no sm_90a kernels");
#endif
  return bf16 ? fprop_bf16(p, relu, stream) : fprop_fp16(p, relu, stream);
}

// One conv through the CUTLASS kernel, writing `out` (channels_last (N, K, P, Q)).
// `filter` is the folded KRSC filter, `bias` the fp32 shift.
void run_conv(const at::Tensor& x, const at::Tensor& filter, const at::Tensor& bias, const float* scale,
              const c10::optional<at::Tensor>& residual, at::Tensor& out, at::IntArrayRef stride,
              at::IntArrayRef padding, at::IntArrayRef dilation, bool relu, cudaStream_t stream,
              bool sm90a) {
  const int64_t N = x.size(0);
  const int64_t chunk = batch_chunk({&x, &out}, filter);
  FpropProblem p = conv_problem(x, filter, bias, out, stride, padding, dilation);
  p.scale = scale;
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    p.N = static_cast<int>(std::min(chunk, N - n0));
    p.input = sample_ptr(x, n0);
    p.residual = residual ? sample_ptr(*residual, n0) : nullptr;
    p.output = const_cast<void*>(sample_ptr(out, n0));
    check_cutlass(fprop(p, x.scalar_type() == at::kBFloat16, relu, stream, sm90a), p);
  }
}

// Whether the sm_90a kernel takes this conv, for every batch chunk run_conv will launch
// (host-side checks only: CUTLASS's can_implement, TMA's alignment and extent limits).
bool sm90a_takes(const at::Tensor& x, const at::Tensor& filter, const at::Tensor& bias,
                 const at::Tensor& scale, const c10::optional<at::Tensor>& residual, const at::Tensor& out,
                 at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool relu) {
#ifdef FUSEDRES_HAVE_SM90A
  const int64_t N = x.size(0);
  const int64_t chunk = batch_chunk({&x, &out}, filter);
  FpropProblem p = conv_problem(x, filter, bias, out, stride, padding, dilation);
  p.scale = scale.const_data_ptr<float>();
  p.input = x.const_data_ptr();
  p.output = const_cast<void*>(out.const_data_ptr());
  p.residual = residual ? residual->const_data_ptr() : nullptr;
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  for (const int64_t n : {std::min(chunk, N), N % chunk}) {
    if (n == 0) continue;
    p.N = static_cast<int>(n);
    if (bf16 ? fprop_sm90_bf16_check(p, relu) : fprop_sm90_fp16_check(p, relu)) return false;
  }
  return true;
#else
  (void)x, (void)filter, (void)bias, (void)scale, (void)residual, (void)out, (void)stride, (void)padding,
      (void)dilation, (void)relu;
  return false;
#endif
}

// The fused block tail: act(conv(y, filter) + conv1x1(x, ds_filter, ds_stride) + bias).
void run_block_tail(const at::Tensor& y, const at::Tensor& filter, const at::Tensor& x,
                    const at::Tensor& ds_filter, const at::Tensor& bias, at::Tensor& out,
                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                    at::IntArrayRef ds_stride, bool relu, cudaStream_t stream) {
  const int64_t N = y.size(0);
  const int64_t chunk =
      std::min(batch_chunk({&y, &out}, filter), batch_chunk({&x, &out}, ds_filter));
  FpropProblem p = conv_problem(y, filter, bias, out, stride, padding, dilation);
  DownsampleProblem d;
  d.filter = ds_filter.const_data_ptr();
  d.H = static_cast<int>(x.size(2));
  d.W = static_cast<int>(x.size(3));
  d.C = static_cast<int>(x.size(1));
  d.stride_h = static_cast<int>(ds_stride[0]);
  d.stride_w = static_cast<int>(ds_stride[1]);
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    p.N = static_cast<int>(std::min(chunk, N - n0));
    p.input = sample_ptr(y, n0);
    p.output = const_cast<void*>(sample_ptr(out, n0));
    d.input = sample_ptr(x, n0);
    check_cutlass(y.scalar_type() == at::kBFloat16 ? block_tail_bf16(p, d, relu, stream)
                                                   : block_tail_fp16(p, d, relu, stream),
                  p);
  }
}

// The affine of one branch; checks the optional BN statistics like scale/shift.
Affine make_affine(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                   const c10::optional<at::Tensor>& mean, const c10::optional<at::Tensor>& var,
                   double eps, const char* prefix) {
  TORCH_CHECK(mean.has_value() == var.has_value(), "fusedres cuda: ", prefix, "mean and ", prefix,
              "var must be given together");
  Affine a;
  a.scale = channel_vec(scale);
  a.shift = channel_vec(shift);
  if (mean) {
    const int64_t K = scale.size(0);
    for (const auto& [n, v] : {std::pair{"mean", &*mean}, std::pair{"var", &*var}}) {
      check_cuda_tensor(n, *v, x, "x");
      TORCH_CHECK(v->dim() == 1 && v->size(0) == K, "fusedres cuda: ", prefix, n,
                  " must have shape (", K, ",), got ", v->sizes());
      TORCH_CHECK(v->scalar_type() == at::kFloat || v->scalar_type() == x.scalar_type(),
                  "fusedres cuda: ", prefix, n, " must be float32 or ", x.scalar_type(), ", got ",
                  v->scalar_type());
    }
    TORCH_CHECK(eps >= 0, "fusedres cuda: ", prefix, "eps must be non-negative, got ", eps);
    a.mean = channel_vec(*mean);
    a.var = channel_vec(*var);
    a.eps = static_cast<float>(eps);
    a.has_stats = true;
  }
  return a;
}

at::Tensor fold(const at::Tensor& weight, const Affine& affine, at::Tensor& bias, bool accumulate,
                cudaStream_t stream) {
  return weight.scalar_type() == at::kBFloat16
             ? fold_weight<c10::BFloat16>(weight, affine, bias, accumulate, stream)
             : fold_weight<c10::Half>(weight, affine, bias, accumulate, stream);
}

// The epilogue's fp32 bias.  Its 8-wide fp32 loads need 32-byte alignment, which the caching
// allocator's 512-byte blocks give; checked, since a pluggable allocator need not.
at::Tensor new_bias(const at::Tensor& x, int64_t K) {
  at::Tensor bias = at::empty({K}, x.options().dtype(at::kFloat));
  TORCH_CHECK(reinterpret_cast<uintptr_t>(bias.const_data_ptr()) % 32 == 0,
              "fusedres cuda: the allocator returned a bias buffer that is not 32-byte aligned");
  return bias;
}

at::Tensor new_output(const at::Tensor& x, int64_t K, int64_t P, int64_t Q) {
  return at::empty({x.size(0), K, P, Q}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
}

at::Tensor conv_bn_act_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                            const at::Tensor& shift, const c10::optional<at::Tensor>& residual,
                            const c10::optional<at::Tensor>& mean,
                            const c10::optional<at::Tensor>& var, double eps,
                            at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t groups, bool relu) {
  const auto [P, Q] = check_conv("x", x, "weight", weight, "scale", scale, "shift", shift, stride,
                                 padding, dilation, groups);
  const int64_t K = weight.size(0);
  if (residual) {
    check_activation("residual", *residual);
    check_cuda_tensor("residual", *residual, x, "x");
    TORCH_CHECK(residual->scalar_type() == x.scalar_type(), "fusedres cuda: residual dtype ",
                residual->scalar_type(), " does not match x dtype ", x.scalar_type());
    TORCH_CHECK(residual->sizes() == at::IntArrayRef({x.size(0), K, P, Q}),
                "fusedres cuda: residual must have the output's shape (", x.size(0), ", ", K,
                ", ", P, ", ", Q, "), got ", residual->sizes());
  }
  const Affine affine = make_affine(x, scale, shift, mean, var, eps, "");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = new_output(x, K, P, Q);
  if (x.size(0) == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  at::Tensor bias = new_bias(x, K);
  if (use_sm90a(x)) {
    // The sm_90a epilogue applies the BN affine to the fp32 accumulator: the filter as it is
    // (KRSC), the fp32 scale and shift from one K-thread launch.
    const at::Tensor filter = weight.contiguous(at::MemoryFormat::ChannelsLast);
    at::Tensor scale_v = new_bias(x, K);
    if (sm90a_takes(x, filter, bias, scale_v, residual, out, stride, padding, dilation, relu)) {
      affine_vectors(affine, scale_v, bias, stream);
      run_conv(x, filter, bias, scale_v.const_data_ptr<float>(), residual, out, stride, padding, dilation, relu,
               stream, /*sm90a=*/true);
      return out;
    }
    TORCH_CHECK(sm90a_mode() != Sm90a::kRequired, "fusedres cuda: FUSEDRES_CUDA_SM90A=require, but the sm_90a ",
                "kernel refuses this conv (N=", x.size(0), " C=", x.size(1), " H=", x.size(2), " W=", x.size(3),
                " K=", K, " kernel ", weight.sizes().slice(2), " stride ", stride, " padding ", padding,
                " dilation ", dilation, ")");
  }
  const at::Tensor filter = fold(weight, affine, bias, false, stream);
  run_conv(x, filter, bias, nullptr, residual, out, stride, padding, dilation, relu, stream, /*sm90a=*/false);
  return out;
}

at::Tensor block_tail_cuda(const at::Tensor& y, const at::Tensor& weight, const at::Tensor& scale,
                           const at::Tensor& shift, const at::Tensor& x,
                           const at::Tensor& ds_weight, const at::Tensor& ds_scale,
                           const at::Tensor& ds_shift, const c10::optional<at::Tensor>& mean,
                           const c10::optional<at::Tensor>& var, double eps,
                           const c10::optional<at::Tensor>& ds_mean,
                           const c10::optional<at::Tensor>& ds_var, double ds_eps,
                           at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation, int64_t groups, at::IntArrayRef ds_stride,
                           bool relu) {
  const auto [P, Q] = check_conv("y", y, "weight", weight, "scale", scale, "shift", shift, stride,
                                 padding, dilation, groups);
  const int64_t ds_pad[2] = {0, 0}, ds_dil[2] = {1, 1};
  TORCH_CHECK(ds_weight.dim() == 4 && ds_weight.size(2) == 1 && ds_weight.size(3) == 1,
              "fusedres cuda: ds_weight must be a 1x1 kernel (K, C, 1, 1), got ",
              ds_weight.sizes());
  const auto [dP, dQ] = check_conv("x", x, "ds_weight", ds_weight, "ds_scale", ds_scale,
                                   "ds_shift", ds_shift, ds_stride, ds_pad, ds_dil, 1);
  check_cuda_tensor("x", x, y, "y");
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "fusedres cuda: x dtype ", x.scalar_type(),
              " does not match y dtype ", y.scalar_type());
  TORCH_CHECK(x.size(0) == y.size(0), "fusedres cuda: x batch ", x.size(0),
              " does not match y batch ", y.size(0));
  const int64_t K = weight.size(0);
  TORCH_CHECK(ds_weight.size(0) == K, "fusedres cuda: ds_weight has ", ds_weight.size(0),
              " output channels but weight has ", K);
  TORCH_CHECK(P == dP && Q == dQ, "fusedres cuda: main branch output ", P, "x", Q,
              " and downsample output ", dP, "x", dQ, " differ; check ds_stride");
  const Affine affine = make_affine(y, scale, shift, mean, var, eps, "");
  const Affine ds_affine = make_affine(y, ds_scale, ds_shift, ds_mean, ds_var, ds_eps, "ds_");
  const c10::cuda::CUDAGuard guard(y.device());
  at::Tensor out = new_output(y, K, P, Q);
  if (y.size(0) == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(y.device().index()).stream();
  // bias = shift_eff + ds_shift_eff: the second fold accumulates into the first's output.
  at::Tensor bias = new_bias(y, K);
  const at::Tensor filter = fold(weight, affine, bias, false, stream);
  const at::Tensor ds_filter = fold(ds_weight, ds_affine, bias, true, stream);
  run_block_tail(y, filter, x, ds_filter, bias, out, stride, padding, dilation, ds_stride, relu,
                 stream);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedres, CUDA, m) {
  m.impl("conv_bn_act_cuda", &conv_bn_act_cuda);
  m.impl("block_tail_cuda", &block_tail_cuda);
}

}  // namespace fusedres::cuda
