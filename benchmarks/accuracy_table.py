"""Summarise recorded training runs as Markdown tables and a plot.

    python benchmarks/accuracy_table.py seeds    # benchmarks/results/seeds/<model>/seed<N>/ -> table.md, seeds.png
    python benchmarks/accuracy_table.py ablation # benchmarks/results/recipe/<variant>/seed<N>/ -> table.md

`seeds`: one table per model (seed, final accuracy, best epoch, minutes) with min / mean / standard deviation,
and test accuracy per epoch for every seed, one panel per model. `ablation`: one row per recipe variant
(the settings it changes from its model's recipe, the seeds run, mean and min final accuracy).
"""
import json
import statistics
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(Path(__file__).parent.parent))  # the checkout's recipes, also without an install
from fastmnist.recipes import RECIPES  # noqa: E402


def load_runs(folder: Path) -> list:
    runs = sorted(folder.glob("seed*/metrics.json"), key=lambda p: int(p.parent.name[4:]))
    return [json.loads(p.read_text()) for p in runs]


def pct(x):
    return f"{100 * x:.2f}%"


def seed_table(model: str, runs: list) -> str:
    cfg = runs[0]["config"]
    lines = [f"| seed | final accuracy (epoch {cfg['epochs']}) | best epoch (acc.) | minutes |", "|---|---|---|---|"]
    for m in runs:
        best = max(m["epochs"], key=lambda r: r["test_acc"])
        lines.append(f"| {m['config']['seed']} | {pct(m['final_test_acc'])} | {best['epoch']} ({pct(best['test_acc'])}) "
                     f"| {m['total_train_seconds'] / 60:.1f} |")
    finals = [100 * m["final_test_acc"] for m in runs]
    minutes = [m["total_train_seconds"] / 60 for m in runs]
    std = statistics.stdev(finals) if len(finals) > 1 else 0.0
    lines.append(f"\n`--model {model}`: final accuracy min {min(finals):.2f}%, mean {statistics.mean(finals):.2f}%, "
                 f"standard deviation {std:.3f} points over {len(finals)} seeds; {cfg['epochs']} epochs, "
                 f"{runs[0]['parameters']:,} parameters, {statistics.mean(minutes):.1f} minutes per run "
                 f"(training time, evaluation excluded) on {runs[0]['device_name']}, "
                 f"{runs[0]['threads']} threads, impl {runs[0]['model_kwargs']['impl']}, torch {runs[0]['torch_version']}")
    return "\n".join(lines)


def seeds(folder=RESULTS / "seeds"):
    folder = Path(folder)
    models = [(d.name, load_runs(d)) for d in sorted(folder.iterdir()) if d.is_dir()]
    models = [(name, runs) for name, runs in models if runs]
    if not models:
        sys.exit(f"no <model>/seed*/metrics.json under {folder}; run benchmarks/accuracy_seeds.sh first")
    order = {name: i for i, name in enumerate(RECIPES)}
    models.sort(key=lambda item: order.get(item[0], len(order)))
    text = "\n\n".join(f"### {name}\n\n{seed_table(name, runs)}" for name, runs in models)
    (folder / "table.md").write_text(text + "\n")
    print(text)
    plot_seeds(models, folder / "seeds.png")


def plot_seeds(models, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("seeds.png skipped: pip install matplotlib")
        return
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 4), sharey=True, squeeze=False)
    for ax, (name, runs) in zip(axes[0], models):
        for m in runs:
            ax.plot([r["epoch"] for r in m["epochs"]], [100 * r["test_acc"] for r in m["epochs"]], "o-", ms=3,
                    label=f"seed {m['config']['seed']}")
        ax.axhline(99.4, color="gray", ls="--", lw=1, label="99.4%")
        ax.set(xlabel="epoch", title=f"{name}: {runs[0]['parameters']:,} parameters", ylim=(98.6, 99.8))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


SETTINGS = tuple(RECIPES["default"])  # what a recipe sets, so what an ablation can have changed


def ablation(folder=RESULTS / "recipe"):
    folder = Path(folder)
    rows = []
    for d in sorted(folder.iterdir()):
        runs = load_runs(d) if d.is_dir() else []
        if not runs:
            continue
        cfg = runs[0]["config"]
        recipe = RECIPES.get(cfg["model"], RECIPES["default"])  # a probe's model name may have gone since
        changed = [f"{k} {cfg[k]}" for k in SETTINGS if k in cfg and cfg[k] != recipe.get(k)]
        changed.append(f"layout {runs[0].get('layout', '(not recorded)')}")
        finals = [100 * m["final_test_acc"] for m in runs]
        rows.append((cfg["model"], ", ".join(changed) or "the recipe", ", ".join(str(m["config"]["seed"]) for m in runs),
                     statistics.mean(finals), min(finals), d.name))
    lines = ["| model | changed from its recipe | seeds | mean final | min final | runs |", "|---|---|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d:.2f}% | {e:.2f}% | `{f}` |" for a, b, c, d, e, f in sorted(rows)]
    text = "\n".join(lines)
    (folder / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "seeds"
    {"seeds": seeds, "ablation": ablation}[what](*sys.argv[2:])
