"""Early stopping: patience, mode, and restoring the best epoch's weights of the tracked parameters."""

import pytest
import torch
from torch import nn

from peftcore.errors import ConfigError
from peftcore.train import EarlyStopping


def _run(values, patience, mode="max", min_delta=0.0):
    """Feeds ``values`` epoch by epoch; the parameter holds the epoch number. Returns (stopper, stop epoch, weight)."""
    layer = nn.Linear(2, 2)
    stopper = EarlyStopping(list(layer.named_parameters()), patience, mode, min_delta)
    stopped = None
    for epoch, value in enumerate(values, start=1):
        with torch.no_grad():
            layer.weight.fill_(epoch)
            layer.bias.fill_(-epoch)
        if stopper.update(value, epoch):
            stopped = epoch
            break
    best = stopper.restore()
    assert best == stopper.best_epoch
    return stopper, stopped, layer


def test_stops_after_patience_and_restores_the_best_epoch():
    stopper, stopped, layer = _run([0.5, 0.7, 0.6, 0.65, 0.9], patience=2)
    assert stopped == 4 and stopper.best_epoch == 2 and stopper.best == 0.7
    assert torch.all(layer.weight == 2) and torch.all(layer.bias == -2)


def test_runs_to_the_end_while_improving_and_handles_loss_mode():
    stopper, stopped, layer = _run([0.9, 0.8, 0.85, 0.7], patience=2, mode="min")
    assert stopped is None and stopper.best_epoch == 4 and torch.all(layer.weight == 4)


def test_min_delta_and_nan_do_not_count_as_improvement():
    stopper, stopped, layer = _run([0.50, 0.505, float("nan")], patience=2, min_delta=0.01)
    assert stopped == 3 and stopper.best_epoch == 1 and torch.all(layer.weight == 1)


def test_restore_without_updates_is_a_no_op():
    layer = nn.Linear(2, 2)
    assert EarlyStopping(list(layer.named_parameters()), 1).restore() is None


@pytest.mark.parametrize("patience, mode", [(0, "max"), (2, "maximum"), (1.5, "max")])
def test_bad_settings(patience, mode):
    with pytest.raises(ConfigError):
        EarlyStopping([], patience, mode)
