"""Per-replica circuit breaker and the retry budget. Pure state; time is passed in."""

from __future__ import annotations

from dataclasses import dataclass

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@dataclass
class CircuitBreaker:
    """closed --N failures--> open --cooldown--> half_open --success--> closed
    ^------------------ failure ------------'"""

    failure_threshold: int = 3
    cooldown: float = 10.0
    state: str = CLOSED
    failures: int = 0
    opened_at: float = 0.0
    probing: bool = False

    def allows(self, now: float) -> bool:
        if self.state == OPEN and now - self.opened_at >= self.cooldown:
            self.state, self.probing = HALF_OPEN, False
        if self.state == HALF_OPEN:
            if self.probing:
                return False  # one probe at a time
            self.probing = True
            return True
        return self.state == CLOSED

    def peek(self, now: float) -> bool:
        """Would `allows` say yes? (does not take the half-open probe slot)"""
        if self.state == OPEN:
            return now - self.opened_at >= self.cooldown
        return not (self.state == HALF_OPEN and self.probing)

    def abandon(self) -> None:
        """An attempt ended with no verdict (its client left): free the probe slot."""
        self.probing = False

    def success(self) -> None:
        self.state, self.failures, self.probing = CLOSED, 0, False

    def failure(self, now: float) -> None:
        self.failures += 1
        if self.state == HALF_OPEN or self.failures >= self.failure_threshold:
            self.state, self.opened_at, self.probing = OPEN, now, False


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
