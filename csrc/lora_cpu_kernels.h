// Hot loops of the CPU lora_linear op: the dropout mask (Philox draws turned into multipliers)
// fused with the rank-sized products that read it. No include guard on purpose:
// lora_linear.cpp includes this file twice, once as is (namespace ...::cpu_default) and once
// under `#pragma GCC target("avx2,fma")` with PEFTCORE_AVX2 defined (namespace ...::cpu_avx2),
// and picks one at run time, so the build runs on any x86-64 and uses AVX2 where present.
// Includers provide <cstdint>, <cstring>, <algorithm>, <type_traits>, <vector>, <immintrin.h> (x86) and
// philox.h.
//
// Layouts: rows of x, grad_y and grad_x are contiguous; the rank-sized factors come as
// (r_pad, L) row-major buffers in the accumulation type with zero rows up to r_pad (a multiple
// of kRankBlock), so the inner loops have fixed trip counts that compile to register-blocked
// vector code.

constexpr int64_t kRankBlock = 8;  // rank rows handled together (8 accumulators)
constexpr int64_t kLanes = 8;      // elements per accumulator vector
constexpr int64_t kRowGroup = 4;   // rows sharing one pass over a (r, L) gradient accumulator

#ifdef PEFTCORE_AVX2
// Philox on 8 counters at once (one per 32-bit lane): 32x32 -> 64-bit products on even and odd
// lanes. One round is a chain of about nine dependent instructions, so a lone group of 8 is
// latency-bound; philox_blocks runs four independent groups side by side (0.62 against 0.92 ns
// per element for one group at a time, one core of an AMD EPYC; the same draws bit for bit).
struct PhiloxLanes {
  __m256i c0, c1, c2, c3;
};

inline PhiloxLanes philox_lanes_start(uint64_t g) {
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return {_mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(g))), iota),
          _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(g >> 32))), _mm256_setzero_si256(),
          _mm256_setzero_si256()};
}

inline void philox_lanes_round(PhiloxLanes& s, __m256i mul_a, __m256i mul_b, __m256i k0, __m256i k1) {
  const __m256i p0e = _mm256_mul_epu32(mul_a, s.c0);
  const __m256i p0o = _mm256_mul_epu32(mul_a, _mm256_srli_epi64(s.c0, 32));
  const __m256i p2e = _mm256_mul_epu32(mul_b, s.c2);
  const __m256i p2o = _mm256_mul_epu32(mul_b, _mm256_srli_epi64(s.c2, 32));
  const __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(p0e, 32), p0o, 0xAA);
  const __m256i lo0 = _mm256_blend_epi32(p0e, _mm256_slli_epi64(p0o, 32), 0xAA);
  const __m256i hi2 = _mm256_blend_epi32(_mm256_srli_epi64(p2e, 32), p2o, 0xAA);
  const __m256i lo2 = _mm256_blend_epi32(p2e, _mm256_slli_epi64(p2o, 32), 0xAA);
  s.c0 = _mm256_xor_si256(_mm256_xor_si256(hi2, s.c1), k0);
  s.c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, s.c3), k1);
  s.c1 = lo2;
  s.c3 = lo0;
}

// The 8 blocks' outputs in order: a 4 x 8 transpose, out[4 * block + output].
inline void philox_lanes_store(const PhiloxLanes& s, uint32_t* out) {
  const __m256i t0 = _mm256_unpacklo_epi32(s.c0, s.c1);
  const __m256i t1 = _mm256_unpackhi_epi32(s.c0, s.c1);
  const __m256i t2 = _mm256_unpacklo_epi32(s.c2, s.c3);
  const __m256i t3 = _mm256_unpackhi_epi32(s.c2, s.c3);
  const __m256i u0 = _mm256_unpacklo_epi64(t0, t2);  // blocks 0 | 4
  const __m256i u1 = _mm256_unpackhi_epi64(t0, t2);  // blocks 1 | 5
  const __m256i u2 = _mm256_unpacklo_epi64(t1, t3);  // blocks 2 | 6
  const __m256i u3 = _mm256_unpackhi_epi64(t1, t3);  // blocks 3 | 7
  __m256i* dst = reinterpret_cast<__m256i*>(out);
  _mm256_storeu_si256(dst + 0, _mm256_permute2x128_si256(u0, u1, 0x20));
  _mm256_storeu_si256(dst + 1, _mm256_permute2x128_si256(u2, u3, 0x20));
  _mm256_storeu_si256(dst + 2, _mm256_permute2x128_si256(u0, u1, 0x31));
  _mm256_storeu_si256(dst + 3, _mm256_permute2x128_si256(u2, u3, 0x31));
}
#endif

// Philox outputs of blocks g0 .. g0 + n_blocks - 1, written as out[4 * i + output].
inline void philox_blocks(uint64_t seed, uint64_t g0, int64_t n_blocks, uint32_t* out) {
  int64_t i = 0;
#ifdef PEFTCORE_AVX2
  static const bool wide = use_avx512();  // 16 counters at a time where the CPU has AVX-512F
  if (wide) return philox_blocks_avx512(seed, g0, n_blocks, out);
  // 32 counters per iteration in four independent groups of 8, whose round chains overlap; then
  // 16, then 8; then scalar blocks. A group stops before its low counter word would carry.
  __m256i key0[philox::kRounds], key1[philox::kRounds];
  {
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int r = 0; r < philox::kRounds; ++r) {
      key0[r] = _mm256_set1_epi32(static_cast<int>(k0));
      key1[r] = _mm256_set1_epi32(static_cast<int>(k1));
      k0 += philox::kKeyA;
      k1 += philox::kKeyB;
    }
  }
  const __m256i mul_a = _mm256_set1_epi32(static_cast<int>(philox::kRoundA));
  const __m256i mul_b = _mm256_set1_epi32(static_cast<int>(philox::kRoundB));
  for (; i + 32 <= n_blocks; i += 32) {
    const uint64_t g = g0 + static_cast<uint64_t>(i);
    if (static_cast<uint32_t>(g) > 0xFFFFFFE0u) break;
    PhiloxLanes a = philox_lanes_start(g), b = philox_lanes_start(g + 8), c = philox_lanes_start(g + 16), d = philox_lanes_start(g + 24);
    for (int r = 0; r < philox::kRounds; ++r) {
      philox_lanes_round(a, mul_a, mul_b, key0[r], key1[r]);
      philox_lanes_round(b, mul_a, mul_b, key0[r], key1[r]);
      philox_lanes_round(c, mul_a, mul_b, key0[r], key1[r]);
      philox_lanes_round(d, mul_a, mul_b, key0[r], key1[r]);
    }
    philox_lanes_store(a, out + 4 * i);
    philox_lanes_store(b, out + 4 * i + 32);
    philox_lanes_store(c, out + 4 * i + 64);
    philox_lanes_store(d, out + 4 * i + 96);
  }
  for (; i + 16 <= n_blocks; i += 16) {
    const uint64_t g = g0 + static_cast<uint64_t>(i);
    if (static_cast<uint32_t>(g) > 0xFFFFFFF0u) break;
    PhiloxLanes a = philox_lanes_start(g), b = philox_lanes_start(g + 8);
    for (int r = 0; r < philox::kRounds; ++r) {
      philox_lanes_round(a, mul_a, mul_b, key0[r], key1[r]);
      philox_lanes_round(b, mul_a, mul_b, key0[r], key1[r]);
    }
    philox_lanes_store(a, out + 4 * i);
    philox_lanes_store(b, out + 4 * i + 32);
  }
  for (; i + 8 <= n_blocks; i += 8) {
    const uint64_t g = g0 + static_cast<uint64_t>(i);
    if (static_cast<uint32_t>(g) > 0xFFFFFFF8u) break;
    PhiloxLanes a = philox_lanes_start(g);
    for (int r = 0; r < philox::kRounds; ++r) philox_lanes_round(a, mul_a, mul_b, key0[r], key1[r]);
    philox_lanes_store(a, out + 4 * i);
  }
#endif
  for (; i < n_blocks; ++i) philox::block(seed, g0 + static_cast<uint64_t>(i), out + 4 * i);
}

// The 16-bit draws of offsets start .. start + n - 1 into draws[0 .. n): Philox blocks
// start >> 3 onwards, each cut into eight draws (low half of each output first). draws needs
// room for n + 16 entries; words for 4 * (n / 8 + 2).
inline const uint16_t* draws16(uint64_t seed, int64_t start, int64_t n, uint32_t* words, uint16_t* draws) {
  const uint64_t g0 = static_cast<uint64_t>(start) >> 3;
  const int64_t n_blocks = static_cast<int64_t>(((static_cast<uint64_t>(start + n - 1)) >> 3) - g0) + 1;
  philox_blocks(seed, g0, n_blocks, words);
  // Output word i holds the draws 2i (low half) and 2i + 1 (high half): on a little-endian
  // machine that is the words' own memory order, which the copy keeps.
  static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "draws16 reads 16-bit halves in memory order");
  std::memcpy(draws, words, static_cast<size_t>(n_blocks) * 4 * sizeof(uint32_t));
  return draws + (static_cast<uint64_t>(start) - 8 * g0);
}

// mult[k] = keep(offset start + k) ? s : 0 for k < n (scratch as for draws16).
template <typename acc_t>
inline void dropout_multipliers(uint64_t seed, int64_t start, int64_t n, uint32_t threshold, acc_t s,
                                uint32_t* words, uint16_t* draws, acc_t* mult) {
  const uint16_t* u = draws16(seed, start, n, words, draws);
  // Draws and threshold are below 2^16, so a signed 32-bit compare is exact (and vectorises).
  const int32_t t = static_cast<int32_t>(threshold);
  for (int64_t k = 0; k < n; ++k) mult[k] = static_cast<int32_t>(u[k]) >= t ? s : acc_t(0);
}

#ifdef PEFTCORE_AVX2
// The dropout mask applied in registers, from the 16-bit draws: float rows never get a buffer of
// multipliers or dropped copies of their own (forward), and grad_x is masked as it is written
// (backward). Lanes of 8 draws widen to 32 bits; kept iff draw > threshold - 1 (signed compare:
// draws and threshold are below 2^16; threshold 0 gives -1, which keeps everything).
inline __m256 keep_lanes(const uint16_t* u, __m256i t_minus_1) {
  const __m256i d = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(u)));
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(d, t_minus_1));
}

// dst[k] = keep(u[k]) ? v[k] : 0.
inline void select_row_f32(const float* v, const uint16_t* u, int32_t threshold, int64_t L, float* dst) {
  const __m256i t1 = _mm256_set1_epi32(threshold - 1);
  int64_t k = 0;
  for (; k + 8 <= L; k += 8) _mm256_storeu_ps(dst + k, _mm256_and_ps(_mm256_loadu_ps(v + k), keep_lanes(u + k, t1)));
  for (; k < L; ++k) dst[k] = static_cast<int32_t>(u[k]) >= threshold ? v[k] : 0.f;
}

// float versions of the three products below with explicit AVX2: GCC keeps the generic
// versions' accumulator arrays on the stack (a load and a store around every FMA), which
// measured about 3x slower. With Masked, the dropout mask of draws u applies in registers:
// project_row_f32 sums over the kept elements of v only, expand_row_f32 writes 0 where dropped.
template <bool Masked>
inline void project_row_f32(const float* v, const uint16_t* u, int32_t threshold, const float* P, int64_t L,
                            int64_t r_pad, float* out) {
  const __m256i t1 = _mm256_set1_epi32(threshold - 1);
  const int64_t l_main = L - L % 8;
  for (int64_t jb = 0; jb < r_pad; jb += 8) {
    const float* p = P + jb * L;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (int64_t k = 0; k < l_main; k += 8) {
      __m256 x = _mm256_loadu_ps(v + k);
      if constexpr (Masked) x = _mm256_and_ps(x, keep_lanes(u + k, t1));
      a0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(p + k), a0);
      a1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(p + L + k), a1);
      a2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(p + 2 * L + k), a2);
      a3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(p + 3 * L + k), a3);
      a4 = _mm256_fmadd_ps(x, _mm256_loadu_ps(p + 4 * L + k), a4);
      a5 = _mm256_fmadd_ps(x, _mm256_loadu_ps(p + 5 * L + k), a5);
      a6 = _mm256_fmadd_ps(x, _mm256_loadu_ps(p + 6 * L + k), a6);
      a7 = _mm256_fmadd_ps(x, _mm256_loadu_ps(p + 7 * L + k), a7);
    }
    // Horizontal sums of the eight accumulators into one vector [sum_0 .. sum_7].
    const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
    const __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
    _mm256_storeu_ps(out + jb, sums);
    for (int64_t k = l_main; k < L; ++k) {
      if (Masked && static_cast<int32_t>(u[k]) < threshold) continue;
      for (int64_t j = 0; j < 8; ++j) out[jb + j] += v[k] * p[j * L + k];
    }
  }
}

template <bool Masked>
inline void expand_row_f32(const float* c, const float* E, int64_t L, int64_t r_pad, const uint16_t* u,
                           int32_t threshold, float* dst) {
  const __m256i t1 = _mm256_set1_epi32(threshold - 1);
  const auto masked = [&](__m256 a, int64_t at) { return Masked ? _mm256_and_ps(a, keep_lanes(u + at, t1)) : a; };
  int64_t k = 0;
  for (; k + 32 <= L; k += 32) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t j = 0; j < r_pad; ++j) {
      const __m256 cj = _mm256_set1_ps(c[j]);
      const float* e = E + j * L + k;
      a0 = _mm256_fmadd_ps(cj, _mm256_loadu_ps(e), a0);
      a1 = _mm256_fmadd_ps(cj, _mm256_loadu_ps(e + 8), a1);
      a2 = _mm256_fmadd_ps(cj, _mm256_loadu_ps(e + 16), a2);
      a3 = _mm256_fmadd_ps(cj, _mm256_loadu_ps(e + 24), a3);
    }
    _mm256_storeu_ps(dst + k, masked(a0, k));
    _mm256_storeu_ps(dst + k + 8, masked(a1, k + 8));
    _mm256_storeu_ps(dst + k + 16, masked(a2, k + 16));
    _mm256_storeu_ps(dst + k + 24, masked(a3, k + 24));
  }
  for (; k + 8 <= L; k += 8) {
    __m256 a0 = _mm256_setzero_ps();
    for (int64_t j = 0; j < r_pad; ++j) a0 = _mm256_fmadd_ps(_mm256_set1_ps(c[j]), _mm256_loadu_ps(E + j * L + k), a0);
    _mm256_storeu_ps(dst + k, masked(a0, k));
  }
  for (; k < L; ++k) {
    float sum = 0.f;
    for (int64_t j = 0; j < r_pad; ++j) sum += c[j] * E[j * L + k];
    dst[k] = Masked && static_cast<int32_t>(u[k]) < threshold ? 0.f : sum;
  }
}

inline void accumulate_rows_f32(const float* c, const float* const* v, int64_t L, int64_t r, int64_t r_pad, float* acc) {
  const float* v0 = v[0];
  const float* v1 = v[1];
  const float* v2 = v[2];
  const float* v3 = v[3];
  const int64_t l_main = L - L % 8;
  for (int64_t j = 0; j < r; ++j) {
    const float s0 = c[j], s1 = c[r_pad + j], s2 = c[2 * r_pad + j], s3 = c[3 * r_pad + j];
    const __m256 c0 = _mm256_set1_ps(s0), c1 = _mm256_set1_ps(s1), c2 = _mm256_set1_ps(s2), c3 = _mm256_set1_ps(s3);
    float* dst = acc + j * L;
    for (int64_t k = 0; k < l_main; k += 8) {
      __m256 d = _mm256_loadu_ps(dst + k);
      d = _mm256_fmadd_ps(c0, _mm256_loadu_ps(v0 + k), d);
      d = _mm256_fmadd_ps(c1, _mm256_loadu_ps(v1 + k), d);
      d = _mm256_fmadd_ps(c2, _mm256_loadu_ps(v2 + k), d);
      d = _mm256_fmadd_ps(c3, _mm256_loadu_ps(v3 + k), d);
      _mm256_storeu_ps(dst + k, d);
    }
    for (int64_t k = l_main; k < L; ++k) dst[k] += s0 * v0[k] + s1 * v1[k] + s2 * v2[k] + s3 * v3[k];
  }
}
#endif

// out[j] = sum_k v[k] * P[j, k] for j < r_pad. P: (r_pad, L).
template <typename acc_t>
inline void project_row(const acc_t* v, const acc_t* P, int64_t L, int64_t r_pad, acc_t* out) {
#ifdef PEFTCORE_AVX2
  if constexpr (std::is_same_v<acc_t, float>) return project_row_f32<false>(v, nullptr, 0, P, L, r_pad, out);
#endif
  const int64_t l_main = L - L % kLanes;
  for (int64_t jb = 0; jb < r_pad; jb += kRankBlock) {
    const acc_t* p = P + jb * L;
    acc_t acc[kRankBlock][kLanes] = {};
    for (int64_t k0 = 0; k0 < l_main; k0 += kLanes) {
      for (int64_t j = 0; j < kRankBlock; ++j) {
        for (int64_t l = 0; l < kLanes; ++l) acc[j][l] += v[k0 + l] * p[j * L + k0 + l];
      }
    }
    for (int64_t j = 0; j < kRankBlock; ++j) {
      acc_t sum = 0;
      for (int64_t l = 0; l < kLanes; ++l) sum += acc[j][l];
      for (int64_t k = l_main; k < L; ++k) sum += v[k] * p[j * L + k];
      out[jb + j] = sum;
    }
  }
}

// dst[k] = sum_j c[j] * E[j, k] for k < L. E: (r_pad, L); c: r_pad entries (zeros past r).
// Four vectors of k at a time: one accumulator would chain r dependent FMAs (latency-bound,
// measured 2.5x slower at r = 8).
template <typename acc_t>
inline void expand_row(const acc_t* c, const acc_t* E, int64_t L, int64_t r_pad, acc_t* dst) {
#ifdef PEFTCORE_AVX2
  if constexpr (std::is_same_v<acc_t, float>) return expand_row_f32<false>(c, E, L, r_pad, nullptr, 0, dst);
#endif
  constexpr int64_t kWide = 4 * kLanes;
  const int64_t l_main = L - L % kWide;
  for (int64_t k0 = 0; k0 < l_main; k0 += kWide) {
    acc_t acc[kWide] = {};
    for (int64_t j = 0; j < r_pad; ++j) {
      const acc_t cj = c[j];
      const acc_t* e = E + j * L + k0;
      for (int64_t l = 0; l < kWide; ++l) acc[l] += cj * e[l];
    }
    for (int64_t l = 0; l < kWide; ++l) dst[k0 + l] = acc[l];
  }
  for (int64_t k = l_main; k < L; ++k) {
    acc_t sum = 0;
    for (int64_t j = 0; j < r_pad; ++j) sum += c[j] * E[j * L + k];
    dst[k] = sum;
  }
}

// acc[j, k] += sum_i c[i][j] * v[i][k] over kRowGroup rows (c: kRowGroup x r_pad; v: kRowGroup
// row pointers of length L).
template <typename acc_t>
inline void accumulate_rows(const acc_t* c, const acc_t* const* v, int64_t L, int64_t r, int64_t r_pad, acc_t* acc) {
#ifdef PEFTCORE_AVX2
  if constexpr (std::is_same_v<acc_t, float>) return accumulate_rows_f32(c, v, L, r, r_pad, acc);
#endif
  const acc_t* v0 = v[0];
  const acc_t* v1 = v[1];
  const acc_t* v2 = v[2];
  const acc_t* v3 = v[3];
  for (int64_t j = 0; j < r; ++j) {
    const acc_t c0 = c[j], c1 = c[r_pad + j], c2 = c[2 * r_pad + j], c3 = c[3 * r_pad + j];
    acc_t* dst = acc + j * L;
    for (int64_t k = 0; k < L; ++k) dst[k] += c0 * v0[k] + c1 * v1[k] + c2 * v2[k] + c3 * v3[k];
  }
}

// Scratch of one worker, sized for rows of length K (x) and N (grad_y).
template <typename acc_t>
struct Scratch {
  std::vector<uint32_t> words;
  std::vector<uint16_t> draws;
  std::vector<acc_t> mult, xd, gy, t, zeros, coeff_h, coeff_g;
  Scratch(int64_t K, int64_t N, int64_t r_pad)
      : words(4 * (K / 8 + 2)), draws(8 * (K / 8 + 2)), mult(kRowGroup * K), xd(kRowGroup * K), gy(kRowGroup * N),
        t(K), zeros(std::max(K, N), acc_t(0)), coeff_h(kRowGroup * r_pad, acc_t(0)), coeff_g(kRowGroup * r_pad, acc_t(0)) {}
};

// Row `src` in the accumulation type: the row itself when the types agree, else converted into
// `buf` (float32 inputs are read in place, no copy).
template <typename scalar_t, typename acc_t>
inline const acc_t* as_acc(const scalar_t* src, int64_t n, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    for (int64_t k = 0; k < n; ++k) buf[k] = static_cast<acc_t>(src[k]);
    return buf;
  }
}

// out = s keep(v) P^T for a float row with the dropout mask applied in registers (AVX2 loops):
// no buffer of multipliers or dropped copy of the row. Returns false where that path does not
// exist (other types, the portable loops): the caller then goes through the multipliers.
template <typename scalar_t, typename acc_t>
inline bool project_dropped_row_in_registers(const scalar_t* v, const acc_t* P, int64_t L, int64_t r_pad, uint64_t seed,
                                             int64_t start, uint32_t threshold, acc_t s, Scratch<acc_t>& w, acc_t* out) {
#ifdef PEFTCORE_AVX2
  if constexpr (std::is_same_v<scalar_t, float>) {
    const uint16_t* u = draws16(seed, start, L, w.words.data(), w.draws.data());
    project_row_f32<true>(v, u, static_cast<int32_t>(threshold), P, L, r_pad, out);
    for (int64_t j = 0; j < r_pad; ++j) out[j] *= s;
    return true;
  }
#endif
  return false;
}

// Forward rows [m0, m1): h[m, :r] = (x[m] * mult[m]) A^T with mult the dropout multipliers of
// row m (or 1 without dropout), then y[m] = bias + scale h[m] B^T (Bt = B^T as (r_pad, N); bias
// may be null): the output row is written once, here, while h[m] is in registers; the base GEMM
// accumulates x W^T into it afterwards. y[m] is computed from h[m] as stored (rounded to
// scalar_t), as the backward sees it.
template <typename scalar_t, typename acc_t>
void forward_rows(const scalar_t* x, const acc_t* A, scalar_t* h, const acc_t* Bt, const scalar_t* bias, scalar_t* y,
                  int64_t K, int64_t N, int64_t r, int64_t r_pad, bool dropout, uint64_t seed, uint32_t threshold,
                  acc_t s, acc_t scale, int64_t m0, int64_t m1) {
  Scratch<acc_t> w(K, N, r_pad);
  std::vector<acc_t> out(r_pad), coeff(r_pad, acc_t(0));
  for (int64_t m = m0; m < m1; ++m) {
    const scalar_t* xm = x + m * K;
    if (!dropout) {
      project_row<acc_t>(as_acc<scalar_t, acc_t>(xm, K, w.xd.data()), A, K, r_pad, out.data());
    } else if (!project_dropped_row_in_registers<scalar_t, acc_t>(xm, A, K, r_pad, seed, m * K, threshold, s, w,
                                                                  out.data())) {
      dropout_multipliers<acc_t>(seed, m * K, K, threshold, s, w.words.data(), w.draws.data(), w.mult.data());
      for (int64_t k = 0; k < K; ++k) w.xd[k] = w.mult[k] * static_cast<acc_t>(xm[k]);
      project_row<acc_t>(w.xd.data(), A, K, r_pad, out.data());
    }
    for (int64_t j = 0; j < r; ++j) {
      h[m * r + j] = static_cast<scalar_t>(out[j]);
      coeff[j] = scale * static_cast<acc_t>(h[m * r + j]);
    }
    scalar_t* ym = y + m * N;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      expand_row<acc_t>(coeff.data(), Bt, N, r_pad, ym);
      if (bias != nullptr) {
        for (int64_t n = 0; n < N; ++n) ym[n] += bias[n];
      }
    } else {
      expand_row<acc_t>(coeff.data(), Bt, N, r_pad, w.gy.data());
      for (int64_t n = 0; n < N; ++n) {
        ym[n] = static_cast<scalar_t>(w.gy[n] + (bias != nullptr ? static_cast<acc_t>(bias[n]) : acc_t(0)));
      }
    }
  }
}

// Backward rows [m0, m1), in one pass over grad_y and x (Bt = B^T as (r_pad, N); h (M, r)):
//   gh[m]        = scale * grad_y[m] B                         (rank-sized, stays in L1)
//   grad_Bt_part += scale * h[m]^T grad_y[m]
//   grad_A_part  += gh[m]^T (x[m] * mult[m])                   (if grad_A_part)
//   grad_x[m]     = mult[m] * (gh[m] A)                        (if grad_x; written, not added:
//                                                               the caller adds grad_y W after)
// Rows go kRowGroup at a time so each pass over an accumulator serves several rows.
template <typename scalar_t, typename acc_t>
void backward_rows(const scalar_t* grad_y, const scalar_t* x, const scalar_t* h, const acc_t* A, const acc_t* Bt,
                   scalar_t* grad_x, acc_t* grad_A_part, acc_t* grad_Bt_part, int64_t K, int64_t N, int64_t r,
                   int64_t r_pad, acc_t scale, bool dropout, uint64_t seed, uint32_t threshold, acc_t s, int64_t m0,
                   int64_t m1) {
  Scratch<acc_t> w(K, N, r_pad);
  const bool need_gh = grad_A_part != nullptr || grad_x != nullptr;
  const acc_t* gy_rows[kRowGroup];
  const acc_t* xd_rows[kRowGroup];
  for (int64_t mb = m0; mb < m1; mb += kRowGroup) {
    const int64_t rows = std::min(kRowGroup, m1 - mb);
    for (int64_t i = 0; i < kRowGroup; ++i) {
      acc_t* ch = w.coeff_h.data() + i * r_pad;  // scale h[m]: coefficients of grad_y[m] for grad_B
      acc_t* cg = w.coeff_g.data() + i * r_pad;  // gh[m]: coefficients of dropout(x[m]) for grad_A
      if (i >= rows) {  // a short last group: zero rows with zero coefficients
        std::fill(ch, ch + r_pad, acc_t(0));
        std::fill(cg, cg + r_pad, acc_t(0));
        gy_rows[i] = xd_rows[i] = w.zeros.data();
        continue;
      }
      const int64_t m = mb + i;
      const acc_t* gy = as_acc<scalar_t, acc_t>(grad_y + m * N, N, w.gy.data() + i * N);
      gy_rows[i] = gy;
      for (int64_t j = 0; j < r; ++j) ch[j] = scale * static_cast<acc_t>(h[m * r + j]);
      if (!need_gh) continue;
      project_row<acc_t>(gy, Bt, N, r_pad, cg);
      for (int64_t j = 0; j < r_pad; ++j) cg[j] *= scale;
      acc_t* mult = w.mult.data() + i * K;
      const scalar_t* xm = x + m * K;
      if (dropout) {
        acc_t* xd = w.xd.data() + i * K;
#ifdef PEFTCORE_AVX2
        if constexpr (std::is_same_v<scalar_t, float>) {
          // s moves into gh's coefficients: grad_A = (s gh)^T (keep x), grad_x = keep ((s gh) A),
          // with the mask applied as x is copied and as grad_x is written.
          const uint16_t* u = draws16(seed, m * K, K, w.words.data(), w.draws.data());
          for (int64_t j = 0; j < r_pad; ++j) cg[j] *= s;
          select_row_f32(xm, u, static_cast<int32_t>(threshold), K, xd);
          xd_rows[i] = xd;
          if (grad_x != nullptr) expand_row_f32<true>(cg, A, K, r_pad, u, static_cast<int32_t>(threshold), grad_x + m * K);
          continue;
        }
#endif
        dropout_multipliers<acc_t>(seed, m * K, K, threshold, s, w.words.data(), w.draws.data(), mult);
        for (int64_t k = 0; k < K; ++k) xd[k] = mult[k] * static_cast<acc_t>(xm[k]);
        xd_rows[i] = xd;
      } else {
        xd_rows[i] = as_acc<scalar_t, acc_t>(xm, K, w.xd.data() + i * K);
      }
      if (grad_x != nullptr) {
        scalar_t* gx = grad_x + m * K;
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          expand_row<acc_t>(cg, A, K, r_pad, gx);
          if (dropout) {
            for (int64_t k = 0; k < K; ++k) gx[k] *= mult[k];
          }
        } else {
          expand_row<acc_t>(cg, A, K, r_pad, w.t.data());
          if (dropout) {
            for (int64_t k = 0; k < K; ++k) gx[k] = static_cast<scalar_t>(mult[k] * w.t[k]);
          } else {
            for (int64_t k = 0; k < K; ++k) gx[k] = static_cast<scalar_t>(w.t[k]);
          }
        }
      }
    }
    if (grad_Bt_part != nullptr) accumulate_rows<acc_t>(w.coeff_h.data(), gy_rows, N, r, r_pad, grad_Bt_part);
    if (grad_A_part != nullptr) accumulate_rows<acc_t>(w.coeff_g.data(), xd_rows, K, r, r_pad, grad_A_part);
  }
}
