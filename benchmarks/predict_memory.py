"""Peak resident memory of `fastmnist predict` on one image at the pixel limit, per kind of image.

    python benchmarks/predict_memory.py [MEGAPIXELS]   # default: predict.MAX_PIXELS; writes results/predict_memory.json

Each image is a digit on paper at MEGAPIXELS (4:3), in the kinds a user hands us: 8-bit grey PNG, RGB JPEG
(also with an EXIF orientation to turn), RGBA PNG (transparency composited), 16-bit grey PNG, and, as the
floor, a 28x28 PNG. Each runs in a fresh process (`python -m fastmnist.cli predict`), measured by
getrusage(RUSAGE_CHILDREN).ru_maxrss: torch's own resident memory (about 0.8 GB with torch 2.x on the CPU,
its import's peak) is in every figure, so the cost of an image is its difference from the floor (which
underestimates it where the image fits in memory the import freed; tests/test_predict.py measures the
growth itself). A memory figure, not a timing: it holds on a shared machine.
"""
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from fastmnist.predict import MAX_PIXELS  # noqa: E402


def digit(width, height, mode, paper, ink):
    image = Image.new(mode, (width, height), paper)
    side = min(width, height)
    stroke = [(width // 2, side // 6), (width // 2, 5 * side // 6)]
    ImageDraw.Draw(image).line(stroke, fill=ink, width=max(1, side // 20))
    return image


def _turned() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: taken sideways, to be turned upright
    return exif.tobytes()


def images(folder: Path, pixels: int) -> dict:
    width = int(math.sqrt(pixels * 4 / 3))
    height = pixels // width
    made = {"floor 28x28 png": (digit(28, 28, "L", 255, 0), "png", {})}
    made["grey png"] = (digit(width, height, "L", 255, 0), "png", {})
    made["rgb jpeg"] = (digit(width, height, "RGB", (250, 250, 240), (10, 10, 60)), "jpg", {"quality": 90})
    made["rgb jpeg, exif turned"] = (made["rgb jpeg"][0], "jpg", {"quality": 90, "exif": _turned()})
    made["rgba png"] = (digit(width, height, "RGBA", (0, 0, 0, 0), (0, 0, 0, 255)), "png", {})
    made["16-bit grey png"] = (digit(width, height, "I;16", 60000, 0), "png", {})
    paths = {}
    for name, (image, ext, kw) in made.items():
        paths[name] = folder / f"{name.replace(' ', '_')}.{ext}"
        image.save(paths[name], **kw)
        del image
    return paths


def peak_mb(model: Path, image: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    code = ("import resource, subprocess, sys\n"
            "r = subprocess.run([sys.executable, '-m', 'fastmnist.cli', 'predict', '--checkpoint', sys.argv[1], "
            "sys.argv[2]], capture_output=True, text=True)\n"
            "assert r.returncode == 0, r.stdout + r.stderr\n"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
    out = subprocess.run([sys.executable, "-c", code, str(model), str(image)], capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(out.stderr)
    return int(out.stdout) / 1024


def main():
    pixels = int(float(sys.argv[1]) * 1e6) if len(sys.argv) > 1 else MAX_PIXELS
    from fastmnist.checkpoint import save_model
    from fastmnist.model import build_model

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model.pt"
        kwargs = {"name": "default", "impl": "stock", "dropout": 0.0}
        save_model(model, build_model(**kwargs), kwargs)
        rows = {}
        for name, path in images(Path(tmp), pixels).items():
            rows[name] = {"file_bytes": path.stat().st_size, "peak_mb": round(peak_mb(model, path))}
            print(f"{name:18s} {rows[name]['file_bytes']:>12,} bytes  peak {rows[name]['peak_mb']:6,} MB", flush=True)
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    record = {"megapixels": pixels / 1e6, "commit": git.stdout.strip(), "machine": platform.machine(),
              "python": platform.python_version(), "results": rows}
    out = REPO / "benchmarks" / "results" / "predict_memory.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
