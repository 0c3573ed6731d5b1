"""Integrations with other libraries' training and saving machinery (see docs/integrations.md).

- :mod:`peftcore.integrations.transformers`: ``save_pretrained`` of a wrapped transformers model,
  and so every ``transformers.Trainer`` save and checkpoint, also writes the adapter.
"""
