"""Fine-tuning practice on top of the public peftcore API.

Strategies (which parameters train, at which rates), schedules, penalties (L1, EWC), early
stopping, progressive unfreezing, multi-task models, metrics, and the ``peftcore finetune`` /
``peftcore compare`` jobs. Example::

    from peftcore.train import apply_strategy, build_optimizer, build_scheduler

    plan = apply_strategy(model, "discriminative", lr=2e-4, lr_decay=0.8)
    optimizer = build_optimizer(plan.param_groups())        # or any torch optimizer
    scheduler = build_scheduler(optimizer, "cosine", total_steps=600, warmup_steps=60)

Module map: ``structure`` (finding blocks and head), ``strategies`` (plans), ``progressive``,
``optim`` (optimizer, schedules), ``regularizers`` (L1, EWC), ``early_stopping``, ``loop``
(train/evaluate), ``metrics``, ``multitask``, ``weights`` (save/load trained weights),
``plots``, ``memory``, ``data``, ``config`` + ``finetune`` (the job), ``compare``.
"""

from peftcore.train.early_stopping import EarlyStopping
from peftcore.train.loop import DivergenceError, evaluate, train_epoch
from peftcore.train.metrics import ClassificationReport, RegressionReport, classification_report, regression_report
from peftcore.train.optim import SCHEDULES, build_optimizer, build_scheduler
from peftcore.train.progressive import ProgressiveUnfreezer
from peftcore.train.regularizers import EWC, L1Penalty, fisher_diagonal
from peftcore.train.strategies import DEFAULT_LR, LAYER_STRATEGIES, Plan, StrategyConfig, apply_strategy, default_lr, strategies
from peftcore.train.structure import ModelStructure, model_structure
from peftcore.train.weights import load_weights, save_weights

__all__ = [
    "apply_strategy",
    "StrategyConfig",
    "Plan",
    "strategies",
    "default_lr",
    "DEFAULT_LR",
    "LAYER_STRATEGIES",
    "model_structure",
    "ModelStructure",
    "ProgressiveUnfreezer",
    "build_optimizer",
    "build_scheduler",
    "SCHEDULES",
    "EWC",
    "L1Penalty",
    "fisher_diagonal",
    "EarlyStopping",
    "train_epoch",
    "evaluate",
    "DivergenceError",
    "classification_report",
    "regression_report",
    "ClassificationReport",
    "RegressionReport",
    "save_weights",
    "load_weights",
]
