"""A stand-in for tqdm that records what a progress bar was told, for the tests of long work's progress.

Importable as ``progress_bars`` from the tests (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

from typing import Any


class RecordingBar:
    """Takes tqdm's place (``monkeypatch.setattr(module, "tqdm", RecordingBar)``); each bar made is in
    :attr:`made`, with its ``total`` and ``events``: ``"step"`` per unit of progress, ``"closed"`` at the end.
    Code under test may append its own events to :attr:`events` to show what ran between steps."""

    made: list[RecordingBar] = []
    events: list[str] = []

    def __init__(self, iterable: Any = None, total: int | None = None, **options: Any):
        self.total = total
        RecordingBar.made.append(self)

    @classmethod
    def reset(cls) -> type[RecordingBar]:
        """This class, with no bars and no events yet; returned for ``monkeypatch.setattr``."""
        cls.made, cls.events = [], []
        return cls

    def __enter__(self) -> RecordingBar:
        return self

    def __exit__(self, *failure: object) -> None:
        RecordingBar.events.append("closed")

    def update(self, steps: int = 1) -> None:
        RecordingBar.events.extend(["step"] * steps)

    def set_postfix_str(self, text: str) -> None:
        pass
