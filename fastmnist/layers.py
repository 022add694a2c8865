"""The network's fused modules, each stock or fused: ConvReLUBN (Conv2d -> ReLU -> BatchNorm2d -> Dropout2d)
and ConvPool (Conv2d -> ReLU -> AvgPool2d, the ReLU optional)."""
import logging

import torch
import torch.nn.functional as F
from torch import nn

from fastmnist import ops

IMPLS = ("fused", "stock")
log = logging.getLogger("fastmnist")


def resolve_impl(impl, device=None) -> str:
    """The one decision of which path runs on a device: 'fused' or 'stock'.

    impl is 'fused', 'stock', or None/'auto'; device (a torch.device or its
    name; None means the CPU) is where the model will run. 'auto' picks the
    fused path where this build has kernels for the device and otherwise falls
    back to stock, logging why; 'fused' where it cannot run raises one
    actionable RuntimeError instead of failing later in the dispatcher.
    """
    device_type = torch.device("cpu" if device is None else device).type
    if impl in (None, "auto"):
        reason = ops.fused_unavailable_reason(device_type)
        if reason is None:
            return "fused"
        log.warning("fastmnist: --impl auto uses the stock layers on %s: %s", device_type, reason)
        return "stock"
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS} or 'auto', got {impl!r}")
    if impl == "fused":
        ops.require_fused(device_type)
    return impl


class ConvReLUBN(nn.Module):
    """dropout2d(bn(relu(conv(x)))) with stride 1; dropout (default 0) is Dropout2d's p.

    impl and device go to resolve_impl(): the parameters are created on device
    (None: the CPU) and the path is chosen for it.

    Holds a stock nn.Conv2d as .conv and nn.BatchNorm2d as .bn, so parameters,
    buffers and state_dict keys are the stock ones and a state_dict moves freely
    between impl="stock" and impl="fused". The fused path applies the dropout
    mask inside the operator (its channel_scale), drawn from the same RNG as
    F.dropout2d, so both impls drop the same channels.
    """

    def __init__(self, in_channels, out_channels, kernel_size, padding=0, momentum=0.1, eps=1e-5, dropout=0.0,
                 impl=None, device=None):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, device=device)
        self.bn = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum, device=device)
        self.dropout = dropout
        self.impl = resolve_impl(impl, device)

    def extra_repr(self) -> str:
        return f"dropout={self.dropout}, impl={self.impl!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        drop = self.training and self.dropout > 0
        if self.impl == "stock":
            y = self.bn(torch.relu(self.conv(x)))
            return F.dropout2d(y, self.dropout, training=True) if drop else y
        scale = ops.dropout2d_scale(x, self.conv.out_channels, self.dropout) if drop else None
        return fused_conv_relu_bn(x, self.conv, self.bn, scale)


def fused_conv_relu_bn(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, channel_scale=None) -> torch.Tensor:
    """bn(relu(conv(x))) (times channel_scale) in one fastmnist::conv_relu_bn call, in bn's mode (training:
    batch statistics, running statistics and num_batches_tracked updated, as nn.BatchNorm2d does).

    conv runs with stride 1 and padding conv.padding[0]; bn must be affine and track running statistics.
    ConvReLUBN and fastmnist.fuse both run their blocks through here.
    """
    use_batch_stats = bn.training or not bn.track_running_stats
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average, as BatchNorm does
            momentum = 1.0 / float(bn.num_batches_tracked)
    bias = conv.bias if conv.bias is not None else x.new_zeros(conv.out_channels)
    return ops.conv_relu_bn(x, conv.weight, bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                            use_batch_stats, momentum, bn.eps, conv.padding[0], channel_scale)


class ConvPool(nn.Conv2d):
    """avg_pool2d(relu(conv(x)), pool) (the ReLU only when relu), stride 1: the network's transition and head.

    A stock nn.Conv2d itself (weight, bias, state_dict keys), so BN folding and
    state dicts treat it as the convolution it is. The fused path is one
    fastmnist::conv_relu_pool call; on a device whose build has no kernel for
    that op (CUDA, so far) the stock layers run, as they do for impl="stock".
    """

    def __init__(self, in_channels, out_channels, kernel_size, pool, relu=True, padding=0, impl=None, device=None):
        super().__init__(in_channels, out_channels, kernel_size, padding=padding, device=device)
        self.pool, self.relu = pool, relu
        self.impl = resolve_impl(impl, device)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pool={self.pool}, relu={self.relu}, impl={self.impl!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl == "fused" and x.device.type in ops.CONV_RELU_POOL_DEVICES:
            return ops.conv_relu_pool(x, self.weight, self.bias, self.pool, self.relu, self.padding[0])
        z = super().forward(x)
        return F.avg_pool2d(torch.relu(z) if self.relu else z, self.pool)
