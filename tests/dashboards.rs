//! Issue 21, point 7: the alerting rules (`deploy/prometheus/alerts.yml`) and the Grafana
//! dashboard (`deploy/grafana/kms-tag-guard.json`) name only metrics that a running proxy
//! exports. A real proxy (in front of the fake KMS, with an admin port and an interception CA) is
//! driven through a pass, an allowed and a denied request, its `/metrics` scraped, and every
//! metric name in every PromQL expression of both files looked up in the exposition, with the
//! names as the exposition writes them (`_total` for counters; `_bucket`, `_count`, `_sum` for
//! histograms; gauges bare). The label names the selectors match on are checked against the
//! series of the metrics that have some (a typo in `decision="deny"` matches nothing, silently).
//!
//! The expressions are read with a small reader of the YAML shapes alerts.yml uses (`expr:` inline
//! or as a block scalar); it refuses anything else, and checks that it found one expression per
//! rule, so a rule cannot slip past it. promtool itself checks and unit-tests the rules
//! (deploy/validate.sh).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use common::ops::{call, encrypt_body, scrape, tag_body};
use common::*;
use serde_json::Value;

const ALERTS: &str = "deploy/prometheus/alerts.yml";
const DASHBOARD: &str = "deploy/grafana/kms-tag-guard.json";
const PREFIX: &str = "kms_tag_guard_";

fn repo_file(path: &str) -> String {
    let full = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

/// The `expr` of every rule in a Prometheus rule file, with the line it starts on.
fn rule_expressions(text: &str) -> Vec<(usize, String)> {
    let lines: Vec<&str> = text.lines().collect();
    let indent = |line: &str| line.len() - line.trim_start().len();
    let mut exprs = Vec::new();
    let mut rules = 0;
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start();
        if trimmed.starts_with("- alert:") || trimmed.starts_with("- record:") {
            rules += 1;
        }
        let Some(value) = trimmed.strip_prefix("expr:") else {
            i += 1;
            continue;
        };
        let value = value.trim();
        let start = i + 1;
        if matches!(value, "|" | "|-" | ">" | ">-") {
            // A block scalar: the lines indented deeper than `expr:` (blank lines included).
            let mut block = Vec::new();
            i += 1;
            while i < lines.len() && (lines[i].trim().is_empty() || indent(lines[i]) > indent(line))
            {
                block.push(lines[i].trim());
                i += 1;
            }
            exprs.push((start, block.join("\n")));
            continue;
        }
        assert!(
            !value.is_empty() && !value.starts_with(['|', '>', '&', '*', '!']),
            "{ALERTS}:{start}: an `expr:` this reader does not know: {value:?}"
        );
        let unquoted = match (value.chars().next(), value.chars().last()) {
            (Some('\''), Some('\'')) => value[1..value.len() - 1].replace("''", "'"),
            (Some('"'), Some('"')) => serde_json::from_str::<String>(value).unwrap(),
            _ => value.to_owned(),
        };
        exprs.push((start, unquoted));
        i += 1;
    }
    assert_eq!(
        exprs.len(),
        rules,
        "{ALERTS}: {rules} rules but {} `expr:` lines read",
        exprs.len()
    );
    exprs
}

/// Every query of a Grafana dashboard: the panels' targets (rows' panels included) and the
/// query variables, with where each is.
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    fn panels(items: &Value, out: &mut Vec<(String, String)>) {
        for panel in items.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("?");
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"]
                    .as_str()
                    .unwrap_or_else(|| panic!("panel {title:?}: a target without expr"));
                out.push((format!("panel {title:?}"), expr.to_owned()));
            }
            panels(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    panels(&dashboard["panels"], &mut out);
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if variable["type"] == "query" {
            let query = &variable["query"];
            let text = query.as_str().or(query["query"].as_str()).unwrap();
            out.push((format!("variable {}", variable["name"]), text.to_owned()));
        }
    }
    out
}

/// The metric names an expression names: identifiers that start with `kms_tag_guard_`.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut names = BTreeSet::new();
    for (at, _) in expr.match_indices(PREFIX) {
        if expr[..at].chars().next_back().is_some_and(is_ident) {
            continue;
        }
        let name: String = expr[at..]
            .chars()
            .take_while(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            .collect();
        names.insert(name);
    }
    names
}

/// The label names each selector of an expression matches on: `name{label="v", other=~"w"}`
/// gives `(name, [label, other])`.
fn selector_labels(expr: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for name in metric_names(expr) {
        for (at, _) in expr.match_indices(&name) {
            let rest = &expr[at + name.len()..];
            let Some(rest) = rest.strip_prefix('{') else {
                continue;
            };
            // The matchers up to the closing brace outside a quoted value.
            let (mut quoted, mut escaped, mut end) = (false, false, None);
            for (i, c) in rest.char_indices() {
                match c {
                    _ if escaped => escaped = false,
                    '\\' if quoted => escaped = true,
                    '"' => quoted = !quoted,
                    '}' if !quoted => {
                        end = Some(i);
                        break;
                    }
                    _ => {}
                }
            }
            let end = end.unwrap_or_else(|| panic!("an unclosed selector in {expr}"));
            let labels = rest[..end]
                .split(',')
                .map(|m| {
                    m.trim()
                        .chars()
                        .take_while(|&c| c.is_ascii_alphanumeric() || c == '_')
                        .collect::<String>()
                })
                .filter(|l| !l.is_empty())
                .collect();
            out.push((name.clone(), labels));
        }
    }
    out
}

/// The names an OpenMetrics exposition exports: every sample's name, and for every family its
/// `# TYPE` declares, the sample names of that type (a labelled counter that has not counted
/// anything yet, e.g. no upstream error so far, has its family and no sample).
fn exported_names(exposition: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut samples = BTreeSet::new();
    let mut declared = BTreeSet::new();
    for line in exposition.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (family, kind) = rest.split_once(' ').expect("# TYPE family type");
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_count", "_sum"],
                "gauge" | "unknown" => &[""],
                "info" => &["_info"],
                other => panic!("a metric type this test does not know: {other}"),
            };
            declared.extend(suffixes.iter().map(|s| format!("{family}{s}")));
        } else if !line.starts_with('#') {
            let name: String = line.chars().take_while(|&c| c != '{' && c != ' ').collect();
            samples.insert(name);
        }
    }
    (samples, declared)
}

/// The queries' metric names that the exposition does not export, with where each is used.
fn unexported(
    queries: &[(String, String)],
    samples: &BTreeSet<String>,
    declared: &BTreeSet<String>,
) -> BTreeMap<String, Vec<String>> {
    let mut missing: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (whence, expr) in queries {
        for name in metric_names(expr) {
            if !samples.contains(&name) && !declared.contains(&name) {
                missing.entry(name).or_default().push(whence.clone());
            }
        }
    }
    missing
}

#[test]
fn metric_names_are_read_as_promql_writes_them() {
    let names = metric_names(
        r#"histogram_quantile(0.9, sum by (le) (rate(kms_tag_guard_request_duration_seconds_bucket{job=~"$job"}[5m])))
           / sum(kms_tag_guard_connections_open) or my_kms_tag_guard_x or ns:kms_tag_guard_y"#,
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        [
            "kms_tag_guard_connections_open",
            "kms_tag_guard_request_duration_seconds_bucket"
        ]
    );
    assert_eq!(
        selector_labels(
            r#"sum(kms_tag_guard_a{x="}",y=~"$job"}) / kms_tag_guard_b{} + kms_tag_guard_a"#
        ),
        [
            (
                "kms_tag_guard_a".to_owned(),
                vec!["x".to_owned(), "y".to_owned()]
            ),
            ("kms_tag_guard_b".to_owned(), vec![]),
        ]
    );
    let rules = rule_expressions(
        "groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: kms_tag_guard_a == 1\n\
         \x20     - alert: B\n        expr: |\n          sum(kms_tag_guard_b)\n\n            > 1\n        for: 1m\n\
         \x20     - record: r\n        expr: 'kms_tag_guard_c{x=''y''}'\n",
    );
    assert_eq!(
        rules,
        [
            (5, "kms_tag_guard_a == 1".to_owned()),
            (7, "sum(kms_tag_guard_b)\n\n> 1".to_owned()),
            (13, "kms_tag_guard_c{x='y'}".to_owned()),
        ]
    );
}

#[tokio::test]
async fn every_metric_in_the_alerts_and_the_dashboard_is_exported() {
    let fake = FakeKms::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (ca_cert, ca_key) = kms_tag_guard::tls::ca_init(&dir.path().join("ca")).unwrap();
    let proxy = start_proxy_with(
        &fake,
        ProxyConfig {
            admin: true,
            intercept: format!(
                "ca_cert = \"{}\"\nca_key = \"{}\"\ntunnel_hosts = []",
                ca_cert.display(),
                ca_key.display()
            ),
            ..ProxyConfig::default()
        },
    )
    .await;
    let admin = proxy.admin_addr.unwrap();

    // A pass, an allowed tag change and a denied one: the request counters and the histogram
    // have series.
    assert_eq!(
        call(proxy.addr, "Encrypt", &encrypt_body()).await.status,
        200
    );
    let allowed = tag_body(&[("team:owner", "payments")]);
    assert_eq!(call(proxy.addr, "TagResource", &allowed).await.status, 200);
    let denied = tag_body(&[("Project", "x")]);
    assert_eq!(call(proxy.addr, "TagResource", &denied).await.status, 400);
    assert_eq!(fake.count(), 2, "the denied change reached nobody");
    let scraped = scrape(admin).await;
    for decision in ["pass", "allow", "deny"] {
        assert!(
            scraped
                .series("kms_tag_guard_requests_total")
                .iter()
                .any(|s| s.labels.get("decision").map(String::as_str) == Some(decision)),
            "no {decision} series yet:\n{}",
            scraped.text
        );
    }
    let (samples, declared) = exported_names(&scraped.text);

    let mut queries: Vec<(String, String)> = rule_expressions(&repo_file(ALERTS))
        .into_iter()
        .map(|(line, expr)| (format!("{ALERTS}:{line}"), expr))
        .collect();
    let alert_count = queries.len();
    let dashboard: Value = serde_json::from_str(&repo_file(DASHBOARD)).unwrap();
    queries.extend(
        dashboard_queries(&dashboard)
            .into_iter()
            .map(|(whence, expr)| (format!("{DASHBOARD} {whence}"), expr)),
    );
    assert!(
        alert_count >= 10,
        "only {alert_count} alert expressions read"
    );
    assert!(
        queries.len() - alert_count >= 20,
        "only {} dashboard queries read",
        queries.len() - alert_count
    );
    let used: BTreeSet<String> = queries.iter().flat_map(|(_, e)| metric_names(e)).collect();
    let without_samples: Vec<&String> = used.iter().filter(|n| !samples.contains(*n)).collect();
    eprintln!(
        "{} metric names in {} queries; exported, but without a series yet: {without_samples:?}",
        used.len(),
        queries.len()
    );

    // Label names the selectors match on are the metric's own (for the metrics that have series
    // by now; `job`, `instance` and `namespace` are Prometheus' target labels).
    let mut wrong_labels = Vec::new();
    for (whence, expr) in &queries {
        for (name, labels) in selector_labels(expr) {
            let series = scraped.series(&name);
            if series.is_empty() {
                continue;
            }
            for label in labels {
                let target = matches!(label.as_str(), "job" | "instance" | "namespace");
                if !target && !series.iter().any(|s| s.labels.contains_key(&label)) {
                    wrong_labels.push(format!("{whence}: {name} has no label {label:?}"));
                }
            }
        }
    }
    assert!(wrong_labels.is_empty(), "{wrong_labels:#?}");

    let missing = unexported(&queries, &samples, &declared);
    assert!(
        missing.is_empty(),
        "metrics the queries name that the proxy does not export:\n{missing:#?}\n\nthe exposition:\n{}",
        scraped.text
    );

    // The check can fail: a name the proxy does not export, and a counter without its _total.
    let wrong = [
        (
            "a typo".to_owned(),
            "rate(kms_tag_guard_request_total[5m])".to_owned(),
        ),
        (
            "no suffix".to_owned(),
            "kms_tag_guard_upstream_errors".to_owned(),
        ),
    ];
    assert_eq!(
        unexported(&wrong, &samples, &declared).len(),
        2,
        "the check must catch these"
    );
}
