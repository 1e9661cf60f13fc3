"""A service run as a non-root user (the container's case) cannot give its model workers another uid, so it marks
itself not dumpable: a process of the same user (model code) can then no longer read its environment (database URL,
keys) through /proc, nor attach to it."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.geteuid() != 0, reason="needs Linux and root to act as another user"
)

SERVICE = textwrap.dedent(
    """
    import ctypes, os, sys, time
    from hokusai.server.models.pool import PR_SET_DUMPABLE, refuse_inspection_by_same_user  # the venv is root's
    os.setgid({gid}); os.setuid({uid})
    if sys.argv[1] == "protected":
        assert refuse_inspection_by_same_user()
    else:  # as a process started by that user would be (the uid change above cleared it)
        assert ctypes.CDLL(None).prctl(PR_SET_DUMPABLE, 1, 0, 0, 0) == 0
    print(os.getpid(), flush=True)
    time.sleep(60)
    """
)
PEEK = textwrap.dedent(
    """
    import os, sys
    os.setgid({gid}); os.setuid({uid})
    try:
        with open(f"/proc/{{sys.argv[1]}}/environ", "rb") as environ:
            print("read" if b"HOKUSAI_SECRET_FOR_TEST" in environ.read() else "not there")
    except PermissionError:
        print("refused")
    """
)


@pytest.mark.parametrize(("mode", "expected"), [("protected", "refused"), ("plain", "read")])
def test_a_process_of_the_same_user_cannot_read_the_services_environment(mode: str, expected: str):
    nobody = pwd.getpwnam("nobody")
    ids = {"uid": nobody.pw_uid, "gid": nobody.pw_gid}
    env = {**os.environ, "HOKUSAI_SECRET_FOR_TEST": "s3cret"}
    service = subprocess.Popen(
        [sys.executable, "-c", SERVICE.format(**ids), mode], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        pid = service.stdout.readline().strip()
        peek = subprocess.run(
            [sys.executable, "-c", PEEK.format(**ids), pid], capture_output=True, text=True, timeout=60, check=True
        )
        assert peek.stdout.strip() == expected  # "plain": the same check reads it without the protection
    finally:
        service.kill()
        service.wait()
