// Rows of int8 / int4 group weights (group_matmul.cpp's formats) dequantized to fp32 (rows, K), for
// products with many input rows: a prompt's prefill and training through a frozen quantized base
// (train/quantized_base.py), where fp32 BLAS on the dequantized weights beats the row-by-row
// kernels. PyTorch ops take four passes over the weights for this (widen, scale, and for the
// 16-row blocks of the VNNI layout a transpose back to row order); this is one, in parallel.
//
// The arithmetic is the Python reference's (decode/quantize.py `dequantized`): int8
// float(q) * scale, int4 float(u) * scale + low with scale and low widened from fp16, each a
// separate fp32 rounding (no fused multiply-add: see the attribute below), so the values are
// bit-identical to it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>

namespace {

constexpr int64_t kGroup = 32;

// The caller's (rows, K) fp32 buffer: written in place, so a buffer reused from call to call costs
// no fresh pages (a new 55 MB tensor per call, twice a training step per layer, was paid in page
// faults: 33 ms to dequantize an 8,960 x 1,536 layer, against 7 ms to copy into a reused one).
void check_out(const at::Tensor& out, int64_t rows, int64_t K) {
  TORCH_CHECK(out.dtype() == at::kFloat && out.is_contiguous() && out.dim() == 2 && out.size(0) == rows &&
              out.size(1) == K, "dequantize: out must be a contiguous fp32 (", rows, ", ", K, ") tensor");
}

// int8: q and scale in blocks of `block` rows (the VNNI layout, decode/quantize.py Int8GroupLinear):
// q (N/block, block K) as (K/4, block, 4) a block, scale (N/block, block K/32) as (K/32, block).
// Row order (q (N, K), scale (N, K/32)) is the same layout with blocks of one row.
void int8_dequantize(const at::Tensor& q, const at::Tensor& scale, int64_t block, int64_t start, int64_t stop,
                     at::Tensor& out) {
  TORCH_CHECK(q.dtype() == at::kChar && scale.dtype() == at::kFloat && q.is_contiguous() && scale.is_contiguous());
  const int64_t K = q.size(1) / block, groups = K / kGroup;
  check_out(out, stop - start, K);
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(start, stop, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t b = n / block, r = n % block;
      const int8_t* qb = qp + b * block * K;
      const float* sb = sp + b * block * groups;
      float* target = op + (n - start) * K;
      for (int64_t g = 0; g < groups; ++g) {
        const float s = sb[g * block + r];
        for (int64_t quad = g * kGroup / 4; quad < (g + 1) * kGroup / 4; ++quad) {  // 4 weights together
          const int8_t* four = qb + (quad * block + r) * 4;
          for (int64_t i = 0; i < 4; ++i) target[quad * 4 + i] = static_cast<float>(four[i]) * s;
        }
      }
    }
  });
}

// int4: packed (N, K/2) uint8 (byte j of a group: weight j low nibble, weight j + 16 high),
// scale and low (N, K/32) fp16.
__attribute__((optimize("fp-contract=off")))
void int4_group_dequantize(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& low, int64_t start,
                           int64_t stop, at::Tensor& out) {
  TORCH_CHECK(packed.dtype() == at::kByte && scale.dtype() == at::kHalf && low.dtype() == at::kHalf);
  TORCH_CHECK(packed.is_contiguous() && scale.is_contiguous() && low.is_contiguous());
  const int64_t K = packed.size(1) * 2, groups = K / kGroup;
  check_out(out, stop - start, K);
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const at::Half* sp = scale.data_ptr<at::Half>();
  const at::Half* lp = low.data_ptr<at::Half>();
  float* op = out.data_ptr<float>();
  at::parallel_for(start, stop, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const uint8_t* row = pp + n * (K / 2);
      float* target = op + (n - start) * K;
      for (int64_t g = 0; g < groups; ++g) {
        const float s = static_cast<float>(sp[n * groups + g]), l = static_cast<float>(lp[n * groups + g]);
        for (int64_t j = 0; j < kGroup / 2; ++j) {
          const uint8_t byte = row[g * (kGroup / 2) + j];
          float product_low = static_cast<float>(byte & 15) * s;  // two roundings, as the reference
          float product_high = static_cast<float>(byte >> 4) * s;
          target[g * kGroup + j] = product_low + l;
          target[g * kGroup + j + kGroup / 2] = product_high + l;
        }
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(instructkit_native, m) {
  m.def("int8_dequantize(Tensor q, Tensor scale, int block, int start, int stop, Tensor(a!) out) -> ()");
  m.def("int4_group_dequantize(Tensor packed, Tensor scale, Tensor low, int start, int stop, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(instructkit_native, CPU, m) {
  m.impl("int8_dequantize", &int8_dequantize);
  m.impl("int4_group_dequantize", &int4_group_dequantize);
}
