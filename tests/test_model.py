import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from fastmnist import ops
from fastmnist.layers import ConvReLUBN
from fastmnist.model import build_model, count_parameters

needs_fused = pytest.mark.skipif(not ops.fused_available(), reason=f"{ops.fused_unavailable_reason()}")


def test_parameter_counts():
    assert count_parameters(build_model("reference", impl="stock")) == 12650  # SPEC.md's network
    assert count_parameters(build_model(impl="stock")) == 18458 < 20000


@pytest.mark.parametrize("name", ["default", "reference"])
def test_no_fully_connected_layer(name):
    model = build_model(name, impl="stock")
    assert not any(isinstance(m, (nn.Linear, nn.Bilinear)) for m in model.modules())
    assert sum(isinstance(m, ConvReLUBN) for m in model.modules()) == 5


def test_output_shape_and_no_parameters_in_normalisation():
    model = build_model(impl="stock").eval()
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    assert all(p.requires_grad for p in model.parameters())
    assert "0.mean" in model.state_dict() and "0.std" in model.state_dict()


def test_unknown_model_and_bad_dropout_are_refused():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("huge", impl="stock")
    with pytest.raises(ValueError, match="dropout"):
        build_model(impl="stock", dropout=1.5)


@pytest.mark.parametrize("name", ["default", "reference"])
@pytest.mark.parametrize("impl", ["stock", pytest.param("fused", marks=needs_fused)])
def test_fold_gives_the_same_eval_outputs(impl, name):
    torch.manual_seed(0)
    model = build_model(name, impl=impl)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):  # non-trivial BN statistics and affine parameters
        loss = F.cross_entropy(model(torch.rand(16, 1, 28, 28)), torch.randint(0, 10, (16,)))
        opt.zero_grad(), loss.backward(), opt.step()
    model.eval()
    folded = model.fold()
    assert not any(isinstance(m, (nn.BatchNorm2d, ConvReLUBN)) for m in folded.modules())
    x = torch.rand(8, 1, 28, 28)
    assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)


@needs_fused
def test_fused_and_stock_models_follow_the_same_loss_trajectory():
    """Same init, same batches, 20 SGD steps: the losses agree step by step.

    Training amplifies rounding differences (stock NCHW against stock
    channels_last drifts ~4e-3 here by step 20), so a moderate learning rate
    and a tolerance above that float noise but far below a wrong gradient."""
    torch.manual_seed(0)
    stock = build_model(impl="stock", dropout=0.0)
    fused = build_model(impl="fused", dropout=0.0)
    fused.load_state_dict(stock.state_dict())
    fused = fused.to(memory_format=torch.channels_last)
    opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in (stock, fused)]
    gen = torch.Generator().manual_seed(1)
    losses = {0: [], 1: []}
    for _ in range(20):
        x = torch.rand(32, 1, 28, 28, generator=gen)
        y = torch.randint(0, 10, (32,), generator=gen)
        for i, (model, opt) in enumerate(zip((stock, fused), opts)):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(), loss.backward(), opt.step()
            losses[i].append(loss.item())
    assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-3, atol=1e-4)
