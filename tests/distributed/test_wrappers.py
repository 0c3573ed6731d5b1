"""peftcore calls on a DistributedDataParallel wrapper (one process, a world of one, gloo)."""

import json

import pytest
import torch
import torch.distributed as dist
from torch import nn

import peftcore
from peftcore.errors import ConfigError


@pytest.fixture
def group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))


def test_save_takes_the_ddp_wrapper_as_the_model_inside(group, tmp_path):
    model = peftcore.wrap(_model(), "lora", rank=2)
    with torch.no_grad():
        model[0].lora_B["default"].normal_()
    ddp = nn.parallel.DistributedDataParallel(model)
    peftcore.save(ddp, tmp_path / "from-ddp")
    peftcore.save(model, tmp_path / "from-model")
    for file in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "from-ddp" / file).read_bytes() == (tmp_path / "from-model" / file).read_bytes()
    assert json.loads((tmp_path / "from-ddp" / "adapter_config.json").read_text())["target_modules"] == ["0", "2"]
    x = torch.randn(3, 8)
    fresh = peftcore.load(_model(), tmp_path / "from-ddp")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("call", ["wrap", "load"])
def test_adding_an_adapter_under_ddp_is_refused_and_changes_nothing(group, tmp_path, call):
    peftcore.save(peftcore.wrap(_model(), "lora", rank=2), tmp_path / "adapter")
    ddp = nn.parallel.DistributedDataParallel(_model())
    before = {k: v.clone() for k, v in ddp.state_dict().items()}
    with pytest.raises(ConfigError, match=rf"peftcore\.{call} on a DistributedDataParallel.*first, then build DistributedDataParallel\(model\)"):
        if call == "wrap":
            peftcore.wrap(ddp, "lora", rank=2)
        else:
            peftcore.load(ddp, tmp_path / "adapter")
    after = ddp.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
