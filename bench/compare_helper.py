#!/usr/bin/env python3
"""Helpers for bench/compare: free ports, readiness probes, a smoke check of each proxy, memory
sampling, recording wrk's results and printing the table. Standard library only."""

import http.client
import json
import os
import signal
import socket
import statistics
import sys
import time

PEERS = ("nginx", "haproxy")
LABEL = {"direct": "direct (no proxy)", "kms-tag-guard": "kms-tag-guard", "nginx": "nginx",
         "haproxy": "HAProxy", "kms-tag-guard-b": "kms-tag-guard B",
         "haproxy-l4": "HAProxy TCP (L4)"}
KIND = {"Encrypt": "Encrypt (pass-through)", "TagResource": "TagResource (inspected)"}
ORDER = ("direct", "kms-tag-guard", "kms-tag-guard-b", "nginx", "haproxy", "haproxy-l4")


def kv(args):
    out = {}
    for arg in args:
        key, _, value = arg.partition("=")
        out[key] = value
    return out


def ports(n):
    """n distinct free TCP ports on 127.0.0.1 (held together while chosen)."""
    socks = []
    for _ in range(int(n)):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    print(" ".join(str(s.getsockname()[1]) for s in socks))
    for s in socks:
        s.close()


def probe(port):
    try:
        socket.create_connection(("127.0.0.1", int(port)), timeout=0.5).close()
        return 0
    except OSError:
        return 1


HEAD = {
    "Host": "kms.us-east-1.amazonaws.com",
    "Content-Type": "application/x-amz-json-1.1",
    "X-Amz-Date": "20261128T120000Z",
    "Authorization": "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20261128/us-east-1/kms/"
                     "aws4_request, SignedHeaders=content-type;host;x-amz-date;x-amz-target, "
                     "Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7",
}


def read_lua_body(path):
    text = open(path).read()
    start = text.index("wrk.body = [[") + len("wrk.body = [[")
    return text[start:text.index("]]", start)]


def check(ktg, nginx, haproxy, audit, l4=None):
    """One Encrypt and one TagResource through each proxy: both must get the stand-in's answer,
    and kms-tag-guard must audit the TagResource as allowed."""
    work = os.path.dirname(audit)
    bodies = {k: read_lua_body(os.path.join(work, k + ".lua")) for k in ("Encrypt", "TagResource")}
    targets = [("kms-tag-guard", ktg), ("nginx", nginx), ("haproxy", haproxy)]
    if l4:
        targets.append(("haproxy-l4", l4))
    for name, port in targets:
        for kind, body in bodies.items():
            conn = http.client.HTTPConnection("127.0.0.1", int(port), timeout=10)
            headers = dict(HEAD, **{"X-Amz-Target": "TrentService." + kind})
            conn.request("POST", "/", body=body.encode(), headers=headers)
            response = conn.getresponse()
            answer = response.read()
            conn.close()
            want = b"CiphertextBlob" if kind == "Encrypt" else b"{}"
            if response.status != 200 or want not in answer:
                sys.exit(f"check: {kind} through {name} got {response.status} {answer[:300]!r}")
    records = [json.loads(line) for line in open(audit) if line.strip()]
    decisions = [r for r in records if r.get("event") == "decision"]
    if not decisions or any(r["decision"] != "allow" for r in decisions):
        sys.exit(f"check: kms-tag-guard did not audit the TagResource as allowed: {records}")


def status_kib(pid, field):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def descendants(pid):
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def cpu_ticks(pid):
    """CPU time (user, system; clock ticks) of pid and its descendants, threads included."""
    user = system = 0
    for p in descendants(int(pid)):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            user += int(fields[11])
            system += int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return user, system


def machine_cpu():
    """Prints the machine's busy and steal time so far (clock ticks), and the time in seconds."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    print(f"{user + nice + system + irq + softirq},{steal},{time.monotonic():.3f}")


def cpu(pid):
    """Prints `user,system` ticks of a process tree (0,0 for pid 0)."""
    user, system = cpu_ticks(pid) if int(pid) else (0, 0)
    print(f"{user},{system}")


def sample(pid, out):
    """Samples the resident memory of pid and its descendants every 50 ms until SIGTERM; keeps
    the maximum of the sum, and pid's own VmHWM (peak RSS over its life)."""
    pid = int(pid)
    state = {"rss_max_kib": 0, "hwm_kib": 0, "processes": 0, "samples": 0}

    def write():
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, out)

    def stop(*_):
        write()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    while True:
        procs = descendants(pid)
        total = sum(status_kib(p, "VmRSS") for p in procs)
        state["rss_max_kib"] = max(state["rss_max_kib"], total)
        state["hwm_kib"] = status_kib(pid, "VmHWM") or state["hwm_kib"]
        state["processes"] = len(procs)
        state["samples"] += 1
        if state["samples"] % 10 == 0:
            write()
        time.sleep(0.05)


def record(out, results, *args):
    meta = kv(args)
    with open(out) as f:
        wrk = json.load(f)
    seconds = wrk["duration_us"] / 1e6
    entry = dict(rps=wrk["requests"] / seconds, **{k: wrk[k] for k in (
        "requests", "p50_us", "p90_us", "p99_us", "max_us", "mean_us")})
    ticks = os.sysconf("SC_CLK_TCK")
    for who in ("proxy", "standin"):
        before, after = meta.pop(who + "_cpu_before", None), meta.pop(who + "_cpu_after", None)
        if before and after:
            (u0, s0), (u1, s1) = ([int(x) for x in v.split(",")] for v in (before, after))
            per_request = 1e6 / ticks / max(wrk["requests"], 1)
            entry[who + "_user_us"] = (u1 - u0) * per_request
            entry[who + "_sys_us"] = (s1 - s0) * per_request
            entry[who + "_cpu_us"] = entry[who + "_user_us"] + entry[who + "_sys_us"]
    # What else ran meanwhile: busy time of the whole machine less the proxy, the stand-in and
    # wrk, as a share of all CPUs over the run. Other builds or tests on the machine show here.
    before, after = meta.pop("machine_before", None), meta.pop("machine_after", None)
    wrk_cpu = meta.pop("wrk_cpu", None)
    if before and after and wrk_cpu:
        (b0, st0, t0), (b1, st1, t1) = ([float(x) for x in v.split(",")] for v in (before, after))
        wrk_seconds = sum(float(x) for x in wrk_cpu.split(","))
        ours = wrk_seconds + sum(entry.get(w + "_cpu_us", 0) for w in ("proxy", "standin")) \
            * wrk["requests"] / 1e6
        capacity = (t1 - t0) * os.cpu_count()
        entry["wrk_cpu_us"] = wrk_seconds * 1e6 / max(wrk["requests"], 1)
        entry["other_cpu_pct"] = max(0.0, ((b1 - b0) / ticks - ours) / capacity * 100)
        entry["steal_pct"] = (st1 - st0) / ticks / capacity * 100
    entry.update(meta)
    entry["errors"] = sum(wrk["errors"].values())
    entry["error_detail"] = wrk["errors"]
    with open(results, "a") as f:
        f.write(json.dumps(entry) + "\n")
    err = f", {entry['errors']} errors {wrk['errors']}" if entry["errors"] else ""
    cpu_text = (f"  proxy CPU {entry['proxy_cpu_us']:5.1f} µs/req (user {entry['proxy_user_us']:.1f})"
                if "proxy_cpu_us" in entry else "")
    cpu_text += f"  stand-in {entry['standin_cpu_us']:4.1f}" if "standin_cpu_us" in entry else ""
    cpu_text += f"  wrk {entry['wrk_cpu_us']:4.1f}" if "wrk_cpu_us" in entry else ""
    if "other_cpu_pct" in entry:
        cpu_text += f"  other load {entry['other_cpu_pct']:4.1f}%  steal {entry['steal_pct']:4.1f}%"
    print(f"    {meta.get('phase'):6} {meta.get('upstream'):5} {meta.get('kind'):11} "
          f"{LABEL.get(meta.get('target'), meta.get('target')):18} {entry['rps']:9.0f} req/s  "
          f"p50 {wrk['p50_us'] / 1000:6.2f} ms  p99 {wrk['p99_us'] / 1000:6.2f} ms{cpu_text}{err}",
          file=sys.stderr)
    # Answers other than 2xx mean a broken setup, not a slow proxy: the figures would be wrong.
    if wrk["errors"]["status"] > 0.01 * max(wrk["requests"], 1):
        sys.exit(f"record: {wrk['errors']['status']} of {wrk['requests']} answers were not 2xx")


def record_rss(path, results, *args):
    with open(path) as f:
        mem = json.load(f)
    with open(results, "a") as f:
        f.write(json.dumps(dict(kv(args), phase="memory", **mem)) + "\n")


def mib(kib):
    return kib / 1024


def report(results, *args):
    meta = kv(args)
    rows = [json.loads(line) for line in open(results) if line.strip()]
    main = [r for r in rows if r["phase"] == "main"]
    groups = {}
    for r in main:
        groups.setdefault((r["upstream"], r["kind"], r["target"]), []).append(r)
    med = {}
    for key, rs in groups.items():
        med[key] = {
            "rps": statistics.median(r["rps"] for r in rs),
            "p50": statistics.median(r["p50_us"] for r in rs) / 1000,
            "p99": statistics.median(r["p99_us"] for r in rs) / 1000,
            "errors": sum(r["errors"] for r in rs),
            "cpu": statistics.median(r["proxy_cpu_us"] for r in rs) if all(
                "proxy_cpu_us" in r for r in rs) else None,
            "user": statistics.median(r["proxy_user_us"] for r in rs) if all(
                "proxy_user_us" in r for r in rs) else None,
            "standin_cpu": statistics.median(r["standin_cpu_us"] for r in rs) if all(
                "standin_cpu_us" in r for r in rs) else None,
            "other": max((r.get("other_cpu_pct", 0) for r in rs), default=0),
            "rounds": len(rs),
        }
    upstreams = [u for u in ("plain", "tls") if any(k[0] == u for k in med)]

    print()
    print("kms-tag-guard, nginx and HAProxy in front of a KMS stand-in (nginx, fixed answers)")
    print(f"machine:  {meta.get('machine', '?')}")
    print(f"software: {meta.get('versions', '?')}")
    print(f"method:   {meta.get('method', '?')}; load average at the end {meta.get('load', '?')}")
    print(f"command:  {meta.get('command', 'bench/compare').strip()}")
    if meta.get("variant"):
        print(f"kms-tag-guard B: the same binary and config with {meta['variant']}")
    print()
    header = (f"| {'upstream':8} | {'request':23} | {'through':17} | {'req/s':>8} | "
              f"{'p50 ms':>6} | {'p99 ms':>6} | {'vs best peer':>12} | {'CPU µs/req (user)':>17} | "
              f"{'other load':>10} | {'errors':>6} |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for upstream in upstreams:
        for kind in ("Encrypt", "TagResource"):
            best = max((med[(upstream, kind, p)]["rps"] for p in PEERS
                        if (upstream, kind, p) in med), default=None)
            for target in ORDER:
                m = med.get((upstream, kind, target))
                if m is None:
                    continue
                ratio = f"{m['rps'] / best:.2f}x" if best and target != "direct" else ""
                where = upstream if upstream == "plain" else "TLS"
                name = LABEL[target] if not (target == "direct" and upstream == "tls") \
                    else "direct (wrk TLS)"
                cpu_text = f"{m['cpu']:.1f} ({m['user']:.1f})" if m["cpu"] is not None else ""
                print(f"| {where:8} | {KIND[kind]:23} | {name:17} | {m['rps']:8.0f} | "
                      f"{m['p50']:6.2f} | {m['p99']:6.2f} | {ratio:>12} | {cpu_text:>17} | "
                      f"{m['other']:9.1f}% | {m['errors']:6d} |")

    print()
    print("CPU µs/req: CPU time (user + system, all processes and threads) the proxy spent per "
          "request, user-space part in brackets;\non shared cores it decides throughput. "
          "vs best peer: req/s over the better of nginx and HAProxy. other load: the largest share\n"
          "of the machine's CPUs that processes other than wrk, the stand-in and the proxy used "
          "during one of the row's runs.")
    busiest = max((r.get("other_cpu_pct", 0) for r in main), default=0)
    if busiest > 10:
        print(f"WARNING: something else used up to {busiest:.0f}% of the CPUs during a measured run; "
              "the figures are skewed. Rerun on a quiet machine.")
    mem = [r for r in rows if r["phase"] == "memory"]
    rss = [r for r in rows if r["phase"] == "rss"]
    if mem:
        print()
        conns = mem[0]["connections"]
        print(f"With {conns} connections (one wrk run per proxy and request kind, after the rounds):")
        print()
        h2 = (f"| {'upstream':8} | {'through':15} | {'Encrypt req/s':>13} | {'p99 ms':>6} | "
              f"{'TagResource req/s':>17} | {'p99 ms':>6} | {'peak RSS MiB':>12} |")
        print(h2)
        print("|" + "|".join("-" * len(c) for c in h2.split("|")[1:-1]) + "|")
        for m in mem:
            def pick(kind):
                for r in rss:
                    if (r["upstream"], r["target"], r["kind"]) == (m["upstream"], m["target"], kind):
                        return r
                return None
            e, t = pick("Encrypt"), pick("TagResource")
            peak = mib(max(m["hwm_kib"], m["rss_max_kib"])) if m["target"] == "kms-tag-guard" \
                else mib(m["rss_max_kib"])
            where = m["upstream"] if m["upstream"] == "plain" else "TLS"
            print(f"| {where:8} | {LABEL[m['target']]:15} | {e['rps'] if e else 0:13.0f} | "
                  f"{(e['p99_us'] / 1000) if e else 0:6.2f} | {t['rps'] if t else 0:17.0f} | "
                  f"{(t['p99_us'] / 1000) if t else 0:6.2f} | {peak:12.1f} |")
        print()
        print("peak RSS: kms-tag-guard's VmHWM (its peak over the whole run); nginx: master and "
              "workers summed, HAProxy: its process, sampled every 50 ms during the phase.")

    serial = [r for r in rows if r["phase"] == "serial"]
    sgroups = {}
    for r in serial:
        sgroups.setdefault((r["upstream"], r["kind"], r["target"]), []).append(r)
    smed = {key: {
        "mean": statistics.median(r["mean_us"] for r in rs),
        "p50": statistics.median(r["p50_us"] for r in rs),
        "p99": statistics.median(r["p99_us"] for r in rs),
        "cpu": statistics.median(r["proxy_cpu_us"] for r in rs) if all(
            "proxy_cpu_us" in r for r in rs) else None,
        "rounds": len(rs),
    } for key, rs in sgroups.items()}
    if smed:
        print()
        print("One request at a time (wrk -t1 -c1), medians of rounds:")
        print()
        h3 = (f"| {'upstream':8} | {'request':23} | {'through':17} | {'mean µs':>8} | "
              f"{'p50 µs':>7} | {'p99 µs':>7} | {'added over best peer µs (p50)':>29} | "
              f"{'CPU µs/req':>10} |")
        print(h3)
        print("|" + "|".join("-" * len(c) for c in h3.split("|")[1:-1]) + "|")
        for upstream in upstreams:
            for kind in ("Encrypt", "TagResource"):
                best = min((smed[(upstream, kind, p)]["mean"] for p in PEERS
                            if (upstream, kind, p) in smed), default=None)
                best50 = min((smed[(upstream, kind, p)]["p50"] for p in PEERS
                              if (upstream, kind, p) in smed), default=None)
                for target in ORDER:
                    m = smed.get((upstream, kind, target))
                    if m is None:
                        continue
                    added = f"{m['mean'] - best:+.0f} ({m['p50'] - best50:+.0f})" \
                        if best is not None and target != "direct" else ""
                    where = upstream if upstream == "plain" else "TLS"
                    cpu_text = f"{m['cpu']:.1f}" if m["cpu"] is not None else ""
                    print(f"| {where:8} | {KIND[kind]:23} | {LABEL[target]:17} | "
                          f"{m['mean']:8.0f} | {m['p50']:7.0f} | {m['p99']:7.0f} | {added:>29} | "
                          f"{cpu_text:>10} |")
        print()
        print("added over best peer: the mean latency less the lower of nginx's and HAProxy's "
              "means for the same request;\nin brackets the same for the medians (p50), which "
              "the noise of a shared machine moves less.")

    print()
    print("Targets (issue #20, the audit path):")
    for upstream in upstreams:
        where = "plain upstream" if upstream == "plain" else "TLS upstream"
        ktg = med.get((upstream, "TagResource", "kms-tag-guard"))
        peers = [med[(upstream, "TagResource", p)] for p in PEERS
                 if (upstream, "TagResource", p) in med]
        if ktg and ktg["cpu"] is not None and peers and all(p["cpu"] is not None for p in peers):
            best = min(p["cpu"] for p in peers)
            print(f"  [{'MET    ' if ktg['cpu'] <= 1.3 * best else 'NOT MET'}] {where}: CPU per "
                  f"inspected TagResource <= 1.3 x best peer's: {ktg['cpu']:.1f} µs vs "
                  f"{best:.1f} ({ktg['cpu'] / best:.2f}x)")
        sk = smed.get((upstream, "TagResource", "kms-tag-guard"))
        speers = [smed[(upstream, "TagResource", p)] for p in PEERS
                  if (upstream, "TagResource", p) in smed]
        if sk and speers:
            added = sk["mean"] - min(p["mean"] for p in speers)
            added50 = sk["p50"] - min(p["p50"] for p in speers)
            print(f"  [{'MET    ' if added <= 30 else 'NOT MET'}] {where}: one TagResource at a "
                  f"time adds <= 30 µs over the best peer: {added:+.0f} µs (mean; p50 "
                  f"{added50:+.0f} µs)")

    print()
    print("Targets (issue #5):")
    for upstream in upstreams:
        where = "plain upstream" if upstream == "plain" else "TLS upstream"
        g = lambda kind, t: med.get((upstream, kind, t))  # noqa: E731
        ktg_e, ktg_t = g("Encrypt", "kms-tag-guard"), g("TagResource", "kms-tag-guard")
        peers_e = [g("Encrypt", p) for p in PEERS if g("Encrypt", p)]
        peers_t = [g("TagResource", p) for p in PEERS if g("TagResource", p)]
        if not (ktg_e and ktg_t and peers_e and peers_t):
            continue
        best_e = max(p["rps"] for p in peers_e)
        best_p99 = min(p["p99"] for p in peers_e)
        best_t = max(p["rps"] for p in peers_t)
        verdict = lambda ok: "MET    " if ok else "NOT MET"  # noqa: E731
        print(f"  [{verdict(ktg_e['rps'] >= 1.15 * best_e)}] {where}: Encrypt req/s >= 1.15 x "
              f"best peer: {ktg_e['rps']:.0f} vs {1.15 * best_e:.0f} "
              f"({ktg_e['rps'] / best_e:.2f}x)")
        print(f"  [{verdict(ktg_e['p99'] <= best_p99)}] {where}: Encrypt p99 <= best peer's: "
              f"{ktg_e['p99']:.2f} ms vs {best_p99:.2f} ms")
        print(f"  [{verdict(ktg_t['rps'] >= best_t)}] {where}: TagResource (inspected) req/s >= "
              f"best peer's (which pass it through): {ktg_t['rps']:.0f} vs {best_t:.0f} "
              f"({ktg_t['rps'] / best_t:.2f}x)")
        floor = g("Encrypt", "haproxy-l4")
        if floor:
            cpu_text = f", {floor['cpu']:.1f} µs CPU/req" if floor["cpu"] is not None else ""
            print(f"  reference, {where}: HAProxy in TCP mode, which reads no HTTP at all, passed "
                  f"Encrypt at {floor['rps']:.0f} req/s ({floor['rps'] / best_e:.2f}x best peer"
                  f"{cpu_text})")
    for m in mem:
        if m["target"] == "kms-tag-guard":
            peak = mib(max(m["hwm_kib"], m["rss_max_kib"]))
            where = "plain upstream" if m["upstream"] == "plain" else "TLS upstream"
            print(f"  [{'MET    ' if peak <= 32 else 'NOT MET'}] {where}: kms-tag-guard peak RSS "
                  f"<= 32 MiB with {m['connections']} connections: {peak:.1f} MiB")
    errors = sum(r["errors"] for r in rows if r["phase"] in ("main", "rss"))
    if errors:
        print(f"\nWARNING: {errors} wrk errors (non-2xx answers, timeouts or socket errors); "
              "see the per-run lines above")


def pids(pid):
    print(",".join(str(p) for p in descendants(int(pid))))


def read_perf_stat(path):
    counts = {}
    for line in open(path):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.strip().split(",")
        if len(fields) < 3:
            continue
        try:
            counts[fields[2]] = float(fields[0])
        except ValueError:
            counts[fields[2]] = 0.0
    return counts


def perf_lines(path, limit, keep=lambda line: True):
    out = []
    for line in open(path, errors="replace"):
        if line.startswith("#") or not line.strip() or "%" not in line:
            continue
        if keep(line):
            out.append(line.rstrip())
        if len(out) >= limit:
            break
    return out


# The parts of the request path worth seeing with their callees included.
INCLUSIVE = ("pipeline::handle", "pipeline::pass_through", "pipeline::inspect",
             "pipeline::forward_inspected", "pipeline::read_body", "pipeline::read_response",
             "pipeline::prepare_forward", "inspect::judge", "parse_tag_request",
             "Policy::evaluate", "classify::classify", "audit::AuditLog::write",
             "audit::timestamp", "DecisionRecord", "serde_json::ser", "uuid::", "getrandom",
             "metrics::Metrics::request", "strip_hop_by_hop", "Client<C,B>::send_request",
             "Client<C,B>::request", "pool::Checkout", "tokio::time::sleep", "Timeout<",
             "tokio::runtime::task::spawn", "task::raw::schedule", "hyper::proto::h1::role",
             "Dispatcher<D,Bs,I,T>::poll_write", "Dispatcher<D,Bs,I,T>::poll_read",
             "__GI___writev", "__libc_write", "__libc_recv", "__x64_sys_futex",
             "do_epoll_wait", "malloc", "_int_free")


def profile_report(out, upstream="plain"):
    print()
    print(f"Per request, {upstream} upstream (perf stat on the proxy's processes while wrk ran; perf "
          "itself slows the proxies, so req/s here is lower than in the table):")
    print()
    syscalls = ("recvfrom", "sendto", "read", "write", "readv", "writev", "recvmsg", "sendmsg",
                "epoll_wait", "epoll_ctl", "futex", "getrandom", "sched_yield")
    rows = []
    for kind in ("Encrypt", "TagResource"):
        for target in ("kms-tag-guard", "nginx", "haproxy"):
            stat = os.path.join(out, f"stat-{target}-{kind}.csv")
            wrk_path = os.path.join(out, f"wrk-stat-{target}-{kind}.json")
            if not (os.path.exists(stat) and os.path.exists(wrk_path)):
                continue
            counts = read_perf_stat(stat)
            wrk = json.load(open(wrk_path))
            n = max(wrk["requests"], 1)
            row = {"kind": kind, "target": target, "rps": wrk["requests"] / (wrk["duration_us"] / 1e6),
                   "cpu": counts.get("task-clock", 0) * 1000 / n,
                   "cs": counts.get("context-switches", 0) / n,
                   "sys": counts.get("raw_syscalls:sys_enter", 0) / n}
            for sc in syscalls:
                row[sc] = counts.get(f"syscalls:sys_enter_{sc}", 0) / n
            rows.append(row)
    shown = [sc for sc in syscalls if any(r[sc] >= 0.01 for r in rows)]
    head = ["request", "through", "req/s", "CPU µs", "ctx sw", "syscalls"] + shown
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in rows:
        cells = [r["kind"], LABEL[r["target"]], f"{r['rps']:.0f}", f"{r['cpu']:.1f}",
                 f"{r['cs']:.2f}", f"{r['sys']:.2f}"] + [f"{r[sc]:.2f}" for sc in shown]
        print("| " + " | ".join(cells) + " |")
    for kind in ("Encrypt", "TagResource"):
        base = os.path.join(out, f"report-{kind}")
        if not os.path.exists(base + "-self.txt"):
            continue
        print()
        print(f"kms-tag-guard, {kind}: CPU samples by binary")
        for line in perf_lines(base + "-dso.txt", 6):
            print("   " + line.strip())
        print(f"kms-tag-guard, {kind}: top 30 symbols (self)")
        for line in perf_lines(base + "-self.txt", 30):
            print("   " + line.strip())
        print(f"kms-tag-guard, {kind}: parts of the path, callees included")
        for line in perf_lines(base + "-inclusive.txt", 40,
                               lambda line: any(k in line for k in INCLUSIVE)):
            print("   " + line.strip()[:150])


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "ports":
        ports(*args)
    elif cmd == "probe":
        sys.exit(probe(*args))
    elif cmd == "check":
        check(*args)
    elif cmd == "pids":
        pids(*args)
    elif cmd == "profile-report":
        profile_report(*args)
    elif cmd == "machine-cpu":
        machine_cpu()
    elif cmd == "cpu":
        cpu(*args)
    elif cmd == "sample":
        sample(*args)
    elif cmd == "record":
        record(*args)
    elif cmd == "record-rss":
        record_rss(*args)
    elif cmd == "report":
        report(*args)
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
