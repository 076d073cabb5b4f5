//! The `kms-tag-guard` command line, run as a real process: exit codes and what it prints.
//!
//! Shipped files checked here: `config/kms-tag-guard.toml`, every `config/examples/*.toml`, and
//! every `policy-tests/*.toml`. A case file runs against the config of the same stem in
//! `config/examples/`, except `policy-tests/default.toml`, which runs against the default config.
//! The configs in the ConfigMaps under `deploy/k8s` (examples/ included) are held to the schema.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Exit code for an invalid configuration or case file (EX_CONFIG).
const EXIT_CONFIG: i32 = 78;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kms-tag-guard"))
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs the binary to completion.
fn run<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    bin()
        .args(args)
        .current_dir(root())
        .stdin(Stdio::null())
        .output()
        .expect("run kms-tag-guard")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Both streams, for messages whose stream is not part of the contract.
fn all_output(o: &Output) -> String {
    format!("{}{}", stdout(o), stderr(o))
}

fn describe(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        o.status.code(),
        stdout(o),
        stderr(o)
    )
}

/// How many lines of a TOML file open a table of this array (`[[policy.rule]]`, `[[case]]`).
fn count_tables(path: &Path, header: &str) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .lines()
        .filter(|l| l.trim() == header)
        .count()
}

fn toml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    files
}

/// Every shipped configuration file.
fn shipped_configs() -> Vec<PathBuf> {
    let mut configs = vec![root().join("config/kms-tag-guard.toml")];
    configs.extend(toml_files(&root().join("config/examples")));
    configs
}

/// The config a shipped case file runs against.
fn config_for(cases: &Path) -> PathBuf {
    let stem = cases.file_stem().unwrap().to_str().unwrap();
    let config = if stem == "default" {
        root().join("config/kms-tag-guard.toml")
    } else {
        root().join("config/examples").join(format!("{stem}.toml"))
    };
    assert!(
        config.is_file(),
        "{} has no config: expected {}",
        cases.display(),
        config.display()
    );
    config
}

fn scratch(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

const GOOD_CONFIG: &str = r#"
[admin]
address = ""

[[policy.rule]]
id = "abac-keys"
type = "forbidden-key"
keys = ["Project"]
"#;

// ------------------------------------------------------------------------------------ check

#[test]
fn check_accepts_every_shipped_config() {
    let configs = shipped_configs();
    assert!(configs.len() >= 2, "{configs:?}");
    for config in configs {
        // The files they name (/var/log/..., /etc/...) are the deployment's, not this machine's.
        let out = run([
            Path::new("check"),
            Path::new("--no-files"),
            Path::new("--config"),
            &config,
        ]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}: {}",
            config.display(),
            describe(&out)
        );
        let rules = count_tables(&config, "[[policy.rule]]");
        let text = stdout(&out);
        let mut lines = text.lines();
        let first = lines.next().unwrap_or_default().to_owned();
        let listed: Vec<&str> = lines.collect();
        // One line per rule, with its origin: the TOML rules, then those imported.
        assert_eq!(
            first,
            format!("ok: {} rules", listed.len()),
            "{}",
            config.display()
        );
        let from_toml = listed
            .iter()
            .filter(|l| l.contains(" from policy.rule["))
            .count();
        assert_eq!(from_toml, rules, "{}: {text}", config.display());
        let imported = listed.len() - from_toml;
        assert!(
            listed
                .iter()
                .filter(|l| !l.contains(" from policy.rule["))
                .all(|l| l.trim_start().starts_with("org:") && l.contains("(org-tag-policy, ")),
            "{}: {text}",
            config.display()
        );
        if config.ends_with("org-tag-policy.toml") {
            assert_eq!(imported, 4, "{text}");
            assert!(
                text.contains("org:environment (org-tag-policy, dry-run) from ")
                    && text.contains("org-tag-policy.json: tags.environment"),
                "{text}"
            );
        }
    }
}

#[test]
fn check_without_config_validates_the_built_in_one() {
    let out = run(["check"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let rules = count_tables(&root().join("config/kms-tag-guard.toml"), "[[policy.rule]]");
    let text = stdout(&out);
    assert_eq!(
        text.lines().next(),
        Some(format!("ok: {rules} rules").as_str())
    );
    assert_eq!(text.lines().count(), rules + 1, "{text}");
}

#[test]
fn check_refuses_an_authored_tag_policy_and_says_to_export_the_effective_one() {
    let dir = tempfile::tempdir().unwrap();
    scratch(
        &dir,
        "authored.json",
        r#"{"tags":{"costcenter":{"tag_key":{"@@assign":"CostCenter"},"tag_value":{"@@append":["300*"]}}}}"#,
    );
    let config = scratch(
        &dir,
        "kms-tag-guard.toml",
        "[policy]\norg_tag_policy = \"authored.json\"\n",
    );
    let out = run([Path::new("check"), Path::new("--config"), &config]);
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{}", describe(&out));
    let errors = stderr(&out);
    assert!(errors.contains("policy.org_tag_policy"), "{errors}");
    assert!(errors.contains("@@"), "{errors}");
    assert!(
        errors.contains("aws organizations describe-effective-policy --policy-type TAG_POLICY"),
        "{errors}"
    );
    // The effective policy, as the CLI prints it, is accepted and listed with its origin.
    let effective = serde_json::json!({"EffectivePolicy": {
        "PolicyContent": r#"{"tags":{"costcenter":{"tag_key":"CostCenter","tag_value":["300*"]}}}"#,
        "PolicyType": "TAG_POLICY"
    }});
    scratch(&dir, "authored.json", &effective.to_string());
    let out = run([Path::new("check"), Path::new("--config"), &config]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let text = stdout(&out);
    assert!(
        text.contains("org:costcenter (org-tag-policy, dry-run) from ")
            && text.contains("authored.json: tags.costcenter"),
        "{text}"
    );
}

#[test]
fn check_reports_every_mistake_with_its_key_path() {
    let dir = tempfile::tempdir().unwrap();
    let config = scratch(
        &dir,
        "bad.toml",
        r#"
[listener]
adress = "127.0.0.1:8080"

[[policy.rule]]
id = "abac-keys"
type = "forbidden-key"
keys = ["Project"]

[[policy.rule]]
id = "cost-center"
type = "value-pattern"
key = "cost:center"
pattern = "^[0-9]{4"

[[policy.rule]]
id = "abac-keys"
type = "required-key"
keys = ["team:owner"]
"#,
    );
    let out = run([Path::new("check"), Path::new("--config"), &config]);
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{}", describe(&out));
    let text = all_output(&out);
    assert!(!stdout(&out).contains("ok:"), "{}", describe(&out));
    for expected in [
        "listener.adress: unknown key",
        "policy.rule[1].pattern: invalid regex",
        "policy.rule[2].id: \"abac-keys\" is used by an earlier rule",
    ] {
        assert!(text.contains(expected), "{expected:?} missing\n{text}");
    }
    let error_lines = text
        .lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with("line "))
        .count();
    assert_eq!(error_lines, 3, "exactly the three mistakes\n{text}");
    // Each with its line and column, a rule's with its id, an unknown key with the known one.
    for expected in [
        "line 3, column 1: listener.adress: unknown key; did you mean `address`?",
        "line 14, column 1, rule \"cost-center\": policy.rule[1].pattern: invalid regex",
        "line 17, column 1, rule \"abac-keys\": policy.rule[2].id:",
    ] {
        assert!(text.contains(expected), "{expected:?} missing\n{text}");
    }
    // The regex error keeps its layout: the caret under the fault, on a line of its own.
    assert!(
        text.contains("          ^[0-9]{4\n                ^^\n"),
        "{text}"
    );
    assert!(
        text.contains(&config.display().to_string()),
        "names the file\n{text}"
    );
}

#[test]
fn check_of_a_missing_file_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.toml");
    let out = run([Path::new("check"), Path::new("--config"), &missing]);
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{}", describe(&out));
    assert!(all_output(&out).contains("nope.toml"), "{}", describe(&out));
}

#[test]
fn check_reports_toml_syntax_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = scratch(&dir, "syntax.toml", "[policy]\nmode = \n");
    let out = run([Path::new("check"), Path::new("--config"), &config]);
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{}", describe(&out));
    assert!(all_output(&out).contains("line 2"), "{}", describe(&out));
}

// ------------------------------------------------------------------------------------ serve

#[test]
fn serve_refuses_an_invalid_config_before_binding() {
    // Hold the listener's port: if serve tried to bind before validating, it would fail with a
    // bind error (not 78), or worse, run.
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let config = scratch(
        &dir,
        "serve.toml",
        &format!(
            r#"
[listener]
address = "127.0.0.1:{port}"

[admin]
address = ""

[policy]
mode = "enforced"

[[policy.rule]]
id = "abac-keys"
type = "forbidden-key"
keys = ["Project"]
"#
        ),
    );
    let mut child = bin()
        .args([Path::new("serve"), Path::new("--config"), &config])
        .current_dir(root())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "serve kept running on an invalid config\n{}",
                describe(&out)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{}", describe(&out));
    let text = all_output(&out);
    assert!(text.contains("policy.mode"), "{text}");
    let lower = text.to_lowercase();
    assert!(
        !lower.contains("in use") && !lower.contains("bind"),
        "serve tried to bind\n{text}"
    );
    drop(held);
}

#[test]
fn serve_refuses_a_missing_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("absent.toml");
    let out = run([Path::new("serve"), Path::new("--config"), &missing]);
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{}", describe(&out));
}

// ------------------------------------------------------------------------------------- test

fn assert_all_pass(out: &Output, cases: &Path) {
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}: {}",
        cases.display(),
        describe(out)
    );
    let text = stdout(out);
    let n = count_tables(cases, "[[case]]");
    assert!(n > 0, "{} has no cases", cases.display());
    assert_eq!(
        text.lines().last(),
        Some(format!("{n} passed, 0 failed").as_str()),
        "{}: {text}",
        cases.display()
    );
    assert!(!text.contains("FAIL"), "{text}");
}

#[test]
fn test_passes_on_every_shipped_case_file() {
    let files = toml_files(&root().join("policy-tests"));
    assert!(
        files.iter().any(|f| f.ends_with("default.toml")),
        "{files:?}"
    );
    let total: usize = files.iter().map(|f| count_tables(f, "[[case]]")).sum();
    assert!(total >= 30, "only {total} shipped cases");
    for cases in files {
        let config = config_for(&cases);
        let out = run([
            Path::new("test"),
            Path::new("--config"),
            &config,
            cases.as_path(),
        ]);
        assert_all_pass(&out, &cases);
    }
}

#[test]
fn default_cases_pass_against_the_built_in_config() {
    let cases = root().join("policy-tests/default.toml");
    let out = run([Path::new("test"), &cases]);
    assert_all_pass(&out, &cases);
}

#[test]
fn several_case_files_run_as_one_report() {
    let dir = tempfile::tempdir().unwrap();
    let one =
        "[[case]]\nname = \"a\"\noperation = \"Encrypt\"\nbody = \"{x\"\nexpect = \"allow\"\n";
    let a = scratch(&dir, "a.toml", one);
    let b = scratch(&dir, "b.toml", &one.replace("\"a\"", "\"b\""));
    let config = scratch(&dir, "config.toml", GOOD_CONFIG);
    let out = run([
        Path::new("test"),
        Path::new("--config"),
        &config,
        a.as_path(),
        b.as_path(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(stdout(&out).lines().last(), Some("2 passed, 0 failed"));
}

#[test]
fn a_wrong_expectation_fails_with_a_line_naming_the_case() {
    let dir = tempfile::tempdir().unwrap();
    let config = scratch(&dir, "config.toml", GOOD_CONFIG);
    let cases = scratch(
        &dir,
        "cases.toml",
        r#"
[[case]]
name = "ABAC key in another case is denied"
operation = "TagResource"
body = '{"KeyId":"1234abcd-12ab-34cd-56ef-1234567890ab","Tags":[{"TagKey":"project","TagValue":"x"}]}'
expect = "deny"
rules = ["abac-keys"]

[[case]]
name = "an ordinary key wrongly expected to be denied"
operation = "TagResource"
body = '{"KeyId":"1234abcd-12ab-34cd-56ef-1234567890ab","Tags":[{"TagKey":"team","TagValue":"x"}]}'
expect = "deny"

[[case]]
name = "pass-through"
operation = "Encrypt"
body = '{not json'
expect = "allow"
"#,
    );
    let out = run([
        Path::new("test"),
        Path::new("--config"),
        &config,
        cases.as_path(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let text = stdout(&out);
    let fails: Vec<&str> = text.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert_eq!(fails.len(), 1, "{text}");
    assert!(
        fails[0].contains("an ordinary key wrongly expected to be denied"),
        "{text}"
    );
    assert!(fails[0].contains("expected deny, got allow"), "{text}");
    assert!(fails[0].contains("cases.toml"), "names the file: {text}");
    assert_eq!(text.lines().last(), Some("2 passed, 1 failed"), "{text}");
}

#[test]
fn wrong_rule_ids_fail_and_say_which_rules_were_violated() {
    let dir = tempfile::tempdir().unwrap();
    let config = scratch(&dir, "config.toml", GOOD_CONFIG);
    let cases = scratch(
        &dir,
        "cases.toml",
        r#"
[[case]]
name = "denied by a rule other than the one expected"
operation = "TagResource"
body = '{"KeyId":"k","Tags":[{"TagKey":"PROJECT","TagValue":"x"}]}'
expect = "deny"
rules = ["org-prefix"]
"#,
    );
    let out = run([
        Path::new("test"),
        Path::new("--config"),
        &config,
        cases.as_path(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let text = stdout(&out);
    let fail = text.lines().find(|l| l.starts_with("FAIL")).unwrap_or("");
    assert!(
        fail.contains("denied by a rule other than the one expected"),
        "{text}"
    );
    assert!(fail.contains("abac-keys"), "{text}");
    assert_eq!(text.lines().last(), Some("0 passed, 1 failed"), "{text}");
}

#[test]
fn a_malformed_case_file_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = scratch(&dir, "config.toml", GOOD_CONFIG);
    let good =
        "[[case]]\nname = \"ok\"\noperation = \"Encrypt\"\nbody = \"x\"\nexpect = \"allow\"\n";
    let malformed = [
        (
            "syntax.toml",
            "[[case]]\nname = \"unterminated\n".to_owned(),
        ),
        (
            "expect.toml",
            good.replace("expect = \"allow\"", "expect = \"maybe\""),
        ),
        (
            "unknown-key.toml",
            good.replace(
                "expect = \"allow\"",
                "expect = \"allow\"\nexpected = \"allow\"",
            ),
        ),
        ("no-body.toml", good.replace("body = \"x\"\n", "")),
        (
            "both-targets.toml",
            good.replace("body =", "target = \"TrentService.Encrypt\"\nbody ="),
        ),
        (
            "bad-hex.toml",
            good.replace("body = \"x\"", "body_hex = \"zz\""),
        ),
        ("no-cases.toml", "# nothing here\n".to_owned()),
        ("top-level.toml", format!("cases = 1\n{good}")),
    ];
    for (name, text) in malformed {
        let ok = scratch(&dir, "ok.toml", good);
        let bad = scratch(&dir, name, &text);
        // A bad file fails the whole run, even next to a good one.
        let out = run([
            Path::new("test"),
            Path::new("--config"),
            &config,
            ok.as_path(),
            bad.as_path(),
        ]);
        assert_eq!(
            out.status.code(),
            Some(EXIT_CONFIG),
            "{name}: {}",
            describe(&out)
        );
        assert!(
            all_output(&out).contains(name),
            "{name}: {}",
            describe(&out)
        );
        assert!(
            !stdout(&out).contains("passed"),
            "{name}: {}",
            describe(&out)
        );
    }
}

#[test]
fn test_with_an_invalid_config_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = scratch(
        &dir,
        "config.toml",
        "[[policy.rule]]\nid = \"x\"\ntype = \"forbidden-key\"\npatterns = [\"(\"]\n",
    );
    let cases = root().join("policy-tests/default.toml");
    let out = run([
        Path::new("test"),
        Path::new("--config"),
        &config,
        cases.as_path(),
    ]);
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{}", describe(&out));
    assert!(
        all_output(&out).contains("policy.rule[0].patterns[0]: invalid regex"),
        "{}",
        describe(&out)
    );
}

#[test]
fn test_of_a_missing_case_file_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = run([Path::new("test"), &dir.path().join("absent.toml")]);
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{}", describe(&out));
}

// ----------------------------------------------------------------------------- version, help

#[test]
fn version_and_help_exit_zero() {
    let out = run(["--version"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        stdout(&out).contains(env!("CARGO_PKG_VERSION")),
        "{}",
        describe(&out)
    );

    let out = run(["--help"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let help = stdout(&out);
    for command in ["serve", "check", "test"] {
        assert!(
            help.contains(command),
            "{command} missing from --help\n{help}"
        );
    }

    for command in ["serve", "check", "test"] {
        let out = run([command, "--help"]);
        assert_eq!(out.status.code(), Some(0), "{command}: {}", describe(&out));
        assert!(
            stdout(&out).contains("--config"),
            "{command}: {}",
            describe(&out)
        );
    }
}

#[test]
fn usage_errors_do_not_exit_zero() {
    for args in [&["frobnicate"][..], &["test"][..], &["check", "--nope"][..]] {
        let out = run(args);
        let code = out.status.code();
        assert!(
            code != Some(0) && code != Some(EXIT_CONFIG),
            "{args:?}: {}",
            describe(&out)
        );
    }
}

// ------------------------------------------------------------- check: serve without listening

/// A listener certificate and key, and an interception CA, written by the binary's `ca init`
/// and rcgen (a self-signed server certificate).
fn write_listener_pair(dir: &Path) -> (PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert_path, key_path) = (dir.join("tls.pem"), dir.join("tls.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (cert_path, key_path)
}

fn check_config(text: &str, dir: &tempfile::TempDir) -> Output {
    let config = scratch(dir, "check.toml", text);
    run([Path::new("check"), Path::new("--config"), &config])
}

#[test]
fn check_refuses_what_serve_would_refuse_to_start_with() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let (cert, key) = write_listener_pair(dir.path());
    let ca = dir.path().join("ca");
    assert_eq!(
        run([Path::new("ca"), Path::new("init"), Path::new("--out"), &ca])
            .status
            .code(),
        Some(0)
    );
    let good = format!(
        "[listener]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n[intercept]\nca_cert = \"{d}/ca/ca.pem\"\nca_key = \"{d}/ca/ca.key\"\n[audit]\npath = \"{d}/audit.jsonl\"\n{GOOD_CONFIG}",
        cert.display(),
        key.display()
    );
    let out = check_config(&good, &dir);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        !dir.path().join("audit.jsonl").exists(),
        "check creates no audit file"
    );

    // Each of these makes serve refuse to start: check exits 78 and says why.
    let missing_cert = good.replace("tls.pem", "absent.pem");
    let out = check_config(&missing_cert, &dir);
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{}", describe(&out));
    assert!(stderr(&out).contains("absent.pem"), "{}", describe(&out));

    let missing_ca = good.replace("ca/ca.pem", "ca/absent-ca.pem");
    let out = check_config(&missing_ca, &dir);
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{}", describe(&out));
    assert!(stderr(&out).contains("absent-ca.pem"), "{}", describe(&out));

    let no_dir = good.replace("audit.jsonl", "no-such-dir/audit.jsonl");
    let out = check_config(&no_dir, &dir);
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{}", describe(&out));
    assert!(stderr(&out).contains("no-such-dir"), "{}", describe(&out));

    let upstream_ca = format!("{good}\n[upstream]\nca_file = \"{d}/absent-roots.pem\"\n");
    let out = check_config(&upstream_ca, &dir);
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{}", describe(&out));
    assert!(
        stderr(&out).contains("absent-roots.pem"),
        "{}",
        describe(&out)
    );

    // A CA key others can read.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(ca.join("ca.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = check_config(&good, &dir);
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{}", describe(&out));
    assert!(stderr(&out).contains("ca.key"), "{}", describe(&out));
    // --no-files checks the settings alone.
    let config = dir.path().join("check.toml");
    let out = run([
        Path::new("check"),
        Path::new("--no-files"),
        Path::new("--config"),
        &config,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
}

#[test]
fn serve_exits_78_for_a_file_the_config_names() {
    let dir = tempfile::tempdir().unwrap();
    let config = scratch(
        &dir,
        "serve.toml",
        &format!(
            "[listener]\naddress = \"127.0.0.1:0\"\n[audit]\npath = \"{}/no-such-dir/audit.jsonl\"\n{GOOD_CONFIG}",
            dir.path().display()
        ),
    );
    let out = run([Path::new("serve"), Path::new("--config"), &config]);
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{}", describe(&out));
}

#[test]
fn check_warns_that_a_config_without_rules_enforces_nothing() {
    let dir = tempfile::tempdir().unwrap();
    for text in ["", "[admin]\naddress = \"\"\n"] {
        let out = check_config(text, &dir);
        assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
        assert!(
            stderr(&out).contains("enforce nothing"),
            "{}",
            describe(&out)
        );
    }
}

#[test]
fn a_misspelt_rule_type_is_one_error_with_a_suggestion() {
    let dir = tempfile::tempdir().unwrap();
    let out = check_config(
        "[[policy.rule]]\nid = \"cost\"\ntype = \"value-patern\"\nkey = \"cost\"\npattern = \"^[0-9]+$\"\n",
        &dir,
    );
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{}", describe(&out));
    let text = stderr(&out);
    assert!(text.contains(": 1 error(s)"), "no follow-on errors\n{text}");
    assert!(
        text.contains("line 3, column 1, rule \"cost\": policy.rule[0].type: \"value-patern\" is not a rule type; did you mean `value-pattern`?"),
        "{text}"
    );
}

#[test]
fn a_missing_config_file_is_reported_once() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.toml");
    let out = run([Path::new("check"), Path::new("--config"), &missing]);
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{}", describe(&out));
    let text = stderr(&out);
    assert_eq!(text.lines().count(), 1, "{text}");
    assert_eq!(text.matches("nope.toml").count(), 1, "{text}");
    assert!(text.starts_with("cannot read "), "{text}");
    assert!(!text.contains("cannot read the file"), "{text}");
}

// ------------------------------------------------------------------- test: report formats

const TWO_CASES: &str = r#"# two cases: one passes, one fails
[[case]]
name = "allowed key"
operation = "TagResource"
body = '{"KeyId":"k","Tags":[{"TagKey":"team","TagValue":"x"}]}'
expect = "allow"

[[case]]
name = "wrongly expected <deny> & more"
operation = "TagResource"
body = '{"KeyId":"k","Tags":[{"TagKey":"team","TagValue":"x"}]}'
expect = "deny"
"#;

fn run_two_cases(extra: &[&str]) -> (Output, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = scratch(&dir, "kms-tag-guard.toml", GOOD_CONFIG);
    let cases = scratch(&dir, "cases.toml", TWO_CASES);
    let mut args: Vec<&std::ffi::OsStr> =
        vec!["test".as_ref(), "--config".as_ref(), config.as_os_str()];
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    args.push(cases.as_os_str());
    let out = run(args);
    (out, config, dir)
}

#[test]
fn test_names_its_config_first_and_each_failure_by_file_and_line() {
    let (out, config, dir) = run_two_cases(&[]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let text = stdout(&out);
    let first = text.lines().next().unwrap_or_default();
    assert!(
        first.starts_with(&format!("config: {} (1 rules", config.display())),
        "{text}"
    );
    let cases = dir.path().join("cases.toml");
    assert!(
        text.contains(&format!("FAIL {}:8: wrongly expected", cases.display())),
        "{text}"
    );
    assert!(
        !text.contains("allowed key"),
        "passes are not listed without -v: {text}"
    );
    let (out, _, _) = run_two_cases(&["-v"]);
    assert!(
        stdout(&out).contains(&format!("ok   {}:2: allowed key", cases.display()).replace(
            &dir.path().display().to_string(),
            &dir.path().display().to_string()
        )) || stdout(&out).contains(":2: allowed key"),
        "{}",
        describe(&out)
    );
}

#[test]
fn test_reports_as_json() {
    let (out, config, _dir) = run_two_cases(&["--format", "json"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(report["config"], config.display().to_string());
    assert_eq!(report["passed"], 1);
    assert_eq!(report["failed"], 1);
    assert_eq!(report["cases"][1]["line"], 8);
    assert_eq!(report["cases"][1]["passed"], false);
    assert!(report["cases"][1]["failure"]
        .as_str()
        .unwrap()
        .contains("expected deny, got allow"));
}

#[test]
fn test_reports_as_junit_xml() {
    let (out, _config, _dir) = run_two_cases(&["--format", "junit"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let xml = stdout(&out);
    assert!(xml.starts_with("<?xml version=\"1.0\""), "{xml}");
    assert!(
        xml.contains("<testsuites name=\"kms-tag-guard test\" tests=\"2\" failures=\"1\">"),
        "{xml}"
    );
    assert!(
        xml.contains("name=\"wrongly expected &lt;deny&gt; &amp; more\""),
        "{xml}"
    );
    assert_eq!(xml.matches("<testcase ").count(), 2, "{xml}");
    assert_eq!(xml.matches("<failure ").count(), 1, "{xml}");
    // Read by a real XML parser where one is installed (python3's, as CI's reporters are).
    let parsed = Command::new("python3")
        .args([
            "-c",
            "import sys, xml.etree.ElementTree as E; r = E.fromstring(sys.stdin.read()); \
             cs = r.findall('./testsuite/testcase'); \
             print(len(cs), sum(1 for c in cs if c.find('failure') is not None), cs[1].get('name'))",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn();
    match parsed {
        Ok(mut child) => {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(xml.as_bytes())
                .unwrap();
            let result = child.wait_with_output().unwrap();
            assert!(result.status.success(), "{xml}");
            assert_eq!(
                String::from_utf8_lossy(&result.stdout).trim(),
                "2 1 wrongly expected <deny> & more"
            );
        }
        Err(e) => eprintln!("python3 not available ({e}): the XML was checked by shape only"),
    }
}

// ------------------------------------------------------------------------------------ explain

#[test]
fn explain_gives_each_rules_verdict_and_exits_by_the_decision() {
    let dir = tempfile::tempdir().unwrap();
    let config = scratch(&dir, "kms-tag-guard.toml", GOOD_CONFIG);
    let explain = |body: &str| {
        run([
            Path::new("explain"),
            Path::new("--config"),
            &config,
            Path::new("--operation"),
            Path::new("TagResource"),
            Path::new("--body"),
            Path::new(body),
        ])
    };
    let out = explain(r#"{"KeyId":"k","Tags":[{"TagKey":"project","TagValue":"x"}]}"#);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let text = stdout(&out);
    assert!(
        text.contains("abac-keys") && text.contains("deny:"),
        "{text}"
    );
    assert_eq!(text.lines().last(), Some("decision: deny"), "{text}");
    let out = explain(r#"{"KeyId":"k","Tags":[{"TagKey":"team","TagValue":"x"}]}"#);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let text = stdout(&out);
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with("abac-keys") && l.ends_with("pass")),
        "{text}"
    );
    assert_eq!(text.lines().last(), Some("decision: allow"), "{text}");
    // A body the proxy cannot read is denied by its own request check.
    let out = explain("{not json");
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(stdout(&out).contains("request"), "{}", describe(&out));

    // "-" reads the body from standard input.
    let mut child = bin()
        .args([
            "explain",
            "--operation",
            "TagResource",
            "--body",
            "-",
            "--config",
        ])
        .arg(&config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(br#"{"KeyId":"k","Tags":[{"TagKey":"Project","TagValue":"x"}]}"#)
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert_eq!(stdout(&out).lines().last(), Some("decision: deny"));
}

#[test]
fn explain_and_check_know_the_caller() {
    let config = root().join("config/examples/caller-rules.toml");
    let explain = |caller: Option<&str>| {
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "explain".as_ref(),
            "--config".as_ref(),
            config.as_os_str(),
            "--operation".as_ref(),
            "TagResource".as_ref(),
            "--body".as_ref(),
            r#"{"KeyId":"k","Tags":[{"TagKey":"team","TagValue":"payments"}]}"#.as_ref(),
        ];
        if let Some(caller) = caller {
            args.push("--caller".as_ref());
            args.push(caller.as_ref());
        }
        run(args)
    };
    let out = explain(Some("spiffe://example.org/ns/payments/sa/api"));
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        stdout(&out).contains("caller: spiffe://example.org/ns/payments/sa/api\n"),
        "{}",
        describe(&out)
    );
    let out = explain(Some("spiffe://example.org/ns/billing/sa/api"));
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let text = stdout(&out);
    assert!(
        text.contains("deny: caller \"spiffe://example.org/ns/billing/sa/api\" may set tag key \"team\" only to \"billing\""),
        "{text}"
    );
    let out = explain(None);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        stdout(&out).contains("has no identity"),
        "{}",
        describe(&out)
    );
    // An identity the listener would never accept is a usage error, not a verdict.
    let out = explain(Some("spiffe://example.org/ns/../ns/billing/sa/api"));
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        stderr(&out).contains("not an identity"),
        "{}",
        describe(&out)
    );

    let out = run([
        Path::new("check"),
        Path::new("--no-files"),
        Path::new("--config"),
        &config,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let text = stdout(&out);
    assert!(
        text.contains("tenant-prefixes (required-prefix, enforce) from policy.rule[4]; applies only to callers \"spiffe://example.org/ns/*/sa/*\" (not to callers without an identity); exempt callers \"spiffe://example.org/ns/platform/**\""),
        "{text}"
    );
    assert!(
        text.contains("team-is-yours (caller-value, enforce) from policy.rule[0]; tag key \"team\" set only by callers matching \"spiffe://example.org/ns/{team}/sa/*\", to \"{team}\""),
        "{text}"
    );
}

// ------------------------------------------------------------------------------------ ca init

#[test]
fn ca_init_prints_validity_fingerprint_and_the_lines_to_paste() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("ca");
    let out = run([
        Path::new("ca"),
        Path::new("init"),
        Path::new("--out"),
        &out_dir,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let text = stdout(&out);
    assert!(
        text.contains("valid from 20") && text.contains(" until 20"),
        "{text}"
    );
    // The fingerprint is the SHA-256 of the certificate's DER.
    let pem = std::fs::read_to_string(out_dir.join("ca.pem")).unwrap();
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    use sha2::Digest;
    let expected: Vec<String> = sha2::Sha256::digest(der.as_ref())
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect();
    assert!(
        text.contains(&format!("SHA-256 fingerprint: {}", expected.join(":"))),
        "{text}"
    );
    // The lines to paste make a configuration check accepts, CA files included.
    let snippet = &text[text.find("[intercept]").expect("the [intercept] lines")..];
    let config = scratch(&dir, "pasted.toml", &format!("{snippet}{GOOD_CONFIG}"));
    let out = run([Path::new("check"), Path::new("--config"), &config]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));

    // --out naming a file: a clear error.
    let file = scratch(&dir, "a-file", "x");
    let out = run([
        Path::new("ca"),
        Path::new("init"),
        Path::new("--out"),
        &file,
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        stderr(&out).contains("is not a directory"),
        "{}",
        describe(&out)
    );
    assert!(!stderr(&out).contains("os error"), "{}", describe(&out));
}

// ---------------------------------------------------------------------------- CLI conventions

#[test]
fn help_lists_exit_codes_and_every_option_has_help() {
    let out = run(["--help"]);
    let help = stdout(&out);
    for code in ["0 ", "1 ", "2 ", "78 "] {
        assert!(
            help.contains(&format!("\n  {code}")),
            "exit code {code} missing\n{help}"
        );
    }
    for command in [
        &["serve"][..],
        &["check"],
        &["test"],
        &["explain"],
        &["ca", "init"],
    ] {
        let mut args = command.to_vec();
        // -h: the short help, one line per option.
        args.push("-h");
        let out = run(&args);
        let help = stdout(&out);
        assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
        // Every option line has words after it.
        for line in help.lines().filter(|l| l.trim_start().starts_with("--")) {
            let rest = line
                .trim_start()
                .split_once("  ")
                .map_or("", |(_, help)| help.trim());
            assert!(
                !rest.is_empty(),
                "{command:?}: no help for {line:?}\n{help}"
            );
        }
        assert_eq!(
            help.contains("--log-format"),
            command == ["serve"],
            "{command:?}\n{help}"
        );
    }
    // --log-format acts on serve only, and is refused elsewhere.
    let out = run(["check", "--log-format", "json"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
}

#[test]
fn version_names_the_commit_when_built_from_git() {
    let out = run(["--version"]);
    let text = stdout(&out);
    let head = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(root())
        .output();
    match head {
        Ok(h) if h.status.success() => {
            // The commit the binary was built from: HEAD, or an earlier one when nothing was
            // rebuilt since; a commit of this repository either way.
            let start = text.find("(commit ").expect("a commit") + "(commit ".len();
            let commit = &text[start..text[start..].find(')').unwrap() + start];
            let known = Command::new("git")
                .args(["cat-file", "-e", &format!("{commit}^{{commit}}")])
                .current_dir(root())
                .status()
                .unwrap();
            assert!(known.success(), "{text}");
        }
        _ => assert!(!text.contains("commit"), "{text}"),
    }
}

#[test]
fn completions_and_man_come_from_the_same_definition() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef kms-tag-guard"),
        ("fish", "complete -c kms-tag-guard"),
    ] {
        let out = run(["completions", shell]);
        assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
        let text = stdout(&out);
        assert!(text.contains(marker), "{shell}\n{text}");
        for word in ["explain", "config", "log-format", "junit"] {
            assert!(text.contains(word), "{shell}: {word} missing");
        }
    }
    let out = run(["man"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let text = stdout(&out);
    assert!(
        text.starts_with(".ie") || text.contains(".TH kms-tag-guard"),
        "{text}"
    );
    assert!(
        text.contains("explain") && text.contains("Exit codes"),
        "{text}"
    );
}

// ------------------------------------------------------------------------------ config schema

/// The mistakes of a TOML value against the parts of JSON Schema docs/config.schema.json uses:
/// `type`, `properties`, `additionalProperties: false`, `items`, `oneOf`, `const`, `enum`,
/// `required`.
fn schema_mistakes(schema: &serde_json::Value, value: &toml::Value, path: &str) -> Vec<String> {
    use serde_json::Value as J;
    let mut out = Vec::new();
    if let Some(options) = schema.get("oneOf").and_then(J::as_array) {
        let fitting = options
            .iter()
            .filter(|o| schema_mistakes(o, value, path).is_empty())
            .count();
        if fitting != 1 {
            out.push(format!(
                "{path}: fits {fitting} of the oneOf schemas, not exactly one"
            ));
        }
        return out;
    }
    if let Some(words) = schema.get("enum").and_then(J::as_array) {
        if !words.iter().any(|w| w.as_str() == value.as_str()) {
            out.push(format!("{path}: {value:?} is not one of {words:?}"));
        }
    }
    if let Some(constant) = schema.get("const") {
        if value.as_str() != constant.as_str() {
            out.push(format!("{path}: is not {constant}"));
        }
    }
    let Some(kind) = schema.get("type").and_then(J::as_str) else {
        return out;
    };
    let fits = match kind {
        "string" => value.is_str(),
        "integer" => value.is_integer(),
        "boolean" => value.is_bool(),
        "array" => value.is_array(),
        "object" => value.is_table(),
        other => panic!("the validator does not know type {other}"),
    };
    if !fits {
        out.push(format!(
            "{path}: expected {kind}, found {}",
            value.type_str()
        ));
        return out;
    }
    if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
        for (i, item) in array.iter().enumerate() {
            out.extend(schema_mistakes(items, item, &format!("{path}[{i}]")));
        }
    }
    if let Some(table) = value.as_table() {
        let properties = schema["properties"].as_object().unwrap();
        for (key, item) in table {
            match properties.get(key) {
                Some(s) => out.extend(schema_mistakes(s, item, &format!("{path}.{key}"))),
                None if schema["additionalProperties"] == J::Bool(false) => {
                    out.push(format!("{path}.{key}: not in the schema"))
                }
                None => {}
            }
        }
        for required in schema
            .get("required")
            .and_then(J::as_array)
            .into_iter()
            .flatten()
        {
            if !table.contains_key(required.as_str().unwrap()) {
                out.push(format!("{path}: {required} is required"));
            }
        }
    }
    out
}

/// The TOML of each `kms-tag-guard.toml: |` block of a manifest (a ConfigMap's; a file may hold
/// several documents).
fn configmap_tomls(yaml: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut lines = yaml.lines().peekable();
    while lines.any(|l| l.trim() == "kms-tag-guard.toml: |") {
        let mut block = Vec::new();
        while let Some(l) = lines.next_if(|l| l.is_empty() || l.starts_with("    ")) {
            block.push(l.get(4..).unwrap_or(""));
        }
        blocks.push(block.join("\n"));
    }
    blocks
}

/// The kms-tag-guard configs in the manifests under deploy/k8s, examples/ included: where each
/// is (`file[n]`, its n-th block) and its TOML.
fn configmap_configs() -> Vec<(String, String)> {
    let mut dirs = vec![root().join("deploy/k8s")];
    let mut found = Vec::new();
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|x| x == "yaml") {
                let yaml = std::fs::read_to_string(&path).unwrap();
                for (i, toml) in configmap_tomls(&yaml).into_iter().enumerate() {
                    found.push((format!("{}[{i}]", path.display()), toml));
                }
            }
        }
    }
    found.sort();
    found
}

#[test]
fn the_checked_in_schema_is_the_generated_one_and_the_shipped_configs_fit_it() {
    let checked_in = std::fs::read_to_string(root().join("docs/config.schema.json")).unwrap();
    let out = run(["schema"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(
        stdout(&out),
        checked_in,
        "docs/config.schema.json is stale: run `kms-tag-guard schema > docs/config.schema.json`"
    );
    let schema: serde_json::Value = serde_json::from_str(&checked_in).unwrap();

    let mut texts: Vec<(String, String)> = shipped_configs()
        .into_iter()
        .map(|p| {
            (
                p.display().to_string(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect();
    let configmaps = configmap_configs();
    for expected in [
        "mode-a-sidecar/configmap.yaml[0]",
        "mode-c-gateway/configmap.yaml[0]",
        "mode-c-gateway/examples/spiffe-gateway.yaml[0]",
    ] {
        assert!(
            configmaps.iter().any(|(name, _)| name.ends_with(expected)),
            "no config in deploy/k8s/{expected}: {:?}",
            configmaps.iter().map(|(name, _)| name).collect::<Vec<_>>()
        );
    }
    texts.extend(configmaps);
    for (name, text) in &texts {
        let value: toml::Value = toml::from_str(text).unwrap_or_else(|e| panic!("{name}: {e}"));
        let mistakes = schema_mistakes(&schema, &value, "");
        assert!(mistakes.is_empty(), "{name}: {mistakes:#?}");
    }

    // The schema knows what the reader refuses: a misspelt key, a wrong type, an unknown rule
    // type; and every key it lists is one the reader accepts.
    for bad in [
        "[listener]\nadress = \"127.0.0.1:1\"\n",
        "[limits]\nmax_body_bytes = \"big\"\n",
        "[[policy.rule]]\nid = \"a\"\ntype = \"value-patern\"\n",
    ] {
        let value: toml::Value = toml::from_str(bad).unwrap();
        assert!(!schema_mistakes(&schema, &value, "").is_empty(), "{bad}");
    }
    // The words the schema lists for a key are those the reader takes, and no others.
    let rule_words = |words: &[&str]| -> Vec<String> {
        words
            .iter()
            .map(|w| format!("[[policy.rule]]\nid = \"r\"\ntype = \"forbidden-key\"\nkeys = [\"k\"]\nmode = \"{w}\"\n"))
            .collect()
    };
    for (key, rule, words) in kms_tag_guard::schema::CHOICES {
        let configs = |words: &[&str]| -> Vec<String> {
            if rule.is_empty() {
                let (section, key) = key.split_once('.').unwrap();
                // client_auth is read only together with client_ca, on a TLS listener.
                let with = if key == "client_auth" {
                    "tls_cert = \"c.pem\"\ntls_key = \"k.pem\"\nclient_ca = \"ca.pem\"\n"
                } else {
                    ""
                };
                words
                    .iter()
                    .map(|w| format!("[{section}]\n{with}{key} = \"{w}\"\n"))
                    .collect()
            } else {
                rule_words(words)
            }
        };
        for (text, good) in configs(words)
            .into_iter()
            .map(|t| (t, true))
            .chain(configs(&["bogus"]).into_iter().map(|t| (t, false)))
        {
            let dir = tempfile::tempdir().unwrap();
            let config = scratch(&dir, "choice.toml", &text);
            let out = run([
                Path::new("check"),
                Path::new("--no-files"),
                Path::new("--config"),
                &config,
            ]);
            assert_eq!(
                out.status.code() == Some(0),
                good,
                "{text}: {}",
                describe(&out)
            );
            let value: toml::Value = toml::from_str(&text).unwrap();
            assert_eq!(
                schema_mistakes(&schema, &value, "").is_empty(),
                good,
                "{text}"
            );
        }
    }
    let sections = schema["properties"].as_object().unwrap();
    for (section, s) in sections {
        for key in s["properties"].as_object().unwrap().keys() {
            if key == "rule" {
                continue;
            }
            let dir = tempfile::tempdir().unwrap();
            let config = scratch(&dir, "one-key.toml", &format!("[{section}]\n{key} = []\n"));
            let out = run([
                Path::new("check"),
                Path::new("--no-files"),
                Path::new("--config"),
                &config,
            ]);
            // A wrong type, never an unknown key.
            assert!(
                !stderr(&out).contains("unknown key"),
                "{section}.{key}: {}",
                describe(&out)
            );
        }
    }
}

#[test]
fn check_print_shows_the_effective_configuration_which_reads_back_the_same() {
    for config in shipped_configs() {
        let print = |config: &Path| {
            run([
                Path::new("check"),
                Path::new("--no-files"),
                Path::new("--print"),
                Path::new("--config"),
                config,
            ])
        };
        let out = print(&config);
        assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
        let text = stdout(&out);
        // Defaults filled in: every section and the settings the file leaves out.
        for expected in [
            "[listener]\naddress = ",
            "[limits]\nmax_body_bytes = ",
            "queue_capacity = ",
            "[policy]\nmode = ",
        ] {
            assert!(
                text.contains(expected),
                "{}: {expected:?}\n{text}",
                config.display()
            );
        }
        assert_eq!(
            text.matches("\n[[policy.rule]]\n").count(),
            count_tables(&config, "[[policy.rule]]"),
            "{text}"
        );
        // Printed next to the original (relative org_tag_policy paths), it reads back the same.
        // Not *.toml: other tests list the shipped configs by extension.
        let copy = config.with_file_name(".effective-copy.tmp");
        std::fs::write(&copy, &text).unwrap();
        let again = print(&copy);
        std::fs::remove_file(&copy).unwrap();
        assert_eq!(again.status.code(), Some(0), "{}", describe(&again));
        let strip = |t: &str| t.lines().skip(1).collect::<Vec<_>>().join("\n");
        assert_eq!(strip(&stdout(&again)), strip(&text), "{}", config.display());
    }
}
