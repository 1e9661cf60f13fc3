"""ClusterBus: operations an operator asks of one process that must reach every service process.

Resetting the MLflow circuit breaker or clearing DSPy's caches acts on state each process keeps in memory. The
process that is asked applies the operation at once, then (with Redis) publishes it on the pub/sub channel
`<HOKUSAI_REDIS_PREFIX>cluster`; every process subscribes there and applies the operations it has a handler for.
A message names its operation and its origin (`instance.instance_id()`, for the logs) and carries an id, by which
the sender skips its own message when it hears it back. Unknown operations are ignored (a newer process may send
one an older one does not know).

Pub/sub reaches the processes subscribed at that moment: one whose subscription is down (Redis restarting) misses
the message, and the answer says how many processes were reached. Without Redis the operation is applied in this
process only, which is then the whole service; with Redis unreachable, here only, and the answer says so.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from hokusai.server.instance import instance_id
from hokusai.server.redis_breaker import RedisBreaker

logger = logging.getLogger(__name__)

REDIS_PREFIX = "hokusai:"  # the service passes HOKUSAI_REDIS_PREFIX (Settings.redis_key_prefix)
CHANNEL = "cluster"
# Between two attempts to subscribe again after Redis failed, doubling from the first to the last.
RECONNECT_DELAYS = (0.2, 5.0)
# How long the app's start waits for its first subscription (a Redis that does not answer holds it back no longer).
SUBSCRIBE_WAIT_SECONDS = 2.0
# A read of the channel returns at least this often, so a stop is never stuck behind a read.
LISTEN_SECONDS = 1.0
NOT_REACHED = "Redis did not answer: applied in this process; other service processes may not have been reached"

Handler = Callable[[], Awaitable[Any] | Any]


class ClusterOperation(StrEnum):
    """The operations every process knows; the wire name is the value."""

    MLFLOW_BREAKER_RESET = "mlflow.breaker.reset"
    DSPY_CACHE_CLEAR = "dspy.cache.clear"


class UnknownOperation(LookupError):
    """`run` was asked for an operation no handler was registered for (a programming error)."""


@dataclass(frozen=True)
class Applied:
    """What `run` did: the local handler's result, and how far the operation went."""

    result: Any
    processes: int  # processes that applied it: this one and those subscribed when it was published
    warning: str | None = None  # set when other processes may exist and were not reached


class ClusterBus:
    def __init__(self, redis: Redis | None, breaker: RedisBreaker | None = None, prefix: str = REDIS_PREFIX) -> None:
        """`redis` None: one process, operations are applied here only. `breaker`: the service's Redis breaker,
        so a publish does not wait on a Redis known to be down."""
        self._redis = redis
        self._breaker = breaker or RedisBreaker(threshold=3, retry_after=5.0)
        self.channel = f"{prefix}{CHANNEL}"
        self._handlers: dict[str, Handler] = {}
        self._sent: deque[str] = deque(maxlen=256)  # ids of our own messages, skipped when they come back
        self._subscribed = asyncio.Event()
        self._tried = asyncio.Event()  # the first attempt to subscribe ended, either way
        self._listener: asyncio.Task | None = None

    def register(self, operation: str, handler: Handler) -> None:
        """`handler()` (a function or a coroutine function, no arguments) applies `operation` in this process."""
        self._handlers[str(operation)] = handler

    @property
    def subscribed(self) -> bool:
        return self._subscribed.is_set()

    async def run(self, operation: str) -> Applied:
        """Apply `operation` here, then have every other process apply it. An error of the local handler is
        raised (nothing is published); Redis failing is not an error: the answer's warning says so."""
        handler = self._handlers.get(str(operation))
        if handler is None:
            raise UnknownOperation(operation)
        result = await _call(handler)
        if self._redis is None:
            return Applied(result, 1)
        message_id = uuid.uuid4().hex
        payload = json.dumps({"id": message_id, "origin": instance_id(), "operation": str(operation)})
        if not self._breaker.allow():
            logger.warning("Operation %s: %s (Redis is skipped after repeated failures)", operation, NOT_REACHED)
            return Applied(result, 1, NOT_REACHED)
        # Remembered before the publish: our own subscription may deliver the message before PUBLISH returns.
        self._sent.append(message_id)
        try:
            receivers = int(await self._redis.publish(self.channel, payload))
        except RedisError as exc:
            self._breaker.record_failure(exc)
            logger.warning("Operation %s: %s (%s)", operation, NOT_REACHED, exc)
            return Applied(result, 1, NOT_REACHED)
        self._breaker.record_success()
        # PUBLISH counts the subscribed connections, one per process, ours among them when it is up.
        processes = receivers + (0 if self.subscribed else 1)
        logger.info("Operation %s applied here and published to %d other process(es)", operation, processes - 1)
        return Applied(result, processes)

    async def start(self) -> None:
        """Subscribe (with Redis), in a task that subscribes again after Redis errors until `aclose`."""
        if self._redis is None or self._listener is not None:
            return
        self._listener = asyncio.create_task(self._listen(), name="cluster-bus")
        with suppress(TimeoutError):
            async with asyncio.timeout(SUBSCRIBE_WAIT_SECONDS):
                await self._tried.wait()

    async def aclose(self) -> None:
        if self._listener is None:
            return
        self._listener.cancel()
        with suppress(asyncio.CancelledError):
            await self._listener
        self._listener = None
        self._subscribed.clear()

    async def _listen(self) -> None:
        assert self._redis is not None
        delay = RECONNECT_DELAYS[0]
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                while True:
                    message = await pubsub.get_message(timeout=LISTEN_SECONDS)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        if delay > RECONNECT_DELAYS[0]:
                            logger.warning("Cluster channel subscribed again")
                        self._subscribed.set()
                        self._tried.set()
                        delay = RECONNECT_DELAYS[0]
                    elif message["type"] == "message":
                        await self._receive(message["data"])
            except (RedisError, OSError) as exc:
                self._subscribed.clear()
                self._tried.set()
                logger.warning(
                    "Cluster channel unavailable (%s): operations asked of other processes do not reach this one; "
                    "subscribing again in %gs",
                    exc,
                    delay,
                )
            finally:
                with suppress(RedisError, OSError):
                    await pubsub.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_DELAYS[1])

    async def _receive(self, data: bytes | str) -> None:
        try:
            message = json.loads(data)
            message_id, origin, operation = message["id"], message["origin"], message["operation"]
        except (ValueError, TypeError, KeyError):
            logger.warning("Ignored a malformed message on the cluster channel")
            return
        if message_id in self._sent:
            return  # ours: applied when it was asked for
        handler = self._handlers.get(operation)
        if handler is None:
            logger.info("Ignored cluster operation %r from %s: not known to this process", operation, origin)
            return
        try:
            await _call(handler)
        except Exception:  # one failed operation must not end the subscription
            logger.exception("Cluster operation %s from %s failed in this process", operation, origin)
            return
        logger.warning("Cluster operation %s applied, asked by %s", operation, origin)


async def _call(handler: Handler) -> Any:
    result = handler()
    if inspect.isawaitable(result):
        result = await result
    return result
