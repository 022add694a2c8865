"""The one evaluation loop: the same figures with or without the probabilities, whatever the batch size."""
import pytest
import torch

from fastmnist.checkpoint import load_model
from fastmnist.evaluation import evaluate


@pytest.fixture
def model_and_data(untrained_model):
    model, _ = load_model(untrained_model)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (250, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (250,), generator=g)
    return model, images, labels


def test_probabilities_come_from_the_same_pass(model_and_data):
    model, images, labels = model_and_data
    plain = evaluate(model, images, labels, batch_size=100)
    full = evaluate(model, images, labels, batch_size=100, probabilities=True)
    assert (full["test_loss"], full["test_acc"]) == (plain["test_loss"], plain["test_acc"])
    probs = full["probabilities"]
    assert probs.shape == (250, 10) and probs.device.type == "cpu"
    torch.testing.assert_close(probs.sum(1), torch.ones(250))
    assert (probs.argmax(1) == labels).float().mean().item() == pytest.approx(plain["test_acc"])
    loss = torch.nn.functional.cross_entropy(probs.log(), labels).item()
    assert loss == pytest.approx(plain["test_loss"], rel=1e-4)


def test_a_last_partial_batch_counts_once(model_and_data):
    model, images, labels = model_and_data
    a, b = evaluate(model, images, labels, batch_size=1000), evaluate(model, images, labels, batch_size=64)
    assert a["test_acc"] == b["test_acc"] and a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-5)
