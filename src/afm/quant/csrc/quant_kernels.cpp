// Weight-only quantized matrix multiplication on the CPU for ggml's Q4_0 and Q8_0 block formats.
//
//   linear_q4_0(x, w) and linear_q8_0(x, w): y = x @ dequant(w).T, x float32 (M, K), y float32 (M, N).
//
// Weight layout (ggml's, as GGUF files store it): w is uint8 (N, K / 32 * block bytes), one row of
// K / 32 blocks per output feature, rows `ldw` bytes apart, blocks packed back to back with no
// alignment (a row may start at any byte, e.g. inside a memory-mapped GGUF file):
//   Q4_0, 18 bytes: float16 d, then 16 bytes; weight j (0..15) is the low nibble of byte j and
//         weight j + 16 its high nibble; the value is (nibble - 8) * d.
//   Q8_0, 34 bytes: float16 d, then 32 int8 q; the value is q * d.
//
// The algorithm is llama.cpp's: every call first quantizes the activation rows to Q8_0-style blocks
// (per 32 values: scale dx = amax / 127 rounded to float16, int8 q = round(x / dx), exactly as ggml's
// quantize_row_q8_0_ref does), then every (activation block, weight block) pair is an exact integer
// dot product of 32 int8 x int8 values, scaled by dw * dx and summed in float32.
//
// The integer dots use x86's u8 x s8 instructions: vpdpbusd (AVX512-VNNI / AVX-VNNI) or, without
// VNNI, vpmaddubsw + vpmaddwd. The weights are the signed operand (Q4_0 as nibble - 8, Q8_0 as
// stored) and the activations are stored as unsigned bytes x + 128 (x ^ 0x80), so that a dot gives
// sum(w x) + 128 sum(w); the excess depends on the weights only and is removed exactly in int32 by
// starting each block's accumulator at -128 sum(w). vpmaddubsw adds pairs of products in int16
// with saturation, which (x + 128) * w overflows for Q8_0's full int8 range; without VNNI, Q8_0
// therefore uses ggml's sign trick instead, |w| times (x with w's sign), on plain int8 activations.
//
// Two kernels, chosen by the number of activation rows M:
//   - M <= kGemvMaxM (decode, memory bound): the weight rows are streamed from memory once, in
//     memory order with software prefetch, each vector of blocks unpacked and scaled once and dotted
//     with all M activation rows, whose quantized bytes and scales (36 bytes per block) stay in cache.
//   - Larger M (prefill, compute bound): a tile of NR weight rows x up to KC blocks is unpacked into
//     int8 once and transposed so that one vector holds 4 consecutive k of NR / 2 different rows,
//     then reused from L1/L2 for every group of MR activation rows: per 4 k, each activation row
//     costs one broadcast 32-bit load and two integer dot instructions, an MR x NR register tile as in
//     a BLAS micro-kernel.
// Both parallelise over output features with at::parallel_for (torch's thread pool, so
// torch.set_num_threads applies); the prefill kernel also splits M when there are too few column
// tiles. Every output element is computed by the same instruction sequence whichever thread runs it,
// so results do not depend on the thread count.
//
// The code path is chosen at compile time from the target macros (the extension is built with
// -march=native on the machine that runs it): AVX-512 (F + BW + VL), else AVX2 + FMA + F16C, else
// portable scalar C++.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <string>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__FMA__) && \
    defined(__F16C__)
#define AFMQ_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define AFMQ_AVX2 1
#endif
#if defined(AFMQ_AVX512) || defined(AFMQ_AVX2)
#define AFMQ_SIMD 1
#endif

#if defined(AFMQ_SIMD) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t QK = 32;  // values per block, both formats

enum class Fmt { Q4_0, Q8_0 };

template <Fmt F>
constexpr int64_t block_bytes() {
  return F == Fmt::Q4_0 ? 18 : 34;
}

// ---------------------------------------------------------------------------------------------
// Scalar helpers

inline uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, sizeof v);  // blocks are not aligned
  return v;
}

inline int32_t load_i32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

#if defined(__F16C__)
inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

// Round to nearest even, as numpy's astype(float16) and F16C's vcvtps2ph do.
inline uint16_t float_to_half(float f) { return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); }
#else
inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: man * 2^-24, exact in float32
    const float f = std::ldexp(static_cast<float>(man), -24);
    return sign ? -f : f;
  }
  if (exp == 31) return f32_from_bits(sign | 0x7f800000u | (man << 13));
  return f32_from_bits(sign | ((exp + 112) << 23) | (man << 13));
}

// Round to nearest even, as numpy's astype(float16) does. The FP16 library's branch-free conversion
// (also ggml's): float arithmetic does the rounding.
inline uint16_t float_to_half(float f) {
  const float scale_to_inf = 0x1.0p+112f;
  const float scale_to_zero = 0x1.0p-110f;
  float base = (std::fabs(f) * scale_to_inf) * scale_to_zero;
  const uint32_t w = f32_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xff000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007c00u;
  const uint32_t mantissa_bits = bits & 0x00000fffu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xff000000u ? 0x7e00u : nonsign));
}
#endif

// The exact integer dot product of one weight block with 32 quantized activations stored xor x_xor.
// The products are narrowed to int16 (they fit: |w x| <= 128 * 127) before summing because GCC 12
// vectorizes a plain sum of int8 x int8 products with AVX-VNNI's vpdpbusd, which treats one operand
// as unsigned: a miscompilation that gives wrong sums for negative weights.
template <Fmt F>
inline int32_t block_dot_exact(const uint8_t* blk, const uint8_t* xq, uint8_t x_xor) {
  const uint8_t* qs = blk + 2;
  int32_t s = 0;
  if constexpr (F == Fmt::Q4_0) {
    for (int j = 0; j < 16; ++j) {
      s += static_cast<int16_t>(((qs[j] & 0x0f) - 8) * static_cast<int8_t>(xq[j] ^ x_xor));
      s += static_cast<int16_t>(((qs[j] >> 4) - 8) * static_cast<int8_t>(xq[j + 16] ^ x_xor));
    }
  } else {
    for (int j = 0; j < 32; ++j)
      s += static_cast<int16_t>(static_cast<int8_t>(qs[j]) * static_cast<int8_t>(xq[j] ^ x_xor));
  }
  return s;
}

// ---------------------------------------------------------------------------------------------
// Activation quantization. One block exactly as formats.quantize_q8_0 (ggml's
// quantize_row_q8_0_ref) does it: d = amax / 127, q = sign(v) * floor(|v| + 0.5) with
// v = x * (1 / d), in float32 throughout; stores q xor x_xor and returns d before float16 rounding.

#if defined(AFMQ_AVX512)
inline float quantize_block(const float* x, uint8_t x_xor, uint8_t* q) {
  const __m512 v0 = _mm512_loadu_ps(x), v1 = _mm512_loadu_ps(x + 16);
  const float d = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1))) / 127.f;
  const __m512 id = _mm512_set1_ps(d != 0.f ? 1.f / d : 0.f);
  const __m512 half = _mm512_set1_ps(0.5f);
  const __m512i sign = _mm512_set1_epi32(static_cast<int32_t>(0x80000000u));
  auto round = [&](__m512 v) {
    const __m512 p = _mm512_mul_ps(v, id);
    __m512 r = _mm512_roundscale_ps(_mm512_add_ps(_mm512_abs_ps(p), half),
                                    _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    r = _mm512_castsi512_ps(
        _mm512_or_si512(_mm512_castps_si512(r), _mm512_and_si512(_mm512_castps_si512(p), sign)));
    return _mm512_cvttps_epi32(r);
  };
  const __m128i flip = _mm_set1_epi8(static_cast<char>(x_xor));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm_xor_si128(_mm512_cvtepi32_epi8(round(v0)), flip));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm_xor_si128(_mm512_cvtepi32_epi8(round(v1)), flip));
  return d;
}
#elif defined(AFMQ_AVX2)
inline float quantize_block(const float* x, uint8_t x_xor, uint8_t* q) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 v[4];
  __m256 amax = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(x + 8 * i);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  const float d = _mm_cvtss_f32(m4) / 127.f;
  const __m256 id = _mm256_set1_ps(d != 0.f ? 1.f / d : 0.f);
  const __m256 half = _mm256_set1_ps(0.5f);
  __m256i i[4];
  for (int k = 0; k < 4; ++k) {
    const __m256 p = _mm256_mul_ps(v[k], id);
    __m256 r = _mm256_round_ps(_mm256_add_ps(_mm256_andnot_ps(sign, p), half),
                               _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    i[k] = _mm256_cvttps_epi32(_mm256_or_ps(r, _mm256_and_ps(p, sign)));
  }
  // ggml's packing: the saturating packs interleave 128-bit lanes, the permutation undoes it.
  const __m256i p01 = _mm256_packs_epi32(i[0], i[1]);
  const __m256i p23 = _mm256_packs_epi32(i[2], i[3]);
  const __m256i b = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p01, p23),
                                                _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                      _mm256_xor_si256(b, _mm256_set1_epi8(static_cast<char>(x_xor))));
  return d;
}
#else
inline float quantize_block(const float* x, uint8_t x_xor, uint8_t* q) {
  float amax = 0.f;
  for (int j = 0; j < QK; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float d = amax / 127.f;
  const float id = d != 0.f ? 1.f / d : 0.f;
  for (int j = 0; j < QK; ++j) {
    const float v = x[j] * id;
    const float r = std::floor(std::fabs(v) + 0.5f);
    q[j] = static_cast<uint8_t>(static_cast<int8_t>(v < 0.f ? -r : r)) ^ x_xor;
  }
  return d;
}
#endif

// Quantized activations: M rows of K bytes q (the int8 values xor x_xor, rows K apart) and the
// float16-rounded block scales d (M x nb, row-major).
struct Act {
  int64_t M, K, nb;
  uint8_t x_xor;
  const uint8_t* q;
  const float* d;
};

void quantize_row(const float* x, int64_t nb, uint8_t x_xor, uint8_t* q, float* d) {
  for (int64_t b = 0; b < nb; ++b)
    d[b] = half_to_float(float_to_half(quantize_block(x + b * QK, x_xor, q + b * QK)));
}

// ---------------------------------------------------------------------------------------------
// Scalar kernel: the whole implementation without AVX2.

#if !defined(AFMQ_SIMD)
template <Fmt F>
void scalar_rows(const Act& a, const uint8_t* w, int64_t ldw, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  constexpr int64_t BB = block_bytes<F>();
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * ldw;
    for (int64_t m = 0; m < a.M; ++m) {
      float acc = 0.f;
      for (int64_t b = 0; b < a.nb; ++b) {
        const int32_t dot = block_dot_exact<F>(row + b * BB, a.q + m * a.K + b * QK, a.x_xor);
        acc += half_to_float(load_u16(row + b * BB)) * (a.d[m * a.nb + b] * static_cast<float>(dot));
      }
      y[m * ldy + n] = acc;
    }
  }
}
#endif

#if defined(AFMQ_SIMD)

// ---------------------------------------------------------------------------------------------
// SIMD traits: one struct per vector width with the same static functions, so that the kernels are
// written once. A vector holds kLanes int32 / float lanes; 8 lanes (32 bytes) cover one block, so a
// vector covers kBlocks = kLanes / 8 blocks. Loaders take the address of each block they read (p0,
// and p1 for the second block of a 512-bit vector): consecutive blocks of a row when decoding, blocks
// of two different rows when packing a tile.

#if defined(AFMQ_AVX512)
struct Vec {
  using vi = __m512i;
  using vf = __m512;
  static constexpr int kLanes = 16;
#if defined(__AVX512VNNI__)
  static constexpr bool kVnni = true;
#else
  static constexpr bool kVnni = false;
#endif

  static vi zero_i() { return _mm512_setzero_si512(); }
  static vf zero_f() { return _mm512_setzero_ps(); }
  static vi loadi(const void* p) { return _mm512_loadu_si512(p); }
  static void storei(void* p, vi v) { _mm512_storeu_si512(p, v); }
  static vf loadf(const float* p) { return _mm512_loadu_ps(p); }
  static vi bcast_i32(const void* p) { return _mm512_set1_epi32(load_i32(p)); }
  static vi bcast_i8(uint8_t v) { return _mm512_set1_epi8(static_cast<char>(v)); }
  static vi set_i32(int32_t v) { return _mm512_set1_epi32(v); }
  static vi sub_i8(vi a, vi b) { return _mm512_sub_epi8(a, b); }
  static vf bcast_f(float f) { return _mm512_set1_ps(f); }
  static vf cvt(vi v) { return _mm512_cvtepi32_ps(v); }
  static vi neg(vi v) { return _mm512_sub_epi32(_mm512_setzero_si512(), v); }
  static vf mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
  static vf fmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
  static float hsum(vf v) { return _mm512_reduce_add_ps(v); }
  static __mmask16 tail_mask(int n) {
    return n >= 16 ? 0xffff : n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1);
  }
  static vf load_n(const float* p, int n) { return _mm512_maskz_loadu_ps(tail_mask(n), p); }
  static void store_n(float* p, vf v, int n) { _mm512_mask_storeu_ps(p, tail_mask(n), v); }

  // The nibbles of the Q4_0 blocks at p0 and p1 as bytes [lo0, hi0, lo1, hi1]: weights 0..31 of each
  // block, plus 8.
  static vi load_q4(const uint8_t* p0, const uint8_t* p1) {
    const __m256i a = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p0 + 2)));
    const __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p1 + 2)));
    const __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);  // [qs0, qs0, qs1, qs1]
    return _mm512_and_si512(_mm512_srlv_epi64(z, _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0)),
                            _mm512_set1_epi8(0x0f));
  }
  // The 2 x 32 int8 weights of the Q8_0 blocks at p0 and p1.
  static vi load_q8(const uint8_t* p0, const uint8_t* p1) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p0 + 2));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p1 + 2));
    return _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
  }
  // The float16 scales of the blocks at p0 and p1, each in the 8 lanes of its block.
  static vf load_d(const uint8_t* p0, const uint8_t* p1) {
    const __m128i a = _mm_set1_epi16(static_cast<short>(load_u16(p0)));
    const __m128i b = _mm_set1_epi16(static_cast<short>(load_u16(p1)));
    return _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(a), b, 1));
  }
  // Two consecutive float activation scales, each in the 8 lanes of its block.
  static void store_halfs(float* out, const uint16_t* h) {
    _mm512_storeu_ps(out, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h))));
  }
  static vf load_dx(const float* d) {
    const __m128 two = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(d)));
    return _mm512_permutexvar_ps(_mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
                                 _mm512_castps128_ps512(two));
  }

  // acc + per lane the sum of 4 u8 x s8 products.
  static vi dot_u8s8(vi acc, vi u, vi s) {
#if defined(__AVX512VNNI__)
    return _mm512_dpbusd_epi32(acc, u, s);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
#endif
  }
  // acc + per lane the sum of 4 s8 x s8 products (ggml's sign trick: |w| times x with w's sign).
  static vi dot_s8s8(vi acc, vi w, vi x) {
    const vi sx = _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w), _mm512_setzero_si512(), x);
    return dot_u8s8(acc, _mm512_abs_epi8(w), sx);
  }

  // r[i] holds row i in its low 256 bits and row i + 8 in its high 256 bits, 8 dwords each; on return
  // r[g] holds dword g of rows 0..15 (the transpose of two 8 x 8 dword matrices at once).
  static void transpose(vi r[8]) {
    vi s[8], u[8];
    for (int i = 0; i < 4; ++i) {
      s[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
      s[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int h = 0; h < 2; ++h) {  // rows 0..3 (+ 8..11), then rows 4..7 (+ 12..15)
      u[4 * h + 0] = _mm512_unpacklo_epi64(s[4 * h + 0], s[4 * h + 2]);  // dwords 0 and 4
      u[4 * h + 1] = _mm512_unpackhi_epi64(s[4 * h + 0], s[4 * h + 2]);  // 1 and 5
      u[4 * h + 2] = _mm512_unpacklo_epi64(s[4 * h + 1], s[4 * h + 3]);  // 2 and 6
      u[4 * h + 3] = _mm512_unpackhi_epi64(s[4 * h + 1], s[4 * h + 3]);  // 3 and 7
    }
    const __m512i lo = _mm512_set_epi64(13, 12, 5, 4, 9, 8, 1, 0);
    const __m512i hi = _mm512_set_epi64(15, 14, 7, 6, 11, 10, 3, 2);
    for (int g = 0; g < 4; ++g) {
      r[g] = _mm512_permutex2var_epi64(u[g], lo, u[4 + g]);
      r[g + 4] = _mm512_permutex2var_epi64(u[g], hi, u[4 + g]);
    }
  }
};
#else
struct Vec {
  using vi = __m256i;
  using vf = __m256;
  static constexpr int kLanes = 8;
#if defined(__AVXVNNI__)
  static constexpr bool kVnni = true;
#else
  static constexpr bool kVnni = false;
#endif

  static vi zero_i() { return _mm256_setzero_si256(); }
  static vf zero_f() { return _mm256_setzero_ps(); }
  static vi loadi(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static void storei(void* p, vi v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
  static vf loadf(const float* p) { return _mm256_loadu_ps(p); }
  static vi bcast_i32(const void* p) { return _mm256_set1_epi32(load_i32(p)); }
  static vi bcast_i8(uint8_t v) { return _mm256_set1_epi8(static_cast<char>(v)); }
  static vi set_i32(int32_t v) { return _mm256_set1_epi32(v); }
  static vi sub_i8(vi a, vi b) { return _mm256_sub_epi8(a, b); }
  static vf bcast_f(float f) { return _mm256_set1_ps(f); }
  static vf cvt(vi v) { return _mm256_cvtepi32_ps(v); }
  static vi neg(vi v) { return _mm256_sub_epi32(_mm256_setzero_si256(), v); }
  static vf mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
  static vf fmadd(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
  static float hsum(vf v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static __m256i tail_mask(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static vf load_n(const float* p, int n) { return _mm256_maskload_ps(p, tail_mask(n)); }
  static void store_n(float* p, vf v, int n) { _mm256_maskstore_ps(p, tail_mask(n), v); }

  // The nibbles of the Q4_0 block at p0 as bytes [lo, hi]: weights 0..31 plus 8. (A vector is one block.)
  static vi load_q4(const uint8_t* p0, const uint8_t*) {
    const __m256i z = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p0 + 2)));
    return _mm256_and_si256(_mm256_srlv_epi64(z, _mm256_set_epi64x(4, 4, 0, 0)), _mm256_set1_epi8(0x0f));
  }
  static vi load_q8(const uint8_t* p0, const uint8_t*) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p0 + 2));
  }
  static vf load_d(const uint8_t* p0, const uint8_t*) {
    return _mm256_cvtph_ps(_mm_set1_epi16(static_cast<short>(load_u16(p0))));
  }
  static vf load_dx(const float* d) { return _mm256_broadcast_ss(d); }
  static void store_halfs(float* out, const uint16_t* h) {
    _mm256_storeu_ps(out, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h))));
  }

  static vi dot_u8s8(vi acc, vi u, vi s) {
#if defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
  }
  static vi dot_s8s8(vi acc, vi w, vi x) { return dot_u8s8(acc, _mm256_abs_epi8(w), _mm256_sign_epi8(x, w)); }

  // r[i] holds row i (8 dwords); on return r[g] holds dword g of rows 0..7.
  static void transpose(vi r[8]) {
    vi s[8], u[8];
    for (int i = 0; i < 4; ++i) {
      s[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
      s[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int h = 0; h < 2; ++h) {
      u[4 * h + 0] = _mm256_unpacklo_epi64(s[4 * h + 0], s[4 * h + 2]);
      u[4 * h + 1] = _mm256_unpackhi_epi64(s[4 * h + 0], s[4 * h + 2]);
      u[4 * h + 2] = _mm256_unpacklo_epi64(s[4 * h + 1], s[4 * h + 3]);
      u[4 * h + 3] = _mm256_unpackhi_epi64(s[4 * h + 1], s[4 * h + 3]);
    }
    for (int g = 0; g < 4; ++g) {
      r[g] = _mm256_permute2x128_si256(u[g], u[4 + g], 0x20);
      r[g + 4] = _mm256_permute2x128_si256(u[g], u[4 + g], 0x31);
    }
  }
};
#endif

constexpr int kBlocks = Vec::kLanes / 8;  // blocks per vector

// Per-format choice of integer dot (see the header): activations unsigned (x + 128) with a
// -128 sum(w) start, or, for Q8_0 without VNNI, the sign trick on signed activations.
template <Fmt F>
struct Ops {
  static constexpr bool kSignTrick = F == Fmt::Q8_0 && !Vec::kVnni;
  static constexpr uint8_t kXorX = kSignTrick ? 0x00 : 0x80;

  // The weights of the blocks at p0 (and p1) as signed bytes, and the accumulator their dot starts
  // from: -128 times the sum of each lane's 4 weights (0 with the sign trick).
  static void load(const uint8_t* p0, const uint8_t* p1, Vec::vi& w, Vec::vi& start) {
    if constexpr (F == Fmt::Q4_0) {
      const Vec::vi nib = Vec::load_q4(p0, p1);
      w = Vec::sub_i8(nib, Vec::bcast_i8(8));
      // -128 sum(nib - 8) over 4 values = 4096 + sum(nib * -128): one dot on the unsigned nibbles.
      start = Vec::dot_u8s8(Vec::set_i32(4096), nib, Vec::bcast_i8(0x80));
    } else {
      w = Vec::load_q8(p0, p1);
      start = kSignTrick ? Vec::zero_i() : Vec::neg(Vec::dot_u8s8(Vec::zero_i(), Vec::bcast_i8(0x80), w));
    }
  }
  static Vec::vi dot(Vec::vi acc, Vec::vi w, Vec::vi x) {
    if constexpr (kSignTrick) {
      return Vec::dot_s8s8(acc, w, x);
    } else {
      return Vec::dot_u8s8(acc, x, w);
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Decode kernel (matrix-vector). One weight row at a time, in memory order: per vector of its blocks,
// the weights are unpacked, their scales converted and the dot's start value computed once, then each
// of the M activation rows costs a 32-byte-per-block load, its scales, one integer dot and two float
// operations: acc += cvt(dot) * (dw * dx) lane-wise, 8 lanes per block.
//
// Memory: a thread's rows are one sequential stream, which the hardware prefetchers follow best
// (taking several rows at once, or a row in K chunks, splits it into streams that restart every row
// and was measured 2-4x slower). The activations are re-read for every row and must stay in L1, but
// the weight stream passing through L1 evicts them once K is large (from about K = 16384 on a 48 KiB
// L1), and the L1 misses then compete with the weight stream; prefetching the weights kPrefetch bytes
// ahead into L2 keeps DRAM busy regardless.

constexpr int kGemvMaxM = 4;  // measured: from M = 5 on, unpacking tiles for the prefill kernel is faster
constexpr int64_t kPrefetch = 8192;  // bytes; measured best of 2-16 KiB on a Zen 5 (1-2 KiB: no gain)

template <Fmt F, int M>
void gemv_rows(const Act& a, const uint8_t* w, int64_t ldw, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  using vi = Vec::vi;
  using vf = Vec::vf;
  constexpr int64_t BB = block_bytes<F>();
  const int64_t nb = a.nb, K = a.K;
  const int64_t nbv = nb / kBlocks * kBlocks;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * ldw;
    vf acc[M];
    for (int m = 0; m < M; ++m) acc[m] = Vec::zero_f();
    for (int64_t b = 0; b < nbv; b += kBlocks) {
      const uint8_t* blk = row + b * BB;
      _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetch), _MM_HINT_T1);
      vi wq, start;
      Ops<F>::load(blk, blk + BB, wq, start);
      const vf dw = Vec::load_d(blk, blk + BB);
      for (int m = 0; m < M; ++m) {
        const vi xq = Vec::loadi(a.q + m * K + b * QK);
        const vf dx = Vec::load_dx(a.d + m * nb + b);
        acc[m] = Vec::fmadd(Vec::cvt(Ops<F>::dot(start, wq, xq)), Vec::mul(dw, dx), acc[m]);
      }
    }
    for (int m = 0; m < M; ++m) {
      float s = Vec::hsum(acc[m]);
      if (nbv < nb) {  // an odd block left over when a vector covers two
        const uint8_t* blk = row + nbv * BB;
        const int32_t dot = block_dot_exact<F>(blk, a.q + m * K + nbv * QK, a.x_xor);
        s += half_to_float(load_u16(blk)) * (a.d[m * nb + nbv] * static_cast<float>(dot));
      }
      y[m * ldy + n] = s;
    }
  }
}

template <Fmt F>
void gemv(const Act& a, const uint8_t* w, int64_t ldw, int64_t N, float* y) {
  static_assert(kGemvMaxM == 4, "gemv's switch covers M = 1..kGemvMaxM");
  // At least 64 KiB of weights per task: below that, waking a thread costs more than it saves.
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, ldw));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    switch (a.M) {
      case 1: gemv_rows<F, 1>(a, w, ldw, n0, n1, y, N); break;
      case 2: gemv_rows<F, 2>(a, w, ldw, n0, n1, y, N); break;
      case 3: gemv_rows<F, 3>(a, w, ldw, n0, n1, y, N); break;
      case 4: gemv_rows<F, 4>(a, w, ldw, n0, n1, y, N); break;
      default: TORCH_INTERNAL_ASSERT(false, "gemv with M = ", a.M);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Prefill kernel (matrix-matrix). A tile of NR = 2 * kLanes weight rows x up to KC blocks is
// unpacked and transposed: for block b and group g of 4 values (k = 32 b + 4 g .. + 3), NR rows x 4
// signed bytes, so a vector load gives 4 consecutive k of kLanes rows and one broadcast 32-bit load
// of an activation row gives the matching 4 k of x. Per block the tile also holds each row's dot
// start value (int32) and scale (float). The micro-kernel keeps an MR x NR tile of float accumulators
// (2 MR vectors) and, per block, 2 MR int32 accumulators filled by 8 x 2 x MR integer dots, then
// folds them into the floats: acc += cvt(dot) * (dw * dx).

#if defined(AFMQ_AVX512)
constexpr int kMR = 6;  // 12 float + 12 int accumulators + 2 weight vectors + 1 broadcast: 27 of 32 zmm
#else
constexpr int kMR = 3;  // 6 + 6 + 2 + 1 of 16 ymm
#endif
constexpr int kNR = 2 * Vec::kLanes;
constexpr int64_t kKC = 64;  // blocks per tile: 64 x 32 rows x 32 bytes = 64 KiB for 512-bit vectors
constexpr int64_t kTileBlockBytes = 8 * kNR * 4 + kNR * 4 + kNR * 4;  // weights, dot starts, scales

struct Tile {
  uint8_t* base;
  uint8_t* weights(int64_t b) const { return base + b * kTileBlockBytes; }
  int32_t* starts(int64_t b) const { return reinterpret_cast<int32_t*>(weights(b) + 8 * kNR * 4); }
  float* scales(int64_t b) const { return reinterpret_cast<float*>(weights(b) + 8 * kNR * 4 + kNR * 4); }
};

template <Fmt F>
void pack_tile(const uint8_t* w, int64_t ldw, int64_t N, int64_t n0, int64_t b0, int64_t kc, const Tile& t) {
  constexpr int64_t BB = block_bytes<F>();
  constexpr int64_t kPrefetchEvery = 64 / BB;  // blocks; <= 64 bytes apart, so every cache line is touched
  const int64_t ahead = kNR * ldw;              // the same rows of the next tile, packed next (see gemm)
  for (int h = 0; h < kNR; h += Vec::kLanes) {  // each group of kLanes rows
    // Rows past N repeat row N - 1: their columns are computed but never stored.
    const uint8_t* rows[Vec::kLanes];
    for (int i = 0; i < Vec::kLanes; ++i) rows[i] = w + std::min(n0 + h + i, N - 1) * ldw + b0 * BB;
    for (int64_t b = 0; b < kc; ++b) {
      const int64_t off = b * BB;
      if (b % kPrefetchEvery == 0)
        for (int i = 0; i < Vec::kLanes; ++i)
          _mm_prefetch(reinterpret_cast<const char*>(rows[i] + off + ahead), _MM_HINT_T1);
      Vec::vi v[8], unused;
      // 512-bit vectors take rows i and i + 8 (see Vec::transpose); 256-bit ones row i alone.
      for (int i = 0; i < 8; ++i)
        Ops<F>::load(rows[i] + off, rows[i + 8 * (kBlocks - 1)] + off, v[i], unused);
      Vec::transpose(v);
      Vec::vi start = Vec::zero_i();  // -128 times each row's sum of weights, as in Ops::load
      for (int g = 0; g < 8; ++g) {
        Vec::storei(t.weights(b) + (g * kNR + h) * 4, v[g]);
        if constexpr (!Ops<F>::kSignTrick) start = Vec::dot_u8s8(start, Vec::bcast_i8(0x80), v[g]);
      }
      Vec::storei(t.starts(b) + h, Vec::neg(start));
      uint16_t d[Vec::kLanes];
      for (int i = 0; i < Vec::kLanes; ++i) d[i] = load_u16(rows[i] + off);
      Vec::store_halfs(t.scales(b) + h, d);
    }
  }
}

template <Fmt F, int MR>
void gemm_micro(const Act& a, int64_t m0, int64_t b0, int64_t kc, const Tile& t, float* y, int64_t ldy,
                int64_t n0, int nvalid, bool accumulate) {
  using vi = Vec::vi;
  using vf = Vec::vf;
  constexpr int L = Vec::kLanes;
  const uint8_t* xq[MR];
  const float* xd[MR];
  for (int m = 0; m < MR; ++m) {
    xq[m] = a.q + (m0 + m) * a.K + b0 * QK;
    xd[m] = a.d + (m0 + m) * a.nb + b0;
  }
  vf acc[MR][2];
  for (int m = 0; m < MR; ++m) {
    float* out = y + (m0 + m) * ldy + n0;
    acc[m][0] = accumulate ? Vec::load_n(out, nvalid) : Vec::zero_f();
    acc[m][1] = accumulate ? Vec::load_n(out + L, nvalid - L) : Vec::zero_f();
  }
  for (int64_t b = 0; b < kc; ++b) {
    const uint8_t* tw = t.weights(b);
    const vi s0 = Vec::loadi(t.starts(b)), s1 = Vec::loadi(t.starts(b) + L);
    vi ia[MR][2];
    for (int m = 0; m < MR; ++m) {
      ia[m][0] = s0;
      ia[m][1] = s1;
    }
    for (int g = 0; g < 8; ++g) {
      const vi w0 = Vec::loadi(tw + g * kNR * 4);
      const vi w1 = Vec::loadi(tw + g * kNR * 4 + L * 4);
      for (int m = 0; m < MR; ++m) {
        const vi xb = Vec::bcast_i32(xq[m] + b * QK + 4 * g);
        ia[m][0] = Ops<F>::dot(ia[m][0], w0, xb);
        ia[m][1] = Ops<F>::dot(ia[m][1], w1, xb);
      }
    }
    const vf d0 = Vec::loadf(t.scales(b)), d1 = Vec::loadf(t.scales(b) + L);
    for (int m = 0; m < MR; ++m) {
      const vf dx = Vec::bcast_f(xd[m][b]);
      acc[m][0] = Vec::fmadd(Vec::cvt(ia[m][0]), Vec::mul(d0, dx), acc[m][0]);
      acc[m][1] = Vec::fmadd(Vec::cvt(ia[m][1]), Vec::mul(d1, dx), acc[m][1]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    float* out = y + (m0 + m) * ldy + n0;
    Vec::store_n(out, acc[m][0], nvalid);
    Vec::store_n(out + L, acc[m][1], nvalid - L);
  }
}

template <Fmt F>
void gemm_panel(const Act& a, int64_t m0, int64_t m1, int64_t b0, int64_t kc, const Tile& t, float* y,
                int64_t ldy, int64_t n0, int nvalid) {
  const bool accumulate = b0 > 0;
  int64_t m = m0;
  for (; m + kMR <= m1; m += kMR) gemm_micro<F, kMR>(a, m, b0, kc, t, y, ldy, n0, nvalid, accumulate);
  switch (m1 - m) {
    case 0: break;
    case 1: gemm_micro<F, 1>(a, m, b0, kc, t, y, ldy, n0, nvalid, accumulate); break;
    case 2: gemm_micro<F, 2>(a, m, b0, kc, t, y, ldy, n0, nvalid, accumulate); break;
#if defined(AFMQ_AVX512)
    case 3: gemm_micro<F, 3>(a, m, b0, kc, t, y, ldy, n0, nvalid, accumulate); break;
    case 4: gemm_micro<F, 4>(a, m, b0, kc, t, y, ldy, n0, nvalid, accumulate); break;
    case 5: gemm_micro<F, 5>(a, m, b0, kc, t, y, ldy, n0, nvalid, accumulate); break;
#endif
    default: TORCH_INTERNAL_ASSERT(false, "gemm remainder of ", m1 - m, " rows");
  }
}

template <Fmt F>
void gemm(const Act& a, const uint8_t* w, int64_t ldw, int64_t N, float* y) {
  const int64_t n_tiles = (N + kNR - 1) / kNR;
  // With fewer column tiles than threads (narrow outputs), split the rows too, in multiples of MR.
  const int64_t threads = at::get_num_threads();
  const int64_t m_panels = (a.M + kMR - 1) / kMR;
  const int64_t want = std::min(m_panels, std::max<int64_t>(1, (2 * threads + n_tiles - 1) / n_tiles));
  const int64_t chunk_panels = (m_panels + want - 1) / want;
  const int64_t chunk_rows = chunk_panels * kMR;
  const int64_t m_chunks = (m_panels + chunk_panels - 1) / chunk_panels;
  at::parallel_for(0, n_tiles * m_chunks, 1, [&](int64_t u0, int64_t u1) {
    const size_t bytes = static_cast<size_t>(std::min(kKC, a.nb) * kTileBlockBytes);
    std::unique_ptr<uint8_t[], void (*)(uint8_t*)> buf(
        static_cast<uint8_t*>(::operator new[](bytes, std::align_val_t(64))),
        [](uint8_t* p) { ::operator delete[](p, std::align_val_t(64)); });
    const Tile t{buf.get()};
    for (int64_t b0 = 0; b0 < a.nb; b0 += kKC) {
      const int64_t kc = std::min(kKC, a.nb - b0);
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t n0 = u / m_chunks * kNR;
        const int64_t m0 = u % m_chunks * chunk_rows, m1 = std::min(a.M, m0 + chunk_rows);
        const int nvalid = static_cast<int>(std::min<int64_t>(kNR, N - n0));
        pack_tile<F>(w, ldw, N, n0, b0, kc, t);
        gemm_panel<F>(a, m0, m1, b0, kc, t, y, N, n0, nvalid);
      }
    }
  });
}

#endif  // AFMQ_SIMD

// ---------------------------------------------------------------------------------------------
// Operator entry points

template <Fmt F>
at::Tensor linear(const at::Tensor& x_in, const at::Tensor& w_in) {
  constexpr int64_t BB = block_bytes<F>();
  TORCH_CHECK(x_in.device().is_cpu() && w_in.device().is_cpu(),
              "quantized linear: tensors must be on the CPU");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat,
              "quantized linear: x must be float32, got ", x_in.scalar_type());
  TORCH_CHECK(w_in.scalar_type() == at::kByte, "quantized linear: w must be uint8, got ", w_in.scalar_type());
  TORCH_CHECK(x_in.dim() == 2 && w_in.dim() == 2, "quantized linear: x must be (M, K) and w (N, bytes)");
  const int64_t M = x_in.size(0), K = x_in.size(1), N = w_in.size(0);
  TORCH_CHECK(K % QK == 0, "quantized linear: K = ", K, " is not a multiple of ", QK);
  const int64_t nb = K / QK;
  TORCH_CHECK(w_in.size(1) == nb * BB, "quantized linear: w rows hold ", w_in.size(1), " bytes, K = ", K,
              " needs ", nb * BB);
  if (M == 0 || N == 0 || K == 0) return at::zeros({M, N}, x_in.options());
  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const at::Tensor w = w_in.stride(1) == 1 ? w_in : w_in.contiguous();
  const int64_t ldx = x.stride(0), ldw = w.stride(0);  // 0 for an expanded (broadcast) row

#if defined(AFMQ_SIMD)
  const uint8_t x_xor = Ops<F>::kXorX;
#else
  const uint8_t x_xor = 0;
#endif
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kByte));
  at::Tensor d = at::empty({M, nb}, x.options());
  const float* xp = x.data_ptr<float>();
  uint8_t* qp = q.data_ptr<uint8_t>();
  float* dp = d.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / K), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) quantize_row(xp + m * ldx, nb, x_xor, qp + m * K, dp + m * nb);
  });
  const Act a{M, K, nb, x_xor, qp, dp};

  at::Tensor y = at::empty({M, N}, x.options());
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
#if defined(AFMQ_SIMD)
  if (M <= kGemvMaxM) {
    gemv<F>(a, wp, ldw, N, yp);
  } else {
    gemm<F>(a, wp, ldw, N, yp);
  }
#else
  const int64_t grain = std::max<int64_t>(1, (16 << 10) / (std::max<int64_t>(1, ldw) * M));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { scalar_rows<F>(a, wp, ldw, n0, n1, yp, N); });
#endif
  return y;
}

at::Tensor linear_q4_0(const at::Tensor& x, const at::Tensor& w) { return linear<Fmt::Q4_0>(x, w); }
at::Tensor linear_q8_0(const at::Tensor& x, const at::Tensor& w) { return linear<Fmt::Q8_0>(x, w); }

// Which code path this build compiled, for logs and benchmarks.
std::string isa() {
#if defined(AFMQ_AVX512)
  return Vec::kVnni ? "avx512-vnni" : "avx512";
#elif defined(AFMQ_AVX2)
  return Vec::kVnni ? "avx2-vnni" : "avx2";
#else
  return "scalar";
#endif
}

}  // namespace

// The namespace is the extension's name, which kernels.py makes unique per source and CPU, so that
// two builds can never collide in one process.
TORCH_LIBRARY(TORCH_EXTENSION_NAME, m) {
  m.def("linear_q4_0(Tensor x, Tensor w) -> Tensor");
  m.def("linear_q8_0(Tensor x, Tensor w) -> Tensor");
  m.def("isa() -> str", &isa);
}

TORCH_LIBRARY_IMPL(TORCH_EXTENSION_NAME, CPU, m) {
  m.impl("linear_q4_0", &linear_q4_0);
  m.impl("linear_q8_0", &linear_q8_0);
}
