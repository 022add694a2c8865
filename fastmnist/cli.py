"""fastmnist command line: train, eval, predict, export, serve."""
import argparse
import json
import signal
import sys
import traceback
from pathlib import Path

# One rule for imports: what the parser and main() need is imported here, once (train: TrainConfig's
# defaults for --help; the error types), and that covers train and eval. Only fastmnist.predict, which
# no other command uses, waits for its handler: it pulls in Pillow and torchvision (1.7 s measured).
from fastmnist.checkpoint import CheckpointError
from fastmnist.data import MNISTDataError
from fastmnist.display import display_name, display_text, json_name
from fastmnist.evaluation import evaluate_checkpoint
from fastmnist.export import ExportError
from fastmnist.files import OutputError
from fastmnist.model import LAYOUTS
from fastmnist.recipes import describe
from fastmnist.report import per_class_table, prepare_report_dir, summarize, write_report
from fastmnist.runs import RunExistsError, RunInUseError
from fastmnist.serve import ServeError
from fastmnist.stopping import STOP, TrainingStopped
from fastmnist.train import NonFiniteLoss, TrainConfig, train

DEFAULTS = TrainConfig()  # seed, impl, device: the settings no model's recipe sets
# What the user can act on, shown as one line (--debug adds the traceback): the package's own errors,
# whose messages give the remedy (OutputError: a full, read-only or forbidden disk); ValueError, which argument checks raise (--impl fused where this
# build has no kernels, --device cuda without a GPU); and Ctrl-C (TrainingAborted is a second one).
# predict's ImageError never gets here: each bad image is its own result line. Anything else, a
# RuntimeError from a kernel included, is a bug and keeps its traceback. (fastmnist.serve imports
# no web framework itself: its ServeError can say how to install one.)
USER_ERRORS = (MNISTDataError, CheckpointError, RunExistsError, RunInUseError, OutputError, ExportError, ServeError,
               ValueError,
               KeyboardInterrupt)


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
        description="Train a small (under 20,000 parameters) no-FC CNN to >= 99.4% MNIST test accuracy, "
        "using a fused Conv2d+ReLU+BatchNorm2d operator (C++ on the CPU, CUDA on the GPU).",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,predict,export,serve}")

    t = sub.add_parser("train", help="train a model and report test accuracy per epoch",
                       description="Train the network. Writes metrics.json, model.pt, curves.png and a "
                       "resumable checkpoint.pt (after every epoch) to --out. Ctrl-C saves and prints "
                       "the command that resumes.")
    add_train_arguments(t)

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
                       description="Classify images of handwritten digits (PNG, JPEG, GIF, BMP or WebP, any size, dark-on-light "
                       "or light-on-dark); each is brought to MNIST's convention first.")
    p.add_argument("--checkpoint", required=True, help="a model.pt written by fastmnist train")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--json", action="store_true", help="print one JSON list instead of lines")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")

    x = sub.add_parser("export", help="write a model as ONNX (or torch.export .pt2), checked on the test set",
                       description="Write a trained model for use without fastmnist: standard ONNX ops (opset 18), "
                       "BN folded, a dynamic batch; input images (N, 1, 28, 28) float in [0, 1], output probabilities "
                       "(N, 10). Before writing, the exported model must give the same digit as the PyTorch model on "
                       "all 10,000 MNIST test images, else nothing is written. ONNX needs the `export` extra.")
    x.add_argument("model", help="a model.pt written by fastmnist train, or its run folder")
    x.add_argument("-o", "--out", required=True, help="the file to write, e.g. model.onnx")
    x.add_argument("--format", choices=["onnx", "pt2"], help="onnx, or pt2 (torch.export, for PyTorch-only "
                   "deployment); default: pt2 when --out ends in .pt2, else onnx")
    x.add_argument("--data-dir", help="folder with the MNIST files for the check (see train --data-dir)")
    add_serve_parser(sub)
    return parser


def add_serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="draw digits in your browser and watch the model read them",
                       description="Serve a web page to draw a digit on (or drop an image file) and watch the model "
                       "read it live, with its 10 probabilities and the 28x28 image it saw; plus a JSON API "
                       "(POST /api/predict, GET /api/model, GET /healthz; OpenAPI docs at /docs). Runs on the CPU "
                       "until Ctrl-C. Needs the serve extra: pip install 'fastmnist[serve]'.")
    s.add_argument("model", nargs="?", metavar="RUN_OR_MODEL",
                   help="a run folder or a model.pt (default: the newest finished run under runs/)")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only); 0.0.0.0 lets every machine "
                   "that can reach this one use the page, with no login")
    s.add_argument("--port", type=_number(int, 0, 65535), default=8000,
                   help="port to listen on; 0 picks a free one (default 8000)")
    s.add_argument("--client-timeout", type=_number(float, 0.0, 3600.0, low_open=True), default=10.0,
                   metavar="SECONDS", help="seconds a client has to send a request's head, and again its body, "
                   "before it is answered 408 and cut off (default 10)")


def add_train_arguments(t: argparse.ArgumentParser) -> None:
    """train's flags: the recipe's settings (default None: the model's recipe decides), then the run's."""
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
                   "(docs/assignment.md); tiny: 4,474 parameters, with depthwise-separable blocks (a stock depthwise "
                   "conv, the rest fused). Each model has its own recipe, the defaults "
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
    # No --out: runs.run_folder names a new folder under runs/.
    # What the user did not give comes from the model's recipe (TrainConfig fills it in).
    cfg = TrainConfig(**given, data_dir=args.data_dir, out=args.resume or args.out,
                      progress=args.progress and sys.stderr.isatty())
    train(cfg, resume=bool(args.resume), overwrite=args.overwrite, log=say)
    return 0


def cmd_eval(args) -> int:
    if args.report:
        prepare_report_dir(args.report)  # an unwritable folder fails before the evaluation, not after
    result = evaluate_checkpoint(args.checkpoint, args.data_dir, args.device, log=say, predictions=True)
    print(f"{display_name(args.checkpoint)}: test accuracy {100 * result['test_acc']:.2f}% "
          f"(test loss {result['test_loss']:.4f})")
    summary = summarize(result["labels"], result["probabilities"])
    print(per_class_table(summary))
    if args.report:
        summary = {"checkpoint": str(args.checkpoint), "test_loss": result["test_loss"], **summary}
        written = write_report(args.report, summary, result["images"])
        print(f"report: {', '.join(display_name(p) for p in written)}")
    return 0


def cmd_predict(args) -> int:
    from fastmnist.predict import predict_files  # see the imports at the top

    results = predict_files(args.checkpoint, args.images, device=args.device)
    # A file's name is the user's: shown escaped (display_name), so that no name can print a second,
    # fake result line or stop the output; --json carries it without loss (json_name).
    for r in results:
        if "warning" in r:
            print(f"fastmnist: warning: {display_name(r['file'])}: {r['warning']}", file=sys.stderr)
    if args.json:
        results = [{**json_name(r["file"]), **{k: v for k, v in r.items() if k != "file"}} for r in results]
        print(json.dumps(results, indent=2, allow_nan=False))  # predict_files never gives NaN: valid JSON
    else:
        for r in results:
            if "error" in r:
                print(f"{display_name(r['file'])}: error: {r['error']}")
            else:
                print(f"{display_name(r['file'])}: {r['digit']} (p={r['probability']:.3f})")
    return 0 if all("error" not in r for r in results) else 1


def say(line: str) -> None:
    """print for a line that may hold a user's name (a run folder, a data folder): one printable line."""
    print(display_text(line))


def cmd_export(args) -> int:
    from fastmnist.export import export

    fmt = args.format or ("pt2" if args.out.endswith(".pt2") else "onnx")
    out = export(args.model, args.out, fmt, data_dir=args.data_dir)
    print(f"fastmnist: wrote {display_name(out)} ({fmt}, {out.stat().st_size:,} bytes)")
    return 0


def cmd_serve(args) -> int:
    from fastmnist.serve import run_server  # imports FastAPI and uvicorn: only this command needs them

    return run_server(args.model, args.host, args.port, args.client_timeout)


def main(argv=None) -> int:
    # Ctrl-C and SIGTERM are held from the first line (fastmnist.stopping), before anything is parsed or
    # touched, so that train can act on one however early it comes; the other commands get Python's
    # usual handling back at once, with a signal held meanwhile delivered then.
    STOP.install()
    held = True
    for stream in (sys.stdout, sys.stderr):  # a name the terminal's encoding cannot show is escaped, never fatal
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        args = build_parser().parse_args(argv)
        handler = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "export": cmd_export,
                   "serve": cmd_serve}[args.command]
        try:
            if args.command != "train":
                pending, held = STOP.signal, False
                STOP.uninstall()
                if pending:
                    signal.raise_signal(getattr(signal, pending))
            return handler(args)
        except TrainingStopped as exc:
            print(f"\nfastmnist: {display_text(str(exc))}", file=sys.stderr)
            return 130
        except NonFiniteLoss as exc:
            print(f"fastmnist: error: {display_text(str(exc))}", file=sys.stderr)
            return 1
        except USER_ERRORS as exc:
            if args.debug:
                traceback.print_exc()
            print(f"fastmnist: error: {display_text(one_line(exc))}", file=sys.stderr)
            return 2
    finally:
        if held:
            STOP.uninstall()


def one_line(exc: BaseException) -> str:
    """The whole message on one line (its remedy often comes after the first line)."""
    if isinstance(exc, KeyboardInterrupt) and not str(exc):
        return "interrupted (Ctrl-C)"
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
