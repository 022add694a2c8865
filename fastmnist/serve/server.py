"""Start the server: the model chosen and loaded once, the socket bound, the URL printed, uvicorn run."""
import errno
import ipaddress
import socket
import sys
from pathlib import Path

import torch
import uvicorn

from fastmnist.api import load
from fastmnist.serve import ServeError
from fastmnist.serve.app import create_app
from fastmnist.serve.limits import CLIENT_TIMEOUT
from fastmnist.serve.protocol import protocol_class

RUNS = Path("runs")  # where `fastmnist train` puts a run that names no --out (train.run_folder)
MAX_CONNECTIONS = 64  # at most 64 x 8 MiB bodies held at once; uvicorn answers 503 beyond it


def find_model(given=None, runs: Path = RUNS) -> Path:
    """The model.pt to serve: the one given (a run folder or a model.pt), else the newest finished run's."""
    if given is not None:
        path = Path(given)
        if path.is_dir() and not (path / "model.pt").is_file():
            raise ServeError(f"{path}: holds no model.pt, so its run has not finished (a run writes model.pt at "
                             "its end); pass a finished run's folder or a model.pt")
        return path / "model.pt" if path.is_dir() else path
    finished = [p for p in runs.glob("*/model.pt") if p.is_file()] if runs.is_dir() else []
    if not finished:
        raise ServeError(f"no finished run under {runs}/ to serve; train one first with `fastmnist train`, "
                         "or pass a run folder or a model.pt")
    return max(finished, key=lambda p: p.stat().st_mtime)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to any interface


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one), or a ServeError saying what to change."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ServeError(f"--host {host}: not an address this machine can listen on ({exc.strerror}); "
                         "use 127.0.0.1, or 0.0.0.0 for every interface") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ServeError(f"port {port} on {host} is already in use (another server?); pass another --port, "
                             "or --port 0 for a free one") from None
        if exc.errno == errno.EACCES:
            raise ServeError(f"not allowed to listen on port {port} (ports below 1024 need root); "
                             "pass --port 8000 or another above 1024") from None
        raise ServeError(f"cannot listen on {host}:{port} ({exc.strerror}); pass another --host or --port") from None
    return sock


def url(host: str, port: int) -> str:
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"  # every interface, this machine's own included
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def run(model=None, host: str = "127.0.0.1", port: int = 8000, client_timeout: float = CLIENT_TIMEOUT,
        log=print) -> int:
    """Serve model (see find_model) on host:port until Ctrl-C."""
    path = find_model(model)
    # One thread per inference: a 28x28 image is too small to gain from more, and requests run side by side
    # in worker threads (as many as the CPUs), which is where the cores are used.
    torch.set_num_threads(1)
    classifier = load(path, device="cpu")
    sock = listen(host, port)
    port = sock.getsockname()[1]
    if not is_loopback(host):
        print(f"fastmnist: warning: --host {host} lets other machines reach this page and its API, with no login; "
              "use the default 127.0.0.1 unless that is what you want", file=sys.stderr)
    info = classifier.info
    log(f"fastmnist: serving {path} ({info.model}, {info.parameters:,} parameters, {info.kernel_path}) "
        f"at {url(host, port)} (Ctrl-C stops)")
    sys.stdout.flush()
    config = uvicorn.Config(create_app(classifier, client_timeout),
                            http=protocol_class(client_timeout), lifespan="off", log_level="warning",
                            access_log=False, limit_concurrency=MAX_CONNECTIONS, server_header=False)
    try:
        uvicorn.Server(config).run(sockets=[sock])  # stops on Ctrl-C (SIGINT) or SIGTERM, then raises it again
    except KeyboardInterrupt:
        pass
    log("fastmnist: server stopped")
    return 0
