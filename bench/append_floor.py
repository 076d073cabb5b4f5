#!/usr/bin/env python3
"""What writing one audit line costs this machine's kernel, and hashing it: the floor under the
audit path's CPU per tag change (docs/performance.md, "The floor under the audit path").

    bench/append_floor.py [lines] [bytes] [directory]     (defaults: 200000, 960, target/)

Appends `lines` lines of `bytes` bytes (960: a TagResource's decision and outcome records, as
one write) to a file opened O_APPEND in `directory` (the audit log's file system: ext4 here),
from one thread, then from two threads at once, each with its own descriptor (as two connection
threads would, were nothing shared between them), and prints the kernel's CPU per append
(getrusage system time; the Python loop's own time is the user part, left out). Then the
SHA-256 of such a line (hashlib: OpenSSL, with the CPU's SHA extensions where it has them), in
µs per line.
"""

import hashlib
import os
import resource
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def appends(path, lines, line, threads):
    def run():
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            for _ in range(lines // threads):
                os.write(fd, line)
        finally:
            os.close(fd)

    os.truncate(path, 0)
    before = resource.getrusage(resource.RUSAGE_SELF)
    workers = [threading.Thread(target=run) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    after = resource.getrusage(resource.RUSAGE_SELF)
    return (after.ru_stime - before.ru_stime) * 1e6 / (lines // threads * threads)


def main():
    lines = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    size = int(sys.argv[2]) if len(sys.argv) > 2 else 960
    directory = sys.argv[3] if len(sys.argv) > 3 else os.path.join(ROOT, "target")
    os.makedirs(directory, exist_ok=True)
    line = b"x" * (size - 1) + b"\n"
    with tempfile.TemporaryDirectory(dir=directory) as work:
        path = os.path.join(work, "audit.jsonl")
        open(path, "wb").close()
        for threads in (1, 2):
            print("append of %d bytes, %d thread(s): %.2f µs of kernel CPU per append"
                  % (size, threads, appends(path, lines, line, threads)))
    count = 200_000
    started = time.process_time()
    for _ in range(count):
        hashlib.sha256(line).digest()
    print("SHA-256 of %d bytes: %.2f µs per line (with the Python call around it)"
          % (size, (time.process_time() - started) * 1e6 / count))


if __name__ == "__main__":
    main()
