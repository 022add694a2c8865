"""Test-set evaluation: the one loop behind each epoch's test accuracy and `fastmnist eval`."""
import math

import torch
import torch.nn.functional as F

from fastmnist.checkpoint import CheckpointError, load_model
from fastmnist.data import load_mnist, to_float_images
from fastmnist.device import resolve_device
from fastmnist.model import MEMORY_FORMAT


@torch.no_grad()
def evaluate(model, images_u8, labels, batch_size=1000, probabilities=False) -> dict:
    """{"test_loss", "test_acc"} over a dataset held as uint8 on the model's device; with probabilities,
    also "probabilities", the softmax outputs (N x 10, on the CPU), from the same pass."""
    model.eval()
    loss_sum = torch.zeros((), device=labels.device)
    correct = torch.zeros((), device=labels.device, dtype=torch.long)
    probs = []
    for i in range(0, len(labels), batch_size):
        x = to_float_images(images_u8[i : i + batch_size]).contiguous(memory_format=MEMORY_FORMAT)
        y = labels[i : i + batch_size]
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        if probabilities:
            probs.append(logits.float().softmax(1).cpu())
    result = {"test_loss": loss_sum.item() / len(labels), "test_acc": correct.item() / len(labels)}
    if probabilities:
        result["probabilities"] = torch.cat(probs)
    return result


def evaluate_checkpoint(path, data_dir=None, device="auto", log=print, predictions=False) -> dict:
    """The MNIST test-set metrics of a saved model.pt: {"test_loss", "test_acc", "model_kwargs"}; with
    predictions, also the test set and the model's outputs ("images" uint8, "labels", "probabilities"
    N x 10, all on the CPU) for fastmnist.report."""
    dev = resolve_device(device)
    model, kwargs = load_model(path, device=dev)
    data = load_mnist(data_dir, log=log)
    result = evaluate(model, data.test_images.to(dev), data.test_labels.to(dev), probabilities=predictions)
    if not math.isfinite(result["test_loss"]):  # finite weights can still make NaN (a negative variance, overflow)
        raise CheckpointError(
            f"{path}: the model is broken: its outputs on the test set are NaN or infinite, so its accuracy "
            f"({100 * result['test_acc']:.2f}%) means nothing; retrain it (`fastmnist train`) or pass another model.pt"
        )
    if predictions:
        result.update(images=data.test_images.cpu(), labels=data.test_labels.cpu())
    return {**result, "model_kwargs": kwargs}
