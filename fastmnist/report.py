"""What a saved model gets wrong: per-class accuracy, the confusion matrix, every mistake.

`fastmnist eval` prints per_class_table(); with --report DIR, write_report() adds report.json,
confusion.png and mistakes.png (the PNGs need matplotlib, the `plot` extra). Everything here works
from the labels and the softmax probabilities of the one evaluation pass eval already makes.
"""
import math
import os
import tempfile
from pathlib import Path

import torch

from fastmnist.checkpoint import write_json_atomic

CLASSES = 10
MAX_MISTAKES_SHOWN = 400  # a 20 x 20 grid; more would be unreadable


class ReportError(Exception):
    """The --report folder cannot be created or written."""


def summarize(labels: torch.Tensor, probs: torch.Tensor) -> dict:
    """report.json's numbers: accuracy, per-class counts, confusion matrix (rows true, columns predicted), mistakes."""
    labels = labels.cpu().long()
    confidence, predicted = probs.max(1)
    confusion = torch.bincount(labels * CLASSES + predicted, minlength=CLASSES * CLASSES).view(CLASSES, CLASSES)
    wrong = (predicted != labels).nonzero().flatten()
    wrong = wrong[confidence[wrong].argsort(descending=True, stable=True)]  # the most confident mistakes first
    return {
        "test_size": len(labels),
        "correct": int(confusion.diag().sum()),
        "accuracy": confusion.diag().sum().item() / max(len(labels), 1),
        "per_class": [class_counts(confusion, digit) for digit in range(CLASSES)],
        "confusion": confusion.tolist(),
        "confusion_axes": "rows: true digit, columns: predicted digit",
        "mistakes": [{"index": int(i), "true": int(labels[i]), "predicted": int(predicted[i]),
                      "probability": round(float(confidence[i]), 4)} for i in wrong],
    }


def class_counts(confusion: torch.Tensor, digit: int) -> dict:
    row = confusion[digit].clone()
    correct, total = int(row[digit]), int(row.sum())
    row[digit] = -1  # so that argmax finds the most frequent wrong prediction
    top_wrong = int(row.argmax())
    return {"digit": digit, "correct": correct, "total": total,
            "accuracy": correct / total if total else None,
            "most_confused_with": top_wrong if row[top_wrong] > 0 else None,
            "most_confused_count": max(int(row[top_wrong]), 0)}


def per_class_table(summary: dict) -> str:
    lines = ["digit  correct/total  accuracy  most often predicted instead"]
    for c in summary["per_class"]:
        acc = f"{100 * c['accuracy']:7.2f}%" if c["total"] else "       -"
        confused = ("-" if c["most_confused_with"] is None
                    else f"{c['most_confused_with']} ({c['most_confused_count']}x)")
        lines.append(f"{c['digit']:>5}  {c['correct']:>7}/{c['total']:<5}  {acc}  {confused}")
    return "\n".join(lines)


def prepare_report_dir(out) -> Path:
    """Create the report folder and check it takes files, before the evaluation runs."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise ReportError(f"cannot write the report to --report {out}: {exc.strerror or exc}") from None
    return out


def write_report(out, summary: dict, images: torch.Tensor, log=print) -> list:
    """report.json, and confusion.png and mistakes.png where matplotlib is installed; returns the paths written."""
    out = prepare_report_dir(out)
    try:
        write_json_atomic(out / "report.json", summary)
        written = [out / "report.json"]
        try:
            import matplotlib

            matplotlib.use("Agg")
        except ImportError:
            log("fastmnist: confusion.png and mistakes.png skipped: pip install matplotlib (the `plot` extra)")
            return written
        save_figure(plot_confusion(summary["confusion"]), out / "confusion.png")
        save_figure(plot_mistakes(summary["mistakes"], images), out / "mistakes.png")
    except OSError as exc:
        raise ReportError(f"cannot write the report to --report {out}: {exc.strerror or exc}") from None
    return written + [out / "confusion.png", out / "mistakes.png"]


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_suffix(".tmp.png")  # renamed into place: never a half-written PNG
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def plot_confusion(confusion: list):
    """Counts on a log colour scale: the diagonal's ~1000 would otherwise wash out the errors' handful."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm

    counts = np.array(confusion)
    fig, ax = plt.subplots(figsize=(7, 6))
    image = ax.imshow(np.ma.masked_equal(counts, 0), cmap="viridis", norm=LogNorm(vmin=1, vmax=max(counts.max(), 2)))
    for (true, pred), n in np.ndenumerate(counts):
        if n:
            ax.text(pred, true, str(n), ha="center", va="center", fontsize=8,
                    color="black" if n > math.sqrt(counts.max()) else "white")
    ax.set(xticks=range(CLASSES), yticks=range(CLASSES), xlabel="predicted digit", ylabel="true digit",
           title=f"confusion matrix ({counts.trace()}/{counts.sum()} correct; log colour scale, blank = 0)")
    fig.colorbar(image, ax=ax, label="images")
    fig.tight_layout()
    return fig


def plot_mistakes(mistakes: list, images: torch.Tensor):
    """Every misclassified digit, most confident first, up to MAX_MISTAKES_SHOWN, in one montage."""
    import matplotlib.pyplot as plt

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
