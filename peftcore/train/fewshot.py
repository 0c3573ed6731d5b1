"""Few-shot fine-tuning with a prototypical network (Snell et al., 2017).

With K labelled examples per class, a classification head has too little to learn from. A
prototypical network has no head: the encoder embeds each text (mean of the last hidden states
over its tokens), a class's prototype is the mean embedding of its support examples, and the
logits of a query are the negative squared Euclidean distances to the prototypes::

    logits[q, c] = -|| embed(x_q) - mean_{s in support(c)} embed(x_s) ||^2

The encoder adapts (LoRA, or any strategy) by episodic training on the K-shot data: each episode
splits every class's K examples at random into support (``ceil(K / 2)``) and queries (the rest),
and the cross-entropy of the queries' logits is minimised. ``feature-extraction`` (a frozen
encoder) trains nothing: prototypes of the pretrained embeddings alone. With K = 1 there is no
query to train on, so only the prototypes are used.

:func:`run_few_shot` (``peftcore finetune --few-shot K``) repeats this for several seeds of the
support set (5 by default), evaluates each on the validation data with prototypes from all K
examples, and reports the accuracy's mean and standard deviation next to the same model and
strategy fine-tuned on all the training data (an ordinary run, in ``<run>/all-data/``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from peftcore.errors import ConfigError, DataError
from peftcore.train import amp
from peftcore.train.data import Batch, TextDataset

__all__ = ["prototypes", "prototype_logits", "mean_pool", "PrototypicalNetwork", "draw_support", "train_episodes", "run_few_shot"]

#: Episodes per epoch of ``--epochs`` in a few-shot run.
EPISODES_PER_EPOCH = 10


def prototypes(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class prototypes: the mean embedding of each class's examples.

    Args:
        embeddings: (S, H).
        labels: (S,) class ids in ``[0, num_classes)``; every class present.

    Returns:
        (num_classes, H).
    """
    sums = torch.zeros(num_classes, embeddings.shape[-1], dtype=embeddings.dtype, device=embeddings.device)
    sums.index_add_(0, labels, embeddings)
    counts = torch.bincount(labels, minlength=num_classes).to(embeddings.dtype)  # (N,)
    if (counts == 0).any():
        raise DataError(f"no support example for class(es) {(counts == 0).nonzero().flatten().tolist()}")
    return sums / counts[:, None]


def prototype_logits(queries: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """Negative squared Euclidean distances: (Q, H) queries x (N, H) prototypes -> (Q, N)."""
    return -((queries[:, None, :] - protos[None, :, :]) ** 2).sum(-1)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of the hidden states (B, T, H) over the real tokens -> (B, H)."""
    if attention_mask is None:
        return hidden.mean(1)
    mask = attention_mask[..., None].to(hidden.dtype)  # (B, T, 1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)


class PrototypicalNetwork(nn.Module):
    """An encoder used as a prototypical network.

    Args:
        encoder: a transformers encoder (``encoder(**inputs).last_hidden_state``, (B, T, H)), e.g.
            a classifier's ``base_model``; PEFT-wrapped or partly frozen as the strategy decided.
    """

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def embed(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, H) float32 embeddings."""
        hidden = self.encoder(**inputs).last_hidden_state  # (B, T, H)
        return mean_pool(hidden.float(), inputs.get("attention_mask"))

    def forward(self, support: Batch, queries: dict[str, torch.Tensor], num_classes: int) -> torch.Tensor:
        """Logits (Q, N) of the queries against the prototypes of ``support``."""
        protos = prototypes(self.embed(support.inputs), support.labels, num_classes)
        return prototype_logits(self.embed(queries), protos)


def draw_support(data: TextDataset, labels: Sequence[str], shots: int, seed: int) -> TextDataset:
    """``shots`` examples of each label, drawn at random with ``seed``.

    Raises:
        DataError: a label with fewer than ``shots`` examples.
    """
    rng = random.Random(seed)
    chosen = []
    for label in labels:
        indices = [i for i, l in enumerate(data.labels) if l == label]
        if len(indices) < shots:
            raise DataError(f"{data.source}: label {label!r} has {len(indices)} examples, fewer than --few-shot {shots}")
        chosen += rng.sample(indices, shots)
    return data.subset(chosen)


def _encode(tokenizer, texts: list[str], label_list: list[int], max_length: int) -> Batch:
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return Batch(dict(enc), torch.tensor(label_list, dtype=torch.long))


def train_episodes(net: PrototypicalNetwork, support: TextDataset, tokenizer, label_ids: dict[str, int], optimizer: torch.optim.Optimizer,
                   episodes: int, *, max_length: int = 64, seed: int = 0, precision: str = "fp32",
                   max_grad_norm: float | None = 1.0) -> list[float]:
    """Episodic training on a K-shot set: per episode, each class's examples split at random into
    support (``ceil(K / 2)``) and queries; minimises the queries' cross-entropy.

    Returns:
        The loss of each episode.
    """
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(support.labels):
        by_class.setdefault(label_ids[label], []).append(i)
    shots = min(len(v) for v in by_class.values())
    n_support = math.ceil(shots / 2)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    scaler = amp.make_scaler(net, precision == "fp16")
    net.train()
    losses = []
    for _ in range(episodes):
        sup, qry = [], []
        for indices in by_class.values():
            picked = rng.sample(indices, len(indices))
            sup += picked[:n_support]
            qry += picked[n_support:]
        s = _encode(tokenizer, [support.texts[i] for i in sup], [label_ids[support.labels[i]] for i in sup], max_length)
        q = _encode(tokenizer, [support.texts[i] for i in qry], [label_ids[support.labels[i]] for i in qry], max_length)
        with amp.autocast(net, precision):
            logits = net(s, q.inputs, len(label_ids))  # (Q, N)
        loss = nn.functional.cross_entropy(logits.float(), q.labels)
        optimizer.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.unscale_(optimizer)
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_grad_norm)
        if scaler is not None:
            amp.scaler_step(scaler, optimizer)
        else:
            optimizer.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def evaluate_prototypes(net: PrototypicalNetwork, support: TextDataset, data: TextDataset, tokenizer, labels: list[str],
                        batch_size: int, max_length: int, precision: str = "fp32"):
    """The classification report of ``data`` against the prototypes of ``support``."""
    from peftcore.train.data import batches
    from peftcore.train.metrics import classification_report

    label_ids = {label: i for i, label in enumerate(labels)}
    net.eval()
    with amp.autocast(net, precision):
        embeddings = [net.embed(b.inputs) for b in batches(support, tokenizer, label_ids, batch_size, max_length)]
        gold = torch.tensor([label_ids[l] for l in support.labels])
        protos = prototypes(torch.cat(embeddings), gold, len(labels))
        predicted, truth = [], []
        for b in batches(data, tokenizer, label_ids, batch_size, max_length):
            predicted += prototype_logits(net.embed(b.inputs), protos).argmax(-1).tolist()
            truth += b.labels.tolist()
    return classification_report(truth, predicted, labels)


def run_few_shot(config, log: Callable[[str], None] = print):
    """``peftcore finetune --few-shot K``: prototypical few-shot runs over several support seeds,
    next to the same strategy fine-tuned on all the data. See the module docstring.

    Returns:
        A :class:`peftcore.train.finetune.FinetuneResult` whose ``accuracy_after`` is the mean
        few-shot accuracy; ``metrics.json`` holds the per-seed accuracies, their mean and standard
        deviation, and ``all_data_accuracy``.
    """
    from peftcore.train import finetune as ft
    from peftcore.train import memory
    from peftcore.train.data import label_set
    from peftcore.train.optim import build_optimizer
    from peftcore.train.strategies import apply_strategy

    start = time.perf_counter()
    shots, seeds = config.few_shot, config.few_shot_seeds
    train_data, val_data = ft.load_data(config)
    labels = label_set(train_data, val_data)
    label_ids = {label: i for i, label in enumerate(labels)}
    strategy = config.strategy_config()
    run_dir = ft.run_dir_path(config.out, config.overwrite)
    model_dir = config.model or ft.default_model_path()
    precision = amp.precision_name(config.bf16, config.fp16)
    trains = strategy.name != "feature-extraction" and shots >= 2
    episodes = config.epochs * EPISODES_PER_EPOCH if trains else 0
    log(f"few-shot: {len(labels)}-way {shots}-shot, prototypical network on {model_dir}, strategy {strategy.name}, "
        f"{episodes} episodes per seed, {seeds} seeds of the support set")
    rows, step_times = [], []
    memory.reset_peak()
    for s in range(seeds):
        ft.seed_everything(config.seed + s)
        model, tokenizer = ft.load_classifier(model_dir, labels)
        support = draw_support(train_data, labels, shots, config.seed + s)
        net = PrototypicalNetwork(model.base_model)
        before = evaluate_prototypes(net, support, val_data, tokenizer, labels, config.batch_size, config.max_length, precision)
        trainable = total = 0
        if trains:
            plan = apply_strategy(model, dataclasses.replace(strategy, head=[]) if not strategy.is_peft else strategy)
            net = PrototypicalNetwork(model.base_model)
            optimizer = build_optimizer(plan.param_groups())
            t0 = time.perf_counter()
            losses = train_episodes(net, support, tokenizer, label_ids, optimizer, episodes, max_length=config.max_length,
                                    seed=config.seed + s, precision=precision, max_grad_norm=config.max_grad_norm or None)
            step_times.append((time.perf_counter() - t0) / max(1, episodes))
            trainable = sum(p.numel() for n, p in model.base_model.named_parameters() if p.requires_grad)
        else:
            losses = []
        total = sum(p.numel() for p in model.base_model.parameters())
        after = evaluate_prototypes(net, support, val_data, tokenizer, labels, config.batch_size, config.max_length, precision)
        rows.append({"seed": config.seed + s, "accuracy_before": before.accuracy, "accuracy": after.accuracy,
                     "macro_f1": after.macro_f1, "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None})
        log(f"seed {config.seed + s}: prototype accuracy {before.accuracy:.4f} before, {after.accuracy:.4f} after")
    accuracies = [r["accuracy"] for r in rows]
    mean, std = statistics.fmean(accuracies), statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
    log(f"few-shot ({shots} per class) validation accuracy: {mean:.4f} +- {std:.4f} over {seeds} seeds")

    run_dir = ft.prepare_run_dir(run_dir, config.overwrite)
    all_data = None
    if config.few_shot_baseline:
        log("the same model and strategy fine-tuned on all the training data:")
        base_cfg = dataclasses.replace(config, few_shot=None, out=str(run_dir / "all-data"), overwrite=False)
        all_data = ft._run(base_cfg, log=lambda line: log(f"  {line}")).accuracy_after
        log(f"few-shot {mean:.4f} +- {std:.4f} against {all_data:.4f} with all {len(train_data)} training texts")
    seconds = time.perf_counter() - start
    metrics = {
        "strategy": f"{strategy.name} (few-shot {shots})", "lr": strategy.base_lr, "few_shot": shots, "ways": len(labels),
        "episodes": episodes, "seeds": rows, "accuracy_mean": mean, "accuracy_std": std, "all_data_accuracy": all_data,
        "accuracy_after": mean, "macro_f1_after": statistics.fmean(r["macro_f1"] for r in rows),
        "accuracy_before": statistics.fmean(r["accuracy_before"] for r in rows),
        "trainable_parameters": trainable, "total_parameters": total,
        "median_step_s": sorted(step_times)[len(step_times) // 2] if step_times else 0.0,
        "peak_rss_mib": memory.peak_rss_mib(), "seconds": seconds, "history": [], "precision": precision,
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    resolved = dataclasses.asdict(config) | {"strategy": strategy.name, "lr": strategy.base_lr, "model": model_dir, "labels": labels}
    (run_dir / "config.json").write_text(json.dumps(resolved, indent=2) + "\n", encoding="utf-8")
    log(f"metrics.json and config.json written in {run_dir} ({seconds:.0f} s)")
    return ft.FinetuneResult(Path(run_dir), metrics["accuracy_before"], mean, metrics["macro_f1_after"], trainable, total, [], seconds)


def check_options(config) -> None:
    """Raises :class:`ConfigError` for bad few-shot options, named as on the command line."""
    if not isinstance(config.few_shot, int) or config.few_shot < 1:
        raise ConfigError(f"--few-shot must be a positive integer, got {config.few_shot!r}")
    if config.few_shot_seeds < 1:
        raise ConfigError(f"--few-shot-seeds must be a positive integer, got {config.few_shot_seeds!r}")
    if config.teacher is not None:
        raise ConfigError("--few-shot and --teacher do not combine (a prototypical network has no logits to distil)")
    if config.quantize is not None:
        raise ConfigError(f"--few-shot and --quantize {config.quantize} do not combine (few-shot runs train no adapter over a "
                          "quantized base); drop one of them")
