// The CPU implementation of peftcore::lora_linear and peftcore::lora_linear_backward (schemas and
// the contract in schemas.cpp; the specification is peftcore/ops/lora.py::reference_lora_linear).
//
// Forward:  h = dropout(x) A^T                  one fused row pass: Philox mask + rank-r projection
//           y = b + (scale h) B^T               (dropout(x) is never materialised), and each row of
//                                               y written once from its h (no bias broadcast)
//           y += x W^T                          ATen/MKL GEMM with beta = 1; W^T is a view
// Backward: one fused row pass over grad_y and x:
//             gh = scale grad_y B, grad_B = scale grad_y^T h,
//             grad_A = gh^T dropout(x), grad_x = mask (gh A) / (1 - p)   (mask regenerated once)
//           grad_x += grad_y W                  ATen/MKL GEMM with beta = 1 (the base's input grad)
// The weight gets no gradient and no weight-sized buffer. Row ranges run in parallel with
// at::parallel_for (OpenMP, honouring torch.set_num_threads).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "philox.h"

namespace peftcore {

// Whether the AVX-512 code runs (defined below, from PEFTCORE_CPU_KERNELS and the CPU): the fp32
// row passes of cpu_avx512, and the Philox on 16 counters per instruction that the AVX2 loops'
// philox_blocks then calls. The mask's generator is pure integer arithmetic, and 512-bit
// multiplies double its throughput (0.28-0.33 against 0.52-0.59 ns per element, one core of an
// Intel Xeon; the same draws bit for bit).
bool use_avx512();
void philox_blocks_avx512(uint64_t seed, uint64_t g0, int64_t n_blocks, uint32_t* out);

namespace cpu_default {
#include "lora_cpu_kernels.h"
}  // namespace cpu_default

#if defined(__x86_64__) && defined(__GNUC__)
#define PEFTCORE_HAS_AVX2_BUILD 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define PEFTCORE_AVX2 1
namespace cpu_avx2 {
#include "lora_cpu_kernels.h"
}  // namespace cpu_avx2
#undef PEFTCORE_AVX2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
// GCC 12's avx512fintrin.h trips -Wmaybe-uninitialized inside its own set1/setr helpers.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
namespace {

// The AVX2 version in cpu_avx2 with 16 lanes: the same rounds (the products' halves sorted with
// merge-masked shuffles, and three-way XORs in one instruction) and the same 4 x 16 transpose
// into out[4 * block + output].
struct PhiloxLanes16 {
  __m512i c0, c1, c2, c3;
};

inline PhiloxLanes16 philox16_start(uint64_t g) {
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  return {_mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(g))), iota),
          _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(g >> 32))), _mm512_setzero_si512(),
          _mm512_setzero_si512()};
}

inline void philox16_round(PhiloxLanes16& s, __m512i mul_a, __m512i mul_b, __m512i k0, __m512i k1) {
  // 32 x 32 -> 64-bit products of the even lanes (p*e) and, with each pair swapped, of the odd
  // lanes (p*o). The high words: even lanes take p*e's odd dword (swapped into place), odd lanes
  // keep p*o's; the low words the other way round. One merge-masked shuffle each, where the
  // AVX2 version needs a shift and a blend (0.58 against 0.72 cycles per draw, one core).
  constexpr __mmask16 kEven = 0x5555, kOdd = 0xAAAA;
  const __m512i p0e = _mm512_mul_epu32(mul_a, s.c0);
  const __m512i p0o = _mm512_mul_epu32(mul_a, _mm512_shuffle_epi32(s.c0, _MM_PERM_CDAB));
  const __m512i p2e = _mm512_mul_epu32(mul_b, s.c2);
  const __m512i p2o = _mm512_mul_epu32(mul_b, _mm512_shuffle_epi32(s.c2, _MM_PERM_CDAB));
  const __m512i hi0 = _mm512_mask_shuffle_epi32(p0o, kEven, p0e, _MM_PERM_CDAB);
  const __m512i lo0 = _mm512_mask_shuffle_epi32(p0e, kOdd, p0o, _MM_PERM_CDAB);
  const __m512i hi2 = _mm512_mask_shuffle_epi32(p2o, kEven, p2e, _MM_PERM_CDAB);
  const __m512i lo2 = _mm512_mask_shuffle_epi32(p2e, kOdd, p2o, _MM_PERM_CDAB);
  s.c0 = _mm512_ternarylogic_epi32(hi2, s.c1, k0, 0x96);  // 0x96: a ^ b ^ c
  s.c2 = _mm512_ternarylogic_epi32(hi0, s.c3, k1, 0x96);
  s.c1 = lo2;
  s.c3 = lo0;
}

inline void philox16_store(const PhiloxLanes16& s, uint32_t* out) {
  // Within each 128-bit lane, as in the AVX2 version: u0 holds the outputs of blocks 0, 4, 8, 12
  // (one block per lane), u1 of 1, 5, 9, 13, u2 of 2, 6, 10, 14, u3 of 3, 7, 11, 15.
  const __m512i t0 = _mm512_unpacklo_epi32(s.c0, s.c1), t1 = _mm512_unpackhi_epi32(s.c0, s.c1);
  const __m512i t2 = _mm512_unpacklo_epi32(s.c2, s.c3), t3 = _mm512_unpackhi_epi32(s.c2, s.c3);
  const __m512i u0 = _mm512_unpacklo_epi64(t0, t2), u1 = _mm512_unpackhi_epi64(t0, t2);
  const __m512i u2 = _mm512_unpacklo_epi64(t1, t3), u3 = _mm512_unpackhi_epi64(t1, t3);
  // Then across lanes: 0x88 picks 128-bit lanes (0, 2) of each source, 0xDD lanes (1, 3).
  const __m512i even01 = _mm512_shuffle_i32x4(u0, u1, 0x88), even23 = _mm512_shuffle_i32x4(u2, u3, 0x88);
  const __m512i odd01 = _mm512_shuffle_i32x4(u0, u1, 0xDD), odd23 = _mm512_shuffle_i32x4(u2, u3, 0xDD);
  _mm512_storeu_si512(out, _mm512_shuffle_i32x4(even01, even23, 0x88));       // blocks 0-3
  _mm512_storeu_si512(out + 16, _mm512_shuffle_i32x4(odd01, odd23, 0x88));    // blocks 4-7
  _mm512_storeu_si512(out + 32, _mm512_shuffle_i32x4(even01, even23, 0xDD));  // blocks 8-11
  _mm512_storeu_si512(out + 48, _mm512_shuffle_i32x4(odd01, odd23, 0xDD));    // blocks 12-15
}

}  // namespace

void philox_blocks_avx512(uint64_t seed, uint64_t g0, int64_t n_blocks, uint32_t* out) {
  __m512i key0[philox::kRounds], key1[philox::kRounds];
  {
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int r = 0; r < philox::kRounds; ++r) {
      key0[r] = _mm512_set1_epi32(static_cast<int>(k0));
      key1[r] = _mm512_set1_epi32(static_cast<int>(k1));
      k0 += philox::kKeyA;
      k1 += philox::kKeyB;
    }
  }
  const __m512i mul_a = _mm512_set1_epi32(static_cast<int>(philox::kRoundA));
  const __m512i mul_b = _mm512_set1_epi32(static_cast<int>(philox::kRoundB));
  // Two independent groups of 16 whose round chains overlap, then one; then scalar blocks. A
  // group stops before its low counter word would carry.
  int64_t i = 0;
  for (; i + 32 <= n_blocks; i += 32) {
    const uint64_t g = g0 + static_cast<uint64_t>(i);
    if (static_cast<uint32_t>(g) > 0xFFFFFFE0u) break;
    PhiloxLanes16 a = philox16_start(g), b = philox16_start(g + 16);
    for (int r = 0; r < philox::kRounds; ++r) {
      philox16_round(a, mul_a, mul_b, key0[r], key1[r]);
      philox16_round(b, mul_a, mul_b, key0[r], key1[r]);
    }
    philox16_store(a, out + 4 * i);
    philox16_store(b, out + 4 * i + 64);
  }
  for (; i + 16 <= n_blocks; i += 16) {
    const uint64_t g = g0 + static_cast<uint64_t>(i);
    if (static_cast<uint32_t>(g) > 0xFFFFFFF0u) break;
    PhiloxLanes16 a = philox16_start(g);
    for (int r = 0; r < philox::kRounds; ++r) philox16_round(a, mul_a, mul_b, key0[r], key1[r]);
    philox16_store(a, out + 4 * i);
  }
  for (; i < n_blocks; ++i) philox::block(seed, g0 + static_cast<uint64_t>(i), out + 4 * i);
}

// The float32 row passes on AVX-512F (see the header), used where cpu_kernels() says so.
namespace cpu_avx512 {
#include "lora_avx512_kernels.h"
}  // namespace cpu_avx512
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

namespace {

// Which loops run, from PEFTCORE_CPU_KERNELS (read once per process): 'auto' (the default) picks
// the best the CPU has; 'avx2' keeps the AVX2+FMA loops but their Philox off AVX-512; 'portable'
// runs the plain loops (which CPUs without AVX2+FMA run). The tests use the last two to check
// those paths on machines that would otherwise skip them.
enum class CpuKernels { kPortable, kAvx2, kAvx512 };

CpuKernels cpu_kernels() {
  static const CpuKernels choice = [] {
    const char* env = std::getenv("PEFTCORE_CPU_KERNELS");
    const std::string asked = env == nullptr ? "" : env;
    TORCH_CHECK(asked.empty() || asked == "auto" || asked == "avx2" || asked == "portable",
                "PEFTCORE_CPU_KERNELS must be 'auto' (the default: the fastest loops the CPU has), 'avx2' (AVX2+FMA "
                "loops, no AVX-512) or 'portable' (the plain loops), got '", asked, "'");
#ifdef PEFTCORE_HAS_AVX2_BUILD
    if (asked == "portable" || !__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) {
      return CpuKernels::kPortable;
    }
    return asked != "avx2" && __builtin_cpu_supports("avx512f") ? CpuKernels::kAvx512 : CpuKernels::kAvx2;
#else
    return CpuKernels::kPortable;
#endif
  }();
  return choice;
}

bool use_avx2() { return cpu_kernels() != CpuKernels::kPortable; }

}  // namespace

bool use_avx512() { return cpu_kernels() == CpuKernels::kAvx512; }

namespace {

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                  const at::Tensor& A, const at::Tensor& B, double dropout_p, const at::Tensor& seed) {
  TORCH_CHECK(x.dim() == 2, "peftcore::lora_linear: x must be (M, K), got ", x.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), "peftcore::lora_linear: weight must be (N, K) with K = ",
              x.size(1), ", got ", weight.sizes());
  TORCH_CHECK(A.dim() == 2 && A.size(1) == x.size(1), "peftcore::lora_linear: A must be (r, K) with K = ", x.size(1),
              ", got ", A.sizes());
  TORCH_CHECK(B.dim() == 2 && B.size(0) == weight.size(0) && B.size(1) == A.size(0),
              "peftcore::lora_linear: B must be (N, r) = (", weight.size(0), ", ", A.size(0), "), got ", B.sizes());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "peftcore::lora_linear: bias must be (N,), got ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "peftcore::lora_linear: bias dtype ", bias->scalar_type(),
                " differs from x dtype ", x.scalar_type());
  }
  for (const at::Tensor* t : {&weight, &A, &B}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "peftcore::lora_linear: all tensors must share x's dtype ",
                x.scalar_type(), ", got ", t->scalar_type());
  }
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "peftcore::lora_linear: dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.device().is_cpu(),
              "peftcore::lora_linear: seed must be a one-element int64 CPU tensor");
}

uint64_t seed_value(const at::Tensor& seed) { return static_cast<uint64_t>(seed.item<int64_t>()); }

// r rounded up to a multiple of kRankBlock: the rank rows of the loops' factors and partial sums.
int64_t padded_rank(int64_t r) { return (r + cpu_default::kRankBlock - 1) / cpu_default::kRankBlock * cpu_default::kRankBlock; }

// A factor in the accumulation type, padded with zero rows to a multiple of kRankBlock: the
// factor itself when it already is one (a contiguous fp32/fp64 factor of rank 8, 16, ...).
at::Tensor padded_factor(const at::Tensor& F) {
  const int64_t r = F.size(0);
  const int64_t r_pad = padded_rank(r);
  if (r == r_pad && F.is_contiguous() && F.scalar_type() == at::toOpMathType(F.scalar_type())) return F;
  at::Tensor out = at::zeros({r_pad, F.size(1)}, F.options().dtype(at::toOpMathType(F.scalar_type())));
  out.narrow(0, 0, r).copy_(F);
  return out;
}

// Rows per parallel task: enough work (~32k elements) to pay for the task.
int64_t row_grain(int64_t K) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(K, 1)); }

// Ranks up to this use the fused row kernel without dropout too: for skinny r, MKL's x A^T runs
// at about half the speed of project_row (0.44 vs 0.23 ms at 2048 x 384, r = 8, one Zen 3 core).
constexpr int64_t kFusedMaxRank = 32;

// One row pass over x: h = dropout(x) A^T (the mask regenerated from (seed, offset) when p > 0;
// dropout(x) never exists) and y = b + scale h B^T, each row of y written once while its h is in
// registers. Returns (y, h); the caller's GEMM then accumulates x W^T into y.
std::tuple<at::Tensor, at::Tensor> fused_forward(const at::Tensor& x, const c10::optional<at::Tensor>& bias,
                                                 const at::Tensor& A, const at::Tensor& B, double scale, double p,
                                                 uint64_t seed) {
  const int64_t M = x.size(0), K = x.size(1), N = B.size(0), r = A.size(0);
  at::Tensor h = at::empty({M, r}, x.options());
  at::Tensor y = at::empty({M, N}, x.options());
  const at::Tensor xc = x.contiguous();
  const at::Tensor Ap = padded_factor(A);
  const at::Tensor Btp = padded_factor(B.t());
  const at::Tensor bc = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  const uint32_t threshold = philox::threshold(p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "peftcore_lora_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const acc_t* ap = Ap.const_data_ptr<acc_t>();
    const acc_t* btp = Btp.const_data_ptr<acc_t>();
    const scalar_t* bp = bc.defined() ? bc.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* hp = h.mutable_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const bool dropout = p > 0.0;
    const acc_t s = static_cast<acc_t>(dropout ? 1.0 / (1.0 - p) : 1.0);
    const acc_t sc = static_cast<acc_t>(scale);
    const int64_t r_pad = Ap.size(0);
    const bool avx2 = use_avx2();
    const bool avx512 = use_avx512();
    at::parallel_for(0, M, row_grain(K + N), [&](int64_t m0, int64_t m1) {
#ifdef PEFTCORE_HAS_AVX2_BUILD
      if (avx512 && cpu_avx512::forward_rows<scalar_t, acc_t>(xp, ap, hp, btp, bp, yp, K, N, r, r_pad, dropout, seed,
                                                              threshold, s, sc, m0, m1)) {
        return;
      }
      if (avx2) {
        cpu_avx2::forward_rows<scalar_t, acc_t>(xp, ap, hp, btp, bp, yp, K, N, r, r_pad, dropout, seed, threshold, s, sc,
                                                 m0, m1);
        return;
      }
#endif
      cpu_default::forward_rows<scalar_t, acc_t>(xp, ap, hp, btp, bp, yp, K, N, r, r_pad, dropout, seed, threshold, s,
                                                  sc, m0, m1);
    });
  });
  return {y, h};
}

std::tuple<at::Tensor, at::Tensor> lora_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                   const c10::optional<at::Tensor>& bias, const at::Tensor& A,
                                                   const at::Tensor& B, double scale, double dropout_p,
                                                   const at::Tensor& seed) {
  check_inputs(x, weight, bias, A, B, dropout_p, seed);
  const int64_t M = x.size(0), K = x.size(1), r = A.size(0);
  const bool fused = M > 0 && K > 0 && r > 0 && (dropout_p > 0.0 || (r <= kFusedMaxRank && use_avx2()));
  at::Tensor y, h;
  if (fused) {
    // y = b + scale h B^T from the row pass, which writes each row of y once (no broadcast of b
    // and no rank-r GEMM over y of their own).
    std::tie(y, h) = fused_forward(x, bias, A, B, scale, dropout_p, dropout_p > 0.0 ? seed_value(seed) : 0);
  } else {
    // Large ranks without dropout (MKL's x A^T), and the empty cases: y = b + (scale h) B^T
    // with ATen, where the rank-r product takes the place of addmm's broadcast of b.
    h = K == 0 ? at::zeros({M, r}, x.options()) : at::mm(x, A.t());
    if (bias.has_value() && bias->defined()) {
      y = at::addmm(*bias, h, B.t(), /*beta=*/1, /*alpha=*/scale);
    } else {
      y = at::empty({M, weight.size(0)}, x.options());
      at::addmm_out(y, y, h, B.t(), /*beta=*/0, /*alpha=*/scale);  // beta = 0: y's contents are ignored
    }
  }
  // The base GEMM accumulates x W^T into y (beta = 1). weight.t() is a view: nn.Linear's (N, K)
  // weight reads as a transposed operand, GPT-2's Conv1D (a (K, N) tensor passed as its .t()) as
  // the contiguous original.
  y.addmm_(x, weight.t());
  return {y, h};
}

std::tuple<c10::optional<at::Tensor>, c10::optional<at::Tensor>, c10::optional<at::Tensor>> lora_linear_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& h, double scale, double dropout_p, const at::Tensor& seed, std::array<bool, 3> output_mask) {
  check_inputs(x, weight, c10::nullopt, A, B, dropout_p, seed);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = A.size(0);
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == M && grad_y.size(1) == N,
              "peftcore::lora_linear_backward: grad_y must be (M, N), got ", grad_y.sizes());
  TORCH_CHECK(h.dim() == 2 && h.size(0) == M && h.size(1) == r,
              "peftcore::lora_linear_backward: h must be (M, r), got ", h.sizes());
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type() && h.scalar_type() == x.scalar_type(),
              "peftcore::lora_linear_backward: grad_y and h must have x's dtype ", x.scalar_type());
  const bool want_x = output_mask[0], want_A = output_mask[1], want_B = output_mask[2];
  c10::optional<at::Tensor> grad_x, grad_A, grad_B;
  if (!want_x && !want_A && !want_B) return {grad_x, grad_A, grad_B};
  const auto acc_type = at::toOpMathType(x.scalar_type());
  // Fixed row blocks (from the shape alone), summed in order: gradients do not depend on the
  // number of threads.
  const int64_t n_parts = std::max<int64_t>(1, std::min<int64_t>(64, (M + 255) / 256));
  const int64_t rows_per_part = std::max<int64_t>(1, (M + n_parts - 1) / n_parts);
  at::Tensor gx = want_x ? at::empty({M, K}, x.options()) : at::Tensor();
  // Partial sums with r_pad rank rows (the rows past r stay zero and are cut off below).
  const int64_t r_pad = padded_rank(r);
  at::Tensor part_A = want_A ? at::zeros({n_parts, r_pad, K}, x.options().dtype(acc_type)) : at::Tensor();
  at::Tensor part_Bt = want_B ? at::zeros({n_parts, r_pad, N}, x.options().dtype(acc_type)) : at::Tensor();
  if (M > 0 && r > 0) {
    const at::Tensor gyc = grad_y.contiguous();
    const at::Tensor xc = x.contiguous();
    const at::Tensor hc = h.contiguous();
    const at::Tensor Ap = padded_factor(A);
    const at::Tensor Btp = padded_factor(B.t());
    const bool dropout = dropout_p > 0.0;
    const uint64_t seed_v = dropout ? seed_value(seed) : 0;
    const uint32_t threshold = philox::threshold(dropout_p);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "peftcore_lora_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* gyp = gyc.const_data_ptr<scalar_t>();
      const scalar_t* xp = xc.const_data_ptr<scalar_t>();
      const scalar_t* hp = hc.const_data_ptr<scalar_t>();
      const acc_t* ap = Ap.const_data_ptr<acc_t>();
      const acc_t* btp = Btp.const_data_ptr<acc_t>();
      scalar_t* gxp = want_x ? gx.mutable_data_ptr<scalar_t>() : nullptr;
      acc_t* pa = want_A ? part_A.mutable_data_ptr<acc_t>() : nullptr;
      acc_t* pb = want_B ? part_Bt.mutable_data_ptr<acc_t>() : nullptr;
      const acc_t s = static_cast<acc_t>(dropout ? 1.0 / (1.0 - dropout_p) : 1.0);
      const acc_t sc = static_cast<acc_t>(scale);
      const bool avx2 = use_avx2();
      const bool avx512 = use_avx512();
      at::parallel_for(0, n_parts, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t m0 = b * rows_per_part, m1 = std::min(M, m0 + rows_per_part);
          if (m0 >= m1) continue;
          acc_t* a_part = pa == nullptr ? nullptr : pa + b * r_pad * K;
          acc_t* b_part = pb == nullptr ? nullptr : pb + b * r_pad * N;
#ifdef PEFTCORE_HAS_AVX2_BUILD
          if (avx512 && cpu_avx512::backward_rows<scalar_t, acc_t>(gyp, xp, hp, ap, btp, gxp, a_part, b_part, K, N, r,
                                                                   r_pad, sc, dropout, seed_v, threshold, s, m0, m1)) {
            continue;
          }
          if (avx2) {
            cpu_avx2::backward_rows<scalar_t, acc_t>(gyp, xp, hp, ap, btp, gxp, a_part, b_part, K, N, r, r_pad, sc,
                                                      dropout, seed_v, threshold, s, m0, m1);
            continue;
          }
#endif
          cpu_default::backward_rows<scalar_t, acc_t>(gyp, xp, hp, ap, btp, gxp, a_part, b_part, K, N, r, r_pad, sc,
                                                       dropout, seed_v, threshold, s, m0, m1);
        }
      });
    });
  } else if (want_x) {
    gx.zero_();
  }
  // The partial sums in order (one part: no pass at all); grad_B's scale is already in (see
  // backward_rows).
  const auto reduce = [n_parts, r](const at::Tensor& parts) {
    return (n_parts == 1 ? parts.select(0, 0) : parts.sum(0)).narrow(0, 0, r);
  };
  if (want_A) grad_A = reduce(part_A).to(x.scalar_type());
  if (want_B) grad_B = reduce(part_Bt).t().to(x.scalar_type()).contiguous();
  if (want_x) {
    // The base layer's own input gradient, accumulated into the low-rank part in the GEMM.
    gx.addmm_(grad_y, weight);
    grad_x = gx;
  }
  return {grad_x, grad_A, grad_B};
}

}  // namespace
}  // namespace peftcore

TORCH_LIBRARY_IMPL(peftcore, CPU, m) {
  m.impl("lora_linear", &peftcore::lora_linear_cpu);
  m.impl("lora_linear_backward", &peftcore::lora_linear_backward_cpu);
}
