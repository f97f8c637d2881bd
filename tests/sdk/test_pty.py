"""Terminal sessions through the official SDK (sandbox.pty) and the raw
routes, against a real hostd.

Run: PODFLARE_HOSTD_URL=http://127.0.0.1:7070 pytest -q tests/sdk/test_pty.py
"""

import base64
import json
import os
import threading
import time

import httpx
import pytest
from podflare import Client, Sandbox

from conftest import URL, WAIT_S

KEY = os.environ.get("PODFLARE_API_KEY")
HEADERS = {"Authorization": f"Bearer {KEY}"} if KEY else {}
# A spawn in the emulated guest kernel takes about a second; an echo round
# trip a few guest wake-ups. Waits are generous and bounded.
STEP_S = float(os.environ.get("PODFLARE_PTY_STEP_S", "60"))


class Collector:
    """Output of one session, with a wait for some text in it."""

    def __init__(self):
        self.buf = b""
        self.cond = threading.Condition()

    def __call__(self, b):
        with self.cond:
            self.buf += b
            self.cond.notify_all()

    def wait_for(self, text, timeout=STEP_S):
        deadline = time.time() + timeout
        with self.cond:
            while text.encode() not in self.buf:
                left = deadline - time.time()
                assert left > 0, f"{text!r} not seen in {timeout} s; got {self.buf[-500:]!r}"
                self.cond.wait(left)


def raw(method, path, **kw):
    return httpx.request(method, URL + path, headers=HEADERS, timeout=WAIT_S, **kw)


def test_bash_echo_resize_list_attach_and_kill(sbx):
    out = Collector()
    exits = []
    pty = sbx.pty.create(cmd="bash", cols=80, rows=24, on_data=out, on_exit=exits.append)
    assert pty.id.startswith("pty_")
    pty.send_input("echo $((6*7))\n")
    out.wait_for("42")
    pty.resize(cols=120, rows=40)
    pty.send_input("stty size\n")
    out.wait_for("40 120")
    pty.send_input("echo TERM=$TERM; tty\n")
    out.wait_for("TERM=xterm-256color")
    out.wait_for("/dev/pts/")
    # A second client attaching later gets the earlier output replayed.
    again = Collector()
    sbx.pty.attach(pty.id, on_data=again)
    again.wait_for("42")
    again.wait_for("40 120")
    # A second session, killed while it sleeps.
    other = sbx.pty.create(cmd=["sleep", "1000"])
    other.kill()
    assert other.wait(timeout=STEP_S) == 137
    pty.send_input("exit 3\n")
    assert pty.wait(timeout=STEP_S) == 3
    assert exits == [3]
    listed = {p.pty_id: p for p in sbx.pty.list()}
    assert listed[pty.id].exit_code == 3 and listed[other.id].exit_code == 137
    assert listed[pty.id].cmd_label == "bash" and listed[other.id].cmd_label == "sleep 1000"
    assert listed[pty.id].created_at_ms <= listed[other.id].created_at_ms


def test_raw_mode_program_echoes_keystrokes(sbx):
    out = Collector()
    prog = (
        "import sys, termios, tty\n"
        "tty.setraw(0)\n"
        "sys.stdout.write('READY\\r\\n'); sys.stdout.flush()\n"
        "while True:\n"
        "    c = sys.stdin.read(1)\n"
        "    if c == 'q': break\n"
        "    sys.stdout.write('<' + c + '>'); sys.stdout.flush()\n"
    )
    pty = sbx.pty.create(cmd=["python3", "-c", prog], on_data=out)
    out.wait_for("READY")
    pty.send_input(b"a")
    out.wait_for("<a>")
    pty.send_input(b"\x03")  # raw mode: Ctrl-C is a byte, not SIGINT
    out.wait_for("<\x03>")
    pty.send_input(b"q")
    assert pty.wait(timeout=STEP_S) == 0


def test_read_long_polls(sbx):
    pty = sbx.pty.create(cmd="bash", on_data=None)
    c = sbx._client
    pty.send_input("echo polled-$((2+3))\n")
    # Data exists (or comes): read returns as soon as there is some.
    seen, seq, deadline = b"", 0, time.time() + STEP_S
    while b"polled-5" not in seen and time.time() < deadline:
        r = c.pty_read(sbx.id, pty.id, since_seq=seq, timeout_ms=5000)
        seen += base64.b64decode(r["data_b64"])
        seq = r["next_seq"]
        assert r["exited"] is False
    assert b"polled-5" in seen
    # The shell's prompt comes after the output: read until it is quiet.
    for _ in range(20):
        r = c.pty_read(sbx.id, pty.id, since_seq=seq, timeout_ms=3000)
        if r["data_b64"] == "":
            break
        seq = r["next_seq"]
    # Nothing new: it waits about timeout_ms, then answers empty.
    t = time.time()
    r = c.pty_read(sbx.id, pty.id, since_seq=seq, timeout_ms=1500)
    took = time.time() - t
    assert r["data_b64"] == "" and r["next_seq"] == seq, r
    assert 1.2 <= took < 10, took
    pty.kill()
    assert pty.wait(timeout=STEP_S) == 137
    r = c.pty_read(sbx.id, pty.id, since_seq=seq, timeout_ms=5000)
    assert r["exited"] is True and r["exit_code"] == 137


def test_unknown_ids_and_bad_input(sbx):
    assert raw("GET", "/v1/sandboxes/sbx_" + "0" * 32 + "/pty").status_code == 404
    assert raw("POST", f"/v1/sandboxes/{sbx.id}/pty/pty_nope/input", json={"data_b64": "aGk="}).status_code == 404
    assert raw("POST", f"/v1/sandboxes/{sbx.id}/pty/pty_nope/kill").status_code == 404
    assert raw("GET", f"/v1/sandboxes/{sbx.id}/pty/pty_nope/attach").status_code == 404
    pty = sbx.pty.create(cmd="bash")
    r = raw("POST", f"/v1/sandboxes/{sbx.id}/pty/{pty.id}/input", json={"data_b64": "!!not base64"})
    assert r.status_code == 400 and "data_b64" in r.json()["error"]
    pty.kill()
    pty.wait(timeout=STEP_S)


def test_spawn_failure_is_pty_error(sbx):
    with pytest.raises(RuntimeError, match="spawn failed"):
        sbx.pty.create(cmd=["/no/such/program"])


def test_a_stalled_client_does_not_block_the_others(sbx):
    """3 sessions, 2 clients each; one client of the first session stops
    reading. Every other client keeps getting the sessions' output."""
    # ~300 KB per session from one process (a spawn per line would take
    # minutes in the emulated guest kernel); more than the stalled
    # connection's socket buffers hold.
    flood = "python3 -c \"import sys\nfor i in range(100): sys.stdout.write('x' * 3000 + ' line %d\\n' % i)\nprint('DO' + 'NE')\""
    sessions = []
    for _ in range(3):
        out = Collector()
        p = sbx.pty.create(cmd="bash", on_data=out)
        second = Collector()
        sbx.pty.attach(p.id, on_data=second)
        sessions.append((p, out, second))
    # The stalled client: a raw attach stream whose body is never read.
    stalled = httpx.Client(headers=HEADERS, timeout=WAIT_S)
    req = stalled.build_request("GET", f"{URL}/v1/sandboxes/{sbx.id}/pty/{sessions[0][0].id}/attach")
    resp = stalled.send(req, stream=True)
    assert resp.status_code == 200
    try:
        for p, _, _ in sessions:
            p.send_input(flood + "\n")
        for p, out, second in sessions:
            out.wait_for("DONE", timeout=STEP_S * 4)
            second.wait_for("DONE", timeout=STEP_S * 4)
            p.send_input("exit\n")
            assert p.wait(timeout=STEP_S) == 0
    finally:
        resp.close()
        stalled.close()


def test_running_sessions_carry_into_fork_children(sbx):
    out = Collector()
    pty = sbx.pty.create(cmd="bash", on_data=out)
    pty.send_input("echo before-$((40+2))\n")
    out.wait_for("before-42")
    (child,) = sbx.fork(n=1)
    try:
        listed = {p.pty_id: p for p in child.pty.list()}
        assert pty.id in listed and listed[pty.id].exit_code is None, listed
        seen = Collector()
        child.pty.attach(pty.id, on_data=seen)
        seen.wait_for("before-42")  # the parent's output so far, replayed
        child._client.pty_input(child.id, pty.id, b"echo in-child-$((1+1))\n")
        seen.wait_for("in-child-2")
        pty.send_input("echo in-parent-$((2+1))\n")
        out.wait_for("in-parent-3")
        assert b"in-child" not in out.buf, "the child's input stayed in the child"
        child._client.pty_kill(child.id, pty.id)
        assert {p.pty_id: p for p in child.pty.list()}[pty.id].exit_code in (137, None)
    finally:
        child.close()
    # The parent's session is untouched by the child's kill.
    pty.send_input("exit 4\n")
    assert pty.wait(timeout=STEP_S) == 4
