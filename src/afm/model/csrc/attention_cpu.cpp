// Causal attention over packed documents on the CPU, forward and backward, for bfloat16 tensors, using
// AVX512-BF16 dot products (vdpbf16ps). afm.model.cpu_attention wraps it as a PyTorch op with autograd.
//
//   attention_fwd(q, k, v, starts, scale) -> (out, lse)
//   attention_bwd(q, k, v, out, lse, dout, starts, scale) -> (dq, dk, dv)
//
// q, out, dout: (B, T, H, D); k, v, dk, dv: (B, T, KV, D); all bfloat16 and contiguous, H a multiple of
// KV (grouped-query attention: query head h reads key head h / (H / KV)), D a multiple of 64. starts:
// (B, T) int32, non-decreasing along T: query t attends to keys starts[t] .. t (causal attention confined
// to its document; all zeros is plain causal attention). lse: (B, H, T) float32, the log-sum-exp of each
// query's scaled scores, saved for the backward.
//
// The algorithm is FlashAttention's (https://arxiv.org/abs/2205.14135): blocks of 64 queries by 64 keys,
// an online softmax in float32, the probabilities rounded to bfloat16 for the second product, and the
// backward recomputing the probabilities from lse. Key blocks that no query of a block can see (before
// the earliest document start, after the last query) are skipped, so causal attention costs half of full
// attention and short documents less. The backward runs two passes so that no two threads write one
// output: dq over query blocks, then dk and dv over key blocks (with the scores recomputed transposed).
//
// Every product is one shape: C (4 rows x 64 columns, float32) (+)= A (4 rows of n bfloat16 pairs) x
// B (n pairs x 64 columns), where B is packed so that one 64-byte load holds the pairs of 16 columns.
// vdpbf16ps multiplies a broadcast pair of A with 16 pairs of B and adds both products to 16 float32
// lanes: a 4 x 64 register tile takes 4 broadcasts, 4 loads and 16 such instructions per pair. The
// operands are therefore packed once per call in two layouts: pairs along the head dimension (for
// q.k and do.v products) and pairs along tokens (for p.v, ds.k, p^T.do and ds^T.q).
//
// Compiled with -march=native; without AVX512-BF16 the ops raise and `isa()` says "none".

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define AFM_ATTENTION_AVX512BF16 1
#include <immintrin.h>
#endif

namespace {

std::string isa() {
#ifdef AFM_ATTENTION_AVX512BF16
  return "avx512-bf16";
#else
  return "none";
#endif
}

#ifdef AFM_ATTENTION_AVX512BF16

constexpr int64_t BQ = 64;  // queries per block
constexpr int64_t BK = 64;  // keys per block
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// e^x for x <= 0 (and -inf), float32: 2^n * e^r with r = x - n ln 2 in [-ln2 / 2, ln2 / 2] and a degree-6
// polynomial for e^r (Cephes' coefficients; relative error about 2e-7, below bfloat16's 4e-3).
inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));  // e^-87 is 1.6e-38, still normal; -inf lands here too
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i e = _mm512_slli_epi32(_mm512_cvtps_epi32(n), 23);
  return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p), e));
}

// C[r][0..63] = (accumulate ? C[r] : 0) + sum_i pair(a[r][i]) . b[i * ldb + 0..63] for r < 4; a rows and
// b hold bfloat16 pairs as uint32, c rows are ldc floats apart.
inline void tile(const uint32_t* const a[4], const uint32_t* b, int64_t ldb, int64_t n, float* c, int64_t ldc,
                 bool accumulate) {
  __m512 acc[4][4];
  for (int r = 0; r < 4; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = accumulate ? _mm512_loadu_ps(c + r * ldc + 16 * j) : _mm512_setzero_ps();
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t* bi = b + i * ldb;
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(bi), b1 = (__m512bh)_mm512_loadu_si512(bi + 16),
                   b2 = (__m512bh)_mm512_loadu_si512(bi + 32), b3 = (__m512bh)_mm512_loadu_si512(bi + 48);
    for (int r = 0; r < 4; ++r) {
      const __m512bh x = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[r][i]));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], x, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], x, b1);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], x, b2);
      acc[r][3] = _mm512_dpbf16_ps(acc[r][3], x, b3);
    }
  }
  for (int r = 0; r < 4; ++r)
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(c + r * ldc + 16 * j, acc[r][j]);
}

// C (rows x cols, row-major, ldc) (+)= A (rows of n pairs, row r at a + r * lda) x B (packed, ldb);
// rows a multiple of 4, cols of 64.
inline void matmul(const uint32_t* a, int64_t lda, const uint32_t* b, int64_t ldb, int64_t n, float* c, int64_t ldc,
                   int64_t rows, int64_t cols, bool accumulate) {
  for (int64_t r = 0; r < rows; r += 4) {
    const uint32_t* ar[4] = {a + r * lda, a + (r + 1) * lda, a + (r + 2) * lda, a + (r + 3) * lda};
    for (int64_t j = 0; j < cols; j += 64) tile(ar, b + j, ldb, n, c + r * ldc + j, ldc, accumulate);
  }
}

// Lanes j .. j + 15 of a row of block scores that lie in lo <= lane <= hi (the keys the row's query sees).
inline __mmask16 visible(int64_t j, int64_t lo, int64_t hi) {
  const __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(j)),
                                       _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  return _mm512_cmp_epi32_mask(idx, _mm512_set1_epi32(static_cast<int>(std::max<int64_t>(lo, -1))), _MM_CMPINT_NLT) &
         _mm512_cmp_epi32_mask(idx, _mm512_set1_epi32(static_cast<int>(std::min<int64_t>(hi, BK))), _MM_CMPINT_LE);
}

// 16 floats -> 16 bfloat16 (round to nearest even).
inline void store_bf16(uint16_t* dst, __m512 x) { _mm256_storeu_si256((__m256i*)dst, (__m256i)_mm512_cvtneps_pbh(x)); }

// Packed copies of one (B, T, NH, D) bfloat16 tensor, Tp = T rounded up to the block size, zero-padded:
//   by_dim   [B][NH][D / 2][Tp]: pair (x[t][2i], x[t][2i + 1]) at [i][t]  (B operand of x . y products)
//   by_token [B][NH][Tp / 2][D]: pair (x[2s][d], x[2s + 1][d]) at [s][d] (B operand of p . x products)
//   rows     [B][NH][Tp][D / 2]: the rows themselves, zero-padded      (A operand of x . y products)
struct Packed {
  at::Tensor by_dim, by_token, rows;
};

Packed pack(const at::Tensor& x, int64_t Tp, bool want_by_dim, bool want_by_token, bool want_rows) {
  const int64_t B = x.size(0), T = x.size(1), NH = x.size(2), D = x.size(3), P = D / 2;
  auto opts = x.options().dtype(at::kInt);
  Packed out;
  if (want_by_dim) out.by_dim = at::zeros({B, NH, P, Tp}, opts);
  if (want_by_token) out.by_token = at::zeros({B, NH, Tp / 2, D}, opts);
  if (want_rows) out.rows = at::zeros({B, NH, Tp, P}, opts);
  const uint16_t* src = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  at::parallel_for(0, B * NH, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / NH, h = bh % NH;
      uint32_t* dim = want_by_dim ? reinterpret_cast<uint32_t*>(out.by_dim.data_ptr<int32_t>()) + bh * P * Tp : nullptr;
      uint16_t* tok = want_by_token ? reinterpret_cast<uint16_t*>(out.by_token.data_ptr<int32_t>()) + bh * Tp * D : nullptr;
      uint16_t* row = want_rows ? reinterpret_cast<uint16_t*>(out.rows.data_ptr<int32_t>()) + bh * Tp * D : nullptr;
      for (int64_t t = 0; t < T; ++t) {
        const uint16_t* xr = src + ((b * T + t) * NH + h) * D;
        if (dim)
          for (int64_t i = 0; i < P; ++i) {
            uint32_t u;
            std::memcpy(&u, xr + 2 * i, 4);
            dim[i * Tp + t] = u;
          }
        if (tok) {
          uint16_t* dst = tok + (t / 2) * 2 * D + (t & 1);
          for (int64_t d = 0; d < D; ++d) dst[2 * d] = xr[d];
        }
        if (row) std::memcpy(row + t * D, xr, D * 2);
      }
    }
  });
  return out;
}

void check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& starts) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention: q, k and v must be (B, T, heads, D)");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16,
              "attention: q, k and v must be bfloat16");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), "attention: q, k and v must be contiguous");
  TORCH_CHECK(k.sizes() == v.sizes(), "attention: k and v must have one shape");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
              "attention: q and k must agree in batch, tokens and head_dim");
  TORCH_CHECK(q.size(2) % k.size(2) == 0, "attention: query heads must be a multiple of key heads");
  TORCH_CHECK(q.size(3) % 64 == 0, "attention: head_dim must be a multiple of 64");
  TORCH_CHECK(starts.scalar_type() == at::kInt && starts.is_contiguous() && starts.dim() == 2 &&
                  starts.size(0) == q.size(0) && starts.size(1) == q.size(1),
              "attention: starts must be contiguous int32 (B, T)");
  // The block loops rely on this: a block's first query has its earliest visible key.
  const int32_t* st = starts.data_ptr<int32_t>();
  const int64_t B = starts.size(0), T = starts.size(1);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const int32_t s = st[b * T + t];
      TORCH_CHECK(s >= 0 && s <= t && (t == 0 || s >= st[b * T + t - 1]),
                  "attention: starts must satisfy 0 <= starts[t] <= t and never decrease along t (row ", b,
                  ", token ", t, " has ", s, "); build them with afm.model.cpu_attention.document_starts");
    }
}

#endif  // AFM_ATTENTION_AVX512BF16

std::vector<at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& starts, double scale) {
#ifndef AFM_ATTENTION_AVX512BF16
  TORCH_CHECK(false, "attention: this CPU (or compiler) has no AVX512-BF16");
  return {};
#else
  check(q, k, v, starts);
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), KV = k.size(2), D = q.size(3), P = D / 2;
  const int64_t G = H / KV, Tp = (T + BK - 1) / BK * BK, nqb = Tp / BQ;
  auto out = at::empty_like(q);
  auto lse = at::empty({B, H, T}, q.options().dtype(at::kFloat));
  const Packed kp = pack(k, Tp, true, false, false);
  const Packed vp = pack(v, Tp, false, true, false);
  const Packed qp = pack(q, Tp, false, false, true);
  const uint32_t* K = reinterpret_cast<const uint32_t*>(kp.by_dim.data_ptr<int32_t>());
  const uint32_t* V = reinterpret_cast<const uint32_t*>(vp.by_token.data_ptr<int32_t>());
  const uint32_t* Q = reinterpret_cast<const uint32_t*>(qp.rows.data_ptr<int32_t>());
  const int32_t* st = starts.data_ptr<int32_t>();
  uint16_t* O = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  float* L = lse.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, B * H * nqb, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s_buf(BQ * BK), o_buf(BQ * D);
    std::vector<uint16_t> p_buf(BQ * BK);
    float m[BQ], l[BQ];
    for (int64_t w = begin; w < end; ++w) {
      const int64_t qb = w % nqb, bh = w / nqb, b = bh / H, h = bh % H, kvh = h / G;
      const int64_t q0 = qb * BQ, nq = std::min(T - q0, BQ);
      if (nq <= 0) continue;
      const int32_t* s_row = st + b * T;
      const uint32_t* Kb = K + (b * KV + kvh) * P * Tp;
      const uint32_t* Vb = V + (b * KV + kvh) * (Tp / 2) * D;
      const uint32_t* Qb = Q + ((b * H + h) * Tp + q0) * P;
      std::fill(o_buf.begin(), o_buf.end(), 0.f);
      std::fill(m, m + BQ, NEG_INF);
      std::fill(l, l + BQ, 0.f);
      for (int64_t k0 = s_row[q0] / BK * BK; k0 < q0 + nq; k0 += BK) {
        float* S = s_buf.data();
        matmul(Qb, P, Kb + k0, Tp, P, S, BK, BQ, BK, false);
        for (int64_t i = 0; i < BQ; ++i) {
          uint16_t* prow = p_buf.data() + i * BK;
          float* srow = S + i * BK;
          const int64_t t = q0 + i;
          if (i >= nq) {
            std::fill(prow, prow + BK, 0);
            continue;
          }
          const int64_t lo = s_row[t] - k0, hi = t - k0;  // visible keys: lo <= j <= hi
          __m512 mx = _mm512_set1_ps(NEG_INF);
          for (int64_t j = 0; j < BK; j += 16) {
            const __mmask16 ok = visible(j, lo, hi);
            const __m512 x = _mm512_mask_mul_ps(_mm512_set1_ps(NEG_INF), ok, _mm512_loadu_ps(srow + j), _mm512_set1_ps(sc));
            _mm512_storeu_ps(srow + j, x);
            mx = _mm512_max_ps(mx, x);
          }
          const float m_new = std::max(m[i], _mm512_reduce_max_ps(mx));
          if (m_new == NEG_INF) {  // no visible key yet in this row
            std::fill(prow, prow + BK, 0);
            continue;
          }
          const float alpha = std::exp(m[i] - m_new);
          m[i] = m_new;
          __m512 sum = _mm512_setzero_ps();
          for (int64_t j = 0; j < BK; j += 16) {
            const __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(srow + j), _mm512_set1_ps(m_new)));
            // masked scores are -inf: e^-87 underflows to ~1e-38, below every bfloat16 product that counts,
            // but zero them exactly
            const __m512 ez = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(_mm512_loadu_ps(srow + j), _mm512_set1_ps(NEG_INF), _CMP_NEQ_OQ), e);
            sum = _mm512_add_ps(sum, ez);
            store_bf16(prow + j, ez);
          }
          l[i] = l[i] * alpha + _mm512_reduce_add_ps(sum);
          if (alpha != 1.f) {
            float* orow = o_buf.data() + i * D;
            for (int64_t d = 0; d < D; d += 16)
              _mm512_storeu_ps(orow + d, _mm512_mul_ps(_mm512_loadu_ps(orow + d), _mm512_set1_ps(alpha)));
          }
        }
        matmul(reinterpret_cast<const uint32_t*>(p_buf.data()), BK / 2, Vb + (k0 / 2) * D, D, BK / 2, o_buf.data(), D,
               BQ, D, true);
      }
      for (int64_t i = 0; i < nq; ++i) {
        uint16_t* orow = O + ((b * T + q0 + i) * H + h) * D;
        const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
        for (int64_t d = 0; d < D; d += 16)
          store_bf16(orow + d, _mm512_mul_ps(_mm512_loadu_ps(o_buf.data() + i * D + d), _mm512_set1_ps(inv)));
        L[(b * H + h) * T + q0 + i] = l[i] > 0.f ? m[i] + std::log(l[i]) : NEG_INF;
      }
    }
  });
  return {out, lse};
#endif
}

std::vector<at::Tensor> attention_bwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dout,
                                      const at::Tensor& starts, double scale) {
#ifndef AFM_ATTENTION_AVX512BF16
  TORCH_CHECK(false, "attention: this CPU (or compiler) has no AVX512-BF16");
  return {};
#else
  check(q, k, v, starts);
  TORCH_CHECK(out.sizes() == q.sizes() && dout.sizes() == q.sizes() && out.is_contiguous() && dout.is_contiguous() &&
                  out.scalar_type() == at::kBFloat16 && dout.scalar_type() == at::kBFloat16,
              "attention backward: out and dout must be contiguous bfloat16 shaped like q");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.dim() == 3, "attention backward: lse must be float32 (B, H, T)");
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), KV = k.size(2), D = q.size(3), P = D / 2;
  const int64_t G = H / KV, Tp = (T + BK - 1) / BK * BK, nqb = Tp / BQ, nkb = Tp / BK;
  const float sc = static_cast<float>(scale);
  const int32_t* st = starts.data_ptr<int32_t>();
  const float* L = lse.data_ptr<float>();

  // delta[b][h][t] = sum_d dout . out (float32), padded with zeros to Tp.
  auto delta = at::zeros({B, H, Tp}, q.options().dtype(at::kFloat));
  float* Dl = delta.data_ptr<float>();
  {
    const auto* o = reinterpret_cast<const uint16_t*>(out.data_ptr<at::BFloat16>());
    const auto* g = reinterpret_cast<const uint16_t*>(dout.data_ptr<at::BFloat16>());
    at::parallel_for(0, B * T, 64, [&](int64_t begin, int64_t end) {
      for (int64_t bt = begin; bt < end; ++bt) {
        const int64_t b = bt / T, t = bt % T;
        for (int64_t h = 0; h < H; ++h) {
          const uint16_t* orow = o + (bt * H + h) * D;
          const uint16_t* grow = g + (bt * H + h) * D;
          __m512 acc = _mm512_setzero_ps();
          for (int64_t d = 0; d < D; d += 16) {
            const __m512 x = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(orow + d))), 16));
            const __m512 y = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(grow + d))), 16));
            acc = _mm512_fmadd_ps(x, y, acc);
          }
          Dl[(b * H + h) * Tp + t] = _mm512_reduce_add_ps(acc);
        }
      }
    });
  }
  const Packed qp = pack(q, Tp, true, true, true);
  const Packed gp = pack(dout, Tp, true, true, true);
  const Packed kp = pack(k, Tp, true, true, true);
  const Packed vp = pack(v, Tp, true, false, true);
  auto as_u32 = [](const at::Tensor& t) { return reinterpret_cast<const uint32_t*>(t.data_ptr<int32_t>()); };
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);

  // Pass 1, over query blocks: dq = scale * sum over key blocks of ds . k, ds = p * (dp - delta),
  // p = exp(scale * q.k - lse), dp = dout . v.
  at::parallel_for(0, B * H * nqb, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s_buf(BQ * BK), dp_buf(BQ * BK), acc(BQ * D);
    std::vector<uint16_t> ds_buf(BQ * BK);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t qb = w % nqb, bh = w / nqb, b = bh / H, h = bh % H, kvh = h / G;
      const int64_t q0 = qb * BQ, nq = std::min(T - q0, BQ);
      if (nq <= 0) continue;
      const int32_t* s_row = st + b * T;
      const uint32_t* Qr = as_u32(qp.rows) + ((b * H + h) * Tp + q0) * P;
      const uint32_t* Gr = as_u32(gp.rows) + ((b * H + h) * Tp + q0) * P;
      const uint32_t* Kd = as_u32(kp.by_dim) + (b * KV + kvh) * P * Tp;
      const uint32_t* Kt = as_u32(kp.by_token) + (b * KV + kvh) * (Tp / 2) * D;
      const uint32_t* Vd = as_u32(vp.by_dim) + (b * KV + kvh) * P * Tp;
      const float* lse_row = L + (b * H + h) * T;
      const float* d_row = Dl + (b * H + h) * Tp;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t k0 = s_row[q0] / BK * BK; k0 < q0 + nq; k0 += BK) {
        matmul(Qr, P, Kd + k0, Tp, P, s_buf.data(), BK, BQ, BK, false);
        matmul(Gr, P, Vd + k0, Tp, P, dp_buf.data(), BK, BQ, BK, false);
        for (int64_t i = 0; i < BQ; ++i) {
          uint16_t* dsrow = ds_buf.data() + i * BK;
          const int64_t t = q0 + i;
          if (i >= nq || lse_row[t] == NEG_INF) {
            std::fill(dsrow, dsrow + BK, 0);
            continue;
          }
          const int64_t lo = s_row[t] - k0, hi = t - k0;
          const __m512 lse_i = _mm512_set1_ps(lse_row[t]), delta_i = _mm512_set1_ps(d_row[t]);
          for (int64_t j = 0; j < BK; j += 16) {
            const __mmask16 ok = visible(j, lo, hi);
            const __m512 p = _mm512_maskz_mov_ps(ok, exp_ps(_mm512_fmsub_ps(_mm512_loadu_ps(s_buf.data() + i * BK + j), _mm512_set1_ps(sc), lse_i)));
            const __m512 ds = _mm512_mul_ps(p, _mm512_sub_ps(_mm512_loadu_ps(dp_buf.data() + i * BK + j), delta_i));
            store_bf16(dsrow + j, ds);
          }
        }
        matmul(reinterpret_cast<const uint32_t*>(ds_buf.data()), BK / 2, Kt + (k0 / 2) * D, D, BK / 2, acc.data(), D,
               BQ, D, true);
      }
      uint16_t* dq_out = reinterpret_cast<uint16_t*>(dq.data_ptr<at::BFloat16>());
      for (int64_t i = 0; i < nq; ++i) {
        uint16_t* row = dq_out + ((b * T + q0 + i) * H + h) * D;
        for (int64_t d = 0; d < D; d += 16)
          store_bf16(row + d, _mm512_mul_ps(_mm512_loadu_ps(acc.data() + i * D + d), _mm512_set1_ps(sc)));
      }
    }
  });

  // Pass 2, over key blocks: with scores transposed (rows = keys), dv = sum p^T . dout and
  // dk = scale * sum ds^T . q over the query heads of the group and the query blocks that see the keys.
  at::parallel_for(0, B * KV * nkb, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s_buf(BK * BQ), dp_buf(BK * BQ), dk_acc(BK * D), dv_acc(BK * D);
    std::vector<uint16_t> p_buf(BK * BQ), ds_buf(BK * BQ);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t kb = w % nkb, bk = w / nkb, b = bk / KV, kvh = bk % KV;
      const int64_t k0 = kb * BK, nk = std::min(T - k0, BK);
      if (nk <= 0) continue;
      const int32_t* s_row = st + b * T;
      const uint32_t* Kr = as_u32(kp.rows) + ((b * KV + kvh) * Tp + k0) * P;
      const uint32_t* Vr = as_u32(vp.rows) + ((b * KV + kvh) * Tp + k0) * P;
      std::fill(dk_acc.begin(), dk_acc.end(), 0.f);
      std::fill(dv_acc.begin(), dv_acc.end(), 0.f);
      for (int64_t h = kvh * G; h < (kvh + 1) * G; ++h) {
        const uint32_t* Qd = as_u32(qp.by_dim) + (b * H + h) * P * Tp;
        const uint32_t* Qt = as_u32(qp.by_token) + (b * H + h) * (Tp / 2) * D;
        const uint32_t* Gd = as_u32(gp.by_dim) + (b * H + h) * P * Tp;
        const uint32_t* Gt = as_u32(gp.by_token) + (b * H + h) * (Tp / 2) * D;
        const float* lse_row = L + (b * H + h) * T;
        const float* d_row = Dl + (b * H + h) * Tp;
        for (int64_t q0 = k0 / BQ * BQ; q0 < T; q0 += BQ) {
          if (s_row[q0] >= k0 + nk) break;  // starts never decrease: later queries see none of these keys
          const int64_t nq = std::min(T - q0, BQ);
          matmul(Kr, P, Qd + q0, Tp, P, s_buf.data(), BQ, BK, BQ, false);   // s^T[j][i] = k_j . q_i
          matmul(Vr, P, Gd + q0, Tp, P, dp_buf.data(), BQ, BK, BQ, false);  // dp^T[j][i] = v_j . dout_i
          // per query column: lse and delta (queries past T or without visible keys contribute nothing)
          alignas(64) float lse_c[BQ], delta_c[BQ];
          alignas(64) int32_t lo_c[BQ];
          for (int64_t i = 0; i < BQ; ++i) {
            const bool live = i < nq && lse_row[q0 + i] != NEG_INF;
            lse_c[i] = live ? lse_row[q0 + i] : 0.f;
            delta_c[i] = live ? d_row[q0 + i] : 0.f;
            lo_c[i] = live ? s_row[q0 + i] : std::numeric_limits<int32_t>::max();  // a start past every key
          }
          for (int64_t j = 0; j < BK; ++j) {
            const int64_t key = k0 + j;
            uint16_t* prow = p_buf.data() + j * BQ;
            uint16_t* dsrow = ds_buf.data() + j * BQ;
            if (j >= nk) {
              std::fill(prow, prow + BQ, 0);
              std::fill(dsrow, dsrow + BQ, 0);
              continue;
            }
            for (int64_t i = 0; i < BQ; i += 16) {
              const __m512i t = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(q0 + i)),
                                                 _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
              const __m512i kv = _mm512_set1_epi32(static_cast<int>(key));
              const __mmask16 ok = _mm512_cmp_epi32_mask(kv, t, _MM_CMPINT_LE) &
                                   _mm512_cmp_epi32_mask(_mm512_load_si512(lo_c + i), kv, _MM_CMPINT_LE);
              const __m512 p = _mm512_maskz_mov_ps(ok, exp_ps(_mm512_fmsub_ps(_mm512_loadu_ps(s_buf.data() + j * BQ + i), _mm512_set1_ps(sc), _mm512_load_ps(lse_c + i))));
              const __m512 ds = _mm512_mul_ps(p, _mm512_sub_ps(_mm512_loadu_ps(dp_buf.data() + j * BQ + i), _mm512_load_ps(delta_c + i)));
              store_bf16(prow + i, p);
              store_bf16(dsrow + i, ds);
            }
          }
          matmul(reinterpret_cast<const uint32_t*>(p_buf.data()), BQ / 2, Gt + (q0 / 2) * D, D, BQ / 2, dv_acc.data(), D,
                 BK, D, true);
          matmul(reinterpret_cast<const uint32_t*>(ds_buf.data()), BQ / 2, Qt + (q0 / 2) * D, D, BQ / 2, dk_acc.data(), D,
                 BK, D, true);
        }
      }
      uint16_t* dk_out = reinterpret_cast<uint16_t*>(dk.data_ptr<at::BFloat16>());
      uint16_t* dv_out = reinterpret_cast<uint16_t*>(dv.data_ptr<at::BFloat16>());
      for (int64_t j = 0; j < nk; ++j) {
        uint16_t* krow = dk_out + ((b * T + k0 + j) * KV + kvh) * D;
        uint16_t* vrow = dv_out + ((b * T + k0 + j) * KV + kvh) * D;
        for (int64_t d = 0; d < D; d += 16) {
          store_bf16(krow + d, _mm512_mul_ps(_mm512_loadu_ps(dk_acc.data() + j * D + d), _mm512_set1_ps(sc)));
          store_bf16(vrow + d, _mm512_loadu_ps(dv_acc.data() + j * D + d));
        }
      }
    }
  });
  return {dq, dk, dv};
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(TORCH_EXTENSION_NAME, m) {
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor starts, float scale) -> Tensor[]");
  m.def("attention_bwd(Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor dout, Tensor starts, float scale) -> Tensor[]");
  m.def("isa() -> str", &isa);
}

TORCH_LIBRARY_IMPL(TORCH_EXTENSION_NAME, CPU, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
}
