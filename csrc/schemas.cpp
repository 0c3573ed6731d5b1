// Op schemas of the peftcore namespace, declared once here. Implementations register per device
// with TORCH_LIBRARY_IMPL (CPU: csrc/lora_linear.cpp; CUDA: csrc/cuda/*.cu); the fake (meta)
// kernels and the autograd formula are registered from Python (peftcore/ops/lora_cpp.py) and
// apply to every device, so a device implementation only provides the two ops below.
//
// Contract for every implementation (CPU, CUDA), checked against peftcore.ops.lora.reference_lora_linear:
//   x: (M, K) (callers flatten leading dims; x may be non-contiguous, read it through its strides
//      or reshape); weight: (N, K) with ANY strides (GPT-2's Conv1D passes weight.t() of an (K, N)
//      tensor: never copy it); bias: (N,) or None; A: (r, K); B: (N, r); all of x's dtype
//      (float32, bfloat16, float16, float64).
//   seed: a 0-dim int64 tensor ON THE CPU (read it on the host with seed.item<int64_t>(); no device
//      sync). It is a tensor, not an int, so that torch.compile can draw it inside a graph without
//      a graph break or a recompile per step. Its bits are the 64-bit Philox key (see below).
//   Dropout mask (bit-identical on every backend; spec: peftcore/ops/philox.py, C++: csrc/philox.h):
//      element offset o = m * K + k (row-major in (M, K)); Philox4x32-10 with key (seed low 32 bits,
//      seed high 32 bits), counter (o >> 3 low 32, o >> 3 high 32, 0, 0); 16-bit draw u = half o & 1
//      (low first) of output (o >> 1) & 3; keep iff u >= floor(dropout_p * 2^16); kept elements are
//      scaled by 1 / (1 - dropout_p).
//      dropout_p == 0 means no dropout (the seed is not read).
#include <torch/library.h>

TORCH_LIBRARY(peftcore, m) {
  // Forward: y = x W^T + b + scale * dropout(x) A^T B^T, h = dropout(x) A^T.
  // Returns y (M, N) and h (M, r); h is rank-sized and is what autograd saves (with x and the seed)
  // instead of the mask or dropout(x). The low-rank product is added into y in place.
  m.def("lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B, float scale, float dropout_p, "
        "Tensor seed) -> (Tensor, Tensor)");
  // Backward (bias gradient excluded: it is grad_y summed over rows, done in Python):
  //   grad_h = scale * grad_y B                                    (M, r)
  //   grad_x = grad_y W + dropout_mask * (1/(1-p)) * (grad_h A)    (M, K)   [output_mask[0]]
  //   grad_A = grad_h^T dropout(x)                                 (r, K)   [output_mask[1]]
  //   grad_B = scale * grad_y^T h                                  (N, r)   [output_mask[2]]
  // The mask is regenerated from (seed, offset); the weight gets no gradient and no weight-sized
  // buffer. An output whose output_mask entry is false is returned as None.
  // lora_linear with its autograd formula in C++ (csrc/autograd.cpp): returns y only; the
  // eager training path. Its backward calls lora_linear_backward below.
  m.def("lora_linear_autograd(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B, float scale, "
        "float dropout_p, Tensor seed) -> Tensor");
  m.def("lora_linear_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor A, Tensor B, Tensor h, float scale, "
        "float dropout_p, Tensor seed, bool[3] output_mask) -> (Tensor?, Tensor?, Tensor?)");
}
