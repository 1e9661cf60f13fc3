"""RegistryChanges: every change to MLflow's registry becomes exactly one event, whichever way it was made.

MLflow is the source of truth, so events are derived from it: the service keeps a snapshot of each registered model
(events/models.py) and, after a change, reads the model from MLflow, diffs it against the snapshot (snapshot.py) and
writes the new snapshot and the events in one transaction. The snapshot row's `revision` makes that write a
compare-and-set: two processes observing one model at once cannot both announce a change (the loser reads again and
finds nothing new). Events are therefore exactly once per change, whoever observes it first.

Who made it: the write seams (RegistryService for /models, the gateway for the stock client) write an intent
(model, actor) before asking MLflow and observe right after; a diff that finds changes while an intent is open
names that actor. A process killed between the MLflow call and its observation leaves the intent, and the
reconciler (one process at a time, every `events_reconcile_seconds`) finds the change and still names the right
actor. Changes made in MLflow directly are seen by the reconciler, or at once when MLflow's own webhooks are
subscribed (`hint`), and are attributed to "mlflow".
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from datetime import timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError

from hokusai.server.db import Database, utcnow
from hokusai.server.errors import HokusaiError
from hokusai.server.events.leases import NamedLease
from hokusai.server.events.models import (
    ChangeIntentRow,
    EventLogOriginRow,
    SnapshotModelRow,
    SnapshotVersionRow,
)
from hokusai.server.events.outbox import MLFLOW_ACTOR, Actor, EventOutbox, NewEvent
from hokusai.server.events.snapshot import ModelState, diff
from hokusai.server.mlflow.registry_client import ModelVersion, RegistryClient

logger = logging.getLogger(__name__)

CAS_ATTEMPTS = 8  # observations of one model racing each other: each retry reads MLflow again
STALE_INTENT = timedelta(seconds=30)  # an intent this old belongs to a write that died before observing
FORGOTTEN_INTENT = timedelta(hours=1)  # ... and this old, with nothing found to pin on it, is dropped
BASELINE_BATCH = 200  # models taken into the snapshot per transaction by the reconciler
HINT_DELAY = 1.0  # seconds a hint waits, so the writer's own observation (which knows the actor) usually goes first


class RegistryChanges:
    def __init__(
        self,
        mlflow: RegistryClient,
        database: Database,
        outbox: EventOutbox,
        owner: str,
        reconcile_seconds: float,
    ) -> None:
        self._mlflow = mlflow
        self._database = database
        self._outbox = outbox
        self._reconcile_seconds = reconcile_seconds
        self._lease = NamedLease(database, "events-reconciler", owner, max(reconcile_seconds * 3, 30.0))
        self._origin_ms: int | None = None
        self._hinted: set[str] = set()
        self._hint_wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._reconcile_loop(), name="events-reconciler"),
            asyncio.create_task(self._hint_loop(), name="events-hints"),
        ]

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        with suppress(Exception):  # best effort: the lease runs out on its own otherwise
            await self._lease.release()

    # The write seam

    @asynccontextmanager
    async def change(self, name: str, actor: Actor) -> AsyncIterator[None]:
        """Around a write to one model: the intent before, the observation after (whether the write completed or
        not: a failed call may still have changed something)."""
        intent = await self.intent(name, actor)
        try:
            yield
        finally:
            await self.observe_safely(name, actor, intent)

    async def intent(self, name: str, actor: Actor) -> int:
        """Recorded before the write. A model the snapshot has never seen, that MLflow had before the event log
        began, is taken in first (silently), so that this write is announced as what it changed."""
        async with self._database.session() as session:
            known = await session.get(SnapshotModelRow, name) is not None
        if not known:
            await self._baseline(name)
        async with self._database.session() as session, session.begin():
            row = ChangeIntentRow(
                model_name=name,
                actor_kind=actor.kind,
                actor_key_id=actor.key_id,
                actor_name=actor.name[:200],
                created_at=utcnow(),
            )
            session.add(row)
            await session.flush()
            return row.id

    async def _baseline(self, name: str) -> None:
        origin_ms = await self._origin()
        current = await self._read(name)
        if current is not None and current.created_ms < origin_ms:
            await self._commit(name, None, current, None, None, origin_ms)  # no events: the model predates the log

    async def observe_safely(self, name: str, actor: Actor | None = None, intent: int | None = None) -> None:
        """`observe`, with a failure logged instead of raised: the write itself is done, and its change is not lost
        (the intent stays; the reconciler finds the change and names the actor)."""
        try:
            await self.observe(name, actor, intent)
        except (HokusaiError, OSError) as exc:
            logger.warning("Change to model %r not observed yet (%s): the reconciler will", name, exc)
        except Exception:
            logger.exception("Change to model %r not observed yet: the reconciler will", name)

    async def observe(self, name: str, actor: Actor | None = None, intent: int | None = None) -> int:
        """Diff the model against its snapshot and record the events; how many there were. `actor` None: the one
        of the oldest open intent on the model, else MLflow (a direct change)."""
        origin_ms = await self._origin()
        for _ in range(CAS_ATTEMPTS):
            snapshot = await self._load(name)
            current = await self._read(name)
            written = await self._commit(name, snapshot, current, actor, intent, origin_ms)
            if written is not None:
                return written
        raise HokusaiError(f"Model {name!r} kept changing while it was observed")

    async def _origin(self) -> int:
        if self._origin_ms is None:
            async with self._database.session() as session:
                started = (await session.execute(select(EventLogOriginRow.started_at))).scalar()
            self._origin_ms = int(started.timestamp() * 1000) if started is not None else 0
        return self._origin_ms

    async def _read(self, name: str) -> ModelState | None:
        """The model and its versions, asked side by side (one round trip of latency, not two)."""

        async def versions() -> list[ModelVersion]:
            return [v async for v in self._mlflow.every_version(name)]

        model, found = await asyncio.gather(self._mlflow.find_registered_model(name), versions())
        return ModelState.read(model, found) if model is not None else None

    async def _load(self, name: str) -> tuple[int, ModelState] | None:
        async with self._database.session() as session:
            row = await session.get(SnapshotModelRow, name)
            if row is None:
                return None
            versions = (
                await session.execute(select(SnapshotVersionRow).where(SnapshotVersionRow.name == name))
            ).scalars()
            state = ModelState.stored(
                name, row.created_ms, row.updated_ms, row.state, {v.version: v.state for v in versions}
            )
            return row.revision, state

    async def _commit(
        self,
        name: str,
        snapshot: tuple[int, ModelState] | None,
        current: ModelState | None,
        actor: Actor | None,
        intent: int | None,
        origin_ms: int,
    ) -> int | None:
        """Write the new snapshot and the events, if the snapshot is still the one diffed; None: it was not (retry)."""
        before = snapshot[1] if snapshot else None
        probe = diff(before, current, MLFLOW_ACTOR, origin_ms)
        unchanged = not probe and (current is None or before is None or current.updated_ms == before.updated_ms)
        if unchanged and (before is not None or current is None):
            if intent is not None:
                await self._drop_intents([intent])
            return 0
        try:
            async with self._database.session() as session, session.begin():
                # First statement a write: on SQLite it takes the write lock before anything is read.
                if snapshot is None:
                    if current is None:
                        return 0
                    session.add(self._model_row(current, 1))
                    await session.flush()  # a concurrent first observation: IntegrityError, retried
                else:
                    revision, _ = snapshot
                    if current is None or current.created_ms != before.created_ms:
                        done = await session.execute(
                            delete(SnapshotModelRow)
                            .where(SnapshotModelRow.name == name, SnapshotModelRow.revision == revision)
                            .execution_options(synchronize_session=False)
                        )
                        if not done.rowcount:
                            return None
                        await session.execute(delete(SnapshotVersionRow).where(SnapshotVersionRow.name == name))
                        if current is not None:
                            session.add(self._model_row(current, revision + 1))
                    else:
                        done = await session.execute(
                            update(SnapshotModelRow)
                            .where(SnapshotModelRow.name == name, SnapshotModelRow.revision == revision)
                            .values(
                                revision=revision + 1,
                                updated_ms=current.updated_ms,
                                state=current.model_part(),
                                observed_at=utcnow(),
                            )
                            .execution_options(synchronize_session=False)
                        )
                        if not done.rowcount:
                            return None
                if current is not None:
                    await self._write_versions(
                        session, before if before and before.created_ms == current.created_ms else None, current
                    )
                used: list[int] = [intent] if intent is not None else []
                events: list[NewEvent] = []
                if probe:
                    who = actor
                    if who is None:
                        who, found = await self._intent_actor(session, name)
                        used += found
                    events = diff(before, current, who or MLFLOW_ACTOR, origin_ms)
                if used:
                    await session.execute(delete(ChangeIntentRow).where(ChangeIntentRow.id.in_(used)))
                await self._outbox.append(session, events)
        except IntegrityError:
            return None
        if events:
            self._outbox.appended()
        return len(events)

    @staticmethod
    def _model_row(state: ModelState, revision: int) -> SnapshotModelRow:
        return SnapshotModelRow(
            name=state.name,
            revision=revision,
            created_ms=state.created_ms,
            updated_ms=state.updated_ms,
            state=state.model_part(),
            observed_at=utcnow(),
        )

    @staticmethod
    async def _write_versions(session, before: ModelState | None, current: ModelState) -> None:
        known = before.versions if before is not None else {}
        gone = [v for v in known if v not in current.versions]
        if gone:
            await session.execute(
                delete(SnapshotVersionRow).where(
                    SnapshotVersionRow.name == current.name, SnapshotVersionRow.version.in_(gone)
                )
            )
        for version, state in current.versions.items():
            if version not in known:
                session.add(SnapshotVersionRow(name=current.name, version=version, state=dict(state)))
            elif known[version] != state:
                await session.execute(
                    update(SnapshotVersionRow)
                    .where(SnapshotVersionRow.name == current.name, SnapshotVersionRow.version == version)
                    .values(state=dict(state))
                    .execution_options(synchronize_session=False)
                )

    @staticmethod
    async def _intent_actor(session, name: str) -> tuple[Actor | None, list[int]]:
        row = (
            await session.execute(
                select(ChangeIntentRow).where(ChangeIntentRow.model_name == name).order_by(ChangeIntentRow.id).limit(1)
            )
        ).scalar()
        if row is None:
            return None, []
        return Actor(row.actor_kind, row.actor_name, row.actor_key_id), [row.id]  # type: ignore[arg-type]

    async def _drop_intents(self, ids: list[int]) -> None:
        async with self._database.session() as session, session.begin():
            await session.execute(delete(ChangeIntentRow).where(ChangeIntentRow.id.in_(ids)))

    # Direct changes in MLflow

    def hint(self, name: str) -> None:
        """MLflow said this model changed (its own webhook): observed shortly, in the background."""
        self._hinted.add(name)
        self._hint_wake.set()

    async def _hint_loop(self) -> None:
        while True:
            await self._hint_wake.wait()
            self._hint_wake.clear()
            await asyncio.sleep(HINT_DELAY)
            names, self._hinted = self._hinted, set()
            try:
                _, busy = await self._intents_by_age()
            except Exception:  # the database is away: observing would fail too; the reconciler catches up
                logger.warning("Hints about %d models dropped: the database is not answering", len(names))
                continue
            for name in sorted(names):
                if name in busy:
                    self.hint(name)  # its writer observes it; looked at again after the next delay
                else:
                    await self.observe_safely(name)

    async def _reconcile_loop(self) -> None:
        while True:
            try:
                if await self._lease.acquire():
                    await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:  # the next round tries again; the loop must outlive MLflow or the database failing
                logger.exception("Reconciling the registry with the event log failed")
            await asyncio.sleep(self._reconcile_seconds)

    async def reconcile(self) -> int:
        """Compare all of MLflow's registry with the snapshot, field by field, and record what changed; how many
        events that made. Read in bulk (pages of 1,000 models, then of 1,000 versions), after the snapshot is
        loaded: a state read later is never older than the snapshot it is compared with, and a model observed
        meanwhile by a writer fails the compare-and-set and is observed again on its own."""
        origin_ms = await self._origin()
        snapshots = await self._load_all()
        stale, busy = await self._intents_by_age()
        models = [model async for model in self._mlflow.every_registered_model()]
        versions: dict[str, list] = defaultdict(list)
        async for version in self._mlflow.every_version():
            versions[version.name].append(version)
        made = 0
        baselines: list[ModelState] = []
        for model in models:
            current = ModelState.read(model, versions.get(model.name, []))
            snapshot = snapshots.pop(model.name, None)
            if model.name in busy:
                continue  # a live writer is between its intent and its own observation: the change is its to tell
            before = snapshot[1] if snapshot else None
            if before is None and current.created_ms < origin_ms and model.name not in stale:
                baselines.append(current)  # from before the log: taken in silently, many per transaction
                continue
            if (
                model.name not in stale
                and before is not None
                and before.updated_ms == current.updated_ms
                and not diff(before, current, MLFLOW_ACTOR, origin_ms)
            ):
                continue
            made += await self._settle(model.name, snapshot, current, origin_ms)
        for start in range(0, len(baselines), BASELINE_BATCH):
            await self._take_in(baselines[start : start + BASELINE_BATCH], origin_ms)
        for name, snapshot in snapshots.items():  # deleted in MLflow
            if name not in busy:
                made += await self._settle(name, snapshot, None, origin_ms)
        async with self._database.session() as session, session.begin():
            await session.execute(
                delete(ChangeIntentRow).where(ChangeIntentRow.created_at < utcnow() - FORGOTTEN_INTENT)
            )
        return made

    async def _intents_by_age(self) -> tuple[set[str], set[str]]:
        """Models with an intent left by a writer that died (stale), and models a live writer is changing now
        (fresh intents only): observed by the reconciler, and left to their writer, respectively."""
        async with self._database.session() as session:
            rows = (await session.execute(select(ChangeIntentRow.model_name, ChangeIntentRow.created_at))).all()
        cutoff = utcnow() - STALE_INTENT
        stale = {name for name, created_at in rows if created_at < cutoff}
        return stale, {name for name, _ in rows} - stale

    async def _take_in(self, states: list[ModelState], origin_ms: int) -> None:
        """Snapshots of models the log has never seen and that predate it, in one transaction; should another
        process take one in meanwhile, each is taken in on its own (compare-and-set)."""
        try:
            async with self._database.session() as session, session.begin():
                for state in states:
                    session.add(self._model_row(state, 1))
                    await self._write_versions(session, None, state)
        except IntegrityError:
            for state in states:
                await self._settle(state.name, None, state, origin_ms)

    async def _settle(
        self, name: str, snapshot: tuple[int, ModelState] | None, current: ModelState | None, origin_ms: int
    ) -> int:
        try:
            written = await self._commit(name, snapshot, current, None, None, origin_ms)
            return written if written is not None else await self.observe(name)
        except HokusaiError as exc:
            logger.warning("Model %r not reconciled (%s)", name, exc.detail)
            return 0

    async def _load_all(self) -> dict[str, tuple[int, ModelState]]:
        async with self._database.session() as session:
            rows = (await session.execute(select(SnapshotModelRow))).scalars().all()
            versions: dict[str, dict] = defaultdict(dict)
            for row in (await session.execute(select(SnapshotVersionRow))).scalars():
                versions[row.name][row.version] = row.state
        return {
            row.name: (
                row.revision,
                ModelState.stored(row.name, row.created_ms, row.updated_ms, row.state, versions.get(row.name, {})),
            )
            for row in rows
        }
