// vit_fast._C patch embedding: declarations shared by the CPU (.cpp) and CUDA (cuda/*.cu) code.
//
// The op is a non-overlapping convolution written as  out = cols @ weight2d^T + bias (+ pos_embed),
// where cols [B*Np, K] holds one patch per row in weight's (c, kh, kw) order (K = C*ph*pw) and
// weight2d = weight.view(D, K). Only the gather (images -> cols) and its transpose (cols -> image
// gradient) are device code; the GEMMs go through ATen (MKL/oneDNN on CPU, cuBLAS on CUDA), so the
// device-independent driver below is written once and takes the device's gather/scatter.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

// The op's dtypes only (fp64 would double the kernels compiled for nothing: the checks reject it).
#define VIT_FAST_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                                      \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                 \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)              \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace vit_fast {

// Sizes of one call, validated once by check_patch_embed_args.
struct PatchGeometry {
  int64_t B, C, H, W;  // logical NCHW image size (uint8 input arrives NHWC)
  int64_t ph, pw;      // patch height/width = stride
  int64_t Hp, Wp;      // patches per column/row; pixels past Hp*ph or Wp*pw are dropped, as conv2d does
  int64_t D;           // embedding dim
  int64_t num_patches() const { return Hp * Wp; }
  int64_t rows() const { return B * Hp * Wp; }
  int64_t cols() const { return C * ph * pw; }
};

// Checks every shape, dtype and device once (TORCH_CHECK, so bad input raises instead of crashing).
PatchGeometry check_patch_embed_args(const at::Tensor& images, const at::Tensor& weight,
                                     const c10::optional<at::Tensor>& bias, at::IntArrayRef patch_size,
                                     const c10::optional<at::Tensor>& pos_embed,
                                     const c10::optional<at::Tensor>& mean,
                                     const c10::optional<at::Tensor>& std);

// Per-channel mean/std of the uint8 path as raw float pointers (null for float images). Holds the
// contiguous copies for as long as the pointers are used.
struct Normalization {
  at::Tensor mean_c, std_c;
  const float* mean = nullptr;
  const float* std = nullptr;
  Normalization(const c10::optional<at::Tensor>& mean_in, const c10::optional<at::Tensor>& std_in) {
    if (mean_in.has_value()) {
      mean_c = mean_in->contiguous();
      std_c = std_in->contiguous();
      mean = mean_c.const_data_ptr<float>();
      std = std_c.const_data_ptr<float>();
    }
  }
};

// images viewed as logical [B, C, H, W] whatever its memory layout (uint8 NHWC is permuted).
at::Tensor logical_nchw(const at::Tensor& images);

// cols [B*Np, K] (contiguous, dtype of cols) <- images (logical NCHW, any strides). uint8 pixels are
// normalized as (v/255 - mean[c]) / std[c] in fp32 before the cast; mean/std are fp32 [C].
using GatherFn = void (*)(const at::Tensor& images_nchw, const PatchGeometry& g,
                          const c10::optional<at::Tensor>& mean, const c10::optional<at::Tensor>& std,
                          at::Tensor& cols);
// grad_images [B, C, H, W] (contiguous) <- cols [B*Np, K]; dropped border pixels get 0.
using ScatterFn = void (*)(const at::Tensor& cols, const PatchGeometry& g, at::Tensor& grad_images);

void gather_patches_cpu(const at::Tensor& images_nchw, const PatchGeometry& g,
                        const c10::optional<at::Tensor>& mean, const c10::optional<at::Tensor>& std,
                        at::Tensor& cols);
void scatter_patches_cpu(const at::Tensor& cols, const PatchGeometry& g, at::Tensor& grad_images);

// Device-independent drivers (gather/scatter + ATen GEMM); each op's CPU/CUDA impl is one call.
at::Tensor patch_embed_fwd_impl(const at::Tensor& images, const at::Tensor& weight,
                                const c10::optional<at::Tensor>& bias, at::IntArrayRef patch_size,
                                const c10::optional<at::Tensor>& pos_embed,
                                const c10::optional<at::Tensor>& mean,
                                const c10::optional<at::Tensor>& std, GatherFn gather);
at::Tensor patch_embed_bwd_weight_impl(const at::Tensor& grad_out, const at::Tensor& images,
                                       const at::Tensor& weight, at::IntArrayRef patch_size,
                                       const c10::optional<at::Tensor>& mean,
                                       const c10::optional<at::Tensor>& std, GatherFn gather);
at::Tensor patch_embed_bwd_images_impl(const at::Tensor& grad_out, const at::Tensor& images,
                                       const at::Tensor& weight, at::IntArrayRef patch_size,
                                       ScatterFn scatter);

}  // namespace vit_fast
