// Attention of one new query per row over a static-capacity KV cache: the compiled decode step's
// attention (instructkit.decode.static_decode, models/attention.py).
//
//   out[b, h] = sum_l p[b, h, l] v[b, h / G, l],  p = softmax over the keys the mask allows of
//   scale * q[b, h] . k[b, h / G, l]   (G = H / H_kv query heads share a key/value head)
//
// Why hand-written: at one query PyTorch's CPU SDPA spends ~60-75 us a call on set-up (its flash
// kernel's blocks and buffers) for ~10 us of arithmetic (4 heads x 200 keys x 256 on the default
// model): ~1.1 ms of a ~12 ms int8 token over 18 layers. Here the G query heads of a key/value head
// read each cached key and value row once, and keys the mask hides (the cache's unfilled slots,
// those outside a sliding window) are skipped instead of computed and masked.
//
// Long caches are cut into chunks of keys that threads take (each chunk's max, sum and weighted
// values, merged afterwards as flash-decoding does); a row's result does not depend on the thread
// count, since the chunks are fixed and merged in order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kChunkKeys = 256;
constexpr int kHeadsTogether = 4;  // query heads that share each load of a key or value row

// The vector type of this build: AVX-512 (16 lanes) or AVX2 (8); D must be a multiple of the lanes
// (64 and 256 on the models here), else the plain loops below serve.
#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
using Vec = __m512;
inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec broadcast(float x) { return _mm512_set1_ps(x); }
inline Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec zero() { return _mm512_setzero_ps(); }
inline float lanes_sum(Vec v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__)
constexpr int64_t kLanes = 8;
using Vec = __m256;
inline Vec load(const float* p) { return _mm256_loadu_ps(p); }
inline void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec broadcast(float x) { return _mm256_set1_ps(x); }
inline Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec zero() { return _mm256_setzero_ps(); }
inline float lanes_sum(Vec v) {
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(quarter, _mm_movehdup_ps(quarter)));
}
#else
constexpr int64_t kLanes = 0;
#endif

// One chunk of keys for R (<= kHeadsTogether) query heads q (R, D) of one key/value head: per head,
// the largest score (-inf when the mask hides every key of the chunk), the sum of
// exp(score - largest) and the values weighted by those exps (acc, (R, D)).
// keys, values: the chunk's rows (n, D); allowed: the chunk's n mask entries; scores: scratch (R, n).
template <int R>
void attend_chunk(const float* q, const float* keys, const float* values, const bool* allowed, int64_t n, int64_t D,
                  float scale, float* largest, float* sum, float* acc, float* scores) {
  const float hidden = -std::numeric_limits<float>::infinity();
  std::fill(largest, largest + R, hidden);
  std::fill(sum, sum + R, 0.f);
  const bool vectors = kLanes > 0 && D % kLanes == 0;
  for (int64_t i = 0; i < n; ++i) {
    if (!allowed[i]) continue;
    const float* key = keys + i * D;
    float dots[R] = {};
    if (vectors) {
#if defined(__AVX512F__) || defined(__AVX2__)
      Vec total[R];
      for (int r = 0; r < R; ++r) total[r] = zero();
      for (int64_t d = 0; d < D; d += kLanes) {
        const Vec k = load(key + d);
        for (int r = 0; r < R; ++r) total[r] = fma(load(q + r * D + d), k, total[r]);
      }
      for (int r = 0; r < R; ++r) dots[r] = lanes_sum(total[r]);
#endif
    } else {
      for (int r = 0; r < R; ++r)
        for (int64_t d = 0; d < D; ++d) dots[r] += q[r * D + d] * key[d];
    }
    for (int r = 0; r < R; ++r) {
      scores[r * n + i] = dots[r] * scale;
      largest[r] = std::max(largest[r], scores[r * n + i]);
    }
  }
  // Scores become weights (0 for hidden keys), so the value pass below runs without branches.
  for (int r = 0; r < R; ++r)
    for (int64_t i = 0; i < n; ++i) {
      const float weight = allowed[i] ? std::exp(scores[r * n + i] - largest[r]) : 0.f;
      scores[r * n + i] = weight;
      sum[r] += weight;
    }
  if (vectors) {
#if defined(__AVX512F__) || defined(__AVX2__)
    // A slice of D at a time, summed over the chunk's keys in registers: each value row's slice is
    // loaded once for the R heads.
    for (int64_t d = 0; d < D; d += kLanes) {
      Vec total[R];
      for (int r = 0; r < R; ++r) total[r] = zero();
      for (int64_t i = 0; i < n; ++i) {
        if (!allowed[i]) continue;
        const Vec v = load(values + i * D + d);
        for (int r = 0; r < R; ++r) total[r] = fma(broadcast(scores[r * n + i]), v, total[r]);
      }
      for (int r = 0; r < R; ++r) store(acc + r * D + d, total[r]);
    }
#endif
  } else {
    std::fill(acc, acc + R * D, 0.f);
    for (int64_t i = 0; i < n; ++i)
      for (int r = 0; r < R; ++r)
        for (int64_t d = 0; d < D; ++d) acc[r * D + d] += scores[r * n + i] * values[i * D + d];
  }
}

// Calls body(std::integral_constant<int, R>) with R = heads (1..kHeadsTogether) as a compile-time constant.
template <typename Body>
inline void with_heads(int64_t heads, const Body& body) {
  switch (heads) {
    case 1: return body(std::integral_constant<int, 1>());
    case 2: return body(std::integral_constant<int, 2>());
    case 3: return body(std::integral_constant<int, 3>());
    default: return body(std::integral_constant<int, 4>());
  }
}

// q (B, H, 1, D), keys and values (B, H_kv, L, D) fp32, allowed (B, L) bool -> (B, H, 1, D) fp32.
at::Tensor one_query_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                               const at::Tensor& allowed, double scale) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && q.scalar_type() == at::kFloat, "one_query_attention: q must be (B, H, 1, D) fp32");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3);
  TORCH_CHECK(keys.dim() == 4 && keys.sizes() == values.sizes() && keys.size(0) == B && keys.size(3) == D &&
                  keys.scalar_type() == at::kFloat && values.scalar_type() == at::kFloat,
              "one_query_attention: keys and values must be (B, H_kv, L, D) fp32");
  const int64_t kv_heads = keys.size(1), L = keys.size(2);
  TORCH_CHECK(kv_heads > 0 && H % kv_heads == 0, "one_query_attention: H must be a multiple of H_kv");
  TORCH_CHECK(allowed.scalar_type() == at::kBool && allowed.numel() == B * L, "one_query_attention: allowed must be (B, L) bool");
  const int64_t G = H / kv_heads, chunks = std::max<int64_t>(1, (L + kChunkKeys - 1) / kChunkKeys);
  const at::Tensor qc = q.contiguous(), kc = keys.contiguous(), vc = values.contiguous(), mc = allowed.contiguous();
  const float* qp = qc.data_ptr<float>();
  const float* kp = kc.data_ptr<float>();
  const float* vp = vc.data_ptr<float>();
  const bool* mp = mc.data_ptr<bool>();
  const int64_t tasks = B * kv_heads * chunks;  // task t: row b, key/value head, chunk
  std::vector<float> largest(tasks * G), sum(tasks * G), acc(tasks * G * D);
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores(kHeadsTogether * kChunkKeys);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t chunk = t % chunks, head = (t / chunks) % kv_heads, b = t / (chunks * kv_heads);
      const int64_t l0 = chunk * kChunkKeys, n = std::min(L, l0 + kChunkKeys) - l0;
      const int64_t rows = ((b * kv_heads + head) * L + l0) * D;  // the chunk's first key and value
      for (int64_t g0 = 0; g0 < G; g0 += kHeadsTogether)
        with_heads(std::min<int64_t>(kHeadsTogether, G - g0), [&](auto R) {
          attend_chunk<decltype(R)::value>(qp + (b * H + head * G + g0) * D, kp + rows, vp + rows, mp + b * L + l0, n,
                                           D, static_cast<float>(scale), &largest[t * G + g0], &sum[t * G + g0],
                                           &acc[(t * G + g0) * D], scores.data());
        });
    }
  });
  // Merge the chunks of each head in order: exp(largest_c - overall) rescales chunk c's sums.
  at::Tensor out = at::empty({B, H, 1, D}, qc.options());
  float* op = out.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t head = 0; head < kv_heads; ++head)
      for (int64_t g = 0; g < G; ++g) {
        const int64_t first = (b * kv_heads + head) * chunks;
        float overall = -std::numeric_limits<float>::infinity();
        for (int64_t c = 0; c < chunks; ++c) overall = std::max(overall, largest[(first + c) * G + g]);
        float* row = op + (b * H + head * G + g) * D;
        std::fill(row, row + D, 0.f);
        if (overall == -std::numeric_limits<float>::infinity()) continue;  // every key hidden: zeros
        float total = 0.f;
        for (int64_t c = 0; c < chunks; ++c) {
          const int64_t t = first + c;
          if (largest[t * G + g] == -std::numeric_limits<float>::infinity()) continue;
          const float rescale = std::exp(largest[t * G + g] - overall);
          total += rescale * sum[t * G + g];
          const float* part = &acc[(t * G + g) * D];
          for (int64_t d = 0; d < D; ++d) row[d] += rescale * part[d];
        }
        const float inverse = 1.f / total;
        for (int64_t d = 0; d < D; ++d) row[d] *= inverse;
      }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(instructkit_native, m) {
  m.def("one_query_attention(Tensor q, Tensor keys, Tensor values, Tensor allowed, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(instructkit_native, CPU, m) { m.impl("one_query_attention", &one_query_attention); }
