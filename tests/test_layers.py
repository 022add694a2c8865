import importlib.util
import logging
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from conftest import cpu_and_cuda
from fastmnist import ops
from fastmnist.layers import ConvPool, ConvReLUBN, resolve_impl

needs_fused = pytest.mark.skipif(not ops.fused_available(), reason=f"{ops.fused_unavailable_reason()}")


def test_holds_stock_modules_and_state_dict_keys():
    layer = ConvReLUBN(3, 8, 3, impl="stock")
    assert isinstance(layer.conv, nn.Conv2d) and isinstance(layer.bn, nn.BatchNorm2d)
    assert set(layer.state_dict()) == {
        "conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"
    }


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_stock_is_bn_of_relu_of_conv(training):
    """Against torch.nn.functional with the layer's parameters (not the layer's own modules): the
    output and both running statistics."""
    torch.manual_seed(0)
    layer = ConvReLUBN(3, 8, 3, padding=1, impl="stock").train(training)
    with torch.no_grad():
        layer.bn.weight.uniform_(0.5, 1.5), layer.bn.bias.uniform_(-0.5, 0.5)
        layer.bn.running_mean.uniform_(-0.2, 0.2), layer.bn.running_var.uniform_(0.5, 2.0)
    rm, rv = layer.bn.running_mean.clone(), layer.bn.running_var.clone()
    x = torch.randn(2, 3, 6, 6)
    expected = F.batch_norm(F.relu(F.conv2d(x, layer.conv.weight, layer.conv.bias, padding=1)), rm, rv,
                            layer.bn.weight, layer.bn.bias, training, 0.1, 1e-5)
    assert_close(layer(x), expected)
    assert_close(layer.bn.running_mean, rm)
    assert_close(layer.bn.running_var, rv)


@needs_fused
def test_auto_is_fused_on_the_cpu_where_built(caplog):
    with caplog.at_level(logging.WARNING, logger="fastmnist"):
        assert resolve_impl(None) == resolve_impl("auto") == resolve_impl("auto", "cpu") == "fused"
        assert ConvReLUBN(1, 2, 3).impl == "fused"
    assert not caplog.records


@pytest.fixture
def build_without_cuda_kernels(monkeypatch):
    """A loaded extension with CPU kernels only, as FASTMNIST_CPU_ONLY=1 or a GPU-less toolkit builds it."""
    monkeypatch.setattr(ops, "_IMPORT_ERROR", None)
    monkeypatch.setattr(ops, "fused_supports", lambda device_type: device_type == "cpu")


def test_auto_falls_back_on_a_device_without_kernels_and_says_why(build_without_cuda_kernels, caplog):
    with caplog.at_level(logging.WARNING, logger="fastmnist"):
        assert resolve_impl("auto", torch.device("cuda")) == "stock"
    assert "no CUDA kernels" in caplog.text and "FORCE_CUDA=1" in caplog.text
    assert resolve_impl("auto", "cpu") == "fused"


def test_fused_on_a_device_without_kernels_is_refused_up_front(build_without_cuda_kernels):
    with pytest.raises(RuntimeError, match="no CUDA kernels.*--impl stock"):
        resolve_impl("fused", "cuda")
    with pytest.raises(RuntimeError, match="no kernels for device type 'meta'"):
        ConvReLUBN(1, 2, 3, impl="fused", device="meta")


def test_auto_falls_back_without_the_extension_and_says_why(monkeypatch, caplog):
    monkeypatch.setattr(ops, "_IMPORT_ERROR", "the compiled extension fastmnist._C did not load (simulated)")
    with caplog.at_level(logging.WARNING, logger="fastmnist"):
        layer = ConvReLUBN(1, 2, 3)
    assert layer.impl == "stock"
    assert "did not load (simulated)" in caplog.text
    with pytest.raises(RuntimeError, match="did not load"):
        ConvReLUBN(1, 2, 3, impl="fused")


def test_auto_says_so_when_torch_differs_from_the_build():
    """_C built against another torch: one clear warning at import, fused reported off with that reason."""
    if importlib.util.find_spec("fastmnist._build_info") is None:
        pytest.skip("no fastmnist/_build_info.py: the extension was not built by this setup.py")
    code = (
        "import logging, torch, warnings\n"
        "torch.__version__ = '0.0.1+other'\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    from fastmnist import ops\n"
        "    from fastmnist.layers import resolve_impl\n"
        "print(len([w for w in caught if 'fastmnist' in str(w.message)]))\n"
        "print(ops.fused_available(), ops.fused_supports('cpu'))\n"
        "print(ops.fused_unavailable_reason())\n"
        "logging.basicConfig(format='LOG %(message)s')\n"
        "print(resolve_impl('auto'))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    n_warnings, available, reason, impl = run.stdout.splitlines()[-4:]
    assert n_warnings == "1" and available == "False False" and impl == "stock"
    assert "built against torch" in reason and "0.0.1+other is installed" in reason
    assert "pip install --no-build-isolation" in reason
    assert "LOG fastmnist: --impl auto uses the stock layers on cpu" in run.stderr


def test_unknown_impl_is_refused():
    with pytest.raises(ValueError, match="impl must be one of"):
        ConvReLUBN(1, 2, 3, impl="fast")


def test_fused_without_extension_says_why():
    """A process where fastmnist._C fails to import (simulated with sys.modules, so it runs whether or not
    the extension is built here): impl='fused' is refused with the reinstall command and the way out."""
    code = (
        "import sys\n"
        "sys.modules['fastmnist._C'] = None  # import fastmnist._C raises ImportError\n"
        "from fastmnist.layers import ConvReLUBN\n"
        "try:\n"
        "    ConvReLUBN(1, 2, 3, impl='fused')\n"
        "except RuntimeError as exc:\n"
        "    print(exc)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "fastmnist._C did not load" in run.stdout
    assert "pip install --no-build-isolation" in run.stdout and "impl='stock'" in run.stdout


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
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_fused_dropout_drops_the_channels_stock_dropout_drops(device):
    """Same RNG state (CPU or CUDA generator): the fused op's mask is Dropout2d's, so outputs and gradients agree."""
    torch.manual_seed(0)
    stock = ConvReLUBN(4, 16, 3, dropout=0.3, impl="stock").to(device)
    fused = ConvReLUBN(4, 16, 3, dropout=0.3, impl="fused").to(device)
    fused.load_state_dict(stock.state_dict())
    x = torch.randn(8, 4, 9, 9, device=device)
    outs = []
    for layer in (stock, fused):
        torch.manual_seed(1)
        y = layer(x)
        (y * torch.linspace(-1, 1, y.numel(), device=device).view_as(y)).sum().backward()
        outs.append((y, layer.conv.weight.grad, layer.bn.weight.grad))
    assert outs[0][0].eq(0).flatten(2).all(-1).any(), "some channels must be dropped"
    for a, b in zip(*outs):
        assert_close(a, b, rtol=1e-4, atol=1e-5)
    stock.eval(), fused.eval()  # dropout is the identity in eval
    assert_close(fused(x), stock.bn(torch.relu(stock.conv(x))), rtol=1e-4, atol=1e-5)


def test_bad_dropout_is_refused():
    with pytest.raises(ValueError, match="dropout must be in"):
        ConvReLUBN(1, 2, 3, dropout=1.0, impl="stock")


# Per-dimension padding: the fused modules give the stock layers' shape and values (the fused op once
# used padding[0] for both dimensions: ConvReLUBN(16, 24, (3, 5), padding=(1, 2)) returned width 11).
@needs_fused
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("kernel, padding, hw", [((3, 5), (1, 2), (14, 13)), ((5, 3), (2, 1), (10, 12)),
                                                 ((1, 3), (0, 1), (9, 11)), (3, "same", (8, 7)), (3, "valid", (8, 7)),
                                                 ((3, 5), "same", (9, 8))], ids=str)
def test_conv_relu_bn_pads_each_dimension_as_stock(kernel, padding, hw, device):
    torch.manual_seed(0)
    stock = ConvReLUBN(16, 24, kernel, padding=padding, impl="stock").to(device)
    fused = ConvReLUBN(16, 24, kernel, padding=padding, impl="fused").to(device)
    fused.load_state_dict(stock.state_dict())
    x = torch.randn(2, 16, *hw, device=device)
    for training in (True, False):
        stock.train(training), fused.train(training)
        y_s, y_f = stock(x), fused(x)
        assert y_f.shape == y_s.shape
        assert_close(y_f, y_s, rtol=1e-4, atol=1e-4)
    assert_close(fused.bn.running_var, stock.bn.running_var, rtol=1e-4, atol=1e-5)


@needs_fused
@pytest.mark.parametrize("kernel, padding", [((1, 3), (0, 1)), ((3, 5), (1, 2)), (3, "same")], ids=str)
def test_conv_pool_pads_each_dimension_as_stock(kernel, padding):
    torch.manual_seed(0)
    stock = ConvPool(8, 16, kernel, pool=2, padding=padding, impl="stock")
    fused = ConvPool(8, 16, kernel, pool=2, padding=padding, impl="fused")
    fused.load_state_dict(stock.state_dict())
    x = torch.randn(2, 8, 10, 9)
    assert fused(x).shape == stock(x).shape
    assert_close(fused(x), stock(x), rtol=1e-4, atol=1e-5)


@needs_fused
def test_same_padding_with_an_even_kernel_is_refused_for_fused():
    """nn.Conv2d's 'same' pads an even kernel unevenly; the fused ops pad both sides alike, so they refuse it."""
    with pytest.raises(ValueError, match=r"padding='same' with the even kernel \(3, 4\).*impl='stock'"):
        ConvReLUBN(4, 8, (3, 4), padding="same", impl="fused")
    with pytest.raises(ValueError, match="padding='same' with the even kernel"):
        ConvPool(4, 8, 2, pool=2, padding="same", impl="fused")
    assert ConvReLUBN(4, 8, (3, 4), padding="same", impl="stock")(torch.randn(2, 4, 6, 6)).shape == (2, 8, 6, 6)


@needs_fused
def test_conv_pool_decides_its_path_once(monkeypatch):
    """The device types a ConvPool runs fused on are decided at construction (from resolve_impl's answer),
    not again in forward: changing the module-level table afterwards changes nothing."""
    calls = []
    real = ops.conv_relu_pool
    monkeypatch.setattr(ops, "conv_relu_pool", lambda *a, **k: calls.append(1) or real(*a, **k))
    fused, stock = ConvPool(8, 16, 1, pool=2, impl="fused"), ConvPool(8, 16, 1, pool=2, impl="stock")
    assert fused.fused_devices == ops.CONV_RELU_POOL_DEVICES and stock.fused_devices == frozenset()
    assert "fused on ['cpu']" in repr(fused)
    monkeypatch.setattr(ops, "CONV_RELU_POOL_DEVICES", frozenset())
    x = torch.randn(2, 8, 6, 6)
    fused(x), stock(x)
    assert calls == [1]
