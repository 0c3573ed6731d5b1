"""``transformers.Trainer`` on a wrapped model: ``save_model``, every checkpoint, resuming and the
best model all keep the adapter, in a directory that ``peftcore.load`` restores onto a fresh base."""

import copy
import pickle

import pytest
import torch

import peftcore
from peftcore.integrations.transformers import ADAPTER_DIR, ADAPTERS_DIR
from peftcore.testing import tiny_model

pytestmark = pytest.mark.slow  # each test trains a tiny model with Trainer for a few steps (about a second)

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}


# -- models and data -------------------------------------------------------------------------------
def gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def bert(seed: int = 0):
    return tiny_model("bert", seed=seed)


def wrapped(family: str):
    """A tiny base with a LoRA adapter (BERT also trains its classifier in full), as a user builds it."""
    model = gpt2() if family == "gpt2" else bert()
    trainable = ["classifier"] if family == "bert" else None
    torch.manual_seed(1)
    return peftcore.wrap(model, "lora", rank=4, dropout=0.1, trainable=trainable)


def fresh_base(family: str):
    return gpt2() if family == "gpt2" else bert()


def dataset(family: str, n: int = 16, length: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    vocab = 100 if family == "gpt2" else 128
    rows = []
    for _ in range(n):
        ids = torch.randint(1, vocab, (length,), generator=g)
        labels = ids.clone() if family == "gpt2" else ids[0] % 3
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return rows


def probe() -> dict:
    """A fixed batch of GPT-2/BERT-sized token ids to compare logits on."""
    ids = torch.randint(1, 100, (2, 8), generator=torch.Generator().manual_seed(5))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits(model, inputs) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


def trainer(model, family, out, *, max_steps=4, save_steps=2, **extra):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to=[], max_steps=max_steps, save_steps=save_steps,
                             per_device_train_batch_size=4, learning_rate=5e-2, seed=0, disable_tqdm=True, logging_steps=1,
                             dataloader_num_workers=0, **extra)
    return Trainer(model=model, args=args, train_dataset=dataset(family), eval_dataset=dataset(family, 8))


def restored(family, path):
    return peftcore.load(fresh_base(family), path)


def assert_same_logits(a, b, inputs):
    assert (logits(a, inputs) - logits(b, inputs)).abs().max().item() <= 1e-5


# -- save_model and checkpoints -----------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_save_model_writes_an_adapter_that_restores_the_trained_logits(family, tmp_path):
    model = wrapped(family)
    t = trainer(model, family, tmp_path / "run", save_strategy="no")
    t.train()
    t.save_model(str(tmp_path / "final"))

    adapter = tmp_path / "final" / ADAPTER_DIR
    assert ADAPTER_FILES <= {p.name for p in adapter.iterdir()}
    inputs = probe()
    assert (logits(model, inputs) - logits(fresh_base(family), inputs)).abs().max().item() > 1e-2  # the adapter matters
    assert_same_logits(restored(family, adapter), model, inputs)


def test_every_checkpoint_holds_the_adapter_of_its_step(tmp_path):
    model = wrapped("gpt2")
    seen = {}

    from transformers import TrainerCallback

    class Record(TrainerCallback):
        def on_save(self, args, state, control, model=None, **kwargs):
            seen[state.global_step] = logits(model, probe())
            model.train()

    t = trainer(model, "gpt2", tmp_path, max_steps=4, save_steps=2)
    t.add_callback(Record())
    t.train()

    assert sorted(seen) == [2, 4]
    for step, expected in seen.items():
        adapter = tmp_path / f"checkpoint-{step}" / ADAPTER_DIR
        assert ADAPTER_FILES <= {p.name for p in adapter.iterdir()}
        got = logits(restored("gpt2", adapter), probe())
        assert (got - expected).abs().max().item() <= 1e-5
    assert (seen[2] - seen[4]).abs().max().item() > 1e-3  # two different adapters, each in its own checkpoint


# -- resume and best model -----------------------------------------------------------------------
def lora_tensors(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_resume_from_checkpoint_ends_with_the_adapter_of_the_uninterrupted_run(tmp_path):
    through = wrapped("gpt2")
    trainer(through, "gpt2", tmp_path / "through", max_steps=6, save_steps=3).train()

    resumed = wrapped("gpt2")  # a fresh base, wrapped the same way: the user's script run again
    torch.manual_seed(123)  # the resumed run must not depend on where the global RNG happens to be
    trainer(resumed, "gpt2", tmp_path / "resumed", max_steps=6, save_steps=3).train(
        resume_from_checkpoint=str(tmp_path / "through" / "checkpoint-3"))

    want, got = lora_tensors(through), lora_tensors(resumed)
    assert want.keys() == got.keys() and want
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
    assert_same_logits(restored("gpt2", tmp_path / "resumed" / "checkpoint-6" / ADAPTER_DIR), through, probe())


def test_load_best_model_at_end_restores_the_best_checkpoints_adapter(tmp_path):
    scores = iter([1.0, 0.0])  # the first evaluation (step 2) is the best one

    def compute_metrics(prediction):
        return {"score": next(scores)}

    model = wrapped("gpt2")
    t = trainer(model, "gpt2", tmp_path, max_steps=4, save_steps=2, eval_strategy="steps", eval_steps=2,
                load_best_model_at_end=True, metric_for_best_model="score", greater_is_better=True)
    t.compute_metrics = compute_metrics
    t.train()

    assert t.state.best_model_checkpoint == str(tmp_path / "checkpoint-2")
    inputs = probe()
    assert_same_logits(restored("gpt2", tmp_path / "checkpoint-2" / ADAPTER_DIR), model, inputs)
    last = logits(restored("gpt2", tmp_path / "checkpoint-4" / ADAPTER_DIR), inputs)
    assert (last - logits(model, inputs)).abs().max().item() > 1e-3
    t.save_model(str(tmp_path / "best"))
    assert_same_logits(restored("gpt2", tmp_path / "best" / ADAPTER_DIR), model, inputs)


# -- save_pretrained of a wrapped model ---------------------------------------------------------------
def nudge(model, seed: int = 3):
    """Adds seeded noise to every trainable (adapter) parameter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def trained(family: str = "gpt2"):
    """A wrapped model whose adapter is not at its zero initialisation."""
    model = wrapped(family)
    nudge(model)
    return model


def test_from_pretrained_alone_gives_the_base_and_the_adapter_is_beside_it(tmp_path):
    """The path that lost the adapter silently: ``save_pretrained`` then ``from_pretrained``. The
    directory now holds the adapter; ``from_pretrained`` reads the base model from it (as documented),
    and ``peftcore.load`` adds the adapter back."""
    from transformers import GPT2LMHeadModel

    model, inputs = trained(), probe()
    model.save_pretrained(tmp_path)
    assert ADAPTER_FILES <= {p.name for p in (tmp_path / ADAPTER_DIR).iterdir()}

    base = GPT2LMHeadModel.from_pretrained(tmp_path)
    assert_same_logits(base, fresh_base("gpt2"), inputs)
    assert_same_logits(peftcore.load(base, tmp_path / ADAPTER_DIR), model, inputs)


def test_several_adapters_each_get_a_directory(tmp_path):
    model = trained()
    peftcore.wrap(model, "lora", name="second", rank=2)
    model.save_pretrained(tmp_path)

    assert not (tmp_path / ADAPTER_DIR).exists()
    assert sorted(p.name for p in (tmp_path / ADAPTERS_DIR).iterdir()) == ["default", "second"]
    peftcore.activate(model, "default")
    assert_same_logits(restored("gpt2", tmp_path / ADAPTERS_DIR / "default"), model, probe())


def test_saving_a_second_time_replaces_the_adapter(tmp_path):
    model = trained()
    model.save_pretrained(tmp_path)
    nudge(model, seed=4)
    model.save_pretrained(tmp_path)
    assert_same_logits(restored("gpt2", tmp_path / ADAPTER_DIR), model, probe())


def test_a_foreign_adapter_directory_is_an_error_before_anything_is_written(tmp_path):
    (tmp_path / ADAPTER_DIR).mkdir()
    (tmp_path / ADAPTER_DIR / "notes.txt").write_text("mine")
    with pytest.raises(peftcore.CheckpointError, match="save_pretrained .* writes it to .*adapter'"):
        trained().save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ADAPTER_DIR]
    assert (tmp_path / ADAPTER_DIR / "notes.txt").read_text() == "mine"


def test_only_the_main_process_writes_the_adapter(tmp_path):
    trained().save_pretrained(tmp_path, is_main_process=False)
    assert not (tmp_path / ADAPTER_DIR).exists()


def test_copies_save_their_own_adapter(tmp_path):
    model, inputs = trained(), probe()
    for i, copied in enumerate([copy.deepcopy(model), pickle.loads(pickle.dumps(model))]):
        nudge(copied, seed=4 + i)
        copied.save_pretrained(tmp_path / str(i))
        assert_same_logits(restored("gpt2", tmp_path / str(i) / ADAPTER_DIR), copied, inputs)
        assert (logits(copied, inputs) - logits(model, inputs)).abs().max().item() > 1e-3


def test_loaded_adapters_are_saved_too(tmp_path):
    source = trained()
    peftcore.save(source, tmp_path / "saved")
    model = peftcore.load(fresh_base("gpt2"), tmp_path / "saved")
    model.save_pretrained(tmp_path / "again")
    assert_same_logits(restored("gpt2", tmp_path / "again" / ADAPTER_DIR), source, probe())


def test_unwrap_gives_back_the_plain_save_pretrained(tmp_path):
    model = trained()
    peftcore.unwrap(model)
    assert "save_pretrained" not in model.__dict__
    model.save_pretrained(tmp_path)
    assert not (tmp_path / ADAPTER_DIR).exists()


def test_a_failed_wrap_leaves_save_pretrained_alone():
    model = gpt2()
    with pytest.raises(peftcore.ConfigError):
        peftcore.wrap(model, "lora", rank=0)
    with pytest.raises(peftcore.TargetError):
        peftcore.wrap(model, "lora", targets=["no_such_module"])
    assert "save_pretrained" not in model.__dict__


def test_plain_modules_are_left_alone():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    peftcore.wrap(model, "lora", rank=2)
    assert "save_pretrained" not in model.__dict__
