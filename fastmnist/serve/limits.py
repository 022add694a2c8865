"""What one request may cost the server: the body's size, the time to send it, the form's parts.

A digit drawn on the page is a PNG of a few kilobytes and a phone's photo of
one a few megabytes, so MAX_BODY_BYTES is ample for a digit while bounding
what a request can make the server hold. The pixel limit of fastmnist.predict
(MAX_PIXELS, read from the image's header) applies after this, before decoding.
"""
import anyio
from starlette.requests import ClientDisconnect, Request

MAX_BODY_BYTES = 8 << 20  # 8 MiB
# Seconds for a request's head, and again for its body. A drawn digit is a few kilobytes; a full 8 MiB
# in 10 s needs 7 Mbit/s, so a slow link sending large photos needs a longer --client-timeout.
CLIENT_TIMEOUT = 10.0
MAX_FORM_PARTS = 4  # an upload is one file; a few more parts are refused with a message, not parsed by the 1,000


class ClientError(Exception):
    """The client's mistake: an HTTP status (4xx) and a one-line message saying what to send instead."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


async def read_body(request: Request, limit: int = MAX_BODY_BYTES, timeout: float = CLIENT_TIMEOUT) -> bytes:
    """The request's body, refused (413) from its Content-Length before a byte is read when that is over
    limit, else while it streams once it passes limit; refused (408) when it takes over timeout seconds."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:  # h11 has refused other values
        raise ClientError(413, f"the body is {int(declared):,} bytes, over the limit of {limit:,} bytes; "
                          "send a smaller image of the digit")
    chunks, size = [], 0
    try:
        with anyio.fail_after(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ClientError(413, f"the body is over the limit of {limit:,} bytes; "
                                      "send a smaller image of the digit")
                chunks.append(chunk)
    except TimeoutError:
        raise ClientError(408, f"the body did not arrive within {timeout:g} s ({size:,} bytes came); "
                          "send it in one go") from None
    except ClientDisconnect:
        raise ClientError(400, "the client closed the connection before the body was complete") from None
    return b"".join(chunks)
