"""Which BN statistics should the weight average be evaluated with? One run, every candidate each epoch.

The run trains as `fastmnist train` does (the same start_run, train_epoch and
end_epoch, so its own curve is the run's with the averaged statistics); after
each epoch, copies of the evaluated model are scored with other statistics:
  averaged       the weight average's own (its BN buffers averaged like its weights)
  recompute_N    recomputed on N un-augmented training batches (train.recompute_bn_statistics)
  recompute_N_aug  the same on augmented batches (a generator of its own: training is untouched)
  live           the trained model's running statistics under the averaged weights
  raw            the trained model itself, no average
Copies are scored, so the run, and so every candidate's curve, is that of the
plain run. Writes bn_probe.json next to the run's metrics.json.

    ATEN_CPU_CAPABILITY=avx2 python benchmarks/bn_probe.py --seed 0 --out benchmarks/results/probes-issue22/bn-seed0
"""
import argparse
import copy
import json
from dataclasses import replace
from pathlib import Path

import torch

from fastmnist import checkpoint
from fastmnist.data import random_affine, to_float_images
from fastmnist.train import (MEMORY_FORMAT, StopFlag, TrainConfig, end_epoch, epoch_permutation, evaluate,
                             start_run, train_epoch, write_outputs)

BATCHES = (5, 20, 50, 200)


def scored(run, model) -> float:
    _, _, test_x, test_y = run.data
    return evaluate(model, test_x, test_y, run.cfg.eval_batch_size, MEMORY_FORMAT)[1]


def recomputed(run, n, augment):
    model = copy.deepcopy(run.final_model)
    train_x, cfg = run.data[0], run.cfg
    perm = epoch_permutation(cfg.seed, run.epoch, len(train_x)).to(run.device)[: n * cfg.batch_size]
    gen = torch.Generator(device=run.device).manual_seed(12345 + run.epoch)
    batches = []
    for i in range(0, len(perm), cfg.batch_size):
        x = to_float_images(train_x[perm[i : i + cfg.batch_size]])
        batches.append((random_affine(x, gen) if augment else x).contiguous(memory_format=MEMORY_FORMAT))
    torch.optim.swa_utils.update_bn(batches, model)
    return model


def candidates(run) -> dict:
    scores = {"averaged": scored(run, run.final_model), "raw": scored(run, run.model)}
    live = copy.deepcopy(run.final_model)
    live.load_state_dict({**live.state_dict(), **{k: v for k, v in run.model.state_dict().items()
                                                   if "running" in k or "num_batches" in k}})
    scores["live"] = scored(run, live)
    for n in BATCHES:
        scores[f"recompute_{n}"] = scored(run, recomputed(run, n, augment=False))
    scores["recompute_50_aug"] = scored(run, recomputed(run, 50, augment=True))
    return scores


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="default")
    p.add_argument("--epochs", type=int)
    p.add_argument("--limit-train", type=int)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    cfg = TrainConfig(seed=a.seed, model=a.model, epochs=a.epochs, limit_train=a.limit_train, out=a.out,
                      bn_recompute_batches=0, progress=False)
    out = Path(a.out)
    checkpoint.prepare_out_dir(out, overwrite=True)
    run = start_run(replace(cfg, out=str(out)), out, None, print)
    curves = []
    with StopFlag() as stop:
        while run.epoch < cfg.epochs:
            seconds = train_epoch(run, stop)
            scores = candidates(run)
            print(f"epoch {run.epoch + 1}: " + "  ".join(f"{k} {100 * v:.2f}" for k, v in scores.items()), flush=True)
            curves.append({"epoch": run.epoch + 1, **scores})
            end_epoch(run, seconds, print)
    write_outputs(run, print)
    (out / "bn_probe.json").write_text(json.dumps({"seed": a.seed, "model": a.model, "curves": curves}, indent=1))


if __name__ == "__main__":
    main()
