"""``peftcore compare`` rows with variants: ``lora+fp16``, ``lora+distill``, ``lora+few-shot``."""

import pytest

from peftcore.errors import ConfigError
from peftcore.train.compare import compare, resolve_methods, row_config
from peftcore.train.config import FinetuneConfig
from train_models import write_subset

pytestmark = pytest.mark.usefixtures("single_thread")


def test_row_configs():
    base = FinetuneConfig(teacher="runs/t", few_shot=4)
    names = ["lora", "lora+fp16", "full+distill", "lora+few-shot"]
    plain, fp16, distill, few = (row_config(base, n, names) for n in names)
    assert (plain.strategy, plain.teacher, plain.few_shot, plain.fp16) == ("lora", None, None, False)
    assert fp16.fp16 and fp16.teacher is None and fp16.few_shot is None
    assert (distill.strategy, distill.teacher, distill.few_shot) == ("full", "runs/t", None)
    assert (few.few_shot, few.teacher) == (4, None)
    # without variant rows, --teacher / --few-shot apply to every row
    assert row_config(base, "lora", ["lora"]).teacher == "runs/t"
    with pytest.raises(ConfigError, match="needs --teacher"):
        row_config(FinetuneConfig(), "lora+distill", ["lora+distill"])
    with pytest.raises(ConfigError, match="unknown variant"):
        resolve_methods(["lora+fp8"])
    assert resolve_methods(["lora", "lora+fp16"]) == (["lora", "lora+fp16"], [])


def test_compare_runs_an_fp16_row_beside_fp32(tmp_path, tiny_model_dir):
    train, val = write_subset(tmp_path, 4, 2)
    base = FinetuneConfig(data=str(train), validation_data=str(val), model=str(tiny_model_dir), epochs=1, progress=False)
    result = compare(base, ["lora", "lora+fp16"], out=tmp_path / "cmp", isolate=False, log=lambda line: None)
    assert not result.failed, result.table
    assert [r["strategy"] for r in result.rows] == ["lora", "lora+fp16"] and "| lora+fp16 |" in result.table
    assert (tmp_path / "cmp" / "lora+fp16" / "metrics.json").is_file()
