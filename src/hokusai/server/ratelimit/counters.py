"""Sliding window counters: decide a request against all of its limits at once, and say what is left of each.

Two stores with one algorithm: `MemoryCounters` (one process) and `RedisCounters` (every process shares one count;
one atomic Lua script, so a request costs one round trip: decide, count, and return remaining and reset; requests
that arrive together share that call).

The algorithm is the sliding window counter of the `limits` library (which this replaced for its two round trips
per request in Redis and ~40 us per request in process): windows aligned to the epoch, a count for the current
window and the previous one, and the previous count weighted by how much of it still overlaps the last `window`
seconds. `floor(weighted) < amount` admits a request; remaining is `amount - floor(weighted)`, reset is when the
weighted count next drops by one (or the current window ends), as `limits` computes them.

A request is counted only when every limit admits it: one refused by the key's hourly budget does not spend its
route policy either (the script checks all limits before it writes any).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from redis.asyncio import Redis


@dataclass(frozen=True, slots=True)
class CounterLimit:
    """`amount` requests per `window` seconds, counted under `key` (the key names the window length too: a policy
    changed from per-minute to per-hour starts a fresh count rather than misreading the old one)."""

    key: str
    amount: int
    window: int


@dataclass(frozen=True, slots=True)
class CounterState:
    remaining: int
    reset_in: float  # seconds until remaining grows again


@dataclass(frozen=True, slots=True)
class Decision:
    """The states of the limits up to and including the first that refused (all of them when admitted)."""

    states: tuple[CounterState, ...]
    refused: int | None  # index of the limit that refused, None when admitted


class CounterStore(Protocol):
    async def acquire(self, limits: Sequence[CounterLimit], count: bool = True) -> Decision:
        """Decide one request against `limits` (in order) and count it in each when all admit it (and `count`)."""
        ...


def _state(amount: int, window: int, previous: int, current: int, elapsed: float) -> CounterState:
    """What is left after the decision, with `limits`' formulas (the headers stayed the same when it was replaced)."""
    left_of_window = window - elapsed
    weighted = previous * left_of_window / window + current
    remaining = max(0, amount - math.floor(weighted))
    if not (previous or current):
        return CounterState(remaining, 0.0)
    previous_reset = left_of_window % (window / previous) if previous else math.inf
    current_reset = left_of_window % window if current else math.inf
    return CounterState(remaining, min(previous_reset, current_reset))


class MemoryCounters:
    """In-process counters: a dict of key -> [window index, current count, previous count, window length].

    No await between reading and writing, so a decision is atomic on the event loop. Entries older than the
    previous window weigh nothing and are swept once a minute (failed-auth counters are per client address)."""

    SWEEP_INTERVAL = 60.0

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._windows: dict[str, list[int]] = {}
        self._next_sweep = 0.0

    def __len__(self) -> int:
        return len(self._windows)

    async def acquire(self, limits: Sequence[CounterLimit], count: bool = True) -> Decision:
        now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)
        windows = self._windows
        counts: list[tuple[int, int, int, float]] = []
        refused = None
        for position, limit in enumerate(limits):
            index, elapsed = divmod(now, limit.window)
            index = int(index)
            entry = windows.get(limit.key)
            if entry is None or entry[0] < index - 1:
                previous = current = 0
            elif entry[0] == index:
                current, previous = entry[1], entry[2]
            else:  # the entry's window is the previous one
                current, previous = 0, entry[1]
            counts.append((index, previous, current, elapsed))
            if math.floor(previous * (limit.window - elapsed) / limit.window + current) >= limit.amount:
                refused = position
                break
        if refused is None and count:
            for limit, (index, previous, current, _) in zip(limits, counts, strict=True):
                entry = windows.get(limit.key)
                if entry is None:
                    windows[limit.key] = [index, current + 1, previous, limit.window]
                else:  # in place: no new object per request
                    entry[0], entry[1], entry[2] = index, current + 1, previous
            counts = [(index, previous, current + 1, elapsed) for index, previous, current, elapsed in counts]
        states = tuple(
            _state(limit.amount, limit.window, previous, current, elapsed)
            for limit, (_, previous, current, elapsed) in zip(limits, counts, strict=False)
        )
        return Decision(states, refused)

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + self.SWEEP_INTERVAL
        stale = [key for key, entry in self._windows.items() if entry[0] < now // entry[3] - 1]
        for key in stale:
            del self._windows[key]


# One call decides a batch of requests (those that arrived while the previous call was out), each atomically and in
# order, as if each had made its own call.
# KEYS: one hash per limit ({w: window index, c: current count, p: previous count}), request after request.
# ARGV: per request: 1 to count (0 to only look), its number of limits, then amount and window (ms) per limit.
# Returns one string (one line to read, not an array of numbers to parse): per request, the refused position
# (0: none), the number of limits decided, then remaining and reset (ms) per limit decided.
# Time is Redis's own (TIME): every server process agrees on the window whatever its clock says.
SLIDING_WINDOW_SCRIPT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local answer = {}
local key_at, arg_at = 0, 0
while arg_at < #ARGV do
    local count = ARGV[arg_at + 1] == '1'
    local limits = tonumber(ARGV[arg_at + 2])
    arg_at = arg_at + 2
    local decided = {}
    local refused = 0
    for i = 1, limits do
        local amount = tonumber(ARGV[arg_at + 2 * i - 1])
        local window = tonumber(ARGV[arg_at + 2 * i])
        local index = math.floor(now / window)
        local elapsed = now - index * window
        local stored = redis.call('HMGET', KEYS[key_at + i], 'w', 'c', 'p')
        local stored_index = tonumber(stored[1])
        local previous, current = 0, 0
        if stored_index == index then
            current, previous = tonumber(stored[2]), tonumber(stored[3])
        elseif stored_index == index - 1 then
            previous = tonumber(stored[2])
        end
        decided[i] = {index, previous, current, elapsed, amount, window, stored_index}
        if math.floor(previous * (window - elapsed) / window + current) >= amount then
            refused = i
            break
        end
    end
    if refused == 0 and count then
        for i = 1, limits do
            local d = decided[i]
            d[3] = d[3] + 1
            redis.call('HSET', KEYS[key_at + i], 'w', d[1], 'c', d[3], 'p', d[2])
            if d[7] ~= d[1] then  -- first count of this window: kept until the next window ends
                redis.call('PEXPIRE', KEYS[key_at + i], (d[1] + 2) * d[6] - now)
            end
        end
    end
    answer[#answer + 1] = refused
    answer[#answer + 1] = #decided
    for i = 1, #decided do
        local d = decided[i]
        local previous, current, elapsed, amount, window = d[2], d[3], d[4], d[5], d[6]
        local left = window - elapsed
        local remaining = math.max(0, amount - math.floor(previous * left / window + current))
        local reset = 0
        if previous > 0 or current > 0 then
            reset = math.huge
            if previous > 0 then reset = math.fmod(left, window / previous) end
            if current > 0 then reset = math.min(reset, math.fmod(left, window)) end
        end
        answer[#answer + 1] = remaining
        answer[#answer + 1] = math.floor(reset)
    end
    key_at, arg_at = key_at + limits, arg_at + 2 * limits
end
return table.concat(answer, ' ')
"""

Waiting = tuple[Sequence[CounterLimit], bool, "asyncio.Future[Decision]"]


class RedisCounters:
    """Counters in Redis under `prefix`: one EVALSHA per call (redis-py loads the script again on NOSCRIPT, after a
    Redis restart or SCRIPT FLUSH). Redis errors propagate: the limiter fails open or closed.

    Requests that arrive while a call is out wait for it to return and then go together in the next one: each
    request still costs one round trip (plus the rest of the call in flight, at most), and under load the service
    makes one call for many requests instead of one each; redis-py's cost per call (~70 us of CPU on the bench
    machine for a PING) was most of what rate limiting cost there."""

    def __init__(self, client: Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self._script = client.register_script(SLIDING_WINDOW_SCRIPT)
        self._waiting: list[Waiting] = []
        self._caller: asyncio.Task[None] | None = None

    async def acquire(self, limits: Sequence[CounterLimit], count: bool = True) -> Decision:
        decided: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        self._waiting.append((limits, count, decided))
        if self._caller is None:
            self._caller = asyncio.create_task(self._call_while_waiting())
        return await decided

    async def _call_while_waiting(self) -> None:
        """Runs on its own (a request cancelled while waiting does not cancel the call of the others)."""
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                try:
                    decisions = await self._decide(batch)
                except Exception as exc:
                    # Each waiter fails open or closed on it, as a call of its own would; so do those that came
                    # while it was out, rather than wait on a Redis that just failed (the breaker decides when
                    # to try again).
                    batch, self._waiting = batch + self._waiting, []
                    for _, _, decided in batch:
                        if not decided.done():
                            decided.set_exception(exc)
                    continue
                for (_, _, decided), decision in zip(batch, decisions, strict=True):
                    if not decided.done():
                        decided.set_result(decision)
        finally:
            self._caller = None

    async def _decide(self, batch: list[Waiting]) -> list[Decision]:
        keys: list[str] = []
        arguments: list[int] = []
        for limits, count, _ in batch:
            arguments += (1 if count else 0, len(limits))
            for limit in limits:
                keys.append(self.prefix + limit.key)
                arguments += (limit.amount, limit.window * 1000)
        numbers = [int(number) for number in (await self._script(keys=keys, args=arguments)).split()]
        decisions, position = [], 0
        for _ in batch:
            refused, decided = numbers[position], numbers[position + 1]
            first, end = position + 2, position + 2 + 2 * decided
            states = tuple(CounterState(numbers[at], numbers[at + 1] / 1000) for at in range(first, end, 2))
            decisions.append(Decision(states, refused - 1 if refused else None))
            position += 2 + 2 * decided
        return decisions

    async def aclose(self) -> None:
        await self.client.aclose()
