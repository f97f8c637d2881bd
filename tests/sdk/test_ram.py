"""`ram_mib` through the official SDK: a sandbox gets the RAM it asks for
(rounded up to a size hostd builds), its fork children and its space too.

Run: PODFLARE_HOSTD_URL=http://127.0.0.1:7070 pytest -q tests/sdk/test_ram.py
"""

from podflare import Sandbox

from conftest import close_quietly, create_sized

MEMTOTAL = "print(int(open('/proc/meminfo').read().split()[1]) // 1024)"


def mem_total_mib(sbx):
    r = sbx.run_code(MEMTOTAL)
    assert r.exit_code == 0, r.stderr
    return int(r.stdout.strip())


def test_ram_mib_1024_gives_a_guest_that_sees_1_gib_and_its_children_too(client):
    # The first 1024 MiB create builds that size's template snapshot (minutes
    # on an emulated-kernel host: 503 until then, retried).
    big = create_sized(client, ram_mib=1024)
    plain = Sandbox(client=client)
    odd = create_sized(client, ram_mib=700)
    try:
        # The kernel keeps a few MiB of RAM for itself.
        assert 960 <= mem_total_mib(big) <= 1024
        assert 480 <= mem_total_mib(plain) <= 512
        assert 960 <= mem_total_mib(odd) <= 1024, "700 MiB rounds up to the 1024 MiB size"
        kid = big.fork(n=1)[0]
        try:
            assert 960 <= mem_total_mib(kid) <= 1024
            # More than the default guest has, written from user space.
            r = kid.run_code("b = bytearray(700 << 20)\nb[::4096] = b'x' * len(b[::4096])\nprint(len(b) >> 20)")
            assert (r.exit_code, r.stdout.strip()) == (0, "700"), r.stderr
        finally:
            close_quietly(kid)
    finally:
        for s in (big, plain, odd):
            close_quietly(s)
