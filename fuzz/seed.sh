#!/bin/sh
# Writes the seed corpus of the `pipeline` fuzz target to fuzz/corpus/pipeline/seed-*:
#   - every [[case]] of policy-tests/*.toml (headers as `kms-tag-guard test` builds them, body);
#   - every JSON body literal of tests/fail_closed.rs, sent to the operation it is sent to there;
#   - a few request heads the raw tests send (repeated headers, hop-by-hop tricks, absolute URIs).
# The seed-<hash> files it wrote before are replaced; seed-regress-* and inputs the fuzzer added
# are left alone.
# Needs python3 >= 3.11 (tomllib). Usage: fuzz/seed.sh   (from anywhere)
set -eu
cd "$(dirname "$0")/.."
exec python3 - "$@" <<'PY'
import hashlib, os, re, tomllib
from pathlib import Path

out = Path("fuzz/corpus/pipeline")
out.mkdir(parents=True, exist_ok=True)
for old in out.glob("seed-*"):
    if re.fullmatch(r"seed-[0-9a-f]{16}", old.name):  # ours; seed-regress-* and others stay
        old.unlink()

HOST = "kms.us-east-1.amazonaws.com"
CT = "application/x-amz-json-1.1"
KEY = "1234abcd-12ab-34cd-56ef-1234567890ab"
MAX_BODY = 2048  # padded bodies are cut to this: seeds stay small, still over the limit of tests/fixtures/all-rules.toml
seeds = {}

def seed(headers, body, request_line=None):
    head = [] if request_line is None else [request_line]
    head += [f"{k}: {v}" for k, v in headers]
    data = ("\n".join(head) + "\n\n").encode() + body
    name = "seed-" + hashlib.sha1(data).hexdigest()[:16]
    seeds[name] = data

def kms(target, body, extra=(), akid=None, request_line=None):
    names = {k.lower() for k, _ in extra}
    headers = []
    if "host" not in names:
        headers.append(("Host", HOST))
    if "content-type" not in names:
        headers.append(("Content-Type", CT))
    if "x-amz-target" not in names:
        headers.append(("X-Amz-Target", target))
    if akid and "authorization" not in names:
        headers.append(("Authorization",
            f"AWS4-HMAC-SHA256 Credential={akid}/20260101/us-east-1/kms/aws4_request, "
            "SignedHeaders=content-type;host;x-amz-date;x-amz-target, Signature=0"))
    headers += list(extra)
    seed(headers, body, request_line)

# The policy test cases.
for path in sorted(Path("policy-tests").glob("*.toml")):
    for case in tomllib.loads(path.read_text())["case"]:
        target = case.get("target") or "TrentService." + case["operation"]
        if "body_hex" in case:
            body = bytes.fromhex("".join(case["body_hex"].split()))
        else:
            body = case["body"].encode()
        pad = min(case.get("pad_body_to", 0), MAX_BODY)
        body = body + b" " * max(0, pad - len(body))
        kms(target, body, [tuple(h) for h in case.get("headers", [])], case.get("access_key_id"))

# The JSON bodies of the raw fail-closed tests.
TARGETS = {"TAG_RESOURCE": "TrentService.TagResource",
           "UNTAG_RESOURCE": "TrentService.UntagResource",
           "CREATE_KEY": "TrentService.CreateKey"}
source = Path("tests/fail_closed.rs").read_text()
for m in re.finditer(r'r#"(.*?)"#', source, re.S):
    text = m.group(1)
    if not text.startswith("{"):
        continue
    body = text.replace("{KEY}", KEY).replace("{member}", "tags")
    if re.search(r"\{[A-Za-z_]*\}", body.replace("{{", "").replace("}}", "")):
        continue  # built from other pieces at run time
    body = body.replace("{{", "{").replace("}}", "}")
    after = source[m.end():m.end() + 600]
    found = [(after.find(n), t) for n, t in TARGETS.items() if after.find(n) >= 0]
    target = min(found)[1] if found else TARGETS["TAG_RESOURCE"]
    kms(target, body.encode())

# Heads the raw tests send.
ALLOWED = f'{{"KeyId":"{KEY}","Tags":[{{"TagKey":"team:owner","TagValue":"payments"}}]}}'.encode()
TAG = "TrentService.TagResource"
kms(TAG, ALLOWED, [("X-Amz-Target", "TrentService.Encrypt"), ("X-Amz-Target", TAG)])
kms(TAG, ALLOWED, [("Host", HOST), ("Host", "kms.eu-west-1.amazonaws.com")])
kms(TAG, ALLOWED, [("Connection", "keep-alive, X-Amz-Target")])
kms(TAG, ALLOWED, [("Content-Length", "10"), ("Content-Length", "10")])
kms(TAG, ALLOWED, [("Transfer-Encoding", "chunked")])
kms(TAG, ALLOWED, [("X-Amz-Target", " trentservice.tagresource\t")])
kms(TAG, ALLOWED, request_line="PUT /")
kms(TAG, ALLOWED, request_line="POST /?Action=TagResource")
kms(TAG, ALLOWED, request_line=f"POST http://{HOST}/")
kms(TAG, ALLOWED, request_line="POST http://kms.eu-west-1.amazonaws.com/")
kms(TAG, ALLOWED, request_line="POST /?X-Amz-Credential=AKIDQUERY%2F20260101%2Fus-east-1%2Fkms%2Faws4_request",
    akid="AKIDHEADER")
kms("TrentService.Encrypt", b'{"KeyId":"k","Plaintext":"aGVsbG8="}')
kms("TrentService.Frobnicate", b"{}")
kms("TrentService.CreateKey", b'{"Description":"d","X":' + b"[" * 200 + b"1" + b"]" * 200 + b"}")

for name, data in sorted(seeds.items()):
    (out / name).write_bytes(data)
total = sum(len(d) for d in seeds.values())
print(f"{len(seeds)} seeds, {total} bytes in {out}")
PY
