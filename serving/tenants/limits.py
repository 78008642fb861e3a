"""Per-tenant rate limits: requests and tokens per minute, and requests in flight.

rpm and tpm are token buckets that refill continuously (a minute's allowance spread
over the minute), so a tenant cannot spend two minutes' worth across a window edge.
tpm is charged `max_tokens` (or `default_reservation`) when a request is admitted,
and trued up to the real prompt + completion tokens when its usage arrives. In-flight
slots are held until the answer ends, on every path (done, error, disconnect), by
the caller's `release`.

This store is per process: several router replicas (or `server.workers`) each hold
their own buckets, so limits are per replica here. A shared store plugs in behind the
same two calls (`admit`, `release`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from serving.errors import GatewayError
from serving.tenants.store import Principal, Scope


class RateLimited(GatewayError):
    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"


@dataclass
class Bucket:
    per_minute: int
    level: float = -1.0  # -1: full, set on first use
    at: float = 0.0

    def _refill(self, now: float) -> None:
        if self.level < 0:
            self.level, self.at = float(self.per_minute), now
        self.level = min(self.per_minute, self.level + (now - self.at) * self.per_minute / 60)
        self.at = now

    def take(self, now: float, n: float) -> bool:
        self._refill(now)
        if self.level < n:
            return False
        self.level -= n
        return True

    def adjust(self, now: float, n: float) -> None:
        """Charge n more (or give -n back); may go below zero: the debt is paid first."""
        self._refill(now)
        self.level = min(self.per_minute, self.level - n)

    def remaining(self, now: float) -> int:
        self._refill(now)
        return max(0, math.floor(self.level))

    def wait_s(self, now: float, n: float) -> float:
        """Until n can be taken."""
        self._refill(now)
        return max(0.0, (n - self.level) * 60 / self.per_minute)

    def reset_s(self, now: float) -> float:
        """Until the bucket is full again (OpenAI's x-ratelimit-reset-*)."""
        self._refill(now)
        return (self.per_minute - self.level) * 60 / self.per_minute


@dataclass
class _State:
    requests: Bucket | None
    tokens: Bucket | None
    in_flight: int = 0


def duration(seconds: float) -> str:
    """OpenAI's reset format: 1s, 6m0s, 250ms."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    m, s = divmod(math.ceil(seconds), 60)
    return f"{m}m{s}s" if m else f"{s}s"


@dataclass
class Admission:
    """One admitted request: `release(now, usage)` exactly once when its answer ends."""

    limiter: TenantLimiter
    states: list[_State]
    reserved: int
    headers: dict[str, str]
    released: bool = field(default=False)

    def release(self, now: float, usage: dict | None = None) -> None:
        if not self.released:
            self.released = True
            self.limiter.release(self, now, usage)


class TenantLimiter:
    def __init__(self, default_reservation: int = 256) -> None:
        self.default_reservation = default_reservation
        self.states: dict[str, tuple[Scope, _State]] = {}

    def _state(self, scope: Scope) -> _State:
        known = self.states.get(scope.id)
        if known is None or (known[0].rpm, known[0].tpm) != (scope.rpm, scope.tpm):
            # new, or the operator changed the limits: start over with the new ones
            state = _State(
                Bucket(scope.rpm) if scope.rpm else None, Bucket(scope.tpm) if scope.tpm else None
            )
            if known is not None:
                state.in_flight = known[1].in_flight
            self.states[scope.id] = (scope, state)
            return state
        self.states[scope.id] = (scope, known[1])  # max_concurrency may have changed
        return known[1]

    async def admit(self, p: Principal, max_tokens: int | None, now: float) -> Admission | None:
        return self.admit_now(p, max_tokens, now)

    def admit_now(self, p: Principal, max_tokens: int | None, now: float) -> Admission | None:
        """Admit, or raise RateLimited (429 with Retry-After and the x-ratelimit-*
        headers) before any upstream work; None when no limit applies."""
        if not p.scopes:
            return None
        need = max_tokens or self.default_reservation
        pairs = [(scope, self._state(scope)) for scope in p.scopes]
        for scope, state in pairs:
            why, wait = None, 0.0
            if state.tokens is not None and need > state.tokens.per_minute:
                raise RateLimited(
                    f"max_tokens {need} is more than '{p.tenant}' may use in a minute "
                    f"({state.tokens.per_minute} tokens).",
                    param="max_tokens",
                    headers=self.headers(pairs, now),
                )
            if scope.max_concurrency and state.in_flight >= scope.max_concurrency:
                why, wait = f"{scope.max_concurrency} requests in flight", 1.0
            elif state.requests is not None and state.requests.remaining(now) < 1:
                why = f"{state.requests.per_minute} requests per minute"
                wait = state.requests.wait_s(now, 1)
            elif state.tokens is not None and state.tokens.remaining(now) < need:
                why = f"{state.tokens.per_minute} tokens per minute"
                wait = state.tokens.wait_s(now, need)
            if why:
                headers = self.headers(pairs, now) | {"retry-after": str(max(1, math.ceil(wait)))}
                who = "key" if scope.id.startswith("k:") else "tenant"
                raise RateLimited(
                    f"Rate limit reached for {who} '{scope.id[2:]}': {why}. "
                    f"Retry after {headers['retry-after']}s.",
                    headers=headers,
                )
        for _, state in pairs:
            if state.requests is not None:
                state.requests.take(now, 1)
            if state.tokens is not None:
                state.tokens.take(now, need)
            state.in_flight += 1
        states = [state for _, state in pairs]
        return Admission(self, states, need, self.headers(pairs, now))

    def release(self, a: Admission, now: float, usage: dict | None) -> None:
        used = None
        if usage:
            used = usage.get("total_tokens")
            if used is None:
                used = (usage.get("prompt_tokens") or 0) + (usage.get("completion_tokens") or 0)
        for state in a.states:
            state.in_flight = max(0, state.in_flight - 1)
            if state.tokens is not None and used is not None:
                state.tokens.adjust(now, used - a.reserved)  # no usage: the reservation stands

    @staticmethod
    def headers(pairs: list[tuple[Scope, _State]], now: float) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers, from the scope with the least left of each."""
        out: dict[str, str] = {}
        for name in ("requests", "tokens"):
            buckets = [getattr(st, name) for _, st in pairs if getattr(st, name) is not None]
            if buckets:
                b = min(buckets, key=lambda b: b.remaining(now))
                out[f"x-ratelimit-limit-{name}"] = str(b.per_minute)
                out[f"x-ratelimit-remaining-{name}"] = str(b.remaining(now))
                out[f"x-ratelimit-reset-{name}"] = duration(b.reset_s(now))
        return out
