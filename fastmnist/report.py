"""What a saved model gets wrong: per-class accuracy, the confusion matrix, every mistake.

`fastmnist eval` prints per_class_table(); with --report DIR, write_report() adds report.json,
confusion.png and mistakes.png (drawn by fastmnist.plots; they need matplotlib, the `plot` extra).
Everything here works from the labels and the softmax probabilities of the one evaluation pass
eval already makes (fastmnist.evaluation).
"""
from pathlib import Path

import torch

from fastmnist.files import check_writable_folder, write_json_atomic
from fastmnist.plots import report_figures

CLASSES = 10


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
    return check_writable_folder(out, f"the report to --report {out}")


def write_report(out, summary: dict, images: torch.Tensor, log=print) -> list:
    """report.json, and confusion.png and mistakes.png where matplotlib is installed; returns the paths written."""
    out = prepare_report_dir(out)
    write_json_atomic(out / "report.json", summary)
    return [out / "report.json"] + report_figures(out, summary, images, log)
