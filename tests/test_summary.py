"""peftcore.summary: counts and the printed table."""

import peftcore
from models import minilm


def test_summary_counts_per_adapter_and_prints():
    model = minilm()
    plain = peftcore.summary(model)
    assert plain.adapters == () and plain.trainable == plain.total
    peftcore.wrap(model, "lora", rank=4, targets=["query", "value"], trainable=["classifier"])
    info = peftcore.summary(model)
    lora_params = 12 * 4 * (384 + 384)
    head = 384 * 3 + 3
    assert info.adapters[0].adapter_params == lora_params
    assert info.adapters[0].trainable_module_params == head
    assert info.trainable == lora_params + head
    assert info.total == plain.total + lora_params
    assert abs(info.trainable_percent - 100 * info.trainable / info.total) < 1e-9
    text = str(info)
    assert "default" in text and "lora" in text and f"{info.trainable:,}" in text and "%" in text
    peftcore.wrap(model, "lora", name="second", rank=2, targets=["key"])
    rows = {r.name: r for r in peftcore.summary(model).adapters}
    assert rows["second"].active and not rows["default"].active and rows["second"].adapter_params == 6 * 2 * 768
