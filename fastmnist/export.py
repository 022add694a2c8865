"""Export a trained model for use without fastmnist: ONNX (onnxruntime, browsers, phones) or torch.export's .pt2.

The exported network is the same model made of stock operators only: our fused ops replaced by
the torch.nn layers they compute (Conv2d, ReLU, AveragePool), each BatchNorm folded into the
unpadded convolution after it (exact: model.fold_bn_into_next_conv), and a softmax at the end.
Input: images (N, 1, 28, 28) float32 in [0, 1], N free; output: probabilities (N, 10).

Before anything is written, the export checks itself: the exported file, run by onnxruntime
(or torch.export.load), must give the same digit as the PyTorch model on all 10,000 MNIST test
images, probabilities within MAX_PROB_DIFF; else it refuses and says why.
"""
import contextlib
import io
import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from fastmnist.model import build_model

FORMATS = ("onnx", "pt2")
OPSET = 18  # ONNX opset of the exported graph: onnxruntime >= 1.14, onnxruntime-web and ONNX.js-era runtimes read it
MAX_PROB_DIFF = 1e-4  # float32 rounding of the folded network moves probabilities by ~1e-6; more means a bug
INSTALL = "pip install 'fastmnist[export]' (or: pip install onnx onnxruntime onnxscript)"


class ExportError(Exception):
    """An export that cannot be made or did not pass its check; nothing was written."""


def export(model_path, out, fmt: str = "onnx", data_dir=None, log=print) -> Path:
    """Write model_path's network to out as fmt ("onnx" or "pt2") after checking it on the MNIST test set."""
    from fastmnist.api import load
    from fastmnist.data import load_mnist, to_float_images

    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        _require_onnx()
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"{out} is a folder; pass the file to write, e.g. {out / ('model.' + fmt)}")
    clf = load(model_path, device="cpu")
    data = load_mnist(data_dir, log=log)
    images = to_float_images(data.test_images)
    reference = clf.probabilities(images)  # what `fastmnist eval` computes, from the same batches
    accuracy = (reference.argmax(1) == data.test_labels).sum().item() / len(images)
    network = stock_network(Path(clf.info.path))
    meta = {"fastmnist_version": clf.info.fastmnist_version, "model": clf.info.model,
            "parameters": str(clf.info.parameters), "test_accuracy": f"{accuracy:.4f}",
            "input": "images: float32 (N, 1, 28, 28) in [0, 1], white digit on black, MNIST-centred",
            "output": "probabilities: float32 (N, 10), softmax over the digits 0-9"}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot create {out.parent}: {exc.strerror or exc}") from None
    tmp = str(out.with_name(f".{out.name}.{os.getpid()}.tmp"))  # renamed into place once checked
    try:
        if fmt == "onnx":
            _write_onnx(network, tmp, OPSET, meta)
            exported = _onnxruntime_probabilities(tmp, images)
        else:
            _write_pt2(network, tmp, meta)
            exported = _pt2_probabilities(tmp, images)
        diff = (exported - reference).abs().max().item()
        same = (exported.argmax(1) == reference.argmax(1)).sum().item()
        runtime = "onnxruntime" if fmt == "onnx" else "torch.export.load"
        log(f"fastmnist: check: {runtime} vs PyTorch on the {len(images):,} test images: max |probability "
            f"difference| {diff:.2e}, same digit on {same:,} of {len(images):,} (test accuracy {100 * accuracy:.2f}%)")
        if same != len(images) or not diff <= MAX_PROB_DIFF:
            raise ExportError(f"the exported model does not match the PyTorch model (same digit on {same:,} of "
                              f"{len(images):,} test images, max probability difference {diff:.2e}, allowed "
                              f"{MAX_PROB_DIFF:g}); nothing was written")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def stock_network(model_path: Path) -> nn.Module:
    """The model.pt's network in stock operators, BN folded, with a softmax: what the export writes."""
    ckpt = torch.load(model_path, map_location="cpu", weights_only=True)  # load() has just checked this file
    model = build_model(**{**ckpt["model_kwargs"], "impl": "stock"})
    model.load_state_dict(ckpt["state_dict"])
    return nn.Sequential(model.eval().fold(), nn.Softmax(dim=1)).eval()


def _require_onnx() -> None:
    missing = [name for name in ("onnx", "onnxruntime", "onnxscript") if not _importable(name)]
    if missing:
        raise ExportError(f"ONNX export needs {', '.join(missing)}, which are not installed: {INSTALL}")


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def _write_onnx(network: nn.Module, path: str, opset: int, meta: dict) -> None:
    import onnx

    example = torch.rand(2, 1, 28, 28)
    batch = torch.export.Dim("batch", min=1)
    # torch's exporter (torch.export-based, onnxscript) prints its progress; the user sees our summary.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(network, (example,), dynamo=True, input_names=["images"],
                                    output_names=["probabilities"], dynamic_shapes=({0: batch},),
                                    opset_version=opset, verbose=False)
    proto = program.model_proto
    foreign = sorted({f"{n.domain}::{n.op_type}" for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
    if foreign or proto.functions:
        raise ExportError(f"the ONNX graph holds non-standard ops ({', '.join(foreign) or 'local functions'}); "
                          "nothing was written")
    onnx.helper.set_model_props(proto, meta)
    proto.doc_string = f"fastmnist {meta['model']} MNIST classifier: {meta['input']} -> {meta['output']}"
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, path)


def _onnxruntime_probabilities(path: str, images: torch.Tensor) -> torch.Tensor:
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return torch.cat([torch.from_numpy(session.run(["probabilities"], {"images": images[i : i + 1000].numpy()})[0])
                      for i in range(0, len(images), 1000)])


def _write_pt2(network: nn.Module, path: str, meta: dict) -> None:
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(network, (torch.rand(2, 1, 28, 28),), dynamic_shapes=({0: batch},))
    torch.export.save(program, path, extra_files={"fastmnist.json": json.dumps(meta)})


def _pt2_probabilities(path: str, images: torch.Tensor) -> torch.Tensor:
    module = torch.export.load(path).module()
    with torch.no_grad():
        return torch.cat([module(images[i : i + 1000]) for i in range(0, len(images), 1000)])
