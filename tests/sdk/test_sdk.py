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

URL = os.environ["PODFLARE_HOSTD_URL"]


@pytest.fixture(scope="module")
def client():
    c = Client(host=URL)
    yield c
    c.close()


def _close(s):
    try:
        s.close()
    except httpx.HTTPStatusError as e:
        if e.response.status_code != 404:
            raise


@pytest.fixture
def sbx(client):
    s = Sandbox(client=client)
    yield s
    _close(s)


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
