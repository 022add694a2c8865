import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from fastmnist import ops
from fastmnist.layers import ConvReLUBN
from fastmnist.model import LAYOUTS, build_model, count_parameters

needs_fused = pytest.mark.skipif(not ops.fused_available(), reason=f"{ops.fused_unavailable_reason()}")


def test_parameter_counts():
    assert count_parameters(build_model("reference", impl="stock")) == 12650  # docs/assignment.md's network
    assert count_parameters(build_model(impl="stock")) == 18410 < 20000
    assert count_parameters(build_model("tiny", impl="stock")) == 4474 <= 5000  # the tiny model's bound (issue 22)


@needs_fused
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_every_model_runs_its_3x3_blocks_on_the_tiles_unpadded(name):
    """Each model's widths are ones the CPU tiles take at full speed: no im2col, no channel padding, and
    Winograd for every block but the first (one input channel: nothing to gain) whose output size is even
    (the reference network's blocks after the pooling, 11 -> 9 -> 7, are not) and 3x3 (a separable block's
    1x1 conv is plain tiles)."""
    x = torch.zeros(2, 1, 28, 28)
    for i, layer in enumerate(build_model(name, impl="fused")):
        if isinstance(layer, ConvReLUBN):  # the first block's input is the images: no gradient wanted
            path = ops.conv_path(x.contiguous(memory_format=torch.channels_last), layer.conv.weight,
                                 compute_grad_x=i > 1)
            wino = (i > 1 and layer.conv.kernel_size == (3, 3) and (x.shape[-1] - 2) % 2 == 0
                    and os.environ.get("FASTMNIST_WINOGRAD") != "0")
            expected = "tiles, Winograd F(2x2,3x3) forward and input gradient" if wino else "tiles"
            assert path.endswith(expected) and "padded" not in path, (layer, path)
        x = layer.eval()(x)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_no_fully_connected_layer(name):
    model = build_model(name, impl="stock")
    assert not any(isinstance(m, (nn.Linear, nn.Bilinear)) for m in model.modules())
    before, _, after = LAYOUTS[name]
    assert sum(isinstance(m, ConvReLUBN) for m in model.modules()) == len(before) + len(after)


def test_output_shape_and_no_parameters_in_normalisation():
    model = build_model(impl="stock").eval()
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    assert all(p.requires_grad for p in model.parameters())
    assert "0.mean" in model.state_dict() and "0.std" in model.state_dict()


def test_build_model_decides_the_impl_for_its_device():
    """One decision, for the device the model is built on: no kernels there, no fused blocks."""
    model = build_model(device="meta")  # a device no build has kernels for
    assert {m.impl for m in model.modules() if isinstance(m, ConvReLUBN)} == {"stock"}
    assert all(p.device.type == "meta" for p in model.parameters())
    with pytest.raises(RuntimeError, match="no kernels for device type 'meta'"):
        build_model(impl="fused", device="meta")


@needs_fused
def test_build_model_defaults_to_fused_on_the_cpu():
    model = build_model()
    assert {m.impl for m in model.modules() if isinstance(m, ConvReLUBN)} == {"fused"}
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_unknown_model_and_bad_dropout_are_refused():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("huge", impl="stock")
    with pytest.raises(ValueError, match="dropout"):
        build_model(impl="stock", dropout=1.5)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
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
    channels_last drifts ~1e-2 here by step 20), so the rule is the one the
    op tests use: against the float64 stock trajectory, the fused float32
    losses stray at most twice as far as the stock float32 ones do."""
    torch.manual_seed(0)
    stock = build_model(impl="stock", dropout=0.0)
    fused = build_model(impl="fused", dropout=0.0)
    exact = build_model(impl="stock", dropout=0.0).double()
    fused.load_state_dict(stock.state_dict())
    exact.load_state_dict(stock.state_dict())
    fused = fused.to(memory_format=torch.channels_last)
    models = (exact, stock, fused)
    opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in models]
    gen = torch.Generator().manual_seed(1)
    losses = [[], [], []]
    for _ in range(20):
        x = torch.rand(32, 1, 28, 28, generator=gen)
        y = torch.randint(0, 10, (32,), generator=gen)
        for i, (model, opt) in enumerate(zip(models, opts)):
            loss = F.cross_entropy(model(x.to(next(model.parameters()).dtype)), y)
            opt.zero_grad(), loss.backward(), opt.step()
            losses[i].append(loss.item())
    exact_losses, stock_losses, fused_losses = (torch.tensor(v, dtype=torch.float64) for v in losses)
    stock_error = (stock_losses - exact_losses).abs().max().item()
    fused_error = (fused_losses - exact_losses).abs().max().item()
    assert fused_error <= 2 * stock_error + 1e-4, (fused_error, stock_error)


@needs_fused
@pytest.mark.slow  # compiling the model takes about a minute on 2 cores
def test_torch_compile_fullgraph_matches_eager_on_the_fused_path():
    """torch.compile(fullgraph=True) traces our op (fake tensors, autograd, the in-place
    running-statistics update, the dropout scale) with no graph break, and the compiled
    forward, backward and statistics match eager's."""
    torch.manual_seed(0)
    eager = build_model(impl="fused", dropout=0.05)
    compiled_model = build_model(impl="fused", dropout=0.05)
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    outs = []
    for model, forward in ((eager, eager), (compiled_model, compiled)):
        torch.manual_seed(1)  # the same dropout masks: inductor's fallback_random draws as eager does
        with torch._inductor.config.patch(fallback_random=True):
            logits = forward(x)
            F.cross_entropy(logits, y).backward()
        outs.append((logits, {n: p.grad for n, p in model.named_parameters()}, model.state_dict()))
    (logits_e, grads_e, state_e), (logits_c, grads_c, state_c) = outs
    assert_close(logits_c, logits_e, rtol=1e-4, atol=1e-5)
    assert_close(grads_c, grads_e, rtol=1e-4, atol=1e-5)
    assert_close(state_c, state_e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_no_model_has_a_linear_layer(name):
    assert not any(isinstance(m, nn.Linear) for m in build_model(name, impl="stock").modules())


def test_tiny_is_separable_with_the_stock_depthwise_conv():
    """Issue 22: at most 5,000 parameters; the depthwise conv is the stock layer (README says so)."""
    model = build_model("tiny", impl="stock")
    assert count_parameters(model) <= 5000
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels == m.out_channels and m.bias is None for m in depthwise)
