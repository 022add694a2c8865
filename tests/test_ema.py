import pytest
import torch
from torch import nn

from fastmnist.ema import WeightAverage


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))


def test_the_average_follows_the_warm_up_then_the_decay():
    model = small_model()
    ema = WeightAverage(model, decay=0.99)
    start = model[0].weight.detach().clone()
    expected = start.clone()
    for n in range(1, 200):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        ema.update(model)
        d = min(0.99, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * model[0].weight.detach()
        torch.testing.assert_close(ema.module[0].weight, expected)
    assert ema.updates == 199


def test_bn_statistics_are_averaged_and_its_counter_copied():
    model = small_model()
    ema = WeightAverage(model, decay=0.9)
    model.train()(torch.randn(8, 1, 6, 6))
    ema.update(model)
    d = min(0.9, 2 / 11)
    torch.testing.assert_close(ema.module[1].running_mean, (1 - d) * model[1].running_mean)
    assert ema.module[1].num_batches_tracked == model[1].num_batches_tracked == 1


def test_the_average_is_a_separate_eval_model_without_gradients():
    model = small_model()
    ema = WeightAverage(model, decay=0.9)
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        model[0].weight.zero_()
    assert ema.module[0].weight.abs().sum() > 0  # a copy, not the same tensors


def test_state_round_trip_and_refusals():
    model = small_model()
    ema = WeightAverage(model, decay=0.9)
    for _ in range(3):
        with torch.no_grad():
            model[0].weight.mul_(1.1)
        ema.update(model)
    other = WeightAverage(small_model(), decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 3 and torch.equal(other.module[0].weight, ema.module[0].weight)
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(small_model(), decay=0.5).load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match=r"decay must be in \(0, 1\)"):
        WeightAverage(model, decay=1.0)
