//! The effective configuration as TOML (`kms-tag-guard check --print`): every setting with the
//! value in force, defaults filled in; the `[policy]` section as written, with its defaults.

use std::fmt::Write;
use std::time::Duration;

use toml::{Table, Value};

use crate::config::{AuditPath, ClientAuth, Config, Resolver};

/// The configuration `config` (read from `text`) as TOML that reads back as the same settings.
pub fn effective_toml(config: &Config, text: &str) -> String {
    let mut out = format!(
        "# The effective configuration of {}: every setting with the value in force.\n",
        config.source
    );
    let ms = |d: Duration| Value::Integer(i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let int = |n: u64| Value::Integer(i64::try_from(n).unwrap_or(i64::MAX));
    let string = |s: String| Value::String(s);
    let path = |p: &std::path::Path| Value::String(p.display().to_string());
    let hosts = |globs: &[crate::glob::HostGlob]| {
        Value::Array(
            globs
                .iter()
                .map(|g| Value::String(g.as_str().to_owned()))
                .collect(),
        )
    };

    let mut listener = vec![("address", string(config.listener.address.to_string()))];
    if let Some(tls) = &config.listener.tls {
        listener.push(("tls_cert", path(&tls.cert)));
        listener.push(("tls_key", path(&tls.key)));
    }
    if let Some(client) = &config.listener.client_auth {
        listener.push(("client_ca", path(&client.ca)));
        let mode = match client.mode {
            ClientAuth::Required => "required",
            ClientAuth::Optional => "optional",
        };
        listener.push(("client_auth", string(mode.to_owned())));
    }
    section(&mut out, "listener", &listener);

    let admin = config
        .admin
        .address
        .map_or(String::new(), |a| a.to_string());
    section(&mut out, "admin", &[("address", string(admin))]);

    let u = &config.upstream;
    let mut upstream = vec![("allowed_hosts", hosts(&u.allowed_hosts))];
    if let Some(endpoint) = &u.endpoint {
        upstream.push((
            "endpoint",
            string(endpoint.to_string().trim_end_matches('/').to_owned()),
        ));
    }
    if let Some(ca) = &u.ca_file {
        upstream.push(("ca_file", path(ca)));
    }
    let resolver = match u.resolver {
        Resolver::System => "system",
        Resolver::Dns => "dns",
    };
    upstream.push(("resolver", string(resolver.to_owned())));
    upstream.push(("connect_timeout_ms", ms(u.connect_timeout)));
    upstream.push(("timeout_ms", ms(u.timeout)));
    section(&mut out, "upstream", &upstream);

    let i = &config.intercept;
    let mut intercept = Vec::new();
    if let Some(ca) = &i.ca {
        intercept.push(("ca_cert", path(&ca.cert)));
        intercept.push(("ca_key", path(&ca.key)));
    }
    intercept.push(("tunnel_hosts", hosts(&i.tunnel_hosts)));
    intercept.push(("leaf_cache_size", int(i.leaf_cache_size as u64)));
    intercept.push((
        "ca_key_group_readable",
        Value::Boolean(i.ca_key_group_readable),
    ));
    intercept.push(("tunnel_idle_timeout_ms", ms(i.tunnel_idle_timeout)));
    section(&mut out, "intercept", &intercept);

    let l = &config.limits;
    section(
        &mut out,
        "limits",
        &[
            ("max_body_bytes", int(l.max_body_bytes)),
            ("max_connections", int(l.max_connections as u64)),
            ("header_read_timeout_ms", ms(l.header_read_timeout)),
            ("idle_timeout_ms", ms(l.idle_timeout)),
            ("body_read_timeout_ms", ms(l.body_read_timeout)),
            (
                "max_concurrent_streams",
                int(u64::from(l.max_concurrent_streams)),
            ),
            ("max_buffered_body_bytes", int(l.max_buffered_body_bytes)),
        ],
    );

    let a = &config.audit;
    let audit_path = match &a.path {
        AuditPath::Stdout => "-".to_owned(),
        AuditPath::File(p) => p.display().to_string(),
    };
    let mut audit = vec![
        ("path", string(audit_path)),
        ("fsync", Value::Boolean(a.fsync)),
        ("fail_closed", Value::Boolean(a.fail_closed)),
        ("stall_timeout_ms", ms(a.stall_timeout)),
        ("queue_capacity", int(a.queue_capacity as u64)),
    ];
    if let Some(key) = &a.signing_key {
        audit.push(("signing_key", path(key)));
        audit.push(("checkpoint_every", int(a.checkpoint_every)));
        audit.push(("checkpoint_interval_ms", ms(a.checkpoint_interval)));
    }
    section(&mut out, "audit", &audit);
    section(
        &mut out,
        "shutdown",
        &[
            ("drain_delay_ms", ms(config.shutdown.drain_delay)),
            ("grace_ms", ms(config.shutdown.grace)),
        ],
    );

    // [policy]: as written (its rules are the file's), the defaults of its settings filled in.
    let table: Table = text.parse().unwrap_or_default();
    let written = table
        .get("policy")
        .and_then(Value::as_table)
        .cloned()
        .unwrap_or_default();
    let mut policy = Vec::new();
    for (key, default) in [
        ("mode", Value::String("enforce".into())),
        ("max_tags", Value::Integer(50)),
        ("unknown_operations", Value::String("reject".into())),
    ] {
        policy.push((key, written.get(key).cloned().unwrap_or(default)));
    }
    if let Some(org) = written.get("org_tag_policy") {
        policy.push(("org_tag_policy", org.clone()));
    }
    section(&mut out, "policy", &policy);
    for rule in written
        .get("rule")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(rule) = rule.as_table() else {
            continue;
        };
        out.push_str("\n[[policy.rule]]\n");
        for (key, value) in rule {
            let _ = writeln!(out, "{key} = {}", value_text(value));
        }
    }
    out
}

fn section(out: &mut String, name: &str, entries: &[(&str, Value)]) {
    let _ = writeln!(out, "\n[{name}]");
    for (key, value) in entries {
        let _ = writeln!(out, "{key} = {}", value_text(value));
    }
}

/// A value as TOML: strings as basic strings (JSON's escapes are TOML's), arrays and inline
/// tables on one line.
fn value_text(value: &Value) -> String {
    match value {
        Value::String(s) => serde_json::to_string(s).expect("a string serialises"),
        Value::Integer(n) => n.to_string(),
        Value::Float(f) => format!("{f:?}"),
        Value::Boolean(b) => b.to_string(),
        Value::Datetime(d) => d.to_string(),
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(value_text).collect();
            format!("[{}]", items.join(", "))
        }
        Value::Table(t) => {
            let items: Vec<String> = t
                .iter()
                .map(|(k, v)| {
                    format!(
                        "{} = {}",
                        serde_json::to_string(k).expect("a key"),
                        value_text(v)
                    )
                })
                .collect();
            format!("{{ {} }}", items.join(", "))
        }
    }
}
