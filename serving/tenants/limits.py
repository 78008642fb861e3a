"""Per-tenant rate limits: requests and tokens per minute, and requests in flight.

rpm and tpm are token buckets that refill continuously (a minute's allowance spread
over the minute), so a tenant cannot spend two minutes' worth across a window edge.
tpm is charged `max_tokens` (or `default_reservation`) when a request is admitted,
and trued up to the real prompt + completion tokens when its usage arrives. In-flight
slots are held until the answer ends, on every path (done, error, disconnect), by
the caller's `release`.

This store is per process: several router replicas (or `server.workers`) each hold
their own buckets, so limits are per replica here. serving/tenants/redis_limits.py
shares them, behind the same two calls (`admit`, then the admission's `release`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from serving.errors import GatewayError
from serving.tenants.store import Principal, Scope
from serving.tenants.usage import UsageLedger


class RateLimited(GatewayError):
    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"


class Bucket:
    """Refills per_minute / 60 each second up to per_minute; below zero is a debt (a
    request's usage came in over its reservation), paid back before the next take."""

    __slots__ = ("at", "level", "limit", "per_minute", "rate")

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self.rate = per_minute / 60
        self.limit = str(per_minute)  # the header value, made once
        self.level = float(per_minute)
        self.at: float | None = None

    def refill(self, now: float) -> float:
        if self.at is not None:
            self.level = min(self.per_minute, self.level + (now - self.at) * self.rate)
        self.at = now
        return self.level

    def take(self, now: float, n: float) -> bool:
        if self.refill(now) < n:
            return False
        self.level -= n
        return True

    def adjust(self, now: float, n: float) -> None:
        """Charge n more (or give -n back)."""
        self.level = min(self.per_minute, self.refill(now) - n)

    def remaining(self, now: float) -> int:
        return max(0, math.floor(self.refill(now)))

    def wait_s(self, now: float, n: float) -> float:
        """Until n can be taken."""
        return max(0.0, (n - self.refill(now)) / self.rate)

    def reset_s(self, now: float) -> float:
        """Until the bucket is full again (OpenAI's x-ratelimit-reset-*)."""
        return (self.per_minute - self.refill(now)) / self.rate


@dataclass
class _State:
    requests: Bucket | None
    tokens: Bucket | None
    in_flight: int = 0


def tokens_used(usage: dict | None) -> int | None:
    """Prompt + completion tokens of an answer's usage; None when it had none."""
    if not usage:
        return None
    used = usage.get("total_tokens")
    if used is None:
        used = (usage.get("prompt_tokens") or 0) + (usage.get("completion_tokens") or 0)
    return used


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
    def __init__(self, default_reservation: int = 256, ledger: UsageLedger | None = None):
        self.default_reservation = default_reservation
        self.ledger = ledger  # budget spend: this host's ledger
        self.states: dict[str, tuple[Scope, _State]] = {}

    def _state(self, scope: Scope) -> _State:
        known = self.states.get(scope.id)
        if known is not None and known[0] is scope:  # the store hands out the same Scope
            return known[1]
        if known is None:
            state = _State(
                Bucket(scope.rpm) if scope.rpm else None, Bucket(scope.tpm) if scope.tpm else None
            )
        else:
            state = known[1]  # the same object: admissions in flight release into it
            if (known[0].rpm, known[0].tpm) != (scope.rpm, scope.tpm):  # new limits
                state.requests = Bucket(scope.rpm) if scope.rpm else None
                state.tokens = Bucket(scope.tpm) if scope.tpm else None
        self.states[scope.id] = (scope, state)
        return state

    async def admit(self, p: Principal, max_tokens: int | None, now: float) -> Admission | None:
        return self.admit_now(p, max_tokens, now)

    async def budget_spent(self, p: Principal, now: float) -> int:
        """Tokens the tenant used this period (0 without a ledger)."""
        return self.ledger.spent(p.tenant, p.budget.period, now) if self.ledger else 0

    def admit_now(self, p: Principal, max_tokens: int | None, now: float) -> Admission | None:
        """Admit, or raise RateLimited (429 with Retry-After and the x-ratelimit-*
        headers) before any upstream work; None when no limit applies."""
        if not p.scopes:
            return None
        need = max_tokens or self.default_reservation
        states = [self._state(scope) for scope in p.scopes]
        for scope, state in zip(p.scopes, states, strict=True):
            requests, tokens = state.requests, state.tokens
            if requests is not None:
                requests.refill(now)
            if tokens is not None:
                tokens.refill(now)
                if need > tokens.per_minute:
                    raise RateLimited(
                        f"max_tokens {need} is more than '{p.tenant}' may use in a minute "
                        f"({tokens.per_minute} tokens).",
                        param="max_tokens",
                        headers=self.headers(states, now),
                    )
            if scope.max_concurrency and state.in_flight >= scope.max_concurrency:
                why, wait = f"{scope.max_concurrency} requests in flight", 1.0
            elif requests is not None and requests.level < 1:
                why = f"{requests.per_minute} requests per minute"
                wait = requests.wait_s(now, 1)
            elif tokens is not None and tokens.level < need:
                why = f"{tokens.per_minute} tokens per minute"
                wait = tokens.wait_s(now, need)
            else:
                continue
            headers = self.headers(states, now) | {"retry-after": str(max(1, math.ceil(wait)))}
            who = "key" if scope.id.startswith("k:") else "tenant"
            raise RateLimited(
                f"Rate limit reached for {who} '{scope.id[2:]}': {why}. "
                f"Retry after {headers['retry-after']}s.",
                headers=headers,
            )
        for state in states:  # every bucket was refilled at `now` above
            if state.requests is not None:
                state.requests.level -= 1
            if state.tokens is not None:
                state.tokens.level -= need
            state.in_flight += 1
        return Admission(self, states, need, self.headers(states, now))

    def release(self, a: Admission, now: float, usage: dict | None) -> None:
        used = tokens_used(usage)
        for state in a.states:
            state.in_flight = max(0, state.in_flight - 1)
            if state.tokens is not None and used is not None:
                state.tokens.adjust(now, used - a.reserved)  # no usage: the reservation stands

    @staticmethod
    def headers(states: list[_State], now: float) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers, from the scope with the least left of each."""
        out: dict[str, str] = {}
        for name in ("requests", "tokens"):
            low: Bucket | None = None
            for state in states:
                b = state.requests if name == "requests" else state.tokens
                if b is not None and (low is None or b.refill(now) < low.level):
                    low = b
            if low is not None:
                out[f"x-ratelimit-limit-{name}"] = low.limit
                out[f"x-ratelimit-remaining-{name}"] = str(max(0, math.floor(low.level)))
                out[f"x-ratelimit-reset-{name}"] = duration((low.per_minute - low.level) / low.rate)
        return out
