"""Forward+backward time of one 4-bit LoRA layer (2816 x 1024 and 1024 x 2816, nf4, double quant), the op's
new tensor vs the reused buffer, alternating in one process (20 pairs after one warm-up pair).

    python bench/quantized_dequant.py
"""
import statistics, time, torch
from torch import nn
import peftcore
from peftcore_quant import quantize_model, layers as L
torch.set_num_threads(2)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(1024, 2816), nn.Linear(2816, 1024))
quantize_model(model, "nf4", skip=())
peftcore.wrap(model, "lora", rank=16, alpha=32, dropout=0.0, targets="all-linear")
x = torch.randn(1, 256, 1024)
times = {True: [], False: []}
for i in range(41):
    for direct in ((True, False) if i % 2 else (False, True)):
        L._direct_agrees[("nf4", torch.float32)] = direct
        xi = x.clone().requires_grad_(True)
        t = time.perf_counter()
        model(xi).sum().backward()
        times[direct].append(time.perf_counter() - t)
r = [a / b for a, b in zip(times[True][1:], times[False][1:])]
print({"buffer_ms": round(1e3 * statistics.median(times[True][1:]), 2), "op_ms": round(1e3 * statistics.median(times[False][1:]), 2),
       "ratio_median": round(statistics.median(r), 3)})
