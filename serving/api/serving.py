"""The proxy service behind the hot routes: /v1/chat/completions, /v1/completions,
/v1/responses, and for embedding tiers /v1/embeddings, /v1/rerank and /v1/score.

Checks the body, resolves the tier (or lets the auto policy pick one), plans the
replicas to try, and opens the first that answers (serving/api/failover.py: errors
before the first body byte are retried on another replica or tier, within the retry
budget). After that, a stream can only end with an error event. It knows no web
framework: serving/api/hotpath.py turns its replies into ASGI messages.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from serving.api.access_log import AccessLog, valid_traceparent
from serving.api.failover import Failover
from serving.api.protocol import POOLING, Kind, as_chat, parse_request
from serving.api.stored import home_of, missing
from serving.config import RouterSettings
from serving.errors import (
    GatewayError,
    InsufficientQuota,
    InvalidRequest,
    ModelNotAllowed,
    ModelNotFound,
    NoEngineReady,
    UpstreamStatusError,
)
from serving.metrics import GatewayMetrics
from serving.router import stored
from serving.router.balancer import Limits, Weights
from serving.router.breaker import RetryBudget
from serving.router.planner import Attempt, Placement, plan
from serving.router.policy import Decision, Features, TierView, choose_tier
from serving.router.prefix import ROOT, block_keys
from serving.router.registry import EngineRegistry, Tier
from serving.router.tokens import Count, TokenCounter, prompt_chars
from serving.tenants.auth import OPEN
from serving.tenants.limits import Admission, RateLimited, TenantLimiter
from serving.tenants.redis_limits import RedisAdmission, RedisLimiter
from serving.tenants.store import Principal
from serving.tenants.usage import UsageLedger
from serving.upstream.client import UpstreamClient
from serving.upstream.stream import (
    Relay,
    ResponsesRelay,
    StreamOutcome,
    response_usage,
    usage_of,
)

PATHS: dict[Kind, str] = {
    "chat": "/v1/chat/completions",
    "completion": "/v1/completions",
    "response": "/v1/responses",
    "embedding": "/v1/embeddings",
    "rerank": "/v1/rerank",
    "score": "/v1/score",
}
_TENANT_REFUSALS = (RateLimited, InsufficientQuota, ModelNotAllowed)
_PROMPT_PARAM: dict[Kind, str] = {
    "chat": "messages",
    "completion": "prompt",
    "response": "input",
    "embedding": "input",
    "rerank": "documents",
    "score": "text_2",
}


@dataclass(slots=True)
class Unary:
    status: int
    body: bytes
    headers: dict[str, str]


@dataclass(slots=True)
class Streamed:
    headers: dict[str, str]
    relay: Relay  # .pump(send) streams it, .abort() when the client left, .close() frees it
    finish: Callable[[], None]  # account for the stream; called exactly once


@dataclass(slots=True)
class Call:
    """One request's facts, once checked and routed."""

    kind: Kind
    path: str
    raw: bytes
    payload: dict[str, Any]
    view: dict[str, Any]  # the payload as a chat (a Responses API request's input as messages)
    model: str
    decision: Decision
    started: float
    trace: dict[str, str]  # passed on to the engine: x-request-id, traceparent
    principal: Principal = OPEN
    admission: Admission | RedisAdmission | None = None  # released when the answer ends


def features_of(headers: Mapping[str, str], payload: dict[str, Any], counts: dict) -> Features:
    metadata = payload.get("metadata") if isinstance(payload.get("metadata"), dict) else {}
    response_format = payload.get("response_format")
    return Features(
        prompt_tokens=counts,
        max_tokens=payload.get("max_completion_tokens") or payload.get("max_tokens"),
        has_tools=bool(payload.get("tools") or payload.get("functions")),
        has_response_format=bool(response_format) and response_format != {"type": "text"},
        hint=headers.get("x-tiergate-tier") or metadata.get("tier"),
    )


def char_keys(payload: dict[str, Any], block_chars: int, limit: int) -> list[int]:
    """Block keys of the prompt's text cut in fixed character blocks, for a tier with no
    tokenizer: only its approximate index can match them (events carry token ids)."""
    head = payload.get("messages") or payload.get("prompt") or ""
    text = json.dumps(head, separators=(",", ":"))[: block_chars * limit]
    keys, parent = [], ROOT
    for start in range(0, len(text) - block_chars + 1, block_chars):
        parent = hash((parent, text[start : start + block_chars]))
        keys.append(parent)
    return keys


def _not_allowed(principal: Principal, model: str) -> ModelNotAllowed:
    return ModelNotAllowed(
        f"Tenant '{principal.tenant}' may not use the model '{model}'.", param="model"
    )


class ProxyService:
    def __init__(
        self,
        registry: EngineRegistry,
        upstream: UpstreamClient,
        metrics: GatewayMetrics,
        router: RouterSettings,
        tokens: TokenCounter | None = None,
        clock: Callable[[], float] = time.monotonic,
        access: AccessLog | None = None,
        ledger: UsageLedger | None = None,
        limiter: TenantLimiter | RedisLimiter | None = None,
    ) -> None:
        self.access = access or AccessLog(enabled=False)
        self.ledger = ledger
        self.limiter = limiter or TenantLimiter(ledger=ledger)
        self.registry = registry
        self.upstream = upstream
        self.metrics = metrics
        self.router = router
        self.tokens = tokens
        self.clock = clock
        self.limits = Limits(
            router.spill.max_waiting, router.spill.max_kv_usage, router.spill.max_in_flight
        )
        self.failover = Failover(
            upstream,
            metrics,
            RetryBudget(router.retry.budget_ratio, router.retry.min_retries),
            clock,
        )
        self.turns = itertools.count()  # rotates ties between equally loaded replicas
        prefix = router.prefix
        self.weights = Weights(prefix.load_tokens, prefix.max_credit_tokens, prefix.session_tokens)
        self.waiting_ready = 0  # requests held by router.wait_ready_s now
        # what `auto` chooses among for a chat: embedding tiers answer no chat
        self.views = [
            TierView(t.name, t.max_context, t.max_output_tokens)
            for t in registry.tiers
            if t.task == "generate"
        ]

    async def handle(
        self,
        kind: Kind,
        raw: bytes,
        headers: Mapping[str, str],
        principal: Principal = OPEN,
    ) -> Unary | Streamed:
        """Answer one request; raises GatewayError for anything refused before a byte went.
        `principal`: who asks; a tenant limited to some tiers gets 403 for the others,
        and `auto` picks only among its own."""
        started = time.perf_counter()
        path = PATHS[kind]
        model = "unknown"
        rid = headers.get("x-request-id", "")
        trace = {"x-request-id": rid} if rid else {}
        if parent := valid_traceparent(headers.get("traceparent")):
            trace["traceparent"] = parent
        stream = False
        try:
            checked, payload = parse_request(kind, raw)
            home = None  # the replica that stores the previous response, if any
            if kind == "response" and isinstance(payload.get("previous_response_id"), str):
                previous = payload["previous_response_id"]
                home, own = stored.split_id(previous)
                if home is not None:  # the engine gets its own id back
                    payload = {**payload, "previous_response_id": own}
                    raw = json.dumps(payload).encode()
            # what the router reads; the payload goes on as it came
            view = as_chat(payload) if kind == "response" else payload
            tier = self.registry.tier_for_model(checked.model)
            model = checked.model  # a label only once known: clients cannot add series
            counts: dict[str, int] | None = None
            measured: dict[str, Count] | None = None
            if kind in POOLING:
                view = {"prompt": payload.get("input") or payload.get("query")}  # to log
                tier, decision = self._embedding_tier(tier, checked.model, principal)
            elif tier is not None and tier.task != "generate":
                raise InvalidRequest(
                    f"The model '{checked.model}' serves embeddings only (/v1/embeddings, "
                    "/v1/rerank, /v1/score).",
                    param="model",
                    code="model_not_supported",
                )
            elif tier is None:
                measured = await self._count(view, self._prefix_below())
                counts = {t: c.tokens for t, c in measured.items()}
                estimated = any(c.estimated for c in measured.values())
                features = features_of(headers, view, counts)
                views = self.views
                if principal.tiers is not None:
                    if features.hint is not None and not principal.may_use(features.hint):
                        raise _not_allowed(principal, features.hint)
                    views = [v for v in views if principal.may_use(v.name)]
                    if not views:
                        raise _not_allowed(principal, self.registry.auto_model)
                decision = choose_tier(features, views, self.router.rules)
                if estimated:  # a huge prompt: its tail's tokens were estimated
                    decision = Decision(decision.tier, decision.reason + "~estimated")
            else:
                if not principal.may_use(tier.name):
                    raise _not_allowed(principal, checked.model)
                decision = Decision(tier.name, "explicit")
            tier = self.registry.tier(decision.tier)
            placement = None
            if kind not in POOLING:  # an encoder: no output, no cache to reuse
                await self._check_limits(tier, view, counts, kind)
                if not home:
                    placement = await self._placement(tier, headers, view, measured)
            self.metrics.decision(tier.name, decision.reason)
            if principal.budget is not None and principal.budget.hard:  # soft: serve on
                await self._check_budget(principal)
            max_out = view.get("max_completion_tokens") or view.get("max_tokens")
            admission = None
            if principal.scopes or principal.budget:  # others pay nothing here
                admission = await self.limiter.admit(principal, max_out, self.clock())
            try:
                attempts = [self._home(tier, home)] if home else await self._plan(tier, placement)
                charged = self._placed(attempts[0], placement) if placement is not None else 0
                self.failover.budget.record_request(self.clock())
                stream = bool(checked.stream)
                call = Call(
                    kind,
                    path,
                    raw,
                    payload,
                    view,
                    model,
                    decision,
                    started,
                    trace,
                    principal,
                    admission,
                )
                try:
                    if stream:  # returns once the first chunk is back
                        return await self._stream(attempts, call)
                    return await self._unary(attempts, call)
                except UpstreamStatusError as exc:
                    if home and exc.status == 404:  # its engine restarted: say so
                        raise missing(previous, home, "previous_response_id") from None
                    raise
                finally:  # its prefill is done (or will never be): no longer queued there
                    attempts[0].endpoint.prefill_queued -= charged
            except BaseException:  # nothing reached the client: the slot and tokens go back
                if admission is not None:
                    admission.release(self.clock(), {"total_tokens": 0})
                raise
        except GatewayError as exc:
            self.metrics.request_done(model, path, exc.status)
            if isinstance(exc, _TENANT_REFUSALS):
                self.metrics.tenant_refused.labels(principal.tenant, exc.code).inc()
            self.access.write(
                request_id=rid,
                path=path,
                model=model,
                status=exc.status,
                stream=stream,
                error=exc.code or exc.type,
                duration_ms=round((time.perf_counter() - started) * 1000, 2),
                tenant=principal.tenant,
                key=principal.key,
            )
            raise

    def _embedding_tier(
        self, tier: Tier | None, model: str, principal: Principal
    ) -> tuple[Tier, Decision]:
        """The tier for /v1/embeddings, /v1/rerank and /v1/score: the model's, or for
        `auto` the first embedding tier the caller may use."""
        if tier is None:  # the auto model (any other unknown name was refused already)
            embedders = [t for t in self.registry.tiers if t.task == "embed"]
            if not embedders:
                raise ModelNotFound("No model here serves embeddings.", param="model")
            tier = next((t for t in embedders if principal.may_use(t.name)), None)
            if tier is None:
                raise _not_allowed(principal, model)
            return tier, Decision(tier.name, "embedding")
        if tier.task != "embed":
            served = ", ".join(t.model for t in self.registry.tiers if t.task == "embed")
            raise InvalidRequest(
                f"The model '{model}' does not serve embeddings"
                + (f"; these do: {served}." if served else "; no model here does."),
                param="model",
                code="model_not_supported",
            )
        if not principal.may_use(tier.name):
            raise _not_allowed(principal, model)
        return tier, Decision(tier.name, "explicit")

    def _home(self, tier: Tier, replica: str) -> Attempt:
        """The one replica that can continue a stored response: no other has it."""
        ep = home_of(self.registry, replica, "the previous response", "previous_response_id")
        if ep not in tier.endpoints:  # another tier over the same engine: count it there
            tier = next((t for t in self.registry.tiers if ep in t.endpoints), tier)
        return Attempt(tier, ep, "stored")

    async def _check_budget(self, principal: Principal) -> None:
        budget = principal.budget
        spent = await self.limiter.budget_spent(principal, time.time())  # Redis: all replicas'
        if spent >= budget.tokens:
            raise InsufficientQuota(
                f"Tenant '{principal.tenant}' has used its {budget.tokens:,}-token budget "
                f"for this {budget.period} ({spent:,} tokens). It renews at the start of "
                f"the next {budget.period} (UTC)."
            )

    def _plan_now(self, tier: Tier, placement: Placement | None) -> list[Attempt]:
        return plan(
            tier,
            self.registry.tiers,
            self.router.order,
            self.limits,
            self.clock(),
            placement,
            self.router.retry.max_attempts,
            self.router.spill.retry_after_s,
            turn=next(self.turns),
            weights=self.weights,
        )

    async def _plan(self, tier: Tier, placement: Placement | None) -> list[Attempt]:
        """The attempts for this request; with router.wait_ready_s, wait that long for a
        replica to become ready rather than answer 503 at once (a full tier is still 429),
        at most router.wait_ready_max requests at a time, and only while one of its
        replicas is expected back (one never seen up is not waited for)."""
        try:
            return self._plan_now(tier, placement)
        except NoEngineReady:
            if (
                not self.router.wait_ready_s
                or self.waiting_ready >= self.router.wait_ready_max
                or not tier.coming_back()
            ):
                raise
        deadline = self.clock() + self.router.wait_ready_s
        self.waiting_ready += 1
        try:
            while True:
                await asyncio.sleep(min(0.1, max(0.0, deadline - self.clock())))
                try:
                    return self._plan_now(tier, placement)
                except NoEngineReady:
                    if self.clock() >= deadline:
                        raise
        finally:
            self.waiting_ready -= 1

    def _prefix_below(self) -> int:
        """Prompts under this many tokens have no full block to match: no ids needed."""
        if not self.router.affinity:
            return 0
        return min((t.block_size for t in self.registry.tiers if len(t.endpoints) > 1), default=0)

    async def _placement(
        self,
        tier: Tier,
        headers: Mapping[str, str],
        view: dict[str, Any],
        measured: dict[str, Count] | None,
    ) -> Placement | None:
        """The prompt's block keys and the session, where there is a replica to choose."""
        if not self.router.affinity or (len(tier.endpoints) < 2 and not self.router.order):
            return None
        session = headers.get("x-session-id") or view.get("user")
        session = str(session) if session else None
        limit = self.router.prefix.max_prompt_tokens // tier.block_size
        tokens = self.tokens
        if tokens is None or tier.name not in tokens.paths:
            short = prompt_chars(view) < 4 * tier.block_size  # no full block: nothing to key
            keys = [] if short else char_keys(view, 4 * tier.block_size, limit)
            return Placement({tier.name: keys}, session) if keys or session else None
        count = measured.get(tier.name) if measured else None
        if count is None and not tokens.below(tier.name, view, tier.block_size):
            try:
                count = (await self._count(view, tier.block_size, tier.name))[tier.name]
            except InvalidRequest:  # the template refused it: the engine will say so
                count = None
        if count is None or not count.ids:
            return Placement({}, session) if session else None
        keys = block_keys(count.ids, tier.block_size, limit)
        if count.estimated and keys:  # the tokenized head may end mid-token
            keys.pop()
        return Placement({tier.name: keys}, session)

    def _placed(self, attempt: Attempt, placement: Placement) -> int:
        """The router's own record of where a prompt goes (its approximate index, the
        pending blocks until the engine's events confirm them, the session), and the
        prompt tokens in full blocks it is to compute there: charged to that replica's
        queue until its first token is back (balancer.py's queued)."""
        tier, ep = attempt.tier, attempt.endpoint
        keys = placement.keys.get(tier.name)
        charged = 0
        if keys:
            now = self.clock()
            matched = ep.prefix.match(keys, now)
            size = tier.block_size
            self.metrics.prefix_lookup(tier.name, len(keys) * size, matched * size)
            ep.prefix.sent(keys, now)
            charged = (len(keys) - matched) * size
            ep.prefill_queued += charged
        if placement.session:
            tier.remember(placement.session, ep.name)
        return charged

    async def _count(
        self, payload: dict[str, Any], below: int = 0, tier: str | None = None
    ) -> dict[str, Count]:
        """Prompt tokens per tier (or for one `tier`); long prompts off the loop. Counts
        under `below` tokens are upper bounds (serving/router/tokens.py)."""
        if self.tokens is None:
            raise InvalidRequest(
                "Routing by prompt length needs a tokenizer for every tier; set "
                "tiers[].tokenizer for tiers whose engines are external.",
                param="model",
            )
        if tier is None:
            below = min(self._decisive(payload), below) if below else self._decisive(payload)
            work, args = self.tokens.measure_all, (payload, below)
        else:
            work, args = (lambda p, b: {tier: self.tokens.measure(tier, p, b)}), (payload, below)
        try:
            if self.tokens.is_cheap(payload):
                return work(*args)
            return await asyncio.to_thread(work, *args)
        except Exception as exc:  # the chat template refused these messages
            raise InvalidRequest(
                f"Could not apply the model's chat template to 'messages': {exc}",
                param="messages",
            ) from exc

    def _decisive(self, payload: dict[str, Any]) -> int:
        """The smallest prompt size any routing rule or tier limit compares with: counts
        below it change no decision, so an upper bound will do (serving/router/tokens.py)."""
        max_out = payload.get("max_completion_tokens") or payload.get("max_tokens") or 1
        limits = [
            t.max_context - max_out
            for t in self.registry.tiers
            if t.max_context and t.task == "generate"
        ]
        if self.router.rules.long_prompt_tier:
            limits.append(self.router.rules.long_prompt_tokens)
        return max(0, min(limits, default=1 << 30))

    async def _check_limits(
        self, tier: Tier, payload: dict[str, Any], counts: dict[str, int] | None, kind: Kind
    ) -> None:
        """A tier's own limits, where they are tighter than what its engines enforce.
        `payload` is the chat view; the errors name the fields the client sent."""
        max_out = payload.get("max_completion_tokens") or payload.get("max_tokens")
        if tier.max_output_tokens and max_out and max_out > tier.max_output_tokens:
            if kind == "response":
                out_param = "max_output_tokens"
            elif payload.get("max_completion_tokens"):
                out_param = "max_completion_tokens"
            else:
                out_param = "max_tokens"
            raise InvalidRequest(
                f"{out_param} is {max_out}, but tier '{tier.name}' allows at most "
                f"{tier.max_output_tokens} output tokens.",
                param=out_param,
            )
        engine_limit = min((ep.max_model_len or 0 for ep in tier.endpoints), default=0)
        if not tier.max_context or (engine_limit and engine_limit <= tier.max_context):
            return  # the engine checks it, and says so in the same words
        if counts is None:
            counts = {t: c.tokens for t, c in (await self._count(payload)).items()}
        prompt = counts[tier.name]
        if prompt + (max_out or 0) > tier.max_context:
            raise InvalidRequest(
                f"This model's maximum context length is {tier.max_context} tokens. However, "
                f"you requested {prompt + (max_out or 0)} tokens ({prompt} in the messages, "
                f"{max_out or 0} in the completion).",
                param=_PROMPT_PARAM[kind],
                code="context_length_exceeded",
            )

    @staticmethod
    def _body(attempt: Attempt, payload: dict[str, Any], raw: bytes, usage: bool) -> bytes:
        """The client's bytes when nothing changes; else the payload re-encoded with the
        engine's model name and, for streams, usage asked for (metrics need it)."""
        same_model = payload.get("model") == attempt.endpoint.model
        if same_model and not usage:
            return raw
        if same_model and "stream_options" not in payload and raw[:1] == b"{":
            # The common stream: splice the option in rather than re-encode the prompt.
            return b'{"stream_options":{"include_usage":true},' + raw[1:].lstrip()
        body = {**payload, "model": attempt.endpoint.model}
        if usage:
            body["stream_options"] = {
                **(payload.get("stream_options") or {}),
                "include_usage": True,
            }
        return json.dumps(body).encode()

    @staticmethod
    def _reason(attempt: Attempt, decision: Decision) -> str:
        """The tier's reason, then the replica's: prefix, session or load (or spill,
        fallback, panic when the tier's own replicas could not take it)."""
        return f"{decision.reason}+{attempt.why}"

    def _headers(self, attempt: Attempt, call: Call) -> dict[str, str]:
        headers = {
            "x-tiergate-tier": attempt.tier.name,
            "x-tiergate-reason": self._reason(attempt, call.decision),
            "x-tiergate-replica": attempt.endpoint.name,
        }
        if rid := call.trace.get("x-request-id"):
            headers["x-request-id"] = rid
        if call.admission is not None:
            headers.update(call.admission.headers)
        return headers

    async def _unary(self, attempts: list[Attempt], call: Call) -> Unary:
        attempt, response, body, retries = await self.failover.first_answer(
            attempts,
            call.path,
            lambda a: self._body(a, call.payload, call.raw, usage=False),
            read_first=False,
            chosen=call.decision.tier,
            trace=call.trace,
        )
        self.failover.leave(attempt.endpoint)
        response.release()
        if call.kind == "response":
            usage, body = response_usage(body), stored.retag(body, attempt.endpoint.name)
        else:
            usage = usage_of(body)
        self._record(attempt, call, response.status, usage, retries)
        return Unary(response.status, body, self._headers(attempt, call))

    async def _stream(self, attempts: list[Attempt], call: Call) -> Streamed:
        options = call.payload.get("stream_options") or {}
        # asked for anyway, hidden below (a Responses stream always ends with its usage)
        drop_usage = call.kind != "response" and not options.get("include_usage")
        attempt, response, first, retries = await self.failover.first_answer(
            attempts,
            call.path,
            lambda a: self._body(a, call.payload, call.raw, usage=drop_usage),
            read_first=True,
            chosen=call.decision.tier,
            trace=call.trace,
        )
        outcome = StreamOutcome(started=call.started, first_byte=time.perf_counter())
        if call.kind == "response":
            relay = ResponsesRelay(
                response, outcome, drop_usage, first, replica=attempt.endpoint.name
            )
        else:
            relay = Relay(response, outcome, drop_usage, first)
        finished = False

        def finish() -> None:
            nonlocal finished
            if finished:
                return
            finished = True
            self.failover.leave(attempt.endpoint)
            self._record(attempt, call, 200, outcome.usage, retries, outcome)
            if outcome.error:
                self.metrics.stream_errors.labels(call.model, outcome.error).inc()
            if outcome.disconnected:
                self.metrics.client_disconnects.labels(call.model).inc()

        return Streamed(self._headers(attempt, call), relay, finish)

    def _record(
        self,
        attempt: Attempt,
        call: Call,
        status: int,
        usage: dict | None,
        retries: int,
        outcome: StreamOutcome | None = None,
    ) -> None:
        tier, model = attempt.tier, call.model
        m = self.metrics
        m.request_done(model, call.path, status)
        m.tier_done(tier.name, attempt.endpoint.name, status)
        duration = time.perf_counter() - call.started
        ttft = outcome.first_byte - call.started if outcome and outcome.first_byte else None
        m.latency(model, ttft, duration)
        if usage:
            m.record_usage(model, usage)
            m.cost_of(tier.name, tier.cost(usage))
        if call.admission is not None:  # every way an answer ends comes through here once
            call.admission.release(self.clock(), usage)
        if self.ledger is not None and status < 400:
            who = call.principal
            cost = tier.cost(usage)
            self.ledger.add(who.tenant, who.key, tier.name, usage, cost)
            m.tenant_usage(who.tenant, who.key, tier.name, usage, cost)
        if self.access.enabled:
            usage = usage or {}
            error = outcome and ("client_disconnected" if outcome.disconnected else outcome.error)
            self.access.write(
                request_id=call.trace.get("x-request-id"),
                path=call.path,
                model=model,
                tier=tier.name,
                replica=attempt.endpoint.name,
                reason=self._reason(attempt, call.decision),
                status=status,
                stream=outcome is not None,
                prompt_tokens=usage.get("prompt_tokens"),
                completion_tokens=usage.get("completion_tokens"),
                ttft_ms=round(ttft * 1000, 2) if ttft is not None else None,
                duration_ms=round(duration * 1000, 2),
                retries=retries,
                error=error or None,
                tenant=call.principal.tenant,
                key=call.principal.key,
                cost_usd=round(tier.cost(usage), 8),
                prompt=self.access.sampled_prompt(call.view),
            )
