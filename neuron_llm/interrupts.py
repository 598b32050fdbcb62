"""Holding back Ctrl-C through work that must not be cut short."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def interrupt_after() -> Iterator[list[bool]]:
    """Hold back Ctrl-C until the block ends, when the yielded list holds True if one came;
    the caller raises ``KeyboardInterrupt`` then, once its state is whole again.

    For short blocks only: a second Ctrl-C is raised at once (a block that hangs). Only on
    the main thread, and only where SIGINT has Python's own handler (the one that raises
    KeyboardInterrupt); inside another such block, the outer one holds it back.
    """
    interrupted: list[bool] = []
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield interrupted
        return

    def hold_back(signum: int, frame: object) -> None:
        if interrupted:
            raise KeyboardInterrupt
        interrupted.append(True)

    signal.signal(signal.SIGINT, hold_back)
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
