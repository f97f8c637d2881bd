"""podflare REPL: the persistent Python interpreter of a sandbox.

Started by the guest agent (PID 1) as `python3 -u /usr/lib/podflare/repl.py`.
It serves virtio-console port 1 (/dev/vport<N>p1) itself, so a Python exec
costs the guest kernel one read and one write and no process hop: on PVM every
guest syscall is emulated (~0.4 ms) and a process spawn takes ~1 s.

Wire format: the framing of the podflare-proto crate (guest/proto/src/lib.rs):
12-byte header (magic 0xF1, version 1, kind u16 LE, stream u32 LE, len u32 LE)
then the payload.

The shared-memory ring (podflare_proto::ring): when the kernel command line
names it (`podflare.ring=ADDR`), the REPL maps that reserved region of guest
RAM through /dev/mem, and Python execs and their output move through its two
byte rings with the same framing: no system call, no VM exit. After each
request the main thread keeps polling the ring for the window hostd wrote
(POLL_US), so back-to-back execs never enter the guest kernel; then it marks
itself asleep (SLEEP odd) and waits until the reader thread gets a Wake frame
on the port. The port keeps Hello, Cancel, Ping and Wake. A request whose
ring generation is newer than the last Hello handled waits for that Hello, so
user code in a restored or forked copy always runs with fresh randomness.

Threads:
- main: runs execs one at a time, in arrival order, in one persistent globals
  dict (`__name__ == '__main__'`); with the ring, it also takes requests from
  it and writes output into it directly;
- reader: reads frames, queues Exec requests, answers Hello/Ping, turns
  Cancel of the running exec into KeyboardInterrupt in the main thread. While
  an exec runs it also streams its output: it waits for frames with a timeout
  (2 ms, backing off to 50 ms while nothing is printed) and sends what
  accumulated. A short exec thus leaves in one write together with its Exit
  frame, and no thread is woken just to flush;
- drain: forwards what child processes write to fd 1/2 (os.system,
  subprocess without capture); those fds are pipes owned by this process.

Environment (set by the agent, removed before user code runs):
PODFLARE_READY_FD  one byte is written there once the port is served;
PODFLARE_WARMUP    comma list of modules to import at start (so a template
                   snapshot holds them warm);
PODFLARE_PREPARE_HEAP=1  prepare the heap (below) before reporting ready;
PODFLARE_HEAP_RESERVE_MIB  guest memory the prepared heap leaves free (96);
PYTHONMALLOC=malloc  Python's objects come from glibc malloc.
For tests: PODFLARE_REPL_PORT_FD (an inherited fd to serve instead of the
port) or PODFLARE_REPL_PORT_PATH.
"""

# Pre-import what SDK exec paths use (upload/download are base64 over execs),
# so the snapshot already holds them.
import _thread
import base64  # noqa: F401  (warm for user code)
import fcntl
import hashlib  # noqa: F401
import json
import linecache
import os
import queue
import random
import select
import signal
import struct
import sys
import threading
import time
import traceback

# ioctls on /dev/urandom: _IOW('R', 0x03, int[2]) and _IO('R', 0x07).
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
_urandom_fd = None


def refresh_clock_and_entropy(wall_ns, entropy):
    """Sets the wall clock and re-keys the kernel RNG after a restore or fork.

    Adding entropy alone leaves the kernel's CRNG on the key every copy of
    the snapshot shares until its next scheduled reseed; RNDRESEEDCRNG makes
    os.urandom diverge at once. Best effort: a failure leaves the old state.
    """
    global _urandom_fd
    # Same rule as the agent's clock_needs_setting: hostd restores the clock
    # already advanced, so only a clock behind the host's (or far ahead) is set.
    now = time.time_ns()
    if wall_ns > 0 and (now < wall_ns or now - wall_ns > 2_000_000_000):
        try:
            time.clock_settime_ns(time.CLOCK_REALTIME, wall_ns)
        except OSError:
            pass
    if not entropy:
        return
    try:
        if _urandom_fd is None:
            _urandom_fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
        fcntl.ioctl(_urandom_fd, RNDADDENTROPY, struct.pack("ii", len(entropy) * 8, len(entropy)) + entropy)
        fcntl.ioctl(_urandom_fd, RNDRESEEDCRNG)
    except OSError:
        pass

def reseed_numpy(entropy):
    """Reseeds numpy's global generator when numpy is loaded (a template
    imports it warm, so its state is in the snapshot every copy shares).
    A later `import numpy` seeds itself from the fresh kernel pool."""
    np = sys.modules.get("numpy")
    if np is None:
        return
    try:
        words = [int.from_bytes(entropy[i:i + 4], "little") for i in range(0, len(entropy) - 3, 4)]
        np.random.seed(words or None)
    except Exception:
        pass


VERSION = "0.1.0"
MAGIC = 0xF1
PROTOCOL = 1
HDR = struct.Struct("<BBHII")
HEADER_LEN = HDR.size
MAX_PAYLOAD = 64 << 20

# Kinds (guest/proto/src/lib.rs `Kind`).
HELLO, EXEC, STDIN, CLOSE_STDIN, CANCEL, PING, WAKE = 1, 2, 3, 4, 5, 6, 9
READY, STDOUT, STDERR, EXIT, ERROR, PONG = 64, 65, 66, 67, 68, 69

FLUSH_MS = 2  # coalescing window while an exec prints
FLUSH_MAX_MS = 50  # longest wait for output of an exec that is silent
FLUSH_BYTES = 64 << 10  # send at once when this much is buffered
OUT_FRAME_MAX = 1 << 20  # one write may be any size; its frames are not
PORT_WAIT = 120.0  # seconds to wait for the port node to appear


# The ring region (guest/proto/src/lib.rs `ring`): offsets of its words, its
# rings and their sizes.
RING_LEN = 0x40_0000
RING_MAGIC_OFF, RING_MAGIC = 0x00, 0x3152_4650
RING_SLEEP, RING_GENERATION, RING_POLL_US = 0x08, 0x10, 0x14
RING_H2G_HEAD, RING_H2G_TAIL, RING_G2H_HEAD, RING_G2H_TAIL = 0x40, 0x48, 0x80, 0x88
RING_H2G_DATA, RING_H2G_SIZE = 0x10_0000, 0x10_0000
RING_G2H_DATA, RING_G2H_SIZE = 0x20_0000, 0x20_0000
U64 = (1 << 64) - 1


class Ring:
    """This process's end of the shared-memory ring. Host bytes are read
    by the main thread only; writes go through `lock`, so frames from the
    main and drain threads never interleave."""

    def __init__(self, mm):
        import ctypes

        self.mm = mm
        word = lambda t, off: t.from_buffer(mm, off)  # noqa: E731
        self.sleep = word(ctypes.c_uint32, RING_SLEEP)
        self.generation = word(ctypes.c_uint32, RING_GENERATION)
        self.poll_us = word(ctypes.c_uint32, RING_POLL_US)
        self.h2g_head = word(ctypes.c_uint64, RING_H2G_HEAD)
        self.h2g_tail = word(ctypes.c_uint64, RING_H2G_TAIL)
        self.g2h_head = word(ctypes.c_uint64, RING_G2H_HEAD)
        self.g2h_tail = word(ctypes.c_uint64, RING_G2H_TAIL)
        self.magic = word(ctypes.c_uint32, RING_MAGIC_OFF)
        # Our own counters: the snapshot's values on a restore.
        self.taken = self.h2g_tail.value
        self.put_at = self.g2h_head.value
        if self.sleep.value % 2:
            self.sleep.value += 1
        self.lock = threading.Lock()

    @staticmethod
    def attach():
        """Maps the region the command line names; None without one (an
        older host, a test serving another port) or if it cannot be used."""
        try:
            with open("/proc/cmdline") as f:
                words = f.read().split()
            addr = next((int(w.split("=", 1)[1], 0) for w in words if w.startswith("podflare.ring=")), None)
            if addr is None:
                return None
            import mmap

            fd = os.open("/dev/mem", os.O_RDWR | os.O_CLOEXEC)
            try:
                mm = mmap.mmap(fd, RING_LEN, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=addr)
            finally:
                os.close(fd)
            return Ring(mm)
        except (OSError, ValueError, StopIteration) as e:
            sys.stderr.write("podflare-repl: no ring (%s): execs use the port\n" % e)
            return None

    def serve(self):
        """Tells hostd to send Python execs here (before the first Ready)."""
        self.magic.value = RING_MAGIC

    def window(self):
        # hostd writes it with every Hello (PODFLARE_GUEST_POLL_MS); 0 sleeps at once.
        return self.poll_us.value / 1e6

    def waiting(self):
        return self.h2g_head.value != self.taken

    def take(self):
        """Every host byte in the ring (b"" if none)."""
        n = (self.h2g_head.value - self.taken) & U64
        if n == 0 or n > RING_H2G_SIZE:
            return b""
        off = self.taken % RING_H2G_SIZE
        first = min(n, RING_H2G_SIZE - off)
        mm = self.mm
        data = mm[RING_H2G_DATA + off : RING_H2G_DATA + off + first]
        if n > first:
            data += mm[RING_H2G_DATA : RING_H2G_DATA + n - first]
        self.taken = (self.taken + n) & U64
        self.h2g_tail.value = self.taken
        return data

    def put(self, data):
        """Writes all of `data`, waiting while the ring is full (hostd
        drains it; a reader that stopped reading pauses it). A Cancel that
        arrives meanwhile is raised after the frame is whole: a torn frame
        would break every later one."""
        interrupted = False
        view = memoryview(data)
        nap = 0.0
        with self.lock:
            while view:
                try:
                    room = RING_G2H_SIZE - ((self.put_at - self.g2h_tail.value) & U64)
                    if room <= 0:
                        # Polling first: hostd takes output within ~1 ms.
                        if nap:
                            time.sleep(nap)
                        nap = min(nap * 2 or 0.0002, 0.05)
                        continue
                    nap = 0.0
                    n = min(room, len(view))
                    off = self.put_at % RING_G2H_SIZE
                    first = min(n, RING_G2H_SIZE - off)
                    mm = self.mm
                    mm[RING_G2H_DATA + off : RING_G2H_DATA + off + first] = view[:first]
                    if n > first:
                        mm[RING_G2H_DATA : RING_G2H_DATA + n - first] = view[first:n]
                    self.put_at = (self.put_at + n) & U64
                    self.g2h_head.value = self.put_at
                    view = view[n:]
                except KeyboardInterrupt:
                    interrupted = True
        if interrupted:
            raise KeyboardInterrupt


def take_frame(buf):
    """Removes the next whole frame from the bytearray `buf` and returns
    (kind, stream, payload); None while it is incomplete. Garbage before a
    frame is dropped: it resynchronises on the next magic byte."""
    while len(buf) >= HEADER_LEN:
        magic, version, kind, stream, length = HDR.unpack_from(buf)
        if magic != MAGIC or version != PROTOCOL or length > MAX_PAYLOAD:
            nxt = buf.find(MAGIC, 1)
            del buf[: nxt if nxt > 0 else len(buf)]
            continue
        end = HEADER_LEN + length
        if len(buf) < end:
            return None
        payload = bytes(buf[HEADER_LEN:end])
        del buf[:end]
        return kind, stream, payload
    return None


def parse_exec(payload):
    """The code of an Exec request, or an error message for the host."""
    try:
        req = json.loads(payload)
        lang, code = req.get("language"), req["code"]
        if not isinstance(code, str):
            raise ValueError("code is not a string")
    except Exception as e:
        return None, "malformed exec request: %s" % e
    if lang != "python":
        return None, "the REPL runs python execs only"
    return code, None


def frame(kind, stream, payload=b""):
    return HDR.pack(MAGIC, PROTOCOL, kind, stream, len(payload)) + payload


def find_port():
    """Opens the port to serve: a test override, else /dev/vport<N>p1.

    The node may appear a moment after boot, so poll for it."""
    fd = os.environ.pop("PODFLARE_REPL_PORT_FD", None)
    if fd is not None:
        return int(fd)
    path = os.environ.pop("PODFLARE_REPL_PORT_PATH", None)
    if path:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    deadline = time.monotonic() + PORT_WAIT
    nap = 0.005
    while True:
        try:
            names = os.listdir("/dev")
        except OSError:
            names = []
        for name in names:
            if name.startswith("vport") and name.endswith("p1") and name[5:-2].isdigit():
                return os.open("/dev/" + name, os.O_RDWR | os.O_CLOEXEC)
        if time.monotonic() > deadline:
            raise SystemExit("podflare-repl: no /dev/vport*p1 (virtio console port 1)")
        time.sleep(nap)
        nap = min(nap * 2, 0.2)


class Port:
    """The served descriptor. Writes from all threads go through `lock`, so
    frames never interleave."""

    def __init__(self, fd):
        self.fd = fd
        self.lock = threading.Lock()

    def write_locked(self, data):
        # The virtio-console driver takes at most 32 KiB per write.
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def send(self, data):
        with self.lock:
            self.write_locked(data)


class Output:
    """Output of the running exec: chunks accumulate here and leave as
    Stdout/Stderr frames, from the reader thread (streaming), from a writer
    (when FLUSH_BYTES are pending) or at exec end together with the Exit
    frame."""

    def __init__(self, port):
        self.port = port
        self.lock = threading.Lock()  # order: port.lock, then self.lock
        self.stream = None  # None: no exec running, output is dropped
        self.chunks = []  # [kind, bytearray]
        self.size = 0
        # With the ring, output goes straight into it: nothing accumulates.
        self.ring = None

    def begin(self, stream):
        with self.lock:
            self.stream = stream
            self.chunks = []
            self.size = 0

    def add(self, kind, data):
        if not data:
            return
        ring = self.ring
        if ring is not None:
            stream = self.stream
            if stream is not None:
                ring.put(frame(kind, stream, bytes(data)) if len(data) <= OUT_FRAME_MAX else b"".join(
                    frame(kind, stream, bytes(data[i : i + OUT_FRAME_MAX])) for i in range(0, len(data), OUT_FRAME_MAX)))
            return
        with self.lock:
            if self.stream is None:
                return
            chunks = self.chunks
            if chunks and chunks[-1][0] == kind:
                chunks[-1][1] += data
            else:
                chunks.append([kind, bytearray(data)])
            self.size += len(data)
            big = self.size >= FLUSH_BYTES
        if big:
            self.flush()

    def _take(self):
        """Encoded frames of everything pending (self.lock held)."""
        stream, chunks = self.stream, self.chunks
        self.chunks = []
        self.size = 0
        if stream is None:
            return b""
        return b"".join(
            frame(kind, stream, bytes(data[i : i + OUT_FRAME_MAX]))
            for kind, data in chunks
            for i in range(0, len(data), OUT_FRAME_MAX)
        )

    def flush(self):
        """Sends what is pending; False if there was nothing."""
        with self.port.lock:
            with self.lock:
                data = self._take()
            if data:
                self.port.write_locked(data)
        return bool(data)

    def discard(self):
        with self.lock:
            self.stream = None
            self.chunks = []
            self.size = 0

    def finish(self, stream, code):
        """Sends what is left and the Exit frame, in one write."""
        if self.ring is not None:
            self.stream = None
            self.ring.put(frame(EXIT, stream, struct.pack("<i", code)))
            return
        with self.port.lock:
            with self.lock:
                data = self._take() + frame(EXIT, stream, struct.pack("<i", code))
                self.stream = None
            self.port.write_locked(data)


class TextWriter:
    """sys.stdout / sys.stderr of exec'd code."""

    encoding = "utf-8"
    errors = "surrogateescape"
    newlines = None
    closed = False

    def __init__(self, out, kind, fd):
        self._out = out
        self._kind = kind
        self._fd = fd
        self.buffer = _BinaryWriter(out, kind, fd)

    def write(self, s):
        if not isinstance(s, str):
            raise TypeError("write() argument must be str, not %s" % type(s).__name__)
        try:
            data = s.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            data = s.encode("utf-8", "replace")
        self._out.add(self._kind, data)
        return len(s)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        # Output leaves within FLUSH_MS anyway; a syscall per print(flush=True)
        # would cost ~0.4 ms each on PVM.
        pass

    def fileno(self):
        return self._fd

    def isatty(self):
        return False

    def readable(self):
        return False

    def writable(self):
        return True

    def seekable(self):
        return False

    def close(self):
        pass


class _BinaryWriter:
    """sys.stdout.buffer: bytes go to the same stream."""

    closed = False

    def __init__(self, out, kind, fd):
        self._out, self._kind, self._fd = out, kind, fd

    def write(self, b):
        data = bytes(b)
        self._out.add(self._kind, data)
        return len(data)

    def flush(self):
        pass

    def fileno(self):
        return self._fd

    def isatty(self):
        return False

    def writable(self):
        return True


class ChildOutput:
    """fd 1 and 2 of this process are pipes; whatever child processes (or
    os.write(1, ...)) put there joins the running exec's output."""

    def __init__(self, out):
        self.out = out
        self.lock = threading.Lock()
        self.fds = {}
        for target, kind in ((1, STDOUT), (2, STDERR)):
            r, w = os.pipe()
            os.dup2(w, target)
            os.close(w)
            os.set_blocking(r, False)
            self.fds[r] = kind
        # Two poll objects: one may not be polled from two threads at once.
        self.poller = select.poll()
        self.checker = select.poll()
        for r in self.fds:
            self.poller.register(r, select.POLLIN)
            self.checker.register(r, select.POLLIN)

    def _read_ready(self, events):
        for fd, _ in events:
            kind = self.fds.get(fd)
            while kind is not None:
                try:
                    data = os.read(fd, 1 << 16)
                except BlockingIOError:
                    break
                if not data:
                    break
                self.out.add(kind, data)

    def run(self):
        while True:
            events = self.poller.poll()
            with self.lock:
                self._read_ready(events)

    def collect(self):
        """At exec end: take what is already in the pipes (one poll)."""
        with self.lock:
            events = self.checker.poll(0)
            if events:
                self._read_ready(events)


class Repl:
    def __init__(self, port):
        self.port = port
        self.out = Output(port)
        self.requests = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.current = None  # stream of the running exec
        self.interruptible = False
        self.cancelled = set()  # queued streams cancelled before they ran
        self.busy = 0  # execs queued or running
        self.main_ident = threading.main_thread().ident
        self.globals = {"__name__": "__main__", "__builtins__": __builtins__, "__doc__": None}
        self.stdout = TextWriter(self.out, STDOUT, 1)
        self.stderr = TextWriter(self.out, STDERR, 2)
        self.children = None
        self.ring = None
        # Set by the reader for a Wake frame (or a request on the port)
        # while the main thread sleeps; generation of the last Hello handled.
        self.wake = threading.Event()
        self.hello = threading.Condition(self.lock)
        self.hello_generation = 0
        self.rbuf = bytearray()

    def use_ring(self, ring):
        self.ring = ring
        self.out.ring = ring
        self.hello_generation = ring.generation.value

    # --- reader thread -------------------------------------------------

    def ready_frame(self):
        body = json.dumps({"protocol": PROTOCOL, "role": "repl", "version": VERSION})
        return frame(READY, 0, body.encode())

    def read_frames(self):
        fd = self.port.fd
        waiter = select.poll()
        waiter.register(fd, select.POLLIN)
        buf = bytearray()
        nap = 0.001
        wait_ms = FLUSH_MS
        while True:
            try:
                if self.busy and self.out.ring is None:
                    # An exec is queued or running: wake up to stream its output.
                    if not waiter.poll(wait_ms):
                        wait_ms = FLUSH_MS if self.out.flush() else min(wait_ms * 2, FLUSH_MAX_MS)
                        continue
                data = os.read(fd, 1 << 16)
            except InterruptedError:
                continue
            except OSError:
                data = b""
            if not data:
                # No host connected: the driver returns EOF at once instead
                # of blocking, so back off rather than spin.
                time.sleep(nap)
                nap = min(nap * 2, 0.1)
                continue
            nap = 0.001
            buf += data
            while True:
                got = take_frame(buf)
                if got is None:
                    break
                kind, stream, payload = got
                if kind == EXEC:
                    wait_ms = FLUSH_MS
                try:
                    self.handle(kind, stream, payload)
                except Exception:
                    # Host input must never kill the REPL.
                    pass

    def handle(self, kind, stream, payload):
        if kind == EXEC:
            code, error = parse_exec(payload)
            if error is not None:
                self.port.send(frame(ERROR, stream, error.encode()))
                return
            with self.lock:
                self.busy += 1
            self.requests.put((stream, code))
            self.wake.set()
        elif kind == WAKE:
            self.wake.set()
        elif kind == CANCEL:
            with self.lock:
                if stream == self.current:
                    if self.interruptible:
                        # A real signal to the main thread, so a blocking call
                        # (time.sleep, a read) is interrupted too.
                        signal.pthread_kill(self.main_ident, signal.SIGINT)
                else:
                    self.cancelled.add(stream)
        elif kind == HELLO:
            try:
                hello = json.loads(payload)
                entropy = bytes.fromhex(hello.get("entropy_hex", ""))
                wall_ns = int(hello.get("wall_clock_ns", 0))
            except Exception:
                entropy, wall_ns = b"", 0
            # The agent does the same on port 0, but an exec queued behind
            # this Hello on port 1 must not race it: the clock and the kernel
            # pool are fresh before the next frame is even read.
            refresh_clock_and_entropy(wall_ns, entropy)
            if entropy:
                # Every restored or forked copy gets its own random state.
                random.seed(entropy)
                reseed_numpy(entropy)
            try:
                generation = int(hello.get("ring_generation", 0)) & 0xFFFFFFFF
            except Exception:
                generation = 0
            if generation:
                with self.hello:
                    self.hello_generation = generation
                    self.hello.notify_all()
            self.port.send(self.ready_frame())
        elif kind == PING:
            self.port.send(frame(PONG, stream, payload))
        # STDIN / CLOSE_STDIN: python execs have no stdin (it is /dev/null);
        # guest-to-host kinds and unknown kinds are ignored.

    # --- main thread ---------------------------------------------------

    def on_sigint(self, signum, frame_):
        if self.interruptible:
            raise KeyboardInterrupt

    def warm(self):
        """Runs execs through the whole path with their output discarded, so
        the first real exec does not pay for first-touch page faults (2.5 ms
        each on PVM): the template snapshot then holds these pages."""
        user_globals = self.globals
        self.globals = {"__name__": "__main__", "__builtins__": __builtins__}
        for code in ("print('warm', 6 * 7)", "import os\nos.getcwd()\n1/0", "raise SystemExit(0)"):
            self.run_exec(0, code, send=False)
        self.globals = user_globals

    def run_exec(self, stream, code, send=True):
        with self.lock:
            if stream in self.cancelled:
                self.cancelled.discard(stream)
                skip = True
            else:
                self.current = stream
                skip = False
        if skip:
            self.port.send(frame(EXIT, stream, struct.pack("<i", 130)))
            return
        self.out.begin(stream if send else None)
        # User code may have replaced these (redirect_stdout left behind).
        sys.stdout, sys.stderr = self.stdout, self.stderr
        status = 0
        try:
            try:
                compiled = compile(code, "<exec>", "exec")
                linecache.cache["<exec>"] = (len(code), None, code.splitlines(True), "<exec>")
                self.interruptible = True
                exec(compiled, self.globals)
            finally:
                self.interruptible = False
        except SystemExit as e:
            status = self.exit_status(e.code)
        except KeyboardInterrupt:
            status = 130
            self.print_exception(sys.exc_info())
        except BaseException:
            status = 1
            self.print_exception(sys.exc_info())
        with self.lock:
            self.current = None
        if self.children is not None:
            self.children.collect()
        if send:
            self.out.finish(stream, status)
        else:
            self.out.discard()
        if signal.getsignal(signal.SIGINT) != self.on_sigint:
            signal.signal(signal.SIGINT, self.on_sigint)

    def exit_status(self, code):
        if code is None:
            return 0
        if isinstance(code, int) and not isinstance(code, bool):
            return code & 0xFF if code >= 0 else code
        try:
            self.stderr.write(str(code) + "\n")
        except Exception:
            pass
        return 1

    def print_exception(self, info):
        etype, value, tb = info
        # Drop our own frame (the exec() call) from the traceback.
        if tb is not None and tb.tb_frame.f_code is Repl.run_exec.__code__:
            tb = tb.tb_next
        try:
            te = traceback.TracebackException(etype, value, tb)
            # A Cancel surfaces in on_sigint: keep the user's frames only.
            te.stack = traceback.StackSummary.from_list([f for f in te.stack if f.filename != __file__])
            self.stderr.writelines(te.format())
        except Exception:
            self.stderr.write("%s: %s\n" % (etype.__name__, value))

    # --- the ring (main thread) -------------------------------------------

    def ring_request(self):
        """The next complete frame in the ring as (stream, code), or None.
        A malformed one is answered with an Error frame and dropped."""
        while True:
            got = take_frame(self.rbuf)
            if got is None:
                return None
            kind, stream, payload = got
            if kind != EXEC:
                continue
            code, error = parse_exec(payload)
            if error is None:
                return stream, code
            self.ring.put(frame(ERROR, stream, error.encode()))

    def after_hello(self):
        """Waits until the Hello of the ring's current generation (or a
        newer one) has been handled."""
        with self.hello:
            while 0 < ((self.ring.generation.value - self.hello_generation) & 0xFFFFFFFF) < 1 << 31:
                self.hello.wait()

    def next_request(self):
        """Polls the ring (and the port's queue) for the next request; after
        the polling window with nothing new, sleeps until woken. A ring
        request is counted in `busy` here (the port's were when they came)."""
        ring = self.ring
        started = None
        spins = 0
        while True:
            data = ring.take()
            if data:
                self.rbuf += data
                started = None
                req = self.ring_request()
                if req is not None:
                    self.after_hello()
                    with self.lock:
                        self.busy += 1
                    return req
            if not self.requests.empty():
                return self.requests.get()
            spins += 1
            if spins & 255:
                continue
            now = time.monotonic()
            if started is None:
                started = now
                continue
            if now - started < ring.window():
                continue
            self.wake.clear()
            ring.sleep.value += 1  # odd: asleep; hostd sends Wake from now on
            if not ring.waiting() and self.requests.empty():
                self.wake.wait()
            ring.sleep.value += 1
            started = None

    def serve(self):
        if self.ring is not None:
            self.ring.serve()
        self.port.send(self.ready_frame())
        while True:
            try:
                if self.ring is not None:
                    stream, code = self.next_request()
                else:
                    stream, code = self.requests.get()
                self.run_exec(stream, code)
            except KeyboardInterrupt:
                # A Cancel that raced with the end of its exec.
                continue
            except BaseException:
                # Our own bug; the REPL must survive every exec.
                continue
            finally:
                with self.lock:
                    self.busy -= 1


# --- the prepared heap ------------------------------------------------------
# A first-touch page fault runs in the guest kernel, which a PVM host emulates
# (~2.5 ms per 4 KiB page, ~0.5 ms with huge pages). So the REPL's memory is
# faulted in once, while the template is built, and kept: every later Python
# object, bytearray and numpy buffer is carved from pages the snapshot already
# maps. The agent starts the REPL with PYTHONMALLOC=malloc (Python's object
# allocator would take fresh 1 MiB arenas from mmap), and these settings route
# glibc malloc to one brk heap that does not shrink below the prepared size.
# Zero pages are holes in the snapshot file, so the prepared pages cost the
# host nothing until a sandbox writes them.

# mallopt parameters (glibc malloc.h).
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4
M_ARENA_MAX = -8
MADV_FREE = 8
HUGE = 2 << 20
# Guest memory the prepared heap leaves to everything else (kernel, page
# cache, files in the RAM overlay, other processes): MiB.
HEAP_RESERVE_MIB = int(os.environ.pop("PODFLARE_HEAP_RESERVE_MIB", "96"))
_libc = None
# What prepare_heap() prepared in this process (MiB), for tests and benches:
# `sys.modules["__main__"].PREPARED_HEAP_MIB` from an exec.
PREPARED_HEAP_MIB = 0


def _mallopt(param, value):
    return _libc is not None and _libc.mallopt(param, value) == 1


def heap_settings():
    """One brk heap (no mmap for large blocks, one arena for every thread),
    never trimmed while this runs; called before any thread starts."""
    global _libc
    try:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    except (ImportError, OSError, AttributeError) as e:
        sys.stderr.write("podflare-repl: no mallopt (%s): the heap is not prepared\n" % e)
        _libc = None
        return
    for param, value in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1)):
        _mallopt(param, value)


def mem_available_mib():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return 0


def prepare_heap():
    """Faults in all guest memory but the reserve as free heap, then lets the
    guest kernel take those pages back under memory pressure until they are
    written again (MADV_FREE: no fault when they are reused). From then on
    the heap keeps that much free memory when it trims. Returns the prepared
    MiB (0: nothing prepared)."""
    if _libc is None:
        return 0
    import ctypes

    mib = (mem_available_mib() - HEAP_RESERVE_MIB) // 2 * 2
    if mib <= 0:
        return 0
    n = mib << 20
    try:
        block = bytearray(n)  # malloc from the brk top, then memset: every page faulted
    except MemoryError:
        return 0
    addr = ctypes.addressof(ctypes.c_char.from_buffer(block))
    # Whole huge pages inside the block only: the chunk header before `addr`
    # stays, and no huge page is split.
    start = (addr + HUGE - 1) // HUGE * HUGE
    end = (addr + n) // HUGE * HUGE
    if end > start:
        _libc.madvise(start, end - start, MADV_FREE)
    del block
    # Trimming (after a free leaves more than the prepared size plus 32 MiB
    # on top) gives back only what lies beyond the prepared size.
    _mallopt(M_TOP_PAD, n)
    _mallopt(M_TRIM_THRESHOLD, n + (32 << 20))
    return mib


def warm_up():
    names = os.environ.pop("PODFLARE_WARMUP", "")
    for name in filter(None, (n.strip() for n in names.split(","))):
        try:
            __import__(name)
        except Exception as e:
            sys.stderr.write("podflare-repl: warm-up import %s failed: %s\n" % (name, e))


def signal_ready():
    fd = os.environ.pop("PODFLARE_READY_FD", None)
    if fd is None:
        return
    try:
        os.write(int(fd), b"R")
        os.close(int(fd))
    except (OSError, ValueError):
        pass


def main():
    os.environ.pop("PYTHONMALLOC", None)  # this process only, not its children
    prepare = os.environ.pop("PODFLARE_PREPARE_HEAP", None) == "1"
    heap_settings()
    warm_up()
    serve_vport = "PODFLARE_REPL_PORT_FD" not in os.environ and "PODFLARE_REPL_PORT_PATH" not in os.environ
    port = Port(find_port())
    repl = Repl(port)
    ring = Ring.attach() if serve_vport else None
    if ring is not None:
        repl.use_ring(ring)
    signal.signal(signal.SIGINT, repl.on_sigint)
    # Child processes inherit fd 1/2: make them pipes we forward. From here on
    # nothing goes to the console (the agent keeps it quiet).
    repl.children = ChildOutput(repl.out)
    sys.stdout, sys.stderr = repl.stdout, repl.stderr
    for target in (repl.read_frames, repl.children.run):
        threading.Thread(target=target, daemon=True).start()
    repl.warm()
    # Objects created so far live forever: keep the collector (and forked
    # copies of the snapshot) from walking them again.
    import gc

    gc.collect()
    gc.freeze()
    if prepare:
        global PREPARED_HEAP_MIB
        PREPARED_HEAP_MIB = prepare_heap()
    signal_ready()
    repl.serve()


if __name__ == "__main__":
    main()
