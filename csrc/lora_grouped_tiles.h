// The float32 forward of peftcore::lora_grouped with AVX2+FMA (csrc/lora_grouped.cpp): each row's
// low-rank path in registers, a few rows of one adapter at a time.
//
//   h[m, :r] = x[m] A[g]^T            (K steps, lane j of an 8-wide accumulator holding rank j)
//   y[m, :]  = b + scale[g] h[m] B[g]^T
//
// A[g] is passed transposed and zero-padded, At (K, 8 * R8), so that one load holds eight ranks
// of step k and the shrink is a broadcast of x[m, k] and an FMA per eight ranks, summing k in
// order (no horizontal sums). The expand runs along N with B[g]^T (r, N), y's row written once.
// Rows of one adapter go through in tiles of up to TR rows that share every load of At and B^T;
// the per-call ATen GEMMs of the runs (two per example, with their dispatch and threading
// overhead) cost more than the whole of this at the shapes routing sees. Included inside a
// namespace, compiled only under the AVX2 guard.

#include <immintrin.h>

// Accumulators per row and eight ranks: two over alternate k where one register holds all the
// ranks (r <= 8), hiding the FMA latency; one otherwise (the ranks' registers already do).
template <int R8>
constexpr int kPartials = R8 == 1 ? 2 : 1;

// Rows per tile: TR * R8 * partials accumulators, at most 8 of the 16 vector registers.
template <int R8>
constexpr int kTileRows = R8 == 1 ? 4 : (R8 == 2 ? 2 : 1);

// TR rows (pointers xr[t], K floats each, already dropped where the adapter drops) of one adapter:
// h rows (stride R, r values written) and y rows (N values written: b + scale h B^T).
template <int TR, int R8>
__attribute__((target("avx2,fma"))) inline void tile(const float* const* xr, int64_t K, int64_t N, const float* At,
                                                      const float* Bt, int64_t r, float scale, const float* bias,
                                                      float* const* hr, float* const* yr) {
  constexpr int P = kPartials<R8>;
  __m256 acc[TR][R8][P];
  for (int t = 0; t < TR; ++t)
    for (int v = 0; v < R8; ++v)
      for (int p = 0; p < P; ++p) acc[t][v][p] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + P <= K; k += P) {
    for (int p = 0; p < P; ++p) {
      const float* arow = At + (k + p) * (8 * R8);
      for (int v = 0; v < R8; ++v) {
        const __m256 a = _mm256_loadu_ps(arow + 8 * v);
        for (int t = 0; t < TR; ++t) acc[t][v][p] = _mm256_fmadd_ps(_mm256_set1_ps(xr[t][k + p]), a, acc[t][v][p]);
      }
    }
  }
  for (; k < K; ++k) {
    const float* arow = At + k * (8 * R8);
    for (int v = 0; v < R8; ++v) {
      const __m256 a = _mm256_loadu_ps(arow + 8 * v);
      for (int t = 0; t < TR; ++t) acc[t][v][0] = _mm256_fmadd_ps(_mm256_set1_ps(xr[t][k]), a, acc[t][v][0]);
    }
  }
  alignas(32) float hv[TR][8 * R8];
  for (int t = 0; t < TR; ++t)
    for (int v = 0; v < R8; ++v) {
      __m256 s = acc[t][v][0];
      if constexpr (P == 2) s = _mm256_add_ps(s, acc[t][v][1]);
      _mm256_store_ps(hv[t] + 8 * v, s);
    }
  for (int t = 0; t < TR; ++t)
    for (int64_t j = 0; j < r; ++j) hr[t][j] = hv[t][j];
  // scale * h, the expand's broadcast coefficients
  for (int t = 0; t < TR; ++t)
    for (int64_t j = 0; j < r; ++j) hv[t][j] *= scale;
  int64_t n = 0;
  for (; n + 8 <= N; n += 8) {
    __m256 out[TR];
    const __m256 b0 = bias ? _mm256_loadu_ps(bias + n) : _mm256_setzero_ps();
    for (int t = 0; t < TR; ++t) out[t] = b0;
    for (int64_t j = 0; j < r; ++j) {
      const __m256 b = _mm256_loadu_ps(Bt + j * N + n);
      for (int t = 0; t < TR; ++t) out[t] = _mm256_fmadd_ps(_mm256_set1_ps(hv[t][j]), b, out[t]);
    }
    for (int t = 0; t < TR; ++t) _mm256_storeu_ps(yr[t] + n, out[t]);
  }
  for (; n < N; ++n)
    for (int t = 0; t < TR; ++t) {
      float s = bias ? bias[n] : 0.0f;
      for (int64_t j = 0; j < r; ++j) s = std::fma(hv[t][j], Bt[j * N + n], s);
      yr[t][n] = s;
    }
}

// Rows [m0, m1) of the forward: each row's adapter g = index[m] (-1: y = b, or 0), consecutive
// rows of one adapter in tiles of up to kTileRows<R8>. xrow: scratch of kTileRows<1> * K floats
// for rows whose adapter drops (the dropped row is built there first, as load_row does).
template <int R8>
__attribute__((target("avx2,fma"))) void forward_rows(const float* x, const int64_t* index, int64_t m0, int64_t m1,
                                                      int64_t K, int64_t N, int64_t R, const float* const* At,
                                                      const float* const* Bt, const int64_t* ranks,
                                                      const double* scales, const float* bias, const uint8_t* drop,
                                                      const uint32_t* thr, const double* inv_keep, uint64_t seed,
                                                      float* xrow, float* h, float* y) {
  constexpr int TR = kTileRows<R8>;
  int64_t m = m0;
  while (m < m1) {
    const int64_t g = index[m];
    if (g < 0) {
      float* out = y + m * N;
      for (int64_t n = 0; n < N; ++n) out[n] = bias ? bias[n] : 0.0f;
      ++m;
      continue;
    }
    int64_t rows = 1;
    while (rows < TR && m + rows < m1 && index[m + rows] == g) ++rows;
    const float* xr[TR];
    float* hr[TR];
    float* yr[TR];
    for (int64_t t = 0; t < rows; ++t) {
      if (drop[g]) {
        load_row(x + (m + t) * K, m + t, K, seed, thr[g], static_cast<float>(inv_keep[g]), true, xrow + t * K);
        xr[t] = xrow + t * K;
      } else {
        xr[t] = x + (m + t) * K;
      }
      hr[t] = h + (m + t) * R;
      yr[t] = y + (m + t) * N;
    }
    const float s = static_cast<float>(scales[g]);
    if (rows == TR) {
      tile<TR, R8>(xr, K, N, At[g], Bt[g], ranks[g], s, bias, hr, yr);
    } else {
      for (int64_t t = 0; t < rows; ++t) tile<1, R8>(xr + t, K, N, At[g], Bt[g], ranks[g], s, bias, hr + t, yr + t);
    }
    m += rows;
  }
}
