#!/usr/bin/env bash
# Validate every Kubernetes manifest under deploy/k8s against the Kubernetes JSON schemas (strict:
# unknown fields are errors), for the Kubernetes versions in KUBERNETES_VERSIONS. Also checks that
# each kustomization.yaml lists files that exist, and that the proxy configs embedded in ConfigMaps
# are valid TOML with only known keys. Then the Prometheus rules under deploy/prometheus:
# `promtool check rules` and `promtool test rules` (the unit tests of every alert), and that the
# PrometheusRule is what alerts.yml generates; and that the Grafana dashboard's queries parse and
# use its data source variable. Exits non-zero on any problem.
#
#   bash deploy/validate.sh                 # what CI runs
#   KMS_TAG_GUARD_BIN=target/debug/kms-tag-guard bash deploy/validate.sh
#                                           # also run `kms-tag-guard check` on those configs
#
# Installs the pinned deploy/validate-requirements.txt from PyPI into a venv under target/, once
# (reused while the requirements file is unchanged). Needs python3 with venv and pip, and promtool
# (Debian: apt-get install prometheus; .ci/run installs it); without them it fails, it never skips.
set -euo pipefail
cd "$(dirname "$0")/.."

# 1.29: the oldest release with native sidecars (initContainers[].restartPolicy) on by default;
# 1.31: the version we target; 1.37: the newest the pinned kubernetes-validate knows.
export KUBERNETES_VERSIONS="${KUBERNETES_VERSIONS:-1.29 1.31 1.37}"

echo "== deploy/validate.sh: Kubernetes manifests under deploy/k8s (Kubernetes $KUBERNETES_VERSIONS)"

requirements=deploy/validate-requirements.txt
venv=target/deploy-validate-venv

if ! command -v python3 >/dev/null 2>&1; then
  echo "deploy/validate.sh: python3 is not installed; it is needed to validate deploy/k8s" >&2
  exit 1
fi
if [ ! -x "$venv/bin/python" ] || ! cmp -s "$requirements" "$venv/requirements.txt"; then
  echo "== deploy/validate.sh: installing $requirements into $venv"
  rm -rf "$venv"
  mkdir -p target
  if ! python3 -m venv "$venv"; then
    echo "deploy/validate.sh: 'python3 -m venv' failed (on Debian: apt-get install python3-venv)" >&2
    exit 1
  fi
  if ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
       --no-input -r "$requirements"; then
    echo "deploy/validate.sh: pip could not install $requirements" >&2
    rm -rf "$venv"
    exit 1
  fi
  cp "$requirements" "$venv/requirements.txt"
fi

"$venv/bin/python" deploy/validate_manifests.py deploy/k8s

echo "== deploy/validate.sh: Prometheus rules under deploy/prometheus"
if ! command -v promtool >/dev/null 2>&1; then
  echo "deploy/validate.sh: promtool is not installed; it checks and unit-tests deploy/prometheus/alerts.yml" \
       "(Debian: apt-get install prometheus)" >&2
  exit 1
fi
promtool check rules deploy/prometheus/alerts.yml
(cd deploy/prometheus && promtool test rules alerts.test.yml)
"$venv/bin/python" deploy/prometheus/prometheusrule.py --check

echo "== deploy/validate.sh: Grafana dashboard deploy/grafana/kms-tag-guard.json"
"$venv/bin/python" deploy/grafana/check_dashboard.py
