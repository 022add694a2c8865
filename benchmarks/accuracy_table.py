"""Summarise the seed runs of benchmarks/accuracy_seeds.sh: a Markdown table
(seed, best epoch, final accuracy, minutes) and a plot of test accuracy per
epoch for every seed, written next to the runs.

    python benchmarks/accuracy_table.py [benchmarks/results/accuracy]
"""
import json
import sys
from pathlib import Path


def main(folder=Path(__file__).parent / "results" / "accuracy"):
    folder = Path(folder)
    runs = sorted(folder.glob("seed*/metrics.json"), key=lambda p: int(p.parent.name[4:]))
    if not runs:
        sys.exit(f"no seed*/metrics.json under {folder}; run benchmarks/accuracy_seeds.sh first")
    metrics = [json.loads(p.read_text()) for p in runs]
    lines = ["| seed | best epoch (acc.) | final accuracy (epoch {}) | minutes |".format(len(metrics[0]["epochs"])),
             "|---|---|---|---|"]
    for m in metrics:
        best = max(m["epochs"], key=lambda r: r["test_acc"])
        lines.append(f"| {m['config']['seed']} | {best['epoch']} ({100 * best['test_acc']:.2f}%) | "
                     f"{100 * m['final_test_acc']:.2f}% | {m['total_train_seconds'] / 60:.1f} |")
    finals = [100 * m["final_test_acc"] for m in metrics]
    lines.append(f"\nfinal accuracy: min {min(finals):.2f}%, mean {sum(finals) / len(finals):.2f}%, "
                 f"max {max(finals):.2f}% over {len(finals)} seeds; {metrics[0]['parameters']:,} parameters, "
                 f"impl {metrics[0]['model_kwargs']['impl']}, {metrics[0]['device_name']}, torch {metrics[0]['torch_version']}")
    table = "\n".join(lines)
    (folder / "table.md").write_text(table + "\n")
    print(table)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for m in metrics:
        ax.plot([r["epoch"] for r in m["epochs"]], [100 * r["test_acc"] for r in m["epochs"]], "o-", ms=3,
                label=f"seed {m['config']['seed']}")
    ax.axhline(99.4, color="gray", ls="--", lw=1, label="99.4% target")
    cfg = metrics[0]["config"]
    title = (f"{cfg['epochs']} epochs, dropout {cfg['dropout']}, impl {metrics[0]['model_kwargs']['impl']}, "
             f"{metrics[0]['device_name']}")
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", ylim=(98.5, 99.8), title=title)
    ax.legend(ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "seeds.png", dpi=100)


if __name__ == "__main__":
    main(*sys.argv[1:])
