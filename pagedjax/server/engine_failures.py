"""Who pays when an engine step raises: the request that caused it, never everyone.

Every request is validated before it reaches the engine, so a step that raises is a bug,
and the engine does not say which request triggered it. Requests that have already
streamed output got through steps before, so the suspects of a failed step are those
scheduled but without output yet (usually just the one that arrived last). One suspect
is failed; several are taken out of the engine (re-admitted later from scratch: none has
output to lose) and let back in by halves, so a request that keeps breaking steps is
isolated in a few failed steps while the others run on. New arrivals wait behind the
suspects meanwhile, so each trial holds only suspects.

A step that fails with no suspect (a request with output broke, or the engine itself did),
or with a device error (the KV pool may be gone with it), is an engine failure: the server
then exits non-zero for a supervisor to restart it, rather than serve errors forever.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import jax

# Device / runtime errors: after one, the device state (the donated KV pool) is suspect.
_DEVICE_ERRORS: tuple[type[BaseException], ...] = (MemoryError, SystemError) + tuple(
    cls for cls in (getattr(jax.errors, "JaxRuntimeError", None),) if cls is not None)


def is_device_error(error: BaseException) -> bool:
    """True for errors that leave the engine's device state unusable."""
    return isinstance(error, _DEVICE_ERRORS)


@dataclass(frozen=True)
class Verdict:
    """What to do after a failed step: exit (`fatal`), fail `guilty`, or re-admit
    `readmit` (taken out of the engine) by halves."""

    fatal: bool = False
    guilty: Optional[Any] = None
    readmit: tuple = ()


class FailureTriage:
    """Suspects of failed steps, held back and re-admitted by halves (engine thread only).
    Items are compared by identity.

    A failure with several suspects makes them the group under test: its first half goes
    on trial; a trial that fails becomes the group, one that passes leaves the rest of the
    group to halve, so the culprit is alone on trial after about log2(suspects) failures.
    """

    def __init__(self):
        self._held: deque = deque()  # waiting for a trial, in order
        self._trial: list = []  # in the engine, under test
        self._group = 0  # the first held items still under suspicion

    @property
    def active(self) -> bool:
        """True while suspects are held or on trial (new arrivals must wait)."""
        return bool(self._held or self._trial)

    @property
    def num_held(self) -> int:
        """Requests waiting for a trial (not in the engine)."""
        return len(self._held)

    def hold(self, item: Any) -> None:
        """Queue a new arrival behind the suspects."""
        self._held.append(item)

    def cleared(self, item: Any) -> None:
        """`item` produced output, finished or left: it is no longer on trial or held."""
        self._trial = [x for x in self._trial if x is not item]
        for i, held in enumerate(self._held):
            if held is item:
                del self._held[i]
                if i < self._group:
                    self._group -= 1
                return

    def verdict(self, error: BaseException, suspects: Sequence[Any]) -> Verdict:
        """Judge a failed step given its suspects (scheduled, no output yet)."""
        if is_device_error(error) or not suspects:
            return Verdict(fatal=True)
        for item in suspects:
            self.cleared(item)
        if len(suspects) == 1:
            self._group = 0  # found: whoever waits is let in at once
            return Verdict(guilty=suspects[0])
        self._held.extendleft(reversed(suspects))
        self._group = len(suspects)
        return Verdict(readmit=tuple(suspects))

    def admit(self) -> list[Any]:
        """The next trial to add to the engine (none while one runs): half of the group
        under suspicion, or everyone held once no group is left."""
        if self._trial or not self._held:
            return []
        if self._group:
            size = max(1, self._group // 2)
            self._group -= size
        else:
            size = len(self._held)
        self._trial = [self._held.popleft() for _ in range(min(size, len(self._held)))]
        return list(self._trial)
