// Decode attention over the engine's paged KV cache on the CPU: afm.engine.attention calls it for the
// sequences of a step that contribute one query token each (decoding), reading keys and values straight
// from their cache blocks.
//
//   paged_decode(q, k_cache, v_cache, block_tables, seq_lens, scale) -> out
//
// q, out: (S, Hq, D), float32 or bfloat16; k_cache, v_cache: (blocks, block_size, Hkv, D), float32 or
// bfloat16; block_tables: (S, max_blocks) int32, each sequence's blocks in order; seq_lens: (S,) int32,
// the number of cached keys each query attends to (its own included). Query head h reads key head
// h / (Hq / Hkv).
//
// One task per (sequence, key head) reads that head's keys and values once for all the query heads that
// share it, in block order, with an online softmax in float32 (FlashAttention's recurrence): no gathered
// copy of the cache, and no slot past a sequence's length is read. The loops over head_dim are plain C++
// that the compiler vectorizes for the machine (-O3 -march=native, OpenMP simd reductions).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

inline float bf16_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// A float32 view of a float32 or bfloat16 row of n values: the row itself, or its conversion in buf.
inline const float* as_float(const void* src, bool bf16, int64_t n, float* buf) {
  if (!bf16) return static_cast<const float*>(src);
  const auto* s = static_cast<const uint16_t*>(src);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) buf[i] = bf16_to_float(s[i]);
  return buf;
}

// e^x for x <= 0 (softmax terms), written so that the compiler vectorizes a loop of it: 2^n * e^r with
// r = x - n ln 2, |r| <= ln2 / 2, and a degree-6 polynomial (Cephes' coefficients, relative error about
// 2e-7). Below -87 the result is flushed to 0.
inline float exp_nonpositive(float x) {
  const float xc = std::max(x, -87.0f);
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return x < -87.0f ? 0.0f : p * scale;
}

inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4,
              "paged_decode: q must be (S, Hq, D) and the caches (blocks, block_size, Hkv, D)");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == v_cache.scalar_type(),
              "paged_decode: the key and value caches must match in shape and dtype");
  const auto qt = q.scalar_type(), ct = k_cache.scalar_type();
  TORCH_CHECK((qt == at::kFloat || qt == at::kBFloat16) && (ct == at::kFloat || ct == at::kBFloat16),
              "paged_decode: q and the caches must be float32 or bfloat16");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "paged_decode: q and the caches must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt &&
                  block_tables.is_contiguous() && seq_lens.is_contiguous() && block_tables.dim() == 2 &&
                  block_tables.size(0) == q.size(0) && seq_lens.numel() == q.size(0),
              "paged_decode: block_tables (S, max_blocks) and seq_lens (S,) must be contiguous int32");
  const int64_t S = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t num_blocks = k_cache.size(0), BS = k_cache.size(1), Hkv = k_cache.size(2), max_blocks = block_tables.size(1);
  TORCH_CHECK(k_cache.size(3) == D && Hq % Hkv == 0, "paged_decode: head_dim or head counts do not match the cache");
  const int64_t G = Hq / Hkv;
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(lens[s] >= 1 && lens[s] <= max_blocks * BS, "paged_decode: sequence ", s, " has length ", lens[s],
                ", outside 1..", max_blocks * BS);
    for (int64_t b = 0; b < (lens[s] + BS - 1) / BS; ++b)
      TORCH_CHECK(tables[s * max_blocks + b] >= 0 && tables[s * max_blocks + b] < num_blocks,
                  "paged_decode: sequence ", s, " names block ", tables[s * max_blocks + b], " of ", num_blocks);
  }
  auto out = at::empty_like(q);
  const bool q_bf16 = qt == at::kBFloat16, c_bf16 = ct == at::kBFloat16;
  const int64_t q_item = q.element_size(), c_item = k_cache.element_size();
  const char* Q = static_cast<const char*>(q.data_ptr());
  const char* K = static_cast<const char*>(k_cache.data_ptr());
  const char* V = static_cast<const char*>(v_cache.data_ptr());
  char* O = static_cast<char*>(out.data_ptr());
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, S * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), kf(D), vf(D), scores(G * BS);
    std::vector<float> m(G), l(G);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t s = w / Hkv, kvh = w % Hkv, len = lens[s];
      for (int64_t g = 0; g < G; ++g) {
        const float* qrow = as_float(Q + ((s * Hq + kvh * G + g) * D) * q_item, q_bf16, D, kf.data());
        for (int64_t i = 0; i < D; ++i) qf[g * D + i] = qrow[i] * sc;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.f);
      for (int64_t b = 0; b * BS < len; ++b) {
        const int64_t block = tables[s * max_blocks + b], n = std::min(BS, len - b * BS);
        const int64_t base = (block * BS * Hkv + kvh) * D;  // slot t of the block: base + t * Hkv * D
        for (int64_t t = 0; t < n; ++t) {
          const float* k = as_float(K + (base + t * Hkv * D) * c_item, c_bf16, D, kf.data());
          for (int64_t g = 0; g < G; ++g) scores[g * BS + t] = dot(qf.data() + g * D, k, D);
        }
        for (int64_t g = 0; g < G; ++g) {
          float* sg = scores.data() + g * BS;
          const float m_new = std::max(m[g], *std::max_element(sg, sg + n));
          const float alpha = std::exp(m[g] - m_new);  // 0 on the first block (m = -inf)
          m[g] = m_new;
          float* a = acc.data() + g * D;
#pragma omp simd
          for (int64_t i = 0; i < D; ++i) a[i] *= alpha;
          float sum = 0.f;
#pragma omp simd reduction(+ : sum)
          for (int64_t t = 0; t < n; ++t) {
            sg[t] = exp_nonpositive(sg[t] - m_new);
            sum += sg[t];
          }
          l[g] = l[g] * alpha + sum;
        }
        for (int64_t t = 0; t < n; ++t) {
          const float* v = as_float(V + (base + t * Hkv * D) * c_item, c_bf16, D, vf.data());
          for (int64_t g = 0; g < G; ++g) {
            const float p = scores[g * BS + t];
            float* a = acc.data() + g * D;
#pragma omp simd
            for (int64_t i = 0; i < D; ++i) a[i] += p * v[i];
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        const float inv = 1.f / l[g];
        char* dst = O + ((s * Hq + kvh * G + g) * D) * q_item;
        if (q_bf16) {
          auto* o = reinterpret_cast<at::BFloat16*>(dst);
          for (int64_t i = 0; i < D; ++i) o[i] = at::BFloat16(acc[g * D + i] * inv);  // round to nearest even
        } else {
          auto* o = reinterpret_cast<float*>(dst);
          for (int64_t i = 0; i < D; ++i) o[i] = acc[g * D + i] * inv;
        }
      }
    }
  });
  return out;
}

std::string isa() { return "c++"; }

}  // namespace

TORCH_LIBRARY(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, float scale) -> Tensor");
  m.def("isa() -> str", &isa);
}

TORCH_LIBRARY_IMPL(TORCH_EXTENSION_NAME, CPU, m) { m.impl("paged_decode", &paged_decode); }
