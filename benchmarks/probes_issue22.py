"""Renders benchmarks/results/probes-issue22/README.md from the probe runs there (issue 22).

Each probe folder holds seedN/metrics.json (+ seedN.log): one row per probe, one
column per probe seed, so every figure in a column comes from the same seed.
bn-default-seed0/bn_probe.json (benchmarks/bn_probe.py of commit ce08912, retired when train.py was split: `git show ce08912:benchmarks/bn_probe.py`) gives the per-epoch
table of the BN-statistics candidates. --check fails when the README differs.

    python benchmarks/probes_issue22.py [--check]
"""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent / "results" / "probes-issue22"

HEADER = """# Issue 22's probes

Probe runs for issue 22 (a short default schedule, a tiny network under 5,000 parameters, the weight
average's BN statistics). Seeds 10-12 are probe seeds: seeds 0-4 are held out for the record. Rendered by
`python benchmarks/probes_issue22.py` from the runs in this folder; the runs are made by
`benchmarks/probes_issue22.sh` (one per probe and seed: `seedN/metrics.json`, `seedN.log`, `seedN.commit`).
Training times are not speed figures: these ran on a shared CPU.

The probes (`benchmarks/probes_issue22.sh` names each one's flags):
- `default-Nep`, `default-Nep-bn50`: the default network and recipe shortened to N epochs (the one-cycle
  schedule spans them), without and with `--bn-recompute-batches 50`. Per-epoch training cost is the
  default's, so N epochs cost N/8 of the 8-epoch default run of then.
- `tiny4k-bn50`, `tiny5k-bn50`: the layouts `tiny4k` (3,746 parameters) and `tiny5k` (4,610), tiny's two
  3x3 blocks before the transition, then three (four) depthwise-separable blocks of width 24 (a stock
  depthwise 3x3 conv, then a fused 1x1 Conv-ReLU-BN), under tiny's recipe (15 epochs) with the BN recompute.
- `tiny16a-bn50`, `tiny16b-bn50`: tiny5k with the transition widened to 16 channels, then separable blocks
  (16, 24, 24, 24) (`tiny16a`, 4,594 parameters) or (24, 24, 24, 16) (`tiny16b`, 4,714).
- `tiny-b64-bn50`, `tiny-b64-lr0.1-bn50`: `tiny16b` (tiny's layout then) at batch 64, peak rate 0.2 or 0.1.
- `tinyC-bn50`, `tinyD-bn50`: the second full-resolution block separable, the width moved after the transition:
  (8, sep 16) -> 16 -> sep (32, 32, 24, 16) (`tinyC`, 4,722) and (16, sep 16) -> 16 -> sep (32, 24, 24, 16)
  (`tinyD`, 4,474).

Seeds 0-4 of `tiny5k-bn50` and `tiny16b-bn50` are not probe seeds: they are the record's runs of `--model tiny`
while tiny had those layouts (commit in `seedN.commit`), set aside when they ended at 99.40-99.51% and
99.37-99.52%. What the probes chose (docs/recipe.md, "Issue 22"): `default-4ep-bn50` is `default`'s recipe
now, the BN recompute every model's, and `tinyD`'s layout is `tiny`'s; the other layouts are gone from
`fastmnist/model.py` (each run's commit names the code that had them).
"""


def bn_table(path: Path) -> str:
    probe = json.loads(path.read_text())
    names = [k for k in probe["curves"][0] if k != "epoch"]
    lines = [f"## BN statistics of the weight average ({probe['model']}, seed {probe['seed']}, one run)\n",
             "Test accuracy (%) after each epoch of one run (`benchmarks/bn_probe.py` of commit `ce08912`), the same weights scored "
             "with each candidate's BN statistics: `averaged` (today's: averaged like the weights), "
             "`recompute_N` (recomputed on N un-augmented training batches, `--bn-recompute-batches N`), "
             "`recompute_50_aug` (on augmented batches), `live` (the trained model's statistics), `raw` (the "
             "trained model, no average).\n",
             "| epoch | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for row in probe["curves"]:
        lines.append(f"| {row['epoch']} | " + " | ".join(f"{100 * row[n]:.2f}" for n in names) + " |")
    lines.append("| lowest after epoch 2 | " + " | ".join(
        f"{100 * min(r[n] for r in probe['curves'] if r['epoch'] > 2):.2f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


def probe_rows():
    rows, seeds = [], set()
    for probe in sorted(p for p in ROOT.iterdir() if p.is_dir() and list(p.glob("seed*/metrics.json"))):
        runs = {int(m.parent.name.removeprefix("seed")): json.loads(m.read_text())
                for m in probe.glob("seed*/metrics.json")}
        seeds |= set(runs)
        rows.append((probe.name, runs))
    return rows, sorted(seeds)


def probes_table() -> str:
    rows, seeds = probe_rows()
    if not rows:
        return "## Recipe and layout probes\n\nNone run yet: `benchmarks/probes_issue22.sh`.\n"
    lines = ["## Recipe and layout probes\n",
             "Final test accuracy (%) per probe seed; `min>2`: the lowest test accuracy after epoch 2 over the "
             "probe's seeds (the dip the BN recompute is for).\n",
             "| probe | model | parameters | epochs | BN recompute | " + " | ".join(f"seed {s}" for s in seeds)
             + " | lowest final | min>2 |", "|---" * (len(seeds) + 7) + "|"]
    for name, runs in rows:
        any_run = next(iter(runs.values()))
        cfg = any_run["config"]
        finals = [100 * r["final_test_acc"] for r in runs.values()]
        late = [100 * e["test_acc"] for r in runs.values() for e in r["epochs"] if e["epoch"] > 2]
        cells = [f"{100 * runs[s]['final_test_acc']:.2f}" if s in runs else "" for s in seeds]
        lines.append(f"| {name} | {cfg['model']} | {any_run['parameters']:,} | {cfg['epochs']} | "
                     f"{cfg.get('bn_recompute_batches') or 0} | " + " | ".join(cells)
                     + f" | {min(finals):.2f} | {min(late) if late else float('nan'):.2f} |")
    return "\n".join(lines) + "\n"


def render() -> str:
    parts = [HEADER, probes_table()]
    bn = ROOT / "bn-default-seed0" / "bn_probe.json"
    if bn.exists():
        parts.append(bn_table(bn))
    return "\n".join(parts)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="fail when README.md differs from the runs")
    text, readme = render(), ROOT / "README.md"
    if p.parse_args().check:
        if not readme.exists() or readme.read_text() != text:
            sys.exit(f"{readme} is stale: run python benchmarks/probes_issue22.py")
        print(f"{readme}: matches the runs")
        return
    readme.write_text(text)
    print(f"wrote {readme}")


if __name__ == "__main__":
    main()
