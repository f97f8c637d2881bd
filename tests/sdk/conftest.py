"""Fixtures the SDK test modules share: one SDK client per module on
PODFLARE_HOSTD_URL, and a fresh sandbox per test, deleted after it.
"""

import os
import time

import httpx
import pytest
from podflare import Client, Sandbox

URL = os.environ["PODFLARE_HOSTD_URL"]

# The SDK reads with a 30 s timeout by default; on a host that emulates the
# guest kernel an 8 MB upload (one exec that prints nothing until it is
# done) can take longer, and the SDK would time out and retry it. Waits here
# are generous and settable.
WAIT_S = float(os.environ.get("PODFLARE_TEST_WAIT_S", "600"))


def close_quietly(s):
    """Deletes a sandbox; one that is already gone (404) is fine."""
    try:
        s.close()
    except httpx.HTTPStatusError as e:
        if e.response.status_code != 404:
            raise


def create_sized(client, **kw):
    """A sandbox with `ram_mib`: hostd answers 503 while that size's
    template is built on first use (minutes on an emulated-kernel host), so
    this retries, bounded by WAIT_S."""
    deadline = time.time() + WAIT_S
    while True:
        try:
            return Sandbox(client=client, **kw)
        except httpx.HTTPStatusError as e:
            if e.response.status_code != 503 or time.time() > deadline:
                raise
            assert "being built" in e.response.json()["error"], e.response.text
            time.sleep(5)


@pytest.fixture(scope="module")
def client():
    c = Client(host=URL, timeout=WAIT_S)
    yield c
    c.close()


@pytest.fixture
def sbx(client):
    s = Sandbox(client=client)
    yield s
    close_quietly(s)
