"""Generates deploy/prometheus/prometheusrule.yaml (a PrometheusRule for the Prometheus operator)
from deploy/prometheus/alerts.yml, so both hold the same rules.

    python3 deploy/prometheus/prometheusrule.py --write   # after changing alerts.yml
    python3 deploy/prometheus/prometheusrule.py --check   # deploy/validate.sh: fails when stale

The rule groups are copied as text (indented under `spec:`), so comments and block scalars stay
as written; --check also loads both files (with PyYAML, when it is there) and compares the groups.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "alerts.yml"
TARGET = HERE / "prometheusrule.yaml"

HEADER = """\
# GENERATED from deploy/prometheus/alerts.yml by deploy/prometheus/prometheusrule.py: do not edit;
# change alerts.yml and run `python3 deploy/prometheus/prometheusrule.py --write`.
#
# The alerting rules of kms-tag-guard for the Prometheus operator (kube-prometheus-stack). The
# operator loads a PrometheusRule whose labels match its Prometheus' ruleSelector: with the
# kube-prometheus-stack Helm chart that is `release: <the release's name>` by default; adjust the
# label (or the namespace) to your installation. deploy/README.md, "Alerts and dashboard".
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: kms-tag-guard
  namespace: kms-tag-guard
  labels:
    app.kubernetes.io/name: kms-tag-guard
    release: kube-prometheus-stack
spec:
"""


def generate() -> str:
    lines = SOURCE.read_text(encoding="utf-8").splitlines()
    # Skip alerts.yml's own comment header: everything before `groups:`.
    start = next(i for i, line in enumerate(lines) if line.startswith("groups:"))
    body = ["  " + line if line.strip() else "" for line in lines[start:]]
    return HEADER + "\n".join(body) + "\n"


def same_groups(text: str) -> str | None:
    """Why the generated text does not hold alerts.yml's groups, or None when it does."""
    try:
        import yaml
    except ImportError:
        return None
    rule = yaml.safe_load(text)
    source = yaml.safe_load(SOURCE.read_text(encoding="utf-8"))
    if rule.get("apiVersion") != "monitoring.coreos.com/v1" or rule.get("kind") != "PrometheusRule":
        return "not a monitoring.coreos.com/v1 PrometheusRule"
    if set(rule.get("spec", {})) != {"groups"}:
        return "spec holds more than groups"
    if rule["spec"]["groups"] != source["groups"]:
        return "spec.groups differs from the groups of alerts.yml"
    return None


def main(argv: list[str]) -> int:
    if argv[1:] == ["--write"]:
        TARGET.write_text(generate(), encoding="utf-8")
        print(f"wrote {TARGET}")
        return 0
    if argv[1:] == ["--check"]:
        wanted = generate()
        problem = same_groups(wanted)
        if problem:
            print(f"ERROR {TARGET}: {problem}")
            return 1
        if not TARGET.exists() or TARGET.read_text(encoding="utf-8") != wanted:
            print(
                f"ERROR {TARGET} is not what {SOURCE.name} generates: run "
                "`python3 deploy/prometheus/prometheusrule.py --write` and commit the result"
            )
            return 1
        print(f"ok: {TARGET.name} holds the rules of {SOURCE.name}")
        return 0
    print(__doc__.strip(), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
