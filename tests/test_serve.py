"""fastmnist serve: the JSON API, its one inference path, the command, and requests meant to hurt it.

One server runs for the module, in a subprocess started as a user starts it, with a client timeout of
CLIENT_TIMEOUT seconds so that the slow-client tests stay short.
"""
import base64
import importlib.util
import io
import json
import os
import struct
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image

from conftest import one_line_error, run_cli
from serve_support import (digit_strokes, exchange, one_of_each_digit, port_of, post_png, running_server,
                           strokes_png)

if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
    reason = "the serve extra is not installed: pip install -e '.[serve]'"
    if os.environ.get("CI") == "true":  # CI installs it: there, a missing extra is a failure, not a skip
        raise RuntimeError(f"CI must run the serve tests: {reason}")
    pytest.skip(reason, allow_module_level=True)

CLIENT_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def server(trained_model):
    with running_server(trained_model, "--client-timeout", str(CLIENT_TIMEOUT)) as (url, proc):
        yield url, proc
    assert proc.returncode in (0, -2, 130), proc.returncode  # Ctrl-C stops it cleanly
    assert "Traceback" not in "".join(proc.stderr_lines), "".join(proc.stderr_lines)


@pytest.fixture(scope="module")
def drawn(mnist, tmp_path_factory):
    """Ten test digits drawn as the page draws them, saved as PNG files: (paths, labels)."""
    folder = tmp_path_factory.mktemp("drawn")
    paths, labels = [], []
    for i in one_of_each_digit(mnist.test_labels):
        path = folder / f"drawn{i}.png"
        path.write_bytes(strokes_png(digit_strokes(mnist.test_images[i])))
        paths.append(path)
        labels.append(int(mnist.test_labels[i]))
    return paths, labels


def api(server, path=""):
    return server[0] + path.lstrip("/")


def get_json(url):
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as response:
        return response.status, json.loads(response.read())


# ---- the API ---------------------------------------------------------------------------------------------

@pytest.mark.slow  # the trained_model fixture trains
def test_predict_answers_digit_probabilities_input_and_time(server, drawn):
    status, answer = post_png(api(server, "api/predict"), drawn[0][0].read_bytes())
    assert status == 200, answer
    assert set(answer) == {"digit", "probabilities", "input_png", "milliseconds"}
    probs = torch.tensor(answer["probabilities"])
    assert probs.shape == (10,) and abs(probs.sum().item() - 1) < 1e-5 and answer["digit"] == probs.argmax().item()
    seen = Image.open(io.BytesIO(base64.b64decode(answer["input_png"])))
    assert seen.size == (28, 28) and seen.mode == "L"
    assert answer["milliseconds"] > 0


@pytest.mark.slow  # the trained_model fixture trains
def test_model_card_and_health(server, trained_model):
    assert get_json(api(server, "healthz")) == (200, {"status": "ok"})
    status, card = get_json(api(server, "api/model"))
    assert status == 200
    assert card["model"] == "default" and card["parameters"] == 18410 and card["path"] == str(trained_model)
    assert 0.9 < card["test_accuracy"] <= 1.0, "from the run's metrics.json"
    assert card["kernel_path"]


@pytest.mark.slow  # the trained_model fixture trains
def test_the_same_answer_everywhere(server, drawn, trained_model):
    """/api/predict, Classifier.predict and `fastmnist predict` on the same files: same digits and
    probabilities (to 1e-6), and the model reads the drawn digits."""
    import fastmnist

    paths, labels = drawn
    served = [post_png(api(server, "api/predict"), p.read_bytes())[1] for p in paths]
    local = fastmnist.load(trained_model, device="cpu").predict([str(p) for p in paths])
    cli = run_cli("predict", "--json", "--checkpoint", str(trained_model), *map(str, paths))
    assert cli.returncode == 0, cli.stderr
    printed = json.loads(cli.stdout)
    for answer, digit, probs, line in zip(served, local.digits.tolist(), local.probabilities, printed):
        assert answer["digit"] == digit == line["digit"]
        torch.testing.assert_close(torch.tensor(answer["probabilities"]), probs, rtol=0, atol=1e-6)
        assert abs(answer["probabilities"][digit] - line["probability"]) <= 1e-6
    assert sum(a["digit"] == y for a, y in zip(served, labels)) >= 9, [a["digit"] for a in served]


@pytest.mark.slow  # the trained_model fixture trains
def test_a_multipart_upload_reads_as_the_body_does(server, drawn):
    data = drawn[0][0].read_bytes()
    boundary = "fastmnist-boundary"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"seven.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    status, answer = post_png(api(server, "api/predict"), form, f"multipart/form-data; boundary={boundary}")
    assert status == 200, answer
    assert answer == {**post_png(api(server, "api/predict"), data)[1], "milliseconds": answer["milliseconds"]}


@pytest.mark.slow  # the trained_model fixture trains
def test_concurrent_requests_get_their_own_answers(server, drawn, mnist):
    """16 clients at once, good and broken images mixed: each good one gets exactly its sequential answer,
    each broken one only its own error (the model is loaded once and shared by the worker threads)."""
    paths = drawn[0]
    bodies = [p.read_bytes() for p in paths] + [b"not an image"] * 3 + [paths[0].read_bytes()[:300]]
    expected = [post_png(api(server, "api/predict"), b) for b in bodies]
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda b: post_png(api(server, "api/predict"), b), bodies * 8))
    for (status, answer), (want_status, want) in zip(got, expected * 8):
        assert status == want_status
        if status == 200:
            assert answer["probabilities"] == want["probabilities"]
        else:
            assert answer == want


@pytest.mark.slow  # the trained_model fixture trains
def test_the_page_and_its_files_are_served_from_the_package(server):
    import urllib.request

    with urllib.request.urlopen(api(server), timeout=30) as response:
        page = response.read().decode()
        assert "text/html" in response.headers["content-type"]
        assert "default-src 'self'" in response.headers["content-security-policy"]
    assert "static/app.js" in page and "http" not in page.replace("http-equiv", ""), "no external URL"
    for name in ("app.js", "style.css"):
        with urllib.request.urlopen(api(server, f"static/{name}"), timeout=30) as response:
            assert response.status == 200 and "http://" not in response.read().decode()


# ---- hostile requests ------------------------------------------------------------------------------------

def png_head(width, height) -> bytes:
    """A PNG's signature and IHDR claiming width x height, 8-bit grey, with one tiny IDAT and IEND."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))


def request_head(length=None, content_type="image/png", target="/api/predict", extra="") -> bytes:
    lines = [f"POST {target} HTTP/1.1", "Host: 127.0.0.1", f"Content-Type: {content_type}"]
    lines += [f"Content-Length: {length}"] if length is not None else ["Transfer-Encoding: chunked"]
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def chunked(parts):
    return [b"%x\r\n%s\r\n" % (len(p), p) for p in parts] + [b"0\r\n\r\n"]


def multipart(parts, boundary="b0undary"):
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; {disposition}\r\n\r\n".encode() + data + b"\r\n"
                    for disposition, data in parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def hostile_cases(drawn_png):
    """name -> (head, body parts, seconds between parts, expected status, words the error holds)."""
    mib = b"\0" * (1 << 20)
    many, many_type = multipart([(f'name="f{i}"; filename="f{i}.png"', b"x") for i in range(1000)])
    text_path, text_type = multipart([('name="file"', b"/etc/passwd")])
    file_path, file_type = multipart([('name="file"; filename="/etc/passwd"', b"root:x:0:0")])
    return {
        "empty body": (request_head(0), [], 0, 400, "empty"),
        "100 MiB body": (request_head(100 << 20), [mib] * 100, 0, 413, "over the limit"),
        # Refused from the Content-Length alone: were the body awaited, this would end in a 408.
        "100 MiB declared, none sent": (request_head(100 << 20), [], 0, 413, "104,857,600 bytes"),
        "100 MiB body, no Content-Length": (request_head(), chunked([mib] * 100), 0, 413, "over the limit"),
        "Content-Length over the body": (request_head(1000), [drawn_png[:10]], 0, 408, "did not arrive"),
        "Content-Length under the body": (request_head(10), [drawn_png], 0, 400, "not a readable image"),
        "Content-Length not a number": (request_head("ten"), [drawn_png], 0, 400, "not a valid HTTP request"),
        "truncated PNG": (request_head(len(drawn_png) // 2), [drawn_png[: len(drawn_png) // 2]], 0, 400, "truncated"),
        "decompression-bomb header": (request_head(len(png_head(10**5, 10**5))), [png_head(10**5, 10**5)], 0, 400,
                                      "megapixels"),
        "not an image": (request_head(11), [b"hello world"], 0, 400, "not a readable image"),
        "wrong content type": (request_head(24, "application/json"), [b'{"path": "/etc/passwd"}\n'], 0, 415,
                               "content type"),
        "multipart with 1,000 parts": (request_head(len(many), many_type), [many], 0, 400, "form"),
        "a path in a text field": (request_head(len(text_path), text_type), [text_path], 0, 400, "text field"),
        "a path as the file name": (request_head(len(file_path), file_type), [file_path], 0, 400, "not a readable"),
        "a path in the query": (request_head(len(drawn_png), target="/api/predict?path=/etc/passwd"), [drawn_png], 0,
                                400, "query"),
        "a path in the URL": (request_head(0, target="/static/..%2f..%2fapp.py").replace(b"POST", b"GET"), [], 0, 404,
                              "no such"),
        "one byte a second": (request_head(100), [b"\x89"] * 100, 1.0, 408, "did not arrive"),
        "a head sent one byte a second": (b"", [bytes([c]) for c in request_head(5)], 1.0, 408, "did not arrive"),
    }


CASES = list(hostile_cases(b"").keys())


@pytest.mark.slow  # the trained_model fixture trains
@pytest.mark.parametrize("case", CASES)
def test_hostile_requests_get_a_4xx_and_one_line_json(server, drawn, case):
    drawn_png = drawn[0][0].read_bytes()
    head, parts, pause, want_status, words = hostile_cases(drawn_png)[case]
    status, headers, body = exchange(port_of(server[0]), head, parts, pause, timeout=CLIENT_TIMEOUT * 10)
    assert status == want_status, body
    assert headers.get("content-type") == "application/json", headers
    answer = json.loads(body)
    assert list(answer) == ["error"] and "\n" not in answer["error"] and "Traceback" not in answer["error"]
    assert words in answer["error"], answer
    assert "root:" not in answer["error"], "nothing of a file named in the request is read"
    assert get_json(api(server, "healthz")) == (200, {"status": "ok"}), "the server still answers"


@pytest.mark.slow  # the trained_model fixture trains
def test_a_client_that_sends_all_before_reading_gets_its_413(server):
    """urllib, like most clients, sends the whole body before it reads the answer; the server, having refused
    the body from its Content-Length, must keep reading (and discarding) long enough for the 413 to arrive,
    not reset the connection under it."""
    status, answer = post_png(api(server, "api/predict"), b"\0" * (20 << 20))
    assert status == 413 and "over the limit" in answer["error"]


# ---- the command -----------------------------------------------------------------------------------------

def test_serve_without_a_finished_run_says_to_train_first(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    (tmp_path / "runs" / "unfinished").mkdir(parents=True)  # a run without model.pt has not finished
    result = subprocess.run([sys.executable, "-m", "fastmnist.cli", "serve"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert "fastmnist train" in one_line_error(result)


def test_serve_picks_the_newest_finished_run(tmp_path):
    from fastmnist.serve.server import find_model

    runs = tmp_path / "runs"
    for i, name in enumerate(["b-old", "a-new", "c-unfinished"]):
        (runs / name).mkdir(parents=True)
        if name != "c-unfinished":
            (runs / name / "model.pt").write_bytes(b"x")
            os.utime(runs / name / "model.pt", (1000 + i, 1000 + i))
    assert find_model(None, runs) == runs / "a-new" / "model.pt"
    assert find_model(runs / "b-old", runs) == runs / "b-old" / "model.pt"
    with pytest.raises(Exception, match="no model.pt"):
        find_model(runs / "c-unfinished", runs)


def test_serve_help_explains_every_flag():
    result = run_cli("serve", "--help")
    assert result.returncode == 0
    for flag in ("RUN_OR_MODEL", "--host", "--port", "--client-timeout", "0.0.0.0", "runs/"):
        assert flag in result.stdout


def test_serve_without_the_extra_says_how_to_install(monkeypatch, capsys):
    import importlib.util

    from fastmnist import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    assert cli.main(["serve", "model.pt"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'fastmnist[serve]'" in err and "uvicorn" in err


@pytest.mark.slow  # the trained_model fixture trains
def test_a_port_in_use_is_one_line(server, trained_model):
    result = run_cli("serve", str(trained_model), "--port", str(port_of(server[0])), timeout=180)
    assert "already in use" in one_line_error(result)


@pytest.mark.slow  # the trained_model fixture trains
def test_listening_beyond_loopback_warns(trained_model):
    with running_server(trained_model, "--host", "0.0.0.0") as (url, proc):
        assert get_json(url + "healthz")[0] == 200
    warnings = [line for line in proc.stderr_lines if "warning" in line]
    assert len(warnings) == 1 and "0.0.0.0" in warnings[0], proc.stderr_lines
