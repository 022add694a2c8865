"""Crafted model.pt files (issue 19, 3 and 5): bounded memory, every value checked before use, one named line."""
import json
import struct
import subprocess
import sys
import zipfile
import zlib

import pytest
import torch

from conftest import one_line_error, run_cli
from fastmnist.checkpoint import CheckpointError, load_model  # what predict and eval call

GIB = 1 << 30
PEAK_LIMIT_KB = 1 << 20  # 1 GB of resident memory, torch's own ~650 MB included


def deflated_zeros(n_mib: int) -> bytes:
    """A raw deflate stream of n_mib MiB of zeros, about 1 KB per MiB, built without deflating it all:
    after a full flush the compressor's output for the same input repeats byte for byte."""
    c, zeros = zlib.compressobj(9, zlib.DEFLATED, -15), bytes(1 << 20)
    first = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    again = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    return first + again * (n_mib - 1) + c.flush()


def write_zip(path, records):
    """A zip archive from (name, payload, method, declared size) records, written by hand so that a
    record's declared size may be anything (zipfile would compute it)."""
    out, central = bytearray(), bytearray()
    for name, payload, method, size in records:
        name = name.encode()
        crc = zlib.crc32(payload) if method == zipfile.ZIP_STORED else 0
        header = struct.pack("<HHHHHLLLHH", 20, 0, method, 0, 0x21, crc, len(payload), size, len(name), 0)
        central += b"PK\x01\x02" + struct.pack("<H", 20) + header + struct.pack("<HHHLL", 0, 0, 0, 0, len(out)) + name
        out += b"PK\x03\x04" + header + name + payload
    end = struct.pack("<4sHHHHLLH", b"PK\x05\x06", 0, 0, len(records), len(records), len(central), len(out), 0)
    path.write_bytes(bytes(out + central + end))
    return path


def bomb(untrained_model, path, declared):
    """The genuine model.pt with its first tensor's record replaced by 2 GiB of deflated zeros."""
    with zipfile.ZipFile(untrained_model) as z:
        records = [(i.filename, z.read(i), zipfile.ZIP_STORED, i.file_size) for i in z.infolist()]
    index = next(i for i, r in enumerate(records) if r[0].endswith("/data/0"))
    records[index] = (records[index][0], deflated_zeros(2048), zipfile.ZIP_DEFLATED, declared)
    return write_zip(path, records)


def edited(untrained_model, path, edit):
    ckpt = torch.load(untrained_model, weights_only=True)
    edit(ckpt)
    torch.save(ckpt, path)
    return path


def first_key(ckpt, suffix):
    return next(k for k in ckpt["state_dict"] if k.endswith(suffix))


CRAFTED = {
    # name: (how to make it from the genuine file, what the one-line error must say)
    "zip_bomb": (lambda m, p: bomb(m, p, 2 * GIB), r"would inflate to 2,147,\d{3},\d{3} bytes, over the limit"),
    "zip_bomb_lying_size": (lambda m, p: bomb(m, p, 16), r"not a readable model checkpoint"),
    "dropout_tensor": (lambda m, p: edited(m, p, lambda c: c["model_kwargs"].update(
        dropout=torch.zeros(1).expand(2 * GIB))), r"dropout a Tensor of shape \(2147483648\) \(torch.float32\), "
        r"not a number in \[0, 1\)"),
    "long_format": (lambda m, p: edited(m, p, lambda c: c.update(format="x" * 4_000_000)),
                    r"saved in format 'x{80}'\.\.\. \(4,000,000 characters\)"),
    "wrong_shape": (lambda m, p: edited(m, p, lambda c: c["state_dict"].update(
        {first_key(c, "conv.weight"): torch.zeros(3, 3)})), r"state_dict\['1.conv.weight'\] has shape \(3, 3\), "
        r"the model \(16, 1, 3, 3\)"),
    "huge_shape": (lambda m, p: edited(m, p, lambda c: c["state_dict"].update(
        {first_key(c, "conv.weight"): torch.zeros(1).expand(2 * GIB)})), r"has shape \(2147483648\), the model"),
    "missing": (lambda m, p: edited(m, p, lambda c: c["state_dict"].pop(first_key(c, "running_var"))),
                r"does not fit the model it names: state_dict lacks '1.bn.running_var' \(1 of the \d+ tensors"),
    "complex": (lambda m, p: edited(m, p, lambda c: c["state_dict"].update(
        {first_key(c, "bn.weight"): torch.ones(16, dtype=torch.complex64)})),
        r"state_dict\['1.bn.weight'\] holds torch.complex64, the model torch.float32"),
    "string_kwarg": (lambda m, p: edited(m, p, lambda c: c["model_kwargs"].update(dropout="0.1")),
                     r"dropout '0.1', not a number"),
    "model_name": (lambda m, p: edited(m, p, lambda c: c["model_kwargs"].update(name="\n" * 1000)),
                   r"names the model '(\\n){80}'\.\.\. \(1,000 characters\)"),
}


@pytest.fixture(scope="module")
def crafted(untrained_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("crafted")
    return {name: make(untrained_model, folder / f"{name}.pt") for name, (make, _) in CRAFTED.items()}


def test_the_crafted_files_are_small(crafted):
    assert all(p.stat().st_size < 5 << 20 for p in crafted.values())  # the largest, the 4 MB format string


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_each_crafted_file_is_one_short_named_line(crafted, name, recwarn):
    with pytest.raises(CheckpointError, match=CRAFTED[name][1]) as caught:
        load_model(crafted[name])
    message = str(caught.value)
    assert "\n" not in message and len(message) < 500, message
    assert message.startswith(str(crafted[name]))
    assert not [w for w in recwarn if "complex" in str(w.message).lower()]  # refused before torch could warn


def test_peak_memory_on_every_crafted_file_is_under_1_gb(crafted):
    """Each file is loaded in one fresh process; its peak resident memory (torch's own included) stays
    under 1 GB (on 61107d9 the bomb and the dropout tensor each took it to 2.6 GB)."""
    script = (
        "import json, sys\n"
        "from fastmnist.checkpoint import CheckpointError, load_model\n"
        "errors = []\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        load_model(path)\n"
        "        errors.append(None)\n"
        "    except CheckpointError as exc:\n"
        "        errors.append(str(exc))\n"
        # VmHWM is this process's own peak: ru_maxrss would also count the forking pytest's resident size.
        "peak_kb = int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])\n"
        "print(json.dumps({'peak_kb': peak_kb, 'errors': errors}))\n"
    )
    paths = [str(p) for p in crafted.values()]
    result = subprocess.run([sys.executable, "-c", script, *paths], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert all(report["errors"]), report["errors"]
    print(f"peak resident memory over {len(paths)} crafted files: {report['peak_kb'] / 1024:.0f} MB")
    assert report["peak_kb"] < PEAK_LIMIT_KB, f"peak {report['peak_kb'] / 1024:.0f} MB"


@pytest.mark.parametrize("name", ["complex", "long_format"])
def test_the_cli_refuses_in_one_line_without_warnings(crafted, name):
    line = one_line_error(run_cli("eval", "--checkpoint", str(crafted[name])))
    assert len(line) < 500 and "Warning" not in line


def test_a_file_over_the_size_limit_is_refused_before_reading(tmp_path):
    from fastmnist import model_file

    path = tmp_path / "model.pt"
    with open(path, "wb") as f:
        f.truncate(model_file.MAX_MODEL_BYTES + 1)
    with pytest.raises(CheckpointError, match=r"4,194,305 bytes, over the limit of 4,194,304 bytes"):
        load_model(path)


@pytest.mark.parametrize("kwargs, match", [
    ({"name": "default", "dropout": True}, "dropout True"),
    ({"name": "default", "dropout": 1.0}, "dropout 1.0"),
    ({"name": "default", "dropout": float("nan")}, "dropout nan"),
    ({"name": "default", "dropout": 10**400}, "dropout an integer of 1,329 bits"),
    ({"name": torch.zeros(1)}, "names the model a Tensor"),
    ({"name": "default", "impl": ["fused"]}, "impl a list"),
    ({"name": "default", "layers": 5}, "unknown arguments \\('layers'\\)"),
])
def test_model_kwargs_are_checked_by_type_and_range(kwargs, match):
    from fastmnist import model_file

    with pytest.raises(CheckpointError, match=match):
        model_file.check_model_kwargs(kwargs, "model.pt")


def test_a_genuine_model_loads(untrained_model):
    model, kwargs = load_model(untrained_model)
    assert kwargs == {"name": "default", "impl": "stock", "dropout": 0.0}
    assert not model.training
