"""Where a bench/quantized.py run's peak RSS goes: RSS and glibc's heap (mallinfo2) sampled every
10 ms per phase (forward, backward, optimizer; warm-up step then one step), and the storages autograd
saves in each forward counted with saved_tensors_hooks (size x count, largest first).

    python bench/quantized_memory.py nf4 peftcore      # base (fp32|bf16|int8|nf4), library (peftcore|peft)

The sampler thread and the hooks change the allocation pattern a little: peaks differ from
bench/quantized.py run by tens of MiB; use that for the figures, this for the breakdown.
"""
import ctypes, gc, json, sys, threading, time, os
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quantized as Q
import torch
from peftcore.train import memory

class MI(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6"); libc.mallinfo2.restype = MI
def mi():
    m = libc.mallinfo2(); M = 2**20
    return dict(heap=m.arena / M, used=m.uordblks / M, free=m.fordblks / M, mmap=m.hblkhd / M, nmmap=m.hblks)

base, lib = sys.argv[1], sys.argv[2]
torch.set_num_threads(2)
model = Q.build(base)
model, params = Q.wrap(model, lib)
model.train()
opt = torch.optim.AdamW(params, lr=1e-4)
ids = torch.randint(0, 32000, (1, 256), generator=torch.Generator().manual_seed(0))
gc.collect(); libc.malloc_trim(0)
print("setup", round(memory.rss_mib()), mi(), flush=True)
memory.reset_peak()
samples = []; phase = ["init"]; stop = False
def sampler():
    while not stop:
        samples.append((phase[0], memory.rss_mib(), mi())); time.sleep(0.01)
th = threading.Thread(target=sampler, daemon=True); th.start()
saved = {}
def pack(t):
    st = t.untyped_storage(); saved[st.data_ptr()] = (st.nbytes(), tuple(t.shape)); return t
for step in range(2):
    saved.clear()
    phase[0] = f"s{step}-fwd"
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    print(f"step{step} saved storages: {len(saved)}, {sum(v[0] for v in saved.values())/2**20:.0f} MiB; rss {memory.rss_mib():.0f} {mi()}", flush=True)
    if step == 0:
        from collections import Counter
        c = Counter((v[0] >> 10, v[1]) for v in saved.values())
        for (kb, shp), n in sorted(c.items(), key=lambda kv: -kv[0][0] * kv[1])[:15]:
            print(f"   {n:4d} x {kb} KiB {shp}")
    phase[0] = f"s{step}-bwd"; loss.backward()
    phase[0] = f"s{step}-opt"; opt.step(); opt.zero_grad(set_to_none=True); del loss
    print(f"step{step} end rss {memory.rss_mib():.0f} {mi()}", flush=True)
stop = True; th.join()
print("peak", round(memory.peak_rss_mib()))
for ph in dict.fromkeys(p for p, _, _ in samples):
    s = [x for x in samples if x[0] == ph]
    top = max(s, key=lambda x: x[1])
    print(ph, "n", len(s), "max rss", round(top[1]), {k: round(v) for k, v in top[2].items()})
