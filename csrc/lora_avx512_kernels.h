// float32 row passes of the CPU lora_linear op on AVX-512F: what `auto` runs on CPUs that have it
// (PEFTCORE_CPU_KERNELS=avx2 runs the AVX2 loops of lora_cpu_kernels.h instead; other dtypes
// always do). No include guard: lora_linear.cpp includes this file once, inside namespace
// cpu_avx512 under `#pragma GCC target("avx512f,avx2,fma")`, after cpu_avx2, whose draws16 (the
// dropout mask's Philox draws) it reuses.
//
// The AVX2 loops go row by row (or four rows at a time) and stream the rank-sized factor and
// the gradient accumulator through L1 for every row: at K = 1536 both are 48 KB, L1's size, so
// every row paid L2 traffic for them besides its multiply-adds. These loops go column chunk by
// column chunk over a block of rows instead: 16 columns of 8 rank rows of the factor (writing
// y or grad_x), or of the gradient accumulator (grad_A, grad_B), sit in registers while all
// rows of the block pass, so a row costs its own loads, its stores and the multiply-adds. The
// projections (x A^T, grad_y B) go row-major, two rows at a time, each chunk of the factor
// loaded once for both rows.
//
// Layouts as for the AVX2 loops: contiguous rows; the factors A (r_pad, K) and B^T (r_pad, N)
// and the gradient accumulators (r_pad, K) and (r_pad, N) in float with zero rows up to r_pad,
// a multiple of kRanks.

constexpr int64_t kRanks = 8;   // rank rows per pass: 8 factor and 8 accumulator registers
constexpr int64_t kBlock = 32;  // rows per block: their x, grad_x and draws chunks stay in L1/L2
constexpr int64_t kPrefetch = 4 * 16;  // software prefetch distance along a row, in elements

// Lanes 0 .. n - 1 (n < 16) of a chunk: the loads and stores of a row's last, partial chunk.
inline __mmask16 tail_mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }

// Kept lanes of 16 draws: draw > threshold - 1, as keep_lanes in the AVX2 loops.
inline __mmask16 keep16(const uint16_t* u, __m512i t_minus_1) {
  const __m512i d = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(u)));
  return _mm512_cmpgt_epi32_mask(d, t_minus_1);
}

// [sum(a[0]), ..., sum(a[7])]: each vector's 16 lanes summed.
inline __m256 sum_lanes8(const __m512* a) {
  __m256 b[kRanks];
  for (int j = 0; j < kRanks; ++j) {
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a[j]), 1));
    b[j] = _mm256_add_ps(_mm512_castps512_ps256(a[j]), hi);
  }
  const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(b[0], b[1]), _mm256_hadd_ps(b[2], b[3]));
  const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(b[4], b[5]), _mm256_hadd_ps(b[6], b[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

// out[i][j] = sum_k keep_i(k) v[i][k] P[j, k] for j < r_pad and R rows at once (each chunk of P
// loaded once for the R rows); without Masked every element is kept and u is not read.
template <int R, bool Masked>
inline void project_rows(const float* const* v, const uint16_t* const* u, __m512i t1, const float* P, int64_t L,
                         int64_t r_pad, float* const* out) {
  const int64_t l_main = L - L % 16;
  for (int64_t jb = 0; jb < r_pad; jb += kRanks) {
    const float* p = P + jb * L;
    __m512 acc[R][kRanks];
    for (int i = 0; i < R; ++i) {
      for (int j = 0; j < kRanks; ++j) acc[i][j] = _mm512_setzero_ps();
    }
    const auto chunk = [&](int64_t k, __mmask16 lanes) {
      __m512 xv[R];
      for (int i = 0; i < R; ++i) {
        __builtin_prefetch(v[i] + k + kPrefetch, 0, 3);
        xv[i] = _mm512_maskz_loadu_ps(Masked ? lanes & keep16(u[i] + k, t1) : lanes, v[i] + k);
      }
      for (int j = 0; j < kRanks; ++j) {
        __m512 pj = _mm512_maskz_loadu_ps(lanes, p + j * L + k);
        // In a register for the R rows: GCC would otherwise fold the load into each row's
        // multiply-add (R loads of the same chunk, and the loads, not the FMAs, set the pace).
        if constexpr (R > 1) asm("" : "+v"(pj));
        for (int i = 0; i < R; ++i) acc[i][j] = _mm512_fmadd_ps(xv[i], pj, acc[i][j]);
      }
    };
    for (int64_t k = 0; k < l_main; k += 16) chunk(k, 0xFFFF);
    if (l_main < L) chunk(l_main, tail_mask(L - l_main));
    for (int i = 0; i < R; ++i) _mm256_storeu_ps(out[i] + jb, sum_lanes8(acc[i]));
  }
}

// Rows of a block, pairwise through project_rows (a lone last row on its own).
template <bool Masked>
inline void project_block(const float* const* v, const uint16_t* const* u, __m512i t1, const float* P, int64_t L,
                          int64_t r_pad, int64_t rows, float* c) {
  int64_t i = 0;
  for (; i + 2 <= rows; i += 2) {
    float* out[2] = {c + i * r_pad, c + (i + 1) * r_pad};
    project_rows<2, Masked>(v + i, u + i, t1, P, L, r_pad, out);
  }
  if (i < rows) {
    float* out[1] = {c + i * r_pad};
    project_rows<1, Masked>(v + i, u + i, t1, P, L, r_pad, out);
  }
}

// dst[i] = keep_i((bias or 0) + sum_j c[i][j] E[j]) for the rows of a block (E: (r_pad, L); c:
// rows x r_pad coefficients; dst rows ld apart; keep_i from the row's draws u[i] if Masked, else
// every lane): a chunk of 8 rank rows of E in registers while every row's output chunk is
// written once. Rank blocks after the first add into dst.
template <bool Masked>
inline void expand_block(const float* c, int64_t rows, const float* E, int64_t L, int64_t r_pad, const float* bias,
                         float* dst, int64_t ld, const uint16_t* const* u, __m512i t1) {
  const int64_t l_main = L - L % 16;
  for (int64_t jb = 0; jb < r_pad; jb += kRanks) {
    const float* e = E + jb * L;
    const auto chunk = [&](int64_t k, __mmask16 lanes) {
      __m512 ej[kRanks];
      for (int j = 0; j < kRanks; ++j) ej[j] = _mm512_maskz_loadu_ps(lanes, e + j * L + k);
      const __m512 b0 = jb == 0 && bias != nullptr ? _mm512_maskz_loadu_ps(lanes, bias + k) : _mm512_setzero_ps();
      for (int64_t i = 0; i < rows; ++i) {
        float* d = dst + i * ld + k;
        __builtin_prefetch(d + kPrefetch, 1, 3);  // own the row's line ahead of the store
        // Two chains of four multiply-adds rather than one of eight: half the latency per row.
        __m512 acc0 = jb == 0 ? b0 : _mm512_maskz_loadu_ps(lanes, d);
        __m512 acc1 = _mm512_setzero_ps();
        const float* ci = c + i * r_pad + jb;
        for (int j = 0; j < kRanks; j += 2) {
          acc0 = _mm512_fmadd_ps(_mm512_set1_ps(ci[j]), ej[j], acc0);
          acc1 = _mm512_fmadd_ps(_mm512_set1_ps(ci[j + 1]), ej[j + 1], acc1);
        }
        const __mmask16 keep = Masked ? keep16(u[i] + k, t1) : static_cast<__mmask16>(0xFFFF);
        _mm512_mask_storeu_ps(d, lanes, _mm512_maskz_add_ps(keep, acc0, acc1));
      }
    };
    for (int64_t k = 0; k < l_main; k += 16) chunk(k, 0xFFFF);
    if (l_main < L) chunk(l_main, tail_mask(L - l_main));
  }
}

// The dropout draws of a block's rows (row i: element offsets start .. start + L - 1 of the
// mask), and the threshold the passes compare them with.
class BlockDraws {
 public:
  BlockDraws(int64_t L, uint32_t threshold, bool used)
      : L_(L), stride_(8 * (L / 8 + 2) + 32), t1_(_mm512_set1_epi32(static_cast<int32_t>(threshold) - 1)),
        words_(used ? 4 * (L / 8 + 2) : 0), draws_(used ? kBlock * stride_ : 0) {}
  void make(int64_t i, uint64_t seed, int64_t start) {
    rows_[i] = cpu_avx2::draws16(seed, start, L_, words_.data(), draws_.data() + i * stride_);
  }
  const uint16_t* const* rows() const { return rows_; }
  __m512i t1() const { return t1_; }

 private:
  // A row's room: draws16 writes whole Philox blocks from an offset that may start mid-block,
  // and the last chunk reads 16 lanes.
  int64_t L_, stride_;
  __m512i t1_;
  std::vector<uint32_t> words_;
  std::vector<uint16_t> draws_;
  const uint16_t* rows_[kBlock] = {};
};

// Forward rows [m0, m1): h[m] = s keep(x[m]) A^T (s = 1 / (1 - p); every element kept without
// dropout) and y[m] = bias + scale h[m] B^T, block by block. y[m] is computed from h[m] as
// stored; the base GEMM accumulates x W^T into y afterwards.
inline void forward_rows_f32(const float* x, const float* A, float* h, const float* Bt, const float* bias, float* y,
                             int64_t K, int64_t N, int64_t r, int64_t r_pad, bool dropout, uint64_t seed,
                             uint32_t threshold, float s, float scale, int64_t m0, int64_t m1) {
  BlockDraws u(K, threshold, dropout);
  const __m512i t1 = u.t1();
  const uint16_t* const* ur = u.rows();
  std::vector<float> proj(kBlock * r_pad), coeff(kBlock * r_pad, 0.f);
  const float* xr[kBlock];
  for (int64_t mb = m0; mb < m1; mb += kBlock) {
    const int64_t rows = std::min(kBlock, m1 - mb);
    for (int64_t i = 0; i < rows; ++i) {
      xr[i] = x + (mb + i) * K;
      if (dropout) u.make(i, seed, (mb + i) * K);
    }
    if (dropout) {
      project_block<true>(xr, ur, t1, A, K, r_pad, rows, proj.data());
    } else {
      project_block<false>(xr, ur, t1, A, K, r_pad, rows, proj.data());
    }
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t m = mb + i;
      for (int64_t j = 0; j < r; ++j) {
        h[m * r + j] = s * proj[i * r_pad + j];
        coeff[i * r_pad + j] = scale * h[m * r + j];
      }
    }
    expand_block<false>(coeff.data(), rows, Bt, N, r_pad, bias, y + mb * N, N, ur, t1);
  }
}

// acc[j] += sum_i c[i][j] keep_i(v[i]) over the rows of a block (v rows ld apart; keep_i as in
// expand_block): a chunk of 8 accumulator rows in registers while the rows pass.
template <bool Masked>
inline void accumulate_block(const float* c, int64_t rows, const float* v, int64_t ld, int64_t L, int64_t r_pad,
                             float* acc, const uint16_t* const* u, __m512i t1) {
  const int64_t l_main = L - L % 16;
  for (int64_t jb = 0; jb < r_pad; jb += kRanks) {
    float* a = acc + jb * L;
    const auto chunk = [&](int64_t k, __mmask16 lanes) {
      __m512 g[kRanks];
      for (int j = 0; j < kRanks; ++j) g[j] = _mm512_maskz_loadu_ps(lanes, a + j * L + k);
      for (int64_t i = 0; i < rows; ++i) {
        const float* vi = v + i * ld + k;
        // A few chunks ahead: the column pattern across rows is not one the hardware prefetchers
        // follow, and v (x in the backward) comes from memory.
        __builtin_prefetch(vi + kPrefetch, 0, 3);
        const __mmask16 keep = Masked ? lanes & keep16(u[i] + k, t1) : lanes;
        const __m512 x = _mm512_maskz_loadu_ps(keep, vi);
        const float* ci = c + i * r_pad + jb;
        for (int j = 0; j < kRanks; ++j) g[j] = _mm512_fmadd_ps(_mm512_set1_ps(ci[j]), x, g[j]);
      }
      for (int j = 0; j < kRanks; ++j) _mm512_mask_storeu_ps(a + j * L + k, lanes, g[j]);
    };
    for (int64_t k = 0; k < l_main; k += 16) chunk(k, 0xFFFF);
    if (l_main < L) chunk(l_main, tail_mask(L - l_main));
  }
}

// Backward rows [m0, m1) block by block (accumulators (r_pad, K) and (r_pad, N), zero rows past
// r staying zero):
//   gh[m]         = scale grad_y[m] B                (rank-sized)
//   grad_Bt_part += scale h[m]^T grad_y[m]
//   grad_A_part  += (s gh[m])^T keep(x[m])           (if grad_A_part)
//   grad_x[m]     = keep (s gh[m] A)                 (if grad_x; the caller adds grad_y W after)
inline void backward_rows_f32(const float* grad_y, const float* x, const float* h, const float* A, const float* Bt,
                              float* grad_x, float* grad_A_part, float* grad_Bt_part, int64_t K, int64_t N, int64_t r,
                              int64_t r_pad, float scale, bool dropout, uint64_t seed, uint32_t threshold, float s,
                              int64_t m0, int64_t m1) {
  const bool need_gh = grad_A_part != nullptr || grad_x != nullptr;
  BlockDraws u(K, threshold, dropout && need_gh);
  const __m512i t1 = u.t1();
  const uint16_t* const* ur = u.rows();
  std::vector<float> ch(kBlock * r_pad, 0.f), cg(kBlock * r_pad);
  const float* gyr[kBlock];
  for (int64_t mb = m0; mb < m1; mb += kBlock) {
    const int64_t rows = std::min(kBlock, m1 - mb);
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t m = mb + i;
      gyr[i] = grad_y + m * N;
      for (int64_t j = 0; j < r; ++j) ch[i * r_pad + j] = scale * h[m * r + j];
      if (need_gh && dropout) u.make(i, seed, m * K);
    }
    // The projection first: it reads the block's grad_y rows in order (which the hardware
    // prefetchers follow), and accumulate_block's column pattern then finds them in cache.
    if (need_gh) project_block<false>(gyr, ur, t1, Bt, N, r_pad, rows, cg.data());
    if (grad_Bt_part != nullptr) accumulate_block<false>(ch.data(), rows, grad_y + mb * N, N, N, r_pad, grad_Bt_part, ur, t1);
    if (!need_gh) continue;
    const float sc = scale * s;
    for (int64_t k = 0; k < rows * r_pad; ++k) cg[k] *= sc;
    // grad_x and grad_A in two passes over K: one pass doing both kept the factor, the
    // accumulator and the broadcast coefficients in registers at once and measured slower.
    float* gx = grad_x == nullptr ? nullptr : grad_x + mb * K;
    const float* xb = x + mb * K;
    if (dropout) {
      if (gx != nullptr) expand_block<true>(cg.data(), rows, A, K, r_pad, nullptr, gx, K, ur, t1);
      if (grad_A_part != nullptr) accumulate_block<true>(cg.data(), rows, xb, K, K, r_pad, grad_A_part, ur, t1);
    } else {
      if (gx != nullptr) expand_block<false>(cg.data(), rows, A, K, r_pad, nullptr, gx, K, ur, t1);
      if (grad_A_part != nullptr) accumulate_block<false>(cg.data(), rows, xb, K, K, r_pad, grad_A_part, ur, t1);
    }
  }
}

// Entry points for the dtype-generic callers: float rows run here (true is returned); other
// dtypes return false and take the AVX2 loops.
template <typename scalar_t, typename acc_t>
inline bool forward_rows(const scalar_t* x, const acc_t* A, scalar_t* h, const acc_t* Bt, const scalar_t* bias,
                         scalar_t* y, int64_t K, int64_t N, int64_t r, int64_t r_pad, bool dropout, uint64_t seed,
                         uint32_t threshold, acc_t s, acc_t scale, int64_t m0, int64_t m1) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    forward_rows_f32(x, A, h, Bt, bias, y, K, N, r, r_pad, dropout, seed, threshold, s, scale, m0, m1);
    return true;
  }
  return false;
}

template <typename scalar_t, typename acc_t>
inline bool backward_rows(const scalar_t* grad_y, const scalar_t* x, const scalar_t* h, const acc_t* A, const acc_t* Bt,
                          scalar_t* grad_x, acc_t* grad_A_part, acc_t* grad_Bt_part, int64_t K, int64_t N, int64_t r,
                          int64_t r_pad, acc_t scale, bool dropout, uint64_t seed, uint32_t threshold, acc_t s,
                          int64_t m0, int64_t m1) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    backward_rows_f32(grad_y, x, h, A, Bt, grad_x, grad_A_part, grad_Bt_part, K, N, r, r_pad, scale, dropout, seed,
                      threshold, s, m0, m1);
    return true;
  }
  return false;
}
