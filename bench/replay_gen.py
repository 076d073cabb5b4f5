#!/usr/bin/env python3
"""Writes a synthetic CloudTrail trail for bench/replay: gzip'd S3-shaped log files
({"Records":[...]}), KMS events of realistic size (1.3 to 1.8 KB each, 1.5 KB on average, as a Decrypt by an
assumed role with its session context, TLS details and S3 encryption context is), of which 1%
are tag and alias changes (TagResource, UntagResource, CreateKey with tags, CreateAlias,
UpdateAlias, DeleteAlias; some break the test policy), a few of those refused by KMS
(errorCode).

Usage: replay_gen.py DIR EVENTS EVENTS_PER_FILE
Deterministic (seeded): the same arguments write the same files.
"""
import gzip
import json
import os
import random
import sys

ACCOUNT = "111122223333"
REGIONS = ["us-east-1", "eu-west-1", "ap-southeast-2"]
AGENTS = [
    "aws-sdk-java/2.20.162 Linux/5.10 Java/17.0.8 vendor/Amazon.com_Inc. io/sync http/Apache",
    "aws-sdk-go-v2/1.21.0 os/linux lang/go#1.21.1 md/GOOS#linux md/GOARCH#amd64 api/kms#1.24.5",
    "s3.amazonaws.com",
]
ROLES = ["app-orders", "app-payments", "etl-nightly", "web-frontend", "analytics-reader"]


def uid(rng):
    h = "%032x" % rng.getrandbits(128)
    return "%s-%s-%s-%s-%s" % (h[:8], h[8:12], h[12:16], h[16:20], h[20:])


def identity(rng, role, session):
    return {
        "type": "AssumedRole",
        "principalId": "AROA%s:%s" % ("EXAMPLE%09d" % (ROLES.index(role) + 1), session),
        "arn": "arn:aws:sts::%s:assumed-role/%s/%s" % (ACCOUNT, role, session),
        "accountId": ACCOUNT,
        "accessKeyId": "ASIA%016X" % rng.getrandbits(64),
        "sessionContext": {
            "sessionIssuer": {
                "type": "Role",
                "principalId": "AROAEXAMPLE%09d" % (ROLES.index(role) + 1),
                "arn": "arn:aws:iam::%s:role/%s" % (ACCOUNT, role),
                "accountId": ACCOUNT,
                "userName": role,
            },
            "attributes": {"creationDate": "2026-11-01T09:58:12Z", "mfaAuthenticated": "false"},
        },
    }


def crypto_event(rng, t, name):
    region = rng.choice(REGIONS)
    role = rng.choice(ROLES)
    key = "arn:aws:kms:%s:%s:key/%s" % (region, ACCOUNT, uid(rng))
    params = {
        "encryptionAlgorithm": "SYMMETRIC_DEFAULT",
        "encryptionContext": {
            "aws:s3:arn": "arn:aws:s3:::%s-data/part-%05d-%s.parquet"
            % (role, rng.randrange(100000), uid(rng)[:18])
        },
    }
    if name == "GenerateDataKey":
        params["keyId"] = key
        params["keySpec"] = "AES_256"
    elif name == "Encrypt":
        params["keyId"] = key
    return {
        "eventVersion": "1.09",
        "userIdentity": identity(rng, role, "session-%d" % rng.randrange(10**6)),
        "eventTime": t,
        "eventSource": "kms.amazonaws.com",
        "eventName": name,
        "awsRegion": region,
        "sourceIPAddress": "10.%d.%d.%d" % (rng.randrange(256), rng.randrange(256), rng.randrange(256)),
        "userAgent": rng.choice(AGENTS),
        "requestParameters": params,
        "responseElements": None,
        "requestID": uid(rng),
        "eventID": uid(rng),
        "readOnly": True,
        "resources": [{"accountId": ACCOUNT, "type": "AWS::KMS::Key", "ARN": key}],
        "eventType": "AwsApiCall",
        "managementEvent": True,
        "recipientAccountId": ACCOUNT,
        "eventCategory": "Management",
        "tlsDetails": {
            "tlsVersion": "TLSv1.3",
            "cipherSuite": "TLS_AES_128_GCM_SHA256",
            "clientProvidedHostHeader": "kms.%s.amazonaws.com" % region,
        },
    }


TAGS_OK = [[{"tagKey": "team:owner", "tagValue": "payments"}], [{"tagKey": "cost:center", "tagValue": "1234"}]]
TAGS_BAD = [[{"tagKey": "Project", "tagValue": "x"}], [{"tagKey": "Department", "tagValue": "IT"}]]


def change_event(rng, t):
    event = crypto_event(rng, t, "Decrypt")
    region = event["awsRegion"]
    key_id = uid(rng)
    key = "arn:aws:kms:%s:%s:key/%s" % (region, ACCOUNT, key_id)
    bad = rng.random() < 0.3
    name = rng.choice(["TagResource", "TagResource", "UntagResource", "CreateKey", "CreateAlias", "UpdateAlias", "DeleteAlias"])
    tags = rng.choice(TAGS_BAD if bad else TAGS_OK)
    alias = "alias/%s%s" % ("legacy-" if bad else "team-", uid(rng)[:8])
    params = {
        "TagResource": {"keyId": key, "tags": tags},
        "UntagResource": {"keyId": key, "tagKeys": ["team:owner" if bad else "cost:center"]},
        "CreateKey": {"description": "bench", "keyUsage": "ENCRYPT_DECRYPT", "keySpec": "SYMMETRIC_DEFAULT",
                      "customerMasterKeySpec": "SYMMETRIC_DEFAULT", "origin": "AWS_KMS",
                      "bypassPolicyLockoutSafetyCheck": False, "multiRegion": False,
                      "tags": tags + ([] if bad else [{"tagKey": "team:owner", "tagValue": "x"}])},
        "CreateAlias": {"aliasName": alias, "targetKeyId": key_id},
        "UpdateAlias": {"aliasName": alias, "targetKeyId": key_id},
        "DeleteAlias": {"aliasName": alias},
    }[name]
    event["eventName"] = name
    event["requestParameters"] = params
    event["readOnly"] = False
    event["resources"] = [{"accountId": ACCOUNT, "type": "AWS::KMS::Key", "ARN": key}]
    if name == "CreateKey":
        event["resources"] = []
        event["responseElements"] = {"keyMetadata": {"aWSAccountId": ACCOUNT, "keyId": key_id, "arn": key}}
    if rng.random() < 0.05:
        event["errorCode"] = "AccessDeniedException"
        event["errorMessage"] = "User: %s is not authorized to perform: kms:%s" % (event["userIdentity"]["arn"], name)
    return event


def main():
    out, total, per_file = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    os.makedirs(out, exist_ok=True)
    rng = random.Random(20)
    written = 0
    n = 0
    while written < total:
        count = min(per_file, total - written)
        hour, minute = divmod(n * 5, 60)
        stamp = "202611%02dT%02d%02dZ" % (1 + hour // 24, hour % 24, minute)
        name = "%s_CloudTrail_us-east-1_%s_%s.json.gz" % (ACCOUNT, stamp, "%016X" % rng.getrandbits(64))
        records = []
        for i in range(count):
            t = "2026-11-%02dT%02d:%02d:%02dZ" % (1 + hour // 24, hour % 24, minute, (i * 60) // count)
            if rng.random() < 0.01:
                records.append(change_event(rng, t))
            else:
                records.append(crypto_event(rng, t, rng.choice(["Decrypt"] * 6 + ["GenerateDataKey"] * 3 + ["Encrypt"])))
        text = '{"Records":[' + ",".join(json.dumps(r, separators=(",", ":")) for r in records) + "]}"
        with gzip.open(os.path.join(out, name), "wb", compresslevel=6) as f:
            f.write(text.encode())
        written += count
        n += 1


if __name__ == "__main__":
    main()
