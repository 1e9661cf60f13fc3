"""The event log's parts in one service process: the outbox, the registry change detector, the stream publisher and
the webhook dispatcher, started and stopped together."""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

from hokusai.server.config import Settings
from hokusai.server.db import Database
from hokusai.server.events.changes import RegistryChanges
from hokusai.server.events.mlflow_hooks import MlflowHooks
from hokusai.server.events.outbox import EventOutbox
from hokusai.server.events.stream import StreamPublisher
from hokusai.server.instance import instance_id
from hokusai.server.mlflow.registry_client import RegistryClient
from hokusai.server.mlflow.upstream import MlflowUpstream
from hokusai.server.redis_breaker import RedisBreaker
from hokusai.server.webhooks.dispatch import WebhookDispatcher


@dataclass
class EventService:
    outbox: EventOutbox
    changes: RegistryChanges
    publisher: StreamPublisher
    dispatcher: WebhookDispatcher
    mlflow_hooks: MlflowHooks

    @classmethod
    def build(
        cls,
        settings: Settings,
        database: Database,
        upstream: MlflowUpstream,
        redis: Redis | None,
        redis_breaker: RedisBreaker | None,
    ) -> EventService:
        owner = instance_id()
        outbox = EventOutbox(database)
        publisher = StreamPublisher(database, redis, redis_breaker, settings, owner=owner)
        dispatcher = WebhookDispatcher(database, settings, owner=owner)
        outbox.add_listener(publisher.wake)
        outbox.add_listener(dispatcher.wake)
        changes = RegistryChanges(
            RegistryClient.over(upstream), database, outbox, owner, settings.events_reconcile_seconds
        )
        return cls(outbox, changes, publisher, dispatcher, MlflowHooks(settings, upstream, changes))

    async def start(self) -> None:
        await self.publisher.start()
        await self.dispatcher.start()
        await self.changes.start()
        await self.mlflow_hooks.start()

    async def aclose(self) -> None:
        await self.mlflow_hooks.aclose()
        await self.changes.aclose()
        await self.dispatcher.aclose()
        await self.publisher.aclose()
