"""MlflowApi: one MLflow REST call through the upstream client, its errors turned into ours."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any

from hokusai.server.errors import Conflict, InvalidRequest, NotFound
from hokusai.server.mlflow.upstream import MlflowUpstream, UpstreamFailed

logger = logging.getLogger(__name__)
API = "/api/2.0/mlflow"

# MLflow answers a database error it did not expect with the driver's text: `(sqlite3.IntegrityError) UNIQUE
# constraint failed ... [SQL: INSERT ...]` (as BAD_REQUEST, 400) when two writes race, for instance two requests
# setting the same alias. Such text names tables and statements: it is never relayed to a caller.
DATABASE_ERROR = re.compile(r"\[SQL: |\((?:sqlite3|psycopg2?|pymysql|MySQLdb|pyodbc)\.|IntegrityError|OperationalError")
CONFLICT_RETRIES = 3  # a write that lost a race was rolled back whole by MLflow: trying it again is safe


class ConcurrentChange(Conflict):
    def __init__(self) -> None:
        super().__init__("The change conflicted with a concurrent change to the same model; retry it")


class MlflowApi:
    def __init__(self, upstream: MlflowUpstream) -> None:
        self.upstream = upstream

    async def __call__(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        json: Any = None,
        not_found: NotFound | None = None,
        tolerated: frozenset[str] = frozenset(),
    ) -> dict[str, Any]:
        """`path` under /api/2.0/mlflow; `tolerated` MLflow error codes count as success (their body is returned).

        A 404 raises `not_found` when given, any other 4xx an InvalidRequest with MLflow's message, a 5xx
        UpstreamFailed (502). A write that lost a database race inside MLflow is tried again a few times, then
        answered 409; MLflow's database text never reaches the caller.
        """
        for attempt in range(CONFLICT_RETRIES + 1):
            response = await self.upstream.request(method, API + path, params=params, json=json)
            body = _error_body(response.body)
            if response.status_code < 400:
                return body
            if body.get("error_code") in tolerated:
                return body
            message = str(body.get("message", ""))
            if response.status_code == 404 and not_found is not None:
                raise not_found
            if not DATABASE_ERROR.search(message):
                break
            logger.warning("MLflow %s %s hit a database error (attempt %d)", method, path, attempt + 1)
            if response.status_code >= 500:
                raise UpstreamFailed(response.status_code, "database error")
            if attempt < CONFLICT_RETRIES:
                await asyncio.sleep(0.05 * (attempt + 1))
        else:
            raise ConcurrentChange()
        if response.status_code < 500:
            raise InvalidRequest(message or f"MLflow refused the request ({response.status_code})")
        raise UpstreamFailed(response.status_code, message)


def _error_body(raw: bytes) -> dict[str, Any]:
    """MLflow's JSON body; an empty or non-JSON one (an HTML 500 page) as {} rather than a parse error."""
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
