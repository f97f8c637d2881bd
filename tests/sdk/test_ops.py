"""The operator's routes against a real hostd: `GET /metrics` read by a
Prometheus/OpenMetrics text parser, and the sandbox listing, around a
sandbox the SDK creates, runs code in and deletes.

Run: PODFLARE_HOSTD_URL=http://127.0.0.1:7070 pytest -q tests/sdk/test_ops.py
"""

import os
import time

import httpx
from podflare import Client, Sandbox
from prometheus_client.openmetrics.parser import text_string_to_metric_families

URL = os.environ["PODFLARE_HOSTD_URL"]
WAIT_S = float(os.environ.get("PODFLARE_TEST_WAIT_S", "600"))
KEY = os.environ.get("PODFLARE_API_KEY")
HEADERS = {"Authorization": f"Bearer {KEY}"} if KEY else {}


def get(path):
    return httpx.get(URL + path, headers=HEADERS, timeout=WAIT_S)


def scrape():
    r = get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    # The parser raises on anything that is not valid OpenMetrics text.
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def value(families, name, suffix="", **labels):
    """The sample `name + suffix` whose labels include `labels` (0 if none)."""
    fam = families.get(name)
    if fam is None:
        return 0
    for s in fam.samples:
        if s.name == name + suffix and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return 0


def test_metrics_parse_and_move_with_a_sandbox_life():
    before = scrape()
    for name, kind in [
        ("podflare_sandbox_operations", "counter"),
        ("podflare_create_duration_seconds", "histogram"),
        ("podflare_exec_duration_seconds", "histogram"),
        ("podflare_fork_duration_seconds", "histogram"),
        ("podflare_sandboxes_live", "gauge"),
        ("podflare_sandboxes_busy", "gauge"),
        ("podflare_guest_private_memory_bytes", "gauge"),
        ("podflare_streams_open", "gauge"),
        ("podflare_pool_hits", "counter"),
        ("podflare_pool_misses", "counter"),
        ("podflare_vm_threads_cpu_seconds", "counter"),
        ("podflare_http_requests", "counter"),
    ]:
        assert before[name].type == kind, (name, before[name].type)
    client = Client(host=URL, timeout=WAIT_S)
    try:
        s = Sandbox(client=client)
        try:
            assert s.run_code("print(6 * 7)").stdout == "42"
            mid = scrape()
            live = value(mid, "podflare_sandboxes_live")
            assert live >= 1
            assert value(mid, "podflare_guest_private_memory_bytes") > 0
            # The listing shows it, with the operator's fields.
            r = get("/v1/sandboxes")
            assert r.status_code == 200
            mine = [x for x in r.json()["sandboxes"] if x["id"] == s.id]
            assert len(mine) == 1, r.json()
            one = get(f"/v1/sandboxes/{s.id}").json()
            assert one["id"] == s.id and one["template"] == "default" and one["state"] in ("ready", "busy")
            now_ms = time.time() * 1000
            assert one["created_at_ms"] <= one["last_exec_at_ms"] <= now_ms + 1000
            assert one["expires_at_ms"] > now_ms and one["idle_expires_at_ms"] > now_ms
            assert one["private_memory_bytes"] > 0
        finally:
            s.close()
    finally:
        client.close()
    after = scrape()
    assert value(after, "podflare_sandbox_operations", "_total", op="create", outcome="ok") >= value(
        before, "podflare_sandbox_operations", "_total", op="create", outcome="ok") + 1
    assert value(after, "podflare_sandbox_operations", "_total", op="delete", outcome="ok") >= value(
        before, "podflare_sandbox_operations", "_total", op="delete", outcome="ok") + 1
    assert value(after, "podflare_exec_duration_seconds", "_count") >= value(
        before, "podflare_exec_duration_seconds", "_count") + 1
    assert value(after, "podflare_create_duration_seconds", "_count") >= value(
        before, "podflare_create_duration_seconds", "_count") + 1
    # The guest ran: its vCPU thread's CPU time is counted, and never goes back.
    assert value(after, "podflare_vm_threads_cpu_seconds", "_total") > value(
        before, "podflare_vm_threads_cpu_seconds", "_total")
    assert value(after, "podflare_http_requests", "_total", route="/v1/sandboxes/{id}/exec", status="200") >= 1
    assert get(f"/v1/sandboxes/{s.id}").status_code == 404
