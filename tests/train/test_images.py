"""Image classification: digits generated from scikit-learn, the PIL ImageFolder reader, the
torch-op augmentation, pretraining on digits 0-4 and ``finetune --data IMAGE_DIR`` on 5-9 with
LoRA on Conv2d/Linear and with freezing strategies."""

import json

import pytest
import torch

import peftcore
from peftcore.cli import main
from peftcore.errors import DataError, PeftcoreError
from peftcore.train.images import Augment, SmallResNet, build_image_model, pretrain, read_image_folder, write_digits

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """16 px digits: 0-4 for pretraining, 5-9 for fine-tuning (40 images per digit), and the pretrained file."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("digits")
    write_digits(root / "pretrain", size=16, classes=range(5), per_class=40)
    write_digits(root / "finetune", size=16, classes=range(5, 10), per_class=40)
    accuracy = pretrain(root / "pretrain", root / "pretrained.safetensors", epochs=8, batch_size=16, lr=5e-3, log=lambda line: None)
    return root, accuracy


def test_reader_and_generated_folders(digits):
    root, _ = digits
    images, labels = read_image_folder(root / "finetune" / "train")
    assert images.shape == (len(labels), 3, 16, 16) and images.dtype == torch.float32
    assert sorted(set(labels)) == ["5", "6", "7", "8", "9"] and 0 <= images.min() and images.max() <= 1
    with pytest.raises(DataError, match="no class folders"):
        read_image_folder(root / "finetune" / "train" / "5")


def test_augment_keeps_shape_and_range_and_changes_images():
    x = torch.rand(4, 3, 16, 16)
    y = Augment(flip=True)(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1 and not torch.equal(x, y)
    assert torch.equal(Augment(pad=0, brightness=0, contrast=0, noise=0)(x), x)


def test_pretraining_learns_the_first_half(digits):
    assert digits[1] > 0.6


def test_pretrained_model_gets_a_fresh_head(digits):
    model, layout = build_image_model(str(digits[0] / "pretrained.safetensors"), 5)
    assert isinstance(model, SmallResNet) and model.classifier.out_features == 5 and layout["head"] == ["classifier"]
    with pytest.raises(PeftcoreError, match="is neither small-resnet"):
        build_image_model("no-such-architecture", 5)


@pytest.mark.parametrize("strategy, extra", [("lora", ["--rank", "4", "--lr", "1e-2"]), ("feature-extraction", ["--lr", "3e-2"]),
                                             ("partial", ["--freeze-blocks", "2", "--lr", "3e-3"])])
def test_finetune_the_second_half_from_the_pretrained_model(digits, tmp_path, strategy, extra):
    root, _ = digits
    out = tmp_path / "run"
    assert main(["finetune", "--no-progress", "--data", str(root / "finetune"), "--model", str(root / "pretrained.safetensors"),
                 "--strategy", strategy, *extra, "--epochs", "8", "--batch-size", "16", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["accuracy_after"] > max(0.4, metrics["accuracy_before"] + 0.15), metrics["history"]
    assert metrics["trainable_parameters"] < metrics["total_parameters"]
    if strategy == "lora":
        model, _ = build_image_model(str(root / "pretrained.safetensors"), 5)
        peftcore.load(model, out / "adapter")
        assert metrics["trainable_parameters"] > 16 * 64 + 5 * 64 + 5  # LoRA factors on the convolutions beside the head


def test_compare_on_images_with_progressive_unfreezing_and_layerwise_rates(digits, tmp_path):
    root, _ = digits
    out = tmp_path / "cmp"
    assert main(["compare", "--no-progress", "--in-process", "--data", str(root / "finetune"),
                 "--model", str(root / "pretrained.safetensors"), "--methods", "progressive,discriminative",
                 "--epochs", "6", "--batch-size", "16", "--lr", "3e-3", "--out", str(out)]) == 0
    rows = {row["strategy"]: row for row in json.loads((out / "compare.json").read_text())["rows"]}
    assert set(rows) == {"progressive", "discriminative"}
    for name, row in rows.items():
        assert row["accuracy"] > row["accuracy_before"] + 0.1, (name, row)
    assert (out / "compare.png").is_file() and "| progressive |" in (out / "compare.md").read_text()
