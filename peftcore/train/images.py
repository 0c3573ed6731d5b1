"""Image classification: the guides' worked example, offline.

No pretrained image weights are reachable here, and PyPI's torchvision (0.28, the release for
torch 2.13) fails to import beside the CPU build of torch 2.13.0 ("operator torchvision::nms
does not exist"); timm imports torchvision. So this module brings what the example needs:

* a small image set generated in the package: scikit-learn's 8 x 8 handwritten digits (shipped
  with scikit-learn, no download), upscaled to ``size`` x ``size`` RGB, written as an ImageFolder
  tree (:func:`write_digits`);
* an ImageFolder reader with PIL (:func:`read_image_folder`);
* a small ResNet (:class:`SmallResNet`: a stem, a ``blocks`` list of residual blocks, a
  ``classifier`` head), pretrained in the pipeline on digits 0-4 (:func:`pretrain`) and fine-tuned
  on digits 5-9 with LoRA on its Conv2d/Linear layers or any freezing strategy;
* augmentation with torch ops (:class:`Augment`: random crop after padding, optional horizontal
  flip, brightness/contrast jitter, Gaussian noise).

``--model`` may also name a torchvision or timm architecture where those import (a torchvision
``resnet18`` gets a fresh head for the data's classes). ``peftcore finetune --data IMAGE_DIR``
(with ``train/`` and ``val/`` class folders, or class folders split 80/20) runs :func:`run_images`.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from peftcore.errors import DataError, PeftcoreError
from peftcore.train.data import Batch

__all__ = ["SmallResNet", "Augment", "write_digits", "read_image_folder", "image_batches", "pretrain", "build_image_model", "run_images"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


@dataclasses.dataclass
class ImageOutput:
    """What the image models return: ``logits`` (B, C), as transformers classifiers do."""

    logits: torch.Tensor


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a (1x1-projected when the shape changes) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A ResNet for small images: stem, one residual block per width (stride 2 after the first),
    global average pooling, a linear ``classifier``.

    Args:
        num_classes: outputs of the head.
        widths: channels of each block.
    """

    def __init__(self, num_classes: int, widths: Sequence[int] = (16, 32, 64)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        chans = [widths[0], *widths]
        self.blocks = nn.ModuleList(BasicBlock(chans[i], chans[i + 1], 1 if i == 0 else 2) for i in range(len(widths)))
        self.classifier = nn.Linear(widths[-1], num_classes)
        self.config = {"num_classes": num_classes, "widths": list(widths)}

    def forward(self, pixel_values: torch.Tensor) -> ImageOutput:
        x = self.stem(pixel_values)  # (B, C0, H, W)
        for block in self.blocks:
            x = block(x)
        return ImageOutput(self.classifier(x.mean((2, 3))))  # (B, C)


class Augment:
    """Strong augmentation with torch ops, per image of a (B, 3, H, W) batch in [0, 1].

    Args:
        pad: random crop of the original size after padding each side by ``pad`` (reflect).
        flip: horizontal flip with probability 0.5 (off for digits: a flipped 2 is no digit).
        brightness, contrast: jitter factors drawn from ``[1 - x, 1 + x]``.
        noise: standard deviation of added Gaussian noise.
    """

    def __init__(self, pad: int = 2, flip: bool = False, brightness: float = 0.3, contrast: float = 0.3, noise: float = 0.03):
        self.pad, self.flip, self.brightness, self.contrast, self.noise = pad, flip, brightness, contrast, noise

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        b, _, h, w = images.shape
        x = images
        if self.pad:
            padded = F.pad(x, (self.pad,) * 4, mode="reflect")
            dy = torch.randint(0, 2 * self.pad + 1, (b,), generator=generator)
            dx = torch.randint(0, 2 * self.pad + 1, (b,), generator=generator)
            x = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
        if self.flip:
            flip = torch.rand(b, generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if self.brightness:
            x = x * (1 + (torch.rand(b, 1, 1, 1, generator=generator) * 2 - 1) * self.brightness)
        if self.contrast:
            mean = x.mean((1, 2, 3), keepdim=True)
            x = (x - mean) * (1 + (torch.rand(b, 1, 1, 1, generator=generator) * 2 - 1) * self.contrast) + mean
        if self.noise:
            x = x + torch.randn(x.shape, generator=generator) * self.noise
        return x.clamp(0, 1)


def write_digits(root: str | Path, size: int = 32, classes: Sequence[int] = range(10), per_class: int | None = None,
                 val_fraction: float = 0.2, seed: int = 0) -> Path:
    """Writes scikit-learn's 8 x 8 digits, upscaled to ``size`` x ``size`` RGB PNGs, as
    ``root/train/<digit>/*.png`` and ``root/val/<digit>/*.png``.

    Args:
        classes: which digits.
        per_class: images per digit (train + val); ``None`` = all (about 180).
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = random.Random(seed)
    root = Path(root)
    for digit in classes:
        indices = [i for i, t in enumerate(digits.target) if t == digit]
        rng.shuffle(indices)
        indices = indices[:per_class] if per_class else indices
        n_val = max(1, round(len(indices) * val_fraction))
        for split, part in (("val", indices[:n_val]), ("train", indices[n_val:])):
            folder = root / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for i in part:
                pixels = (digits.images[i] * (255 / 16)).clip(0, 255).astype("uint8")  # values 0..16
                Image.fromarray(pixels).resize((size, size), Image.BILINEAR).convert("RGB").save(folder / f"{i}.png")
    return root


def read_image_folder(path: str | Path, size: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """Reads an ImageFolder tree (``path/<class>/<image>``) with PIL.

    Returns:
        ``(images (N, 3, H, W) float32 in [0, 1], labels)``; images are resized to the first
        image's size (or ``size``).

    Raises:
        DataError: no class folders or no images, or an unreadable image (its file named).
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    classes = sorted(p for p in path.iterdir() if p.is_dir()) if path.is_dir() else []
    if not classes:
        raise DataError(f"{path}: no class folders (an ImageFolder tree is <dir>/<class>/<image>)")
    images, labels = [], []
    for folder in classes:
        for file in sorted(folder.iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(file) as img:
                    img = img.convert("RGB")
                    if size is None:
                        size = img.size[0]
                    if img.size != (size, size):
                        img = img.resize((size, size), Image.BILINEAR)
                    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3)
            except (OSError, UnidentifiedImageError) as exc:
                raise DataError(f"{file}: not a readable image ({exc})") from exc
            images.append(data.permute(2, 0, 1).float() / 255)
            labels.append(folder.name)
    if not images:
        raise DataError(f"{path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in its class folders")
    return torch.stack(images), labels


def image_batches(images: torch.Tensor, labels: Sequence[str], label_ids: dict[str, int], batch_size: int, *,
                  shuffle: bool = False, seed: int = 0, augment: Augment | None = None) -> list[Batch]:
    """Batches of ``{"pixel_values": (B, 3, H, W)}`` with label ids, augmented when asked."""
    order = list(range(len(labels)))
    if shuffle:
        random.Random(seed).shuffle(order)
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        x = images[idx]
        if augment is not None:
            x = augment(x, g)
        out.append(Batch({"pixel_values": x}, torch.tensor([label_ids[labels[i]] for i in idx])))
    return out


class _TorchvisionAdapter(nn.Module):
    """A torchvision/timm classifier returning :class:`ImageOutput`."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, pixel_values: torch.Tensor) -> ImageOutput:
        return ImageOutput(self.net(pixel_values))


def build_image_model(name: str | None, num_classes: int) -> tuple[nn.Module, dict]:
    """The model of ``--model`` for images, and the strategy's ``blocks``/``head`` for it.

    ``None`` or ``small-resnet``: a fresh :class:`SmallResNet`; a ``.safetensors`` file written
    by :func:`pretrain` (its ``classifier`` replaced for ``num_classes``); otherwise a torchvision or
    timm architecture name, when those import.

    Raises:
        PeftcoreError: none of these.
    """
    layout = {"blocks": "blocks", "head": ["classifier"]}
    if name is None or name == "small-resnet":
        return SmallResNet(num_classes), layout
    path = Path(name)
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), "pt") as fh:
            config = json.loads(fh.metadata()["config"])
        model = SmallResNet(config["num_classes"], config["widths"])
        model.load_state_dict(load_file(str(path)))
        model.classifier = nn.Linear(model.classifier.in_features, num_classes)  # a fresh head for these classes
        model.config["num_classes"] = num_classes
        return model, layout
    errors = []
    try:
        import torchvision

        net = torchvision.models.get_model(name, num_classes=num_classes)
        return _TorchvisionAdapter(net), {"blocks": r"net\.layer\d", "head": ["net.fc"]}
    except Exception as exc:  # ImportError, or torchvision's own failure to load its operators
        errors.append(f"torchvision: {exc}")
    try:
        import timm

        return _TorchvisionAdapter(timm.create_model(name, num_classes=num_classes)), {"blocks": None, "head": None}
    except Exception as exc:
        errors.append(f"timm: {exc}")
    raise PeftcoreError(f"--model {name!r} is neither small-resnet, a .safetensors file of peftcore.train.images.pretrain, "
                        f"nor an architecture here ({'; '.join(errors)})")


def pretrain(image_dir: str | Path, out_file: str | Path, *, epochs: int = 5, lr: float = 3e-3, batch_size: int = 32,
             seed: int = 0, log: Callable[[str], None] = print) -> float:
    """Trains a :class:`SmallResNet` from scratch on ``image_dir/train`` (with augmentation) and
    saves it as safetensors (its config in the metadata). Returns the accuracy on ``image_dir/val``."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    images, labels = read_image_folder(Path(image_dir) / "train")
    val_images, val_labels = read_image_folder(Path(image_dir) / "val", images.shape[-1])
    classes = sorted(set(labels))
    label_ids = {c: i for i, c in enumerate(classes)}
    model = SmallResNet(len(classes))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for epoch in range(epochs):
        model.train()
        for batch in image_batches(images, labels, label_ids, batch_size, shuffle=True, seed=seed + epoch, augment=Augment()):
            loss = F.cross_entropy(model(**batch.inputs).logits, batch.labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        predicted = model(val_images).logits.argmax(-1)
    accuracy = (predicted == torch.tensor([label_ids[l] for l in val_labels])).float().mean().item()
    log(f"pretrained SmallResNet on {', '.join(classes)}: validation accuracy {accuracy:.4f}")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_file), metadata={"config": json.dumps(model.config), "classes": json.dumps(classes)})
    return accuracy


def is_image_dir(path: str | None) -> bool:
    """Whether ``--data`` names a directory (an ImageFolder tree) rather than a text file."""
    return path is not None and Path(path).is_dir()


def load_image_data(config) -> tuple[torch.Tensor, list[str], torch.Tensor, list[str]]:
    """Train and validation images of ``--data IMAGE_DIR``: ``train/`` and ``val/`` (or
    ``validation/``) class folders, else class folders split 80/20 with ``--seed``."""
    root = Path(config.data)
    val_dir = next((root / n for n in ("val", "validation") if (root / n).is_dir()), None)
    if (root / "train").is_dir() and val_dir is not None:
        images, labels = read_image_folder(root / "train")
        val_images, val_labels = read_image_folder(val_dir, images.shape[-1])
        return images, labels, val_images, val_labels
    images, labels = read_image_folder(root)
    order = list(range(len(labels)))
    random.Random(config.seed).shuffle(order)
    n_val = max(1, len(order) // 5)
    val, train = order[:n_val], order[n_val:]
    return images[train], [labels[i] for i in train], images[val], [labels[i] for i in val]


def run_images(config, log: Callable[[str], None] = print):
    """``peftcore finetune --data IMAGE_DIR``: fine-tunes an image classifier with the strategy,
    with :class:`Augment` on the training images, and writes the run directory as for texts."""
    import peftcore
    from peftcore.train import amp
    from peftcore.train import finetune as ft
    from peftcore.train import memory
    from peftcore.train.loop import evaluate, train_epoch
    from peftcore.train.optim import build_optimizer, build_scheduler
    from peftcore.train.progressive import ProgressiveUnfreezer
    from peftcore.train.strategies import apply_strategy

    start = time.perf_counter()
    ft.seed_everything(config.seed)
    images, labels, val_images, val_labels = load_image_data(config)
    classes = sorted(set(labels))
    missing = sorted(set(val_labels) - set(classes))
    if missing:
        raise DataError(f"{config.data}: validation class(es) {', '.join(missing)} have no training images")
    label_ids = {c: i for i, c in enumerate(classes)}
    run_dir = ft.run_dir_path(config.out, config.overwrite)
    model, layout = build_image_model(config.model, len(classes))
    strategy = config.strategy_config()
    strategy = dataclasses.replace(strategy, blocks=strategy.blocks or layout["blocks"], head=strategy.head or layout["head"])
    if strategy.is_peft and "targets" not in strategy.method_options:
        # every Conv2d and Linear but the head (the default targets are linear layers only)
        head = tuple(strategy.head) if isinstance(strategy.head, list) else ()
        targets = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and not n.startswith(head or ("\0",))]
        strategy = dataclasses.replace(strategy, method_options={**strategy.method_options, "targets": targets})
    plan = apply_strategy(model, strategy)
    trainable = sum(p.numel() for _, p in plan.named_parameters())
    total = sum(p.numel() for p in model.parameters())
    log(f"images: {len(labels)} training / {len(val_labels)} validation, {len(classes)} classes, {images.shape[-1]} px; "
        f"model {config.model or 'small-resnet'}, strategy {plan.strategy}, lr {strategy.base_lr:g}, "
        f"{trainable:,} of {total:,} parameters train")
    val_batches = image_batches(val_images, val_labels, label_ids, config.batch_size)
    precision = {"bf16": config.bf16, "fp16": config.fp16}
    before, before_loss = evaluate(model, val_batches, classes, progress=False, **precision)
    optimizer = build_optimizer(plan.param_groups())
    steps = -(-len(labels) // config.batch_size) * config.epochs
    scheduler = build_scheduler(optimizer, config.schedule, steps, int(config.warmup * steps))
    unfreezer = ProgressiveUnfreezer(model, plan, config.unfreeze_every) if plan.strategy == "progressive" else None
    scaler = amp.make_scaler(model, config.fp16)
    augment = Augment()
    history, step_losses, step_times = [], [], []
    memory.reset_peak()
    for epoch in range(1, config.epochs + 1):
        if unfreezer is not None:
            unfreezer.start_epoch(epoch - 1)
        batches = image_batches(images, labels, label_ids, config.batch_size, shuffle=True, seed=config.seed + epoch, augment=augment)
        stats = train_epoch(model, batches, optimizer, scheduler=scheduler, max_grad_norm=config.max_grad_norm or None,
                            scaler=scaler, progress=config.progress, desc=f"epoch {epoch}/{config.epochs}",
                            on_step=lambda s, loss, t: (step_losses.append(loss), unfreezer.step() if unfreezer else None), **precision)
        step_times += stats.step_times
        report, val_loss = evaluate(model, val_batches, classes, progress=False, **precision)
        history.append({"epoch": epoch, "train_loss": stats.loss, "penalty": 0.0, "val_loss": val_loss, "val_accuracy": report.accuracy,
                        "val_macro_f1": report.macro_f1, "median_step_s": stats.median_step_s,
                        "lr": max(g["lr"] for g in optimizer.param_groups), "skipped_steps": stats.skipped})
        log(f"epoch {epoch}: train loss {stats.loss:.4f}, validation loss {val_loss:.4f}, accuracy {report.accuracy:.4f}")
    run_dir = ft.prepare_run_dir(run_dir, config.overwrite)
    if plan.method is not None:
        peftcore.save(model, run_dir / "adapter", format="peftcore")  # PEFT has no config for this model
        saved = "adapter"
    else:
        from peftcore.train.weights import WEIGHTS_FILE, save_weights

        save_weights(plan.named_parameters(), run_dir / WEIGHTS_FILE, metadata={"strategy": plan.strategy, "format": "peftcore-weights"})
        saved = WEIGHTS_FILE
    seconds = time.perf_counter() - start
    times = sorted(step_times)
    metrics = {"strategy": plan.strategy, "lr": strategy.base_lr, "data": "images", "accuracy_before": before.accuracy,
               "macro_f1_before": before.macro_f1, "loss_before": before_loss, "accuracy_after": report.accuracy,
               "macro_f1_after": report.macro_f1, "loss_after": val_loss, "report_after": report.as_dict(),
               "trainable_parameters": trainable, "total_parameters": total, "median_step_s": times[len(times) // 2] if times else 0.0,
               "peak_rss_mib": memory.peak_rss_mib(), "history": history, "step_losses": step_losses, "saved": saved, "seconds": seconds,
               "precision": amp.precision_name(config.bf16, config.fp16)}
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    resolved = dataclasses.asdict(config) | {"strategy": plan.strategy, "lr": strategy.base_lr, "model": config.model or "small-resnet",
                                             "labels": classes, "peftcore_version": peftcore.__version__}
    (run_dir / "config.json").write_text(json.dumps(resolved, indent=2) + "\n", encoding="utf-8")
    log(f"validation accuracy {report.accuracy:.4f} (before: {before.accuracy:.4f}); {saved} saved in {run_dir} ({seconds:.0f} s)")
    return ft.FinetuneResult(run_dir, before.accuracy, report.accuracy, report.macro_f1, trainable, total, history, seconds)
