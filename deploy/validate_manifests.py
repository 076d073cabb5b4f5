"""Validate the Kubernetes manifests under a directory (run by deploy/validate.sh, in its venv).

For every *.yaml / *.yml file except kustomization.yaml:
  * each YAML document parses, with no key repeated in any mapping (PyYAML would keep the last);
  * each document is a Kubernetes object (apiVersion, kind, metadata.name) whose schema is known to
    kubernetes-validate for every version in $KUBERNETES_VERSIONS (an unknown kind/apiVersion is an
    error here, not the warning the kubernetes-validate CLI prints), and that validates strictly
    (unknown fields are errors);
  * a ConfigMap entry named *.toml is a kms-tag-guard config: valid TOML with only the keys of the
    contract (the proxy refuses unknown keys); with $KMS_TAG_GUARD_BIN set, `check` must pass on it;
  * a pod template with hostAliases that mounts such a config must set [upstream] resolver = "dns"
    (else the proxy resolves the KMS name to itself), and an AWS_ENDPOINT_URL_KMS of its containers
    must name a host in hostAliases.
For every kustomization.yaml: each listed resource exists, and every manifest in its directory is
listed, except *.example.yaml files and files in subdirectories (examples).
"""

import os
import subprocess
import sys
import tempfile
import tomllib
from urllib.parse import urlsplit

import kubernetes_validate
import yaml
from kubernetes_validate.utils import (
    InvalidSchemaError,
    SchemaNotFoundError,
    ValidationError,
    VersionNotSupportedError,
)

# The configuration keys of CONTRACT.md section 3 (docs/configuration.md).
CONFIG_KEYS = {
    "listener": {"address", "tls_cert", "tls_key", "client_ca", "client_auth"},
    "admin": {"address"},
    "upstream": {"allowed_hosts", "endpoint", "ca_file", "resolver", "connect_timeout_ms", "timeout_ms"},
    "intercept": {"ca_cert", "ca_key", "tunnel_hosts", "leaf_cache_size", "ca_key_group_readable",
                  "tunnel_idle_timeout_ms"},
    "limits": {"max_body_bytes", "max_connections", "header_read_timeout_ms", "body_read_timeout_ms",
               "idle_timeout_ms", "max_concurrent_streams", "max_buffered_body_bytes"},
    "audit": {"path", "fsync", "fail_closed", "stall_timeout_ms", "queue_capacity", "queue_max_bytes"},
    "shutdown": {"drain_delay_ms", "grace_ms"},
    "policy": {"mode", "max_tags", "unknown_operations", "org_tag_policy", "rule"},
}
RULE_KEYS = {
    "id", "type", "prefixes", "exempt_keys", "keys", "patterns", "on", "key", "key_pattern",
    "pattern", "allowed", "mode", "key_ids", "exempt_principals", "aliases", "targets",
    "callers", "exempt_callers", "caller", "value",
}

errors = []


def error(where, message):
    errors.append(f"{where}: {message}")
    print(f"ERROR {where}: {message}")


class UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key repeated in one mapping."""


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                f"found duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_documents(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        return [doc for doc in yaml.load_all(text, Loader=UniqueKeyLoader) if doc is not None]
    except yaml.YAMLError as e:
        error(path, f"invalid YAML: {e}")
        return []


def check_config(where, text):
    """A kms-tag-guard config embedded in a ConfigMap. Returns the parsed TOML, or None."""
    try:
        config = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        error(where, f"invalid TOML: {e}")
        return None
    for section, value in config.items():
        if section not in CONFIG_KEYS:
            error(where, f"unknown section [{section}]")
            continue
        if not isinstance(value, dict):
            error(where, f"{section} must be a table")
            continue
        for key in value:
            if key not in CONFIG_KEYS[section]:
                error(where, f"unknown key {section}.{key}")
        for i, rule in enumerate(value.get("rule", []) if section == "policy" else []):
            for key in rule:
                if key not in RULE_KEYS:
                    error(where, f"unknown key policy.rule[{i}].{key}")
    binary = os.environ.get("KMS_TAG_GUARD_BIN")
    if binary:
        with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
            f.write(text)
        try:
            # --no-files: the certificates and the audit directory it names are the pod's,
            # not this machine's.
            run = subprocess.run([binary, "check", "--no-files", "--config", f.name],
                                 capture_output=True, text=True, check=False)
        finally:
            os.unlink(f.name)
        output = (run.stdout + run.stderr).strip()
        if run.returncode != 0:
            error(where, f"kms-tag-guard check failed ({run.returncode}): {output}")
        else:
            print(f"INFO {where}: kms-tag-guard check: {output}")
    return config


def pod_spec(obj):
    kind = obj.get("kind")
    spec = obj.get("spec") or {}
    if kind == "Pod":
        return spec
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return (spec.get("template") or {}).get("spec")
    if kind == "CronJob":
        return ((spec.get("jobTemplate") or {}).get("spec") or {}).get("template", {}).get("spec")
    return None


def configmaps_mounted(spec):
    names = []
    for volume in spec.get("volumes") or []:
        if "configMap" in volume:
            names.append(volume["configMap"].get("name"))
        for source in (volume.get("projected") or {}).get("sources") or []:
            if "configMap" in source:
                names.append(source["configMap"].get("name"))
    return names


def check_pod(where, obj, configs):
    spec = pod_spec(obj)
    if not spec or not spec.get("hostAliases"):
        return
    aliased = {h.lower() for alias in spec["hostAliases"] for h in alias.get("hostnames") or []}
    for name in configmaps_mounted(spec):
        for config in configs.get((obj["metadata"].get("namespace"), name), []):
            upstream = config.get("upstream", {})
            if "endpoint" not in upstream and upstream.get("resolver", "system") != "dns":
                error(where, f"the pod has hostAliases and mounts ConfigMap {name}, whose config "
                             "needs [upstream] resolver = \"dns\" (else the proxy resolves the KMS "
                             "name to itself through the pod's /etc/hosts)")
    for container in (spec.get("containers") or []) + (spec.get("initContainers") or []):
        for env in container.get("env") or []:
            if env.get("name") == "AWS_ENDPOINT_URL_KMS" and "value" in env:
                host = (urlsplit(env["value"]).hostname or "").lower()
                if host not in aliased:
                    error(where, f"container {container.get('name')}: AWS_ENDPOINT_URL_KMS host "
                                 f"{host!r} is not in the pod's hostAliases {sorted(aliased)}")


def validate_object(where, obj, versions):
    for field in ("apiVersion", "kind"):
        if not isinstance(obj.get(field), str):
            error(where, f"not a Kubernetes object: no {field}")
            return False
    if not isinstance(obj.get("metadata"), dict) or not obj["metadata"].get("name"):
        error(where, "not a Kubernetes object: no metadata.name")
        return False
    name = f"{obj['kind']}/{obj['metadata']['name']}"
    ok = True
    for version in versions:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except ValidationError as e:
            path = ".".join(str(p) for p in e.path) or "(root)"
            error(where, f"{name} is invalid for Kubernetes {version}: {path}: {e.message}")
            ok = False
        except SchemaNotFoundError as e:
            error(where, f"{name}: {e.message}")
            ok = False
        except (InvalidSchemaError, VersionNotSupportedError) as e:
            error(where, f"{name}: cannot validate for Kubernetes {version}: {e.message}")
            ok = False
    if ok:
        print(f"ok   {where}: {name} (Kubernetes {', '.join(versions)})")
    return ok


def check_kustomization(path, manifests):
    directory = os.path.dirname(path)
    docs = load_documents(path)
    if len(docs) != 1 or not isinstance(docs[0], dict):
        error(path, "a kustomization.yaml must hold one mapping")
        return
    listed = set()
    for resource in docs[0].get("resources") or []:
        target = os.path.normpath(os.path.join(directory, resource))
        if not os.path.exists(target):
            error(path, f"resource {resource} does not exist")
        listed.add(target)
    for manifest in manifests:
        if (os.path.dirname(manifest) == directory and not manifest.endswith(".example.yaml")
                and os.path.normpath(manifest) not in listed):
            error(path, f"{os.path.basename(manifest)} is not listed in resources "
                        "(name it *.example.yaml or move it to a subdirectory if that is on purpose)")
    print(f"ok   {path}: {len(listed)} resources")


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else "deploy/k8s"
    versions = os.environ.get("KUBERNETES_VERSIONS", "1.31").split()
    manifests, kustomizations = [], []
    for directory, _, files in sorted(os.walk(root)):
        for file in sorted(files):
            if not file.endswith((".yaml", ".yml")):
                continue
            path = os.path.join(directory, file)
            (kustomizations if file in ("kustomization.yaml", "kustomization.yml")
             else manifests).append(path)
    if not manifests:
        error(root, "no manifests found")

    objects, configs = [], {}
    for path in manifests:
        docs = load_documents(path)
        if not docs:
            error(path, "no YAML documents")
        for i, obj in enumerate(docs):
            where = path if len(docs) == 1 else f"{path}[{i}]"
            if not isinstance(obj, dict):
                error(where, "a document must be a mapping")
                continue
            if not validate_object(where, obj, versions):
                continue
            objects.append((where, obj))
            if obj["kind"] == "ConfigMap":
                for key, text in (obj.get("data") or {}).items():
                    if key.endswith(".toml"):
                        config = check_config(f"{where} data.{key}", text)
                        if config is not None:
                            ref = (obj["metadata"].get("namespace"), obj["metadata"]["name"])
                            configs.setdefault(ref, []).append(config)
    for where, obj in objects:
        check_pod(where, obj, configs)
    for path in kustomizations:
        check_kustomization(path, manifests)

    count = sum(1 for _ in objects)
    if errors:
        print(f"deploy/validate: {len(errors)} problem(s) in {root}", file=sys.stderr)
        return 1
    print(f"deploy/validate: {count} objects in {len(manifests)} files valid for Kubernetes "
          f"{', '.join(versions)}; {len(kustomizations)} kustomizations consistent")
    return 0


if __name__ == "__main__":
    sys.exit(main())
