"""A throwaway PostgreSQL server for the tests (Debian's postgresql package; no system service needed)."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager


def binaries() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


@contextmanager
def temporary_server() -> Iterator[str]:
    """Start a server on 127.0.0.1; yields an admin URL (without a database name)."""
    bindir = binaries()
    if bindir is None:
        raise FileNotFoundError("initdb")
    root = tempfile.mkdtemp(prefix="ting-pg-")
    data, sockets = os.path.join(root, "data"), os.path.join(root, "sock")
    os.makedirs(sockets)
    as_postgres: dict[str, str] = {}
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        as_postgres = {"user": "postgres", "group": "postgres"}
        shutil.chown(root, "postgres", "postgres")
        shutil.chown(sockets, "postgres", "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = dict(check=True, capture_output=True, cwd=root, **as_postgres)
    subprocess.run([f"{bindir}/initdb", "-D", data, "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"], **run)
    options = f"-p {port} -h 127.0.0.1 -k {sockets} -c fsync=off -c max_connections=300"
    subprocess.run(
        [f"{bindir}/pg_ctl", "-D", data, "-o", options, "-l", os.path.join(root, "log"), "-w", "-t", "60", "start"],
        **run,
    )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run(
            [f"{bindir}/pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True, cwd=root, **as_postgres
        )
        shutil.rmtree(root, ignore_errors=True)


async def create_database(admin_url: str) -> str:
    import asyncpg

    name = "t_" + uuid.uuid4().hex[:12]
    conn = await asyncpg.connect(admin_url + "/postgres")
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    return f"{admin_url}/{name}"
