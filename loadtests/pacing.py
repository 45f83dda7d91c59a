"""Poisson request pacing for Locust users.

``poisson_throughput(rate)`` is a Locust ``wait_time``: each user schedules its next request at
its previous *scheduled* start plus an exponential gap of mean 1/rate, so its request starts form a
Poisson process of that rate (open loop) as long as responses come back before the next start; a
user that falls behind starts at once (and catches up, never bursting more than one request).
N users at ``rate`` each give a Poisson process of N·rate in total (independent Poisson processes
superpose), which is how the sweep turns a total request rate into per-user rates.
"""

from __future__ import annotations

import random
import time
from typing import Any, Callable


def exponential_gaps(rate: float, n: int, rng: random.Random) -> list[float]:
    """``n`` exponential inter-arrival gaps (seconds) of mean ``1/rate``."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    return [rng.expovariate(rate) for _ in range(n)]


class PoissonPacer:
    """Scheduled start times of one user: ``next_wait(now)`` returns the seconds to wait."""

    def __init__(self, rate: float, rng: random.Random | None = None):
        if rate <= 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        self.rate = rate
        self.rng = rng or random.Random()
        self.next_start: float | None = None

    def next_wait(self, now: float) -> float:
        if self.next_start is None:
            # first request: a random phase so that users do not start in lock step
            self.next_start = now + self.rng.expovariate(self.rate)
        else:
            self.next_start += self.rng.expovariate(self.rate)
        if self.next_start < now:
            # behind schedule: start now and re-anchor, so a slow server is not hit with a burst
            self.next_start = now
        return self.next_start - now


def poisson_throughput(rate: float, seed: int | None = None) -> Callable[[Any], float]:
    """A Locust ``wait_time`` giving each user Poisson-paced starts at ``rate`` requests/s."""
    base = random.Random(seed)

    def wait_time(user: Any) -> float:
        pacer = getattr(user, "_poisson_pacer", None)
        if pacer is None:
            pacer = PoissonPacer(rate, random.Random(base.getrandbits(64)))
            user._poisson_pacer = pacer
        return pacer.next_wait(time.monotonic())

    return wait_time
