//! The README's walk-through, run as written, so that the README and what the proxy does cannot
//! drift apart. The `sh` blocks of the section "A local walk-through" are taken from README.md and
//! run with bash, in order, in a directory of their own under the target directory
//! (`<target>/readme-walkthrough`, kept between runs so that its `.venv` is reused):
//!
//! - the blocks before the first long-running one (the set-up) one after the other;
//! - the long-running ones (the prose before them says "runs until Ctrl-C": moto, the proxy) in
//!   the background, each in a process group of its own, ended when the test ends;
//! - the rest in one bash process, as typed into one terminal.
//!
//! What differs from a reader's run, and why: the ports 5000, 8080 and 9901 are replaced by free
//! ones (tests run side by side); `pip install` gets `PIP_CONSTRAINT=tests/readme-constraints.txt`
//! (the exact versions, as every other test pins its packages); `cargo build --release` is a
//! stand-in on the PATH that checks its arguments, and `target/release/kms-tag-guard` is the
//! binary `cargo test` built (a release build would take minutes); `config/` is a copy with the
//! ports replaced.
//!
//! Checked against the README's own text: the denial the CLI prints (the `text` block, one
//! line), the tags `list-resource-tags` prints (the first `json` block), and the audit records
//! (the second `json` block): as many, of the same events, operations, decisions, tags and
//! violations, with the same fields.

mod common;

use std::fs;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::deps;
use common::ops::free_port;
use serde_json::Value;

const SECTION: &str = "## A local walk-through";
/// How long moto and the proxy may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// A fenced block of the walk-through: its language, its text, and whether the prose before it
/// says it runs until Ctrl-C.
#[derive(Debug)]
struct Block {
    lang: String,
    text: String,
    background: bool,
}

/// The fenced blocks of the walk-through section of README.md, in order.
fn walkthrough() -> Vec<Block> {
    let readme = fs::read_to_string(deps::repo_root().join("README.md")).expect("README.md");
    let start = readme
        .find(SECTION)
        .expect("the README has a walk-through section");
    let rest = &readme[start + SECTION.len()..];
    let section = &rest[..rest.find("\n## ").unwrap_or(rest.len())];
    let mut blocks = Vec::new();
    let mut prose = String::new();
    let mut lines = section.lines();
    while let Some(line) = lines.next() {
        if let Some(lang) = line.strip_prefix("```") {
            let mut text = String::new();
            for body in lines.by_ref() {
                if body.starts_with("```") {
                    break;
                }
                text.push_str(body);
                text.push('\n');
            }
            blocks.push(Block {
                lang: lang.trim().to_owned(),
                text,
                background: prose.contains("runs until Ctrl-C"),
            });
            prose.clear();
        } else {
            prose.push_str(line);
            prose.push('\n');
        }
    }
    blocks
}

/// A background process, its process group ended (SIGKILL) when dropped.
struct Background {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Drop for Background {
    fn drop(&mut self) {
        // SAFETY: the group of our own child, which it leads (process_group(0)).
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

impl Background {
    fn output(&self) -> String {
        format!(
            "stdout:\n{}\nstderr:\n{}",
            fs::read_to_string(&self.stdout).unwrap_or_default(),
            fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }
}

/// Where the walk-through runs, and how its commands are started.
struct Walk {
    dir: PathBuf,
    path: String,
    ports: [(&'static str, String); 3],
}

impl Walk {
    /// `text` with the README's ports replaced by this run's.
    fn ported(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for (from, to) in &self.ports {
            out = out.replace(from, to);
        }
        out
    }

    fn bash(&self, script: &str) -> Command {
        let mut command = Command::new("bash");
        command.arg("-c").arg(self.ported(script));
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy().into_owned();
            let upper = name.to_ascii_uppercase();
            if upper.starts_with("AWS_")
                || upper.starts_with("PIP_")
                || upper == "VIRTUAL_ENV"
                || matches!(upper.as_str(), "HTTP_PROXY" | "HTTPS_PROXY" | "NO_PROXY")
            {
                command.env_remove(&name);
            }
        }
        let nowhere = self.dir.join("no-such-file");
        command
            .current_dir(&self.dir)
            .env("PATH", &self.path)
            .env("HOME", self.dir.join("home"))
            .env("AWS_CONFIG_FILE", &nowhere)
            .env("AWS_SHARED_CREDENTIALS_FILE", &nowhere)
            .env(
                "PIP_CONSTRAINT",
                deps::repo_root().join("tests/readme-constraints.txt"),
            )
            .env("PIP_DISABLE_PIP_VERSION_CHECK", "1")
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null());
        command
    }
}

fn wait_for_port(port: &str, what: &Background) {
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + START_TIMEOUT;
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nothing listens on {addr} after {START_TIMEOUT:?}\n{}",
            what.output()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Lays out the directory: `config/` with the ports replaced, `target/release/kms-tag-guard`
/// (the binary cargo test built), a `cargo` stand-in on the PATH, a HOME.
fn prepare(dir: &Path, ports: &[(&'static str, String); 3]) -> String {
    let examples = dir.join("config/examples");
    let _ = fs::remove_dir_all(dir.join("config"));
    fs::create_dir_all(&examples).unwrap();
    for entry in fs::read_dir(deps::repo_root().join("config/examples")).unwrap() {
        let entry = entry.unwrap();
        let mut text = fs::read_to_string(entry.path()).unwrap();
        for (from, to) in ports {
            text = text.replace(from, to);
        }
        fs::write(examples.join(entry.file_name()), text).unwrap();
    }
    let release = dir.join("target/release");
    fs::create_dir_all(&release).unwrap();
    let binary = release.join("kms-tag-guard");
    let _ = fs::remove_file(&binary);
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_kms-tag-guard"), &binary).unwrap();
    let shims = dir.join("shims");
    fs::create_dir_all(&shims).unwrap();
    let cargo = shims.join("cargo");
    let mut file = fs::File::create(&cargo).unwrap();
    file.write_all(
        b"#!/bin/sh\n\
          # tests/readme.rs: the binary is the one cargo test built, not a release build.\n\
          [ \"$*\" = 'build --release' ] || { echo \"unexpected: cargo $*\" >&2; exit 2; }\n",
    )
    .unwrap();
    drop(file);
    fs::set_permissions(&cargo, fs::Permissions::from_mode(0o755)).unwrap();
    fs::create_dir_all(dir.join("home")).unwrap();
    format!(
        "{}:{}",
        shims.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// The fields of an audit record, sorted.
fn fields(record: &Value) -> Vec<String> {
    let mut keys: Vec<String> = record.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    keys
}

/// What a record says, without its times and ids.
fn gist(record: &Value) -> Value {
    let mut gist = serde_json::Map::new();
    for key in [
        "event",
        "operation",
        "region",
        "access_key_id",
        "attempt",
        "set",
        "remove",
        "decision",
        "violations",
        "dry_run_violations",
        "upstream_status",
        "aws_error",
        "applied",
        "error",
    ] {
        if let Some(value) = record.get(key) {
            gist.insert(key.to_owned(), value.clone());
        }
    }
    Value::Object(gist)
}

#[test]
fn the_walk_through_runs_as_written() {
    deps::require_program(
        "python3",
        "python3 3.10+ with venv and pip (Debian: apt-get install python3 python3-venv python3-pip)",
    );
    let blocks = walkthrough();
    let sh: Vec<&Block> = blocks.iter().filter(|b| b.lang == "sh").collect();
    let first_background = sh
        .iter()
        .position(|b| b.background)
        .expect("the walk-through starts moto and the proxy");
    let last_background = sh.iter().rposition(|b| b.background).unwrap();
    assert_eq!(
        last_background - first_background,
        1,
        "two long-running commands, moto and the proxy: {sh:#?}"
    );
    let denial = blocks
        .iter()
        .find(|b| b.lang == "text")
        .expect("the denial as the CLI prints it");
    let jsons: Vec<&Block> = blocks.iter().filter(|b| b.lang == "json").collect();
    assert_eq!(jsons.len(), 2, "the tags and the audit records");

    let dir = deps::target_dir().join("readme-walkthrough");
    let _lock = deps::FileLock::acquire(&dir.with_extension("lock"));
    fs::create_dir_all(&dir).unwrap();
    let ports = [
        ("5000", free_port().to_string()),
        ("8080", free_port().to_string()),
        ("9901", free_port().to_string()),
    ];
    let path = prepare(&dir, &ports);
    let walk = Walk { dir, path, ports };

    // The set-up.
    for block in &sh[..first_background] {
        let started = Instant::now();
        let out = walk.bash(&block.text).output().expect("bash");
        assert!(
            out.status.success(),
            "{}\nfailed ({}):\n{}\n{}",
            block.text,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("set-up block done in {:?}", started.elapsed());
    }

    // Terminals 1 and 2.
    let mut background = Vec::new();
    for (i, block) in sh[first_background..=last_background].iter().enumerate() {
        let stdout = walk.dir.join(format!("terminal-{}.out", i + 1));
        let stderr = walk.dir.join(format!("terminal-{}.err", i + 1));
        let child = walk
            .bash(&block.text)
            .stdout(fs::File::create(&stdout).unwrap())
            .stderr(fs::File::create(&stderr).unwrap())
            .process_group(0)
            .spawn()
            .expect("bash");
        background.push(Background {
            child,
            stdout,
            stderr,
        });
    }
    let (moto, proxy) = (&background[0], &background[1]);
    wait_for_port(&walk.ports[0].1, moto);
    wait_for_port(&walk.ports[1].1, proxy);

    // Terminal 3: the rest, in one shell.
    let script: String = sh[last_background + 1..]
        .iter()
        .map(|b| b.text.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    let out = walk.bash(&script).output().expect("bash");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let shown = format!(
        "{script}\nstdout:\n{stdout}\nstderr:\n{stderr}\nthe proxy:\n{}\nmoto:\n{}",
        proxy.output(),
        moto.output()
    );
    assert!(out.status.success(), "{shown}");

    // The denial, on one line, as the README shows it.
    let denial_line = denial.text.trim_end();
    assert!(!denial_line.contains('\n'), "the denial is one line");
    let printed: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(printed, [denial_line], "{shown}");

    // The tags.
    let shown_tags: Value = serde_json::from_str(&jsons[0].text).expect("the README's tags");
    let tags: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}\n{shown}"));
    assert_eq!(tags, shown_tags, "{shown}");

    // The audit records: the README's sample, but for times and ids.
    let sample: Vec<Value> = jsons[1]
        .text
        .lines()
        .map(|l| serde_json::from_str(l).expect("the README's audit sample"))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    let audit: Vec<Value> = loop {
        let text = fs::read_to_string(&proxy.stdout).unwrap_or_default();
        let records: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        if records.len() >= sample.len() || Instant::now() > deadline {
            break records;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(audit.len(), sample.len(), "{shown}");
    for (record, shown_record) in audit.iter().zip(&sample) {
        assert_eq!(fields(record), fields(shown_record), "{record}");
        assert_eq!(gist(record), gist(shown_record), "{record}");
    }
    // The key the records name is the key the walk-through created.
    let key_id = &audit[2]["key_id"];
    assert_eq!(key_id, &audit[4]["key_id"]);
    assert!(key_id.as_str().is_some_and(|k| !k.is_empty()));
}
