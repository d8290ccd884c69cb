// vit_fast._C CUDA implementation of the patch-embed ops: the patch gather (images -> cols) and its
// transpose (cols -> image gradient) as vectorized kernels; the GEMMs are ATen's (cuBLAS), through the
// device-independent drivers in patch_embed.cpp.
#include "../patch_embed.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

namespace vit_fast {
namespace {

constexpr int kThreads = 256;

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename in_t, typename out_t>
__device__ __forceinline__ out_t convert(in_t v, const float*, const float*, int) {
  return static_cast<out_t>(v);
}
// Same fp32 arithmetic as the reference: (v/255 - mean[c]) / std[c], then one rounding to out_t.
template <>
__device__ __forceinline__ float convert<uint8_t, float>(uint8_t v, const float* m, const float* s, int c) {
  return (static_cast<float>(v) / 255.0f - m[c]) / s[c];
}
template <>
__device__ __forceinline__ at::Half convert<uint8_t, at::Half>(uint8_t v, const float* m, const float* s, int c) {
  return static_cast<at::Half>(convert<uint8_t, float>(v, m, s, c));
}
template <>
__device__ __forceinline__ at::BFloat16 convert<uint8_t, at::BFloat16>(uint8_t v, const float* m, const float* s,
                                                                       int c) {
  return static_cast<at::BFloat16>(convert<uint8_t, float>(v, m, s, c));
}

// cols[m, k] = convert(img[b, c, hp*ph + kh, wp*pw + kw]),  m = (b*Hp + hp)*Wp + wp,  k = (c*ph + kh)*pw + kw.
//   img:  logical [B, C, H, W] with element strides sB, sC, sH, sW (NCHW, channels_last, uint8 NHWC)
//   cols: [B*Hp*Wp, K] contiguous, K = C*ph*pw
//   mean, std: fp32 [C], read only for uint8 input
// Thread t of the grid-stride loop owns VEC consecutive k of one row. VEC > 1 only when sW == 1 and
// pw, sB, sC, sH and both base pointers are multiples of VEC elements, so each access is one aligned
// vector that never crosses a patch row. Consecutive threads touch consecutive memory on both sides.
template <typename in_t, typename out_t, int VEC>
__global__ void __launch_bounds__(kThreads) patch_gather_kernel(
    const in_t* __restrict__ img, out_t* __restrict__ cols, const float* __restrict__ mean,
    const float* __restrict__ std, int64_t sB, int64_t sC, int64_t sH, int64_t sW, int64_t rows, int Hp, int Wp,
    int ph, int pw, int K) {
  const int Kv = K / VEC;
  const int64_t total = rows * Kv;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t m = i / Kv;
    const int k = static_cast<int>(i - m * Kv) * VEC;
    const int64_t b = m / (int64_t(Hp) * Wp);
    const int hw = static_cast<int>(m - b * (int64_t(Hp) * Wp));
    const int hp = hw / Wp, wp = hw - hp * Wp;
    const int c = k / (ph * pw), r = k - c * (ph * pw);
    const int kh = r / pw, kw = r - kh * pw;
    const int64_t src = b * sB + c * sC + int64_t(hp * ph + kh) * sH + int64_t(wp * pw + kw) * sW;
    Vec<out_t, VEC> o;
    if constexpr (VEC == 1) {
      o.v[0] = convert<in_t, out_t>(img[src], mean, std, c);
    } else {
      const Vec<in_t, VEC> x = *reinterpret_cast<const Vec<in_t, VEC>*>(img + src);
#pragma unroll
      for (int j = 0; j < VEC; ++j) o.v[j] = convert<in_t, out_t>(x.v[j], mean, std, c);
    }
    *reinterpret_cast<Vec<out_t, VEC>*>(cols + m * K + k) = o;
  }
}

// grad[b, c, h, w] = cols[(b*Hp + h/ph)*Wp + w/pw, (c*ph + h%ph)*pw + w%pw], 0 where h >= Hp*ph or w >= Wp*pw.
//   cols: [B*Hp*Wp, K] contiguous;  grad: [B, C, H, W] contiguous, same dtype.
// One thread per VEC consecutive w of the gradient, so every element is written exactly once (no
// atomics: patches do not overlap). VEC > 1 only when W and pw are multiples of VEC.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads) patch_scatter_kernel(
    const scalar_t* __restrict__ cols, scalar_t* __restrict__ grad, int64_t BC, int C, int H, int W, int Hp,
    int Wp, int ph, int pw, int K) {
  const int Wv = W / VEC;
  const int64_t total = BC * H * Wv;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t bch = i / Wv;
    const int w = static_cast<int>(i - bch * Wv) * VEC;
    const int64_t bc = bch / H;
    const int h = static_cast<int>(bch - bc * H);
    const int64_t b = bc / C;
    const int c = static_cast<int>(bc - b * C);
    Vec<scalar_t, VEC> o;
    if (h < Hp * ph && w < Wp * pw) {
      const int hp = h / ph, kh = h - hp * ph, wp = w / pw, kw = w - wp * pw;
      const int64_t src = ((b * Hp + hp) * Wp + wp) * K + (c * ph + kh) * pw + kw;
      o = *reinterpret_cast<const Vec<scalar_t, VEC>*>(cols + src);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) o.v[j] = scalar_t(0);
    }
    *reinterpret_cast<Vec<scalar_t, VEC>*>(grad + bch * W + w) = o;
  }
}

int grid_for(int64_t work) {
  // Enough blocks to fill the GPU several times over; the grid-stride loops cover the rest.
  const int64_t cap = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, cap)));
}

bool aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <typename in_t, typename out_t>
void launch_gather(const at::Tensor& img, const PatchGeometry& g, const float* mean, const float* std,
                   at::Tensor& cols) {
  constexpr int VEC = 16 / (sizeof(in_t) > sizeof(out_t) ? sizeof(in_t) : sizeof(out_t));
  const in_t* src = img.const_data_ptr<in_t>();
  out_t* dst = cols.data_ptr<out_t>();
  const bool vec_ok = img.stride(3) == 1 && g.pw % VEC == 0 && img.stride(0) % VEC == 0 &&
                      img.stride(1) % VEC == 0 && img.stride(2) % VEC == 0 && aligned(src, sizeof(in_t) * VEC) &&
                      aligned(dst, sizeof(out_t) * VEC);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t rows = g.rows();
  const int K = static_cast<int>(g.cols());
  if (vec_ok) {
    patch_gather_kernel<in_t, out_t, VEC><<<grid_for(rows * K / VEC), kThreads, 0, stream>>>(
        src, dst, mean, std, img.stride(0), img.stride(1), img.stride(2), img.stride(3), rows, g.Hp, g.Wp, g.ph,
        g.pw, K);
  } else {
    patch_gather_kernel<in_t, out_t, 1><<<grid_for(rows * K), kThreads, 0, stream>>>(
        src, dst, mean, std, img.stride(0), img.stride(1), img.stride(2), img.stride(3), rows, g.Hp, g.Wp, g.ph,
        g.pw, K);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_int32(const PatchGeometry& g) {
  // Per-row and per-image indices are int; the flattened ones are int64.
  TORCH_CHECK(g.cols() < INT32_MAX && g.H < INT32_MAX && g.W < INT32_MAX && g.num_patches() < INT32_MAX,
              "patch_embed (CUDA): image or patch too large");
}

void gather_patches_cuda(const at::Tensor& images_nchw, const PatchGeometry& g,
                         const c10::optional<at::Tensor>& mean, const c10::optional<at::Tensor>& std,
                         at::Tensor& cols) {
  check_int32(g);
  const c10::cuda::CUDAGuard guard(images_nchw.device());
  const Normalization norm(mean, std);
  const float* m = norm.mean;
  const float* s = norm.std;
  VIT_FAST_DISPATCH_FLOAT_TYPES(cols.scalar_type(), "patch_gather_cuda", [&] {
    if (images_nchw.scalar_type() == at::kByte) {
      launch_gather<uint8_t, scalar_t>(images_nchw, g, m, s, cols);
    } else {
      launch_gather<scalar_t, scalar_t>(images_nchw, g, m, s, cols);
    }
  });
}

void scatter_patches_cuda(const at::Tensor& cols, const PatchGeometry& g, at::Tensor& grad_images) {
  check_int32(g);
  const c10::cuda::CUDAGuard guard(cols.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  VIT_FAST_DISPATCH_FLOAT_TYPES(cols.scalar_type(), "patch_scatter_cuda", [&] {
    constexpr int VEC = 16 / sizeof(scalar_t);
    const scalar_t* src = cols.const_data_ptr<scalar_t>();
    scalar_t* dst = grad_images.data_ptr<scalar_t>();
    const int64_t BC = g.B * g.C;
    const int C = g.C, H = g.H, W = g.W, Hp = g.Hp, Wp = g.Wp, ph = g.ph, pw = g.pw, K = g.cols();
    if (W % VEC == 0 && pw % VEC == 0 && aligned(src, 16) && aligned(dst, 16)) {
      patch_scatter_kernel<scalar_t, VEC><<<grid_for(BC * H * W / VEC), kThreads, 0, stream>>>(
          src, dst, BC, C, H, W, Hp, Wp, ph, pw, K);
    } else {
      patch_scatter_kernel<scalar_t, 1><<<grid_for(BC * H * W), kThreads, 0, stream>>>(src, dst, BC, C, H, W, Hp,
                                                                                      Wp, ph, pw, K);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor fwd_cuda(const at::Tensor& images, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                    at::IntArrayRef patch_size, const c10::optional<at::Tensor>& pos_embed,
                    const c10::optional<at::Tensor>& mean, const c10::optional<at::Tensor>& std) {
  const c10::cuda::CUDAGuard guard(images.device());
  return patch_embed_fwd_impl(images, weight, bias, patch_size, pos_embed, mean, std, &gather_patches_cuda);
}

at::Tensor bwd_weight_cuda(const at::Tensor& grad_out, const at::Tensor& images, const at::Tensor& weight,
                           at::IntArrayRef patch_size, const c10::optional<at::Tensor>& mean,
                           const c10::optional<at::Tensor>& std) {
  const c10::cuda::CUDAGuard guard(images.device());
  return patch_embed_bwd_weight_impl(grad_out, images, weight, patch_size, mean, std, &gather_patches_cuda);
}

at::Tensor bwd_images_cuda(const at::Tensor& grad_out, const at::Tensor& images, const at::Tensor& weight,
                           at::IntArrayRef patch_size) {
  const c10::cuda::CUDAGuard guard(images.device());
  return patch_embed_bwd_images_impl(grad_out, images, weight, patch_size, &scatter_patches_cuda);
}

}  // namespace
}  // namespace vit_fast

TORCH_LIBRARY_IMPL(vit_fast, CUDA, m) {
  m.impl("patch_embed_fwd", &vit_fast::fwd_cuda);
  m.impl("patch_embed_bwd_images", &vit_fast::bwd_images_cuda);
  m.impl("patch_embed_bwd_weight", &vit_fast::bwd_weight_cuda);
}
