"""The configuration of a ``peftcore finetune`` run: one dataclass, each field a command-line option."""

from __future__ import annotations

import dataclasses
from typing import Any

from peftcore.errors import ConfigError
from peftcore.train.optim import SCHEDULES
from peftcore.train.strategies import LAYER_STRATEGIES, StrategyConfig, default_lr

#: Validation metrics early stopping can watch, and whether higher is better.
STOP_METRICS = {"accuracy": "max", "macro_f1": "max", "loss": "min"}

#: How ``--quantize`` starts LoRA's factors (``--quantize-init``).
QUANTIZE_INITS = ("calibrated", "svd", "none")

#: The default learning rate's factor over a 4-bit base (``--quantize nf4|fp4`` without ``--lr``):
#: there the adapter also makes up for a weight error of about 9 % (relative, per layer), and at
#: the full default rate the runs overfit after their best epoch (docs/quantization.md).
QUANTIZED_LR_FACTOR = {"nf4": 0.5, "fp4": 0.5}


@dataclasses.dataclass
class FinetuneConfig:
    """Everything ``peftcore finetune`` needs; each field is a command-line option.

    Attributes:
        data: training file (CSV/TSV/JSONL); ``None`` = the bundled dataset.
        validation_data: validation file; ``None`` = the bundled validation split, or a
            stratified 20 % split of ``data``.
        text_column: column holding the text.
        label_column: column holding the label.
        model: a local transformers model directory; ``None`` = all-MiniLM-L6-v2.
        strategy: a layer strategy or a peftcore method; ``None`` = ``method``.
        method: the peftcore method when ``strategy`` is not given (kept for compatibility).
        rank: LoRA rank.
        alpha: LoRA alpha (``None`` = 2 * rank).
        dropout: LoRA dropout.
        method_options: further ``peftcore.wrap`` options of the method (``--method-option k=v``).
        epochs: passes over the training data.
        lr: peak learning rate; ``None`` = the strategy's default (strategies.DEFAULT_LR), halved
            over a 4-bit base (``quantize`` nf4 or fp4, :data:`QUANTIZED_LR_FACTOR`).
        head_lr: the task head's rate in the layer strategies; ``None`` = ``lr`` (10 x ``lr``
            for ``progressive``).
        batch_size: examples per micro-batch.
        grad_accum: micro-batches per optimizer step.
        max_length: token limit per text.
        schedule: ``cosine``, ``linear``, ``constant`` (each after linear warmup) or ``one-cycle``.
        warmup: fraction of the optimizer steps spent warming up.
        weight_decay: AdamW weight decay of matrices (not biases or norms).
        max_grad_norm: gradient-norm clipping; 0 = off.
        l1: strength of an L1 penalty on the trained matrices; 0 = off.
        ewc: EWC strength (penalty on moving away from the starting weights); 0 = off.
        ewc_data: reference data for the Fisher information; ``None`` = the training data.
        ewc_examples: examples used to estimate the Fisher information.
        early_stopping: patience in epochs; 0 = off. The best epoch's weights are restored.
        early_stopping_metric: ``accuracy``, ``macro_f1`` or ``loss`` on the validation data.
        bf16: bf16 autocast (on the CPU too).
        fp16: fp16 autocast with dynamic loss scaling (``torch.amp.GradScaler``); steps whose
            gradients overflow are skipped. Excludes ``bf16``.
        teacher: knowledge distillation: the run directory of a ``peftcore finetune`` job whose
            classifier teaches this run's model (:mod:`peftcore.train.distill`); ``None`` = off.
        temperature: distillation temperature ``T``.
        distill_weight: distillation: the share ``a`` of the hard-label cross-entropy in
            ``a * CE + (1 - a) * T^2 * KL``.
        few_shot: few-shot fine-tuning with a prototypical network on this many examples per class
            (:mod:`peftcore.train.fewshot`); ``None`` = off.
        few_shot_seeds: few-shot: support sets drawn (one run each); accuracy mean and std over them.
        few_shot_baseline: few-shot: also fine-tune on all the training data, for comparison.
        gradient_checkpointing: recompute activations in backward (less memory, more time).
        quantize: quantize the base model's linear layers before wrapping (``nf4``, ``fp4``, ``int8``,
            ``torchao-int8``; needs the peftcore-quant plugin and a PEFT method such as LoRA).
        quantize_init: with ``quantize`` and LoRA: ``"none"`` (LoRA's own init, B = 0: training
            starts from the quantized model), or start the factors from the quantization error
            (``peftcore_quant.init_from_quantization_error``): ``"calibrated"`` (weighted by the
            layers' inputs on the first training examples) or ``"svd"`` (the weight error alone).
            On the default run the error init lowered accuracy (docs/quantization.md), hence the
            default.
        freeze_blocks: ``partial``: bottom blocks to freeze (``None`` = half).
        freeze: ``partial``: regex of parameter names to freeze as well.
        lr_decay: ``discriminative``/``progressive``: rate factor per block downwards.
        unfreeze_every: ``progressive``: optimizer steps between stages; 0 = one per epoch.
        blocks_per_stage: ``progressive``: blocks unfrozen at each stage.
        blocks: the model's block list (path or regex), when it cannot be found automatically.
        head: the task head's module names (comma-separated) or regex.
        out: run directory; ``None`` = ``runs/finetune-<time>``.
        overwrite: replace an existing run directory.
        seed: seed of every random generator.
        threads: torch's intra-op threads for the run; ``None`` = torch's default (one per core).
            On a machine busy with other jobs, 1 can be many times faster (docs/strategies.md).
        progress: show progress bars.
    """

    data: str | None = None
    validation_data: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    model: str | None = None
    strategy: str | None = None
    method: str = "lora"
    rank: int = 8
    alpha: float | None = 16.0
    dropout: float = 0.1
    method_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    epochs: int = 6
    lr: float | None = None
    head_lr: float | None = None
    batch_size: int = 16
    grad_accum: int = 1
    max_length: int = 64
    schedule: str = "cosine"
    warmup: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    l1: float = 0.0
    ewc: float = 0.0
    ewc_data: str | None = None
    ewc_examples: int = 64
    early_stopping: int = 0
    early_stopping_metric: str = "accuracy"
    bf16: bool = False
    fp16: bool = False
    teacher: str | None = None
    temperature: float = 2.0
    distill_weight: float = 0.5
    few_shot: int | None = None
    few_shot_seeds: int = 5
    few_shot_baseline: bool = True
    gradient_checkpointing: bool = False
    quantize: str | None = None
    quantize_init: str = "none"
    freeze_blocks: int | None = None
    freeze: str | None = None
    lr_decay: float | None = None
    unfreeze_every: int = 0
    blocks_per_stage: int = 1
    blocks: str | None = None
    head: str | None = None
    out: str | None = None
    overwrite: bool = False
    seed: int = 0
    threads: int | None = None
    progress: bool = True

    @property
    def resolved_strategy(self) -> str:
        return self.strategy or self.method

    @property
    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return default_lr(self.resolved_strategy) * QUANTIZED_LR_FACTOR.get(self.quantize, 1.0)

    def wrap_options(self) -> dict[str, Any]:
        """The ``peftcore.wrap`` options of a PEFT strategy (LoRA's rank/alpha/dropout, then extras)."""
        base = {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout} if self.resolved_strategy == "lora" else {}
        return base | dict(self.method_options)

    def strategy_config(self) -> StrategyConfig:
        """The :class:`StrategyConfig` this run applies."""
        head: Any = self.head
        if head is not None and not any(c in head for c in "()[]*+?\\|^$"):
            head = [h.strip() for h in head.split(",") if h.strip()]
        return StrategyConfig(
            name=self.resolved_strategy,
            lr=self.resolved_lr,
            head_lr=self.head_lr,
            weight_decay=self.weight_decay,
            blocks=self.blocks,
            head=head,
            freeze_blocks=self.freeze_blocks,
            freeze=self.freeze,
            lr_decay=self.lr_decay,
            unfreeze_every=self.unfreeze_every,
            blocks_per_stage=self.blocks_per_stage,
            method_options=self.wrap_options() if self.resolved_strategy not in LAYER_STRATEGIES else {},
        )

    def validate(self) -> None:
        """Raises :class:`ConfigError` naming the option (as on the command line) that is wrong."""
        def bad(field: str, what: str) -> ConfigError:
            return ConfigError(f"--{field.replace('_', '-')} {what}, got {getattr(self, field)!r}")

        for field in ("epochs", "batch_size", "max_length", "grad_accum", "ewc_examples", "blocks_per_stage"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise bad(field, "must be a positive integer")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads <= 0):
            raise bad("threads", "must be a positive integer")
        for field in ("early_stopping", "unfreeze_every"):
            if getattr(self, field) < 0:
                raise bad(field, "must be >= 0")
        for field in ("weight_decay", "max_grad_norm", "l1", "ewc"):
            if not getattr(self, field) >= 0:
                raise bad(field, "must be >= 0")
        for field in ("lr", "head_lr"):
            if getattr(self, field) is not None and not getattr(self, field) > 0:
                raise bad(field, "must be positive")
        if not 0 <= self.warmup < 1:
            raise bad("warmup", "must be in [0, 1)")
        if self.schedule not in SCHEDULES:
            raise bad("schedule", f"must be one of {', '.join(SCHEDULES)}")
        if self.early_stopping_metric not in STOP_METRICS:
            raise bad("early_stopping_metric", f"must be one of {', '.join(STOP_METRICS)}")
        if self.freeze_blocks is not None and self.freeze_blocks < 0:
            raise bad("freeze_blocks", "must be >= 0")
        if self.lr_decay is not None and not 0 < self.lr_decay <= 1:
            raise bad("lr_decay", "must be in (0, 1]")
        if self.strategy is not None and self.method != "lora" and self.method != self.strategy:
            raise ConfigError(f"--strategy {self.strategy!r} and --method {self.method!r} disagree; pass only --strategy")
        if self.bf16 and self.fp16:
            raise ConfigError("--bf16 and --fp16 exclude each other; pass one")
        if self.quantize is not None and self.resolved_strategy in LAYER_STRATEGIES:
            raise ConfigError(f"--quantize {self.quantize} needs a PEFT method (e.g. lora) over the frozen quantized base, "
                              f"not the strategy {self.resolved_strategy!r}, which trains base weights")
        if self.quantize_init not in QUANTIZE_INITS:
            raise bad("quantize_init", f"must be one of {', '.join(QUANTIZE_INITS)}")
        if self.teacher is not None:
            from peftcore.train.distill import check_options

            check_options(self.temperature, self.distill_weight)
        if self.few_shot is not None:
            from peftcore.train.fewshot import check_options as check_few_shot

            check_few_shot(self)
        if self.ewc_data is not None and not self.ewc:
            raise ConfigError("--ewc-data is given but --ewc (the strength) is 0; pass --ewc STRENGTH as well")
