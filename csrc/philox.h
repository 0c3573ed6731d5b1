// Philox4x32-10, the counter-based generator of peftcore's dropout mask (spec:
// peftcore/ops/philox.py; pinned against triton.language.randint4x in tests/ops/test_philox.py).
// Header-only and free of torch headers, so host C++ and CUDA device code can share it.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define PEFTCORE_HD __host__ __device__ __forceinline__
#else
#define PEFTCORE_HD inline
#endif

namespace peftcore {
namespace philox {

constexpr uint32_t kKeyA = 0x9E3779B9u;
constexpr uint32_t kKeyB = 0xBB67AE85u;
constexpr uint32_t kRoundA = 0xD2511F53u;
constexpr uint32_t kRoundB = 0xCD9E8D57u;
constexpr int kRounds = 10;

// The four 32-bit outputs of block counter g. Cut into eight 16-bit draws, low half first, they
// are the draws of the elements at offsets 8g .. 8g+7 (draw16 below).
PEFTCORE_HD void block(uint64_t seed, uint64_t g, uint32_t out[4]) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c0 = static_cast<uint32_t>(g), c1 = static_cast<uint32_t>(g >> 32), c2 = 0, c3 = 0;
  for (int i = 0; i < kRounds; ++i) {
    const uint64_t p0 = static_cast<uint64_t>(kRoundA) * c0;
    const uint64_t p2 = static_cast<uint64_t>(kRoundB) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p2 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p2);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// The 16-bit draw of offset o from the outputs of its block o >> 3: half o & 1 (low first) of
// output (o >> 1) & 3. The output is picked by selects, not out[...]: a dynamic index would put
// a CUDA thread's four words in local memory.
PEFTCORE_HD uint32_t draw16(const uint32_t out[4], uint64_t o) {
  const uint64_t w = (o >> 1) & 3;
  const uint32_t word = w == 0 ? out[0] : w == 1 ? out[1] : w == 2 ? out[2] : out[3];
  return (word >> (16 * (o & 1))) & 0xFFFFu;
}

// floor(p * 2^16): an element is kept iff its 16-bit draw >= threshold(p).
PEFTCORE_HD uint32_t threshold(double p) { return static_cast<uint32_t>(p * 65536.0); }

}  // namespace philox
}  // namespace peftcore
