"""The web app: the draw-a-digit page and its JSON API, around one loaded Classifier.

    GET  /              the page (static files shipped in the package: it works offline)
    POST /api/predict   a PNG or JPEG as the body, or a multipart form with one file
                        -> {"digit", "probabilities", "input_png", "milliseconds"}
    GET  /api/model     the model's card (Classifier.info)
    GET  /healthz       {"status": "ok"}
    GET  /docs          the OpenAPI page FastAPI writes (it loads its script from a CDN; the draw page does not)

An image is read by Classifier.preprocess, the same code as `fastmnist predict`
and Classifier.predict, and classified by Classifier.predict_batch: one
preprocessing and one inference path under every face. Every error is
{"error": "<one line>"}, 4xx for the client's mistakes, never a traceback.
"""
import base64
import io
import logging
import os
import time
from importlib import resources

import anyio
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image
from starlette.exceptions import HTTPException

from fastmnist.api import Classifier, InputError
from fastmnist.predict import ImageError
from fastmnist.serve.limits import CLIENT_TIMEOUT, MAX_BODY_BYTES, MAX_FORM_PARTS, ClientError, read_body

log = logging.getLogger("fastmnist.serve")

IMAGE_TYPES = ("image/png", "image/jpeg")  # what the body may be; a multipart form's file is checked by decoding
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8"}
# Each response says where the page may load from: this server only (and data: for the 28x28 image).
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
                               "base-uri 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}
CLOSE = {"connection": "close"}  # after a refused or late body: what is left of it is not read


def static_files() -> dict:
    """{file name: (bytes, content type)} for the page, read once from the package: a request can only
    name one of these, never a path on disk."""
    folder = resources.files("fastmnist.serve") / "static"
    return {f.name: (f.read_bytes(), STATIC_TYPES[f.name[f.name.rfind("."):]])
            for f in folder.iterdir() if f.name[f.name.rfind("."):] in STATIC_TYPES}


def error(status: int, message: str, headers=None) -> JSONResponse:
    return JSONResponse({"error": " ".join(message.split())}, status_code=status, headers=headers)


def classify(classifier: Classifier, data: bytes) -> dict:
    """The answer for one image file's bytes: the page's, the API's and `fastmnist predict`'s path."""
    start = time.perf_counter()
    seen = classifier.preprocess(data)  # (28, 28) in [0, 1]; ImageError for a bad image
    probs = classifier.predict_batch(seen[None, None]).probabilities[0]
    milliseconds = 1000 * (time.perf_counter() - start)
    png = io.BytesIO()
    Image.fromarray(seen.mul(255).round_().to(torch.uint8).numpy(), "L").save(png, "PNG")
    return {"digit": int(probs.argmax()), "probabilities": probs.tolist(),
            "input_png": base64.b64encode(png.getvalue()).decode("ascii"), "milliseconds": milliseconds}


async def image_from_request(request: Request, timeout: float) -> bytes:
    """The uploaded image's bytes: the whole body (image/png or image/jpeg), or the one file of a form."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in IMAGE_TYPES and kind != "multipart/form-data":
        raise ClientError(415, f"content type {kind or '(none)'!r} is not accepted; send a PNG or JPEG as the body "
                          "(Content-Type: image/png or image/jpeg) or as the one file of a multipart/form-data form")
    if request.query_params:
        raise ClientError(400, f"unexpected query parameters ({', '.join(sorted(request.query_params))}); "
                          "/api/predict takes only the image")
    body = await read_body(request, MAX_BODY_BYTES, timeout)
    if kind == "multipart/form-data":
        body = await file_from_form(request, body)
    if not body:
        raise ClientError(400, "the image is empty (0 bytes); send a PNG or JPEG of the digit")
    return body


async def file_from_form(request: Request, body: bytes) -> bytes:
    """The bytes of the one file in a multipart form already read into body; text fields are refused
    (a file name or path in the form is never opened: only the uploaded bytes are read)."""
    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    try:  # Starlette's parser, bounded in parts; the form's size is already bounded by read_body
        form = await Request(request.scope, replay).form(
            max_files=MAX_FORM_PARTS, max_fields=MAX_FORM_PARTS, max_part_size=MAX_BODY_BYTES)
    except HTTPException as exc:
        raise ClientError(400, f"not a usable multipart form ({exc.detail}); send one file") from None
    try:
        files = [(name, value) for name, value in form.multi_items() if not isinstance(value, str)]
        texts = [name for name, value in form.multi_items() if isinstance(value, str)]
        if texts or len(files) != 1:
            raise ClientError(400, f"the form holds {len(files)} files and {len(texts)} text fields; send exactly "
                              "one file (the image itself, e.g. field 'file') and nothing else")
        return await files[0][1].read()
    finally:
        await form.close()


def cpu_count() -> int:
    """The CPUs this process may run on (a container's share, not the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def create_app(classifier: Classifier, client_timeout: float = CLIENT_TIMEOUT, workers: int = 0) -> FastAPI:
    """The app serving classifier. client_timeout bounds the time a client has to send its body; workers
    (default: one per CPU) is how many images are read and classified at once, in worker threads.

    The model is only read during inference (eval mode, no gradients, no state written), so requests may
    run it side by side; more threads than CPUs would only make them take turns.
    """
    workers = workers or cpu_count()
    limiter = None  # an anyio.CapacityLimiter, made in the event loop on the first request
    app = FastAPI(title="fastmnist", description="Draw a digit and watch the model read it.",
                  version=classifier.info.fastmnist_version, redoc_url=None)
    static = static_files()

    add_error_handlers(app)

    @app.get("/", include_in_schema=False)
    async def page():
        content, kind = static["index.html"]
        return Response(content, media_type=kind)

    @app.get("/static/{name}", include_in_schema=False)
    async def static_file(name: str):
        if name not in static:
            raise ClientError(404, f"no such file: {name}")
        content, kind = static[name]
        return Response(content, media_type=kind)

    @app.get("/healthz", summary="Whether the server is up")
    async def healthz():
        return {"status": "ok"}

    @app.get("/api/model", summary="The model's card")
    async def model_card():
        return classifier.info.to_dict()

    @app.post("/api/predict", summary="Classify one image of a digit",
              description="The body is a PNG or JPEG (Content-Type image/png or image/jpeg), or a "
              f"multipart/form-data form holding one file; at most {MAX_BODY_BYTES >> 20} MiB. Answers the "
              "digit, its 10 probabilities, the 28x28 image the model saw (a base64 PNG) and the milliseconds "
              "the server spent reading and classifying it.")
    async def predict(request: Request):
        data = await image_from_request(request, client_timeout)
        nonlocal limiter
        limiter = limiter or anyio.CapacityLimiter(workers)
        try:  # decoding and the model run in a worker thread: the event loop keeps serving
            return await anyio.to_thread.run_sync(classify, classifier, data, limiter=limiter)
        except (ImageError, InputError) as exc:
            raise ClientError(400, getattr(exc, "reason", str(exc))) from None

    return app


def add_error_handlers(app: FastAPI) -> None:
    """Security headers on every answer but /docs, and every error as one line of JSON with its status."""
    app.add_middleware(SecurityHeaders)

    @app.exception_handler(ClientError)
    async def client_error(request, exc: ClientError):
        return error(exc.status, exc.message, CLOSE if exc.status in (408, 413) else None)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        messages = {404: f"no such page: {request.url.path}", 405: f"{request.method} is not allowed here"}
        return error(exc.status_code, messages.get(exc.status_code, str(exc.detail)), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        return error(422, f"invalid request: {exc.errors()[0].get('msg', 'see /docs')}")

    @app.exception_handler(Exception)
    async def server_error(request, exc: Exception):  # a bug: logged in full here, one line for the client
        log.exception("fastmnist serve: %s %s failed", request.method, request.url.path)
        return error(500, f"the server failed on this request ({type(exc).__name__}); its log has the details")


class SecurityHeaders:
    """Adds SECURITY_HEADERS to every answer but /docs' (the OpenAPI page loads its script from a CDN).

    A plain ASGI middleware: @app.middleware("http") (Starlette's BaseHTTPMiddleware) runs each request
    through an extra task and stream, a cost paid on every prediction.
    """

    def __init__(self, app):
        self.app = app
        self.headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in SECURITY_HEADERS.items()]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"].startswith("/docs"):
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []), *(h for h in self.headers if h[0] not in names)]
            await send(message)

        await self.app(scope, receive, send_with_headers)
