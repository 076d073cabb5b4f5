"""Checks deploy/grafana/kms-tag-guard.json (run by deploy/validate.sh):

  * it is JSON with a `datasource` variable of type datasource (Prometheus), and every panel and
    every query uses that variable, so the dashboard imports into any Grafana with any name for
    the data source;
  * every query is valid PromQL: the queries (with $job, $instance and $__rate_interval filled
    in) are written as recording rules into a temporary file that `promtool check rules` parses.

That every metric the queries name is exported by a running proxy is tests/dashboards.rs's job.
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parent / "kms-tag-guard.json"
DATASOURCE = "${datasource}"


def panels(items):
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


def main() -> int:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    errors = []
    variables = {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}
    source = variables.get("datasource")
    if not source or source.get("type") != "datasource" or source.get("query") != "prometheus":
        errors.append("no `datasource` variable of type datasource for prometheus")
    queries = []
    for name, variable in variables.items():
        if variable.get("type") == "query":
            query = variable["query"]
            queries.append((f"variable {name}", query["query"] if isinstance(query, dict) else query))
            if variable.get("datasource", {}).get("uid") != DATASOURCE:
                errors.append(f"variable {name} does not use {DATASOURCE}")
    for panel in panels(dashboard["panels"]):
        if panel["type"] == "row":
            continue
        title = panel.get("title", "?")
        if panel.get("datasource", {}).get("uid") != DATASOURCE:
            errors.append(f"panel {title!r} does not use {DATASOURCE}")
        if not panel.get("targets"):
            errors.append(f"panel {title!r} has no query")
        for target in panel.get("targets", []):
            if target.get("datasource", {}).get("uid") != DATASOURCE:
                errors.append(f"panel {title!r} query {target.get('refId')} does not use {DATASOURCE}")
            queries.append((f"panel {title!r} query {target.get('refId')}", target["expr"]))

    rules = []
    for n, (where, expr) in enumerate(queries):
        if expr.startswith("label_values("):
            # label_values(SELECTOR, label): Grafana's, not PromQL; its selector must parse.
            expr = expr[len("label_values("):].rsplit(",", 1)[0]
        expr = (expr.replace("$__rate_interval", "5m").replace("$__range", "1h")
                .replace("$job", ".*").replace("$instance", ".*"))
        if "$" in expr:
            errors.append(f"{where}: a variable this check does not know: {expr}")
        rules.append({"record": f"dashboard:query_{n}", "expr": expr})
    with tempfile.NamedTemporaryFile("w", suffix=".yml") as f:
        # JSON is YAML: promtool reads it as a rule file.
        json.dump({"groups": [{"name": "dashboard", "rules": rules}]}, f)
        f.flush()
        check = subprocess.run(["promtool", "check", "rules", f.name],
                               capture_output=True, text=True)
        if check.returncode != 0:
            errors.append("promtool check rules on the dashboard's queries:\n"
                          + check.stdout + check.stderr)
    for error in errors:
        print(f"ERROR {DASHBOARD}: {error}")
    if errors:
        return 1
    print(f"ok: {DASHBOARD.name}: {len(queries)} queries parse, all on {DATASOURCE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
