import pytest
import torch
from torch import nn
from torch.testing import assert_close

from fastmnist import ops
from fastmnist.layers import ConvReLUBN, default_impl, resolve_impl

needs_fused = pytest.mark.skipif(not ops.fused_available(), reason=f"{ops.fused_unavailable_reason()}")


def test_holds_stock_modules_and_state_dict_keys():
    layer = ConvReLUBN(3, 8, 3, impl="stock")
    assert isinstance(layer.conv, nn.Conv2d) and isinstance(layer.bn, nn.BatchNorm2d)
    assert set(layer.state_dict()) == {
        "conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"
    }


def test_stock_is_bn_of_relu_of_conv():
    layer = ConvReLUBN(3, 8, 3, padding=1, impl="stock")
    x = torch.randn(2, 3, 6, 6)
    assert_close(layer(x), layer.bn(torch.relu(layer.conv(x))))


def test_default_impl_is_fused_where_built():
    assert default_impl() == ("fused" if ops.fused_available() else "stock")
    assert resolve_impl(None) == resolve_impl("auto") == default_impl()


def test_unknown_impl_is_refused():
    with pytest.raises(ValueError, match="impl must be one of"):
        ConvReLUBN(1, 2, 3, impl="fast")


@pytest.mark.skipif(ops.fused_available(), reason="only without the extension")
def test_fused_without_extension_says_why():
    with pytest.raises(RuntimeError, match="pip install"):
        ConvReLUBN(1, 2, 3, impl="fused")


@needs_fused
@pytest.mark.parametrize("momentum", [0.1, None])
def test_fused_and_stock_layers_agree_over_steps(momentum):
    torch.manual_seed(0)
    stock = ConvReLUBN(4, 6, 3, momentum=momentum, impl="stock")
    fused = ConvReLUBN(4, 6, 3, momentum=momentum, impl="fused")
    fused.load_state_dict(stock.state_dict())
    for _ in range(3):
        x = torch.randn(5, 4, 9, 9)
        assert_close(fused(x), stock(x), rtol=1e-4, atol=1e-5)
    assert_close(fused.state_dict(), stock.state_dict(), rtol=1e-5, atol=1e-6)
    stock.eval(), fused.eval()
    x = torch.randn(2, 4, 9, 9)
    assert_close(fused(x), stock(x), rtol=1e-4, atol=1e-5)


@needs_fused
def test_fused_dropout_drops_the_channels_stock_dropout_drops():
    """Same RNG state: the fused op's mask is Dropout2d's, so outputs and gradients agree."""
    torch.manual_seed(0)
    stock = ConvReLUBN(4, 16, 3, dropout=0.3, impl="stock")
    fused = ConvReLUBN(4, 16, 3, dropout=0.3, impl="fused")
    fused.load_state_dict(stock.state_dict())
    x = torch.randn(8, 4, 9, 9)
    outs = []
    for layer in (stock, fused):
        torch.manual_seed(1)
        y = layer(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append((y, layer.conv.weight.grad, layer.bn.weight.grad))
    assert outs[0][0].eq(0).flatten(2).all(-1).any(), "some channels must be dropped"
    for a, b in zip(*outs):
        assert_close(a, b, rtol=1e-4, atol=1e-5)
    stock.eval(), fused.eval()  # dropout is the identity in eval
    assert_close(fused(x), stock.bn(torch.relu(stock.conv(x))), rtol=1e-4, atol=1e-5)


def test_bad_dropout_is_refused():
    with pytest.raises(ValueError, match="dropout must be in"):
        ConvReLUBN(1, 2, 3, dropout=1.0, impl="stock")
