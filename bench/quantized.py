"""LoRA over a quantized base: peak RSS and step time of a 0.4 B Llama, fp32 / bf16 / int8 / nf4 base.

A random-init Llama-style model (hidden 1024, 24 blocks, MLP 2816, 16 heads, vocabulary 32000:
374 M parameters), LoRA rank 16 (alpha 32, no dropout) on every linear layer of the blocks (the
output head stays as is), AdamW on the adapters, batch 1 x 256 tokens, causal-LM loss. The base is

* ``fp32``: float32 weights; ``bf16``: the whole model in bfloat16;
* ``int8``: bitsandbytes ``Linear8bitLt`` (one scale per row); ``nf4``: bitsandbytes
  ``Linear4bit`` nf4 with double quantization, float32 compute (``peftcore_quant.quantize_model``),

the same quantized model for peftcore (``peftcore.wrap``, through the peftcore-quant plugin) and
HF PEFT (``get_peft_model``). Every configuration runs in its own process: the model is built
block by block (each block quantized as soon as it exists, so the fp32 model never exists whole),
the peak RSS is reset (``/proc/self/clear_refs``) and ``--steps`` training steps run after one
warm-up step; the process prints one JSON line: peak RSS over the steps (the model included),
RSS after setup, median step time.

    python bench/quantized.py all --steps 3          # every configuration, a markdown table
    python bench/quantized.py all --steps 3 --checkpointing    # the same with gradient checkpointing
    python bench/quantized.py run --base nf4 --lib peftcore --steps 3
    python bench/quantized.py paired --base nf4 --steps 4    # step-time ratio, steps alternating in one process
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import statistics
import subprocess
import sys
import time
import warnings

BASES = ("fp32", "bf16", "int8", "nf4")
LIBS = ("peftcore", "peft")


def build(base: str):
    import torch
    import transformers

    config = transformers.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
                                      num_key_value_heads=16, vocab_size=32000, max_position_embeddings=512)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if base == "bf16" else torch.float32
    # Blocks one at a time: build the model with no blocks, then add each block, quantized at once.
    n_layers, config.num_hidden_layers = config.num_hidden_layers, 0
    model = transformers.LlamaForCausalLM(config).to(dtype)
    config.num_hidden_layers = n_layers
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    for i in range(n_layers):
        block = LlamaDecoderLayer(config, layer_idx=i).to(dtype)
        if base in ("int8", "nf4"):
            from peftcore_quant import quantize_model

            quantize_model(block, base, skip=())
        model.model.layers.append(block)
        gc.collect()
    model.config.use_cache = False
    return model


def wrap(model, lib: str):
    import torch

    if lib == "peftcore":
        import peftcore

        peftcore.wrap(model, "lora", rank=16, alpha=32, dropout=0.0, targets="all-linear")
    else:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_" not in name:
            p.requires_grad_(False)
    return model, [p for p in model.parameters() if p.requires_grad]


def run(base: str, lib: str, steps: int, threads: int, checkpointing: bool = False) -> dict:
    import torch

    from peftcore.train import memory

    torch.set_num_threads(threads)
    model = build(base)
    if checkpointing:  # as peftcore_quant.prepare_for_training(model, gradient_checkpointing=True) does
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model, params = wrap(model, lib)
    model.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, 32000, (1, 256), generator=torch.Generator().manual_seed(0))
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed build buffers back before measuring
    rss_setup = memory.rss_mib()
    memory.reset_peak()
    times, losses = [], []
    for _ in range(steps + 1):  # the first is a warm-up
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return {"base": base, "lib": lib, "checkpointing": checkpointing, "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
            "trainable_M": round(sum(p.numel() for p in params) / 1e6, 2), "rss_setup_mib": round(rss_setup),
            "peak_rss_mib": round(memory.peak_rss_mib()), "step_s": round(statistics.median(times[1:]), 3),
            "steps_s": [round(t, 3) for t in times], "loss": round(losses[-1], 4)}


def paired(base: str, steps: int, threads: int) -> dict:
    """Step-time ratio peftcore / HF PEFT on the same base, steps alternating in one process.

    The machine is shared: a step takes 12 s or 40 s depending on the other jobs, so separate
    processes cannot compare times; alternating steps pairs each peftcore step with the HF PEFT
    step next to it (each model built from the same seed, so both wrap the same weights).
    """
    import torch

    torch.set_num_threads(threads)
    runs = {}
    for lib in LIBS:
        model, params = wrap(build(base), lib)
        model.train()
        runs[lib] = (model, torch.optim.AdamW(params, lr=1e-4))
    ids = torch.randint(0, 32000, (1, 256), generator=torch.Generator().manual_seed(0))
    times = {lib: [] for lib in LIBS}
    for i in range(steps + 1):
        order = LIBS if i % 2 == 0 else LIBS[::-1]
        for lib in order:
            model, optimizer = runs[lib]
            start = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times[lib].append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(times["peftcore"][1:], times["peft"][1:])]
    return {"base": base, "ratio_peftcore_over_peft": round(statistics.median(ratios), 3), "ratios": [round(r, 3) for r in ratios],
            "peftcore_s": [round(t, 2) for t in times["peftcore"]], "peft_s": [round(t, 2) for t in times["peft"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("run", "all", "paired"))
    parser.add_argument("--base", choices=BASES, default="nf4")
    parser.add_argument("--lib", choices=LIBS, default="peftcore")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (non-reentrant) in every block")
    parser.add_argument("--bases", default=",".join(BASES))
    parser.add_argument("--libs", default=",".join(LIBS))
    args = parser.parse_args()
    if args.what in ("run", "paired"):
        logging.disable(logging.WARNING)
        warnings.filterwarnings("ignore")
        if args.what == "paired":
            print(json.dumps(paired(args.base, args.steps, args.threads)), flush=True)
        else:
            print(json.dumps(run(args.base, args.lib, args.steps, args.threads, args.checkpointing)), flush=True)
        return
    rows = []
    for base in args.bases.split(","):
        for lib in args.libs.split(","):
            cmd = [sys.executable, __file__, "run", "--base", base, "--lib", lib, "--steps", str(args.steps), "--threads", str(args.threads)]
            cmd += ["--checkpointing"] if args.checkpointing else []
            done = subprocess.run(cmd, capture_output=True, text=True)
            line = [l for l in done.stdout.splitlines() if l.startswith("{")]
            if done.returncode or not line:
                print(f"{base}/{lib} failed:\n{done.stderr[-2000:]}", file=sys.stderr, flush=True)
                continue
            rows.append(json.loads(line[-1]))
            print(line[-1], flush=True)
    fp32 = {r["lib"]: r for r in rows if r["base"] == "fp32"}
    print("\n| base | library | peak RSS (MiB) | vs fp32 base | RSS after setup (MiB) | step (s) | steps (s) |")
    print("|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        ref = fp32.get(r["lib"])
        ratio = f"{r['peak_rss_mib'] / ref['peak_rss_mib']:.2f}" if ref else ""
        print(f"| {r['base']} | {r['lib']} | {r['peak_rss_mib']} | {ratio} | {r['rss_setup_mib']} | {r['step_s']} | {r['steps_s']} |")


if __name__ == "__main__":
    main()
