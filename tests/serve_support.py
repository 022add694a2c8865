"""What the `fastmnist serve` tests share (the model that reads digits is conftest's trained_model): a server in
a subprocess, digits traced as pen strokes (the browser test draws them with the pointer; the API tests render
them to PNGs)."""
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.client import HTTPResponse

from PIL import Image, ImageDraw

CANVAS = 280  # the page's canvas, in its own units (fastmnist/serve/static/index.html)
STROKE_WIDTH = 20  # the page's pen (app.js STROKE_WIDTH)
SCALE = CANVAS // 28  # one MNIST pixel is 10 canvas units
INK = 128  # pixels at least this bright are traced: the strokes' cores; the pen's width adds the rest


def one_of_each_digit(labels, count=10):
    """Indices of the first test image of each digit 0..count-1."""
    labels = labels.tolist()
    return [labels.index(d) for d in range(count)]


def digit_strokes(image_u8):
    """An MNIST digit (28x28 uint8) as horizontal pen strokes in canvas units: one stroke along each run of
    ink pixels in each row, so that the page's round pen of STROKE_WIDTH redraws the digit."""
    strokes = []
    for r, row in enumerate((image_u8 >= INK).tolist()):
        c = 0
        while c < 28:
            if not row[c]:
                c += 1
                continue
            start = c
            while c < 28 and row[c]:
                c += 1
            y = (r + 0.5) * SCALE
            strokes.append(((start + 0.5) * SCALE, y, (c - 0.5) * SCALE, y))
    return strokes


def strokes_png(strokes) -> bytes:
    """The strokes as the page draws them (white round pen on black, 280x280), as a PNG file's bytes."""
    image = Image.new("L", (CANVAS, CANVAS), 0)
    draw, r = ImageDraw.Draw(image), STROKE_WIDTH / 2
    for x0, y0, x1, y1 in strokes:
        draw.line([(x0, y0), (x1, y1)], fill=255, width=STROKE_WIDTH)
        for x, y in ((x0, y0), (x1, y1)):  # the round caps
            draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@contextmanager
def running_server(model, *args, startup_timeout=180):
    """`fastmnist serve MODEL --port 0 ARGS` in a subprocess, as a user starts it; yields (url, process).

    The process's stderr is collected; the caller may check it holds no traceback."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "fastmnist.cli", "serve", str(model), "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stderr = []
    threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True).start()
    found = {}

    def read_url():
        for line in proc.stdout:
            match = re.search(r"at (http://\S+/) ", line)
            if match:
                found["url"] = match.group(1)
                return

    reader = threading.Thread(target=read_url, daemon=True)
    reader.start()
    reader.join(startup_timeout)
    try:
        if "url" not in found:
            raise RuntimeError(f"fastmnist serve printed no URL within {startup_timeout} s: {''.join(stderr)}")
        proc.stderr_lines = stderr
        yield found["url"], proc
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].strip("/"))


def post_png(url, data: bytes, content_type="image/png", timeout=30):
    """(status, parsed JSON) of POST url with data as the body."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def exchange(port, head: bytes, body_parts=(), pause=0.0, timeout=30):
    """Send a hand-made request over a raw socket (head, then each body part pause seconds apart, from
    a thread, so that a refusal can arrive while we still send) and read the answer: (status, headers, body).

    Send errors are ignored: a server that refuses a body may stop reading it."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)

    def send():
        try:
            sock.sendall(head)
            for part in body_parts:
                if pause:
                    time.sleep(pause)
                sock.sendall(part)
        except OSError:
            pass

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        response = HTTPResponse(sock)
        response.begin()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        sock.close()
