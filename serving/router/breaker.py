"""Per-replica circuit breaker, the retry budget and the refusal budget. Pure state; time
is passed in."""

from __future__ import annotations

from dataclasses import dataclass

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@dataclass
class CircuitBreaker:
    """closed --N failures--> open --cooldown--> half_open --success--> closed
    ^------------------ failure ------------'

    Half-open lets `half_open_share` of the requests that ask through (at least one at a
    time), not a single probe: on a replica whose answers take seconds, one probe at a
    time would refuse nearly everything while it recovers.
    """

    failure_threshold: int = 3
    cooldown: float = 10.0
    half_open_share: float = 0.25
    state: str = CLOSED
    failures: int = 0
    opened_at: float = 0.0
    probing: int = 0  # half-open requests in flight
    credit: float = 0.0  # accrues half_open_share per request that asks

    def _half_open_if_due(self, now: float) -> None:
        if self.state == OPEN and now - self.opened_at >= self.cooldown:
            self.state, self.probing, self.credit = HALF_OPEN, 0, 0.0

    def allows(self, now: float) -> bool:
        self._half_open_if_due(now)
        if self.state == HALF_OPEN:
            self.credit += self.half_open_share
            if self.probing and self.credit < 1.0:
                return False
            self.credit = max(0.0, self.credit - 1.0)
            self.probing += 1
            return True
        return self.state == CLOSED

    def peek(self, now: float) -> bool:
        """Could `allows` say yes? (takes nothing)"""
        if self.state == OPEN:
            return now - self.opened_at >= self.cooldown
        return True

    def abandon(self) -> None:
        """An attempt ended with no verdict (its client left): free its half-open slot."""
        self.probing = max(0, self.probing - 1)

    def success(self) -> None:
        self.state, self.failures, self.probing, self.credit = CLOSED, 0, 0, 0.0

    def failure(self, now: float) -> None:
        self.failures += 1
        if self.state == HALF_OPEN or self.failures >= self.failure_threshold:
            self.state, self.opened_at, self.probing = OPEN, now, 0


@dataclass
class RetryBudget:
    """Retries may add at most `ratio` of recent traffic (plus a floor), so a failing
    fleet is not hit with a retry storm. Counts decay by halving every `window` s."""

    ratio: float = 0.2
    min_retries: float = 10.0
    window: float = 10.0
    requests: float = 0.0
    retries: float = 0.0
    last_decay: float = 0.0

    def _decay(self, now: float) -> None:
        while now - self.last_decay >= self.window:
            self.requests /= 2
            self.retries /= 2
            self.last_decay += self.window
            if self.requests < 1e-3 and self.retries < 1e-3:
                self.last_decay = now

    def record_request(self, now: float) -> None:
        self._decay(now)
        self.requests += 1

    def try_spend(self, now: float) -> bool:
        self._decay(now)
        if self.retries + 1 > self.min_retries + self.ratio * self.requests:
            return False
        self.retries += 1
        return True


class RefusalBudget:
    """A token bucket of 429s: `rate` a second, up to a second's worth at once. Past it,
    the caller paces the refused connection (serving/api/admission.py, serving/front)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = rate
        self.last = 0.0

    def take(self, now: float) -> bool:
        self.tokens = min(self.rate, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False
