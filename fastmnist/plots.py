"""Every figure fastmnist draws: a run's training curves, and eval's confusion matrix and mistakes.

matplotlib is optional (the `plot` extra): without it a figure is skipped with
one logged line. Each PNG is rendered in memory and written atomically
(fastmnist.files), so it is never half-written and never shares a temporary
name with another process.
"""
import io
import math
from pathlib import Path

import torch

from fastmnist.files import write_atomic

MAX_MISTAKES_SHOWN = 400  # a 20 x 20 grid; more would be unreadable


def pyplot(skipped: str, log):
    """matplotlib.pyplot on the file-only Agg backend, or None after logging that `skipped` was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"fastmnist: {skipped} skipped: pip install matplotlib (the `plot` extra)")
        return None
    return plt


def save_figure(plt, fig, path) -> None:
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=100)
    finally:
        plt.close(fig)
    write_atomic(path, buffer.getvalue())


def plot_curves(history, path, log=print) -> bool:
    """curves.png: loss and accuracy per epoch; False (said in one line) where matplotlib is missing."""
    plt = pyplot(Path(path).name, log)
    if plt is None:
        return False
    epochs = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    ax1.plot(epochs, [r["test_loss"] for r in history], "o-", label="test")
    ax1.set(xlabel="epoch", ylabel="cross-entropy", title="loss", yscale="log")
    ax1.legend()
    ax2.plot(epochs, [100 * r["train_acc"] for r in history], "o-", label="train (augmented)")
    ax2.plot(epochs, [100 * r["test_acc"] for r in history], "o-", label="test")
    ax2.axhline(99.4, color="gray", ls="--", lw=1, label="99.4% target")
    ax2.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy", ylim=(97, 100))
    ax2.legend()
    fig.tight_layout()
    save_figure(plt, fig, path)
    return True


def report_figures(out: Path, summary: dict, images: torch.Tensor, log=print) -> list:
    """confusion.png and mistakes.png in out; the paths written (none where matplotlib is missing)."""
    plt = pyplot("confusion.png and mistakes.png", log)
    if plt is None:
        return []
    save_figure(plt, plot_confusion(plt, summary["confusion"]), out / "confusion.png")
    save_figure(plt, plot_mistakes(plt, summary["mistakes"], images), out / "mistakes.png")
    return [out / "confusion.png", out / "mistakes.png"]


def plot_confusion(plt, confusion: list):
    """Counts on a log colour scale: the diagonal's ~1000 would otherwise wash out the errors' handful."""
    import numpy as np
    from matplotlib.colors import LogNorm

    counts = np.array(confusion)
    fig, ax = plt.subplots(figsize=(7, 6))
    image = ax.imshow(np.ma.masked_equal(counts, 0), cmap="viridis", norm=LogNorm(vmin=1, vmax=max(counts.max(), 2)))
    for (true, pred), n in np.ndenumerate(counts):
        if n:
            ax.text(pred, true, str(n), ha="center", va="center", fontsize=8,
                    color="black" if n > math.sqrt(counts.max()) else "white")
    ax.set(xticks=range(len(counts)), yticks=range(len(counts)), xlabel="predicted digit", ylabel="true digit",
           title=f"confusion matrix ({counts.trace()}/{counts.sum()} correct; log colour scale, blank = 0)")
    fig.colorbar(image, ax=ax, label="images")
    fig.tight_layout()
    return fig


def plot_mistakes(plt, mistakes: list, images: torch.Tensor):
    """Every misclassified digit, most confident first, up to MAX_MISTAKES_SHOWN, in one montage."""
    shown = mistakes[:MAX_MISTAKES_SHOWN]
    cols = max(1, min(20, math.ceil(math.sqrt(len(shown)))))
    rows = max(1, math.ceil(len(shown) / cols))
    cell = 40  # 28 pixels of digit, 12 for its title
    montage = torch.zeros(rows * cell, cols * cell, dtype=torch.uint8)
    fig, ax = plt.subplots(figsize=(1.1 * cols + 0.4, 1.25 * rows + 0.6))
    for k, m in enumerate(shown):
        r, c = divmod(k, cols)
        montage[r * cell + 12 : r * cell + 40, c * cell + 6 : c * cell + 34] = images[m["index"]]
        ax.text(c * cell + 20, r * cell + 10, f"{m['true']} -> {m['predicted']} (p={m['probability']:.2f})",
                ha="center", va="bottom", fontsize=6.5, color="white")
    ax.imshow(montage.numpy(), cmap="gray", vmin=0, vmax=255)
    ax.set_axis_off()
    left_out = len(mistakes) - len(shown)
    ax.set_title(f"{len(mistakes)} misclassified test digits, most confident first (true -> predicted)"
                 + (f"; {left_out} more not shown" if left_out else ""), fontsize=9)
    fig.tight_layout()
    return fig
