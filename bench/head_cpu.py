#!/usr/bin/env python3
"""CPU time kms-tag-guard spends on request heads trickled one byte per packet (issue 11, point 6).

    bench/head_cpu.py [BINARY] [HEAD_KIB]

Starts BINARY (default target/release/kms-tag-guard) on a free port, then for a few connections
sends a request head of HEAD_KIB KiB (default 60, under the 64 KiB cap) one byte per write with
TCP_NODELAY and a pause between writes (HEAD_PACE_US, default 100), never ending it, and closes. Prints the proxy's CPU time (user + system, from
/proc/PID/stat) per connection. A parser that reparses the buffered head on each read costs
O(n^2) here; one that resumes costs O(n).
"""
import os
import socket
import subprocess
import sys
import tempfile
import time

BINARY = sys.argv[1] if len(sys.argv) > 1 else "target/release/kms-tag-guard"
HEAD_KIB = int(sys.argv[2]) if len(sys.argv) > 2 else 60
CONNECTIONS = 3
# Pause between writes, so that each read of the proxy finds one byte (HEAD_PACE_US, 100).
PACE = int(os.environ.get("HEAD_PACE_US", "100")) / 1e6


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def head(size):
    start = (
        b"POST / HTTP/1.1\r\nHost: kms.us-east-1.amazonaws.com\r\n"
        b"Content-Type: application/x-amz-json-1.1\r\nX-Amz-Target: TrentService.Encrypt\r\n"
    )
    filler = b"X-Filler: " + b"a" * 1000 + b"\r\n"
    out = start
    while len(out) + len(filler) < size:
        out += filler
    return out  # no final empty line: the head never ends


def main():
    port = free_port()
    work = tempfile.mkdtemp()
    config = os.path.join(work, "ktg.toml")
    with open(config, "w") as f:
        f.write(
            f'[listener]\naddress = "127.0.0.1:{port}"\n[admin]\naddress = ""\n'
            f'[upstream]\nendpoint = "http://127.0.0.1:9"\n'
            f'[audit]\npath = "{work}/audit.log"\n'
            f"[limits]\nheader_read_timeout_ms = 60000\n"
        )
    proxy = subprocess.Popen(
        [BINARY, "serve", "--config", config],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline:
                    sys.exit("the proxy did not start")
                time.sleep(0.05)
        data = head(HEAD_KIB * 1024)
        per_connection = []
        for _ in range(CONNECTIONS):
            before = cpu_seconds(proxy.pid)
            started = time.time()
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for i in range(len(data)):
                    s.send(data[i : i + 1])
                    if PACE:
                        time.sleep(PACE)
            time.sleep(0.2)  # let the proxy finish reading what was sent
            per_connection.append(
                (cpu_seconds(proxy.pid) - before, time.time() - started)
            )
        for cpu, wall in per_connection:
            print(
                f"head of {len(data)} bytes, one byte per write: proxy CPU {cpu * 1000:.0f} ms "
                f"(client took {wall:.2f} s)"
            )
    finally:
        proxy.kill()
        proxy.wait()


main()
