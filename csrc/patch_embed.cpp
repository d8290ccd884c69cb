// vit_fast._C: schemas of the patch-embed ops, their argument checks, the device-independent
// drivers, and the CPU gather/scatter (OpenMP through at::parallel_for).
//
//   patch_embed_fwd(images, weight, bias?, patch_size, pos_embed?, mean?, std?) -> [B, Np, D]
//   patch_embed_bwd_images(grad_out, images, weight, patch_size)              -> [B, C, H, W]
//   patch_embed_bwd_weight(grad_out, images, weight, patch_size, mean?, std?) -> [D, C, ph, pw]
// Bias and pos_embed gradients are plain reductions of grad_out, done in Python.
#include "patch_embed.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/library.h>

#include <cstring>

namespace vit_fast {

PatchGeometry check_patch_embed_args(const at::Tensor& images, const at::Tensor& weight,
                                     const c10::optional<at::Tensor>& bias, at::IntArrayRef patch_size,
                                     const c10::optional<at::Tensor>& pos_embed,
                                     const c10::optional<at::Tensor>& mean,
                                     const c10::optional<at::Tensor>& std) {
  TORCH_CHECK(images.dim() == 4, "patch_embed: images must be 4-D, got ", images.dim(), "-D");
  TORCH_CHECK(weight.dim() == 4, "patch_embed: weight must be [D, C, ph, pw], got ", weight.sizes());
  TORCH_CHECK(patch_size.size() == 2, "patch_embed: patch_size must be (ph, pw), got ", patch_size);
  const bool u8 = images.scalar_type() == at::kByte;
  const auto wdt = weight.scalar_type();
  TORCH_CHECK(wdt == at::kFloat || wdt == at::kHalf || wdt == at::kBFloat16,
              "patch_embed: weight must be float32, float16 or bfloat16, got ", wdt);
  TORCH_CHECK(u8 || images.scalar_type() == wdt, "patch_embed: images must be uint8 or have weight's dtype ",
              wdt, ", got ", images.scalar_type());

  PatchGeometry g;
  g.B = images.size(0);
  g.C = u8 ? images.size(3) : images.size(1);
  g.H = u8 ? images.size(1) : images.size(2);
  g.W = u8 ? images.size(2) : images.size(3);
  g.ph = patch_size[0];
  g.pw = patch_size[1];
  g.D = weight.size(0);
  TORCH_CHECK(g.ph > 0 && g.pw > 0, "patch_embed: patch_size must be positive, got ", patch_size);
  TORCH_CHECK(g.C > 0, "patch_embed: images have no channels");
  TORCH_CHECK(weight.size(1) == g.C && weight.size(2) == g.ph && weight.size(3) == g.pw,
              "patch_embed: weight must be [D, ", g.C, ", ", g.ph, ", ", g.pw, "], got ", weight.sizes());
  TORCH_CHECK(g.H >= g.ph && g.W >= g.pw, "patch_embed: image ", g.H, "x", g.W,
              " is smaller than one patch ", g.ph, "x", g.pw);
  g.Hp = g.H / g.ph;
  g.Wp = g.W / g.pw;

  const auto dev = images.device();
  TORCH_CHECK(weight.device() == dev, "patch_embed: weight is on ", weight.device(), ", images on ", dev);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == g.D, "patch_embed: bias must be [", g.D, "], got ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == wdt && bias->device() == dev,
                "patch_embed: bias must have weight's dtype and device");
  }
  if (pos_embed.has_value()) {
    TORCH_CHECK(pos_embed->dim() == 3 && pos_embed->size(0) == 1 && pos_embed->size(1) == g.num_patches() &&
                    pos_embed->size(2) == g.D,
                "patch_embed: pos_embed must be [1, ", g.num_patches(), ", ", g.D, "], got ", pos_embed->sizes());
    TORCH_CHECK(pos_embed->scalar_type() == wdt && pos_embed->device() == dev,
                "patch_embed: pos_embed must have weight's dtype and device");
  }
  TORCH_CHECK(u8 == (mean.has_value() && std.has_value()) && mean.has_value() == std.has_value(),
              "patch_embed: mean and std are required with uint8 images and only with them");
  if (u8) {
    for (const auto* t : {&*mean, &*std}) {
      TORCH_CHECK(t->dim() == 1 && t->size(0) == g.C && t->scalar_type() == at::kFloat && t->device() == dev,
                  "patch_embed: mean/std must be float32 [", g.C, "] on ", dev, ", got ", t->scalar_type(), " ",
                  t->sizes(), " on ", t->device());
    }
  }
  return g;
}

at::Tensor logical_nchw(const at::Tensor& images) {
  return images.scalar_type() == at::kByte ? images.permute({0, 3, 1, 2}) : images;
}

namespace {

// One pixel into the cols dtype; uint8 is normalized in fp32 first, exactly as the reference does.
template <typename in_t, typename out_t>
struct Convert {
  const float* mean;
  const float* std;
  out_t operator()(in_t v, int64_t) const { return static_cast<out_t>(v); }
};
template <typename out_t>
struct Convert<uint8_t, out_t> {
  const float* mean;
  const float* std;
  out_t operator()(uint8_t v, int64_t c) const {
    return static_cast<out_t>((static_cast<float>(v) / 255.0f - mean[c]) / std[c]);
  }
};

// cols[(b*Hp + hp)*Wp + wp, (c*ph + kh)*pw + kw] = convert(img[b, c, hp*ph + kh, wp*pw + kw])
//   img: logical [B, C, H, W], any element strides;  cols: [B*Hp*Wp, C*ph*pw] contiguous.
template <typename in_t, typename out_t>
void gather_cpu_kernel(const at::Tensor& img, const PatchGeometry& g, const float* mean, const float* std,
                       out_t* cols) {
  const in_t* src = img.const_data_ptr<in_t>();
  const int64_t sB = img.stride(0), sC = img.stride(1), sH = img.stride(2), sW = img.stride(3);
  const int64_t K = g.cols(), ph = g.ph, pw = g.pw, Wp = g.Wp;
  const Convert<in_t, out_t> cvt{mean, std};
  // One task = one row of patches (b, hp): it reads ph image rows per channel front to back and
  // fills Wp rows of cols (Wp*K elements, L2-sized), so both sides stream.
  at::parallel_for(0, g.B * g.Hp, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / g.Hp, hp = bh % g.Hp;
      out_t* dst_rows = cols + bh * Wp * K;
      for (int64_t c = 0; c < g.C; ++c) {
        for (int64_t kh = 0; kh < ph; ++kh) {
          const in_t* line = src + b * sB + c * sC + (hp * ph + kh) * sH;
          out_t* dst = dst_rows + (c * ph + kh) * pw;
          if (sW == 1) {  // unit stride: lets the compiler vectorize the copy/convert
            for (int64_t wp = 0; wp < Wp; ++wp, dst += K, line += pw) {
              for (int64_t kw = 0; kw < pw; ++kw) dst[kw] = cvt(line[kw], c);
            }
          } else {
            for (int64_t wp = 0; wp < Wp; ++wp, dst += K) {
              for (int64_t kw = 0; kw < pw; ++kw) dst[kw] = cvt(line[(wp * pw + kw) * sW], c);
            }
          }
        }
      }
    }
  });
}

// out[b, c, h, w] = cols[(b*Hp + h/ph)*Wp + w/pw, (c*ph + h%ph)*pw + w%pw], 0 outside the Hp*ph x Wp*pw
// area.  cols: [B*Hp*Wp, C*ph*pw] contiguous;  out: [B, C, H, W] contiguous.
template <typename scalar_t>
void scatter_cpu_kernel(const scalar_t* cols, const PatchGeometry& g, scalar_t* out) {
  const int64_t K = g.cols(), ph = g.ph, pw = g.pw, covered_w = g.Wp * g.pw;
  // One task = one image row (b, c, h) of the contiguous gradient: every element written once.
  at::parallel_for(0, g.B * g.C * g.H, 16, [&](int64_t begin, int64_t end) {
    for (int64_t bch = begin; bch < end; ++bch) {
      const int64_t h = bch % g.H, bc = bch / g.H, c = bc % g.C, b = bc / g.C;
      scalar_t* dst = out + bch * g.W;
      if (h >= g.Hp * ph) {
        std::fill(dst, dst + g.W, scalar_t(0));
        continue;
      }
      const int64_t hp = h / ph, kh = h % ph;
      const scalar_t* src = cols + (b * g.Hp + hp) * g.Wp * K + (c * ph + kh) * pw;
      for (int64_t wp = 0; wp < g.Wp; ++wp, src += K, dst += pw) std::memcpy(dst, src, pw * sizeof(scalar_t));
      std::fill(dst, dst + (g.W - covered_w), scalar_t(0));
    }
  });
}

}  // namespace

void gather_patches_cpu(const at::Tensor& images_nchw, const PatchGeometry& g,
                        const c10::optional<at::Tensor>& mean, const c10::optional<at::Tensor>& std,
                        at::Tensor& cols) {
  const Normalization norm(mean, std);
  const float* m = norm.mean;
  const float* s = norm.std;
  VIT_FAST_DISPATCH_FLOAT_TYPES(cols.scalar_type(), "patch_gather_cpu", [&] {
    using out_t = scalar_t;
    if (images_nchw.scalar_type() == at::kByte) {
      gather_cpu_kernel<uint8_t, out_t>(images_nchw, g, m, s, cols.data_ptr<out_t>());
    } else {
      gather_cpu_kernel<out_t, out_t>(images_nchw, g, m, s, cols.data_ptr<out_t>());
    }
  });
}

void scatter_patches_cpu(const at::Tensor& cols, const PatchGeometry& g, at::Tensor& grad_images) {
  VIT_FAST_DISPATCH_FLOAT_TYPES(cols.scalar_type(), "patch_scatter_cpu", [&] {
    scatter_cpu_kernel<scalar_t>(cols.const_data_ptr<scalar_t>(), g, grad_images.data_ptr<scalar_t>());
  });
}

namespace {

at::Tensor gather(const at::Tensor& images, const PatchGeometry& g, const c10::optional<at::Tensor>& mean,
                  const c10::optional<at::Tensor>& std, at::ScalarType dtype, GatherFn fn) {
  at::Tensor cols = at::empty({g.rows(), g.cols()}, images.options().dtype(dtype));
  if (cols.numel() > 0) fn(logical_nchw(images), g, mean, std, cols);
  return cols;
}

// grad_out [B, Np, D] as the [B*Np, D] matrix the GEMMs need (a copy only if it is not viewable).
at::Tensor grad_matrix(const at::Tensor& grad_out, const PatchGeometry& g) {
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == g.B && grad_out.size(1) == g.num_patches() &&
                  grad_out.size(2) == g.D,
              "patch_embed backward: grad_out must be [", g.B, ", ", g.num_patches(), ", ", g.D, "], got ",
              grad_out.sizes());
  return grad_out.reshape({g.rows(), g.D});
}

}  // namespace

at::Tensor patch_embed_fwd_impl(const at::Tensor& images, const at::Tensor& weight,
                                const c10::optional<at::Tensor>& bias, at::IntArrayRef patch_size,
                                const c10::optional<at::Tensor>& pos_embed,
                                const c10::optional<at::Tensor>& mean,
                                const c10::optional<at::Tensor>& std, GatherFn fn) {
  const PatchGeometry g = check_patch_embed_args(images, weight, bias, patch_size, pos_embed, mean, std);
  const at::Tensor cols = gather(images, g, mean, std, weight.scalar_type(), fn);
  if (g.rows() == 0 || g.D == 0) return at::empty({g.B, g.num_patches(), g.D}, weight.options());
  at::Tensor out;
  if (images.is_cpu()) {
    // cols [B*Np, K] is the channels_last memory of a [B, K, Hp, Wp] image and the output
    // [B*Np, D] that of a [B, D, Hp, Wp] one, so the GEMM is a 1x1 convolution, which ATen hands
    // to oneDNN's JIT kernels (AVX-512 where present). MKL's sgemm, which at::addmm uses for fp32,
    // takes its AVX2 path on AMD CPUs and was about 2.4x slower than this on the benchmark's machine.
    const at::Tensor x = cols.view({g.B, g.Hp, g.Wp, g.cols()}).permute({0, 3, 1, 2});
    const at::Tensor y = at::conv2d(x, weight.reshape({g.D, g.cols(), 1, 1}), bias);
    out = y.permute({0, 2, 3, 1}).reshape({g.B, g.num_patches(), g.D});  // a view when y is channels_last
  } else {
    const at::Tensor w2d = weight.reshape({g.D, g.cols()});
    out = (bias.has_value() ? at::addmm(*bias, cols, w2d.t()) : at::mm(cols, w2d.t()))
              .view({g.B, g.num_patches(), g.D});
  }
  // Added after the bias-fused GEMM and rounded there, as the reference (conv2d, then + pos_embed) does.
  if (pos_embed.has_value()) out.add_(*pos_embed);
  return out;
}

at::Tensor patch_embed_bwd_weight_impl(const at::Tensor& grad_out, const at::Tensor& images,
                                       const at::Tensor& weight, at::IntArrayRef patch_size,
                                       const c10::optional<at::Tensor>& mean,
                                       const c10::optional<at::Tensor>& std, GatherFn fn) {
  const PatchGeometry g = check_patch_embed_args(images, weight, c10::nullopt, patch_size, c10::nullopt, mean, std);
  TORCH_CHECK(grad_out.scalar_type() == weight.scalar_type() && grad_out.device() == images.device(),
              "patch_embed backward: grad_out must have weight's dtype and images' device");
  const at::Tensor go = grad_matrix(grad_out, g);
  const at::Tensor cols = gather(images, g, mean, std, weight.scalar_type(), fn);
  return at::mm(go.t(), cols).view({g.D, g.C, g.ph, g.pw});  // d weight2d = go^T @ cols
}

at::Tensor patch_embed_bwd_images_impl(const at::Tensor& grad_out, const at::Tensor& images,
                                       const at::Tensor& weight, at::IntArrayRef patch_size, ScatterFn fn) {
  TORCH_CHECK(images.scalar_type() != at::kByte, "patch_embed backward: uint8 images have no gradient");
  const PatchGeometry g = check_patch_embed_args(images, weight, c10::nullopt, patch_size, c10::nullopt,
                                                 c10::nullopt, c10::nullopt);
  TORCH_CHECK(grad_out.scalar_type() == weight.scalar_type() && grad_out.device() == images.device(),
              "patch_embed backward: grad_out must have weight's dtype and images' device");
  const at::Tensor go = grad_matrix(grad_out, g);
  at::Tensor grad_images = at::empty({g.B, g.C, g.H, g.W}, images.options());
  if (grad_images.numel() == 0) return grad_images;
  const at::Tensor dcols = at::mm(go, weight.reshape({g.D, g.cols()}));  // [B*Np, K]
  fn(dcols, g, grad_images);
  return grad_images;
}

namespace {

at::Tensor fwd_cpu(const at::Tensor& images, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                   at::IntArrayRef patch_size, const c10::optional<at::Tensor>& pos_embed,
                   const c10::optional<at::Tensor>& mean, const c10::optional<at::Tensor>& std) {
  return patch_embed_fwd_impl(images, weight, bias, patch_size, pos_embed, mean, std, &gather_patches_cpu);
}

at::Tensor bwd_weight_cpu(const at::Tensor& grad_out, const at::Tensor& images, const at::Tensor& weight,
                          at::IntArrayRef patch_size, const c10::optional<at::Tensor>& mean,
                          const c10::optional<at::Tensor>& std) {
  return patch_embed_bwd_weight_impl(grad_out, images, weight, patch_size, mean, std, &gather_patches_cpu);
}

at::Tensor bwd_images_cpu(const at::Tensor& grad_out, const at::Tensor& images, const at::Tensor& weight,
                          at::IntArrayRef patch_size) {
  return patch_embed_bwd_images_impl(grad_out, images, weight, patch_size, &scatter_patches_cpu);
}

}  // namespace
}  // namespace vit_fast

// Python custom ops elsewhere in the package register into the same namespace as FRAGMENTs
// (torch.library.custom_op), which coexists with this single definition block.
TORCH_LIBRARY(vit_fast, m) {
  // The fake (meta) kernels and autograd formulas live in Python; importing this module makes
  // torch.compile find them even if only vit_fast._C was imported.
  m.set_python_module("vit_fast.ops.patch_embed");
  m.def("patch_embed_fwd(Tensor images, Tensor weight, Tensor? bias, int[2] patch_size, Tensor? pos_embed, "
        "Tensor? mean, Tensor? std) -> Tensor");
  m.def("patch_embed_bwd_images(Tensor grad_out, Tensor images, Tensor weight, int[2] patch_size) -> Tensor");
  m.def("patch_embed_bwd_weight(Tensor grad_out, Tensor images, Tensor weight, int[2] patch_size, "
        "Tensor? mean, Tensor? std) -> Tensor");
}

TORCH_LIBRARY_IMPL(vit_fast, CPU, m) {
  m.impl("patch_embed_fwd", &vit_fast::fwd_cpu);
  m.impl("patch_embed_bwd_images", &vit_fast::bwd_images_cpu);
  m.impl("patch_embed_bwd_weight", &vit_fast::bwd_weight_cpu);
}
