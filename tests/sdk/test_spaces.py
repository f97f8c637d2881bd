"""Spaces through the official SDK: a persistent sandbox frozen at its idle
timeout, resumed as a new sandbox with its state intact, frozen and resumed
again, deleted.

Run: PODFLARE_HOSTD_URL=http://127.0.0.1:7070 pytest -q tests/sdk/test_spaces.py
"""

import os
import time

import httpx
import pytest
from podflare import Sandbox

from conftest import URL, WAIT_S, close_quietly, create_sized

KEY = os.environ.get("PODFLARE_API_KEY")
HEADERS = {"Authorization": f"Bearer {KEY}"} if KEY else {}
# The reaper looks every 250 ms; a freeze of a small guest takes tens of
# milliseconds. Bounded, generous.
FREEZE_WAIT_S = float(os.environ.get("PODFLARE_FREEZE_WAIT_S", "60"))


def spaces():
    r = httpx.get(URL + "/v1/capacity", headers=HEADERS, timeout=WAIT_S)
    r.raise_for_status()
    return r.json()["spaces"]


def wait_frozen(sandbox_id):
    """The space frozen from `sandbox_id`, once it is listed."""
    deadline = time.time() + FREEZE_WAIT_S
    while time.time() < deadline:
        for s in spaces():
            if s["source_sandbox"] == sandbox_id:
                return s
        time.sleep(0.25)
    pytest.fail(f"no space from {sandbox_id} within {FREEZE_WAIT_S} s: {spaces()}")


def out(sbx, code, language="python"):
    r = sbx.run_code(code, language=language)
    assert r.exit_code == 0, (r.stdout, r.stderr)
    return r.stdout.strip()


def test_idle_freeze_then_resume_keeps_variables_files_processes_and_cwd(client):
    s = Sandbox(client=client, persistent=True, idle_timeout_seconds=2)
    out(s, "x = 6 * 7\nimport os, random\nos.makedirs('/work', exist_ok=True)\nos.chdir('/work')\nopen('note.txt', 'w').write('kept')\nsaved = random.getstate()")
    out(s, "nohup sleep 1000 >/dev/null 2>&1 &\necho $! > /work/sleep.pid", language="bash")
    space = wait_frozen(s.id)
    assert space["template"] == "default" and space["bytes_on_disk"] > 0
    # The frozen sandbox is gone.
    with pytest.raises(httpx.HTTPStatusError) as e:
        s.run_code("print(1)")
    assert e.value.response.status_code == 404
    r = Sandbox.resume(space["id"], client=client)
    try:
        assert r.id != s.id and r.id.startswith("sbx_")
        assert out(r, "import os\nprint(x, os.getcwd(), open('note.txt').read())") == "42 /work kept"
        pid = out(r, "cat /work/sleep.pid", language="bash")
        assert out(r, f"ps -o comm= -p {pid}", language="bash") == "sleep"
        # A resumed sandbox forks like any other (its pages come from the
        # space's file), and the child keeps them when the parent moves on.
        kid = r.fork(n=1)[0]
        try:
            out(r, "x = 'parent moved on'")
            assert out(kid, "print(x, open('note.txt').read())") == "42 kept"
        finally:
            close_quietly(kid)
        # Fresh entropy: `random` was reseeded, it does not go on from the
        # state it had when frozen.
        assert out(r, "a = random.random()\nrandom.setstate(saved)\nprint(a != random.random())") == "True"
        # The clock is the host's now, not the freeze's.
        assert abs(float(out(r, "import time\nprint(time.time())")) - time.time()) < 30
        # Consumed: gone from the listing, a second resume is 404.
        assert all(x["id"] != space["id"] for x in spaces())
        with pytest.raises(httpx.HTTPStatusError) as e:
            Sandbox.resume(space["id"], client=client)
        assert e.value.response.status_code == 404
    finally:
        close_quietly(r)


def test_freeze_resume_twice_keeps_the_data(client):
    s = Sandbox(client=client, persistent=True, idle_timeout_seconds=2)
    digest = out(s, "import random, hashlib\ndata = random.randbytes(1 << 20)\nopen('/tmp/blob', 'wb').write(data)\nprint(hashlib.sha256(data).hexdigest())")
    source = s.id
    for round_ in range(2):
        space = wait_frozen(source)
        s = Sandbox.resume(space["id"], client=client, persistent=True, idle_timeout_seconds=2)
        check = "import hashlib\nprint(hashlib.sha256(open('/tmp/blob', 'rb').read()).hexdigest(), hashlib.sha256(data).hexdigest())"
        assert out(s, check) == f"{digest} {digest}", f"round {round_}"
        source = s.id
    # The last resume was persistent too: it freezes again; delete that space.
    space = wait_frozen(source)
    client.delete_space(space["id"])
    assert all(x["id"] != space["id"] for x in spaces())
    with pytest.raises(httpx.HTTPStatusError) as e:
        Sandbox.resume(space["id"], client=client)
    assert e.value.response.status_code == 404


def test_unknown_space_is_404(client):
    for call in (lambda: Sandbox.resume("spc_nope", client=client), lambda: client.delete_space("spc_nope")):
        with pytest.raises(httpx.HTTPStatusError) as e:
            call()
        assert e.value.response.status_code == 404
        assert "spc_nope" in e.value.response.json()["error"]


def test_a_terminal_session_carries_through_freeze_and_resume(client):
    # Long enough for the shell to start and answer before the freeze.
    s = Sandbox(client=client, persistent=True, idle_timeout_seconds=15)
    seen = []
    pty = s.pty.create(cmd="bash", on_data=lambda b: seen.append(b))
    pty.send_input("echo before-$((6*7))\n")
    deadline = time.time() + FREEZE_WAIT_S
    while b"before-42" not in b"".join(seen) and time.time() < deadline:
        time.sleep(0.1)
    assert b"before-42" in b"".join(seen)
    space = wait_frozen(s.id)
    r = Sandbox.resume(space["id"], client=client)
    try:
        sessions = r.pty.list()
        assert [p.pty_id for p in sessions] == [pty.id], sessions
        raw = lambda m, p, **kw: httpx.request(m, URL + f"/v1/sandboxes/{r.id}/pty/{pty.id}" + p, headers=HEADERS, timeout=WAIT_S, **kw)
        import base64
        assert raw("POST", "/input", json={"data_b64": base64.b64encode(b"echo after-$((7*7))\n").decode()}).status_code < 300
        got, since = b"", 0
        deadline = time.time() + FREEZE_WAIT_S
        while b"after-49" not in got and time.time() < deadline:
            body = raw("POST", "/read", json={"since_seq": since, "timeout_ms": 2000}).json()
            got += base64.b64decode(body["data_b64"])
            since = body["next_seq"]
        assert b"after-49" in got, got[-300:]
    finally:
        close_quietly(r)


def test_a_space_keeps_its_ram_size(client):
    s = create_sized(client, ram_mib=1024, persistent=True, idle_timeout_seconds=2)
    out(s, "x = int(open('/proc/meminfo').read().split()[1]) // 1024")
    space = wait_frozen(s.id)
    r = Sandbox.resume(space["id"], client=client)
    try:
        assert out(r, "print(x == int(open('/proc/meminfo').read().split()[1]) // 1024, x > 960)") == "True True"
    finally:
        close_quietly(r)
