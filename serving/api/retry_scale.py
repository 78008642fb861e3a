"""How far a 429's retry-after is scaled in a sustained overload (server.retry_after_max_scale).

Pure and stdlib-only: the gateway's hot path and the front process (serving/front) each
keep one, over the refusals they answer themselves.
"""

from __future__ import annotations

import time


def retry_after_scales(max_scale: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to `max_scale` (and it): the retry-after multiples prebuilt."""
    scales = [1]
    while scales[-1] * 2 < max_scale:
        scales.append(scales[-1] * 2)
    return (*scales, max_scale) if max_scale > 1 else (1,)


def scale_for(clients_per_slot: float, scales: tuple[int, ...]) -> int:
    """The index of the largest scale at or under the clients waiting per slot: never
    more wait than that ratio asks for, so refusals settle near one per slot and wait."""
    at = 0
    for i, scale in enumerate(scales):
        if scale <= clients_per_slot:
            at = i
    return at


class RetryScale:
    """Which of `scales` the refusals use now (`at`, an index), from their own rate.

    Clients waiting ~ refusals a second x the mean retry-after they were given (Little's
    law); past `max_in_flight` slots, the retry-after grows with the clients per slot, so
    that a sustained overload's refusals stay near `max_in_flight` per retry-after instead
    of one per waiting client (benchmarks/RESULTS.md, "Overload"). Looked at once a second
    at most; one step a second, as clients told the old wait still come back at it; after
    10 s without a refusal, nobody is, and the scale follows at once.
    """

    QUIET_S = 10.0

    def __init__(self, scales: tuple[int, ...], retry_after_s: float, max_in_flight: int) -> None:
        self.scales = scales
        self.retry_after_s = retry_after_s
        self.max_in_flight = max_in_flight
        self.at = 0
        self.window = (time.monotonic(), 0)  # (since, refusals since)

    def refused(self, now: float) -> bool:
        """Count one refusal at `now` (time.monotonic); True when the scale changed."""
        since, refused = self.window
        if now - since < 1.0:
            self.window = (since, refused + 1)
            return False
        self.window = (now, 1)
        return self._step(refused / (now - since), quiet=now - since > self.QUIET_S)

    def _step(self, refusals_s: float, quiet: bool) -> bool:
        if not self.max_in_flight:  # loop-lag refusals alone: no slots to share out
            return False
        waiting = refusals_s * self.retry_after_s * self.scales[self.at]
        target = scale_for(waiting / self.max_in_flight, self.scales)
        at = target if quiet else self.at + max(-1, min(1, target - self.at))
        changed, self.at = at != self.at, at
        return changed
