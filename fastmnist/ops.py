"""Python entry points of the fused operator, fastmnist::conv_relu_bn.

The schemas live in csrc/ops.cpp, the kernels in csrc/cpu and csrc/cuda, and
autograd (through the registered backward ops) in csrc/autograd.cpp; this
module registers the fake tensors torch.compile needs, updates the BN running
statistics, and ships the pure-PyTorch reference of the op.
"""
import warnings
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

REBUILD = "pip install --no-build-isolation --no-deps --force-reinstall ."
Padding = Union[int, Sequence[int]]  # nn.Conv2d's: one int for both dimensions, or (rows, columns)


def _torch_mismatch() -> Optional[str]:
    """Why the built extension cannot be used with the running torch, or None.

    A compiled extension is valid only with the torch it was built against (C++
    ABI, op registration): loading it under another torch may fail with an
    undefined symbol or, worse, load and crash. setup.py records the torch it
    built with in fastmnist/_build_info.py; without that file (no build) the
    import of _C decides alone.
    """
    try:
        from fastmnist._build_info import TORCH_VERSION as built
    except ImportError:
        return None
    if built == torch.__version__:
        return None
    return (
        f"fastmnist._C was built against torch {built}, but torch {torch.__version__} is installed, and a "
        f"compiled extension works only with the torch it was built against. Rebuild it for this torch: "
        f"`{REBUILD}` in the fastmnist source folder (`pip install --no-build-isolation -e .` for an "
        "editable install), or use impl='stock' (--impl stock)."
    )


_IMPORT_ERROR: Optional[str] = _torch_mismatch()  # the whole reason the fused path is off, or None
if _IMPORT_ERROR is not None:
    warnings.warn(f"fastmnist: the fused operator is off: {_IMPORT_ERROR}", RuntimeWarning, stacklevel=2)
else:
    try:
        import fastmnist._C  # noqa: F401  (its import registers torch.ops.fastmnist.*)
    except ImportError as exc:  # the package still works on the stock path
        _IMPORT_ERROR = (
            f"the compiled extension fastmnist._C did not load ({type(exc).__name__}: {exc}). Reinstall with "
            f"`{REBUILD}` and read the compiler's messages, or use impl='stock' (--impl stock)."
        )

_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def fused_available() -> bool:
    """True when the compiled extension fastmnist._C is loaded (and matches the running torch)."""
    return _IMPORT_ERROR is None


def fused_supports(device_type: str, op: str = "conv_relu_bn") -> bool:
    """Whether the loaded extension has kernels of op for this device type ("cpu", "cuda")."""
    key = _DISPATCH_KEYS.get(device_type)
    return (
        fused_available()
        and key is not None
        and torch._C._dispatch_has_kernel_for_dispatch_key(f"fastmnist::{op}", key)
    )


def fused_unavailable_reason(device_type: Optional[str] = None) -> Optional[str]:
    """Why the fused path is off (on this device type, when given), or None when it is on."""
    if _IMPORT_ERROR is not None:
        return f"the fused operator is unavailable: {_IMPORT_ERROR}"
    if device_type is None or fused_supports(device_type):
        return None
    if device_type not in _DISPATCH_KEYS:
        return f"the fused operator has no kernels for device type {device_type!r}; use impl='stock' (--impl stock)."
    return (
        f"this build of fastmnist._C has no {device_type.upper()} kernels (built without them: CUDA needs a "
        "CUDA build of torch and the CUDA toolkit at build time). Rebuild with "
        f"`FORCE_CUDA=1 {REBUILD}`, or use impl='stock' (--impl stock)."
    )


def require_fused(device_type: Optional[str] = None) -> None:
    """Raise one actionable error when the fused path is asked for (on this device type) and absent."""
    reason = fused_unavailable_reason(device_type)
    if reason is not None:
        raise RuntimeError(reason)


def conv_relu_bn(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    bn_weight: Tensor,
    bn_bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    padding: Padding = 0,
    channel_scale: Optional[Tensor] = None,
) -> Tensor:
    """BatchNorm2d(ReLU(Conv2d(x))) with the fused kernels; differentiable.

    padding is nn.Conv2d's (an int, or (rows, columns)); the stride is 1.

    In training, normalises with the batch statistics and updates running_mean
    and running_var in place (running_var with the unbiased batch variance),
    exactly as torch.nn.BatchNorm2d does; the caller counts num_batches_tracked.
    channel_scale, an optional (N, Cout) tensor, multiplies the output per
    image and channel: dropout2d_scale() makes the one Dropout2d would apply.
    """
    require_fused()
    _check_same_device("conv_relu_bn", x, weight=weight, bias=bias, bn_weight=bn_weight, bn_bias=bn_bias,
                       running_mean=running_mean, running_var=running_var, channel_scale=channel_scale)
    if channel_scale is not None and channel_scale.requires_grad:
        raise ValueError("channel_scale must be a constant (a dropout mask); it gets no gradient. Pass it detached.")
    y, _, mean, var = torch.ops.fastmnist.conv_relu_bn(
        x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, eps, padding_pair(padding),
        channel_scale
    )
    if training:
        update_running_stats(running_mean, running_var, mean, var, momentum, count=y.numel() // y.shape[1])
    return y


def _check_same_device(op: str, x: Tensor, **tensors: Optional[Tensor]) -> None:
    """Refuse a tensor on another device than x: the op would otherwise read memory that holds
    nothing (a meta tensor has no storage) and write it into the running statistics."""
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}; "
                             "move the module and its input to one device (module.to(device))")


def padding_pair(padding: Padding) -> Tuple[int, int]:
    """(rows, columns) from nn.Conv2d's padding (an int or a pair of ints), refusing anything else.

    The ops' schemas take int[2]; a string ('same', 'valid') is resolved by the module that owns the
    convolution (fastmnist.layers.fused_padding), which knows the kernel."""
    if isinstance(padding, int) and not isinstance(padding, bool):
        return (padding, padding)
    if isinstance(padding, Sequence) and not isinstance(padding, str) and len(padding) == 2 \
            and all(isinstance(p, int) and not isinstance(p, bool) for p in padding):
        return (padding[0], padding[1])
    raise ValueError(f"padding must be an int or (rows, columns), got {padding!r}")


def conv_relu_pool(x: Tensor, weight: Tensor, bias: Tensor, pool: int, relu: bool = True,
                   padding: Padding = 0) -> Tensor:
    """AvgPool2d(pool)(ReLU(Conv2d(x))) (the ReLU only when relu) with the fused kernels; differentiable.

    The network's transition (1x1 conv, ReLU, AvgPool2d(2)) and head (1x1 conv,
    global average pooling) are each one call.
    """
    require_fused()
    _check_same_device("conv_relu_pool", x, weight=weight, bias=bias)
    out, _ = torch.ops.fastmnist.conv_relu_pool(x, weight, bias, relu, padding_pair(padding), pool)
    return out


def conv_path(x: Tensor, weight: Tensor, padding: Padding = 0, compute_grad_x: bool = True) -> str:
    """Which kernel path the fused op takes for a convolution of x with weight.

    On the CPU: "avx2 tiles" or "avx512 tiles" (register-tiled loops; the ISA
    is the best that ATen's CPU capability allows and the CPU has, so
    ATEN_CPU_CAPABILITY=avx2|default forces a slower one), with any channel
    padding named ("Cout 20 padded to 24"), or "im2col+BLAS: <why>".
    """
    require_fused()
    return torch.ops.fastmnist.conv_path(x, weight, padding_pair(padding), compute_grad_x)


# The default network's second 3x3 block (fastmnist.model.LAYOUTS["default"]: 16 -> 24 channels on
# its 26x26 map), as (x shape, weight shape): the block cpu_kernel_path names (tests/test_ops.py
# checks that the default network has it).
DEFAULT_NETWORK_BLOCK = ((1, 16, 26, 26), (24, 16, 3, 3))


def cpu_kernel_path() -> Optional[str]:
    """The CPU path of the default network's 3x3 blocks in this process (e.g. "avx512 tiles, Winograd
    F(2x2,3x3) forward and input gradient", "avx2 tiles" or "im2col+BLAS: <why>"), or None without the
    extension: what a benchmark or a log should name."""
    if not fused_supports("cpu"):
        return None
    x_shape, w_shape = DEFAULT_NETWORK_BLOCK
    return conv_path(torch.zeros(x_shape), torch.zeros(w_shape))


def dropout2d_scale(x: Tensor, channels: int, p: float) -> Tensor:
    """The (N, channels) scale that F.dropout2d(., p) would multiply an (N, channels, H, W) output by.

    Each entry is 0 with probability p, else 1 / (1 - p). It is drawn exactly
    as ATen's feature dropout draws its noise (one bernoulli_ over N * channels
    values, then a division), so with the same RNG state the fused and stock
    paths drop the same channels.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"dropout probability must be in (0, 1), got {p}")
    return x.new_empty((x.shape[0], channels)).bernoulli_(1.0 - p).div_(1.0 - p)


@torch.no_grad()
def update_running_stats(
    running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, momentum: float, count: int
) -> None:
    """BatchNorm's update: r <- (1 - m) r + m s, with the unbiased variance n/(n-1) var."""
    running_mean.mul_(1.0 - momentum).add_(mean.detach(), alpha=momentum)
    running_var.mul_(1.0 - momentum).add_(var.detach(), alpha=momentum * count / (count - 1))


def reference_conv_relu_bn(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    bn_weight: Tensor,
    bn_bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    padding: Padding = 0,
    channel_scale: Optional[Tensor] = None,
) -> Tensor:
    """The op in stock PyTorch: the test oracle, same signature as conv_relu_bn."""
    r = F.relu(F.conv2d(x, weight, bias, padding=padding_pair(padding)))
    y = F.batch_norm(r, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    return y if channel_scale is None else y * channel_scale[:, :, None, None]


def _channels_last_like(x: Tensor, shape) -> Tensor:
    return x.new_empty(shape).contiguous(memory_format=torch.channels_last)


def _out_shape(x: Tensor, weight: Tensor, padding: Padding) -> Tuple[int, int, int, int]:
    n, _, h, w = x.shape
    cout, _, kh, kw = weight.shape
    ph, pw = padding_pair(padding)
    return (n, cout, h + 2 * ph - kh + 1, w + 2 * pw - kw + 1)


def _register() -> None:
    forward_op = "fastmnist::conv_relu_bn"
    backward_op = "fastmnist::conv_relu_bn_backward"

    @torch.library.register_fake(forward_op)
    def _(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, eps, padding, channel_scale=None):
        torch._check(x.dim() == 4, lambda: f"x must be 4-D (N, C, H, W), got {tuple(x.shape)}")
        y = _channels_last_like(x, _out_shape(x, weight, padding))
        c = weight.shape[0]
        return y, torch.empty_like(y), x.new_empty(c), x.new_empty(c)

    @torch.library.register_fake(backward_op)
    def _(grad_y, x, weight, relu_out, bn_weight, mean, var, training, eps, padding, compute_grad_x, channel_scale=None):
        grad_x = _channels_last_like(x, x.shape) if compute_grad_x else x.new_empty(0)
        c = weight.shape[0]
        # grad_weight comes in the weight's own memory format (no AccumulateGrad copy)
        return grad_x, torch.empty_like(weight), x.new_empty(c), x.new_empty(c), x.new_empty(c)

    _register_conv_relu_pool()


def _register_conv_relu_pool() -> None:
    forward_op = "fastmnist::conv_relu_pool"

    @torch.library.register_fake(forward_op)
    def _(x, weight, bias, relu, padding, pool):
        n, cout, h, w = _out_shape(x, weight, padding)
        relu_out = _channels_last_like(x, (n, cout, h, w)) if relu else x.new_empty(0)
        return _channels_last_like(x, (n, cout, h // pool, w // pool)), relu_out

    @torch.library.register_fake("fastmnist::conv_relu_pool_backward")
    def _(grad_out, x, weight, relu_out, relu, padding, pool, compute_grad_x):
        grad_x = _channels_last_like(x, x.shape) if compute_grad_x else x.new_empty(0)
        return grad_x, torch.empty_like(weight), x.new_empty(weight.shape[0])


if _IMPORT_ERROR is None:
    _register()

# Device types with conv_relu_pool kernels, decided once at import (a
# constant to torch.compile, which cannot trace the dispatcher query).
CONV_RELU_POOL_DEVICES = frozenset(d for d in _DISPATCH_KEYS if fused_supports(d, "conv_relu_pool"))
