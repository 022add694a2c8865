"""fastmnist command line: train, eval, predict."""
import argparse
import json
import sys
import traceback
from pathlib import Path

# One rule for imports: what the parser and main() need is imported here, once (train: TrainConfig's
# defaults for --help; the error types), and that covers train and eval. Only fastmnist.predict, which
# no other command uses, waits for its handler: it pulls in Pillow and torchvision (1.7 s measured).
from fastmnist.checkpoint import CheckpointError, RunExistsError
from fastmnist.data import MNISTDataError
from fastmnist.model import LAYOUTS
from fastmnist.recipes import describe
from fastmnist.report import ReportError, per_class_table, prepare_report_dir, summarize, write_report
from fastmnist.train import NonFiniteLoss, TrainConfig, TrainingStopped, evaluate_checkpoint, train

DEFAULTS = TrainConfig()  # seed, impl, device: the settings no model's recipe sets
# What the user can act on, shown as one line (--debug adds the traceback): the package's own errors,
# whose messages give the remedy; ValueError, which argument checks raise (--impl fused where this
# build has no kernels, --device cuda without a GPU); and Ctrl-C (TrainingAborted is a second one).
# predict's ImageError never gets here: each bad image is its own result line. Anything else, a
# RuntimeError from a kernel included, is a bug and keeps its traceback.
USER_ERRORS = (MNISTDataError, CheckpointError, RunExistsError, ReportError, ValueError, KeyboardInterrupt)


def _number(kind, low, high=None, low_open=False):
    """An argparse type for a number in [low, high] (or (low, high] when low_open)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        too_low = value <= low if low_open else value < low
        if too_low or (high is not None and value > high) or value != value:
            bound = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {bound}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastmnist",
        description="Train a small (under 20,000 parameters) no-FC CNN to >= 99.4%% MNIST test accuracy, "
        "using a fused Conv2d+ReLU+BatchNorm2d operator (C++ on the CPU, CUDA on the GPU).",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,predict}")

    t = sub.add_parser("train", help="train a model and report test accuracy per epoch",
                       description="Train the network. Writes metrics.json, model.pt, curves.png and a "
                       "resumable checkpoint.pt (after every epoch) to --out. Ctrl-C saves and prints "
                       "the command that resumes.")
    t.add_argument("--epochs", type=_number(int, 1, 1000), default=None,
                   help=f"passes over the 60,000 training images (default {describe('epochs')})")
    t.add_argument("--batch-size", type=_number(int, 2, 60000), default=None,
                   help=f"images per SGD step (default {describe('batch_size')})")
    t.add_argument("--lr", type=_number(float, 0.0, 100.0, low_open=True), default=None,
                   help=f"peak learning rate of the one-cycle schedule (default {describe('lr')})")
    t.add_argument("--weight-decay", type=_number(float, 0.0, 1.0), default=None,
                   help=f"SGD weight decay (default {describe('weight_decay')})")
    t.add_argument("--dropout", type=_number(float, 0.0, 0.99), default=None,
                   help=f"Dropout2d probability after each conv block (default {describe('dropout')})")
    t.add_argument("--label-smoothing", type=_number(float, 0.0, 0.99), default=None,
                   help=f"label smoothing of the training loss (default {describe('label_smoothing')})")
    t.add_argument("--ema-decay", type=_number(float, 0.0, 0.99999), default=None,
                   help="per-step decay of the moving average of the weights (and BN statistics) that is "
                   f"evaluated each epoch and saved as model.pt; 0 evaluates and saves the trained weights "
                   f"themselves (default {describe('ema_decay')})")
    t.add_argument("--bn-recompute-batches", type=_number(int, 0, 60000), default=None,
                   help="recompute the BN statistics of the evaluated weights on this many un-augmented training "
                   f"batches before each evaluation and save; 0 keeps the averaged ones (default "
                   f"{describe('bn_recompute_batches')})")
    t.add_argument("--no-augment", dest="augment", action="store_false", default=None,
                   help="turn off the random rotation/scale/shift of training images")
    t.add_argument("--seed", type=_number(int, 0, 2**31 - 1), default=None,
                   help=f"random seed; same seed, device and impl give the same run on the CPU (default {DEFAULTS.seed})")
    t.add_argument("--model", choices=sorted(LAYOUTS),
                   help="default: 18,410 parameters; reference: the assignment's 12,650-parameter network "
                   "(docs/assignment.md); tiny: 7,506 parameters; tiny4k (3,746) and tiny5k (4,610): candidates with "
                   "depthwise-separable blocks (a stock depthwise conv, the rest fused). Each model has its own recipe, the defaults "
                   f"named in this help, which any flag overrides (default {DEFAULTS.model})")
    t.add_argument("--impl", choices=["auto", "fused", "stock"],
                   help="fused: our Conv+ReLU+BN operator; stock: torch.nn layers; auto: fused where built (default)")
    t.add_argument("--device", choices=["auto", "cpu", "cuda"],
                   help="where to train; auto picks cuda when a GPU is visible (default)")
    t.add_argument("--data-dir", help="folder with the four MNIST IDX files (raw or .gz); else $FASTMNIST_DATA, "
                   "else ~/.cache/fastmnist/mnist, fetched there when missing")
    t.add_argument("--out", help="run folder (default: a new folder under runs/)")
    t.add_argument("--resume", metavar="DIR", help="continue the interrupted run in DIR from its last checkpoint")
    t.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    t.add_argument("--limit-train", type=_number(int, 2), help="use only the first N training images (smoke tests)")
    t.add_argument("--limit-test", type=_number(int, 1), help="use only the first N test images (smoke tests)")
    t.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")

    e = sub.add_parser("eval", help="test accuracy of a saved model, overall and per digit",
                       description="Print the MNIST test accuracy of a model.pt, overall and per digit (with the "
                       "digit each is most often mistaken for).")
    e.add_argument("--checkpoint", required=True, help="a model.pt written by fastmnist train")
    e.add_argument("--data-dir", help="folder with the MNIST files (see train --data-dir)")
    e.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    e.add_argument("--report", metavar="DIR", help="also write report.json (per-digit counts, confusion matrix, "
                   "every mistake), confusion.png and mistakes.png (every misclassified digit) to DIR, created "
                   "if needed; the PNGs need matplotlib")

    p = sub.add_parser("predict", help="classify your own digit images",
                       description="Classify images of handwritten digits (PNG or JPEG, any size, dark-on-light "
                       "or light-on-dark); each is brought to MNIST's convention first.")
    p.add_argument("--checkpoint", required=True, help="a model.pt written by fastmnist train")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--json", action="store_true", help="print one JSON list instead of lines")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    return parser


# The train flags that set TrainConfig fields: their parser default is None, so that
# cmd_train knows which the user gave (a resumed run keeps its saved settings).
RUN_SETTINGS = ("epochs", "batch_size", "lr", "weight_decay", "dropout", "label_smoothing", "ema_decay", "augment",
                "bn_recompute_batches", "seed", "model", "impl", "device", "limit_train", "limit_test")


def cmd_train(args) -> int:
    given = {name: getattr(args, name) for name in RUN_SETTINGS if getattr(args, name) is not None}
    if args.resume:
        if args.out and Path(args.out) != Path(args.resume):
            raise ValueError("--resume DIR continues the run in DIR; do not also pass a different --out")
        refused = [f"--{name.replace('_', '-')}" for name in given] + (["--overwrite"] if args.overwrite else [])
        if refused:
            raise ValueError(
                f"--resume {args.resume} continues that run with its saved settings, so {', '.join(refused)} "
                "cannot be applied (changing them mid-run would make another run); drop them, or start a new "
                "run with --out NEW_DIR"
            )
    # No --out: train.run_folder names a new folder under runs/.
    # What the user did not give comes from the model's recipe (TrainConfig fills it in).
    cfg = TrainConfig(**given, data_dir=args.data_dir, out=args.resume or args.out,
                      progress=args.progress and sys.stderr.isatty())
    train(cfg, resume=bool(args.resume), overwrite=args.overwrite)
    return 0


def cmd_eval(args) -> int:
    if args.report:
        prepare_report_dir(args.report)  # an unwritable folder fails before the evaluation, not after
    result = evaluate_checkpoint(args.checkpoint, args.data_dir, args.device, predictions=True)
    print(f"{args.checkpoint}: test accuracy {100 * result['test_acc']:.2f}% (test loss {result['test_loss']:.4f})")
    summary = summarize(result["labels"], result["probabilities"])
    print(per_class_table(summary))
    if args.report:
        summary = {"checkpoint": str(args.checkpoint), "test_loss": result["test_loss"], **summary}
        written = write_report(args.report, summary, result["images"])
        print(f"report: {', '.join(str(p) for p in written)}")
    return 0


def cmd_predict(args) -> int:
    from fastmnist.predict import predict_files  # see the imports at the top

    results = predict_files(args.checkpoint, args.images, device=args.device)
    if args.json:
        print(json.dumps(results, indent=2, allow_nan=False))  # predict_files never gives NaN: valid JSON
    else:
        for r in results:
            if "error" in r:
                print(f"{r['file']}: error: {r['error']}")
            else:
                print(f"{r['file']}: {r['digit']} (p={r['probability']:.3f})")
    return 0 if all("error" not in r for r in results) else 1


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict}[args.command]
    try:
        return handler(args)
    except TrainingStopped as exc:
        print(f"\nfastmnist: {exc}", file=sys.stderr)
        return 130
    except NonFiniteLoss as exc:
        print(f"fastmnist: error: {exc}", file=sys.stderr)
        return 1
    except USER_ERRORS as exc:
        if args.debug:
            traceback.print_exc()
        print(f"fastmnist: error: {one_line(exc)}", file=sys.stderr)
        return 2


def one_line(exc: BaseException) -> str:
    """The whole message on one line (its remedy often comes after the first line)."""
    if isinstance(exc, KeyboardInterrupt) and not str(exc):
        return "interrupted (Ctrl-C)"
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
