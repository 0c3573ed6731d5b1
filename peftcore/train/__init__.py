"""Fine-tuning helpers: data, the training loop, metrics, and the ``peftcore finetune`` job."""
