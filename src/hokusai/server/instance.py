"""This process's identity among the service's processes: the owner of its background work, the origin of its
cluster messages. Unique per process start, readable in logs (host and pid)."""

from __future__ import annotations

import os
import secrets
import socket

_ids_by_pid: dict[int, str] = {}


def instance_id() -> str:
    # Keyed by pid so that a forked worker gets its own; the random part tells a restarted process (same host,
    # recycled pid) from the one it replaced.
    pid = os.getpid()
    if pid not in _ids_by_pid:
        _ids_by_pid[pid] = f"{socket.gethostname()[:40]}-{pid}-{secrets.token_hex(4)}"
    return _ids_by_pid[pid]
