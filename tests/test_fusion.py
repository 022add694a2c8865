"""fastmnist.fuse on networks nobody designed for it: same outputs, gradients, state and training as stock."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmnist
from conftest import REPO, cpu_and_cuda, load_module
from fastmnist.api import InputError

pytestmark = pytest.mark.skipif(not fastmnist.fused_available(), reason="needs the compiled extension")


def lenet() -> nn.Module:
    """LeNet-style: 5x5 kernels, one padded; conv-relu-bn, then conv-relu-pool; a linear classifier."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.BatchNorm2d(6),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(16 * 12 * 12, 10),
    )


# 32 and 64 channels, 3x3 with padding 1: the net benchmarks/fuse_speed.py times, defined there once.
wide_padded = load_module("fastmnist_fuse_speed", REPO / "benchmarks" / "fuse_speed.py").wide_padded_net


class Residual(nn.Module):
    """A residual branch, functional ReLUs, and each pattern fuse must leave stock."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.a, self.bna = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.b, self.bnb = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.c, self.bnc = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.d, self.bnd = nn.Conv2d(16, 16, (3, 1), padding=(1, 0)), nn.BatchNorm2d(16)  # padding per dimension
        self.e = nn.Conv2d(16, 16, 1)
        self.g = nn.Conv2d(16, 16, 3, padding=1, groups=2)
        self.h, self.bnh = nn.Conv2d(16, 16, 3, padding=2, dilation=2), nn.BatchNorm2d(16)
        self.head = nn.Conv2d(16, 10, 1)

    def forward(self, x):
        x = self.bn0(F.relu(self.stem(x)))
        y = self.bna(torch.relu(self.a(x)))
        y = self.bnb(self.b(y).relu())
        x = x + y  # the residual branch
        x = F.relu(self.down(x))
        r = F.relu(self.c(x))
        x = self.bnc(r) + r  # the ReLU's output read twice
        x = self.bnd(F.relu(self.d(x)))
        z = self.e(x)
        z.mul_(0.5)  # an in-place op between the conv and its ReLU
        x = F.relu(self.g(F.relu(z)))
        x = self.bnh(F.relu(self.h(x)))
        return F.avg_pool2d(F.relu(self.head(x)), 14).flatten(1)


NETS = {"lenet": lenet, "wide_padded": wide_padded, "residual": Residual}
FUSED_COUNT = {"lenet": 2, "wide_padded": 4, "residual": 5}

RESIDUAL_REPORT = [
    "fused 5, left stock 5",
    "  fused: stem -> relu -> bn0 (conv_relu_bn)",
    "  fused: a -> relu_1 -> bna (conv_relu_bn)",
    "  fused: b -> relu_2 -> bnb (conv_relu_bn)",
    "  fused: d -> relu_5 -> bnd (conv_relu_bn)",
    "  fused: head -> relu_9 -> avg_pool2d (conv_relu_pool)",
    "  stock: down: stride (2, 2): the fused ops run stride 1",
    "  stock: c: the ReLU's output is read by 2 ops (bnc, add_1), not one",
    "  stock: e: its output is changed in place by mul_",
    "  stock: g: groups=2: the fused ops run dense convolutions",
    "  stock: h: dilation (2, 2): the fused ops run dilation 1",
]


def build(name: str, device="cpu") -> nn.Module:
    """The net with random BN statistics and affine parameters, so that BN is not the identity."""
    torch.manual_seed(0)
    net = NETS[name]().to(device)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3), m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.3, 0.3)
    return net


@pytest.fixture(autouse=True)
def no_tf32():
    """On CUDA, TF32 convolutions would make the stock reference drift by ~1e-3."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved


def assert_float64_rule(fused, stock, reference, what):
    """Fused float32 error against float64 at most twice the stock float32 layers' error, plus a tiny atol."""
    fused_err = (fused.double() - reference).abs().max().item()
    stock_err = (stock.double() - reference).abs().max().item()
    atol = 1e-6 * max(1.0, reference.abs().max().item())
    assert fused_err <= 2 * stock_err + atol, f"{what}: fused error {fused_err:.3g}, stock {stock_err:.3g}"


def run(net, x, weights, dtype):
    """(output, input gradient, parameter gradients, state_dict) of one forward and backward pass."""
    xi = x.to(dtype).clone().requires_grad_()
    y = net(xi)
    (y * weights.to(dtype)).sum().backward()
    return y, xi.grad, {n: p.grad for n, p in net.named_parameters()}, net.state_dict()


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", NETS)
def test_the_forward_pass_matches_stock_under_the_float64_rule(name, training, device):
    stock = build(name, device).train(training)
    fused, report = fastmnist.fuse(stock, report=True)
    assert len(report.fused) == FUSED_COUNT[name], report
    reference = copy.deepcopy(stock).double()
    torch.manual_seed(1)
    x = torch.rand(5, 1, 28, 28, device=device)  # an odd batch
    with torch.no_grad():
        assert_float64_rule(fused(x), stock(x), reference(x.double()), "output")
    fused_state, stock_state, reference_state = fused.state_dict(), stock.state_dict(), reference.state_dict()
    for n in reference_state:  # the running statistics, updated in training, and num_batches_tracked
        if reference_state[n].is_floating_point():
            assert_float64_rule(fused_state[n], stock_state[n], reference_state[n], n)
        else:
            assert torch.equal(fused_state[n], reference_state[n]), n


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", NETS)
def test_every_gradient_matches_stock(name, training, device):
    """In float64: in float32, rounding flips the odd ReLU whose input is within ~1e-6 of zero, which moves
    the gradient of the pixels behind it by O(1e-3) on either path (measured on the residual net: stock
    float32 2.6e-4 from float64 on one seed, fused 9.3e-3 on another), so a float32 rule would be flaky.
    The float32 kernels' gradients are held to the float64 rule op by op in test_ops.py."""
    stock = build(name, device).double().train(training)
    fused = fastmnist.fuse(stock)
    torch.manual_seed(1)
    x = torch.rand(5, 1, 28, 28, device=device, dtype=torch.float64)
    weights = torch.randn(5, 10, device=device, dtype=torch.float64)
    (y_f, gx_f, g_f, s_f), (y_s, gx_s, g_s, s_s) = run(fused, x, weights, torch.float64), run(stock, x, weights,
                                                                                               torch.float64)
    torch.testing.assert_close(y_f, y_s, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gx_f, gx_s, rtol=1e-10, atol=1e-12)
    assert g_f.keys() == g_s.keys()
    for n in g_s:
        torch.testing.assert_close(g_f[n], g_s[n], rtol=1e-9, atol=1e-11, msg=lambda m, n=n: f"{n}: {m}")
    for n in s_s:
        torch.testing.assert_close(s_f[n], s_s[n], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", NETS)
def test_a_few_training_steps_give_the_same_parameters(name):
    stock = build(name).double().train()
    fused = fastmnist.fuse(stock)
    optimisers = [torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9) for net in (stock, fused)]
    torch.manual_seed(2)
    for _ in range(3):
        x, labels = torch.rand(8, 1, 28, 28, dtype=torch.float64), torch.randint(0, 10, (8,))
        for net, opt in zip((stock, fused), optimisers):
            opt.zero_grad()
            F.cross_entropy(net(x), labels).backward()
            opt.step()
    fused_state, stock_state = fused.state_dict(), stock.state_dict()
    assert list(fused_state) == list(stock_state)
    for n in stock_state:
        torch.testing.assert_close(fused_state[n], stock_state[n], rtol=1e-9, atol=1e-11, msg=n)
    start = build(name).double().state_dict()
    assert all(not torch.equal(stock_state[n], start[n]) for n, _ in stock.named_parameters())  # they trained


@pytest.mark.parametrize("name", NETS)
def test_state_dict_keys_and_values_are_the_stock_ones_both_ways(name):
    stock = build(name)
    fused = fastmnist.fuse(stock)
    assert list(fused.state_dict()) == list(stock.state_dict())
    for key, value in stock.state_dict().items():
        assert torch.equal(fused.state_dict()[key], value), key
    other = NETS[name]()  # fresh weights: a stock checkpoint loads into the fused net and back
    fused.load_state_dict(other.state_dict())
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(fused.eval()(x), other.eval()(x), atol=1e-5, rtol=1e-4)
    stock.load_state_dict(fused.state_dict())
    torch.testing.assert_close(stock.eval()(x), other(x), atol=0, rtol=0)


def test_what_forward_never_reads_stays_in_the_state_dict():
    class Spare(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))
            self.register_buffer("seen", torch.zeros(2))
            self.conv, self.bn = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)
            self.spare_head = nn.Linear(2, 2)
            self.block = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 1))

        def forward(self, x):
            return self.block[0](self.bn(torch.relu(self.conv(x))))

    stock = Spare()
    fused, report = fastmnist.fuse(stock, report=True)
    assert report.fused == ["conv -> relu -> bn (conv_relu_bn)"]
    state = fused.state_dict()
    assert state.keys() == stock.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in stock.state_dict().items())
    fused.load_state_dict(Spare().state_dict())


def test_the_fused_copy_shares_nothing_with_the_original_but_its_values():
    stock = build("lenet")
    fused = fastmnist.fuse(stock)
    with torch.no_grad():
        fused.get_submodule("0").weight.add_(1.0)
    assert not torch.equal(fused.state_dict()["0.weight"], stock.state_dict()["0.weight"])
    # The fused op reads the parameter that state_dict holds: changing it changes the output.
    fused.eval()
    x = torch.rand(2, 1, 28, 28)
    before = fused(x)
    with torch.no_grad():
        fused.get_submodule("2").bias.add_(1.0)
    assert not torch.allclose(fused(x), before)


def test_the_report_lists_every_fused_and_every_skipped_pattern_with_its_reason():
    _, report = fastmnist.fuse(build("residual"), report=True)
    assert str(report).splitlines() == RESIDUAL_REPORT


@pytest.mark.parametrize("net, reason", [
    (nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.BatchNorm2d(4, affine=False)), "affine=False"),
    (nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.BatchNorm2d(4, track_running_stats=False)), "track_running_stats"),
    (nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AvgPool2d(2, stride=1)), "stride = kernel"),
    (nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AvgPool2d(2, ceil_mode=True)), "floor mode"),
    (nn.Sequential(nn.Conv2d(1, 4, 2, padding="same"), nn.ReLU(), nn.BatchNorm2d(4)), "padding='same' with the even kernel"),
    (nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU(), nn.BatchNorm2d(4)), "reflect"),
    (nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), "followed by 1, not ReLU"),
    (nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Dropout(0.5), nn.BatchNorm2d(4)), "not BatchNorm2d"),
    (nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()), "the module's output"),
])
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # the stock conv's own note
def test_what_the_fused_ops_do_not_compute_is_left_stock_with_a_reason(net, reason):
    fused, report = fastmnist.fuse(net, report=True)
    assert not report.fused and len(report.skipped) == 1 and reason in report.skipped[0], report
    x = torch.rand(2, 1, 12, 12)
    torch.testing.assert_close(fused.eval()(x), net.eval()(x), atol=0, rtol=0)


def test_bad_modules_give_one_line_errors():
    class DataDependent(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(InputError, match="torch.fx cannot trace this DataDependent") as info:
        fastmnist.fuse(DataDependent())
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="takes an nn.Module, got a str"):
        fastmnist.fuse("model.pt")
