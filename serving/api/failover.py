"""Failover before the first byte: each planned replica in turn until one answers.

Until the first body byte has been received nothing has reached the client, so a
replica that cannot be reached, times out or answers 5xx is marked on its breaker and
the next attempt is tried, as long as the retry budget allows. The budget guards engines
against retry storms, so only a retry after an attempt that reached an engine spends it:
one after a refused connection, or after a replica its breaker skipped, does not (a
ready replica must not refuse for want of budget that others spent). A 4xx is the request's
fault, not the replica's: it goes back to the client at once. A whole answer that the
engine aborted (it was stopping: `finish_reason: "abort"`) has not reached the client
either, so it is retried the same way. The in-flight count of
the replica that answered stays taken until the caller's reply is done (`leave`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from serving.errors import GatewayError, NoEngineReady, UpstreamError, UpstreamStatusError
from serving.metrics import GatewayMetrics
from serving.router.breaker import RetryBudget
from serving.router.planner import Attempt
from serving.router.registry import Endpoint
from serving.upstream.client import UpstreamClient
from serving.upstream.stream import ABORTED, engine_aborted, prime
from serving.upstream.wire import Response

_BREAKER_GAUGE = {"closed": 0, "half_open": 1, "open": 2}


class Failover:
    def __init__(
        self,
        upstream: UpstreamClient,
        metrics: GatewayMetrics,
        budget: RetryBudget,
        clock: Callable[[], float],
    ) -> None:
        self.upstream = upstream
        self.metrics = metrics
        self.budget = budget
        self.clock = clock

    async def first_answer(
        self,
        attempts: list[Attempt],
        path: str,
        body_for: Callable[[Attempt], bytes],
        read_first: bool,
        chosen: str,
        trace: Mapping[str, str],
    ) -> tuple[Attempt, Response, bytes, int]:
        """Try each attempt until one answers; returns it, its response, its first bytes
        (the whole body when not streaming) and the retries it took. The endpoint stays
        entered on success."""
        last: GatewayError | None = None
        reached = False  # the last failed attempt reached its engine
        retries = 0
        for attempt in attempts:
            ep, now = attempt.endpoint, self.clock()
            if attempt.why != "panic" and not ep.breaker.allows(now):
                continue
            if last is not None:
                if reached and not self.budget.try_spend(now):
                    self.metrics.retry_budget_exhausted.inc()
                    ep.breaker.abandon()
                    break
                reason = last.code or "unknown"
                self.metrics.retries.labels(attempt.tier.name, ep.name, reason).inc()
                retries += 1
            self.enter(ep)
            entered = True
            try:
                response = await self.upstream.open(ep.url or "", path, body_for(attempt), trace)
                try:
                    first = await (prime(response) if read_first else response.read())
                    if not read_first and ABORTED in first:  # cut short by a stopping engine
                        raise engine_aborted()
                except BaseException:  # failed or cancelled: never leave it half-read
                    response.close()
                    raise
                entered = False
            except UpstreamStatusError as exc:
                if exc.status < 500:
                    ep.breaker.success()  # the engine is fine; the request is not
                    raise
                last, reached = self._failed(attempt, exc, now), True
                continue
            except (NoEngineReady, UpstreamError) as exc:
                last = self._failed(attempt, exc, now)
                reached = not isinstance(exc, NoEngineReady)
                continue
            finally:
                if entered:  # any way out but success, cancellation included
                    self.leave(ep)
                    ep.breaker.abandon()  # a cancelled half-open probe must not wedge it
            # success: the endpoint stays entered until the caller's reply is done
            ep.breaker.success()
            self.metrics.breaker(ep.name, 0)
            if attempt.why in ("spill", "fallback"):
                counter = self.metrics.spills if attempt.why == "spill" else self.metrics.fallbacks
                counter.labels(chosen, attempt.tier.name).inc()
            return attempt, response, first, retries
        raise last or NoEngineReady("No replica could take the request; retry shortly.")

    def _failed(self, attempt: Attempt, exc: GatewayError, now: float) -> GatewayError:
        ep = attempt.endpoint
        ep.breaker.failure(now)
        self.metrics.breaker(ep.name, _BREAKER_GAUGE[ep.breaker.state])
        self.metrics.upstream_failures.labels(attempt.tier.name, ep.name, exc.code or "").inc()
        return exc

    def enter(self, endpoint: Endpoint) -> None:
        endpoint.in_flight += 1
        self.metrics.in_flight_add(endpoint.name, 1)

    def leave(self, endpoint: Endpoint) -> None:
        endpoint.in_flight -= 1
        self.metrics.in_flight_add(endpoint.name, -1)
