"""PNG plots of a run: curves people would rather see than read."""
from __future__ import annotations

from pathlib import Path

from training.rundir import read_metrics


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write curves.png (loss, accuracy) and sparsity.png (per-layer sparsity, thresholds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        return []
    epochs = [r["epoch"] for r in rows]
    written = []

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [r["loss"] for r in rows], label="train")
    ax1.plot(epochs, [r["test_loss"] for r in rows], label="test")
    ax1.set_xlabel("epoch"); ax1.set_ylabel("cross-entropy"); ax1.legend(); ax1.set_title("loss")
    ax2.plot(epochs, [r["train_accuracy"] for r in rows], label="train")
    ax2.plot(epochs, [r["test_accuracy"] for r in rows], label="test")
    ax2.set_xlabel("epoch"); ax2.set_ylabel("top-1 accuracy"); ax2.legend(); ax2.set_title("accuracy")
    fig.tight_layout()
    p = run_dir / "curves.png"
    fig.savefig(p, dpi=100); plt.close(fig); written.append(p)

    layers = rows[-1].get("layers") or {}
    if layers:
        keys = [("weight_sparsity", "weight sparsity"), ("act_sparsity", "activation sparsity (saved)"),
                ("act_threshold", "activation Top-K threshold")]
        keys = [(k, t) for k, t in keys if any(k in v for v in layers.values())]
        if keys:
            fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
            for ax, (key, title) in zip(axes[0], keys):
                for name in layers:
                    ys = [r.get("layers", {}).get(name, {}).get(key) for r in rows]
                    if any(y is not None for y in ys):
                        ax.plot(epochs, [float("nan") if y is None else y for y in ys], label=name)
                ax.set_title(title); ax.set_xlabel("epoch")
            if len(layers) <= 12:
                axes[0][-1].legend(fontsize=7)
            fig.tight_layout()
            p = run_dir / "sparsity.png"
            fig.savefig(p, dpi=100); plt.close(fig); written.append(p)
    return written
