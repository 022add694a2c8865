"""`fastmnist serve`: a web page to draw a digit on and watch the model read it, and its JSON API.

Needs the `serve` extra (FastAPI, uvicorn, python-multipart); this module imports
none of them, so that the command line can say how to install them.
"""
import importlib.util

NEEDED = {"fastapi": "fastapi", "uvicorn": "uvicorn", "python_multipart": "python-multipart"}  # module: package


class ServeError(Exception):
    """What stops the server from starting (no model to serve, a port in use, the extra missing), with the remedy."""


def run_server(*args, **kwargs) -> int:
    """Serve a model until Ctrl-C; see fastmnist.serve.server.run for the arguments."""
    missing = [package for module, package in NEEDED.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ServeError(f"fastmnist serve needs {', '.join(missing)}, which is not installed: "
                         "pip install 'fastmnist[serve]' (or pip install fastapi uvicorn python-multipart)")
    from fastmnist.serve.server import run

    return run(*args, **kwargs)
