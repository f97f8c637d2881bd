"""The API document (src/api/openapi.json) against a real hostd, with
schemathesis generating requests from it.

Two passes, each a pytest test per operation:

- `test_routes`: every operation with generated path ids (unknown ones, so
  404 after validation) and generated bodies, valid and invalid. The router
  validates a body before it looks an id up, so this checks every body rule
  of the document against the server's, and every route's error answers.
  Wrong methods on each path must get 405 with `Allow`.
- `test_live_ids`: the operations under `/v1/sandboxes/{id}` with `{id}`
  (and `{winner}`) replaced by sandboxes made for the case, valid bodies
  only, so the 200/204 answers are checked against their schemas. The PTY
  routes get one shared sandbox with one ended session (`{pty}`), made by
  `_pty_session`, which also checks the create stream itself (schemathesis
  does not create sessions: a login shell's stream never ends by itself).

Checks (what fails a case): the status is one the document lists for the
operation, the content type and (for JSON) the body match that answer's
schema, documented headers are there; valid bodies are not refused with
400; invalid bodies are refused with 400 (never 404: validation comes
first); no 500 anywhere. Not used: `not_a_server_error`, because 501 is a
documented answer (PTY routes on a host without terminals) and a 500 fails
by the last check anyway; the stateful phase (long runs). `ignored_auth`
runs when PODFLARE_API_KEY is set (a host with keys); in dev mode the
server ignores the header by design.

Bounded: few examples per operation, derandomized (the same cases each
run), each read under a timeout, and each case under a deadline (its
sandboxes are deleted then, which ends any stream, and the case fails).
Sandboxes made here are deleted after each case; at the end, every
sandbox that appeared during the module is deleted (so no other client may
create sandboxes on this host meanwhile: scripts/test runs one at a time).

Run: PODFLARE_HOSTD_URL=http://127.0.0.1:7070 pytest -q tests/sdk/test_openapi.py
(set PODFLARE_API_KEY too when the host has PODFLARE_API_KEYS).
"""

import json
import os
import re
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig

URL = os.environ["PODFLARE_HOSTD_URL"]
KEY = os.environ.get("PODFLARE_API_KEY")
HEADERS = {"Authorization": f"Bearer {KEY}"} if KEY else {}
WAIT_S = float(os.environ.get("PODFLARE_TEST_WAIT_S", "600"))
# Every request here is small: an exec of a few generated characters takes
# well under a second, seconds on a loaded host.
REQUEST_S = min(WAIT_S, 60.0)
DOC = Path(__file__).resolve().parents[2] / "src" / "api" / "openapi.json"

CONFORMANCE = [
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    "positive_data_acceptance",
]


def _config(mode, max_examples, checks, operations=()):
    on = {name: {"enabled": True} for name in checks}
    # The router validates a body before any id is looked up: an invalid
    # body is a 400 even for an unknown sandbox, never a 404.
    if "negative_data_rejection" in on:
        on["negative_data_rejection"]["expected-statuses"] = [400, 401, 405, 413]
    auth = {}
    if KEY:
        on["ignored_auth"] = {"enabled": True}
        auth = {"auth": {"openapi": {"bearer": {"bearer": KEY}}}}
    return SchemathesisConfig.from_dict(
        {
            "base-url": URL,
            **auth,
            "request-timeout": REQUEST_S,
            "generation": {
                "mode": mode,
                "max-examples": max_examples,
                "deterministic": True,
                "database": "none",
                # The key (if any) comes from `auth`; generated
                # Authorization values would only test the gate, which
                # `ignored_auth` does.
                "with-security-parameters": False,
            },
            "phases": {"stateful": {"enabled": False}},
            "checks": {"enabled": False, **on},
            "operations": list(operations),
        }
    )


def _templates_served():
    r = httpx.get(URL + "/v1/capacity", headers=HEADERS, timeout=REQUEST_S)
    r.raise_for_status()
    return set(r.json()["templates"])


# A host started with fewer templates than the contract names answers 400
# for the others (documented): valid-data acceptance cannot hold for create.
_create_checks = []
if not {"default", "python-datasci"} <= _templates_served():
    _create_checks = [{"include-name": "POST /v1/sandboxes",
                       "checks": {"positive_data_acceptance": {"enabled": False}}}]

# Only GET /v1/healthz skips the auth gate; another method on that path
# without a key is a 401 before routing (the contract), not a 405.
_healthz_checks = []
if KEY:
    _healthz_checks = [{"include-name": "GET /v1/healthz", "checks": {"unsupported_method": {"enabled": False}}}]

routes = schemathesis.openapi.from_path(
    DOC,
    config=_config(
        "all",
        8,
        CONFORMANCE + ["negative_data_rejection", "unsupported_method", "allow_header_conformance"],
        _create_checks + _healthz_checks,
    ),
)

# Execs cost a guest round trip each (tens to hundreds of ms, seconds on a
# loaded host): fewer of them.
live = schemathesis.openapi.from_path(
    DOC,
    config=_config(
        "positive",
        3,
        CONFORMANCE,
        [{"include-name": "POST /v1/sandboxes/{id}/exec", "generation": {"max-examples": 2}}],
    ),
).exclude(
    func=lambda ctx: not ctx.operation.path.startswith("/v1/sandboxes/{id}")
    or (ctx.operation.method.upper() == "POST" and ctx.operation.path == "/v1/sandboxes/{id}/pty")
)


def _client():
    return httpx.Client(base_url=URL, headers=HEADERS, timeout=REQUEST_S)


def _ids(c):
    r = c.get("/v1/sandboxes")
    r.raise_for_status()
    return {s["id"] for s in r.json()["sandboxes"]}


def _create(c):
    r = c.post("/v1/sandboxes", json={})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def _delete(c, ids):
    for i in ids:
        r = c.delete(f"/v1/sandboxes/{i}")
        assert r.status_code in (204, 404), (i, r.status_code, r.text)


def _made_by(response):
    """Sandbox ids a create or fork answer names."""
    if response.status_code != 200:
        return []
    try:
        body = response.json()
    except ValueError:  # a stream, text, metrics
        return []
    if not isinstance(body, dict):
        return []
    if "children" in body:
        return list(body["children"])
    return [body["id"]] if "id" in body and "state" in body else []


class _Late(Exception):
    pass


@contextmanager
def _deadline(what, ids):
    """Fails the case if it takes over REQUEST_S: first deletes `ids` (their
    streams end), and if the case is still stuck 30 s later, interrupts it."""
    fired = threading.Event()

    def expire():
        fired.set()
        with _client() as c:
            _delete(c, ids)

    def interrupt(*_):
        raise _Late(f"{what}: no complete answer in {REQUEST_S + 30:.0f} s")

    timer = threading.Timer(REQUEST_S, expire)
    old = signal.signal(signal.SIGALRM, interrupt)
    signal.alarm(int(REQUEST_S) + 30)
    timer.start()
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        timer.cancel()
    assert not fired.is_set(), f"{what}: no complete answer in {REQUEST_S:.0f} s (its sandboxes were deleted to end it)"


def _pty_session(c):
    """A sandbox with one ended terminal session: (sandbox id, session id),
    or (sandbox id, None) when the host answers 501 (no terminals). Checks
    the create stream against the document's description."""
    sbx = _create(c)
    with _deadline("POST /v1/sandboxes/{id}/pty", [sbx]):
        with c.stream("POST", f"/v1/sandboxes/{sbx}/pty", json={"shellCmd": "echo openapi"}) as r:
            if r.status_code == 501:
                r.read()
                assert r.json()["error"] == "pty is not implemented yet on this host", r.text
                return sbx, None
            assert r.status_code == 200, r.read()
            assert r.headers["content-type"] == "application/x-ndjson"
            events = [json.loads(line) for line in r.iter_lines() if line.strip()]
    assert events[0]["type"] == "pty_ready" and re.fullmatch(r"pty_[0-9a-f]+", events[0]["session_id"]), events
    assert events[-1]["type"] == "pty_exit" and events[-1]["data"] == 0, events
    assert all(e["type"] == "pty_data" and isinstance(e["seq"], int) for e in events[1:-1]), events
    return sbx, events[0]["session_id"]


@pytest.fixture(scope="module", autouse=True)
def _leave_nothing():
    with _client() as c:
        before = _ids(c)
        yield
        _delete(c, _ids(c) - before)


@pytest.fixture(scope="module")
def http():
    with _client() as c:
        yield c


@pytest.fixture(scope="module")
def pty_session(http):
    return _pty_session(http)


def _check(case, ids):
    what = f"{case.method} {case.formatted_path}"
    with _deadline(what, ids):
        response = case.call_and_validate()
    assert response.status_code != 500, f"{what}: 500 {response.text}"
    return response


@routes.parametrize()
def test_routes(case, http):
    params = case.path_parameters or {}
    if case.method.upper() == "POST" and "winner" in params and params["winner"] == params["id"]:
        # A rule across two path parameters, in the document's prose only.
        response = case.call()
        assert response.status_code == 400, response.text
        assert response.json()["error"].startswith("winner: "), response.text
        return
    response = _check(case, [])
    _delete(http, _made_by(response))


@live.parametrize()
def test_live_ids(case, http, request):
    params = case.path_parameters
    fresh = []
    if case.operation.path.startswith("/v1/sandboxes/{id}/pty"):
        sbx, pty = request.getfixturevalue("pty_session")
        params["id"] = sbx
        if pty is not None and "pty" in params:
            params["pty"] = pty
    else:
        for name in ("id", "winner"):
            if name in params:
                fresh.append(_create(http))
                params[name] = fresh[-1]
    try:
        response = _check(case, fresh)
        fresh += _made_by(response)
    finally:
        _delete(http, fresh)
