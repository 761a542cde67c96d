"""PNG plots of a run: curves people would rather see than read."""
from __future__ import annotations

from pathlib import Path

from training.fileio import atomic_write_bytes
from training.rundir import read_metrics


def _save(fig, path: Path) -> Path:
    """Render to memory, then write atomically: a crash never leaves a half-written PNG."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


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
    written.append(_save(fig, run_dir / "curves.png"))

    layers = rows[-1].get("layers") or {}
    if layers:
        keys = [("weight_sparsity", "weight sparsity"), ("act_sparsity", "activation sparsity (saved)"),
                ("act_threshold", "activation Top-K threshold")]
        keys = [(k, t) for k, t in keys
                if any((r.get("layers") or {}).get(n, {}).get(k) is not None for r in rows for n in layers)]
        if keys:
            fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
            for ax, (key, title) in zip(axes[0], keys):
                for name in layers:
                    ys = [r.get("layers", {}).get(name, {}).get(key) for r in rows]
                    if any(y is not None for y in ys):
                        ax.plot(epochs, [float("nan") if y is None else y for y in ys], label=name)
                ax.set_title(title); ax.set_xlabel("epoch")
                ax.ticklabel_format(axis="y", useOffset=False)
                if key != "act_threshold":  # fractions: a fixed axis shows drift honestly
                    ax.set_ylim(0.0, 1.0)
            if len(layers) <= 12 and axes[0][-1].get_legend_handles_labels()[0]:
                axes[0][-1].legend(fontsize=7)
            fig.tight_layout()
            written.append(_save(fig, run_dir / "sparsity.png"))
    return written
