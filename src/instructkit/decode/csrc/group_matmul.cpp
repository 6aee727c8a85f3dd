// Weight-only low-bit products for batch-1 decoding: y = x W^T with x (M, K) kept in fp32 and W
// (N, K) stored in groups of 32 along K:
//   int8_group_mm: W[n, k] ~= q[n, k] * scale[n, g], g = k / 32; q int8, scale fp32 (N, K/32).
//   int4_group_mm: W[n, k] ~= u[n, k] * scale[n, g] + low[n, g]; u in 0..15, packed two to a byte
//     (N, K/2): byte j of a group holds weight j in its low nibble and weight j + 16 in its high
//     one; scale and low fp16 (N, K/32).
//
// Why hand-written: batch-1 decoding reads every weight once a token, so the kernel must stream
// low-bit weights at memory speed while the input stays fp32 or near it (quantizing the input to
// 7 bits, as FBGEMM's int8 does, loses greedy agreement with fp32: docs/BENCHMARKS.md; int8's VNNI
// path below puts it on a 16-bit grid, int4's bf16 path splits it in two bf16). PyTorch's own weight-only CPU
// kernels (aten::_weight_int8pack_mm, _weight_int4pack_mm_for_cpu) run at ~2 GB/s of weights
// here, slower than fp32.
//
// Every output y[m, n] is summed in the same order whatever M is (groups in order, each group a
// fixed tree of vector lanes), so a row's result never depends on the rest of its batch. Decoding
// has one input row per sequence; rows are taken four at a time so a converted weight group serves
// them all.
//
// int4 on processors with AVX512-BF16 (Zen 4, Sapphire Rapids and later): unpacking nibbles to fp32
// made the fp32 path compute-bound (~16 GB/s of weights against ~27 for int8 on the 262,144 x 640
// head). There, a nibble u (0..15) becomes bf16 exactly through a 16-entry table (vpermw: one
// instruction for 16 weights), and x is split into two bf16 halves, x = hi + lo + O(2^-17 |x|),
// so `vdpbf16ps` multiplies exact products in pairs: the result stays within fp32 rounding of
// x . u (tests/test_quantize.py), unlike llama.cpp's, which rounds x to 8 bits.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

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

// Each row's sum_g low[g] * xsum[g] (int4's offsets), g in order; AVX-512 sums 16 groups a vector.
template <int R>
inline void add_lows(const at::Half* low, const float* xsum, int64_t groups, float* out) {
  for (int i = 0; i < R; ++i) {
    const float* xs = xsum + i * groups;
#if defined(__AVX512F__)
    __m512 lows = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g += 16) {
      const __mmask16 take = groups - g >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (groups - g)) - 1);
      const __m512 l = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(take, low + g));
      lows = _mm512_fmadd_ps(l, _mm512_maskz_loadu_ps(take, xs + g), lows);
    }
    out[i] += _mm512_reduce_add_ps(lows);
#else
    float lows = 0.f;
    for (int64_t g = 0; g < groups; ++g) lows += half_to_float(low[g]) * xs[g];
    out[i] += lows;
#endif
  }
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define INSTRUCTKIT_INT4_BF16 1
// x as two bf16 halves, hi = bf16(x) and lo = bf16(x - hi) (rounded to nearest even), each (M, K)
// in the order the kernel reads them: per pair of groups (64 values), first both groups' values
// 0..15, then both groups' 16..31, matching the weights' low and high nibbles; a last odd group
// stays in order.
struct SplitInput {
  std::vector<uint16_t> hi, lo;
};

inline uint16_t to_bf16_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);  // finite inputs
}

inline int64_t pair_order(int64_t k, int64_t K) {  // where x[k] goes in its row's split
  const int64_t pair = k / (2 * kGroup), within = k % (2 * kGroup);
  if ((pair + 1) * 2 * kGroup > K) return k;  // the last odd group
  const int64_t group = within / kGroup, j = within % kGroup;
  return pair * 2 * kGroup + (j < 16 ? 0 : kGroup) + group * 16 + (j & 15);
}

inline SplitInput split_input(const float* x, int64_t M, int64_t K) {
  SplitInput split{std::vector<uint16_t>(M * K), std::vector<uint16_t>(M * K)};
  for (int64_t k = 0; k < K; ++k) {
    const int64_t to = pair_order(k, K);
    for (int64_t m = 0; m < M; ++m) {
      const float value = x[m * K + k];
      const uint16_t hi = to_bf16_bits(value);
      const uint32_t hi_bits = static_cast<uint32_t>(hi) << 16;
      float hi_value;
      std::memcpy(&hi_value, &hi_bits, sizeof hi_value);
      split.hi[m * K + to] = hi;
      split.lo[m * K + to] = to_bf16_bits(value - hi_value);
    }
  }
  return split;
}

// One weight row against R rows of x, two groups a step: their 32 bytes -> 32 words
// (vpmovzxbw); the table lookup (vpermw) reads a word's low 5 bits, and the table holds 0..15
// twice, so the low nibbles need no mask and the high ones one shift. Lanes 0..7 of a product
// belong to the first group, 8..15 to the second. part = (x_hi . u) + (x_lo . u), then
// acc[c] += part * scale (c = pair % 4, so consecutive pairs do not wait on one another); an odd
// last group goes through the same steps at half width. Then the lanes, then the offsets.
template <int R, bool kExact>
inline void int4_row_bf16(const uint16_t* x_hi, const uint16_t* x_lo, const float* xsum, int64_t K,
                          const Int4Group& row, float* out) {
  const int64_t groups = K / kGroup, pairs = groups / 2;
  const __m512i table = _mm512_setr_epi32(0x3F800000, 0x40404000, 0x40A04080, 0x40E040C0, 0x41104100, 0x41304120,
                                          0x41504140, 0x41704160, 0x3F800000, 0x40404000, 0x40A04080, 0x40E040C0,
                                          0x41104100, 0x41304120, 0x41504140, 0x41704160);  // bf16 0, 1, ..., 15, twice
  const __m512i pair_scale_lanes = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  constexpr int kPairChains = 4;
  __m512 acc[R][kPairChains];
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < kPairChains; ++c) acc[i][c] = _mm512_setzero_ps();
  auto two_groups = [&](int64_t p, int c) {
    const __m512i words = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row.packed + p * kGroup)));
    const __m512bh first = (__m512bh)_mm512_permutexvar_epi16(words, table);                          // values 0..15
    const __m512bh second = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(words, 4), table);  // 16..31
    const __m512 two_scales = _mm512_cvtph_ps(_mm256_set1_epi32(*reinterpret_cast<const int32_t*>(row.scale + 2 * p)));
    const __m512 scale = _mm512_permutexvar_ps(pair_scale_lanes, two_scales);
    for (int i = 0; i < R; ++i) {
      const int64_t at = i * K + p * 2 * kGroup;
      const __m512bh hi0 = (__m512bh)_mm512_loadu_si512(x_hi + at), hi1 = (__m512bh)_mm512_loadu_si512(x_hi + at + kGroup);
      __m512 part = _mm512_dpbf16_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), hi0, first), hi1, second);
      if constexpr (kExact) {
        const __m512bh lo0 = (__m512bh)_mm512_loadu_si512(x_lo + at), lo1 = (__m512bh)_mm512_loadu_si512(x_lo + at + kGroup);
        part = _mm512_add_ps(part, _mm512_dpbf16_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), lo0, first), lo1, second));
      }
      acc[i][c] = _mm512_fmadd_ps(part, scale, acc[i][c]);
    }
  };
  int64_t p = 0;
  for (; p + kPairChains <= pairs; p += kPairChains) {
#pragma GCC unroll 4
    for (int c = 0; c < kPairChains; ++c) two_groups(p + c, c);
  }
  for (; p < pairs; ++p) two_groups(p, 0);
  for (int i = 0; i < R; ++i)
    out[i] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]), _mm512_add_ps(acc[i][2], acc[i][3])));
  if (groups % 2) {  // the last group alone, its x in order
    const int64_t g = groups - 1;
    const __m256i words = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row.packed + g * kGroup / 2)));
    const __m256i half_table = _mm512_castsi512_si256(table);
    const __m256bh first = (__m256bh)_mm256_permutexvar_epi16(words, half_table);
    const __m256bh second = (__m256bh)_mm256_permutexvar_epi16(_mm256_srli_epi16(words, 4), half_table);
    for (int i = 0; i < R; ++i) {
      const int64_t at = i * K + g * kGroup;
      const __m256bh hi0 = (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x_hi + at));
      const __m256bh hi1 = (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x_hi + at + 16));
      __m256 part = _mm256_dpbf16_ps(_mm256_dpbf16_ps(_mm256_setzero_ps(), hi0, first), hi1, second);
      if constexpr (kExact) {
        const __m256bh lo0 = (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x_lo + at));
        const __m256bh lo1 = (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x_lo + at + 16));
        part = _mm256_add_ps(part, _mm256_dpbf16_ps(_mm256_dpbf16_ps(_mm256_setzero_ps(), lo0, first), lo1, second));
      }
      const __m128 half = _mm_add_ps(_mm256_castps256_ps128(part), _mm256_extractf128_ps(part, 1));
      const __m128 quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
      out[i] += _mm_cvtss_f32(_mm_add_ss(quarter, _mm_movehdup_ps(quarter))) * row.group_scale(g);
    }
  }
  add_lows<R>(row.low, xsum, groups, out);
}
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define INSTRUCTKIT_INT8_VNNI 1
// int8 on processors with AVX512-VNNI (Ice Lake, Zen 4 and later): widening int8 weights to fp32
// kept the row-by-row path compute-bound (~16-26 GB/s of weights, where memory gives ~60). There,
// the weights are stored in blocks of 16 rows (int8_block_mm) so that a vector holds 16 outputs
// and no horizontal sums are needed, and x is put on a 16-bit grid per group:
// x[k] ~= xscale[g] * X[k], |X| <= kGrid, an error <= max|x_g| / 65278, far below the int8
// weights' own (llama.cpp's Q8_0 puts x on an 8-bit grid). X = 256 * X1 + X2 with both bytes
// signed, and `vpdpbusd` multiplies bytes exactly into int32 lanes, so each group's x_g . q_g is
// exact on that grid. vpdpbusd takes one unsigned operand: the weights, as q + 128 (their sign
// bit flipped); the 128 * sum(X_g) that adds is taken off in integers before scaling.
constexpr int32_t kGrid = 32639;  // so (X + 128) >> 8 stays within int8
constexpr int64_t kBlockRows = 16;

// x on the grid: each row's (K) high and low bytes in x's order, and per group (M, K/32) its
// xscale and 128 * sum(X_g).
struct GridInput {
  std::vector<int8_t> x1, x2;
  std::vector<float> scale;
  std::vector<int32_t> flip_sum;
};

inline GridInput grid_input(const float* x, int64_t M, int64_t K) {
  const int64_t groups = K / kGroup;
  GridInput grid{std::vector<int8_t>(M * K), std::vector<int8_t>(M * K), std::vector<float>(M * groups),
                 std::vector<int32_t>(M * groups)};
  for (int64_t i = 0; i < M * groups; ++i) {
    const float* xg = x + i * kGroup;
    float most = 0.f;
    for (int j = 0; j < kGroup; ++j) most = std::max(most, std::fabs(xg[j]));
    const float inverse = most > 0.f ? kGrid / most : 0.f;
    int32_t sum = 0;
    for (int j = 0; j < kGroup; ++j) {
      const int32_t X = static_cast<int32_t>(std::nearbyint(xg[j] * inverse));
      const int32_t high = (X + 128) >> 8;  // arithmetic shift: floor
      grid.x1[i * kGroup + j] = static_cast<int8_t>(high);
      grid.x2[i * kGroup + j] = static_cast<int8_t>(X - 256 * high);
      sum += X;
    }
    grid.scale[i] = most / kGrid;
    grid.flip_sum[i] = 128 * sum;
  }
  return grid;
}

// One block of 16 weight rows (q: (K/4, 16, 4) bytes, scale: (K/32, 16)) against R rows of x:
// out (R, 16). Per group and input row: D = 256 * (X1 . (q + 128)) + X2 . (q + 128) - 128 * sum(X)
// = X . q exactly (|D| < 2^29), each lane one weight row, summed over four k a step in two chains
// (even and odd steps) so consecutive vpdpbusd do not wait on one another; then acc += D * xscale
// * scale, groups in order.
template <int R>
inline void int8_block_vnni(const GridInput& grid, int64_t m0, int64_t K, const int8_t* q, const float* scale,
                            float* out, int64_t out_stride) {
  const int64_t groups = K / kGroup;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[R];
  for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i high[R][2], low[R][2];
    for (int i = 0; i < R; ++i)
      for (int c = 0; c < 2; ++c) high[i][c] = low[i][c] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int step = 0; step < kGroup / 4; ++step) {
      const __m512i weights = _mm512_xor_si512(_mm512_loadu_si512(q + (g * kGroup / 4 + step) * 64), flip);
      for (int i = 0; i < R; ++i) {
        const int64_t at = (m0 + i) * K + g * kGroup + 4 * step;
        int32_t four1, four2;
        std::memcpy(&four1, grid.x1.data() + at, 4);
        std::memcpy(&four2, grid.x2.data() + at, 4);
        high[i][step & 1] = _mm512_dpbusd_epi32(high[i][step & 1], weights, _mm512_set1_epi32(four1));
        low[i][step & 1] = _mm512_dpbusd_epi32(low[i][step & 1], weights, _mm512_set1_epi32(four2));
      }
    }
    const __m512 weight_scale = _mm512_loadu_ps(scale + g * kBlockRows);
    for (int i = 0; i < R; ++i) {
      const int64_t at = (m0 + i) * (K / kGroup) + g;
      const __m512i exact = _mm512_sub_epi32(
          _mm512_add_epi32(_mm512_slli_epi32(_mm512_add_epi32(high[i][0], high[i][1]), 8), _mm512_add_epi32(low[i][0], low[i][1])),
          _mm512_set1_epi32(grid.flip_sum[at]));
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), _mm512_mul_ps(weight_scale, _mm512_set1_ps(grid.scale[at])), acc[i]);
    }
  }
  for (int i = 0; i < R; ++i) _mm512_storeu_ps(out + i * out_stride, acc[i]);
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
  if constexpr (Row::kHasLow) add_lows<R>(row.low, xsum, groups, out);
}

// Calls body(std::integral_constant<int, R>) with R = rows (1..kRowsTogether) as a compile-time constant.
template <typename Body>
inline void with_rows(int rows, const Body& body) {
  switch (rows) {
    case 1: return body(std::integral_constant<int, 1>());
    case 2: return body(std::integral_constant<int, 2>());
    case 3: return body(std::integral_constant<int, 3>());
    default: return body(std::integral_constant<int, 4>());
  }
}

// Threads split the weight rows: each reads its own share of the weights once.
// multiply(m0, rows, row, out): out[i] = y[m0 + i, n] for the weight row `row` (n).
template <typename MakeRow, typename Multiply>
at::Tensor group_mm(int64_t M, int64_t N, const at::TensorOptions& options, const MakeRow& make_row,
                    const Multiply& multiply) {
  at::Tensor y = at::empty({M, N}, options);
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 128, [&](int64_t n0, int64_t n1) {
    float out[kRowsTogether];
    for (int64_t n = n0; n < n1; ++n) {
      const auto row = make_row(n);
      for (int64_t m0 = 0; m0 < M; m0 += kRowsTogether) {
        const int rows = static_cast<int>(std::min<int64_t>(kRowsTogether, M - m0));
        multiply(m0, rows, row, out);
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
  const at::Tensor xc = x.contiguous();
  const float* xp = xc.data_ptr<float>();
  return group_mm(
      xc.size(0), N, xc.options(), [&](int64_t n) { return Int8Group{qp + n * K, sp + n * (K / kGroup)}; },
      [&](int64_t m0, int rows, const Int8Group& row, float* out) {
        with_rows(rows, [&](auto R) { weight_row<Int8Group, decltype(R)::value>(xp + m0 * K, nullptr, K, row, out); });
      });
}

// The weight-row block int8_block_mm wants here: 16 with AVX512-VNNI, 0 where it is not built.
int64_t int8_block_rows() {
#if defined(INSTRUCTKIT_INT8_VNNI)
  return kBlockRows;
#else
  return 0;
#endif
}

// x (M, K) fp32; q (N/16, 16 K) int8: each block of 16 weight rows as (K/4, 16, 4), four k of
// row 0, four of row 1, ...; scale (N/16, 16 K/32) fp32 as (K/32, 16) -> (M, N) fp32. The same
// weights as int8_group_mm's q (N, K) and scale (N, K/32), reordered (decode/quantize.py).
at::Tensor int8_block_mm(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
  check_input(x);
#if defined(INSTRUCTKIT_INT8_VNNI)
  const int64_t K = x.size(1), blocks = q.size(0), groups = K / kGroup;
  TORCH_CHECK(q.scalar_type() == at::kChar && q.dim() == 2 && q.size(1) == kBlockRows * K && q.is_contiguous(),
              "int8_block_mm: q must be (N/16, 16 K) int8");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 2 && scale.size(0) == blocks &&
              scale.size(1) == kBlockRows * groups && scale.is_contiguous(), "int8_block_mm: scale must be (N/16, 16 K/32) fp32");
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0), N = blocks * kBlockRows;
  const GridInput grid = grid_input(xc.data_ptr<float>(), M, K);
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  at::Tensor y = at::empty({M, N}, xc.options());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, blocks, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t m0 = 0; m0 < M; m0 += kRowsTogether)
        with_rows(static_cast<int>(std::min<int64_t>(kRowsTogether, M - m0)), [&](auto R) {
          int8_block_vnni<decltype(R)::value>(grid, m0, K, qp + b * kBlockRows * K, sp + b * kBlockRows * groups,
                                              yp + m0 * N + b * kBlockRows, N);
        });
  });
  return y;
#else
  (void)q, (void)scale;
  TORCH_CHECK(false, "int8_block_mm: this build has no AVX512-VNNI path (int8_block_rows() == 0)");
#endif
}

// x (M, K) fp32, packed (N, K/2) uint8, scale and low (N, K/32) fp16 -> (M, N) fp32.
// round_input: the product may round x to bf16 (8 significant bits) where that is faster (the
// bf16 path, which then skips x's low half: half the multiplies); for a head that only proposes
// candidates (decode/quantize.py), as FBGEMM's int8 rounds x to 7 bits.
at::Tensor int4_group_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& low,
                         bool round_input) {
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
  const int64_t M = xc.size(0), groups = K / kGroup;
  const float* xp = xc.data_ptr<float>();
  std::vector<float> xsum(M * groups);  // (M, K/32): each group's sum of x, in order
  for (int64_t i = 0; i < M * groups; ++i) {
    float total = 0.f;
    for (int j = 0; j < kGroup; ++j) total += xp[i * kGroup + j];
    xsum[i] = total;
  }
  const auto make_row = [&](int64_t n) {
    return Int4Group{pp + n * (K / 2), sp + n * (K / kGroup), lp + n * (K / kGroup)};
  };
#if defined(INSTRUCTKIT_INT4_BF16)
  const SplitInput split = split_input(xp, M, K);
  const uint16_t* hi = split.hi.data();
  const uint16_t* lo = split.lo.data();
  return group_mm(M, N, xc.options(), make_row, [&](int64_t m0, int rows, const Int4Group& row, float* out) {
    with_rows(rows, [&](auto R) {
      constexpr int kRows = decltype(R)::value;
      if (round_input)
        int4_row_bf16<kRows, false>(hi + m0 * K, nullptr, xsum.data() + m0 * groups, K, row, out);
      else
        int4_row_bf16<kRows, true>(hi + m0 * K, lo + m0 * K, xsum.data() + m0 * groups, K, row, out);
    });
  });
#else
  (void)round_input;  // the fp32 path is as fast exact
  return group_mm(M, N, xc.options(), make_row, [&](int64_t m0, int rows, const Int4Group& row, float* out) {
    with_rows(rows, [&](auto R) {
      weight_row<Int4Group, decltype(R)::value>(xp + m0 * K, xsum.data() + m0 * groups, K, row, out);
    });
  });
#endif
}

}  // namespace

TORCH_LIBRARY(instructkit_native, m) {
  m.def("int8_group_mm(Tensor x, Tensor q, Tensor scale) -> Tensor");
  m.def("int8_block_mm(Tensor x, Tensor q, Tensor scale) -> Tensor");
  m.def("int8_block_rows() -> int");
  m.def("int4_group_mm(Tensor x, Tensor packed, Tensor scale, Tensor low, bool round_input=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(instructkit_native, CompositeExplicitAutograd, m) { m.impl("int8_block_rows", &int8_block_rows); }

TORCH_LIBRARY_IMPL(instructkit_native, CPU, m) {
  m.impl("int8_group_mm", &int8_group_mm);
  m.impl("int8_block_mm", &int8_block_mm);
  m.impl("int4_group_mm", &int4_group_mm);
}
