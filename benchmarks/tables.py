"""Render every results table of README.md and docs/ from the JSON records under benchmarks/results/.

    python benchmarks/tables.py           # rewrite each table in place
    python benchmarks/tables.py --check   # change nothing; print a diff and exit 1 where a table differs
    python benchmarks/tables.py --plot    # also draw results/seeds/seeds.png (needs matplotlib)

A table lives in a Markdown file between `<!-- table:NAME -->` and `<!-- /table -->`, NAME being a key of
TABLES; the text between the markers is this script's and nothing else's. tests/test_docs.py runs the
check, so a figure typed by hand, or a record changed without rerunning this script, fails the tests.

Pure file reads (json, no torch): the records say which commit, CPU model and thread count they measured,
and every figure rendered here carries that provenance beside it.
"""
import difflib
import functools
import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MODELS = ("default", "reference", "tiny")  # the order every table lists them in

# Which records are the headline: the speed runs on today's CPU kernels, and the seed sets. A new run
# replaces these names; the figures follow.
HEADLINE_SPEED = ("epoch_time-cpu-20261130-125817.json", "epoch_time-cpu-20261130-125843.json")
SEEDS = "seeds"  # seeds/<model>/seed<N>/metrics.json: each model's recipe, seeds 0-4, today's code
PREVIOUS_SEEDS = "seeds_3e9ba15"  # the recipes before issue 22 (default 8 epochs, averaged BN statistics, tiny 7,506)
EARLIER_SEEDS = "seeds_892c5d8"  # those recipes on the kernels the recipe/ ablations ran on
EARLIER_SETS = (PREVIOUS_SEEDS, EARLIER_SEEDS)
ABLATION_BASELINE = {"recipe": EARLIER_SEEDS}  # folder -> the seed set that ran on the same code
# Issue 22's ablation, seed-matched on seeds 0-4: (model, folder of seed<N>/ runs, what the row changes).
# Each step adds one change to the row before it; the last row of each model is its recipe's seed set.
ISSUE22_ABLATION = (
    ("default", f"{PREVIOUS_SEEDS}/default", "the recipe before issue 22: 8 epochs, BN statistics averaged"),
    ("default", "ablation-issue22/default-8ep", "the same on today's code"),
    ("default", "ablation-issue22/default-4ep", "4 epochs (the one-cycle schedule spans them)"),
    ("default", f"{SEEDS}/default", "BN statistics recomputed on 50 training batches: **the recipe**"),
    ("reference", f"{PREVIOUS_SEEDS}/reference", "the recipe before issue 22: BN statistics averaged"),
    ("reference", f"{SEEDS}/reference", "BN statistics recomputed: **the recipe**"),
    ("tiny", f"{PREVIOUS_SEEDS}/tiny", "the recipe before issue 22: 3x3 blocks, BN statistics averaged"),
    ("tiny", "ablation-issue22/tiny-avgbn", "the separable layout: 16, sep 16 -> 16 -> sep 32, 24, 24, 16"),
    ("tiny", f"{SEEDS}/tiny", "BN statistics recomputed: **the recipe**"),
)
ABLATION_FOLDERS = ("recipe/*", "accuracy", "accuracy_reference_15ep_dropout0.05",
                    "accuracy_reference_18ep_dropout0", "accuracy_fused_pool", "recipe_probe")
DIP_POINTS = 0.5  # a fall of test accuracy from one epoch to the next larger than this is a dip


# ---------------------------------------------------------------- reading the records

@functools.lru_cache(maxsize=None)
def _legacy() -> dict:
    return json.loads((RESULTS / "legacy_fields.json").read_text())  # read once, not once per run loaded


def legacy_fields() -> dict:
    """Facts that older metrics.json files predate (model name, layout, no weight average yet)."""
    return _legacy()["folders"]


def absent_settings() -> dict:
    """The value each newer setting had in the runs that predate it (no BN recompute, ...)."""
    return _legacy()["absent_settings"]


def load_run(path: Path) -> dict:
    run = json.loads(path.read_text())
    folder = path.parent.parent.relative_to(RESULTS).as_posix()
    fill = legacy_fields().get(folder, {})
    run["config"] = {**absent_settings(), **run["config"], **fill.get("config", {})}
    run["layout"] = run.get("layout") or fill.get("layout")
    run["folder"] = folder
    return run


def load_runs(folder: Path) -> list:
    runs = [load_run(p) for p in folder.glob("seed*/metrics.json")]
    return sorted(runs, key=lambda r: r["config"]["seed"])


def seed_set(name: str) -> dict:
    """{model: [runs, by seed]} of a seed set folder."""
    return {m: load_runs(RESULTS / name / m) for m in MODELS if (RESULTS / name / m).is_dir()}


def speed_record(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def variant(record: dict, prefix: str):
    return next((r for r in record["results"] if r["variant"].startswith(prefix)), None)


# ---------------------------------------------------------------- formatting

def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def span(values, fmt) -> str:
    lo, hi = fmt(min(values)), fmt(max(values))
    return lo if lo == hi else f"{lo}–{hi}"


def seeds_text(runs) -> str:
    """'0–4' for a run of consecutive seeds, else '1, 3'."""
    seeds = [r["config"]["seed"] for r in runs]
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}–{seeds[-1]}"
    return ", ".join(map(str, seeds))


def table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine(run: dict) -> str:
    name = run["device_name"]
    name = "CPU model not recorded" if name in ("cpu", "x86_64") else name  # records before the CPU model was read
    return f"{name}, {run['threads']} threads, torch {run['torch_version'].split('+')[0]}"


def speed_machine(meta: dict) -> str:
    cpu = meta.get("cpu_model") or meta["device_name"]
    cpu = "CPU model not recorded" if cpu == "x86_64" else cpu
    return (f"{cpu}, {meta['cpu_count']} cores, {meta['torch_threads']} threads, ATen {meta['cpu_capability']}, "
            f"torch {meta['torch'].split('+')[0]}")


def commit(meta: dict) -> str:
    c = meta.get("git_commit")
    return f"`{c[:7]}`" + (" + uncommitted edits" if c.endswith("-dirty") else "") if c else "not recorded"


def block_text(spec) -> str:
    """A block of a layout as the records hold it: a width (a 3x3 block) or ["separable", width]."""
    return str(spec) if isinstance(spec, int) else f"sep {spec[1]}"


def layout_text(layout) -> str:
    before, transition, after = layout
    return f"(({', '.join(map(block_text, before))}), {transition}, ({', '.join(map(block_text, after))}))"


def finals(runs) -> list:
    return [r["final_test_acc"] for r in runs]


def seconds(run) -> float:
    """Training time of a run: its epochs' training summed, evaluation and the BN recompute excluded."""
    return run["total_train_seconds"]


def lowest_after(runs, epoch=2) -> float:
    """The lowest test accuracy after `epoch` over the runs' epochs (a dip shows here)."""
    return min(e["test_acc"] for r in runs for e in r["epochs"] if e["epoch"] > epoch)


# ---------------------------------------------------------------- the network, from a run's layout

def network_facts(layout) -> dict:
    """Pixel sizes, forward multiply-adds and receptive field of a layout (3x3 blocks without padding,
    a 1x1 transition then AvgPool2d(2), 3x3 blocks, a 1x1 head to 10 classes, global average pool)."""
    before, transition, after = layout
    size, channels, macs, field, jump = 28, 1, 0, 1, 1
    sizes = [size]

    def block(spec):  # 3x3 (or depthwise 3x3 then 1x1): trims 2 pixels, widens the field by 2 steps
        nonlocal size, channels, macs, field
        size -= 2
        if isinstance(spec, int):
            macs += size * size * channels * spec * 9
        else:
            spec = spec[1]
            macs += size * size * channels * (9 + spec)
        channels, field = spec, field + 2 * jump

    for spec in before:
        block(spec)
    sizes.append(size)
    macs += size * size * channels * transition
    size, channels, field, jump = size // 2, transition, field + jump, jump * 2
    sizes.append(size)
    for spec in after:
        block(spec)
    sizes.append(size)
    macs += size * size * channels * 10
    return {"sizes": sizes, "macs": macs, "field": field, "last": channels}


def render_network() -> str:
    runs = {m: rs[0] for m, rs in seed_set(SEEDS).items()}
    facts = {m: network_facts(r["layout"]) for m, r in runs.items()}
    rows = [
        ["3x3 blocks before the transition (sep: depthwise-separable)"] + [
            f"{', '.join(map(block_text, runs[m]['layout'][0]))} ({f['sizes'][0]} → {f['sizes'][1]} px)" for m, f in facts.items()],
        ["transition (1x1 conv, AvgPool2d 2)"] + [
            f"→ {runs[m]['layout'][1]}, {f['sizes'][2]} px" for m, f in facts.items()],
        ["3x3 blocks after it"] + [
            f"{', '.join(map(block_text, runs[m]['layout'][2]))} ({f['sizes'][2]} → {f['sizes'][3]} px)" for m, f in facts.items()],
        ["head (1x1 conv → 10, global average pool)"] + [f"{f['last']} → 10" for f in facts.values()],
        ["parameters"] + [f"**{runs[m]['parameters']:,}**" for m in facts],
        ["multiply-adds per image (forward)"] + [f"{f['macs'] / 1e6:.1f} M" for f in facts.values()],
        ["field seen by a pixel of the last block"] + [f"{f['field']} px" for f in facts.values()],
    ]
    header = [""] + [f"`{m}`" + (" (the assignment's)" if m == "reference" else "") for m in facts]
    return table(header, rows)


def render_recipe() -> str:
    """Each model's recipe as its seed runs recorded it (the defaults of `fastmnist train --model NAME`)."""
    cfg = {m: runs[0]["config"] for m, runs in seed_set(SEEDS).items()}
    settings = [("epochs", "epochs"), ("batch_size", "batch"), ("lr", "peak learning rate (one cycle)"),
                ("pct_start", "share of the run warming up"), ("momentum", "Nesterov momentum"),
                ("weight_decay", "weight decay"), ("dropout", "dropout"), ("label_smoothing", "label smoothing"),
                ("ema_decay", "weight average: decay per step"),
                ("bn_recompute_batches", "BN statistics of the average: recomputed on N training batches"),
                ("augment", "augmentation")]
    def shown(key, value):
        if isinstance(value, bool):
            return "on" if value else "off"
        return f"**{value}**" if key == "epochs" else "0 (off)" if value == 0 else str(value)

    rows = [[label] + [shown(key, c[key]) for c in cfg.values()] for key, label in settings]
    return table(["setting"] + [f"`{m}`" for m in cfg], rows)


# ---------------------------------------------------------------- accuracy

TRAIN_LOG = f"{SEEDS}/default/seed0.log"  # README's example of `fastmnist train`: a recorded run, not a retyped one


def render_train_log() -> str:
    return "```\n" + (RESULTS / TRAIN_LOG).read_text().rstrip("\n") + "\n```"


def render_example(*names, last_line_only=()) -> str:
    """Commands' recorded output (benchmarks/examples.sh writes each as "$ command" then what it printed)."""
    shown = []
    for name in names:
        lines = (RESULTS / "examples" / name).read_text().rstrip("\n").splitlines()
        shown += [lines[0], lines[-1]] if name in last_line_only else lines
    return "```\n" + "\n".join(shown) + "\n```"


def render_summary() -> str:
    """README's one table: each model's recipe over seeds, and the default model's training step."""
    sets = seed_set(SEEDS)
    speed = [speed_record(n) for n in HEADLINE_SPEED]
    ratios = [variant(s, "fused")["ratio_to_stock_eager"] for s in speed]
    meta = speed[0]["meta"]
    speed_cpu = meta.get("cpu_model") or meta["device_name"]
    rows = []
    for model, runs in sets.items():
        acc = finals(runs)
        where = machine(runs[0]).rsplit(", torch", 1)[0]
        step = "not timed"
        if model == "default":
            step = f"**{span(ratios, lambda r: f'{r:.2f}')}x**"
            if not where.startswith(speed_cpu):
                where += f"; step: {speed_cpu}, {meta['torch_threads']} threads"
        rows.append([f"`{model}`", f"{runs[0]['parameters']:,}", runs[0]["config"]["epochs"],
                     f"**{pct(min(acc))}** / {pct(statistics.mean(acc))}",
                     f"**{max(map(seconds, runs)):.0f}** / {statistics.mean(map(seconds, runs)):.0f}", step, where])
    seeds = seeds_text(sets["default"])
    header = ["model", "parameters", "epochs", f"final test accuracy, seeds {seeds}: min / mean",
              "seconds of training: max / mean",
              "training step, fused / stock eager", "measured on"]
    run0 = sets["default"][0]
    note = (f"\nAccuracy and seconds: `fastmnist train --model MODEL --seed N`, fused CPU operator, torch "
            f"{run0['torch_version'].split('+')[0]} ([records](benchmarks/results/{SEEDS}/)). Training step: the "
            f"default model, batch {meta['batch_size']}, median step of {len(speed)} runs on "
            f"{speed_machine(meta)}, kernel path `{meta['fused_cpu_kernel_path']}`, commit {commit(meta)} "
            f"([method and history](docs/speed.md)).")
    return table(header, rows) + "\n" + note


def render_seeds(model: str, folder: str = SEEDS) -> str:
    runs = seed_set(folder)[model]
    rows = []
    for r in runs:
        best = max(r["epochs"], key=lambda e: e["test_acc"])
        rows.append([r["config"]["seed"], pct(r["final_test_acc"]), f"{best['epoch']} ({pct(best['test_acc'])})",
                     pct(lowest_after([r])), f"{seconds(r):.1f}"])
    acc = [100 * a for a in finals(runs)]
    header = ["seed", f"final accuracy (epoch {runs[0]['config']['epochs']})", "best epoch (acc.)",
              "lowest after epoch 2", "seconds of training"]
    note = (f"\n`--model {model}`: final accuracy min {min(acc):.2f}%, mean {statistics.mean(acc):.2f}%, "
            f"standard deviation {statistics.stdev(acc):.3f} points over {len(acc)} seeds; "
            f"{runs[0]['config']['epochs']} epochs, {runs[0]['parameters']:,} parameters, "
            f"{statistics.mean(map(seconds, runs)):.0f} s of training per run (max {max(map(seconds, runs)):.0f} s) "
            f"on {machine(runs[0])}, impl {runs[0]['model_kwargs']['impl']}; records "
            f"`benchmarks/results/{folder}/{model}/`.")
    return table(header, rows) + "\n" + note


def render_earlier_seeds() -> str:
    rows = []
    for folder in EARLIER_SETS:
        for model, runs in seed_set(folder).items():
            acc, cfg = finals(runs), runs[0]["config"]
            rows.append([f"`{model}`", f"{runs[0]['parameters']:,}", cfg["epochs"],
                         "recomputed" if cfg["bn_recompute_batches"] else "averaged", seeds_text(runs),
                         pct(min(acc)), pct(statistics.mean(acc)), machine(runs[0]), f"`{folder}/{model}/`"])
    return table(["model", "parameters", "epochs", "BN statistics", "seeds", "min final", "mean final", "machine",
                  "records"], rows)


def render_dips() -> str:
    rows = []
    for folder in (SEEDS, *EARLIER_SETS):
        for model, runs in seed_set(folder).items():
            for r in runs:
                ep = r["epochs"]
                for before, at in zip(ep, ep[1:]):
                    if 100 * (before["test_acc"] - at["test_acc"]) > DIP_POINTS:
                        after = ep[at["epoch"]] if at["epoch"] < len(ep) else None
                        rows.append([f"`{folder}/`", f"`{model}`", r["config"]["seed"], at["epoch"],
                                     f"{pct(before['test_acc'])} → **{pct(at['test_acc'])}**"
                                     + (f" → {pct(after['test_acc'])}" if after else ""),
                                     f"{before['train_loss']:.4f} → {at['train_loss']:.4f}",
                                     f"{r['config']['epochs']} ({pct(r['final_test_acc'])})"])
    header = ["seed set", "model", "seed", "epoch", "test accuracy: epoch before → this → next",
              "training loss: before → this", "epochs (final)"]
    return table(header, rows)


def render_ema_early() -> str:
    """The weight average's effect on every epoch but the last: default seed 3, same code, with and without."""
    with_ema, without = (load_runs(RESULTS / "recipe" / name)[-1] for name in ("default_ls0", "default_ema0"))
    assert with_ema["config"]["seed"] == without["config"]["seed"]
    rows = [[a["epoch"], pct(a["test_acc"]), pct(b["test_acc"])] for a, b in zip(with_ema["epochs"], without["epochs"])]
    note = (f"\n`--model default --seed {with_ema['config']['seed']}`, records `recipe/default_ls0/` (the recipe) "
            f"and `recipe/default_ema0/` (`--ema-decay 0`), on {machine(with_ema)}.")
    return table(["epoch", "test accuracy, weight average (the recipe)", "without it"], rows) + "\n" + note


SETTINGS = ("layout", "epochs", "dropout", "label_smoothing", "ema_decay", "lr", "weight_decay", "pct_start",
            "batch_size", "momentum", "augment")


def differences(run: dict, recipe: dict) -> str:
    """The settings of a run that differ from its model's recipe, in words."""
    said = []
    for key in SETTINGS:
        ours = run["layout"] if key == "layout" else run["config"].get(key)
        theirs = recipe["layout"] if key == "layout" else recipe["config"].get(key)
        if ours == theirs or ours is None:
            continue
        if key == "layout":
            said.append(f"layout `{layout_text(ours)}`")
        elif key == "ema_decay" and ours == 0:
            said.append("no weight average")
        elif key == "epochs":
            said.append(f"{ours} epochs")
        else:
            said.append(f"{key.replace('_', ' ')} {ours}")
    return ", ".join(said)


def accuracies(runs) -> str:
    if len(runs) <= 2:
        return ", ".join(pct(a) for a in finals(runs))
    return f"mean {pct(statistics.mean(finals(runs)))}, min {pct(min(finals(runs)))}"


def ablation_folders():
    for pattern in ABLATION_FOLDERS:
        for folder in sorted(RESULTS.glob(pattern)):
            if folder.is_dir() and any(folder.glob("seed*/metrics.json")):
                yield folder


def render_ablation() -> str:
    """The variants tried before issue 22, each against the recipes of that time (EARLIER_SEEDS)."""
    recipes = {m: runs[0] for m, runs in seed_set(EARLIER_SEEDS).items()}
    rows, machines = {m: [] for m in MODELS}, {}
    for label, folder in ((f"nothing: the recipe of then, kernels of `{EARLIER_SEEDS[-7:]}`", EARLIER_SEEDS),):
        for model, runs in seed_set(folder).items():
            rows[model].append([f"`{model}`", label, seeds_text(runs),
                                accuracies(runs), "", f"`{folder}/{model}/`"])
    for folder in ablation_folders():
        runs = load_runs(folder)
        model = runs[0]["config"]["model"]
        for r in runs:
            machines.setdefault(machine(r), set()).add(folder.relative_to(RESULTS).parts[0])
        group = folder.relative_to(RESULTS).parts[0]
        same_code = ABLATION_BASELINE.get(group)
        baseline = ""
        if same_code:
            by_seed = {r["config"]["seed"]: r for r in seed_set(same_code)[model]}
            baseline = accuracies([by_seed[r["config"]["seed"]] for r in runs])
        rows[model].append([f"`{model}`", differences(runs[0], recipes[model]) or "nothing (a probe run of the recipe)",
                            seeds_text(runs), accuracies(runs), baseline,
                            f"`{folder.relative_to(RESULTS).as_posix()}/`"])
    header = ["model", "what differs from the model's recipe of then", "seeds", "final accuracy",
              "the recipe, same seeds and code", "runs (`benchmarks/results/`)"]
    note = "\nMachines the variants' records name: " + "; ".join(
        f"{name} (`{'/`, `'.join(sorted(folders))}/`)" for name, folders in sorted(machines.items())) + "."
    return table(header, [row for m in MODELS for row in rows[m]]) + "\n" + note


def render_ablation_issue22() -> str:
    """What each change of issue 22 bought, on the same seeds: ISSUE22_ABLATION's rows."""
    rows, first = [], {}
    for model, folder, change in ISSUE22_ABLATION:
        runs = load_runs(RESULTS / folder)
        acc = finals(runs)
        first.setdefault(model, [r["config"]["seed"] for r in runs])
        assert [r["config"]["seed"] for r in runs] == first[model], f"{folder}: not the seeds of its model's rows"
        commits = {(RESULTS / folder / f"seed{r['config']['seed']}.commit").read_text().strip()[:7] for r in runs}
        rows.append([f"`{model}`", change, f"{runs[0]['parameters']:,}", runs[0]["config"]["epochs"],
                     " / ".join(f"{100 * a:.2f}" for a in acc), f"**{pct(min(acc))}**", pct(statistics.mean(acc)),
                     pct(lowest_after(runs)), f"{statistics.mean(map(seconds, runs)):.0f}",
                     f"{machine(runs[0]).split(', torch')[0]}, `{'`, `'.join(sorted(commits))}`", f"`{folder}/`"])
    seeds = seeds_text(load_runs(RESULTS / ISSUE22_ABLATION[0][1]))
    header = ["model", "change (each row adds it to the row above)", "parameters", "epochs",
              f"final test accuracy (%), seeds {seeds}", "min", "mean", "lowest after epoch 2",
              "seconds of training (mean)", "machine, commit", "runs (`benchmarks/results/`)"]
    return table(header, rows)


# ---------------------------------------------------------------- speed

def render_speed() -> str:
    records = [speed_record(n) for n in HEADLINE_SPEED]
    header = ["variant"]
    for i, _ in enumerate(records, 1):
        header += [f"run {i}: median step (ms)", f"run {i}: vs stock eager"]
    header.append(f"epoch (s, run {len(records)})")
    rows = []
    for res in records[0]["results"]:
        name = res["variant"]
        row = [name]
        for rec in records:
            r = variant(rec, name)
            ms, ratio = f"{r['median_step_ms']:.1f}", f"{r['ratio_to_stock_eager']:.2f}x"
            row += [f"**{ms}**", f"**{ratio}**"] if name.startswith("fused") else [ms, ratio]
        row.append(f"{variant(records[-1], name)['epoch_seconds']:.1f}")
        rows.append(row)
    meta = records[0]["meta"]
    machines = {speed_machine(r["meta"]) for r in records}
    note = (f"\n{len(records)} runs back to back on {'; '.join(sorted(machines))}; kernel path "
            f"`{meta['fused_cpu_kernel_path']}`; optimiser {meta['optimizer']}; batch {meta['batch_size']}, "
            f"epoch = {meta['steps_per_epoch']} steps; {meta['rounds_timed']} timed rounds x "
            f"{meta['steps_per_round']} steps per variant, {meta['warmup_rounds']} warm-up rounds excluded; commit "
            f"{commit(meta)}; records " + ", ".join(f"`{n}`" for n in HEADLINE_SPEED) + ".")
    return table(header, rows) + "\n" + note


def render_speed_history() -> str:
    rows = []
    for path in sorted(RESULTS.glob("epoch_time-*.json")):
        rec = json.loads(path.read_text())
        meta, fused, eager = rec["meta"], variant(rec, "fused"), variant(rec, "stock eager")
        others = [variant(rec, p) for p in ("stock channels_last", "torch.compile")]
        vs = [f"{fused['median_step_ms'] / o['median_step_ms']:.2f}x" if o else "not timed" for o in others]
        rows.append([f"`{path.name[len('epoch_time-cpu-'):-len('.json')]}`", commit(meta), speed_machine(meta),
                     f"`{meta.get('fused_cpu_kernel_path', 'not recorded')}`", f"{eager['median_step_ms']:.1f}",
                     f"{fused['median_step_ms']:.1f}", f"{fused['ratio_to_stock_eager']:.2f}x", *vs])
    header = ["record (`epoch_time-cpu-*.json`)", "commit", "machine", "fused kernel path", "stock eager (ms)",
              "fused (ms)", "fused / stock eager", "fused / channels_last", "fused / torch.compile"]
    return table(header, rows)


# ---------------------------------------------------------------- fastmnist.fuse and fastmnist serve

def newest(pattern: str) -> tuple:
    """(file name, record) of the newest record matching pattern (names carry their date and time)."""
    path = sorted(RESULTS.glob(pattern))[-1]
    return path.name, json.loads(path.read_text())


def render_fuse_speed() -> str:
    name, rec = newest("fuse_speed-cpu-*.json")
    meta = rec["meta"]
    rows = [[r["variant"], f"{r['median_step_ms']:.1f}", f"{r['iqr_ms'][0]:.1f}–{r['iqr_ms'][1]:.1f}",
             f"{r['ratio_to_stock_channels_last']:.2f}x"] for r in rec["results"]]
    eager = next(r for r in rec["results"] if r["variant"].startswith("stock eager"))
    fused = next(r for r in rec["results"] if r["variant"].startswith("fused"))
    note = (f"\nFused / stock eager: **{fused['median_step_ms'] / eager['median_step_ms']:.2f}x**. Network: "
            f"{meta['network']}; batch {meta['batch_size']}; {meta['step']}. {speed_machine(meta)}, kernel path "
            f"`{meta['fused_cpu_kernel_path']}`; {meta['rounds'] - meta['warmup_rounds']} timed rounds x "
            f"{meta['steps_per_round']} steps per variant; commit {commit(meta)}; record `{name}`.")
    return table(["variant", "median step (ms)", "IQR (ms)", "vs stock channels_last"], rows) + "\n" + note


def render_serve_load() -> str:
    name, rec = newest("serve_load-*.json")
    meta = rec["meta"]
    rows = [[r["concurrency"], f"{r['answered_200']:,}/{r['requests']:,}", f"{r['p50_ms']:.1f}",
             f"{r['p99_ms']:.1f}", f"{r['requests_per_second']:.0f}",
             f"{r['rss_mb_before']:.0f} → {r['rss_mb_after']:.0f}"] for r in rec["results"]]
    checks = "; ".join(f"{k}: {'met' if ok else '**not met**'}" for k, ok in rec["checks"].items())
    note = (f"\n{meta['cpu_model']}, {meta['cpu_count']} cores, server torch threads {meta['server_torch_threads']}, "
            f"{meta['server_worker_threads']} worker threads, torch {meta['torch'].split('+')[0]}; a "
            f"{meta['body_bytes']:,}-byte drawn PNG per request, {meta['warmup_per_level']} warm-up requests per "
            f"level; server memory {meta['rss_mb_start']:.0f} MB after warm-up, {meta['rss_mb_end']:.0f} MB at the "
            f"end (growth {meta['rss_growth_mb']:.1f} MB). Targets: {checks}. Commit {commit(meta)}; record `{name}`.")
    return table(["concurrency", "answered 200", "p50 (ms)", "p99 (ms)", "requests/s", "server RSS (MB)"],
                 rows) + "\n" + note


# ---------------------------------------------------------------- the tables and where they live

TABLES = {
    "summary": render_summary,
    "train-log": render_train_log,
    "example-eval": lambda: render_example("eval.txt"),
    "example-predict": lambda: render_example("predict.txt"),
    "example-errors": lambda: render_example("error-checkpoint.txt", "error-flag.txt",
                                             last_line_only=("error-flag.txt",)),
    "network": render_network,
    "recipe": render_recipe,
    "seeds-default": lambda: render_seeds("default"),
    "seeds-reference": lambda: render_seeds("reference"),
    "seeds-tiny": lambda: render_seeds("tiny"),
    "seeds-earlier": render_earlier_seeds,
    "dips": render_dips,
    "ablation": render_ablation,
    "ablation-issue22": render_ablation_issue22,
    "ema-early": render_ema_early,
    "speed": render_speed,
    "speed-history": render_speed_history,
    "fuse-speed": render_fuse_speed,
    "serve-load": render_serve_load,
}
MARKER = re.compile(r"(<!-- table:([\w-]+) -->\n)(.*?)(<!-- /table -->)", re.S)


def documents() -> list:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), RESULTS / "README.md"]


def rendered(text: str, cache: dict) -> str:
    def fill(match):
        name = match.group(2)
        if name not in TABLES:
            raise SystemExit(f"unknown table {name!r}: add it to TABLES in benchmarks/tables.py or fix the marker")
        if name not in cache:
            cache[name] = TABLES[name]().rstrip("\n") + "\n"
        return match.group(1) + cache[name] + match.group(4)

    return MARKER.sub(fill, text)


def stale() -> dict:
    """{path: (committed text, rendered text)} for each document whose tables differ from the records."""
    cache, out = {}, {}
    for path in documents():
        text = path.read_text()
        new = rendered(text, cache)
        if new != text:
            out[path] = (text, new)
    return out


def used_tables() -> set:
    return {m.group(2) for path in documents() for m in MARKER.finditer(path.read_text())}


def plot_seeds(path=RESULTS / SEEDS / "seeds.png"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = seed_set(SEEDS)
    low = min(100 * e["test_acc"] for runs in sets.values() for r in runs for e in r["epochs"])
    fig, axes = plt.subplots(1, len(sets), figsize=(4.5 * len(sets), 4), sharey=True, squeeze=False)
    for ax, (name, runs) in zip(axes[0], sets.items()):
        for r in runs:
            ax.plot([e["epoch"] for e in r["epochs"]], [100 * e["test_acc"] for e in r["epochs"]], "o-", ms=3,
                    label=f"seed {r['config']['seed']}")
        ax.axhline(99.4, color="gray", ls="--", lw=1, label="99.4%")
        ax.set(xlabel="epoch", title=f"{name}: {runs[0]['parameters']:,} parameters", ylim=(min(99.0, low) - 0.2, 99.8))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path.relative_to(ROOT)}")


def main(argv) -> int:
    changes = stale()
    if "--check" in argv:
        for path, (old, new) in changes.items():
            rel = str(path.relative_to(ROOT))
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True), rel, rel + " (rendered)"))
        print("\ntables differ from benchmarks/results/: run `python benchmarks/tables.py`" if changes
              else "every table matches benchmarks/results/")
        return 1 if changes else 0
    for path, (_, new) in changes.items():
        path.write_text(new)
        print(f"rewrote the tables of {path.relative_to(ROOT)}")
    if not changes:
        print("every table matches benchmarks/results/")
    if "--plot" in argv:
        plot_seeds()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
