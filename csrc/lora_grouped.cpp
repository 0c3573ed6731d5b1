// peftcore::lora_grouped: many LoRA adapters in one batch, one adapter (or none) per row.
// Specification: peftcore/ops/lora_grouped.py::reference_lora_grouped.
//
//   y[m] = x[m] W^T + b + scale[g] * dropout(x)[m] A[g]^T B[g]^T,   g = index[m]  (-1: base only)
//
// Forward (CPU): one row-parallel pass writes every row of y once: b plus the row's own
// adapter's low-rank product (h = dropout(x)[m] A[g]^T, then scale[g] h B[g]^T, h in row-sized
// buffers), with the dropout mask drawn from (seed, m * K + k) as lora_linear does, at the row's
// adapter's own probability dropout_p[g]; then
// the base GEMM accumulates into y (ATen/MKL, beta = 1), as lora_linear fuses it. No Python loop,
// no gather/scatter of rows, no per-adapter output buffer. The adapters' ranks may differ; h is
// returned padded to the largest rank (zeros beyond a row's own rank) for backward. float32 on a
// CPU with AVX2+FMA (ranks up to 32) writes those rows with the register tiles of
// lora_grouped_tiles.h; other dtypes and CPUs take a GEMM per run of one adapter's rows, or a
// row pass (interleaved rows, dropout).
// Backward: a row-parallel pass computes gh = scale[g] grad_y[m] B[g] and the low-rank part of
// grad_x (mask regenerated); the base GEMM adds grad_y W; then the parameter gradients run in
// parallel over (adapter, column block) pairs, each summing its adapter's rows in a fixed order
// (rows sorted by adapter once, a counting sort), so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <cstdint>
#include <tuple>
#include <vector>

#include "philox.h"

namespace peftcore {
namespace grouped {

namespace loops_default {
#include "lora_grouped_kernels.h"
}  // namespace loops_default

#if defined(__x86_64__) && defined(__GNUC__)
#define PEFTCORE_GROUPED_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace loops_avx2 {
#include "lora_grouped_kernels.h"
#include "lora_grouped_tiles.h"
}  // namespace loops_avx2
#pragma GCC pop_options
#endif

// Whether the AVX2+FMA loops run: the CPU has them, and PEFTCORE_CPU_KERNELS (as for
// lora_linear) does not ask for the portable ones. Read once per process.
bool use_avx2_loops() {
  static const bool choice = [] {
#ifdef PEFTCORE_GROUPED_AVX2
    const char* env = std::getenv("PEFTCORE_CPU_KERNELS");
    if (env != nullptr && std::string(env) == "portable") return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return false;
#endif
  }();
  return choice;
}

using loops_default::dot;
using loops_default::load_row;

#ifdef PEFTCORE_GROUPED_AVX2
template <typename scalar_t, typename acc_t>
constexpr auto loops_avx2_forward_row = &loops_avx2::forward_row<scalar_t, acc_t>;
#else
template <typename scalar_t, typename acc_t>
constexpr auto loops_avx2_forward_row = &loops_default::forward_row<scalar_t, acc_t>;
#endif

// Maximal runs of consecutive rows with one adapter (or none: adapter -1).
struct Run {
  int64_t start, length, adapter;
};

// The GEMM-per-run forward pays off from runs of this many rows on average (a BERT example's
// tokens make runs of the sequence length); below it the row pass runs.
constexpr int64_t kMinRunRows = 8;

// Runs longer than `cap` rows are cut into pieces of at most `cap`, so that a batch of few long
// runs (one adapter for the whole batch) still spreads over the threads.
inline std::vector<Run> row_runs(const int64_t* index, int64_t M, int64_t cap) {
  std::vector<Run> runs;
  for (int64_t m = 0; m < M; ++m) {
    if (!runs.empty() && runs.back().adapter == index[m] && runs.back().length < cap) ++runs.back().length;
    else runs.push_back({m, 1, index[m]});
  }
  return runs;
}

struct Groups {
  std::vector<int64_t> offsets;  // G + 1: rows of adapter g are rows[offsets[g] .. offsets[g + 1])
  std::vector<int64_t> rows;
};

// Rows sorted by adapter (stable counting sort); base rows (-1) are left out.
inline Groups sort_rows(const int64_t* index, int64_t M, int64_t G) {
  Groups out;
  out.offsets.assign(G + 1, 0);
  for (int64_t m = 0; m < M; ++m)
    if (index[m] >= 0) ++out.offsets[index[m] + 1];
  for (int64_t g = 0; g < G; ++g) out.offsets[g + 1] += out.offsets[g];
  out.rows.resize(out.offsets[G]);
  std::vector<int64_t> next(out.offsets.begin(), out.offsets.end() - 1);
  for (int64_t m = 0; m < M; ++m)
    if (index[m] >= 0) out.rows[next[index[m]]++] = m;
  return out;
}

void check(const at::Tensor& x, const at::Tensor& weight, at::TensorList A, at::TensorList B,
           at::ArrayRef<double> scales, const at::Tensor& index) {
  TORCH_CHECK(x.dim() == 2, "lora_grouped: x must be (M, K), got ", x.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), "lora_grouped: weight must be (N, K), got ",
              weight.sizes(), " for x ", x.sizes());
  TORCH_CHECK(A.size() == B.size() && A.size() == scales.size(), "lora_grouped: ", A.size(), " A factors, ",
              B.size(), " B factors and ", scales.size(), " scales; they must match");
  const int64_t K = x.size(1), N = weight.size(0);
  for (size_t g = 0; g < A.size(); ++g) {
    TORCH_CHECK(A[g].dim() == 2 && A[g].size(1) == K && B[g].dim() == 2 && B[g].size(0) == N &&
                    B[g].size(1) == A[g].size(0),
                "lora_grouped: adapter ", g, " has A ", A[g].sizes(), " and B ", B[g].sizes(), "; they must be (r, ", K,
                ") and (", N, ", r)");
    TORCH_CHECK(A[g].scalar_type() == x.scalar_type() && B[g].scalar_type() == x.scalar_type(),
                "lora_grouped: adapter ", g, " has dtype ", A[g].scalar_type(), "/", B[g].scalar_type(), ", x has ",
                x.scalar_type());
  }
  TORCH_CHECK(index.dim() == 1 && index.size(0) == x.size(0) &&
                  (index.scalar_type() == at::kLong || index.scalar_type() == at::kInt),
              "lora_grouped: index must be an integer tensor of shape (", x.size(0), ",), got ", index.scalar_type(),
              " ", index.sizes());
}

// Per-adapter dropout: adapters routed together keep their own probabilities; the draws are the
// same (seed, offset) stream for every adapter, as in lora_linear.
struct Dropout {
  std::vector<bool> drop;
  std::vector<uint32_t> thr;
  std::vector<double> inv_keep;
  uint64_t seed = 0;
  Dropout(at::ArrayRef<double> p, size_t G, const at::Tensor& seed_t) {
    TORCH_CHECK(p.size() == G, "lora_grouped: ", p.size(), " dropout probabilities for ", G, " adapters");
    bool any = false;
    for (double q : p) {
      TORCH_CHECK(q >= 0.0 && q < 1.0, "lora_grouped: dropout_p must be in [0, 1), got ", q);
      drop.push_back(q > 0.0);
      thr.push_back(philox::threshold(q));
      inv_keep.push_back(1.0 / (1.0 - q));
      any = any || q > 0.0;
    }
    if (any) seed = static_cast<uint64_t>(seed_t.item<int64_t>());
  }
};

int64_t max_rank(at::TensorList A) {
  int64_t R = 0;
  for (const auto& a : A) R = std::max(R, a.size(0));
  return R;
}

#ifdef PEFTCORE_GROUPED_AVX2
// The float32 forward's low-rank part (csrc/lora_grouped_tiles.h): y = b + scale h B^T and h for
// every row, rows in parallel; the caller's base GEMM then accumulates into y. The factors are
// packed by plain loops into two buffers (one allocation each, whatever the number of adapters):
// A[g] transposed to (K, 8 * R8), zero beyond its rank, so that one load holds eight ranks of one
// k; B[g] transposed to (r, N), so that the expand runs along N.
void forward_f32_tiles(const at::Tensor& x, const int64_t* idx, at::TensorList A, at::TensorList B,
                       at::ArrayRef<double> scales, const Dropout& dropout, const at::Tensor& b, at::Tensor& h,
                       at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = y.size(1), R = h.size(1), G = static_cast<int64_t>(A.size());
  const int64_t R8 = std::max<int64_t>(1, (R + 7) / 8);
  const int64_t at_size = K * 8 * R8, bt_size = R * N;
  at::Tensor packed = at::empty({G * (at_size + bt_size)}, x.options());
  float* pp = packed.data_ptr<float>();
  std::vector<const float*> Atp(G), Btp(G);
  std::vector<int64_t> ranks(G);
  std::vector<uint8_t> drop(G);  // Dropout::drop is a vector<bool>: no pointer to hand on
  for (int64_t g = 0; g < G; ++g) {
    const int64_t r = A[g].size(0);
    const float* a = A[g].data_ptr<float>();
    const float* bsrc = B[g].data_ptr<float>();
    const int64_t a0 = A[g].stride(0), a1 = A[g].stride(1), b0 = B[g].stride(0), b1 = B[g].stride(1);
    float* at = pp + g * (at_size + bt_size);
    float* bt = at + at_size;
    for (int64_t k = 0; k < K; ++k) {
      float* row = at + k * 8 * R8;
      for (int64_t j = 0; j < r; ++j) row[j] = a[j * a0 + k * a1];
      for (int64_t j = r; j < 8 * R8; ++j) row[j] = 0.0f;
    }
    for (int64_t j = 0; j < r; ++j)
      for (int64_t n = 0; n < N; ++n) bt[j * N + n] = bsrc[n * b0 + j * b1];
    Atp[g] = at;
    Btp[g] = bt;
    ranks[g] = r;
    drop[g] = dropout.drop[g];
  }
  const float* xp = x.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float* hp = h.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const uint8_t* dp = drop.data();
  const int64_t grain = std::max<int64_t>(16, 32768 / std::max<int64_t>(1, (K + N) * 8 * R8));
  const auto run = R8 == 1 ? &loops_avx2::forward_rows<1> : R8 == 2 ? &loops_avx2::forward_rows<2>
                   : R8 == 3 ? &loops_avx2::forward_rows<3> : &loops_avx2::forward_rows<4>;
  at::parallel_for(0, M, grain, [&](int64_t m0, int64_t m1) {
    std::vector<float> xrow(4 * K);  // the dropped rows of one tile
    run(xp, idx, m0, m1, K, N, R, Atp.data(), Btp.data(), ranks.data(), scales.data(), bp, dp, dropout.thr.data(),
        dropout.inv_keep.data(), dropout.seed, xrow.data(), hp, yp);
  });
}
#endif

std::tuple<at::Tensor, at::Tensor> lora_grouped_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                                                    const std::optional<at::Tensor>& bias, at::TensorList A_in,
                                                    at::TensorList B_in, at::ArrayRef<double> scales,
                                                    const at::Tensor& index_in, at::ArrayRef<double> dropout_p,
                                                    const at::Tensor& seed) {
  check(x_in, weight, A_in, B_in, scales, index_in);
  const Dropout dropout(dropout_p, A_in.size(), seed);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor index = index_in.to(at::kLong).contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), G = static_cast<int64_t>(A_in.size());
  const int64_t R = max_rank(A_in);
  const int64_t* idx = index.data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m)
    TORCH_CHECK(idx[m] >= -1 && idx[m] < G, "lora_grouped: index[", m, "] = ", idx[m], " is outside [-1, ", G, ")");
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor h = at::zeros({M, R}, x.options());
  at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
#ifdef PEFTCORE_GROUPED_AVX2
  if (x.scalar_type() == at::kFloat && R <= 32 && use_avx2_loops()) {
    forward_f32_tiles(x, idx, A_in, B_in, scales, dropout, b, h, y);
    y.addmm_(x, weight.t());
    return {y, h};
  }
#endif
  // B[g] transposed to (r, N), contiguous: the output row pass then runs along N.
  std::vector<at::Tensor> A(G), Bt(G);
  for (int64_t g = 0; g < G; ++g) {
    A[g] = A_in[g].contiguous();
    Bt[g] = B_in[g].t().contiguous();
  }
  const int64_t cap = std::max<int64_t>(64, M / (4 * std::max(1, at::get_num_threads())));
  const std::vector<Run> runs = row_runs(idx, M, cap);
  bool any_drop = false;
  for (int64_t g = 0; g < G; ++g) any_drop = any_drop || dropout.drop[g];
  if (!any_drop && static_cast<int64_t>(runs.size()) * kMinRunRows <= M) {
    // Rows come in runs of one adapter (each example's tokens are consecutive rows): each run is
    // two small GEMMs on row views of x, h and y (no gather, no copy of x), the runs in parallel,
    // each GEMM single-threaded (ATen inside a parallel region). The hand-written row pass
    // below cost 3-5 ms against 0.5-1 ms for this at 2048 x 384 -> 384, 8 adapters of rank 8,
    // runs of 64 rows, 2 threads (the base GEMM: 8 ms).
    at::parallel_for(0, static_cast<int64_t>(runs.size()), 1, [&](int64_t i0, int64_t i1) {
      // Below autograd, in every worker thread (the guard is thread-local): these ATen GEMMs see
      // the caller's tensors, which may require grad, and must record nothing (the op's own
      // autograd formula covers them).
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      for (int64_t i = i0; i < i1; ++i) {
        const Run& run = runs[i];
        at::Tensor y_run = y.narrow(0, run.start, run.length);
        if (run.adapter < 0) {
          if (b.defined()) y_run.copy_(b.expand({run.length, N}));
          else y_run.zero_();
          continue;
        }
        const int64_t r = A[run.adapter].size(0);
        const at::Tensor h_run = at::mm(x.narrow(0, run.start, run.length), A[run.adapter].t());  // (len, r)
        h.narrow(0, run.start, run.length).narrow(1, 0, r).copy_(h_run);
        if (b.defined())
          at::addmm_out(y_run, b, h_run, Bt[run.adapter], 1.0, scales[run.adapter]);
        else
          at::addmm_out(y_run, y_run, h_run, Bt[run.adapter], 0.0, scales[run.adapter]);
      }
    });
    y.addmm_(x, weight.t());
    return {y, h};
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "peftcore_lora_grouped", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* bp = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t* hp = h.data_ptr<scalar_t>();
    std::vector<const scalar_t*> Ap(G), Btp(G);
    for (int64_t g = 0; g < G; ++g) {
      Ap[g] = A[g].data_ptr<scalar_t>();
      Btp[g] = Bt[g].data_ptr<scalar_t>();
    }
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, (K + N) * std::max<int64_t>(R, 1)));
    const bool avx2 = use_avx2_loops();
    at::parallel_for(0, M, grain, [&](int64_t m0, int64_t m1) {
      std::vector<acc_t> xrow(K), yrow(N);
      for (int64_t m = m0; m < m1; ++m) {
        const int64_t g = idx[m];
        if (g < 0) {  // a base row: the bias (or zero), the base GEMM adds the rest
          scalar_t* out = yp + m * N;
          for (int64_t n = 0; n < N; ++n) out[n] = bp ? bp[n] : scalar_t(0);
          continue;
        }
        const auto row = avx2 ? loops_avx2_forward_row<scalar_t, acc_t> : &loops_default::forward_row<scalar_t, acc_t>;
        row(xp, bp, Ap[g], Btp[g], m, K, N, A[g].size(0), R, static_cast<acc_t>(scales[g]), dropout.seed,
            dropout.thr[g], static_cast<acc_t>(dropout.inv_keep[g]), dropout.drop[g], xrow.data(), yrow.data(), hp, yp);
      }
    });
  });
  // The base GEMM accumulates into y (beta = 1): no output-sized temporary.
  y.addmm_(x, weight.t());
  return {y, h};
}

std::tuple<std::optional<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>> lora_grouped_backward_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& weight, at::TensorList A_in,
    at::TensorList B_in, const at::Tensor& h_in, at::ArrayRef<double> scales, const at::Tensor& index_in,
    at::ArrayRef<double> dropout_p, const at::Tensor& seed, std::array<bool, 3> output_mask) {
  check(x_in, weight, A_in, B_in, scales, index_in);
  const Dropout dropout(dropout_p, A_in.size(), seed);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor grad_y = grad_y_in.contiguous();
  const at::Tensor h = h_in.contiguous();
  const at::Tensor index = index_in.to(at::kLong).contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), G = static_cast<int64_t>(A_in.size());
  const int64_t R = h.size(1);
  const int64_t* idx = index.data_ptr<int64_t>();
  const auto [want_x, want_A, want_B] = output_mask;
  std::vector<at::Tensor> A(G), B(G);
  for (int64_t g = 0; g < G; ++g) {
    A[g] = A_in[g].contiguous();
    B[g] = B_in[g].contiguous();
  }
  const uint64_t seed_v = dropout.seed;
  at::Tensor grad_x = want_x ? at::empty({M, K}, x.options()) : at::Tensor();
  std::vector<at::Tensor> grad_A, grad_Bt;
  if (want_A)
    for (int64_t g = 0; g < G; ++g) grad_A.push_back(at::empty_like(A[g]));
  if (want_B)
    for (int64_t g = 0; g < G; ++g) grad_Bt.push_back(at::empty({A[g].size(0), N}, x.options()));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "peftcore_lora_grouped_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gyp = grad_y.data_ptr<scalar_t>();
    const scalar_t* hp = h.data_ptr<scalar_t>();
    // gh = scale[g] grad_y[m] B[g] (M, R), kept in the opmath type for the parameter pass.
    std::vector<acc_t> gh(static_cast<size_t>(M * std::max<int64_t>(R, 1)), acc_t(0));
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, (K + N) * std::max<int64_t>(R, 1)));
    at::parallel_for(0, M, grain, [&](int64_t m0, int64_t m1) {
      std::vector<acc_t> gyrow(N), gxrow(K);
      for (int64_t m = m0; m < m1; ++m) {
        const int64_t g = idx[m];
        scalar_t* gx = want_x ? grad_x.data_ptr<scalar_t>() + m * K : nullptr;
        if (g < 0) {
          if (gx)
            for (int64_t k = 0; k < K; ++k) gx[k] = scalar_t(0);
          continue;
        }
        const int64_t r = A[g].size(0);
        const scalar_t* Bg = B[g].data_ptr<scalar_t>();  // (N, r)
        const scalar_t* Ag = A[g].data_ptr<scalar_t>();  // (r, K)
        const acc_t s = static_cast<acc_t>(scales[g]);
        const bool drop = dropout.drop[g];
        const uint32_t thr = dropout.thr[g];
        const acc_t inv_keep = static_cast<acc_t>(dropout.inv_keep[g]);
        for (int64_t n = 0; n < N; ++n) gyrow[n] = static_cast<acc_t>(gyp[m * N + n]);
        acc_t* ghm = gh.data() + m * R;
        for (int64_t j = 0; j < r; ++j) ghm[j] = acc_t(0);
        for (int64_t n = 0; n < N; ++n) {
          const acc_t gyn = gyrow[n];
          const scalar_t* brow = Bg + n * r;
          for (int64_t j = 0; j < r; ++j) ghm[j] += gyn * static_cast<acc_t>(brow[j]);
        }
        for (int64_t j = 0; j < r; ++j) ghm[j] *= s;
        if (!gx) continue;
        for (int64_t k = 0; k < K; ++k) gxrow[k] = acc_t(0);
        for (int64_t j = 0; j < r; ++j) {
          const acc_t c = ghm[j];
          const scalar_t* arow = Ag + j * K;
          for (int64_t k = 0; k < K; ++k) gxrow[k] += c * static_cast<acc_t>(arow[k]);
        }
        if (drop) {
          uint32_t block[4];
          uint64_t current = ~uint64_t{0};
          const uint64_t base = static_cast<uint64_t>(m) * static_cast<uint64_t>(K);
          for (int64_t k = 0; k < K; ++k) {
            const uint64_t o = base + static_cast<uint64_t>(k);
            if ((o >> 3) != current) {
              current = o >> 3;
              philox::block(seed_v, current, block);
            }
            gxrow[k] = philox::draw16(block, o) >= thr ? gxrow[k] * inv_keep : acc_t(0);
          }
        }
        for (int64_t k = 0; k < K; ++k) gx[k] = static_cast<scalar_t>(gxrow[k]);
      }
    });
    if (!want_A && !want_B) return;
    // Parameter gradients: tasks are (adapter, column block) pairs; each sums its adapter's rows
    // in sorted order, so every element is written by one task in a fixed order.
    const Groups groups = sort_rows(idx, M, G);
    constexpr int64_t kCols = 64;
    const int64_t kblocks = (K + kCols - 1) / kCols, nblocks = (N + kCols - 1) / kCols;
    const int64_t per_g = (want_A ? kblocks : 0) + (want_B ? nblocks : 0);
    at::parallel_for(0, G * per_g, 1, [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> acc(static_cast<size_t>(std::max<int64_t>(R, 1) * kCols));
      std::vector<acc_t> xrow(kCols);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t g = t / per_g;
        int64_t block_id = t % per_g;
        const int64_t r = A[g].size(0);
        const bool is_A = want_A && block_id < kblocks;
        const bool drop = dropout.drop[g];
        const uint32_t thr = dropout.thr[g];
        const acc_t inv_keep = static_cast<acc_t>(dropout.inv_keep[g]);
        if (want_A && !is_A) block_id -= kblocks;
        const int64_t cols = is_A ? K : N;
        const int64_t c0 = block_id * kCols, c1 = std::min(cols, c0 + kCols), w = c1 - c0;
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t i = groups.offsets[g]; i < groups.offsets[g + 1]; ++i) {
          const int64_t m = groups.rows[i];
          if (is_A) {
            // grad_A[g][j, k] += gh[m, j] * dropout(x)[m, k]
            const scalar_t* xr = xp + m * K + c0;
            if (drop) {
              uint32_t block[4];
              uint64_t current = ~uint64_t{0};
              const uint64_t base = static_cast<uint64_t>(m) * static_cast<uint64_t>(K) + static_cast<uint64_t>(c0);
              for (int64_t k = 0; k < w; ++k) {
                const uint64_t o = base + static_cast<uint64_t>(k);
                if ((o >> 3) != current) {
                  current = o >> 3;
                  philox::block(seed_v, current, block);
                }
                xrow[k] = philox::draw16(block, o) >= thr ? static_cast<acc_t>(xr[k]) * inv_keep : acc_t(0);
              }
            } else {
              for (int64_t k = 0; k < w; ++k) xrow[k] = static_cast<acc_t>(xr[k]);
            }
            const acc_t* ghm = gh.data() + m * R;
            for (int64_t j = 0; j < r; ++j) {
              const acc_t c = ghm[j];
              acc_t* a = acc.data() + j * kCols;
              for (int64_t k = 0; k < w; ++k) a[k] += c * xrow[k];
            }
          } else {
            // grad_B[g][n, j] = scale[g] sum_m grad_y[m, n] h[m, j], accumulated as (r, N)
            const scalar_t* gyr = gyp + m * N + c0;
            for (int64_t j = 0; j < r; ++j) {
              const acc_t c = static_cast<acc_t>(hp[m * R + j]);
              acc_t* a = acc.data() + j * kCols;
              for (int64_t n = 0; n < w; ++n) a[n] += c * static_cast<acc_t>(gyr[n]);
            }
          }
        }
        const acc_t s = is_A ? acc_t(1) : static_cast<acc_t>(scales[g]);
        scalar_t* out = is_A ? grad_A[g].data_ptr<scalar_t>() : grad_Bt[g].data_ptr<scalar_t>();
        for (int64_t j = 0; j < r; ++j)
          for (int64_t c = 0; c < w; ++c) out[j * cols + c0 + c] = static_cast<scalar_t>(s * acc[j * kCols + c]);
      }
    });
  });
  std::optional<at::Tensor> gx;
  if (want_x) {
    grad_x.addmm_(grad_y, weight);  // the base's input gradient, accumulated (beta = 1)
    gx = grad_x;
  }
  std::vector<at::Tensor> grad_B;
  for (auto& t : grad_Bt) grad_B.push_back(t.t().contiguous());
  return {gx, grad_A, grad_B};
}

}  // namespace grouped
}  // namespace peftcore

// The schemas live here rather than in schemas.cpp so that the op is one file (a fragment of
// the peftcore namespace); the contract is reference_lora_grouped's docstring.
TORCH_LIBRARY_FRAGMENT(peftcore, m) {
  // y (M, N) and h (M, R): h = dropout(x) A[index]^T padded to the largest rank R with zeros,
  // what autograd saves (with x and the seed) for backward.
  m.def("lora_grouped(Tensor x, Tensor weight, Tensor? bias, Tensor[] A, Tensor[] B, float[] scales, "
        "Tensor index, float[] dropout_p, Tensor seed) -> (Tensor, Tensor)");
  // grad_x (low-rank part masked, plus grad_y W), grad_A[g], grad_B[g]; an output whose
  // output_mask entry is false is None (grad_x) or an empty list (grad_A, grad_B).
  m.def("lora_grouped_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor[] A, Tensor[] B, Tensor h, "
        "float[] scales, Tensor index, float[] dropout_p, Tensor seed, bool[3] output_mask) "
        "-> (Tensor?, Tensor[], Tensor[])");
}

TORCH_LIBRARY_IMPL(peftcore, CPU, m) {
  m.impl("lora_grouped", &peftcore::grouped::lora_grouped_cpu);
  m.impl("lora_grouped_backward", &peftcore::grouped::lora_grouped_backward_cpu);
}
