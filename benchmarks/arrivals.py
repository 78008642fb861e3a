"""When each request is due. Pure functions of a seed, so a run can be replayed.

Open loop: inter-arrival gaps drawn from a gamma distribution with mean 1/rate.
`burstiness` is the gamma shape: 1.0 is a Poisson process, below 1 is burstier,
above 1 is smoother (the coefficient of variation of the gaps is 1/sqrt(shape)).
"""

from __future__ import annotations

import math
import random


def arrival_offsets(
    rate: float,
    *,
    count: int | None = None,
    duration: float | None = None,
    burstiness: float = 1.0,
    seed: int = 0,
) -> list[float]:
    """Seconds from the start at which each request is due.

    Bounded by `count` requests, by `duration` seconds, or by whichever comes
    first. `rate=inf` sends everything at t=0 (a burst, as `vllm bench serve`'s
    default).
    """
    if count is None and duration is None:
        raise ValueError("give count or duration")
    if rate <= 0:
        raise ValueError("rate must be > 0")
    if burstiness <= 0:
        raise ValueError("burstiness must be > 0")
    if math.isinf(rate):
        if count is None:
            raise ValueError("an infinite rate needs a count")
        return [0.0] * count
    rng = random.Random(seed)
    scale = 1.0 / (rate * burstiness)
    offsets: list[float] = []
    t = 0.0
    while count is None or len(offsets) < count:
        t += rng.gammavariate(burstiness, scale)
        if duration is not None and t > duration:
            break
        offsets.append(t)
    return offsets
