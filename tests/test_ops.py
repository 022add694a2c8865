"""The fused operator equals BatchNorm2d(ReLU(Conv2d(x))): outputs, gradients, running statistics.

One set of equivalence tests for every device (cpu_and_cuda(): the CUDA runs are marked needs_cuda
and skip without a GPU): float64 against the stock layers at tight tolerances, and float32 by the
float64-reference rule (the fused error at most twice the stock layers' error).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair
from torch.testing import assert_close

from conftest import cpu_and_cuda
from fastmnist import ops

pytestmark = pytest.mark.skipif(not ops.fused_available(), reason=f"{ops.fused_unavailable_reason()}")

# (batch, in channels, out channels, height, width, kernel, padding); kernel and padding are an int or
# (rows, columns), as nn.Conv2d takes them. The network's channel counts and kernels at small sizes,
# rectangular kernels with per-dimension padding (through the tiles on the CPU; Winograd for the 3x3
# with (0, 1); the direct tiles with FASTMNIST_WINOGRAD=0, im2col in float64 and with
# ATEN_CPU_CAPABILITY=default), and the shapes the CUDA tiling must get right: more than 64 output
# channels (a second channel tile), 40 and 24 (partial thread tiles), even kernels, padding as wide as
# the kernel or wider (im2col on the CPU).
SHAPES = [
    (4, 1, 16, 14, 13, 3, 0),
    (2, 16, 32, 10, 10, 3, 0),
    (3, 16, 16, 9, 9, 3, 0),
    (2, 24, 24, 8, 9, 3, 0),
    (1, 3, 5, 7, 6, 3, 1),
    (2, 5, 7, 5, 8, 1, 0),
    (5, 32, 16, 4, 3, 1, 1),
    (2, 7, 3, 6, 5, 3, 1),
    (2, 8, 32, 30, 29, 3, 1),  # wide rows: the weight gradient goes in several row blocks
    (2, 8, 16, 12, 10, 3, 1),  # Winograd on a padded input, forward and input gradient
    (2, 16, 24, 14, 13, (3, 5), (1, 2)),  # the rectangular block nn.Conv2d pads to 14x13
    (2, 8, 16, 10, 12, (5, 3), (2, 1)),
    (3, 8, 16, 9, 11, (1, 3), (0, 1)),
    (2, 8, 16, 12, 10, 3, (0, 1)),  # Winograd with per-dimension padding: 10x10 out, dz padded (2, 1)
    (3, 5, 72, 9, 7, 3, 1),
    (2, 24, 24, 11, 10, 3, 0),
    (2, 6, 40, 8, 9, (3, 2), 1),
    (3, 3, 7, 6, 8, (2, 4), 2),
    (2, 33, 5, 5, 5, 1, 0),
    (1, 2, 9, 4, 4, 2, 3),
]
# The default network's blocks (28 -> 26 -> 24, then 12 -> 10 -> 8 -> 6; all but the first on Winograd)
# and an odd size on the direct tiles.
NETWORK_SHAPES = [(128, 1, 16, 28, 28, 3, 0), (128, 16, 24, 26, 26, 3, 0), (128, 24, 24, 8, 8, 3, 0),
                  (128, 16, 24, 11, 11, 3, 0)]


def out_size(shape):
    """(Hout, Wout) of a shape above."""
    _, _, _, h, w, k, pad = shape
    (kh, kw), (ph, pw) = _pair(k), _pair(pad)
    return h + 2 * ph - kh + 1, w + 2 * pw - kw + 1


@pytest.fixture(autouse=True)
def no_tf32():
    """On CUDA the stock reference would otherwise drift ~1e-3 through TF32."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def make_layers(cin, cout, k, pad, device, dtype, seed=0):
    """A stock conv + BN with random (never trivial) parameters and statistics."""
    torch.manual_seed(seed)  # drawn in float64 on the CPU: the same values for every dtype and device
    conv = nn.Conv2d(cin, cout, k, padding=pad, dtype=torch.float64)
    bn = nn.BatchNorm2d(cout, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
    return conv.to(device, dtype), bn.to(device, dtype)


def stock(conv, bn, x, channel_scale=None):
    y = bn(F.relu(conv(x)))
    return y if channel_scale is None else y * channel_scale[:, :, None, None]


def fused(conv, bn, x, channel_scale=None):
    """The op through its public entry point, with state in bn's own buffers and conv's own padding."""
    if bn.training:
        bn.num_batches_tracked.add_(1)
    return ops.conv_relu_bn(x, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                            bn.training, bn.momentum, bn.eps, conv.padding, channel_scale)


def grads(y, conv, bn, x, gy):
    inputs = [x, conv.weight, conv.bias, bn.weight, bn.bias]
    return torch.autograd.grad(y, inputs, gy)


def away_from_relu_kink(conv, n, cin, h, w, margin=1e-5):
    """A random float64 input none of whose pre-activations lies within margin of 0.

    ReLU's gradient jumps at 0: where conv(x) is within float32 rounding of 0,
    the fused and stock convolutions may legitimately land on opposite sides
    and their gradients then differ by O(1) at that pixel (a 0.3 difference
    on this CPU with one seed). Such inputs test rounding, not the kernels.
    """
    weight, bias = conv.weight.detach().cpu().double(), conv.bias.detach().cpu().double()
    for seed in range(1, 100):
        torch.manual_seed(seed)
        x = torch.randn(n, cin, h, w, dtype=torch.float64)
        if F.conv2d(x, weight, bias, padding=conv.padding).abs().min() > margin:
            return x
    raise AssertionError("no input away from the ReLU kink in 99 seeds")


def dropout_mask(n, cout, seed=4):
    """A Dropout2d-like channel scale (some channels 0), drawn in float64 on the CPU."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, cout, dtype=torch.float64, generator=g) > 0.3).double() / 0.7


def run_both(shape, device, dtype, training, x_layout=lambda x: x, scale=False):
    n, cin, cout, h, w, k, pad = shape
    conv_s, bn_s = make_layers(cin, cout, k, pad, device, dtype)
    conv_f, bn_f = make_layers(cin, cout, k, pad, device, dtype)
    bn_s.train(training)
    bn_f.train(training)
    x = x_layout(away_from_relu_kink(conv_s, n, cin, h, w).to(device, dtype)).requires_grad_()
    mask = dropout_mask(n, cout).to(device, dtype) if scale else None
    y_s, y_f = stock(conv_s, bn_s, x, mask), fused(conv_f, bn_f, x, mask)
    # Upstream gradients at the scale a batch-mean loss gives them (O(1/N)),
    # so fixed absolute tolerances mean the same at every batch size; the
    # scale-free float64-reference test below uses unit gradients.
    gy = (torch.randn(y_s.shape, dtype=torch.float64) / n).to(device, dtype)
    return (y_s, grads(y_s, conv_s, bn_s, x, gy), bn_s), (y_f, grads(y_f, conv_f, bn_f, x, gy), bn_f)


def needs_two_values(shape, training):
    if training and shape[0] * out_size(shape)[0] * out_size(shape)[1] < 2:
        pytest.skip("BatchNorm needs more than one value per channel")


GRAD_NAMES = ["x", "weight", "bias", "bn_weight", "bn_bias"]


# float64: the fused op is the stock layers' function to ~1e-10. float32: fixed tolerances at these small
# sizes (at the network's full sizes the stock layers' own rounding exceeds them, and
# test_float32_error_at_most_twice_stock judges).
TOLERANCES = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-4, atol=1e-5)}


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("scale", [False, True], ids=["noscale", "scale"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_stock_layers(shape, training, scale, dtype, device):
    """y, the five gradients and every buffer, with and without a channel scale (a Dropout2d mask)."""
    needs_two_values(shape, training)
    (y_s, g_s, bn_s), (y_f, g_f, bn_f) = run_both(shape, device, dtype, training, scale=scale)
    assert y_f.shape == y_s.shape
    tol = TOLERANCES[dtype]
    assert_close(y_f, y_s, **tol)
    for name, a, b in zip(GRAD_NAMES, g_f, g_s):
        # A gradient is a sum over the batch's pixels: its rounding scales with its largest entry.
        assert_close(a, b, **dict(tol, atol=tol["atol"] * max(1.0, b.abs().max().item())),
                     msg=lambda m: f"grad of {name}: {m}")
    for buf in ["running_mean", "running_var", "num_batches_tracked"]:
        assert_close(getattr(bn_f, buf), getattr(bn_s, buf), **tol, msg=lambda m: f"{buf}: {m}")


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", NETWORK_SHAPES + SHAPES[3:], ids=str)
def test_float32_error_at_most_twice_stock(shape, training, device):
    """flash-attention's rule: against a float64 reference, fused float32 error <= 2x stock float32 error."""
    needs_two_values(shape, training)
    n, cin, cout, h, w, k, pad = shape
    conv64, bn64 = make_layers(cin, cout, k, pad, device, torch.float64)
    bn64.train(training)
    torch.manual_seed(2)
    x64 = torch.randn(n, cin, h, w, dtype=torch.float64).to(device)
    ref_y = stock(conv64, bn64, x64.requires_grad_())
    gy64 = torch.randn(ref_y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).to(device)
    ref = [ref_y, *grads(ref_y, conv64, bn64, x64, gy64), bn64.running_mean, bn64.running_var]

    def run(fn):
        conv, bn = make_layers(cin, cout, k, pad, device, torch.float32)
        bn.train(training)
        x = x64.detach().float().requires_grad_()
        y = fn(conv, bn, x)
        return [y, *grads(y, conv, bn, x, gy64.float()), bn.running_mean, bn.running_var]

    names = ["y", "grad_x", "grad_weight", "grad_bias", "grad_bn_weight", "grad_bn_bias", "running_mean", "running_var"]
    for name, r, s, f in zip(names, ref, run(stock), run(fused)):
        err_stock = (s.double() - r).abs().max().item()
        err_fused = (f.double() - r).abs().max().item()
        tiny = 1e-6 * (1 + r.abs().max().item())  # a few float32 ulps of the result's scale
        assert err_fused <= 2 * err_stock + tiny, f"{name}: fused error {err_fused:.3g} > 2 x stock error {err_stock:.3g}"


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_running_stats_after_several_steps(device):
    """Five training steps with different batches, then eval: same buffers, same eval output."""
    conv_s, bn_s = make_layers(16, 16, 3, 0, device, torch.float32)
    conv_f, bn_f = make_layers(16, 16, 3, 0, device, torch.float32)
    for step in range(5):
        x = torch.randn(6, 16, 11, 11, device=device) * (1 + step)
        stock(conv_s, bn_s, x), fused(conv_f, bn_f, x)
    for buf in ["running_mean", "running_var", "num_batches_tracked"]:
        assert_close(getattr(bn_f, buf), getattr(bn_s, buf), rtol=1e-4, atol=1e-5)
    bn_s.eval(), bn_f.eval()
    x = torch.randn(3, 16, 11, 11, device=device)
    assert_close(fused(conv_f, bn_f, x), stock(conv_s, bn_s, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("layout", ["channels_last", "non_contiguous", "sliced"])
def test_layouts(layout, device):
    to_layout = {
        "channels_last": lambda x: x.contiguous(memory_format=torch.channels_last),
        "non_contiguous": lambda x: x.transpose(2, 3).contiguous().transpose(2, 3),
        "sliced": lambda x: torch.cat([x, x], dim=1)[:, ::2],
    }[layout]
    (y_s, g_s, bn_s), (y_f, g_f, bn_f) = run_both((3, 16, 8, 10, 9, 3, 1), device, torch.float32, True, to_layout)
    assert_close(y_f, y_s, rtol=1e-4, atol=1e-5)
    for a, b in zip(g_f, g_s):
        assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert_close(bn_f.running_mean, bn_s.running_mean, rtol=1e-4, atol=1e-5)
    assert_close(bn_f.running_var, bn_s.running_var, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kernel, pad", [(3, 0), (3, 1), ((2, 3), (1, 0)), ((3, 1), (0, 1))])
def test_gradcheck_float64(kernel, pad, training, device):
    conv, bn = make_layers(3, 4, kernel, pad, device, torch.float64)
    x = torch.randn(2, 3, 5, 6, device=device, dtype=torch.float64, requires_grad=True)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()

    def f(x, w, b, g, beta):  # fresh copies of the buffers: gradcheck calls f many times
        return ops.conv_relu_bn(x, w, b, g, beta, rm.clone(), rv.clone(), training, 0.1, 1e-5, pad)

    assert torch.autograd.gradcheck(f, (x, conv.weight, conv.bias, bn.weight, bn.bias))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("kernel, pad", [(3, [1, 1]), ((3, 5), [1, 2])])
def test_opcheck(kernel, pad, device):
    conv, bn = make_layers(4, 6, kernel, pad, device, torch.float32)
    x = torch.randn(3, 4, 7, 5, device=device, requires_grad=True)
    for training in (True, False):
        args = (x, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, training, 1e-5, pad)
        torch.library.opcheck(torch.ops.fastmnist.conv_relu_bn.default, args)
    y, r, mean, var = torch.ops.fastmnist.conv_relu_bn(*args)
    bargs = (torch.randn_like(y), x.detach(), conv.weight.detach(), r, bn.weight.detach(), mean, var, True, 1e-5, pad,
             True)
    torch.library.opcheck(torch.ops.fastmnist.conv_relu_bn_backward.default, bargs)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_channel_scale_gradcheck_and_opcheck(device):
    conv, bn = make_layers(3, 4, 3, 1, device, torch.float64)
    x = torch.randn(2, 3, 5, 6, device=device, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor([[0.0, 2.0, 1.5, 1.0], [1.0, 0.0, 0.5, 3.0]], device=device, dtype=torch.float64)

    def f(x, w, b, g, beta):
        return ops.conv_relu_bn(x, w, b, g, beta, bn.running_mean.clone(), bn.running_var.clone(), True, 0.1,
                                1e-5, 1, channel_scale=scale)

    assert torch.autograd.gradcheck(f, (x, conv.weight, conv.bias, bn.weight, bn.bias))
    args = (x.float(), conv.weight.float(), conv.bias.float(), bn.weight.float(), bn.bias.float(),
            bn.running_mean.float(), bn.running_var.float(), True, 1e-5, [1, 1], scale.float())
    torch.library.opcheck(torch.ops.fastmnist.conv_relu_bn.default, args)


def test_dropout2d_scale_draws_what_dropout2d_draws():
    y = torch.ones(64, 24, 3, 3)
    torch.manual_seed(7)
    expected = torch.nn.functional.dropout2d(y, 0.2, training=True)[:, :, 0, 0]
    torch.manual_seed(7)
    assert torch.equal(ops.dropout2d_scale(y, 24, 0.2), expected)
    assert expected.eq(0).any() and expected.eq(1 / 0.8).any()


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_nan_propagates_as_in_stock_layers(training, device):
    """torch.relu and BatchNorm keep NaN, in y, the gradients and the running statistics: a fused
    max(v, 0), or a variance clamped with fmax(NaN, 0), would turn it into a number and hide it."""
    results = []
    for impl in (stock, fused):
        conv, bn = make_layers(4, 8, 3, 1, device, torch.float32)
        bn.train(training)
        x = torch.randn(2, 4, 7, 7, generator=torch.Generator().manual_seed(0))
        x[1, 2, 3, 4] = float("nan")
        x = x.to(device).requires_grad_()
        y = impl(conv, bn, x)
        results.append([y, *grads(y, conv, bn, x, torch.ones_like(y)), bn.running_mean, bn.running_var])
    assert results[1][0].isnan().any(), "the NaN vanished from y"
    if training:
        assert results[0][-1].isnan().any(), "the stock layers' running_var should hold the NaN"
    names = ["y", *GRAD_NAMES, "running_mean", "running_var"]
    for name, b, a in zip(names, *results):  # b: stock, a: fused
        assert torch.equal(a.isnan(), b.isnan()), f"{name}: NaN at other places than in the stock layers"
        finite = ~b.isnan()
        assert_close(a[finite], b[finite], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_grad_weight_comes_in_the_weights_memory_format(memory_format, device):
    """So AccumulateGrad stores it as it is, with no copy per block and step."""
    conv, bn = make_layers(8, 16, 3, 0, device, torch.float32)
    conv.weight.data = conv.weight.data.contiguous(memory_format=memory_format)
    y = fused(conv, bn, torch.randn(2, 8, 6, 6, device=device))
    grad_weight = torch.autograd.grad(y.sum(), conv.weight)[0]
    assert grad_weight.is_contiguous(memory_format=memory_format)
    assert grad_weight.stride() == conv.weight.stride()


@pytest.mark.parametrize("x_needs_grad", [False, True])
def test_grad_x_computed_only_when_the_input_needs_it(x_needs_grad):
    """The backward op is told compute_grad_x = needs_input_grad[0], and honours it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class RecordBackwardCalls(TorchDispatchMode):
        calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.name().startswith("fastmnist::conv_relu_bn_backward"):
                self.calls.append((args[10], out[0].numel()))
            return out

    conv, bn = make_layers(1, 16, 3, 0, "cpu", torch.float32)
    x = torch.randn(2, 1, 8, 8, requires_grad=x_needs_grad)
    y = fused(conv, bn, x)
    with RecordBackwardCalls():
        y.sum().backward()
    assert RecordBackwardCalls.calls == [(x_needs_grad, x.numel() if x_needs_grad else 0)]
    assert (x.grad is not None) == x_needs_grad
    assert conv.weight.grad is not None and bn.weight.grad is not None


# Widths beyond the network's own: every multiple of 8 up to 64 runs on the
# tiles, and other counts are padded to the next multiple of 8 (conv_path says so).
WIDTH_SHAPES = [
    (2, 20, 40, 9, 9, 3, 0),
    (2, 40, 48, 7, 8, 3, 1),
    (2, 48, 20, 6, 7, 3, 0),
    (2, 16, 64, 8, 8, 3, 0),
    (3, 56, 8, 6, 6, 3, 1),
    (2, 64, 10, 5, 5, 1, 0),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", WIDTH_SHAPES, ids=str)
def test_other_widths_match_stock_layers(shape, training):
    (y_s, g_s, bn_s), (y_f, g_f, bn_f) = run_both(shape, "cpu", torch.float32, training)
    assert_close(y_f, y_s, rtol=1e-4, atol=1e-5)
    for name, a, b in zip(["x", "weight", "bias", "bn_weight", "bn_bias"], g_f, g_s):
        assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, b.abs().max().item()), msg=lambda m: f"grad of {name}: {m}")
    assert_close(bn_f.running_mean, bn_s.running_mean, rtol=1e-4, atol=1e-5)
    assert_close(bn_f.running_var, bn_s.running_var, rtol=1e-4, atol=1e-5)


def tile_isa():
    """The tiles this process runs ('avx2', 'avx512') or None, as conv_path reports it."""
    path = ops.conv_path(torch.zeros(1, 8, 3, 3), torch.zeros(8, 8, 3, 3))
    return None if path.startswith("im2col") else path.split()[0]


@pytest.mark.parametrize("cin", [1, 8, 16, 20, 24, 32, 40, 48, 56, 64])
@pytest.mark.parametrize("cout", [8, 16, 20, 24, 32, 40, 48, 56, 64])
def test_every_width_runs_on_the_tiles(cin, cout):
    isa = tile_isa()
    if isa is None:
        pytest.skip("no tile ISA in this process (ATEN_CPU_CAPABILITY=default or no AVX2)")
    path = ops.conv_path(torch.zeros(2, cin, 9, 9), torch.zeros(cout, cin, 3, 3), 0, cin > 1)
    assert path.startswith(f"{isa} tiles"), path
    assert ("padded" in path) == (cout % 8 != 0 or (cin > 1 and cin % 8 != 0)), path


def test_winograd_runs_where_it_applies():
    """F(2x2, 3x3) for a 3x3 convolution whose input has a multiple of 8 channels and whose output size is
    even; the input gradient is judged on its own (its input is dz: Cout channels, output the input's size)."""
    isa = tile_isa()
    if isa is None:
        pytest.skip("no tile ISA in this process (ATEN_CPU_CAPABILITY=default or no AVX2)")
    if os.environ.get("FASTMNIST_WINOGRAD") == "0":
        pytest.skip("FASTMNIST_WINOGRAD=0 turns Winograd off in this process")
    wino = f"{isa} tiles, Winograd F(2x2,3x3)"
    assert ops.conv_path(torch.zeros(2, 16, 26, 26), torch.zeros(24, 16, 3, 3)) == f"{wino} forward and input gradient"
    assert ops.conv_path(torch.zeros(2, 16, 11, 11), torch.zeros(24, 16, 3, 3)) == f"{isa} tiles"  # 9x9 out
    assert ops.conv_path(torch.zeros(2, 1, 28, 28), torch.zeros(16, 1, 3, 3), 0, False) == f"{isa} tiles"
    assert ops.conv_path(torch.zeros(2, 20, 10, 10), torch.zeros(16, 20, 3, 3)) == (
        f"{wino} input gradient, Cin 20 padded to 24")
    assert ops.conv_path(torch.zeros(2, 16, 10, 10), torch.zeros(20, 16, 3, 3)) == (
        f"{wino} forward, Cout 20 padded to 24")
    assert ops.conv_path(torch.zeros(2, 16, 10, 10), torch.zeros(24, 16, 1, 1)) == f"{isa} tiles"  # 1x1


def test_conv_path_names_why_the_tiles_do_not_apply():
    x, w = torch.zeros(2, 8, 9, 9), torch.zeros(16, 8, 3, 3)
    assert ops.conv_path(x.double(), w.double()) == "im2col+BLAS: float64 (the tiles are float32)"
    assert ops.conv_path(x, w, padding=3).startswith("im2col+BLAS: padding")
    assert ops.conv_path(x, w, padding=(0, 3)).startswith("im2col+BLAS: padding")


def test_rectangular_kernels_with_per_dimension_padding_run_on_the_tiles():
    """The rectangular shapes test_matches_stock_layers checks run where they are meant to."""
    isa = tile_isa()
    if isa is None:
        pytest.skip("no tile ISA in this process (ATEN_CPU_CAPABILITY=default or no AVX2)")
    for x, w, pad in [((2, 16, 14, 13), (24, 16, 3, 5), (1, 2)), ((2, 8, 10, 12), (16, 8, 5, 3), (2, 1)),
                      ((3, 8, 9, 11), (16, 8, 1, 3), (0, 1))]:
        assert ops.conv_path(torch.zeros(x), torch.zeros(w), pad) == f"{isa} tiles", (x, w, pad)
    wino = ops.conv_path(torch.zeros(2, 8, 12, 10), torch.zeros(16, 8, 3, 3), (0, 1))
    if os.environ.get("FASTMNIST_WINOGRAD") != "0":
        assert wino == f"{isa} tiles, Winograd F(2x2,3x3) forward and input gradient"


def test_cpu_kernel_path_probes_a_block_of_the_default_network():
    """cpu_kernel_path names the path of a convolution the default network really has."""
    from fastmnist.layers import ConvReLUBN
    from fastmnist.model import build_model

    x_shape, w_shape = ops.DEFAULT_NETWORK_BLOCK
    seen, x = [], torch.zeros(1, 1, 28, 28)
    for layer in build_model("default", impl="stock"):
        if isinstance(layer, ConvReLUBN):
            seen.append(((1, *x.shape[1:]), tuple(layer.conv.weight.shape)))
        x = layer(x) if not isinstance(layer, nn.Flatten) else x
    assert (x_shape, w_shape) in seen, seen
    assert ops.cpu_kernel_path() == ops.conv_path(torch.zeros(x_shape), torch.zeros(w_shape))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: {**a, "x": a["x"].double()}, "dtype"),
        (lambda a: {**a, "x": a["x"][0]}, "4-D"),
        (lambda a: {**a, "x": a["x"][:, :2]}, "channels"),
        (lambda a: {**a, "x": a["x"].int()}, "float32 or float64"),
        (lambda a: {**a, "bias": a["bias"][:3]}, "bias must have shape"),
        (lambda a: {**a, "bn_weight": a["bn_weight"][:2]}, "bn_weight must have shape"),
        (lambda a: {**a, "running_var": torch.ones(5, 1)}, "running_var must have shape"),
        (lambda a: {**a, "x": a["x"][:, :, :1, :1]}, "smaller than the kernel"),
        (lambda a: {**a, "x": a["x"][:1, :, :3, :3]}, "more than 1 value per channel"),
        (lambda a: {**a, "padding": -1}, "padding"),
        (lambda a: {**a, "padding": (0, -1)}, r"padding must be >= 0, got \[0, -1\]"),
        (lambda a: {**a, "channel_scale": torch.ones(2, 3)}, r"channel_scale must have shape \(2, 4\)"),
        (lambda a: {**a, "channel_scale": torch.ones(2, 4, dtype=torch.float64)}, "channel_scale has dtype"),
    ],
    ids=["dtype", "rank", "channels", "int", "bias", "bn_weight", "running_var", "too_small", "one_value", "padding",
         "padding_pair",
         "channel_scale_shape", "channel_scale_dtype"],
)
def test_bad_inputs_raise_clear_errors(change, message):
    conv, bn = make_layers(3, 4, 3, 0, "cpu", torch.float32)
    args = dict(x=torch.randn(2, 3, 5, 5), weight=conv.weight, bias=conv.bias, bn_weight=bn.weight, bn_bias=bn.bias,
                running_mean=bn.running_mean, running_var=bn.running_var, training=True, momentum=0.1, eps=1e-5,
                padding=0)
    with pytest.raises(RuntimeError, match=message):
        ops.conv_relu_bn(**change(args))


@pytest.mark.parametrize("padding", [(1, 2, 3), "same", (1.0, 1), True])
def test_padding_that_is_not_an_int_or_a_pair_is_refused(padding):
    conv, bn = make_layers(3, 4, 3, 0, "cpu", torch.float32)
    with pytest.raises(ValueError, match="padding must be an int or \\(rows, columns\\)"):
        ops.conv_relu_bn(torch.randn(2, 3, 5, 5), conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean,
                         bn.running_var, True, padding=padding)


# Empty inputs: no channels, no rows or no columns (padding keeps the output non-empty). Unchecked, the
# CUDA launch shape divides by the channel count (SIGFPE kills Python) and an empty image launches an
# empty grid; both devices refuse them with the same message.
EMPTY_INPUTS = [((2, 0, 5, 5), (4, 0, 3, 3), 0), ((2, 3, 0, 5), (4, 3, 1, 1), 1), ((2, 3, 5, 0), (4, 3, 1, 1), 1),
                ((2, 3, 0, 0), (4, 3, 3, 3), 2)]


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("x_shape, w_shape, pad", EMPTY_INPUTS, ids=str)
def test_empty_inputs_are_refused_naming_the_shape(x_shape, w_shape, pad, device):
    x, w, c = torch.randn(x_shape, device=device), torch.randn(w_shape, device=device), torch.ones(4, device=device)
    shape = str(list(x_shape)).replace("[", r"\[").replace("]", r"\]")
    message = f"at least one channel, row and column, got shape {shape}"
    for training in (True, False):
        with pytest.raises(RuntimeError, match=f"conv_relu_bn: x must have {message}"):
            ops.conv_relu_bn(x, w, c, c, c, c.clone(), c.clone(), training, padding=pad)
    y = torch.zeros(x_shape[0], 4, x_shape[2] + 2 * pad - w_shape[2] + 1, x_shape[3] + 2 * pad - w_shape[3] + 1,
                    device=device)
    with pytest.raises(RuntimeError, match=f"conv_relu_bn_backward: x must have {message}"):
        torch.ops.fastmnist.conv_relu_bn_backward(y, x, w, y, c, c, c, True, 1e-5, [pad, pad], True)
    if device == "cpu":  # conv_relu_pool has CPU kernels only
        with pytest.raises(RuntimeError, match=f"conv_relu_pool: x must have {message}"):
            ops.conv_relu_pool(x, w, c, pool=1, padding=pad)


def test_reference_matches_stock():
    conv, bn = make_layers(3, 4, 3, 1, "cpu", torch.float64)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    y = ops.reference_conv_relu_bn(x, conv.weight, conv.bias, bn.weight, bn.bias, rm, rv, True, 0.1, 1e-5, 1)
    assert_close(y, stock(conv, bn, x))
    assert_close(rm, bn.running_mean)
    assert_close(rv, bn.running_var)


def cpu_has(capability):
    """Whether this CPU can run ATen's capability (cpu flags, not ATen: ATen believes a forced value)."""
    if capability == "default":
        return True
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        return False
    need = {"avx2": {"avx2", "fma"}, "avx512": {"avx2", "fma", "avx512f", "avx512vl", "avx512bw", "avx512dq"}}
    return need[capability] <= flags


@pytest.mark.parametrize("capability, winograd, path", [
    ("default", "1", "im2col+BLAS"), ("avx2", "1", "avx2 tiles, Winograd"), ("avx2", "0", "avx2 tiles"),
    ("avx512", "1", "avx512 tiles, Winograd"), ("avx512", "0", "avx512 tiles")])
def test_equivalence_suite_on_each_cpu_capability(capability, winograd, path):
    """ATEN_CPU_CAPABILITY forces each path this CPU has, and FASTMNIST_WINOGRAD=0 the direct tiles where
    Winograd would run; the CPU equivalence tests then pass on each."""
    if not cpu_has(capability):
        pytest.skip(f"this CPU cannot run {capability}")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "FASTMNIST_WINOGRAD": winograd,
           "PYTHONPATH": os.pathsep.join(sys.path)}
    probe = subprocess.run(
        [sys.executable, "-c", "import torch; from fastmnist import ops; "
         "print(ops.conv_path(torch.zeros(2, 16, 10, 10), torch.zeros(24, 16, 3, 3)))"],
        capture_output=True, text=True, env=env, timeout=120)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip().startswith(path) and ("Winograd" in probe.stdout) == (winograd == "1" and
                                                                                      capability != "default"), probe.stdout
    suite = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p", "no:cacheprovider", "-k",
         "(matches_stock or widths or layouts or channel_scale or nan or gradcheck or twice_stock or pool) and not cuda"],
        capture_output=True, text=True, env=env, timeout=600, cwd=Path(__file__).parent.parent)
    assert suite.returncode == 0, suite.stdout[-3000:] + suite.stderr[-2000:]
    assert " passed" in suite.stdout.splitlines()[-1], suite.stdout[-500:]


# conv_relu_pool: the transition (1x1 conv 32 -> 16, ReLU, AvgPool2d(2)) and the head (1x1 conv 16 -> 10,
# global average pooling) at small sizes, and odd shapes: 3x3 kernels with padding, a pool that drops a row
# and a column (floor mode), widths that are not multiples of 8.
# (batch, in channels, out channels, height, width, kernel, padding, pool, relu)
POOL_SHAPES = [
    (3, 32, 16, 10, 10, 1, 0, 2, True),
    (4, 16, 10, 7, 7, 1, 0, 7, False),
    (2, 5, 7, 9, 8, 3, 1, 2, True),
    (2, 20, 40, 11, 11, 1, 0, 3, True),
    (2, 48, 20, 6, 5, 3, 0, 2, False),
    (2, 5, 7, 9, 8, (1, 3), (0, 1), 2, True),  # per-dimension padding, rectangular kernels
    (2, 8, 16, 10, 12, (3, 5), (1, 2), 2, False),
    (3, 8, 16, 9, 7, (5, 3), (2, 1), 3, True),
]


def pool_stock(x, weight, bias, pool, relu, padding):
    z = F.conv2d(x, weight, bias, padding=padding)
    return F.avg_pool2d(F.relu(z) if relu else z, pool)


def pool_inputs(shape, dtype, seed=0):
    n, cin, cout, h, w, k, pad, pool, relu = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, dtype=torch.float64, generator=g)
    kh, kw = _pair(k)
    weight = torch.randn(cout, cin, kh, kw, dtype=torch.float64, generator=g) / (cin * kh * kw) ** 0.5
    bias = torch.randn(cout, dtype=torch.float64, generator=g)
    return [t.to(dtype).requires_grad_() for t in (x, weight, bias)], dict(pool=pool, relu=relu, padding=pad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", POOL_SHAPES, ids=str)
def test_pool_matches_stock_layers(shape, dtype):
    (x, weight, bias), kw = pool_inputs(shape, dtype)
    y_s, y_f = pool_stock(x, weight, bias, **kw), ops.conv_relu_pool(x, weight, bias, **kw)
    gy = torch.randn(y_s.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(dtype)
    tol = TOLERANCES[dtype]
    assert_close(y_f, y_s, **tol)
    for name, a, b in zip(["x", "weight", "bias"], torch.autograd.grad(y_f, [x, weight, bias], gy),
                          torch.autograd.grad(y_s, [x, weight, bias], gy)):
        assert_close(a, b, **dict(tol, atol=tol["atol"] * max(1.0, b.abs().max().item())),
                     msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("relu", [True, False])
def test_pool_gradcheck_and_opcheck(relu):
    (x, weight, bias), kw = pool_inputs((2, 3, 4, 6, 5, 3, 1, 2, relu), torch.float64)
    torch.autograd.gradcheck(lambda x, w, b: ops.conv_relu_pool(x, w, b, **kw), (x, weight, bias))
    torch.library.opcheck(torch.ops.fastmnist.conv_relu_pool.default,
                          (x, weight, bias, relu, kw["padding"], kw["pool"]))


def test_pool_nan_propagates_as_in_stock_layers():
    (x, weight, bias), kw = pool_inputs(POOL_SHAPES[0], torch.float32)
    with torch.no_grad():
        x[1, 3, 4, 5] = float("nan")
    y_s, y_f = pool_stock(x, weight, bias, **kw), ops.conv_relu_pool(x, weight, bias, **kw)
    assert y_f.isnan().any() and torch.equal(y_f.isnan(), y_s.isnan())
    gy = torch.ones_like(y_s)
    for a, b in zip(torch.autograd.grad(y_f, [x, weight, bias], gy), torch.autograd.grad(y_s, [x, weight, bias], gy)):
        assert torch.equal(a.isnan(), b.isnan())
        assert_close(a[~b.isnan()], b[~b.isnan()], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: {**a, "pool": 0}, r"pool must be in \[1, 8\]"),
        (lambda a: {**a, "pool": 9}, r"pool must be in \[1, 8\]"),
        (lambda a: {**a, "bias": a["bias"][:2]}, "bias must have shape"),
        (lambda a: {**a, "x": a["x"].double()}, "dtype"),
    ],
    ids=["pool_0", "pool_too_big", "bias", "dtype"],
)
def test_pool_bad_inputs_raise_clear_errors(change, message):
    args = dict(x=torch.randn(2, 3, 8, 8), weight=torch.randn(4, 3, 1, 1), bias=torch.randn(4), pool=2)
    with pytest.raises(RuntimeError, match=message):
        ops.conv_relu_pool(**change(args))


@pytest.mark.parametrize("shape", [(128, 32, 16, 22, 22, 1, 0, 2, True), (128, 16, 10, 7, 7, 1, 0, 7, False)],
                         ids=["transition", "head"])
def test_pool_float32_error_at_most_twice_stock(shape):
    """The network's transition and head at full size, by the same rule as the blocks."""
    (x64, w64, b64), kw = pool_inputs(shape, torch.float64, seed=2)
    ref_y = pool_stock(x64, w64, b64, **kw)
    gy = torch.randn(ref_y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ref = [ref_y, *torch.autograd.grad(ref_y, [x64, w64, b64], gy)]

    def run(fn):
        x, w, b = (t.detach().float().requires_grad_() for t in (x64, w64, b64))
        y = fn(x, w, b, **kw)
        return [y, *torch.autograd.grad(y, [x, w, b], gy.float())]

    for name, r, s, f in zip(["y", "grad_x", "grad_weight", "grad_bias"], ref, run(pool_stock), run(ops.conv_relu_pool)):
        err_stock, err_fused = (s.double() - r).abs().max().item(), (f.double() - r).abs().max().item()
        tiny = 1e-6 * (1 + r.abs().max().item())
        assert err_fused <= 2 * err_stock + tiny, f"{name}: fused error {err_fused:.3g} > 2 x stock error {err_stock:.3g}"

# ---------------------------------------------------------------- CUDA only
# What only a GPU can show: CUDA against the CPU on the same float64 inputs, bitwise repeatability,
# the current stream, the same messages on both devices. (Every equivalence test above runs on CUDA
# too, through cpu_and_cuda().) Shapes: (n, cin, cout, h, w, kh, kw, (pad_h, pad_w)).
CUDA_SHAPES = [
    (3, 5, 72, 9, 7, 3, 3, (1, 1)),
    (2, 24, 24, 11, 10, 3, 3, (0, 0)),
    (2, 6, 40, 8, 9, 3, 2, (1, 1)),
    (3, 3, 7, 6, 8, 2, 4, (2, 2)),
    (2, 33, 5, 5, 5, 1, 1, (0, 0)),
    (1, 2, 9, 4, 4, 2, 2, (3, 3)),
    (2, 16, 24, 14, 13, 3, 5, (1, 2)),
]


def op_inputs(shape, device, dtype, scale, seed=0):
    """Random arguments of the raw op (never trivial), drawn in float64 on the CPU."""
    n, cin, cout, h, w, kh, kw, (ph, pw) = shape
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, dtype=torch.float64, generator=g)  # noqa: E731
    u = lambda *s: torch.rand(*s, dtype=torch.float64, generator=g)  # noqa: E731
    args = dict(x=r(n, cin, h, w), weight=r(cout, cin, kh, kw) * 0.3, bias=r(cout) * 0.1, bn_weight=u(cout) + 0.5,
                bn_bias=r(cout) * 0.5, running_mean=r(cout) * 0.2, running_var=u(cout) + 0.5,
                channel_scale=(u(n, cout) * 2).where(u(n, cout) > 0.3, torch.zeros(())) if scale else None,
                grad_y=r(n, cout, h + 2 * ph - kh + 1, w + 2 * pw - kw + 1))
    return {k: (v.to(device, dtype) if v is not None else None) for k, v in args.items()}


def op_forward_backward(a, training, pad, grad_x=True):
    """y, relu_out, mean, var and the five gradients of the raw ops."""
    y, r, mean, var = torch.ops.fastmnist.conv_relu_bn(a["x"], a["weight"], a["bias"], a["bn_weight"], a["bn_bias"],
                                                       a["running_mean"], a["running_var"], training, 1e-5, pad,
                                                       a["channel_scale"])
    g = torch.ops.fastmnist.conv_relu_bn_backward(a["grad_y"], a["x"], a["weight"], r, a["bn_weight"], mean, var,
                                                  training, 1e-5, pad, grad_x, a["channel_scale"])
    return [y, r, mean, var, *g]


@pytest.mark.needs_cuda
@pytest.mark.parametrize("scale", [False, True], ids=["noscale", "scale"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=str)
def test_cuda_matches_cpu_float64(shape, training, scale):
    """Fused CUDA equals fused CPU on the same float64 inputs, every output."""
    cpu = op_forward_backward(op_inputs(shape, "cpu", torch.float64, scale), training, shape[-1])
    cuda = op_forward_backward(op_inputs(shape, "cuda", torch.float64, scale), training, shape[-1])
    for i, (a, b) in enumerate(zip(cuda, cpu)):
        assert_close(a.cpu(), b, rtol=1e-9, atol=1e-10 * max(1.0, b.abs().max().item()), msg=lambda m: f"output {i}: {m}")


@pytest.mark.needs_cuda
@pytest.mark.parametrize("shape", [CUDA_SHAPES[0], CUDA_SHAPES[1], (64, 16, 24, 13, 13, 3, 3, (0, 0))], ids=str)
def test_cuda_bitwise_repeatable(shape):
    """The determinism claim: fixed-order partial sums, no atomics, so a second run is bitwise equal."""
    a = op_inputs(shape, "cuda", torch.float32, scale=True)
    first = op_forward_backward(a, True, shape[-1])
    for _ in range(3):
        again = op_forward_backward(a, True, shape[-1])
        for i, (u, v) in enumerate(zip(first, again)):
            assert torch.equal(u, v), f"output {i} differs between identical calls"


@pytest.mark.needs_cuda
def test_cuda_runs_on_the_current_stream():
    """Results on a non-default stream equal those on the default stream (kernels use the current stream)."""
    shape = CUDA_SHAPES[0]
    a = op_inputs(shape, "cuda", torch.float32, scale=True)
    ref = op_forward_backward(a, True, shape[-1])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # a busy stream: later launches must queue behind earlier ones
            out = op_forward_backward(a, True, shape[-1])
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for u, v in zip(ref, out):
        assert torch.equal(u, v)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("change, message", [
    (dict(x=torch.randn(2, 3, 2, 2)), "is smaller than the kernel"),
    (dict(weight=torch.randn(4, 5, 3, 3)), "channels"),
    (dict(bias=torch.randn(5)), "bias must have shape"),
    (dict(channel_scale=torch.ones(3, 4)), "channel_scale must have shape"),
    (dict(x=torch.randn(2, 0, 6, 6), weight=torch.randn(4, 0, 3, 3)), "at least one channel, row and column"),
    (dict(x=torch.randn(2, 3, 0, 6)), "at least one channel, row and column"),
])
def test_cuda_errors_match_the_cpu(change, message):
    """Same bad input, same message on either device (csrc/checks.h)."""
    errors = {}
    for device in ("cpu", "cuda"):
        base = dict(x=torch.randn(2, 3, 6, 6), weight=torch.randn(4, 3, 3, 3), bias=torch.randn(4),
                    channel_scale=None)
        args = {k: (v.to(device) if v is not None else None) for k, v in {**base, **change}.items()}
        c = torch.ones(4, device=device)
        with pytest.raises(RuntimeError, match=message) as info:
            torch.ops.fastmnist.conv_relu_bn(args["x"], args["weight"], args["bias"], c, c, c, c, True, 1e-5, [0, 0],
                                             args["channel_scale"])
        errors[device] = str(info.value).splitlines()[0]
    assert errors["cuda"] == errors["cpu"]


@pytest.mark.needs_cuda
def test_cuda_conv_path_describes_the_kernels():
    x, w = torch.randn(2, 24, 8, 8, device="cuda"), torch.randn(24, 24, 3, 3, device="cuda")
    path = ops.conv_path(x, w)
    assert "cuda" in path and "24 channels a block" in path


@pytest.mark.needs_cuda
def test_cuda_fused_and_stock_models_follow_the_same_loss_trajectory():
    """The model-level check of test_model.py, on the GPU: 20 SGD steps, losses agree step by step."""
    from fastmnist.model import build_model

    torch.manual_seed(0)
    stock_m = build_model(impl="stock", dropout=0.0).cuda()
    fused_m = build_model(impl="fused", dropout=0.0).cuda()
    fused_m.load_state_dict(stock_m.state_dict())
    fused_m = fused_m.to(memory_format=torch.channels_last)
    opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in (stock_m, fused_m)]
    gen = torch.Generator().manual_seed(1)
    losses = {0: [], 1: []}
    for _ in range(20):
        x = torch.rand(32, 1, 28, 28, generator=gen).cuda()
        y = torch.randint(0, 10, (32,), generator=gen).cuda()
        for i, (model, opt) in enumerate(zip((stock_m, fused_m), opts)):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(), loss.backward(), opt.step()
            losses[i].append(loss.item())
    assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-3, atol=1e-4)


@pytest.mark.skipif(not cpu_has("avx2"), reason="needs an x86-64 CPU with AVX2 and FMA")
def test_tile_loops_at_the_avx512_builds_shapes(tmp_path):
    """This CPU may lack AVX-512: the AVX-512 build's tile shapes still run here, on AVX2 instructions."""
    import shutil

    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("needs g++")
    repo = Path(__file__).resolve().parent.parent
    exe = tmp_path / "tile_shapes"
    build = subprocess.run([compiler, "-O2", "-std=c++17", f"-I{repo / 'csrc' / 'cpu' / 'engine'}",
                            str(repo / "tests" / "native" / "tile_shapes.cpp"), "-o", str(exe)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
