"""The tenant limits in Redis, for several router replicas (or `server.workers`): the
same buckets and in-flight counts as serving/tenants/limits.py, each check-and-take
one Lua script, so two gateways cannot both take the last request of a minute; and
each tenant's budget spend for the day or month, added up by every replica.

Per scope, one hash: rl/rt (requests level and when), tl/tt (tokens), and per gateway
process `f:<id>` (its requests in flight) with `h:<id>` (when it last said it is alive).
The clock is the gateway's (`time.time()`; replicas' clocks agree to NTP's
milliseconds, far below a bucket's refill step). A process that holds requests in
flight renews `h:<id>` in their hashes every third of `tenancy.redis_lease`; the admit
script counts only the processes heard from within the lease and deletes the others'
fields. So the requests of a gateway that died (killed, OOM, node lost) stop counting
one lease after its last word, instead of holding the tenant's slots for as long as the
tenant keeps sending. Hashes expire after two idle minutes (every bucket is full again
by then), and never while a live process holds a request in them. With Redis
unreachable, limits and budgets fail open (served, not counted; logged).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

from redis.exceptions import RedisError

from serving.tasks import cancel_and_wait
from serving.tenants.limits import RateLimited, duration, tokens_used
from serving.tenants.store import Principal
from serving.tenants.usage import period_start

log = logging.getLogger("tiergate.limits")

# The requests in flight in one hash, over the processes heard from since `alive`;
# the fields of the others are deleted.
_IN_FLIGHT = """
local function in_flight(key, alive)
  local all, f = redis.call('HGETALL', key), 0
  local fields = {}
  for j = 1, #all, 2 do fields[all[j]] = all[j + 1] end
  for name, value in pairs(fields) do
    if string.sub(name, 1, 2) == 'f:' then
      local id = string.sub(name, 3)
      local seen = tonumber(fields['h:' .. id] or '0')
      if seen >= alive then f = f + tonumber(value)
      else redis.call('HDEL', key, name, 'h:' .. id) end
    end
  end
  return f
end
"""

# KEYS: one hash per scope. ARGV: now, need, this process's id, the time before which
# a process is gone (now - lease), the hashes' expiry (s), then rpm, tpm,
# max_concurrency per scope (0: none). Returns {0, scope, why, wait_ms,
# levels} refused, or {1, levels}; levels are strings (Lua numbers come back as
# integers).
_ADMIT = (
    _IN_FLIGHT
    + """
local now, need, me = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local alive, ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
local function level(lv, at, per)
  if not lv then return per end
  return math.min(per, tonumber(lv) + (now - tonumber(at)) * per / 60)
end
local state, levels = {}, {}
for i, key in ipairs(KEYS) do
  local rpm, tpm = tonumber(ARGV[3*i+3]), tonumber(ARGV[3*i+4])
  local h = redis.call('HMGET', key, 'rl', 'rt', 'tl', 'tt')
  state[i] = {rpm > 0 and level(h[1], h[2], rpm) or -1,
              tpm > 0 and level(h[3], h[4], tpm) or -1, in_flight(key, alive)}
end
local function all_levels()
  for i = 1, #KEYS do
    levels[2*i-1] = tostring(state[i][1]); levels[2*i] = tostring(state[i][2])
  end
  return levels
end
for i, key in ipairs(KEYS) do
  local rpm, tpm = tonumber(ARGV[3*i+3]), tonumber(ARGV[3*i+4])
  local maxc = tonumber(ARGV[3*i+5])
  local rl, tl, f = state[i][1], state[i][2], state[i][3]
  local why, wait = nil, 0
  if tpm > 0 and need > tpm then why = 'max_tokens'
  elseif maxc > 0 and f >= maxc then why, wait = 'in_flight', 1000
  elseif rpm > 0 and rl < 1 then why, wait = 'rpm', math.ceil((1 - rl) * 60000 / rpm)
  elseif tpm > 0 and tl < need then why, wait = 'tpm', math.ceil((need - tl) * 60000 / tpm)
  end
  if why then return {0, i, why, wait, all_levels()} end
end
for i, key in ipairs(KEYS) do
  local s = state[i]
  if s[1] >= 0 then s[1] = s[1] - 1; redis.call('HSET', key, 'rl', s[1], 'rt', now) end
  if s[2] >= 0 then s[2] = s[2] - need; redis.call('HSET', key, 'tl', s[2], 'tt', now) end
  redis.call('HINCRBY', key, 'f:' .. me, 1)
  redis.call('HSET', key, 'h:' .. me, now)
  redis.call('EXPIRE', key, ttl)
end
return {1, all_levels()}
"""
)

# KEYS: the scopes' hashes. ARGV: now, token delta (used - reserved), this process's
# id, then tpm per scope.
_RELEASE = """
local now, delta, me = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
for i, key in ipairs(KEYS) do
  if redis.call('HINCRBY', key, 'f:' .. me, -1) <= 0 then
    redis.call('HDEL', key, 'f:' .. me, 'h:' .. me)
  end
  local tpm = tonumber(ARGV[3 + i])
  if tpm > 0 and delta ~= 0 then
    local h = redis.call('HMGET', key, 'tl', 'tt')
    if h[1] then
      local tl = math.min(tpm, tonumber(h[1]) + (now - tonumber(h[2])) * tpm / 60)
      redis.call('HSET', key, 'tl', math.min(tpm, tl - delta), 'tt', now)
    end
  end
end
return 1
"""


@dataclass
class RedisAdmission:
    limiter: RedisLimiter
    principal: Principal
    reserved: int
    headers: dict[str, str]
    released: bool = field(default=False)

    def release(self, now: float, usage: dict | None = None) -> None:
        """Called from synchronous code at the end of an answer: the Redis write runs
        as a task (kept until done, so it is not collected half-way)."""
        if self.released:
            return
        self.released = True
        self.limiter.let_go(self.principal)
        used = tokens_used(usage)
        delta = 0 if used is None else used - self.reserved
        task = asyncio.get_running_loop().create_task(
            self.limiter.release(self.principal, now, delta, used or 0)
        )
        self.limiter.pending.add(task)
        task.add_done_callback(self.limiter.pending.discard)


class RedisLimiter:
    def __init__(
        self,
        url: str,
        prefix: str = "tiergate:limits:",
        default_reservation: int = 256,
        lease: float = 30.0,
    ):
        import redis.asyncio as redis

        self.redis = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self.warned = -10.0  # when Redis being away was last logged
        self.prefix = prefix
        self.default_reservation = default_reservation
        self.lease = lease
        self.ttl = max(120, math.ceil(3 * lease))  # a hash's life past its last write
        self.me = uuid.uuid4().hex[:12]  # this process, in the hashes' f:/h: fields
        self.held: Counter[str] = Counter()  # hash -> our requests in flight in it
        self.admit_script = self.redis.register_script(_ADMIT)
        self.release_script = self.redis.register_script(_RELEASE)
        self.pending: set[asyncio.Task] = set()
        self.beat: asyncio.Task | None = None

    async def close(self) -> None:
        if self.beat is not None:
            await cancel_and_wait([self.beat])
        if self.pending:
            await asyncio.wait(self.pending, timeout=2)
        await self.redis.aclose()

    def let_go(self, p: Principal) -> None:
        for key in self._args(p)[0]:
            self.held[key] -= 1
            if self.held[key] <= 0:
                del self.held[key]

    async def _beat(self) -> None:
        """Say every third of the lease that this process is alive, with its count, in
        each hash where it holds requests. The count mends a release that never reached
        Redis; an admit landing while a beat is on the wire can be undercounted by one
        until the next beat (one round trip's window every third of a lease)."""
        while True:
            await asyncio.sleep(self.lease / 3)
            if not self.held:
                continue
            now = time.time()
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for key, count in list(self.held.items()):
                        pipe.hset(key, mapping={f"f:{self.me}": count, f"h:{self.me}": now})
                        pipe.expire(key, self.ttl)
                    await pipe.execute()
            except Exception as exc:  # Redis away: the next beat tries again
                log.warning("could not renew in-flight leases in Redis: %s", exc)

    def _args(self, p: Principal) -> tuple[list[str], list]:
        keys = [self.prefix + s.id for s in p.scopes]
        limits: list = []
        for s in p.scopes:
            limits += [s.rpm or 0, s.tpm or 0, s.max_concurrency or 0]
        return keys, limits

    async def admit(
        self, p: Principal, max_tokens: int | None, now: float
    ) -> RedisAdmission | None:
        if not p.scopes:
            # no rate limits; a budget still needs the release to count the tokens
            return RedisAdmission(self, p, 0, {}) if p.budget is not None else None
        need = max_tokens or self.default_reservation
        keys, limits = self._args(p)
        args = [now, need, self.me, now - self.lease, self.ttl, *limits]
        try:
            answer = await self.admit_script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            self._unreachable(exc)
            return None  # fail open: served, not counted
        if answer[0] == 1:
            self.held.update(keys)
            if self.beat is None:
                self.beat = asyncio.create_task(self._beat())
            levels = [float(x) for x in answer[1]]
            return RedisAdmission(self, p, need, self._headers(p, levels))
        _, i, why, wait_ms, raw = answer
        headers = self._headers(p, [float(x) for x in raw])
        scope = p.scopes[int(i) - 1]
        why = why.decode() if isinstance(why, bytes) else why
        who = "key" if scope.id.startswith("k:") else "tenant"
        if why == "max_tokens":
            raise RateLimited(
                f"max_tokens {need} is more than '{p.tenant}' may use in a minute "
                f"({scope.tpm} tokens).",
                param="max_tokens",
                headers=headers,
            )
        text = {
            "in_flight": f"{scope.max_concurrency} requests in flight",
            "rpm": f"{scope.rpm} requests per minute",
            "tpm": f"{scope.tpm} tokens per minute",
        }[why]
        retry = str(max(1, math.ceil(int(wait_ms) / 1000)))
        raise RateLimited(
            f"Rate limit reached for {who} '{scope.id[2:]}': {text}. Retry after {retry}s.",
            headers=headers | {"retry-after": retry},
        )

    async def release(self, p: Principal, now: float, delta: int, used: int = 0) -> None:
        keys, _ = self._args(p)
        tpms = [s.tpm or 0 for s in p.scopes]
        try:
            if keys:
                await self.release_script(keys=keys, args=[now, delta, self.me, *tpms])
            if p.budget is not None and used:
                key = self._budget_key(p.tenant, p.budget.period, now)
                async with self.redis.pipeline(transaction=True) as pipe:
                    await pipe.incrby(key, used).expire(key, 32 * 86400).execute()
        except Exception as exc:  # a lost release must not fail the answer
            log.warning("could not release a tenant's limits in Redis: %s", exc)

    def _budget_key(self, tenant: str, period: str, now: float) -> str:
        return f"{self.prefix}budget:{tenant}:{period_start(period, now)}"

    async def budget_spent(self, p: Principal, now: float) -> int:
        """Tokens the tenant used this period, counted by every replica (0 while Redis
        cannot be reached: budgets fail open, as limits do)."""
        try:
            value = await self.redis.get(self._budget_key(p.tenant, p.budget.period, now))
        except (RedisError, OSError) as exc:
            self._unreachable(exc)
            return 0
        return int(value or 0)

    def _unreachable(self, exc: Exception) -> None:
        """Limits fail open while Redis is away: every tenant refused would be worse
        than limits unenforced for a while. Said once every 10 s."""
        now = time.monotonic()
        if now - self.warned >= 10:
            self.warned = now
            log.warning("tenant limits: Redis unreachable (%s); serving without limits", exc)

    @staticmethod
    def _headers(p: Principal, levels: list[float]) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, limit, offset in (("requests", "rpm", 0), ("tokens", "tpm", 1)):
            found = [
                (levels[2 * i + offset], getattr(s, limit))
                for i, s in enumerate(p.scopes)
                if getattr(s, limit)
            ]
            if found:
                left, per = min(found)
                out[f"x-ratelimit-limit-{name}"] = str(per)
                out[f"x-ratelimit-remaining-{name}"] = str(max(0, math.floor(left)))
                out[f"x-ratelimit-reset-{name}"] = duration((per - left) * 60 / per)
        return out
