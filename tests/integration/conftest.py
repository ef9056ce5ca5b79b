"""Fixtures for object-storage tests: an in-process GCS emulator and a fault-injecting proxy."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.integration.faultproxy import LOOPBACK, FaultProxy

EMULATOR_BUCKET = "test-bucket"
EMULATOR_PROJECT = "test-project"


@dataclass
class Emulator:
    """A running gcp-storage-emulator: `host` is what STORAGE_EMULATOR_HOST holds."""

    host: str
    bucket: str
    server: Any
    clients: list[Any] = field(default_factory=list)

    def client(self) -> Any:
        """A plain anonymous client for test setup/inspection (uses the current STORAGE_EMULATOR_HOST)."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        client = storage.Client(project=EMULATOR_PROJECT, credentials=AnonymousCredentials())
        self.clients.append(client)
        return client

    def close_clients(self) -> None:
        """Close the clients handed out (their pooled connections) at the end of a test."""
        while self.clients:
            self.clients.pop().close()

    @property
    def address(self) -> str:
        """host:port without the scheme."""
        return self.host.removeprefix("http://")


@pytest.fixture(scope="session")
def _emulator_server() -> Iterator[Emulator]:
    """Start gcp-storage-emulator in-process (in-memory, one default bucket) on a free loopback port."""
    from gcp_storage_emulator.server import create_server

    logging.getLogger("gcp_storage_emulator").setLevel(logging.WARNING)
    logging.getLogger("api.object").setLevel(logging.WARNING)
    server = create_server(LOOPBACK, 0, in_memory=True, default_bucket=EMULATOR_BUCKET)
    server.start()
    port = server._api._httpd.server_address[1]  # port 0 → the OS picked one; no public accessor
    try:
        yield Emulator(host=f"http://{LOOPBACK}:{port}", bucket=EMULATOR_BUCKET, server=server)
    finally:
        server.stop()


@pytest.fixture
def gcs_emulator(_emulator_server: Emulator, monkeypatch: pytest.MonkeyPatch) -> Iterator[Emulator]:
    """The emulator with an empty default bucket, and STORAGE_EMULATOR_HOST pointing at it for this test."""
    _emulator_server.server.wipe(keep_buckets=True)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", _emulator_server.host)
    yield _emulator_server
    _emulator_server.close_clients()


@pytest.fixture
def flaky_proxy(
    gcs_emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., FaultProxy]]:
    """Factory: start a FaultProxy in front of the emulator and point STORAGE_EMULATOR_HOST at it."""
    proxies: list[FaultProxy] = []

    def start(*, fail_rate: float = 0.0, reset_rate: float = 0.0, truncate_rate: float = 0.0, seed: int = 0):
        proxy = FaultProxy(
            gcs_emulator.address,
            fail_rate=fail_rate,
            reset_rate=reset_rate,
            truncate_rate=truncate_rate,
            seed=seed,
        ).start()
        proxies.append(proxy)
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.host)
        return proxy

    yield start
    for proxy in proxies:
        proxy.stop()
