"""The official Podflare SDK (podflare==0.0.22), unchanged, against hostd.

Run: PODFLARE_HOSTD_URL=http://127.0.0.1:7070 pytest -q tests/sdk
(set PODFLARE_API_KEY too when the host has PODFLARE_API_KEYS).
"""

import hashlib
import os
import random
import re

import httpx
import pytest
from podflare import Client, Sandbox

from conftest import URL, WAIT_S, close_quietly as _close


def test_healthz(client):
    assert client.healthz()


def test_create_returns_id(sbx):
    assert re.fullmatch(r"sbx_[0-9a-f]{32}", sbx.id)


def test_print_and_state_kept_across_calls(sbx):
    r = sbx.run_code("x = 6\nprint(x * 7)")
    assert (r.stdout, r.stderr, r.exit_code) == ("42", "", 0)
    r = sbx.run_code("x += 1\nprint(x)")
    assert (r.stdout, r.exit_code) == ("7", 0)
    r = sbx.run_code("import os\nos.chdir('/tmp')\nimport json")
    assert r.ok
    r = sbx.run_code("print(os.getcwd(), json.dumps([1]))")
    assert r.stdout == "/tmp [1]"


def test_several_lines_and_a_blank_line(sbx):
    r = sbx.run_code("print('a')\nprint()\nprint('b')\nprint('c', end='')")
    assert r.stdout == "a\n\nb\nc"
    assert r.exit_code == 0


def test_exception_gives_traceback_and_repl_survives(sbx):
    sbx.run_code("keep = 'me'")
    r = sbx.run_code("def f():\n    return 1 / 0\nf()")
    assert r.exit_code != 0
    assert "Traceback (most recent call last):" in r.stderr
    assert "ZeroDivisionError" in r.stderr
    r = sbx.run_code("print(keep)")
    assert (r.stdout, r.exit_code) == ("me", 0)


def test_system_exit_code(sbx):
    assert sbx.run_code("raise SystemExit(3)").exit_code == 3
    assert sbx.run_code("import sys\nsys.exit(0)").exit_code == 0
    assert sbx.run_code("print('still here')").stdout == "still here"


def test_bash(sbx):
    r = sbx.run_code("echo hi; echo there; echo oops >&2; exit 4", language="bash")
    assert (r.stdout, r.stderr, r.exit_code) == ("hi\nthere", "oops", 4)
    # A fresh bash per call: no shell state carries over.
    sbx.run_code("export ONLY_ONCE=1", language="bash")
    assert sbx.run_code('echo "[$ONLY_ONCE]"', language="bash").stdout == "[]"


def test_streaming_events(sbx):
    events = list(sbx.run_code_stream("for i in range(3):\n    print(i)"))
    assert [(e.type, e.data) for e in events] == [("stdout", "0"), ("stdout", "1"), ("stdout", "2"), ("exit", 0)]
    assert [e.seq for e in events] == [0, 1, 2, 3]
    assert all(isinstance(e.ts, int) for e in events)


def test_upload_download_8mb_byte_exact(sbx):
    rng = random.Random(20260418)
    data = rng.randbytes(8 * 1024 * 1024)
    sbx.upload(data, "/root/up/big.bin")
    r = sbx.run_code(
        "import hashlib\nprint(hashlib.sha256(open('/root/up/big.bin','rb').read()).hexdigest())"
    )
    assert r.stdout == hashlib.sha256(data).hexdigest()
    assert sbx.download("/root/up/big.bin") == data


@pytest.mark.skipif(
    os.environ.get("PODFLARE_SDK_SHARED_FS") == "1",
    reason="the local-process harness (tests/api_sdk_local.rs) has one filesystem for all sandboxes",
)
def test_diff_between_two_sandboxes(client):
    a = Sandbox(client=client)
    b = Sandbox(client=client)
    try:
        setup = (
            "import os\nos.makedirs('/root/d', exist_ok=True)\n"
            "open('/root/d/same', 'w').write('same')\n"
            "open('/root/d/mod', 'w').write({!r})\n"
        )
        assert a.run_code(setup.format("one") + "open('/root/d/only_a', 'w').write('a')").ok
        assert b.run_code(setup.format("two") + "open('/root/d/only_b', 'w').write('b')").ok
        d = a.diff(b, paths=["/root/d"])
        assert d == {"added": ["/root/d/only_b"], "removed": ["/root/d/only_a"], "modified": ["/root/d/mod"]}
    finally:
        _close(a)
        _close(b)


def test_replay(sbx):
    sbx.run_code("print('r1')\nprint('r2')")
    sbx.run_code("echo r3", language="bash")
    events = sbx.replay()
    tail = [(e.type, e.data) for e in events[-5:]]
    assert tail == [("stdout", "r1"), ("stdout", "r2"), ("exit", 0), ("stdout", "r3"), ("exit", 0)]
    assert [e.seq for e in events[-5:]] == [0, 1, 2, 0, 1]


def test_close_then_404(client):
    s = Sandbox(client=client)
    sid = s.id
    s.close()
    with pytest.raises(httpx.HTTPStatusError) as e:
        s.run_code("print(1)")
    assert e.value.response.status_code == 404
    with pytest.raises(httpx.HTTPStatusError) as e:
        client.replay(sid)
    assert e.value.response.status_code == 404
    with pytest.raises(httpx.HTTPStatusError) as e:
        client.destroy_sandbox(sid)
    assert e.value.response.status_code == 404


LOCAL_HARNESS = pytest.mark.skipif(
    os.environ.get("PODFLARE_SDK_SHARED_FS") == "1",
    reason="the local-process harness (tests/api_sdk_local.rs) runs processes, not VMs: nothing to fork",
)

STATE = "print(x, open('/root/f').read())"
DRAW = "import os, random, uuid\nprint(os.urandom(8).hex(), random.random(), uuid.uuid4())"


@LOCAL_HARNESS
def test_fork_children_share_the_past_not_the_future(client):
    parent = Sandbox(client=client)
    kids, grand, great = [], [], []
    try:
        assert parent.run_code("x = 1\nopen('/root/f', 'w').write('parent')").ok
        kids = parent.fork(n=5)
        assert len(kids) == 5 and len({k.id for k in kids}) == 5
        for k in kids:
            assert k.run_code(STATE).stdout == "1 parent"
        assert kids[0].run_code("x = 2\nopen('/root/f', 'w').write('child0')").ok
        assert kids[0].run_code(STATE).stdout == "2 child0"
        assert parent.run_code(STATE).stdout == "1 parent"
        for k in kids[1:]:
            assert k.run_code(STATE).stdout == "1 parent"
        assert parent.run_code("x = 3\nopen('/root/f', 'w').write('parent3')").ok
        for k in kids[1:]:
            assert k.run_code(STATE).stdout == "1 parent"

        # Three generations deep.
        assert kids[1].run_code("x = 10").ok
        grand = kids[1].fork(n=2)
        assert grand[0].run_code(STATE).stdout == "10 parent"
        assert grand[0].run_code("x = 20").ok
        great = grand[0].fork()
        assert great[0].run_code(STATE).stdout == "20 parent"
        assert grand[1].run_code(STATE).stdout == "10 parent"

        # Random values differ everywhere.
        draws = [s.run_code(DRAW).stdout.split() for s in [parent, *kids, *grand, *great]]
        for i in range(3):
            assert len({d[i] for d in draws}) == len(draws), draws

        # The winner's state becomes the parent's; its id goes away; the
        # siblings are untouched.
        winner = kids[0]
        parent.merge_into(winner)
        assert parent.run_code(STATE).stdout == "2 child0"
        with pytest.raises(httpx.HTTPStatusError) as e:
            client.replay(winner.id)
        assert e.value.response.status_code == 404
        r = httpx.post(f"{URL}/v1/sandboxes/{winner.id}/exec", json={"code": "print(1)"}, headers=_auth())
        assert r.status_code == 404
        assert kids[1].run_code(STATE).stdout == "10 parent"
        assert parent.run_code("x += 1\nprint(x)").stdout == "3"
    finally:
        for s in [parent, *kids, *grand, *great]:
            _close(s)


def _auth():
    key = os.environ.get("PODFLARE_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


@LOCAL_HARNESS
def test_fork_and_merge_bad_requests(client):
    s = Sandbox(client=client)
    try:
        for n in [0, 33, -1, "x", 1.5, True, [1]]:
            r = httpx.post(f"{URL}/v1/sandboxes/{s.id}/fork", json={"n": n}, headers=_auth())
            assert r.status_code == 400, (n, r.status_code, r.text)
            assert "n" in r.json()["error"], r.text
        r = httpx.post(f"{URL}/v1/sandboxes/{s.id}/fork", content=b"{not json", headers=_auth())
        assert r.status_code == 400, r.text
        missing = "sbx_" + "0" * 32
        r = httpx.post(f"{URL}/v1/sandboxes/{missing}/fork", json={"n": 1}, headers=_auth())
        assert r.status_code == 404 and "error" in r.json(), r.text
        r = httpx.post(f"{URL}/v1/sandboxes/{s.id}/merge_into/{s.id}", headers=_auth())
        assert r.status_code == 400 and "error" in r.json(), r.text
        r = httpx.post(f"{URL}/v1/sandboxes/{s.id}/merge_into/{missing}", headers=_auth())
        assert r.status_code == 404 and "error" in r.json(), r.text
        r = httpx.post(f"{URL}/v1/sandboxes/{missing}/merge_into/{s.id}", headers=_auth())
        assert r.status_code == 404 and "error" in r.json(), r.text
        assert s.run_code("print('still fine')").stdout == "still fine"
    finally:
        _close(s)
