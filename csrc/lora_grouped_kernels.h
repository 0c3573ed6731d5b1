// The hot loops of peftcore::lora_grouped on the CPU (csrc/lora_grouped.cpp), included twice:
// plainly (any CPU) and under `#pragma GCC target("avx2,fma")` (chosen at run time), as
// lora_cpu_kernels.h is for lora_linear. Without AVX2 the compiler's vectors are 4 floats wide
// (SSE2), and these row passes then cost a quarter of the base GEMM's time at MiniLM's shapes.
// No include guard: meant to be included inside a namespace.

// Dot product with eight partial sums, so -O3 vectorises it without -ffast-math.
template <typename T, typename acc_t>
inline acc_t dot(const T* a, const acc_t* b, int64_t n) {
  acc_t s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) s[l] += static_cast<acc_t>(a[i + l]) * b[i + l];
  acc_t total = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
  for (; i < n; ++i) total += static_cast<acc_t>(a[i]) * b[i];
  return total;
}

// Row m of x, dropped and scaled by 1 / (1 - p) (or copied), into out (opmath type).
template <typename T, typename acc_t>
inline void load_row(const T* x, int64_t m, int64_t K, uint64_t seed, uint32_t thr, acc_t inv_keep, bool drop,
                     acc_t* out) {
  if (!drop) {
    for (int64_t k = 0; k < K; ++k) out[k] = static_cast<acc_t>(x[k]);
    return;
  }
  uint32_t block[4];
  uint64_t current = ~uint64_t{0};
  const uint64_t base = static_cast<uint64_t>(m) * static_cast<uint64_t>(K);
  for (int64_t k = 0; k < K; ++k) {
    const uint64_t o = base + static_cast<uint64_t>(k);
    if ((o >> 3) != current) {
      current = o >> 3;
      philox::block(seed, current, block);
    }
    out[k] = philox::draw16(block, o) >= thr ? static_cast<acc_t>(x[k]) * inv_keep : acc_t(0);
  }
}

// Forward of row m of adapter g (g >= 0): h[m, :r] and y[m, :] = b + scale h B^T (y not yet
// holding the base GEMM's output). xrow, yrow: scratch of K and N opmath values.
template <typename scalar_t, typename acc_t>
inline void forward_row(const scalar_t* x, const scalar_t* bias, const scalar_t* A, const scalar_t* Bt, int64_t m,
                        int64_t K, int64_t N, int64_t r, int64_t R, acc_t scale, uint64_t seed, uint32_t thr,
                        acc_t inv_keep, bool drop, acc_t* xrow, acc_t* yrow, scalar_t* h, scalar_t* y) {
  for (int64_t n = 0; n < N; ++n) yrow[n] = bias ? static_cast<acc_t>(bias[n]) : acc_t(0);
  load_row(x + m * K, m, K, seed, thr, inv_keep, drop, xrow);
  for (int64_t j = 0; j < r; ++j) {
    const acc_t hj = dot(A + j * K, xrow, K);
    h[m * R + j] = static_cast<scalar_t>(hj);
    // h as stored (rounded to x's dtype) feeds y, as the reference's F.linear chain does.
    const acc_t c = scale * static_cast<acc_t>(static_cast<scalar_t>(hj));
    const scalar_t* brow = Bt + j * N;
    for (int64_t n = 0; n < N; ++n) yrow[n] += c * static_cast<acc_t>(brow[n]);
  }
  scalar_t* out = y + m * N;
  for (int64_t n = 0; n < N; ++n) out[n] = static_cast<scalar_t>(yrow[n]);
}
