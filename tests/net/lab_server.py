#!/usr/bin/env python3
"""The test network lab's upstream server: HTTP and DNS on one address.

HTTP (TCP, --http-port):
  GET /          200, body "podflare-lab-ok\\n"
  GET /bytes/N   200, N bytes (N <= 64 MiB) of a repeating pattern
  POST /sink     reads Content-Length bytes, answers with their count
  anything else  404
DNS (UDP 53): A records for the --name NAME=IPV4 pairs (TTL 5); other names
get NXDOMAIN, other query types for a known name an empty NOERROR.

Prints "ready" once both sockets are bound and "req METHOD PATH" for each
HTTP request; exits when stdin closes.
"""

import argparse
import http.server
import ipaddress
import os
import socket
import socketserver
import struct
import sys
import threading

MAX_BYTES = 64 << 20
PATTERN = b"0123456789abcdef" * 4096  # 64 KiB, the unit /bytes/N streams in
TTL = 5

out_lock = threading.Lock()


def say(line):
    with out_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


class Handler(http.server.BaseHTTPRequestHandler):
    # Keep-alive, so throughput measurements are not dominated by handshakes.
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, code, body):
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        # Logged before answering, so a client that has its answer knows the
        # line is already in the pipe.
        say(f"req GET {self.path}")
        if self.path == "/":
            return self.reply(200, b"podflare-lab-ok\n")
        n = self.path.removeprefix("/bytes/")
        if n != self.path and n.isdigit() and int(n) <= MAX_BYTES:
            n = int(n)
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(n))
            self.end_headers()
            while n > 0:
                chunk = PATTERN[: min(n, len(PATTERN))]
                self.wfile.write(chunk)
                n -= len(chunk)
            return
        self.reply(404, b"not found\n")

    def do_POST(self):
        say(f"req POST {self.path}")
        length = self.headers.get("Content-Length", "")
        if not length.isdigit():
            self.close_connection = True
            return self.reply(411, b"length required\n")
        left = int(length)
        got = 0
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 20))
            if not chunk:
                break
            got += len(chunk)
            left -= len(chunk)
        if self.path != "/sink":
            return self.reply(404, b"not found\n")
        self.reply(200, f"{got}\n".encode())


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    # HTTPServer.server_bind looks up the address's FQDN: a DNS query that
    # would leave the lab via its default route.
    def server_bind(self):
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


def parse_question(pkt):
    """(id, flags, name, qtype, question bytes), or None when malformed."""
    if len(pkt) < 12:
        return None
    qid, flags, qd = struct.unpack("!HHH", pkt[:6])
    # Only standard queries (QR=0, opcode 0) with exactly one question.
    if flags & 0x8000 or (flags >> 11) & 0xF or qd != 1:
        return None
    pos, labels = 12, []
    while True:
        if pos >= len(pkt):
            return None
        n = pkt[pos]
        pos += 1
        if n == 0:
            break
        # Compression pointers (top bits set) have no place in a question.
        if n > 63 or pos + n > len(pkt):
            return None
        labels.append(pkt[pos : pos + n].decode("latin-1").lower())
        pos += n
        if pos - 12 > 255:
            return None
    if pos + 4 > len(pkt):
        return None
    qtype, _qclass = struct.unpack("!HH", pkt[pos : pos + 4])
    return qid, flags, ".".join(labels), qtype, pkt[12 : pos + 4]


def answer(pkt, names):
    q = parse_question(pkt)
    if q is None:
        return None
    qid, flags, name, qtype, question = q
    # QR, AA, RD copied from the query, RA.
    rflags = 0x8000 | 0x0400 | (flags & 0x0100) | 0x0080
    addr = names.get(name)
    if addr is None:
        return struct.pack("!HHHHHH", qid, rflags | 3, 1, 0, 0, 0) + question
    if qtype != 1:
        return struct.pack("!HHHHHH", qid, rflags, 1, 0, 0, 0) + question
    rr = struct.pack("!HHHIH", 0xC00C, 1, 1, TTL, 4) + addr
    return struct.pack("!HHHHHH", qid, rflags, 1, 1, 0, 0) + question + rr


def serve_dns(sock, names):
    while True:
        try:
            pkt, peer = sock.recvfrom(4096)
            reply = answer(pkt, names)
            if reply is not None:
                sock.sendto(reply, peer)
        except OSError:
            continue


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--addr", required=True)
    ap.add_argument("--http-port", type=int, default=8080)
    ap.add_argument("--dns-port", type=int, default=53)
    ap.add_argument("--name", action="append", default=[], metavar="NAME=IPV4")
    args = ap.parse_args()

    names = {}
    for pair in args.name:
        name, _, ip = pair.partition("=")
        names[name.lower().rstrip(".")] = ipaddress.IPv4Address(ip).packed

    httpd = Server((args.addr, args.http_port), Handler)
    dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dns.bind((args.addr, args.dns_port))

    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    threading.Thread(target=serve_dns, args=(dns, names), daemon=True).start()
    say("ready")

    # The test holds our stdin; its end (even by a crash) ends the lab.
    while sys.stdin.buffer.read(4096):
        pass
    os._exit(0)


if __name__ == "__main__":
    main()
