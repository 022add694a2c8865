"""uvicorn's HTTP/1.1 protocol with the three things a server left running needs and it lacks.

1. A deadline for the request's head. uvicorn times out a connection idle
   between requests, but a client that sends its head one byte a second resets
   that timer with every byte and holds the connection for ever (slowloris).
   Here each request's head must be complete within `client_timeout` seconds of
   the connection opening or of the previous response; the body has the same
   limit in fastmnist.serve.limits.read_body.
2. Lingering close. A server that refuses a body (413) or times it out (408)
   closes the connection with the client's unread bytes still queued, and the
   kernel then sends a reset that can destroy the response before the client
   reads it: the client sees "connection reset" instead of the reason (measured:
   urllib sending a 9 MiB body, as most clients do, before reading). So a
   close first ends our side (FIN) and reads and discards what still comes, for
   at most LINGER_SECONDS or LINGER_BYTES (nginx's lingering_close does the same).
3. JSON errors. A request h11 cannot parse (a bad Content-Length, a broken
   head) is answered {"error": ...}, as every other error, not as plain text.
"""
import asyncio
import json

from uvicorn.protocols.http.h11_impl import H11Protocol

from fastmnist.serve.limits import CLIENT_TIMEOUT, MAX_BODY_BYTES

LINGER_SECONDS = 2.0
LINGER_BYTES = 4 * MAX_BODY_BYTES  # a body up to about 5x the limit still gets its 413 read


def raw_json_response(status: int, reason: str, message: str) -> bytes:
    """A complete HTTP/1.1 response carrying {"error": message}, closing the connection."""
    body = json.dumps({"error": message}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode("ascii") + body


class _LingeringTransport:
    """The connection's transport, whose close() lingers (see the module's note 2)."""

    def __init__(self, transport: asyncio.Transport, protocol: "GuardedH11Protocol"):
        self._transport, self._protocol = transport, protocol

    def __getattr__(self, name):
        return getattr(self._transport, name)

    def close(self):
        self._protocol.linger()

    def is_closing(self):
        return self._protocol.lingering or self._transport.is_closing()


class GuardedH11Protocol(H11Protocol):
    """H11Protocol with a head deadline, lingering close and JSON parse errors; see the module's docstring."""

    client_timeout = CLIENT_TIMEOUT  # protocol_class() makes a subclass with another value

    def connection_made(self, transport):
        self._raw_transport = transport
        self.lingering, self._discarded = False, 0
        self._head_timer = self._linger_timer = None
        super().connection_made(_LingeringTransport(transport, self))
        self._arm_head_deadline()

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            self._discarded += len(data)
            if self._discarded > LINGER_BYTES:
                self._raw_transport.close()
            return
        cycle = self.cycle
        super().data_received(data)
        if self.cycle is not cycle and self._head_timer is not None:  # a request's head arrived in full
            self._head_timer.cancel()
            self._head_timer = None

    def on_response_complete(self) -> None:
        cycle = self.cycle
        super().on_response_complete()
        if self.cycle is cycle and not self.transport.is_closing():  # waiting for the next request's head
            self._arm_head_deadline()

    def connection_lost(self, exc) -> None:
        for timer in (self._head_timer, self._linger_timer):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        self._raw_transport.write(raw_json_response(400, "Bad Request", f"not a valid HTTP request ({msg.rstrip('.')})"))
        self.transport.close()

    def _arm_head_deadline(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.client_timeout, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return  # closed already, or a request is being answered (its body has its own deadline)
        self._raw_transport.write(raw_json_response(
            408, "Request Timeout", f"the request did not arrive within {self.client_timeout:g} s; send it in one go"))
        self.transport.close()

    def linger(self) -> None:
        """Half-close (FIN after what is written), discard what still arrives, close for good later."""
        if self.lingering or self._raw_transport.is_closing():
            return
        self.lingering = True
        if not self._raw_transport.can_write_eof():
            self._raw_transport.close()
            return
        try:
            self._raw_transport.write_eof()
        except OSError:  # the client is gone already (it reset the connection)
            self._raw_transport.close()
            return
        self._raw_transport.resume_reading()  # uvicorn pauses reading while a body waits for the app
        self._linger_timer = self.loop.call_later(LINGER_SECONDS, self._raw_transport.close)

    def eof_received(self):
        if self.lingering:
            self._raw_transport.close()  # the client has finished too: nothing left to protect
        return super().eof_received()


def protocol_class(client_timeout: float) -> type:
    """GuardedH11Protocol with this head deadline (uvicorn builds one protocol per connection from the class)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"client_timeout": client_timeout})
