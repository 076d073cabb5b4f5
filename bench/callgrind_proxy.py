#!/usr/bin/env python3
"""Exact instruction counts of the running proxy, per request, under valgrind's callgrind.

    bench/callgrind_proxy.py [Encrypt|TagResource] [requests]     (defaults: both kinds, 2000)

Starts a KMS stand-in (a thread answering every request with a fixed JSON body), runs
target/release/kms-tag-guard under callgrind in front of it with the default policy and an audit
file, sends the requests one at a time on one keep-alive connection (after 200 warm-up requests),
stops the proxy and prints the instructions per request of the request path's main functions.
Output files: target/bench-profile/callgrind-<kind>.out (open with callgrind_annotate).
Needs valgrind (apt-get install valgrind) and a release build (cargo build --release).
KTG_BIN=<binary> runs another build (e.g. an older commit's, for a before/after); CALLGRIND_TAG=x
names the output files callgrind-<kind>-x.out. The first line per kind is the whole process
(every thread: connection threads, the audit writer, the runtime) per request.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("KTG_BIN") or os.path.join(ROOT, "target", "release", "kms-tag-guard")
TAG = os.environ.get("CALLGRIND_TAG", "")
OUT = os.path.join(ROOT, "target", "bench-profile")
WARMUP = 200

KEY = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
BODIES = {
    "Encrypt": '{"KeyId":"%s","Plaintext":"%s"}' % (KEY, "QUFB" * 25),
    "TagResource": '{"KeyId":"%s","Tags":[{"TagKey":"team:owner","TagValue":"payments"},'
    '{"TagKey":"cost:center","TagValue":"4711"}]}' % KEY,
}
FUNCTIONS = [
    "kms_tag_guard::proxy::connection::serve_accepted::{{closure}}",
    "kms_tag_guard::proxy::h1::Connection<I>::handle::{{closure}}",
    "kms_tag_guard::proxy::h1::head::parse_request",
    "kms_tag_guard::kms::classify::classify",
    "kms_tag_guard::proxy::h1::Connection<I>::answer_head::{{closure}}",
    "kms_tag_guard::decide::decide",
    "kms_tag_guard::record::decision::{{closure}}",
    "kms_tag_guard::record::DecisionRecord::new",
    "kms_tag_guard::record::outcome",
    "kms_tag_guard::record::new_request_id",
    "kms_tag_guard::audit::AuditLog::queue_holding",
    "kms_tag_guard::audit::AuditLog::written::{{closure}}",
    "kms_tag_guard::audit::OutcomeSlot::write",
    "kms_tag_guard::audit::encode",
    "<kms_tag_guard::record::DecisionRecord as kms_tag_guard::audit::Record>::write_json",
    "<kms_tag_guard::record::OutcomeRecord as kms_tag_guard::audit::Record>::write_json",
    "serde_json::ser::format_escaped_str",
    "kms_tag_guard::audit::Core::write_direct",
    "kms_tag_guard::audit::run",
    "kms_tag_guard::audit::Writer::run",
    "kms_tag_guard::metrics::Metrics::request",
]


def request(kind):
    body = BODIES[kind].encode()
    head = (
        "POST / HTTP/1.1\r\nHost: kms.us-east-1.amazonaws.com\r\n"
        "Content-Type: application/x-amz-json-1.1\r\nX-Amz-Target: TrentService.%s\r\n"
        "X-Amz-Date: 20261128T120000Z\r\nAuthorization: AWS4-HMAC-SHA256 "
        "Credential=AKIAIOSFODNN7EXAMPLE/20261128/us-east-1/kms/aws4_request, "
        "SignedHeaders=content-type;host;x-amz-date;x-amz-target, "
        "Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7\r\n"
        "User-Agent: aws-sdk-rust/1.0 os/linux lang/rust/1.85\r\nContent-Length: %d\r\n\r\n"
        % (kind, len(body))
    )
    return head.encode() + body


def read_message(sock, buf):
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed")
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        rest += sock.recv(65536)
    return head, rest[length:]


def stand_in(listener):
    answer_body = b'{"KeyId":"%s"}' % KEY.encode()
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-amz-json-1.1\r\n"
        b"x-amzn-RequestId: 00000000-0000-0000-0000-000000000000\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(answer_body), answer_body)
    )

    def serve(conn):
        buf = b""
        try:
            while True:
                _, buf = read_message(conn, buf)
                conn.sendall(answer)
        except (RuntimeError, OSError):
            conn.close()

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(kind, count, upstream_port):
    port = free_port()
    work = tempfile.mkdtemp(prefix="ktg-callgrind-")
    config = os.path.join(work, "ktg.toml")
    with open(os.path.join(ROOT, "config", "kms-tag-guard.toml")) as f:
        policy = f.read()
    policy = policy[policy.index("[policy]"):]
    with open(config, "w") as f:
        f.write(
            '[listener]\naddress = "127.0.0.1:%d"\n[admin]\naddress = ""\n'
            '[upstream]\nendpoint = "http://127.0.0.1:%d"\n[audit]\npath = "%s"\n%s'
            % (port, upstream_port, os.path.join(work, "audit.jsonl"), policy)
        )
    out = os.path.join(OUT, "callgrind-%s%s.out" % (kind, "-" + TAG if TAG else ""))
    proxy = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=" + out, BIN, "serve",
         "--config", config],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, RUST_LOG="warn"),
    )
    try:
        for _ in range(300):
            try:
                sock = socket.create_connection(("127.0.0.1", port))
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError("the proxy did not start under valgrind")
        message, buf = request(kind), b""
        for _ in range(WARMUP + count):
            sock.sendall(message)
            head, buf = read_message(sock, buf)
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError("unexpected answer: %r" % head[:80])
        sock.close()
    finally:
        proxy.send_signal(signal.SIGINT)
        proxy.wait()
    report = subprocess.run(["callgrind_annotate", "--inclusive=yes", out],
                            capture_output=True, text=True).stdout
    total = WARMUP + count
    print("%s: instructions per request (inclusive), %d requests incl. warm-up" % (kind, total))
    totals = re.search(r"([\d,]+) \(100.0%\)\s+PROGRAM TOTALS", report)
    if totals:
        per = int(totals.group(1).replace(",", "")) / total
        print("  %9.0f  the whole process (every thread, start-up included)" % per)
    for name in FUNCTIONS:
        for line in report.splitlines():
            match = re.match(r"\s*([\d,]+) \([^)]*\)\s+\?\?\?:(.*) \[", line)
            if match and match.group(2) == name:
                per = int(match.group(1).replace(",", "")) / total
                print("  %9.0f  %s" % (per, name.replace("kms_tag_guard::", "")))
                break


def main():
    kinds = [sys.argv[1]] if len(sys.argv) > 1 else ["Encrypt", "TagResource"]
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    os.makedirs(OUT, exist_ok=True)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    threading.Thread(target=stand_in, args=(listener,), daemon=True).start()
    for kind in kinds:
        run(kind, count, listener.getsockname()[1])


if __name__ == "__main__":
    main()
