"""The PNG plots: written and non-trivial."""

from peftcore.train.plots import plot_comparison, plot_curves

HISTORY = [{"epoch": e, "train_loss": 1.5 / e, "val_loss": 1.4 / e, "val_accuracy": 0.3 + 0.2 * e, "val_macro_f1": 0.25 + 0.2 * e}
           for e in (1, 2, 3)]


def _is_png(path):
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_curves(tmp_path):
    path = plot_curves(HISTORY, tmp_path / "curves.png", title="t", step_losses=[1.6, 1.2, 1.0, 0.8, 0.7, 0.5],
                       before={"val_loss": 1.6, "val_accuracy": 0.2, "val_macro_f1": 0.1})
    assert _is_png(path)


def test_comparison(tmp_path):
    rows = [{"strategy": s, "accuracy": a, "macro_f1": a - 0.01, "accuracy_before": 0.2, "trainable": t, "median_step_s": 0.1,
             "peak_rss_mib": 900.0, "seconds": 30.0, "history": HISTORY} for s, a, t in (("lora", 0.97, 300_000), ("full", 0.95, 22_000_000))]
    assert _is_png(plot_comparison(rows, tmp_path / "compare.png", title="c"))
