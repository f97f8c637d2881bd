"""`rootfs_gb` through the official SDK: `/` is a disk of the size asked
for (not RAM), and a file written there follows the sandbox through a fork,
a freeze and a resume.

Run: PODFLARE_HOSTD_URL=http://127.0.0.1:7070 pytest -q tests/sdk/test_disk.py
"""

from podflare import Sandbox

from conftest import close_quietly
from test_spaces import out, wait_frozen

GIB = 1 << 30
ROOT_SIZE = "import os\nst = os.statvfs('/')\nprint(st.f_blocks * st.f_frsize)"
# 1 MiB of random bytes into /root (on the disk; /tmp is a RAM file system).
WRITE = (
    "import random, hashlib\ndata = random.randbytes(1 << 20)\n"
    "open('/root/blob', 'wb').write(data)\nprint(hashlib.sha256(data).hexdigest())"
)
READ = "import hashlib\nprint(hashlib.sha256(open('/root/blob', 'rb').read()).hexdigest())"


def test_rootfs_gb_2_is_a_2_gib_root_and_its_files_follow_fork_freeze_and_resume(client):
    s = Sandbox(client=client, rootfs_gb=2, persistent=True, idle_timeout_seconds=5)
    plain = Sandbox(client=client)
    kid = None
    try:
        # ext4 keeps a little of its size for itself.
        assert 1.9 * GIB <= int(out(s, ROOT_SIZE)) <= 2 * GIB
        assert 0.9 * GIB <= int(out(plain, ROOT_SIZE)) <= GIB, "none asked: the template's 1 GiB"
        df = out(s, "df -B1 --output=size,avail / | tail -n 1", language="bash").split()
        assert 1.9 * GIB <= int(df[0]) <= 2 * GIB and int(df[1]) > 1.8 * GIB, df
        digest = out(s, WRITE)
        kid = s.fork(n=1)[0]
        assert out(kid, READ) == digest, "the child has the parent's file"
        assert 1.9 * GIB <= int(out(kid, ROOT_SIZE)) <= 2 * GIB
        out(kid, "open('/root/blob', 'wb').write(b'child')\nNone")
        assert out(s, READ) == digest, "the child's write stays its own"
        close_quietly(kid)
        kid = None
        # Idle for 5 s: frozen into a space; resumed, the file and the size
        # are there.
        space = wait_frozen(s.id)
        s = Sandbox.resume(space["id"], client=client)
        assert out(s, READ) == digest
        assert 1.9 * GIB <= int(out(s, ROOT_SIZE)) <= 2 * GIB
    finally:
        for x in (s, plain, kid):
            if x is not None:
                close_quietly(x)
