"""Ctrl-C and SIGTERM during training: a flag the loop checks at each step boundary.

`fastmnist train` holds both signals from the first line of cli.main(),
before any file is touched, so a signal at any moment after that reaches the
run's own handling (fastmnist.train says what was saved or put back); a
library caller of fastmnist.train gets it for the call's duration. A second
signal stops at once, without saving: TrainingAborted, a KeyboardInterrupt,
so the run's cleanup (fastmnist.runs.claim) still runs on the way out.
(Before cli.main runs, Python imports the package and torch, 1-2 s in which a
signal ends the process as it would any program: nothing has been touched yet.)
"""
import signal
import threading
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingStopped(Exception):
    """A signal stopped training at a step boundary; the message says what was saved or put back."""


class TrainingAborted(KeyboardInterrupt):
    """A second Ctrl-C or SIGTERM: stopped at once, without saving; the message says what is left."""


class StopFlag:
    """Holds SIGINT and SIGTERM while installed (nested installs count); .signal names the first one received."""

    def __init__(self):
        self.signal = None  # "SIGINT" or "SIGTERM" once one has come
        self.second_signal_message = "stopped at once, without saving"
        self._previous = {}
        self._depth = 0

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signal is not None:
            raise TrainingAborted(f"{name} again: {self.second_signal_message}")
        self.signal = name

    def install(self) -> None:
        # Python lets only the main thread set handlers; elsewhere (a server's worker) signals stay the host's.
        if self._depth == 0 and threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        self._depth += 1

    def uninstall(self) -> None:
        """Give the handlers back after the outermost install; a signal held then is forgotten."""
        self._depth -= 1
        if self._depth == 0:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
            self._previous, self.signal = {}, None

    @contextmanager
    def held(self, second_signal_message: str):
        """Installed for the block, with what a second signal's message says is left."""
        self.install()
        previous, self.second_signal_message = self.second_signal_message, second_signal_message
        try:
            yield self
        finally:
            self.second_signal_message = previous
            self.uninstall()


STOP = StopFlag()  # signal handlers are per process: one flag
