"""conv_relu_bn refuses tensors on mixed devices before the op can read memory that holds nothing."""
import pytest
import torch

from fastmnist import ops

pytestmark = pytest.mark.skipif(not ops.fused_available(), reason="the compiled extension fastmnist._C is not built")


def arguments(cin=3, cout=4):
    g = torch.Generator().manual_seed(0)
    return dict(
        x=torch.randn(2, cin, 6, 6, generator=g), weight=torch.randn(cout, cin, 3, 3, generator=g),
        bias=torch.randn(cout, generator=g), bn_weight=torch.rand(cout, generator=g) + 0.5,
        bn_bias=torch.randn(cout, generator=g), running_mean=torch.randn(cout, generator=g),
        running_var=torch.rand(cout, generator=g) + 0.5,
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["weight", "bias", "bn_weight", "bn_bias", "running_mean", "running_var"])
def test_a_meta_tensor_is_refused_naming_both_devices(name):
    args = arguments()
    args[name] = args[name].to("meta")
    before = (args["running_mean"].clone(), args["running_var"].clone())
    with pytest.raises(ValueError, match=rf"{name} is on meta but x is on cpu"):
        ops.conv_relu_bn(**args, training=True)
    for kept, stat in zip(before, ("running_mean", "running_var")):
        if args[stat].device.type == "cpu":  # the running statistics were not touched
            assert torch.equal(args[stat], kept)


@pytest.mark.timeout(60)
def test_a_channel_scale_on_another_device_is_refused():
    args = arguments()
    scale = torch.ones(2, 4, device="meta")
    with pytest.raises(ValueError, match="channel_scale is on meta"):
        ops.conv_relu_bn(**args, training=True, channel_scale=scale)


@pytest.mark.timeout(60)
def test_same_device_still_runs_and_updates_the_statistics():
    args = arguments()
    before = args["running_mean"].clone()
    y = ops.conv_relu_bn(**args, training=True)
    assert y.shape == (2, 4, 4, 4) and torch.isfinite(y).all()
    assert not torch.equal(args["running_mean"], before)


@pytest.mark.needs_cuda
@pytest.mark.timeout(60)
def test_cpu_statistics_with_a_cuda_input_are_refused():
    args = {k: (v.cuda() if k != "running_var" else v) for k, v in arguments().items()}
    with pytest.raises(ValueError, match="running_var is on cpu but x is on cuda:0"):
        ops.conv_relu_bn(**args, training=True)
