"""The fused operator equals BatchNorm2d(ReLU(Conv2d(x))): outputs, gradients, running statistics."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from conftest import cpu_and_cuda
from fastmnist import ops

pytestmark = pytest.mark.skipif(not ops.fused_available(), reason=f"{ops.fused_unavailable_reason()}")

# (batch, in channels, out channels, height, width, kernel, padding): the
# network's channel counts and kernels at small sizes, and odd shapes. Fixed
# float32 tolerances hold here; at the network's full sizes the stock layers'
# own rounding exceeds them, and test_float32_error_at_most_twice_stock judges.
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
]
NETWORK_SHAPES = [(128, 1, 16, 28, 28, 3, 0), (128, 24, 32, 24, 24, 3, 0), (128, 16, 24, 11, 11, 3, 0)]


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


def stock(conv, bn, x):
    return bn(F.relu(conv(x)))


def fused(conv, bn, x):
    """The op through its public entry point, with state in bn's own buffers."""
    if bn.training:
        bn.num_batches_tracked.add_(1)
    return ops.conv_relu_bn(x, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                            bn.training, bn.momentum, bn.eps, conv.padding[0])


def grads(y, conv, bn, x, gy):
    inputs = [x, conv.weight, conv.bias, bn.weight, bn.bias]
    return torch.autograd.grad(y, inputs, gy)


def run_both(shape, device, dtype, training, x_layout=lambda x: x):
    n, cin, cout, h, w, k, pad = shape
    conv_s, bn_s = make_layers(cin, cout, k, pad, device, dtype)
    conv_f, bn_f = make_layers(cin, cout, k, pad, device, dtype)
    bn_s.train(training)
    bn_f.train(training)
    torch.manual_seed(1)
    x = x_layout(torch.randn(n, cin, h, w, dtype=torch.float64).to(device, dtype)).requires_grad_()
    y_s, y_f = stock(conv_s, bn_s, x), fused(conv_f, bn_f, x)
    # Upstream gradients at the scale a batch-mean loss gives them (O(1/N)),
    # so fixed absolute tolerances mean the same at every batch size; the
    # scale-free float64-reference test below uses unit gradients.
    gy = (torch.randn(y_s.shape, dtype=torch.float64) / n).to(device, dtype)
    return (y_s, grads(y_s, conv_s, bn_s, x, gy), bn_s), (y_f, grads(y_f, conv_f, bn_f, x, gy), bn_f)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_stock_layers(shape, training, dtype, device):
    if training and shape[0] * (shape[3] + 2 * shape[6] - shape[5] + 1) * (shape[4] + 2 * shape[6] - shape[5] + 1) < 2:
        pytest.skip("BatchNorm needs more than one value per channel")
    (y_s, g_s, bn_s), (y_f, g_f, bn_f) = run_both(shape, device, dtype, training)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    assert_close(y_f, y_s, **tol)
    for name, a, b in zip(["x", "weight", "bias", "bn_weight", "bn_bias"], g_f, g_s):
        assert_close(a, b, **tol, msg=lambda m: f"grad of {name}: {m}")
    for buf in ["running_mean", "running_var", "num_batches_tracked"]:
        assert_close(getattr(bn_f, buf), getattr(bn_s, buf), **tol)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("shape", NETWORK_SHAPES + SHAPES[3:], ids=str)
def test_float32_error_at_most_twice_stock(shape, device):
    """flash-attention's rule: against a float64 reference, fused float32 error <= 2x stock float32 error."""
    n, cin, cout, h, w, k, pad = shape
    torch.manual_seed(2)
    x64 = torch.randn(n, cin, h, w, device=device, dtype=torch.float64)
    conv64, bn64 = make_layers(cin, cout, k, pad, device, torch.float64)
    ref_y = stock(conv64, bn64, x64.requires_grad_())
    gy64 = torch.randn_like(ref_y)
    ref = [ref_y, *grads(ref_y, conv64, bn64, x64, gy64), bn64.running_mean, bn64.running_var]

    def run(fn):
        conv, bn = make_layers(cin, cout, k, pad, device, torch.float32)
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
    (y_s, g_s, _), (y_f, g_f, _) = run_both((3, 16, 8, 10, 9, 3, 1), device, torch.float32, True, to_layout)
    assert_close(y_f, y_s, rtol=1e-4, atol=1e-5)
    for a, b in zip(g_f, g_s):
        assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("pad", [0, 1])
def test_gradcheck_float64(pad, training, device):
    conv, bn = make_layers(3, 4, 3, pad, device, torch.float64)
    x = torch.randn(2, 3, 5, 6, device=device, dtype=torch.float64, requires_grad=True)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()

    def f(x, w, b, g, beta):  # fresh copies of the buffers: gradcheck calls f many times
        return ops.conv_relu_bn(x, w, b, g, beta, rm.clone(), rv.clone(), training, 0.1, 1e-5, pad)

    assert torch.autograd.gradcheck(f, (x, conv.weight, conv.bias, bn.weight, bn.bias))


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_opcheck(device):
    conv, bn = make_layers(4, 6, 3, 1, device, torch.float32)
    x = torch.randn(3, 4, 7, 5, device=device, requires_grad=True)
    for training in (True, False):
        args = (x, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, training, 1e-5, 1)
        torch.library.opcheck(torch.ops.fastmnist.conv_relu_bn.default, args)
    y, r, mean, var = torch.ops.fastmnist.conv_relu_bn(*args)
    bargs = (torch.randn_like(y), x.detach(), conv.weight.detach(), r, bn.weight.detach(), mean, var, True, 1e-5, 1, True)
    torch.library.opcheck(torch.ops.fastmnist.conv_relu_bn_backward.default, bargs)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(4, 1, 16, 14, 13, 3, 0), (3, 16, 24, 9, 9, 3, 0), (2, 5, 7, 5, 8, 3, 1)], ids=str)
def test_channel_scale_matches_stock_times_mask(shape, training, dtype, device):
    """channel_scale (a Dropout2d mask, some channels 0) scales y; the gradients are those of y * mask."""
    n, cin, cout, h, w, k, pad = shape
    conv_s, bn_s = make_layers(cin, cout, k, pad, device, dtype)
    conv_f, bn_f = make_layers(cin, cout, k, pad, device, dtype)
    bn_s.train(training), bn_f.train(training)
    torch.manual_seed(4)
    x = torch.randn(n, cin, h, w, dtype=torch.float64).to(device, dtype).requires_grad_()
    mask = (torch.rand(n, cout, dtype=torch.float64) > 0.3).to(device, dtype) / 0.7
    y_s = stock(conv_s, bn_s, x) * mask[:, :, None, None]
    y_f = ops.conv_relu_bn(x, conv_f.weight, conv_f.bias, bn_f.weight, bn_f.bias, bn_f.running_mean,
                           bn_f.running_var, training, 0.1, 1e-5, pad, channel_scale=mask)
    gy = (torch.randn(y_s.shape, dtype=torch.float64) / n).to(device, dtype)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    assert_close(y_f, y_s, **tol)
    for name, a, b in zip(["x", "weight", "bias", "bn_weight", "bn_bias"],
                          grads(y_f, conv_f, bn_f, x, gy), grads(y_s, conv_s, bn_s, x, gy)):
        assert_close(a, b, **tol, msg=lambda m: f"grad of {name}: {m}")
    assert_close(bn_f.running_mean, bn_s.running_mean, **tol)
    assert_close(bn_f.running_var, bn_s.running_var, **tol)


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
            bn.running_mean.float(), bn.running_var.float(), True, 1e-5, 1, scale.float())
    torch.library.opcheck(torch.ops.fastmnist.conv_relu_bn.default, args)


def test_dropout2d_scale_draws_what_dropout2d_draws():
    y = torch.ones(64, 24, 3, 3)
    torch.manual_seed(7)
    expected = torch.nn.functional.dropout2d(y, 0.2, training=True)[:, :, 0, 0]
    torch.manual_seed(7)
    assert torch.equal(ops.dropout2d_scale(y, 24, 0.2), expected)
    assert expected.eq(0).any() and expected.eq(1 / 0.8).any()


@pytest.mark.needs_cuda
def test_cuda_matches_cpu():
    """Fused CUDA equals fused CPU on the same inputs and parameters."""
    results = {}
    for device in ("cpu", "cuda"):
        conv, bn = make_layers(16, 32, 3, 0, device, torch.float64)
        x = torch.randn(4, 16, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).to(device)
        x.requires_grad_()
        y = fused(conv, bn, x)
        gy = torch.ones_like(y).cumsum(-1).sin()
        results[device] = [y, *grads(y, conv, bn, x, gy), bn.running_mean, bn.running_var]
    for a, b in zip(results["cuda"], results["cpu"]):
        assert_close(a.cpu(), b, rtol=1e-9, atol=1e-11)


def test_grad_x_skipped_when_input_needs_none():
    conv, bn = make_layers(1, 16, 3, 0, "cpu", torch.float32)
    y = fused(conv, bn, torch.randn(2, 1, 8, 8))
    y.sum().backward()
    assert conv.weight.grad is not None and bn.weight.grad is not None


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
        (lambda a: {**a, "channel_scale": torch.ones(2, 3)}, r"channel_scale must have shape \(2, 4\)"),
        (lambda a: {**a, "channel_scale": torch.ones(2, 4, dtype=torch.float64)}, "channel_scale has dtype"),
    ],
    ids=["dtype", "rank", "channels", "int", "bias", "bn_weight", "running_var", "too_small", "one_value", "padding",
         "channel_scale_shape", "channel_scale_dtype"],
)
def test_bad_inputs_raise_clear_errors(change, message):
    conv, bn = make_layers(3, 4, 3, 0, "cpu", torch.float32)
    args = dict(x=torch.randn(2, 3, 5, 5), weight=conv.weight, bias=conv.bias, bn_weight=bn.weight, bn_bias=bn.bias,
                running_mean=bn.running_mean, running_var=bn.running_var, training=True, momentum=0.1, eps=1e-5,
                padding=0)
    with pytest.raises(RuntimeError, match=message):
        ops.conv_relu_bn(**change(args))


def test_reference_matches_stock():
    conv, bn = make_layers(3, 4, 3, 1, "cpu", torch.float64)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    y = ops.reference_conv_relu_bn(x, conv.weight, conv.bias, bn.weight, bn.bias, rm, rv, True, 0.1, 1e-5, 1)
    assert_close(y, stock(conv, bn, x))
    assert_close(rm, bn.running_mean)
