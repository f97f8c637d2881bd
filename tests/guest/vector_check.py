"""Vector-register isolation check and cost probe, run inside a sandbox.

Issue 15: on a PVM host the guest kernel runs with `noxsave`, so a context
switch saves only the low 128 bits of XMM0-15 (`fxsave`). The upper halves of
YMM/ZMM registers, YMM16-31/ZMM16-31 and the AVX-512 mask registers stay with
whichever process ran last. The guest agent keeps every process it starts off
AVX there (guest/agent/src/env.rs, `pvm_no_avx_env`); this program shows that
it works, and what it costs.

Modes (argv[1]):
  check [--unprotected] [--seconds S] [--min-ops N] [--patience P]
      Starts TWO worker processes on the guest's one vCPU and prints one JSON
      line: the workers' reports plus totals. `--unprotected` starts them with
      the protecting variables (PROTECT_VARS) removed from their environment.
  worker ID SECONDS MIN_OPS PATIENCE
      One worker (started by `check`): builds its data and known answers,
      prints "ready", waits for "go" on stdin, then runs checked operations
      until SECONDS have passed and MIN_OPS were done (or, on a machine too
      slow for MIN_OPS, SECONDS + PATIENCE have passed), and prints its
      report.
  cost [--unprotected]
      Starts one bench process (with or without the protections) and prints
      its JSON line.
  bench
      numpy `a @ b` on 512x512 float64 and a 64 MiB bytes copy, medians.

The same functions are importable: the test runs `check()`/`cost()` from the
sandbox's Python REPL, which starts the workers with `subprocess`.

Guest-kernel cost (PVM: ~0.4 ms a syscall, seconds a Python start, ms per
first-touched page) shapes the code: buffers are allocated and touched once in
setup, every numpy op writes into a preallocated `out=`, workers print nothing
while they run.

Where corruption can hit: at a syscall (`sched_yield`) no vector register is
live (all are call-clobbered, and glibc/numpy leave AVX code with
`vzeroupper`), so the yield phases mostly exercise switches at safe points.
The timer tick preempts a process anywhere, e.g. in the middle of glibc's
`memchr` loop with the needle broadcast in a YMM/ZMM register, or in an
OpenBLAS kernel with accumulators in ZMM registers: the burst phases keep both
workers busy in such loops for tens of milliseconds without yielding, so the
tick switches between them there.
"""

import json
import os
import sys
import time

# The variables guest/agent/src/env.rs adds on a PVM host.
PROTECT_VARS = (
    "GLIBC_TUNABLES",
    "NPY_DISABLE_CPU_FEATURES",
    "OPENBLAS_CORETYPE",
    "MKL_ENABLE_INSTRUCTIONS",
    "OPENSSL_ia32cap",
)

BUF = 2 << 20  # glibc 2.36 memmove: rep movsb up to 1 MiB here, a vector loop above
HASH_LEN = 512 << 10
NPY_N = 1 << 17  # 1 MiB of float64 per array
MAT = 128
BURST_S = 0.06  # no yields for this long: ticks (100 Hz) preempt in there
MAX_ERRORS = 8


def child_env(unprotected):
    env = dict(os.environ)
    if unprotected:
        for k in PROTECT_VARS:
            env.pop(k, None)
    return env


def protections(env=None):
    env = os.environ if env is None else env
    return {k: (k in env) for k in PROTECT_VARS}


# ---------------------------------------------------------------- worker


class Worker:
    def __init__(self, wid):
        import hashlib
        import random

        self.wid = wid
        self.hashlib = hashlib
        rnd = random.Random(0x5EC7 + 7919 * wid)
        # Each worker searches for its own marker byte; its data holds every
        # other byte value, including the other worker's marker, so a needle
        # register with foreign upper lanes matches early.
        self.mark = (0xA5, 0x3C)[wid % 2]
        m = bytes([self.mark])
        table = bytes(range(256)).replace(m, bytes([self.mark ^ 0xFF]))
        self.src = bytearray(rnd.randbytes(BUF).translate(table))
        self.src[BUF - 1] = self.mark
        self.mark_b = m
        self.dst = bytearray(BUF)
        self.dst[:] = self.src  # touch every page now
        # A copy that differs only in its last 32 bytes.
        self.near = bytearray(self.src)
        for i in range(BUF - 32, BUF):
            self.near[i] ^= 0x41
        self.small = bytes(self.src[:1500])  # below rep_movsb_threshold: a vector copy
        self.small_dst = bytearray(len(self.small))
        view = memoryview(self.src)
        self.hash_view = view[:HASH_LEN]
        self.sha256 = hashlib.sha256(self.hash_view).digest()
        self.sha512 = hashlib.sha512(self.hash_view).digest()
        self.ops = {}
        self.errors = []
        self.np = None
        try:
            import numpy as np
        except ImportError:
            np = None
        if np is not None:
            self.setup_numpy(np, rnd)

    def setup_numpy(self, np, rnd):
        n, w = NPY_N, self.wid

        # Integer values (no lists of 131072 ints: memory is slow to touch).
        def ia():
            return ((i * 37 + w) % 1000 for i in range(n))

        def ib():
            return ((i * 7 + 3 * w) % 1000 for i in range(n))

        self.a = np.fromiter(ia(), dtype=np.float64, count=n)
        self.b = np.fromiter(ib(), dtype=np.float64, count=n)
        self.c = np.empty(n, dtype=np.float64)
        # Exact answers from Python integers (all partial sums < 2**53).
        sa, sb = sum(ia()), sum(ib())
        self.sum_a = float(sa)
        self.sum_ab = float(sa + sb)
        self.dot_ab = float(sum(x * y for x, y in zip(ia(), ib())))
        self.sum_3a_b = float(3 * sa - sb)
        ma = [[rnd.randrange(10) for _ in range(MAT)] for _ in range(MAT)]
        mb = [[rnd.randrange(10) for _ in range(MAT)] for _ in range(MAT)]
        self.A = np.array(ma, dtype=np.float64)
        self.B = np.array(mb, dtype=np.float64)
        self.C = np.empty((MAT, MAT), dtype=np.float64)
        # Reference product, computed while the other worker waits (no
        # contention), then checked with integers: the sum of all entries is
        # sum_k colsum(A)[k] * rowsum(B)[k], and a few entries in full.
        np.matmul(self.A, self.B, out=self.C)
        self.Cref = self.C.copy()
        colsum = [sum(ma[i][k] for i in range(MAT)) for k in range(MAT)]
        rowsum = [sum(mb[k]) for k in range(MAT)]
        total = sum(c * r for c, r in zip(colsum, rowsum))
        assert int(self.Cref.sum()) == total, "reference matmul is wrong"
        for i, j in ((0, 0), (MAT - 1, MAT - 1), (17, 101), (100, 3)):
            want = sum(ma[i][k] * mb[k][j] for k in range(MAT))
            assert self.Cref[i, j] == want, "reference matmul is wrong"
        self.np = np

    def record(self, name, ok, detail):
        st = self.ops.get(name)
        if st is None:
            st = self.ops[name] = [0, 0]
        st[0] += 1
        if not ok:
            st[1] += 1
            if len(self.errors) < MAX_ERRORS:
                self.errors.append("%s: %s" % (name, detail()))

    def op_list(self):
        src, dst, near, rec = self.src, self.dst, self.near, self.record
        mark_b, small, small_dst = self.mark_b, self.small, self.small_dst

        def memchr():
            r = src.find(mark_b)
            rec("memchr", r == BUF - 1, lambda: "find -> %d, want %d" % (r, BUF - 1))

        def memchr_off():
            # Unaligned starts take other paths through the same loop.
            r = src.find(mark_b, 33)
            rec("memchr", r == BUF - 1, lambda: "find(33) -> %d, want %d" % (r, BUF - 1))

        def memcpy_memcmp():
            dst[:] = src
            ok = dst == src
            rec("memcpy+memcmp", ok, lambda: "copy differs at %d" % first_diff(dst, src))

        def memcmp_ne():
            ne = src == near
            rec("memcmp", ne is False, lambda: "buffers differing in the last 32 bytes compared equal")

        def small_copy():
            for _ in range(64):
                small_dst[:] = small
            ok = small_dst == small
            rec("memcpy-small", ok, lambda: "1500-byte copy differs")

        sha256, sha512 = self.hashlib.sha256, self.hashlib.sha512
        view, d256, d512 = self.hash_view, self.sha256, self.sha512

        def hash256():
            h = sha256(view).digest()
            rec("sha256", h == d256, lambda: "digest %s" % h.hex()[:16])

        def hash512():
            h = sha512(view).digest()
            rec("sha512", h == d512, lambda: "digest %s" % h.hex()[:16])

        ops = [memchr, memcpy_memcmp, hash256, memchr_off, memcmp_ne, small_copy, hash512]
        np = self.np
        if np is not None:
            a, b, c, A, B, C, Cref = self.a, self.b, self.c, self.A, self.B, self.C, self.Cref

            def np_add_sum():
                np.add(a, b, out=c)
                s = c.sum()
                rec("numpy add+sum", s == self.sum_ab, lambda: "%r want %r" % (s, self.sum_ab))

            def np_sum():
                s = a.sum()
                rec("numpy sum", s == self.sum_a, lambda: "%r want %r" % (s, self.sum_a))

            def np_dot():
                s = np.dot(a, b)
                rec("numpy dot", s == self.dot_ab, lambda: "%r want %r" % (s, self.dot_ab))

            def np_axpy():
                np.multiply(a, 3.0, out=c)
                np.subtract(c, b, out=c)
                s = c.sum()
                rec("numpy mul/sub+sum", s == self.sum_3a_b, lambda: "%r want %r" % (s, self.sum_3a_b))

            def np_matmul():
                np.matmul(A, B, out=C)
                ok = np.array_equal(C, Cref)
                rec("numpy matmul", ok, lambda: "%d entries wrong" % int((C != Cref).sum()))

            ops += [np_add_sum, np_dot, np_matmul, np_sum, np_axpy, np_matmul]
        return ops

    def run(self, seconds, min_ops, patience):
        ops = self.op_list()
        clock = time.perf_counter
        yield_ = os.sched_yield
        t0 = clock()
        deadline = t0 + seconds
        # A slow machine gets time to reach min_ops; the caller judges the
        # count, so a stop here is reported, never hidden.
        hard_stop = t0 + seconds + patience
        yields = bursts = 0
        done = 0
        while True:
            # Yield phase: one pass over the operations, handing the vCPU to
            # the other worker after each one.
            for op in ops:
                op()
                yield_()
            yields += len(ops)
            done += len(ops)
            # Burst phase: no yields; the timer tick preempts us mid-loop.
            end = clock() + BURST_S
            while True:
                for op in ops:
                    op()
                done += len(ops)
                if clock() >= end:
                    break
            bursts += 1
            now = clock()
            if (now >= deadline and done >= min_ops) or now >= hard_stop:
                break
        return {
            "worker": self.wid,
            "ops": sum(v[0] for v in self.ops.values()),
            "mismatches": sum(v[1] for v in self.ops.values()),
            "by_op": self.ops,
            "errors": self.errors,
            "seconds": round(clock() - t0, 3),
            "yields": yields,
            "bursts": bursts,
            "numpy": self.np is not None,
            "protections": protections(),
            "libs": libs_info(self.np),
        }


def first_diff(x, y):
    for i in range(0, len(x), 4096):
        if x[i : i + 4096] != y[i : i + 4096]:
            for j in range(i, min(i + 4096, len(x))):
                if x[j] != y[j]:
                    return j
    return -1


def libs_info(np):
    """What the libraries picked, for the report (best effort)."""
    info = {}
    if np is None:
        return info
    try:
        from numpy.core._multiarray_umath import __cpu_features__ as f

        info["numpy_avx512f"] = bool(f.get("AVX512F"))
        info["numpy_avx2"] = bool(f.get("AVX2"))
    except Exception as e:  # noqa: BLE001
        info["numpy_features"] = repr(e)
    try:
        import ctypes

        # Whichever OpenBLAS numpy loaded (Debian: via libblas.so.3).
        with open("/proc/self/maps") as maps:
            paths = {ln.split()[-1] for ln in maps if "openblas" in ln and "/" in ln}
        for path in sorted(paths):
            try:
                lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
                get = lib.openblas_get_corename
            except (OSError, AttributeError):
                continue
            get.restype = ctypes.c_char_p
            info["openblas_core"] = get().decode()
            break
    except Exception as e:  # noqa: BLE001
        info["openblas"] = repr(e)
    return info


def worker_main(wid, seconds, min_ops, patience):
    t = time.perf_counter()
    w = Worker(wid)
    setup_s = time.perf_counter() - t
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    if sys.stdin.readline().strip() != "go":
        sys.exit(2)
    report = w.run(seconds, min_ops, patience)
    report["setup_seconds"] = round(setup_s, 2)
    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()
    # The driver may ask for the cost figures in this same environment
    # (a fresh process would pay the Python start and imports again).
    if sys.stdin.readline().strip() == "bench":
        del w
        sys.stdout.write(json.dumps(bench()) + "\n")
        sys.stdout.flush()


# ---------------------------------------------------------------- drivers


def _spawn(args, env):
    import subprocess
    import tempfile

    err = tempfile.TemporaryFile()
    p = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__)] + args,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=err,
        env=env,
    )
    return p, err


def _stderr_of(err):
    err.seek(0)
    return err.read().decode(errors="replace")[-4000:]


def check(unprotected=False, seconds=20.0, min_ops=6000, cost=False, patience=600.0):
    """Runs two workers against each other; returns the summary dict.

    With `cost`, worker 0 then runs `bench()` alone (worker 1 has exited)
    and its figures are under "cost"."""
    env = child_env(unprotected)
    t0 = time.time()
    procs = []
    # Workers set up one after the other: the second starts (seconds of
    # Python start and imports) while the first waits in read(), so each
    # computes its reference answers without the other running.
    for wid in (0, 1):
        p, err = _spawn(["worker", str(wid), str(seconds), str(min_ops), str(patience)], env)
        procs.append((p, err))
        line = p.stdout.readline().decode().strip()
        if line != "ready":
            p.kill()
            raise RuntimeError("worker %d did not start: %r %s" % (wid, line, _stderr_of(err)))
    setup_s = time.time() - t0
    for p, _ in procs:
        p.stdin.write(b"go\n")
        p.stdin.flush()
    reports = []
    for wid, (p, err) in enumerate(procs):
        line = p.stdout.readline().decode()
        try:
            reports.append(json.loads(line))
        except ValueError:
            p.kill()
            raise RuntimeError("worker %d: %r %s" % (wid, line, _stderr_of(err)))
    bench_res = None
    for wid, (p, err) in reversed(list(enumerate(procs))):
        want = cost and wid == 0
        p.stdin.write(b"bench\n" if want else b"exit\n")
        p.stdin.flush()
        if want:
            line = p.stdout.readline().decode()
            try:
                bench_res = json.loads(line)
            except ValueError:
                p.kill()
                raise RuntimeError("bench: %r %s" % (line, _stderr_of(err)))
        code = p.wait()
        if code != 0:
            raise RuntimeError("worker %d exited %d: %s" % (wid, code, _stderr_of(err)))
    return {
        "cost": bench_res,
        "unprotected": unprotected,
        "protections": protections(env),
        "ops": sum(r["ops"] for r in reports),
        "mismatches": sum(r["mismatches"] for r in reports),
        "setup_seconds": round(setup_s, 1),
        "seconds": round(time.time() - t0, 1),
        "workers": reports,
    }


def bench():
    import statistics

    res = {"protections": protections()}
    n = 64 << 20
    import random

    chunk = random.Random(64).randbytes(1 << 20)  # user space, not the guest kernel's RNG
    src = bytearray(n)
    for off in range(0, n, len(chunk)):
        src[off : off + len(chunk)] = chunk
    dst = bytearray(n)
    dst[:] = src  # first touch of dst, not timed
    times = []
    for _ in range(15):
        t = time.perf_counter()
        dst[:] = src
        times.append(time.perf_counter() - t)
    assert dst == src
    res["copy64m_s"] = statistics.median(times)
    res["copy64m_all"] = [round(x, 5) for x in times]
    del src, dst
    try:
        import numpy as np
    except ImportError:
        return res
    rnd = random.Random(512)
    a = np.array([[rnd.randrange(10) for _ in range(512)] for _ in range(512)], dtype=np.float64)
    b = np.array([[rnd.randrange(10) for _ in range(512)] for _ in range(512)], dtype=np.float64)
    c = a @ b  # warm-up (and first touch of c)
    ref = c.copy()
    times = []
    for _ in range(15):
        t = time.perf_counter()
        np.matmul(a, b, out=c)
        times.append(time.perf_counter() - t)
    assert np.array_equal(c, ref)
    res["matmul512_s"] = statistics.median(times)
    res["matmul512_all"] = [round(x, 5) for x in times]
    res["libs"] = libs_info(np)
    return res


def cost(unprotected=False):
    """One bench process with or without the protections; returns its dict."""
    p, err = _spawn(["bench"], child_env(unprotected))
    out, _ = p.communicate()
    if p.returncode != 0:
        raise RuntimeError("bench exited %d: %s" % (p.returncode, _stderr_of(err)))
    r = json.loads(out.decode().strip().splitlines()[-1])
    r["unprotected"] = unprotected
    return r


def main(argv):
    mode = argv[1] if len(argv) > 1 else "check"
    unprotected = "--unprotected" in argv

    def opt(name, default):
        return type(default)(argv[argv.index(name) + 1]) if name in argv else default

    if mode == "worker":
        worker_main(int(argv[2]), float(argv[3]), int(argv[4]), float(argv[5]))
    elif mode == "check":
        print(json.dumps(check(unprotected, opt("--seconds", 20.0), opt("--min-ops", 6000), patience=opt("--patience", 600.0))))
    elif mode == "bench":
        print(json.dumps(bench()))
    elif mode == "cost":
        print(json.dumps(cost(unprotected)))
    else:
        sys.exit("usage: vector_check.py check|cost [--unprotected] | worker ID S N | bench")


if __name__ == "__main__":
    main(sys.argv)
