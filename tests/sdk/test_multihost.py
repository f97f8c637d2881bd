"""Three hostd behind nginx, driven by the official SDK (podflare==0.0.22).

Starts three hostd (target/release/podflare-hostd) on free loopback ports,
each with its own PODFLARE_REGION (host-a/b/c) and PODFLARE_PUBLIC_URL, auth
on (PODFLARE_API_KEYS), template `default` only, no warm pool; then nginx
(/usr/sbin/nginx, installed by scripts/setup) in the foreground with a
config written to a temporary directory that includes the shipped snippet
scripts/deploy/nginx-podflare.conf. Only the snippet's site-specific lines
are rewritten for the test: its three upstream addresses, its `listen` and
its access-log path; every routing line is used as shipped.

Checks: creates through nginx land on all three hosts and answer `region`
and `endpoint`; the SDK then talks to the host directly (nginx's access log
shows no exec, fork or delete); fork children run on their parent's host;
each host's GET /v1/capacity counts only its own sandboxes; a client that
does not follow `endpoint` still works through nginx (each call is offered
to the hosts until one knows the id); the bearer key passes through nginx.

Run: scripts/test (with the rest of tests/sdk), or alone:
  /var/lib/podflare/venv/bin/pytest -q tests/sdk/test_multihost.py
Every process started here is stopped at the end, also when a test fails.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import podflare.sandbox as sdk_sandbox
from podflare import Client, Sandbox

pytestmark = pytest.mark.skipif(
    os.environ.get("PODFLARE_SDK_SHARED_FS") == "1",
    reason="the local-process harness (tests/api_sdk_local.rs) has no VMs: this test starts real hostd binaries",
)

REPO = Path(__file__).resolve().parents[2]
HOSTD = REPO / "target" / "release" / "podflare-hostd"
SNIPPET = REPO / "scripts" / "deploy" / "nginx-podflare.conf"
NGINX = "/usr/sbin/nginx"
KEY = "multihost-test-key"
REGIONS = ("host-a", "host-b", "host-c")
# hostd's start-up restores the cached `default` snapshot (seconds); building
# it from scratch (a cold boot) takes minutes on an emulated guest kernel.
START_WAIT_S = float(os.environ.get("PODFLARE_TEST_HOSTD_WAIT_SECS", "900"))
WAIT_S = float(os.environ.get("PODFLARE_TEST_WAIT_S", "600"))


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path, n=40):
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError as e:
        return f"({path}: {e})"


def _stop(proc, wait_s=20.0):
    """Stops a process this module started, with its process group (nginx's
    worker): SIGTERM (hostd ends its streams and exits within 15 s; nginx
    stops at once), then SIGKILL if it is still there."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, wait_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)  # its own group: started with a new session
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            pass


def _wait_healthz(url, proc, log, what):
    deadline = time.monotonic() + START_WAIT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited ({proc.returncode}) during start-up:\n{_tail(log)}")
        try:
            r = httpx.get(f"{url}/v1/healthz", timeout=2.0)
            if r.status_code == 200 and r.text.strip() == "ok":
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not healthy within {START_WAIT_S:.0f} s:\n{_tail(log)}")
        time.sleep(0.2)


def _site_config(hosts, port, access_log):
    """The shipped snippet with its site-specific lines pointed at this test."""
    text = SNIPPET.read_text()
    server_re = re.compile(r"^([ \t]*server[ \t]+)([^\s;{]+)([^;{\n]*;)", re.M)
    shipped = server_re.findall(text)
    assert len(shipped) == len(hosts), f"expected {len(hosts)} upstream servers in {SNIPPET}, found {shipped}"
    it = iter(hosts)
    text = server_re.sub(lambda m: m.group(1) + next(it) + m.group(3), text)
    text, n = re.subn(r"^([ \t]*)listen[ \t]+[^;]+;", rf"\g<1>listen 127.0.0.1:{port};", text, flags=re.M)
    assert n == 1, f"expected one listen line in {SNIPPET}"
    text, n = re.subn(r"^([ \t]*)access_log[ \t]+\S+", rf"\g<1>access_log {access_log}", text, flags=re.M)
    assert n == 1, f"expected one access_log line in {SNIPPET}"
    return text


def _main_config(tmp, site):
    # Everything nginx writes goes to the temporary directory, so no system
    # directory is needed. As root, nginx would switch its worker to
    # `nobody`; the worker stays this user so it can use those directories.
    user = "user root root;\n" if os.geteuid() == 0 else ""
    temp = "\n".join(
        f"    {d}_temp_path {tmp}/{d}_temp;" for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""{user}daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log info;
events {{ worker_connections 256; }}
http {{
{temp}
    include {site};
}}
"""


class Cluster:
    def __init__(self, tmp):
        self.tmp = tmp
        self.procs = []
        self.hosts = {}  # region -> direct URL
        self.lb = None
        self.access_log = tmp / "nginx-access.log"

    def start(self):
        for region in REGIONS:
            port = _free_port()
            url = f"http://127.0.0.1:{port}"
            log = self.tmp / f"hostd-{region}.log"
            env = {k: v for k, v in os.environ.items() if not k.startswith("PODFLARE_")}
            if "PODFLARE_CACHE" in os.environ:
                env["PODFLARE_CACHE"] = os.environ["PODFLARE_CACHE"]
            env.update(
                PODFLARE_HOSTD_ADDR=f"127.0.0.1:{port}",
                PODFLARE_REGION=region,
                PODFLARE_PUBLIC_URL=url,
                PODFLARE_API_KEYS=KEY,
                PODFLARE_TEMPLATES="default",
                PODFLARE_POOL_SIZE="0",
            )
            with open(log, "wb") as out:
                p = subprocess.Popen([str(HOSTD)], env=env, stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
            self.procs.append(p)
            self.hosts[region] = url
        for (region, url), p in zip(self.hosts.items(), self.procs):
            _wait_healthz(url, p, self.tmp / f"hostd-{region}.log", f"hostd {region}")

        port = _free_port()
        site = self.tmp / "podflare.conf"
        site.write_text(_site_config([u.removeprefix("http://") for u in self.hosts.values()], port,
                                     self.access_log))
        conf = self.tmp / "nginx.conf"
        conf.write_text(_main_config(self.tmp, site))
        errlog = self.tmp / "nginx-error.log"
        with open(self.tmp / "nginx-stderr.log", "wb") as out:
            p = subprocess.Popen([NGINX, "-p", f"{self.tmp}/", "-e", str(errlog), "-c", str(conf)],
                                 stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        self.procs.append(p)
        self.lb = f"http://127.0.0.1:{port}"
        _wait_healthz(self.lb, p, self.tmp / "nginx-stderr.log", "nginx")

    def stop(self):
        for p in reversed(self.procs):
            _stop(p)

    def live(self):
        """GET /v1/capacity of each host, straight to the host: region -> live."""
        out = {}
        for region, url in self.hosts.items():
            r = httpx.get(f"{url}/v1/capacity", headers=AUTH, timeout=10.0)
            r.raise_for_status()
            out[region] = r.json()["sandboxes"]["live"]
        return out

    def lb_lines(self):
        """nginx's access-log lines so far."""
        try:
            return self.access_log.read_text().splitlines()
        except FileNotFoundError:
            return []

    def lb_lines_after(self, before, n):
        """The access-log lines after the first `before`, once there are `n`
        of them (nginx logs a request just after its answer is sent) or 5 s
        have passed."""
        deadline = time.monotonic() + 5.0
        while True:
            lines = self.lb_lines()[before:]
            if len(lines) >= n or time.monotonic() > deadline:
                return lines
            time.sleep(0.05)

    def region_of(self, url):
        return next((r for r, u in self.hosts.items() if u == url.rstrip("/")), url)


AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def cluster():
    for path, fix in ((HOSTD, "cargo build --release --locked --bin podflare-hostd"),
                      (Path(NGINX), "scripts/setup (installs Debian's nginx)")):
        if not path.exists():
            pytest.fail(f"{path} is missing: run {fix}")
    tmp = Path(tempfile.mkdtemp(prefix="podflare-multihost-"))
    c = Cluster(tmp)
    # Sandbox(host=...) follows `endpoint` with a client of its own, which
    # takes its key from PODFLARE_API_KEY (an explicit api_key= would keep
    # the balancer's client instead).
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PODFLARE_API_KEY", KEY)
        try:
            c.start()
            yield c
        finally:
            # The SDK keeps one shared client per URL: close this module's.
            for url in [*c.hosts.values(), c.lb]:
                client = sdk_sandbox._default_clients.pop(url, None)
                if client is not None:
                    client.close()
            c.stop()
            failed = any(p.returncode not in (0, -signal.SIGTERM) for p in c.procs)
            if failed:
                print(f"a process did not stop cleanly; logs kept in {tmp}")
            else:
                shutil.rmtree(tmp, ignore_errors=True)


def _close_all(sandboxes):
    """Deletes each sandbox once (the list is emptied as it goes)."""
    while sandboxes:
        s = sandboxes.pop()
        try:
            s.close()
        except httpx.HTTPStatusError as e:
            if e.response.status_code != 404:
                raise


LOG_LINE = re.compile(r'"(?P<request>[^"]*)" (?P<status>\d{3}) ')


def _requests(lines):
    """(request line, status) of each access-log line."""
    return [(m["request"], int(m["status"])) for m in map(LOG_LINE.search, lines) if m]


def test_balancer_routes_and_auth(cluster):
    lb = cluster.lb
    r = httpx.get(f"{lb}/v1/healthz", timeout=10.0)
    assert (r.status_code, r.text.strip()) == (200, "ok")

    # The key reaches the host: without it the host refuses, with it creates.
    r = httpx.post(f"{lb}/v1/sandboxes", json={}, timeout=WAIT_S)
    assert r.status_code == 401, r.text
    assert "Authorization" in r.json()["error"]
    r = httpx.post(f"{lb}/v1/sandboxes", json={}, headers={"Authorization": "Bearer wrong"}, timeout=WAIT_S)
    assert (r.status_code, r.json()) == (401, {"error": "invalid api key"})
    r = httpx.post(f"{lb}/v1/sandboxes", json={}, headers=AUTH, timeout=WAIT_S)
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["region"] in REGIONS
    assert info["endpoint"] == cluster.hosts[info["region"]]
    assert httpx.delete(f"{info['endpoint']}/v1/sandboxes/{info['id']}", headers=AUTH,
                        timeout=WAIT_S).status_code == 204

    # What the balancer answers itself.
    for path in ("/v1/capacity", "/v1/sandboxes", "/metrics"):
        r = httpx.get(f"{lb}{path}", headers=AUTH, timeout=10.0)
        assert r.status_code == 421 and "each host" in r.json()["error"], (path, r.text)
    r = httpx.get(f"{lb}/v2/anything", timeout=10.0)
    assert r.status_code == 404 and "no such route" in r.json()["error"]
    # An id no host knows: every host is asked once, the last 404 is the answer.
    missing = "sbx_" + "0" * 32
    before = len(cluster.lb_lines())
    r = httpx.post(f"{lb}/v1/sandboxes/{missing}/exec", json={"code": "print(1)"}, headers=AUTH,
                   timeout=WAIT_S)
    assert r.status_code == 404, r.text
    assert "error" in r.json()
    lines = cluster.lb_lines_after(before, 1)
    assert len(lines) == 1 and f"/v1/sandboxes/{missing}/exec" in lines[0], lines
    assert "upstream_status=404, 404, 404" in lines[0], lines


def test_sdk_pins_to_the_host_that_created(cluster):
    base = cluster.live()
    sandboxes, kids = [], []
    before = len(cluster.lb_lines())
    try:
        for _ in range(6):
            sandboxes.append(Sandbox(host=cluster.lb))
        # Each sandbox's calls now go to the host that created it.
        placed = [cluster.region_of(s._client.host) for s in sandboxes]
        assert set(placed) == set(REGIONS), placed
        # Each host counts its own sandboxes and no others.
        assert cluster.live() == {r: base[r] + placed.count(r) for r in REGIONS}

        for s in sandboxes:
            res = s.run_code("print(6*7)")
            assert (res.stdout, res.stderr, res.exit_code) == ("42", "", 0)

        parent = sandboxes[0]
        home = placed[0]
        assert parent.run_code("x = 6 * 7").ok
        kids = parent.fork(2)
        for k in kids:
            assert k._client.host == parent._client.host
            res = k.run_code("print(x)")
            assert (res.stdout, res.exit_code) == ("42", 0)
        expect = {r: base[r] + placed.count(r) + (2 if r == home else 0) for r in REGIONS}
        assert cluster.live() == expect

        _close_all(kids)
        _close_all(sandboxes)
        assert cluster.live() == base
    finally:
        _close_all(kids)
        _close_all(sandboxes)

    # nginx saw the six creates and nothing else of these sandboxes: no
    # exec, fork or delete.
    seen = _requests(cluster.lb_lines_after(before, 6))
    assert seen == [("POST /v1/sandboxes HTTP/1.1", 200)] * 6, seen


def test_client_that_ignores_endpoint_still_works(cluster):
    """Sandbox(client=...) keeps the balancer's client: every call goes
    through nginx, which offers it to the hosts until one knows the id."""
    base = cluster.live()
    client = Client(host=cluster.lb, api_key=KEY, timeout=WAIT_S)
    sandboxes = []
    before = len(cluster.lb_lines())
    try:
        s = Sandbox(client=client)
        sandboxes.append(s)
        assert s._client.host == cluster.lb
        res = s.run_code("y = 6 * 7\nprint(y)")
        assert (res.stdout, res.exit_code) == ("42", 0)
        kid = s.fork(1)[0]
        sandboxes.append(kid)
        res = kid.run_code("print(y + 1)")
        assert (res.stdout, res.exit_code) == ("43", 0)
        grown = {r: n - base[r] for r, n in cluster.live().items()}
        assert sorted(grown.values()) == [0, 0, 2], grown  # parent and child, one host
        _close_all(sandboxes)
        assert cluster.live() == base
    finally:
        _close_all(sandboxes)
        client.close()

    # create, exec, fork, the child's exec, two deletes
    seen = _requests(cluster.lb_lines_after(before, 6))
    for what, status in (("/exec ", 200), ("/fork ", 200), ("DELETE /v1/sandboxes/", 204)):
        hits = [st for req, st in seen if what in req]
        assert hits and set(hits) == {status}, (what, seen)
