// Weight-only low-bit products for batch-1 decoding: y = x W^T with x (M, K) kept in fp32 and W
// (N, K) stored in groups of 32 along K:
//   int8_group_mm: W[n, k] ~= q[n, k] * scale[n, g], g = k / 32; q int8, scale fp32 (N, K/32).
//   int4_group_mm: W[n, k] ~= u[n, k] * scale[n, g] + low[n, g]; u in 0..15, packed two to a byte
//     (N, K/2): byte j of a group holds weight j in its low nibble and weight j + 16 in its high
//     one; scale and low fp16 (N, K/32).
//
// Why hand-written: batch-1 decoding reads every weight once a token, so the kernel must stream
// low-bit weights at memory speed while the input stays fp32 (quantizing the input, as FBGEMM's
// int8 does, loses greedy agreement with fp32: docs/BENCHMARKS.md). PyTorch's own weight-only CPU
// kernels (aten::_weight_int8pack_mm, _weight_int4pack_mm_for_cpu) run at ~2 GB/s of weights
// here, slower than fp32.
//
// Every output y[m, n] is summed in the same order whatever M is (groups in order, each group a
// fixed tree of vector lanes), so a row's result never depends on the rest of its batch. Decoding
// has one input row per sequence; rows are taken four at a time so a converted weight group serves
// them all.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kGroup = 32;
constexpr int kRowsTogether = 4;

inline float half_to_float(at::Half h) {
#if defined(__F16C__)
  return _cvtsh_ss(h.x);
#else
  return static_cast<float>(h);
#endif
}

// One group's 32 weights as fp32 vectors, and the per-group terms, for each format.
struct Int8Group {
  const int8_t* q;
  const float* scale;
  static constexpr bool kHasLow = false;
  float group_scale(int64_t g) const { return scale[g]; }
  float group_low(int64_t) const { return 0.f; }
  int32_t value(int64_t g, int j) const { return q[g * kGroup + j]; }
#if defined(__AVX512F__)
  void widen(int64_t g, __m512& w0, __m512& w1) const {
    const int8_t* p = q + g * kGroup;
    w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))));
  }
#elif defined(__AVX2__)
  void widen(int64_t g, __m256 (&w)[4]) const {
    const int8_t* p = q + g * kGroup;
    for (int i = 0; i < 4; ++i)
      w[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * i))));
  }
#endif
};

struct Int4Group {
  const uint8_t* packed;
  const at::Half* scale;
  const at::Half* low;
  static constexpr bool kHasLow = true;
  float group_scale(int64_t g) const { return half_to_float(scale[g]); }
  float group_low(int64_t g) const { return half_to_float(low[g]); }
  int32_t value(int64_t g, int j) const {
    const uint8_t byte = packed[g * kGroup / 2 + (j & 15)];
    return j < 16 ? (byte & 15) : (byte >> 4);
  }
#if defined(__AVX512F__)
  void widen(int64_t g, __m512& w0, __m512& w1) const {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + g * kGroup / 2));
    const __m128i nibble = _mm_set1_epi8(15);
    w0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(bytes, nibble)));
    w1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(bytes, 4), nibble)));
  }
#elif defined(__AVX2__)
  void widen(int64_t g, __m256 (&w)[4]) const {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + g * kGroup / 2));
    const __m128i nibble = _mm_set1_epi8(15);
    const __m128i lo = _mm_and_si128(bytes, nibble), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble);
    w[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    w[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    w[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    w[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
  }
#endif
};

// out[i] = y[m0 + i, n] for R input rows x (R, K) and one weight row (R a compile-time constant,
// so the accumulators live in registers).
// Per group g: part = x . w (a fixed tree of lanes), acc[c] += part * scale with c = g % kChains
// (the last groups of a K not divisible by kChains go to chain 0); then the chains are added, the
// lanes reduced, and for int4 sum_g low[g] * xsum[i][g] added in order (xsum (R, K/32): each
// group's sum of x). Several chains so that consecutive groups do not wait on one another's fused
// multiply-add (4 cycles each).
#if defined(__AVX512F__)
using Vec = __m512;
constexpr int kChains = 4;
template <typename Row, int R>
inline void group_step(const float* x, int64_t K, const Row& row, int64_t g, Vec (&acc)[R][kChains], int c) {
  __m512 w0, w1;
  row.widen(g, w0, w1);
  const __m512 scale = _mm512_set1_ps(row.group_scale(g));
  for (int i = 0; i < R; ++i) {
    const float* xg = x + i * K + g * kGroup;
    const __m512 part = _mm512_fmadd_ps(_mm512_loadu_ps(xg + 16), w1, _mm512_mul_ps(_mm512_loadu_ps(xg), w0));
    acc[i][c] = _mm512_fmadd_ps(part, scale, acc[i][c]);
  }
}
inline Vec zero() { return _mm512_setzero_ps(); }
inline float lanes_sum(const Vec (&chains)[kChains]) {
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(chains[0], chains[1]), _mm512_add_ps(chains[2], chains[3])));
}
#elif defined(__AVX2__)
using Vec = __m256;
constexpr int kChains = 2;  // 16 vector registers: 4 rows x 2 chains + the weights
template <typename Row, int R>
inline void group_step(const float* x, int64_t K, const Row& row, int64_t g, Vec (&acc)[R][kChains], int c) {
  __m256 w[4];
  row.widen(g, w);
  const __m256 scale = _mm256_set1_ps(row.group_scale(g));
  for (int i = 0; i < R; ++i) {
    const float* xg = x + i * K + g * kGroup;
    __m256 part = _mm256_mul_ps(_mm256_loadu_ps(xg), w[0]);
    part = _mm256_fmadd_ps(_mm256_loadu_ps(xg + 8), w[1], part);
    part = _mm256_fmadd_ps(_mm256_loadu_ps(xg + 16), w[2], part);
    part = _mm256_fmadd_ps(_mm256_loadu_ps(xg + 24), w[3], part);
    acc[i][c] = _mm256_fmadd_ps(part, scale, acc[i][c]);
  }
}
inline Vec zero() { return _mm256_setzero_ps(); }
inline float lanes_sum(const Vec (&chains)[kChains]) {
  const __m256 both = _mm256_add_ps(chains[0], chains[1]);
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(both), _mm256_extractf128_ps(both, 1));
  const __m128 quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(quarter, _mm_movehdup_ps(quarter)));
}
#endif

template <typename Row, int R>
inline void weight_row(const float* x, const float* xsum, int64_t K, const Row& row, float* out) {
  const int64_t groups = K / kGroup;
#if defined(__AVX512F__) || defined(__AVX2__)
  Vec acc[R][kChains];
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < kChains; ++c) acc[i][c] = zero();
  int64_t g = 0;
  for (; g + kChains <= groups; g += kChains) {
#pragma GCC unroll 4
    for (int c = 0; c < kChains; ++c) group_step<Row, R>(x, K, row, g + c, acc, c);
  }
  for (; g < groups; ++g) group_step<Row, R>(x, K, row, g, acc, 0);
  for (int i = 0; i < R; ++i) out[i] = lanes_sum(acc[i]);
#else
  for (int i = 0; i < R; ++i) {
    float acc = 0.f;
    for (int64_t g = 0; g < groups; ++g) {
      float part = 0.f;
      for (int j = 0; j < kGroup; ++j) part += x[i * K + g * kGroup + j] * static_cast<float>(row.value(g, j));
      acc += part * row.group_scale(g);
    }
    out[i] = acc;
  }
#endif
  if (Row::kHasLow) {
    for (int i = 0; i < R; ++i) {
      float lows = 0.f;
      for (int64_t g = 0; g < groups; ++g) lows += row.group_low(g) * xsum[i * groups + g];
      out[i] += lows;
    }
  }
}

template <typename Row>
inline void weight_row(const float* x, const float* xsum, int64_t K, const Row& row, int rows, float* out) {
  switch (rows) {
    case 1: return weight_row<Row, 1>(x, xsum, K, row, out);
    case 2: return weight_row<Row, 2>(x, xsum, K, row, out);
    case 3: return weight_row<Row, 3>(x, xsum, K, row, out);
    default: return weight_row<Row, 4>(x, xsum, K, row, out);
  }
}

// Threads split the weight rows: each reads its own share of the weights once. `xsum`: (M, K/32)
// group sums of x for formats with an offset (int4), else undefined.
template <typename MakeRow>
at::Tensor group_mm(const at::Tensor& x, const at::Tensor& xsum, int64_t N, const MakeRow& make_row) {
  const int64_t M = x.size(0), K = x.size(1), groups = K / kGroup;
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* sp = xsum.defined() ? xsum.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 128, [&](int64_t n0, int64_t n1) {
    float out[kRowsTogether];
    for (int64_t n = n0; n < n1; ++n) {
      const auto row = make_row(n);
      for (int64_t m0 = 0; m0 < M; m0 += kRowsTogether) {
        const int rows = static_cast<int>(std::min<int64_t>(kRowsTogether, M - m0));
        weight_row(xp + m0 * K, sp ? sp + m0 * groups : nullptr, K, row, rows, out);
        for (int i = 0; i < rows; ++i) yp[(m0 + i) * N + n] = out[i];
      }
    }
  });
  return y;
}

void check_input(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.size(1) % kGroup == 0,
              "group_mm: x must be (M, K) fp32 with K a multiple of 32");
}

// x (M, K) fp32, q (N, K) int8, scale (N, K/32) fp32 -> (M, N) fp32.
at::Tensor int8_group_mm(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
  check_input(x);
  const int64_t K = x.size(1), N = q.size(0);
  TORCH_CHECK(q.scalar_type() == at::kChar && q.size(1) == K && q.is_contiguous(), "int8_group_mm: q must be (N, K) int8");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.size(0) == N && scale.size(1) == K / kGroup &&
              scale.is_contiguous(), "int8_group_mm: scale must be (N, K/32) fp32");
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  return group_mm(x.contiguous(), at::Tensor(), N, [&](int64_t n) { return Int8Group{qp + n * K, sp + n * (K / kGroup)}; });
}

// x (M, K) fp32, packed (N, K/2) uint8, scale and low (N, K/32) fp16 -> (M, N) fp32.
at::Tensor int4_group_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& low) {
  check_input(x);
  const int64_t K = x.size(1), N = packed.size(0);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.size(1) == K / 2 && packed.is_contiguous(),
              "int4_group_mm: packed must be (N, K/2) uint8");
  for (const at::Tensor* t : {&scale, &low})
    TORCH_CHECK(t->scalar_type() == at::kHalf && t->size(0) == N && t->size(1) == K / kGroup && t->is_contiguous(),
                "int4_group_mm: scale and low must be (N, K/32) fp16");
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const at::Half* sp = scale.data_ptr<at::Half>();
  const at::Half* lp = low.data_ptr<at::Half>();
  const at::Tensor xc = x.contiguous();
  const at::Tensor xsum = xc.view({xc.size(0), K / kGroup, kGroup}).sum(-1).contiguous();  // (M, K/32)
  return group_mm(xc, xsum, N, [&](int64_t n) {
    return Int4Group{pp + n * (K / 2), sp + n * (K / kGroup), lp + n * (K / kGroup)};
  });
}

}  // namespace

TORCH_LIBRARY(instructkit_native, m) {
  m.def("int8_group_mm(Tensor x, Tensor q, Tensor scale) -> Tensor");
  m.def("int4_group_mm(Tensor x, Tensor packed, Tensor scale, Tensor low) -> Tensor");
}

TORCH_LIBRARY_IMPL(instructkit_native, CPU, m) {
  m.impl("int8_group_mm", &int8_group_mm);
  m.impl("int4_group_mm", &int4_group_mm);
}
