"""How each model is trained: the settings `fastmnist train --model NAME` uses when no flag overrides them.

One recipe per model, in one place. docs/recipe.md gives the measurement behind each choice
("What was tried"; benchmarks/results/recipe/ holds the runs).
"""

# The default network's recipe; the other models differ only where noted.
_BASE = {
    # 4, not 8, since the BN recompute below (issue 22): seeds 10-12 ended at 99.48-99.52% after 4 epochs
    # with it; 3 epochs ended seed 10 at 99.39% (benchmarks/results/probes-issue22/).
    "epochs": 4,
    "batch_size": 128,
    "lr": 0.2,  # one-cycle peak
    "momentum": 0.9,  # SGD, Nesterov
    "weight_decay": 5e-5,
    "pct_start": 0.2,  # one-cycle warm-up fraction
    "dropout": 0.0,  # Dropout2d after each 3x3 block: off, it cost accuracy in runs this short
    "label_smoothing": 0.0,  # 0.1 cost 0.02-0.10 points in each of four runs (docs/recipe.md, "What was tried")
    "ema_decay": 0.999,  # per step; the average is what is evaluated and saved; 0 turns it off
    "augment": True,  # rotation 8 deg, scale 5%, shift 8%
    # Training batches on which the BN statistics of the averaged weights are recomputed before each
    # evaluation and save (ema.recompute_bn_statistics); 0 keeps the averaged statistics, which belong to
    # earlier weights and made default seed 0 dip to 97.91% after epoch 7 of 8. 50 batches take ~0.3 s.
    "bn_recompute_batches": 50,
}

RECIPES = {
    "default": _BASE,
    "reference": {**_BASE, "epochs": 15},
    "tiny": {**_BASE, "epochs": 15},
}


def describe(setting: str) -> str:
    """The recipes' value of one setting for --help: '10' or '10 (reference, tiny: 15)'."""
    default = RECIPES["default"][setting]
    others = {}
    for name, recipe in RECIPES.items():
        if recipe[setting] != default:
            others.setdefault(recipe[setting], []).append(name)
    return str(default) + "".join(f" ({', '.join(names)}: {value})" for value, names in others.items())
