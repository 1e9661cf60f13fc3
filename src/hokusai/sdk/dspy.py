"""DSPyClient and AsyncDSPyClient: programs, execution, batches, execution records and statistics."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from hokusai.sdk.config import resolve
from hokusai.sdk.models import BatchExecution, DSPyHealth, DSPyStats, ExecutionRecord, ExecutionResult, Message, Program
from hokusai.sdk.transport import AsyncTransport, Call, Operations, RetryPolicy, Transport, without_none


def dspy_prefix(base_url: str) -> str:
    """/api/v1/dspy on the service's root; on an `.../api` base URL (the production one) that is `/v1/dspy`."""
    return "/v1/dspy" if base_url.rstrip("/").endswith("/api") else "/api/v1/dspy"


class _DSPyOperations(Operations):
    _prefix: str

    def _program_path(self, program_id: str) -> str:
        return f"{self._prefix}/programs/{quote(program_id, safe='')}"

    def programs(self) -> Any:
        return self._send(Call("GET", f"{self._prefix}/programs", list[Program]))

    def program(self, program_id: str, version: str | None = None) -> Any:
        return self._send(
            Call("GET", self._program_path(program_id), Program, params=without_none({"version": version}))
        )

    def register_program(self, program_id: str, name: str, signature: str, **declaration: Any) -> Any:
        """Declare a program: module ("Predict", "ChainOfThought"), version, description, instructions, demos, lm."""
        body = {"program_id": program_id, "name": name, "signature": signature, **declaration}
        return self._send(Call("POST", f"{self._prefix}/programs", Program, json=body, idempotent=False))

    def update_program(self, program_id: str, version: str, name: str, signature: str, **declaration: Any) -> Any:
        body = {"program_id": program_id, "version": version, "name": name, "signature": signature, **declaration}
        path = f"{self._program_path(program_id)}/versions/{quote(version, safe='')}"
        return self._send(Call("PUT", path, Program, json=body))

    def delete_program(self, program_id: str, version: str | None = None) -> Any:
        params = without_none({"version": version})
        return self._send(Call("DELETE", self._program_path(program_id), Message, params=params, idempotent=False))

    def execute(
        self,
        program_id: str,
        inputs: dict[str, Any],
        mode: str = "normal",
        timeout: float | None = None,
        version: str | None = None,
    ) -> Any:
        """Not retried after a failure (each attempt costs LM calls), only after a 429."""
        body = without_none(
            {"program_id": program_id, "inputs": inputs, "mode": mode, "timeout": timeout, "version": version}
        )
        return self._send(Call("POST", f"{self._prefix}/execute", ExecutionResult, json=body, idempotent=False))

    def execute_batch(
        self,
        program_id: str,
        inputs_list: list[dict[str, Any]],
        mode: str = "normal",
        timeout: float | None = None,
        version: str | None = None,
    ) -> Any:
        body = without_none(
            {"program_id": program_id, "inputs_list": inputs_list, "mode": mode, "timeout": timeout, "version": version}
        )
        return self._send(Call("POST", f"{self._prefix}/execute/batch", BatchExecution, json=body, idempotent=False))

    def execution(self, execution_id: str) -> Any:
        return self._send(Call("GET", f"{self._prefix}/execution/{quote(execution_id, safe='')}", ExecutionRecord))

    def stats(self) -> Any:
        return self._send(Call("GET", f"{self._prefix}/stats", DSPyStats))

    def clear_cache(self) -> Any:
        return self._send(Call("POST", f"{self._prefix}/cache/clear", Message))

    def health(self) -> Any:
        return self._send(Call("GET", f"{self._prefix}/health", DSPyHealth))


class DSPyClient(_DSPyOperations):
    def __init__(
        self, url: str | None = None, api_key: str | None = None, timeout: float = 300.0, max_retries: int = 3
    ) -> None:
        credentials = resolve(url, api_key)
        self.url = credentials.url or ""
        self._prefix = dspy_prefix(self.url)
        self._transport = Transport(self.url, credentials.api_key, timeout, RetryPolicy(max_retries=max_retries))

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> DSPyClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncDSPyClient(_DSPyOperations):
    def __init__(
        self, url: str | None = None, api_key: str | None = None, timeout: float = 300.0, max_retries: int = 3
    ) -> None:
        credentials = resolve(url, api_key)
        self.url = credentials.url or ""
        self._prefix = dspy_prefix(self.url)
        self._transport = AsyncTransport(self.url, credentials.api_key, timeout, RetryPolicy(max_retries=max_retries))

    async def close(self) -> None:
        await self._transport.close()

    async def __aenter__(self) -> AsyncDSPyClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
