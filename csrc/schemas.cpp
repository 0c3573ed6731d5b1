// Op schemas of the peftcore namespace. Implementations register per device with
// TORCH_LIBRARY_IMPL (CPU in csrc/*.cpp, CUDA in csrc/cuda/*.cu); fake (meta) kernels and
// autograd are registered from Python (peftcore/ops/).
#include <torch/library.h>

TORCH_LIBRARY(peftcore, m) {
  // y = x W^T + b + scale * dropout(x) A^T B^T, and h = dropout(x) A^T (saved for backward).
  // x: (M, K); weight: (N, K), any strides; bias: (N,) or None; A: (r, K); B: (N, r).
  // The dropout mask is peftcore.ops.philox.keep_mask(seed, (M, K), dropout_p).
  m.def("lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B, float scale, float dropout_p, int seed) -> (Tensor, Tensor)");
}
