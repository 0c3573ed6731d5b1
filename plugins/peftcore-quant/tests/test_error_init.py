"""LoRA factors initialised from the quantization error (``init_from_quantization_error``)."""

from __future__ import annotations

import pytest
import torch
import transformers

import peftcore
from peftcore.errors import AdapterStateError, ConfigError
from peftcore_quant import QuantLoraLinear, init_from_quantization_error, quantize_model

from _models import quantized_llama, tiny_llama

KINDS = ("nf4", "int8", "torchao-int8")


def _ids(seed: int, batch: int = 4, length: int = 16) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _calibration(n: int = 4) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": _ids(100 + i)} for i in range(n)]


def _wrapped(kind: str, rank: int = 8, **options):
    """A quantized tiny Llama wrapped with LoRA, and the full-precision state dict it came from."""
    original = {k: v.clone() for k, v in tiny_llama().state_dict().items()}
    model = quantized_llama(kind)
    peftcore.wrap(model, "lora", rank=rank, alpha=2 * rank, **options)
    return model, original


def _layers(model) -> dict[str, QuantLoraLinear]:
    return {p: m for p, m in model.named_modules() if isinstance(m, QuantLoraLinear)}


def _inputs(model, batches) -> dict[str, torch.Tensor]:
    """Each quantized layer's inputs over ``batches``, rows ``(tokens, in)``."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = [layer.register_forward_pre_hook(lambda m, args, p=path: seen.setdefault(p, []).append(args[0].reshape(-1, args[0].shape[-1])))
               for path, layer in _layers(model).items()]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for handle in handles:
        handle.remove()
    return {p: torch.cat(xs).double() for p, xs in seen.items()}


@pytest.mark.parametrize("kind", KINDS)
def test_without_calibration_the_factors_are_the_truncated_svd_of_the_weight_error(kind):
    model, original = _wrapped(kind)
    report = init_from_quantization_error(model, original)
    assert set(report) == set(_layers(model)) and len(report) == 14
    for path, layer in _layers(model).items():
        E = original[f"{path}.weight"].double() - layer.dequantized().double()
        S = torch.linalg.svdvals(E)
        residual = E - layer.delta_weight("default").detach().double()
        # the best rank-8 approximation (Eckart-Young): what is left is the tail of the spectrum
        torch.testing.assert_close(residual.norm(), S[8:].square().sum().sqrt(), rtol=1e-5, atol=0)
        W = original[f"{path}.weight"].double()
        assert report[path].before == pytest.approx(float(E.norm() / W.norm()), rel=1e-9)
        assert report[path].after == pytest.approx(float(residual.norm() / W.norm()), rel=1e-5)
        assert report[path].after < report[path].before


@pytest.mark.parametrize("kind", KINDS)
def test_calibration_minimises_the_error_of_the_layer_outputs(kind):
    calibration = _calibration()
    svd_model, original = _wrapped(kind)
    init_from_quantization_error(svd_model, original)
    model, _ = _wrapped(kind)
    inputs = _inputs(model, calibration)  # each layer's inputs while B = 0 (q/k/v share one tensor, as gate/up do)
    report = init_from_quantization_error(model, original, calibration, damping=0.0)
    for path, layer in _layers(model).items():
        X = inputs[path]
        W = original[f"{path}.weight"].double()
        E = W - layer.dequantized().double()
        out_error = (X @ (E - layer.delta_weight("default").detach().double()).T).norm()
        svd_error = (X @ (E - _layers(svd_model)[path].delta_weight("default").detach().double()).T).norm()
        best = torch.linalg.svdvals(X @ E.T)[8:].square().sum().sqrt()  # the optimum over rank-8 updates
        torch.testing.assert_close(out_error, best, rtol=1e-4, atol=0)
        assert out_error < svd_error
        assert report[path].before == pytest.approx(float((X @ E.T).norm() / (X @ W.T).norm()), rel=1e-4)
        assert report[path].after == pytest.approx(float(out_error / (X @ W.T).norm()), rel=1e-4)


def test_the_wrapped_model_starts_closer_to_the_full_precision_one():
    ids = _ids(7)
    with torch.no_grad():
        reference = tiny_llama()(input_ids=ids).logits
    distances = {}
    for init in ("none", "svd", "calibrated"):
        model, original = _wrapped("nf4")
        if init != "none":
            init_from_quantization_error(model, original, _calibration() if init == "calibrated" else None)
        with torch.no_grad():
            distances[init] = float((model(input_ids=ids).logits - reference).norm())
    assert distances["calibrated"] < distances["svd"] < distances["none"]


def test_ranks_alpha_and_rslora_per_layer_are_respected():
    model, original = _wrapped("nf4", rank_pattern={"q_proj": 4}, alpha_pattern={"down_proj": 3.0}, rslora=True)
    init_from_quantization_error(model, original)
    for path, layer in _layers(model).items():
        rank = 4 if path.endswith("q_proj") else 8
        assert layer.lora_A["default"].shape[0] == rank
        E = original[f"{path}.weight"].double() - layer.dequantized().double()
        residual = E - layer.delta_weight("default").detach().double()  # delta_weight applies the layer's own scale
        torch.testing.assert_close(residual.norm(), torch.linalg.svdvals(E)[rank:].square().sum().sqrt(), rtol=1e-5, atol=0)


def test_int8_after_a_forward_reads_the_scales_where_bitsandbytes_moved_them():
    model, original = _wrapped("int8")
    with torch.no_grad():
        model(input_ids=_ids(1))  # bitsandbytes moves the row scales from the weight into the layer state
    report = init_from_quantization_error(model, original)
    assert all(0 < r.after < r.before < 0.05 for r in report.values())


def test_the_model_checkpoint_serves_as_original_and_the_adapter_round_trips(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")  # the full-precision checkpoint
    bnb = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)

    def load():
        return transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", device_map="cpu", dtype=torch.float32,
                                                                 quantization_config=transformers.BitsAndBytesConfig(**bnb))

    model = peftcore.wrap(load(), "lora", rank=8)
    from_dir = init_from_quantization_error(model, tmp_path / "base", _calibration(2))
    A = {p: m.lora_A["default"].detach().clone() for p, m in _layers(model).items()}
    again = peftcore.wrap(load(), "lora", rank=8)
    init_from_quantization_error(again, {k: v.clone() for k, v in tiny_llama().state_dict().items()}, _calibration(2))
    for path, layer in _layers(again).items():
        torch.testing.assert_close(layer.lora_A["default"], A[path], rtol=0, atol=0)
    assert len(from_dir) == 14

    peftcore.save(model, tmp_path / "adapter")  # the factors only: a fresh quantized base reproduces the rest
    fresh = peftcore.load(load(), tmp_path / "adapter")
    ids = _ids(3)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_a_base_model_checkpoint_matches_a_task_model_without_its_prefix(tmp_path):
    """all-MiniLM-style: the checkpoint is a LlamaModel (no ``model.`` prefix), the model a ForCausalLM."""
    tiny_llama().model.save_pretrained(tmp_path / "backbone")
    model, original = _wrapped("nf4")
    init_from_quantization_error(model, tmp_path / "backbone")
    expected, _ = _wrapped("nf4")
    init_from_quantization_error(expected, original)
    for path, layer in _layers(model).items():
        torch.testing.assert_close(layer.lora_B["default"], _layers(expected)[path].lora_B["default"], rtol=0, atol=0)


def _factors(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}


def test_bad_input_is_refused_and_changes_nothing(tmp_path):
    model, original = _wrapped("nf4")
    before = _factors(model)
    missing = {k: v for k, v in original.items() if "layers.1.mlp.down_proj" not in k}
    with pytest.raises(ConfigError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        init_from_quantization_error(model, missing)
    wrong = dict(original, **{"model.layers.0.self_attn.o_proj.weight": torch.zeros(64, 32)})
    with pytest.raises(ConfigError, match=r"o_proj.*shape \(64, 32\)"):
        init_from_quantization_error(model, wrong)
    with pytest.raises(ConfigError, match="calibration is empty"):
        init_from_quantization_error(model, original, [])
    with pytest.raises(ConfigError, match="adapter 'other'"):
        init_from_quantization_error(model, original, adapter="other")
    with pytest.raises(ConfigError, match="no such file"):
        init_from_quantization_error(model, tmp_path / "nothing-here")
    with pytest.raises(ConfigError, match="damping"):
        init_from_quantization_error(model, original, damping=-1.0)
    after = _factors(model)
    assert all(torch.equal(before[k], after[k]) for k in before)

    peftcore.merge(model)
    with pytest.raises(AdapterStateError, match="merged"):
        init_from_quantization_error(model, original)


def test_layers_that_are_not_quantized_keep_their_factors():
    original = {k: v.clone() for k, v in tiny_llama().state_dict().items()}
    model = quantize_model(tiny_llama(), "nf4", skip=("lm_head", "o_proj"))
    peftcore.wrap(model, "lora", rank=8)
    plain = {p: m for p, m in model.named_modules() if p.endswith("o_proj")}
    with torch.no_grad():
        for layer in plain.values():
            layer.lora_B["default"].fill_(0.5)
    report = init_from_quantization_error(model, original)
    assert not any(p.endswith("o_proj") for p in report)
    assert all(torch.all(layer.lora_B["default"] == 0.5) for layer in plain.values())
