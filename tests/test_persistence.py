"""peftcore.save / peftcore.load: round trips, file contents, and every error leaving the model unchanged."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftcore
from models import FAMILIES, minilm, output_of
from test_lifecycle import _assert_unchanged, _fingerprint, _perturb_adapters


def _trained(family, **options):
    factory, inputs = FAMILIES[family]
    model = factory()
    peftcore.wrap(model, "lora", **options)
    _perturb_adapters(model)
    return model, inputs()


@pytest.mark.parametrize("family", ["minilm", "gpt2", "llama"])
def test_save_then_load_into_fresh_model_reproduces_outputs_exactly(tmp_path, family):
    model, inputs = _trained(family, rank=4, trainable=["classifier"] if family == "minilm" else None)
    if family == "minilm":
        with torch.no_grad():
            model.classifier.weight.add_(0.1)
    expected = output_of(model, inputs)
    peftcore.save(model, tmp_path / "adapter")
    fresh = FAMILIES[family][0]()
    assert peftcore.load(fresh, tmp_path / "adapter") is fresh
    torch.testing.assert_close(output_of(fresh, inputs), expected, rtol=0, atol=0)
    assert list(peftcore.adapters(fresh)) == ["default"]
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {n for n, p in model.named_parameters() if p.requires_grad}


def test_saved_files_hold_only_adapter_and_trainable_weights(tmp_path):
    # The native format; the default (HF PEFT's for LoRA) is tested in tests/formats/test_peft_lora.py.
    model, _ = _trained("minilm", rank=4, trainable=["classifier"])
    path = peftcore.save(model, tmp_path / "a", format="peftcore")
    assert sorted(p.name for p in path.iterdir()) == ["SHA256SUMS", "adapter_config.json", "adapter_model.safetensors"]
    tensors = load_file(path / "adapter_model.safetensors")
    adapter_keys = {k for k in tensors if k.endswith((".lora_A", ".lora_B"))}
    assert set(tensors) == adapter_keys | {"classifier.weight", "classifier.bias"}
    assert "bert.encoder.layer.0.attention.self.query.lora_A" in tensors
    assert tensors["bert.encoder.layer.0.attention.self.query.lora_A"].shape == (4, 384)
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["method"] == "lora" and config["options"]["rank"] == 4
    assert config["peftcore_version"] == peftcore.__version__
    assert config["base_model"]["class"].endswith("BertForSequenceClassification")
    assert config["provider"]["distribution"] == "peftcore"
    assert config["trainable"] == ["classifier"]
    n_params = sum(t.numel() for t in tensors.values())
    assert n_params == peftcore.summary(model).trainable


def test_load_onto_wrapped_model_under_new_name(tmp_path):
    model, inputs = _trained("gpt2", rank=4)
    expected = output_of(model, inputs)
    peftcore.save(model, tmp_path / "a")
    other = FAMILIES["gpt2"][0]()
    peftcore.wrap(other, "lora", rank=2)
    with pytest.raises(peftcore.AdapterStateError, match="name='other'"):
        peftcore.load(other, tmp_path / "a")
    peftcore.load(other, tmp_path / "a", name="loaded")
    assert list(peftcore.adapters(other)) == ["default", "loaded"]
    assert peftcore.adapters(other)["loaded"].active and not peftcore.adapters(other)["default"].active
    torch.testing.assert_close(output_of(other, inputs), expected, rtol=0, atol=0)


def test_save_needs_name_with_several_adapters(tmp_path):
    model, _ = _trained("gpt2")
    peftcore.wrap(model, "lora", name="b")
    peftcore.activate(model, ["default", "b"])
    with pytest.raises(peftcore.AdapterStateError, match="pass name="):
        peftcore.save(model, tmp_path / "x")
    peftcore.save(model, tmp_path / "x", name="b")
    assert list(peftcore.adapters(peftcore.load(FAMILIES["gpt2"][0](), tmp_path / "x"))) == ["b"]
    peftcore.save(model, tmp_path / "y", name="b", format="peftcore")
    assert json.loads((tmp_path / "y" / "adapter_config.json").read_text())["name"] == "b"


def test_save_replaces_an_adapter_dir_but_never_other_files(tmp_path):
    model, _ = _trained("gpt2")
    peftcore.save(model, tmp_path / "a")
    peftcore.save(model, tmp_path / "a")  # replacing an adapter directory is fine
    peftcore.save(model, tmp_path / "a", format="peftcore")  # in either format
    peftcore.save(model, tmp_path / "a", format="peft")
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("keep me")
    with pytest.raises(peftcore.CheckpointError, match="is not an adapter directory"):
        peftcore.save(model, tmp_path / "user")
    assert (tmp_path / "user" / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(peftcore.CheckpointError, match="is a file"):
        peftcore.save(model, tmp_path / "file")
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_pissa_adapter_round_trip_and_unwrap(tmp_path):
    factory, make_inputs = FAMILIES["llama"]
    model, inputs = factory(), make_inputs()
    base = output_of(model, inputs)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    peftcore.wrap(model, "lora", rank=4, init="pissa")
    torch.testing.assert_close(output_of(model, inputs), base, rtol=1e-4, atol=1e-5)
    _perturb_adapters(model)
    expected = output_of(model, inputs)
    peftcore.save(model, tmp_path / "p")
    fresh = factory()
    peftcore.load(fresh, tmp_path / "p")
    torch.testing.assert_close(output_of(fresh, inputs), expected, rtol=0, atol=0)
    peftcore.unwrap(model)
    assert all(torch.equal(model.state_dict()[k], weights[k]) for k in weights)


# -- errors -----------------------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    """A saved adapter without its SHA256SUMS: these tests edit the files by hand, as a user who
    deleted the checksums would (the checksum tests are in tests/test_files.py)."""
    model, _ = _trained("minilm", rank=4, trainable=["classifier"])
    path = peftcore.save(model, tmp_path / "adapter", format="peftcore")
    (path / "SHA256SUMS").unlink()
    return path


def _expect_load_error(model, path, match, error=peftcore.CheckpointError):
    fingerprint = _fingerprint(model)
    with pytest.raises(error, match=match):
        peftcore.load(model, path)
    _assert_unchanged(model, fingerprint)


def test_load_missing_dir_or_files(tmp_path, saved):
    _expect_load_error(minilm(), tmp_path / "nope", "no adapter directory")
    (saved / "adapter_model.safetensors").unlink()
    _expect_load_error(minilm(), saved, "has no adapter_model.safetensors")
    (saved / "adapter_config.json").unlink()
    _expect_load_error(minilm(), saved, "has no adapter_config.json")


def test_load_malformed_config(saved):
    (saved / "adapter_config.json").write_text("{not json")
    _expect_load_error(minilm(), saved, "cannot read")


def test_load_into_wrong_architecture(saved):
    _expect_load_error(FAMILIES["gpt2"][0](), saved, "targets modules this GPT2LMHeadModel lacks: bert.encoder.layer.0.attention.self.query.*saved from .*BertForSequenceClassification")


def test_load_with_wrong_shapes_names_the_first_mismatches(saved):
    tensors = load_file(saved / "adapter_model.safetensors")
    key = "bert.encoder.layer.2.attention.self.value.lora_A"
    tensors[key] = torch.zeros(4, 100)
    save_file(tensors, str(saved / "adapter_model.safetensors"))
    _expect_load_error(minilm(), saved, f"{key}: saved shape \\(4, 100\\), model expects \\(4, 384\\)")


def test_load_with_missing_tensor(saved):
    tensors = load_file(saved / "adapter_model.safetensors")
    del tensors["bert.encoder.layer.1.output.dense.lora_B"]
    save_file(tensors, str(saved / "adapter_model.safetensors"))
    _expect_load_error(minilm(), saved, "missing bert.encoder.layer.1.output.dense.lora_B")


def test_load_with_wrong_head_shape(saved):
    _expect_load_error(minilm(num_labels=5), saved, "classifier.weight: saved shape \\(3, 384\\), model has \\(5, 384\\)")


def test_load_unknown_method_names_the_plugin(saved):
    config = json.loads((saved / "adapter_config.json").read_text())
    config["method"] = "ia3x"
    config["provider"] = {"distribution": "peftcore-ia3x", "version": "9.9"}
    (saved / "adapter_config.json").write_text(json.dumps(config))
    _expect_load_error(minilm(), saved, "pip install peftcore-ia3x")


def test_load_invalid_options(saved):
    config = json.loads((saved / "adapter_config.json").read_text())
    config["options"]["rank"] = 0
    (saved / "adapter_config.json").write_text(json.dumps(config))
    _expect_load_error(minilm(), saved, "not valid for lora")


def test_load_config_with_a_duplicated_target_is_a_checkpoint_error(saved):
    config = json.loads((saved / "adapter_config.json").read_text())
    config["targets"].append(config["targets"][0])
    (saved / "adapter_config.json").write_text(json.dumps(config))
    _expect_load_error(minilm(), saved, f"lists '{config['targets'][0]}' more than once in 'targets'")
