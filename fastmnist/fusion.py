"""fastmnist.fuse (this module is fastmnist.fusion): our fused operators in anyone's network.

fuse(module) traces a copy of the module with torch.fx and replaces each run of
    Conv2d -> ReLU -> BatchNorm2d      by one fastmnist::conv_relu_bn call
    Conv2d -> ReLU -> AvgPool2d        by one fastmnist::conv_relu_pool call
    Conv2d -> AvgPool2d                by one fastmnist::conv_relu_pool call (without its ReLU)
The call reads the Conv2d and BatchNorm2d modules themselves, which stay where they were in the
module tree: no parameter or buffer is copied or renamed, so state_dict() keys and values are
those of the stock module, a stock checkpoint loads into the fused copy and back, and training
updates the same tensors. Whatever the fused ops do not compute exactly is left stock, with the
reason in the report: a stride, dilation or groups, padding that differs between height and width
or is not zeros, a ReLU or convolution output that something else also reads, an in-place op.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import fx, nn

from fastmnist import ops
from fastmnist.api import InputError
from fastmnist.layers import fused_conv_relu_bn

RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}
RELU_METHODS = {"relu", "relu_"}
FUSED_DTYPES = (torch.float32, torch.float64)  # the kernels' types; anything else runs stock


@dataclass
class FuseReport:
    """What fuse() replaced, and each convolution it left stock with the reason."""

    fused: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"fused {len(self.fused)}, left stock {len(self.skipped)}"]
        lines += [f"  fused: {line}" for line in self.fused] + [f"  stock: {line}" for line in self.skipped]
        return "\n".join(lines)


def fuse(module: nn.Module, report: bool = False) -> Union[nn.Module, Tuple[nn.Module, FuseReport]]:
    """A copy of module with each Conv2d -> ReLU -> BatchNorm2d (or -> AvgPool2d) run on our fused operators.

    The copy (a torch.fx GraphModule) shares nothing with module, but holds the same parameters and
    buffers under the same names. With report=True, returns (copy, FuseReport).
    """
    if not isinstance(module, nn.Module):
        raise InputError(f"fuse takes an nn.Module, got a {type(module).__name__}")
    ops.require_fused()
    try:
        graph_module = fx.symbolic_trace(copy.deepcopy(module))
    except Exception as exc:  # fx raises TraceError, TypeError, ... on data-dependent control flow
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"fuse: torch.fx cannot trace this {type(module).__name__} ({first}); fuse the "
                         "submodules that it can trace (e.g. each block), or write them with ConvReLUBN") from None
    found = FuseReport()
    modules = dict(graph_module.named_modules())
    for node in list(graph_module.graph.nodes):
        if node.op == "call_module" and isinstance(modules[node.target], nn.Conv2d):
            _fuse_from(graph_module, modules, node, found)
    graph_module.graph.lint()
    graph_module.recompile()
    return (graph_module, found) if report else graph_module


def _fuse_from(gm: fx.GraphModule, modules: dict, conv_node: fx.Node, found: FuseReport) -> None:
    """Fuse the run that starts at conv_node, or record why it stays stock."""
    name = conv_node.target
    conv = modules[name]
    why = _conv_unfusable(conv)
    relu_node, tail = None, _sole_user(conv_node, modules)
    if why is None and isinstance(tail, str):
        why = f"its output is {tail}"
    if why is None and _is_relu(tail, modules):
        relu_node, tail = tail, _sole_user(tail, modules)
        if isinstance(tail, str):
            why = f"the ReLU's output is {tail}"
    if why is None:
        why = _tail_unfusable(tail, modules, relu_node is not None)
    if why is not None:
        found.skipped.append(f"{name}: {why}")
        return
    is_bn = tail.op == "call_module" and isinstance(modules[tail.target], nn.BatchNorm2d)
    graph = gm.graph
    with graph.inserting_before(tail):
        conv_ref = graph.get_attr(name)
        if is_bn:
            fused = graph.call_function(conv_relu_bn_call, (conv_node.args[0], conv_ref, graph.get_attr(tail.target)))
        else:
            pool = tail.args[1] if tail.op == "call_function" else modules[tail.target].kernel_size
            fused = graph.call_function(conv_relu_pool_call, (conv_node.args[0], conv_ref, pool, relu_node is not None))
    tail.replace_all_uses_with(fused)
    found.fused.append(" -> ".join(_describe(n) for n in (conv_node, relu_node, tail) if n is not None)
                       + f" ({'conv_relu_bn' if is_bn else 'conv_relu_pool'})")
    for node in (tail, relu_node, conv_node):
        if node is not None:
            graph.erase_node(node)


def _conv_unfusable(conv: nn.Conv2d) -> Optional[str]:
    if type(conv) is not nn.Conv2d:
        return f"a {type(conv).__name__}, a Conv2d subclass whose forward may differ"
    if conv.stride != (1, 1):
        return f"stride {conv.stride}: the fused ops run stride 1"
    if conv.dilation != (1, 1):
        return f"dilation {conv.dilation}: the fused ops run dilation 1"
    if conv.groups != 1:
        return f"groups={conv.groups}: the fused ops run dense convolutions"
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        return f"padding {conv.padding!r} ({conv.padding_mode}): the fused ops pad with zeros, given in pixels"
    if conv.padding[0] != conv.padding[1]:
        return f"padding {conv.padding}: the fused ops pad height and width alike"
    return None


def _tail_unfusable(tail: fx.Node, modules: dict, after_relu: bool) -> Optional[str]:
    """Why the node after the conv (and its ReLU) cannot end a fused run, or None."""
    what = "the ReLU" if after_relu else "it"
    module = modules.get(tail.target) if tail.op == "call_module" else None
    if type(module) is nn.BatchNorm2d and after_relu:
        if not module.affine or not module.track_running_stats:
            return "its BatchNorm2d has affine=False or track_running_stats=False, which the fused op does not take"
        return None
    if tail.op == "call_function" and tail.target is F.avg_pool2d:
        if len(tail.args) == 2 and not tail.kwargs and isinstance(tail.args[1], int):
            return None
        return "its avg_pool2d call has arguments beyond (x, kernel_size), which the fused op does not take"
    if type(module) is nn.AvgPool2d:
        k, s = module.kernel_size, module.stride
        square = k if isinstance(k, int) else k[0] if len(set(k)) == 1 else None
        stride = s if isinstance(s, int) else s[0] if s and len(set(s)) == 1 else None
        if square is None or stride != square or module.padding not in (0, (0, 0)) or module.ceil_mode \
                or module.divisor_override is not None:
            return (f"{tail.target} is {module}: the fused op pools square windows with stride = kernel, no padding, "
                    "floor mode")
        return None
    if not after_relu:
        return f"followed by {_describe(tail)}, not ReLU or AvgPool2d"
    return f"{what} is followed by {_describe(tail)}, not BatchNorm2d or AvgPool2d"


def _sole_user(node: fx.Node, modules: dict) -> Union[fx.Node, str]:
    """The one node that reads node's output, or a string saying what else reads it."""
    users = list(node.users)
    inplace = [u for u in users if _is_inplace(u, modules)]
    if inplace:
        return f"changed in place by {_describe(inplace[0])}"
    if len(users) != 1:
        return f"read by {len(users)} ops ({', '.join(_describe(u) for u in users)}), not one" if users else "unused"
    if users[0].op == "output":
        return "the module's output"
    return users[0]


def _is_relu(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return type(modules[node.target]) is nn.ReLU
    return (node.op == "call_function" and node.target in RELU_FUNCTIONS) or \
        (node.op == "call_method" and node.target in RELU_METHODS)


def _is_inplace(node: fx.Node, modules: dict) -> bool:
    """An op that overwrites its input (a ReLU in place is the ReLU itself, not an op in between)."""
    if _is_relu(node, modules):
        return False
    if node.op == "call_module":
        return bool(getattr(modules[node.target], "inplace", False))
    name = getattr(node.target, "__name__", str(node.target))
    return (node.op in ("call_method", "call_function") and name.endswith("_") and not name.endswith("__")) \
        or node.target in (operator.iadd, operator.isub, operator.imul, operator.itruediv) \
        or node.kwargs.get("inplace") is True


def _describe(node: fx.Node) -> str:
    """A module's name in the tree (layer1.0.conv1), else the node's name in the graph (relu_1, add)."""
    return node.target if node.op == "call_module" else node.name


def conv_relu_bn_call(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """bn(relu(conv(x))), fused where this build has kernels for x's device and dtype, else stock."""
    if x.device.type in _CONV_RELU_BN_DEVICES and x.dtype in FUSED_DTYPES:
        return fused_conv_relu_bn(x, conv, bn)
    return bn(torch.relu(conv(x)))


def conv_relu_pool_call(x: torch.Tensor, conv: nn.Conv2d, pool, relu: bool) -> torch.Tensor:
    """avg_pool2d(relu(conv(x)), pool) (the ReLU only when relu), fused where it can run, else stock."""
    pool = pool if isinstance(pool, int) else pool[0]
    if x.device.type in ops.CONV_RELU_POOL_DEVICES and x.dtype in FUSED_DTYPES:
        bias = conv.bias if conv.bias is not None else x.new_zeros(conv.out_channels)
        return ops.conv_relu_pool(x, conv.weight, bias, pool, relu, conv.padding[0])
    z = conv(x)
    return F.avg_pool2d(torch.relu(z) if relu else z, pool)


# Device types with conv_relu_bn kernels, decided once at import (as ops.CONV_RELU_POOL_DEVICES).
_CONV_RELU_BN_DEVICES = frozenset(d for d in ("cpu", "cuda") if ops.fused_supports(d))
