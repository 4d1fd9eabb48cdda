"""A Grid whose ``send_and_receive`` pulls replies at a short, growing interval.

Flower's deployment grid (``flwr/superlink/grid/http_grid.py``) sleeps a fixed 3 s
between pulls: a reply that arrives just after a pull waits up to 3 s, every round,
for every message batch. This wrapper keeps Flower's grid for everything and only
re-implements the loop over the public ``push_messages``/``pull_messages``: the first
pulls follow quickly (a warm node answers a query in well under a second), then the
interval grows to ``max_interval`` so a long round does not hammer the SuperLink.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

__all__ = ["PromptGrid", "prompt"]


class PromptGrid(Grid):
    def __init__(self, *, inner: Grid, first_interval: float = 0.05, max_interval: float = 0.5) -> None:
        if not 0 < first_interval <= max_interval:
            raise ValueError(f"need 0 < first_interval <= max_interval, got {first_interval}, {max_interval}")
        self.inner = inner
        self.first_interval = first_interval
        self.max_interval = max_interval
        self.pulls = 0  # how many pulls the loop made (the tests read it)

    # --- delegated to Flower's grid ------------------------------------------------------------
    def set_run(self, run):  # type: ignore[override]
        return self.inner.set_run(run)

    @property
    def run(self):  # type: ignore[override]
        return self.inner.run

    def create_message(self, *args, **kwargs) -> Message:  # type: ignore[override]
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def get_nodes(self):  # type: ignore[override]
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulls += 1
        return self.inner.pull_messages(message_ids)

    def __getattr__(self, name: str):  # anything else Flower's grid offers (close, ...)
        return getattr(self.inner, name)

    # --- the loop ------------------------------------------------------------------------------
    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        waiting = set(self.push_messages(messages))
        return self.receive(waiting, timeout=timeout)

    def receive(self, waiting: set[str], *, timeout: float | None = None) -> list[Message]:
        """Pull replies to ``waiting`` (message ids) until all arrived or ``timeout`` passed."""
        waiting = set(waiting)
        end = None if timeout is None else time.monotonic() + timeout
        interval, replies = self.first_interval, []
        while waiting:
            got = list(self.pull_messages(waiting))
            replies.extend(got)
            waiting.difference_update(m.metadata.reply_to_message_id for m in got)
            if not waiting or (end is not None and time.monotonic() >= end):
                break
            time.sleep(interval if end is None else max(0.0, min(interval, end - time.monotonic())))
            interval = min(interval * 1.5, self.max_interval)
        return replies


def prompt(grid: Grid) -> Grid:
    """Wrap Flower's grid (once); the in-memory simulation grid already pulls every 0.1 s."""
    return grid if isinstance(grid, PromptGrid) else PromptGrid(inner=grid)
