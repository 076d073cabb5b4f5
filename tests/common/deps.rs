//! Third-party programs some tests drive (moto in a Python venv, the AWS SDK for JavaScript from
//! npm), installed on first use under the cargo target directory (gitignored) and reused while
//! their pinned requirements/lock file is unchanged — the pattern of `deploy/validate.sh`.
//!
//! Installation is serialised by an exclusive `flock(2)` on `<target>/<name>.lock`: every test
//! thread and every test binary that needs the same install waits for the one that is doing it.
//! The kernel drops the lock when its holder dies, so a killed run leaves no stale lock, and a
//! half-done install has no stamp, so the next run starts it again. A missing `python3` or
//! `node` is a test failure naming what to install, never a skip.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The cargo target directory (`target/`, or `$CARGO_TARGET_DIR`).
pub fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("CARGO_TARGET_TMPDIR is <target>/tmp")
        .to_path_buf()
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// An exclusive `flock(2)` on a lock file, released when dropped (or when the process dies).
pub struct FileLock {
    _file: File,
}

impl FileLock {
    /// Blocks until the lock on `path` (created if missing) is ours.
    pub fn acquire(path: &Path) -> FileLock {
        use std::os::unix::io::AsRawFd;
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).unwrap_or_else(|e| panic!("create {parent:?}: {e}"));
        }
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .unwrap_or_else(|e| panic!("open the lock file {path:?}: {e}"));
        loop {
            // SAFETY: a valid descriptor owned by `file`, which outlives the lock.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                return FileLock { _file: file };
            }
            let error = std::io::Error::last_os_error();
            if error.kind() != std::io::ErrorKind::Interrupted {
                panic!("flock {path:?}: {error}");
            }
        }
    }
}

/// Makes sure `dir` holds a finished install for `stamp` (the bytes of the pinned
/// requirements/lock file): if `dir/.installed` differs, deletes `dir` and runs `install(dir)`
/// under the lock, then writes the stamp. `install` returns a message on failure, which fails
/// the test (and leaves no stamp, so the next run tries again).
pub fn ensure_installed(
    dir: &Path,
    stamp: &[u8],
    install: impl FnOnce(&Path) -> Result<(), String>,
) -> PathBuf {
    let stamp_path = dir.join(".installed");
    if fs::read(&stamp_path).ok().as_deref() == Some(stamp) {
        return dir.to_path_buf();
    }
    let _lock = FileLock::acquire(&dir.with_extension("lock"));
    // Someone else may have finished while we waited.
    if fs::read(&stamp_path).ok().as_deref() == Some(stamp) {
        return dir.to_path_buf();
    }
    if dir.exists() {
        fs::remove_dir_all(dir).unwrap_or_else(|e| panic!("remove the stale {dir:?}: {e}"));
    }
    fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {dir:?}: {e}"));
    eprintln!("installing test dependencies into {}", dir.display());
    if let Err(message) = install(dir) {
        let _ = fs::remove_dir_all(dir);
        panic!("{message}");
    }
    let tmp = dir.join(".installed.tmp");
    fs::write(&tmp, stamp).expect("write the install stamp");
    fs::rename(&tmp, &stamp_path).expect("rename the install stamp");
    dir.to_path_buf()
}

/// Runs a command to completion, capturing its output; `Err` names the command and shows its
/// output when it cannot start or exits non-zero.
pub fn run(command: &mut Command) -> Result<Output, String> {
    let shown = format!("{command:?}");
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("could not run {shown}: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "{shown} failed ({}):\n{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(output)
}

/// `program --version`'s first line, or a panic saying what to install.
pub fn require_program(program: &str, install_hint: &str) -> String {
    match Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            text.lines().next().unwrap_or("").trim().to_owned()
        }
        Ok(out) => panic!(
            "`{program} --version` failed ({}); this test needs {install_hint}",
            out.status
        ),
        Err(e) => panic!("`{program}` is not installed ({e}); this test needs {install_hint}"),
    }
}

// ------------------------------------------------------------------------------- Python

/// A venv at `<target>/<name>` with the pinned `requirements` (a path relative to the repo
/// root) installed by a `python3` of at least `min_version` (major, minor); returns the venv's
/// directory.
pub fn python_venv(name: &str, requirements: &str, min_version: (u32, u32)) -> PathBuf {
    let hint = format!(
        "python3 {}.{} or later with the venv module and pip \
         (Debian: apt-get install python3 python3-venv python3-pip)",
        min_version.0, min_version.1
    );
    let requirements_path = repo_root().join(requirements);
    let stamp = fs::read(&requirements_path)
        .unwrap_or_else(|e| panic!("read {}: {e}", requirements_path.display()));
    let dir = target_dir().join(name);
    ensure_installed(&dir, &stamp, |dir| {
        let version = require_program("python3", &hint);
        let found: Vec<u32> = version
            .trim_start_matches("Python ")
            .split('.')
            .take(2)
            .filter_map(|n| n.parse().ok())
            .collect();
        if found.len() != 2 || (found[0], found[1]) < min_version {
            return Err(format!("{version:?} is too old; this test needs {hint}"));
        }
        eprintln!("{version}: pip install -r {requirements}");
        run(Command::new("python3").arg("-m").arg("venv").arg(dir))
            .map_err(|e| format!("{e}\nthis test needs {hint}"))?;
        run(Command::new(dir.join("bin/python"))
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-input",
                "-r",
            ])
            .arg(&requirements_path))
        .map_err(|e| format!("pip could not install {requirements}: {e}"))?;
        Ok(())
    })
}

// ------------------------------------------------------------------------------- Node

/// The oldest Node.js major the pinned `@aws-sdk/client-kms` supports (its `engines`).
pub const NODE_MAJOR_MIN: u32 = 20;

/// `tests/js`'s `package.json` and `package-lock.json` copied to `<target>/node-sdk` and
/// installed there with `npm ci` (the source tree stays clean); returns that directory (holding
/// `node_modules`), which `tests/js/kms-driver.mjs` takes as `KMS_DRIVER_NODE_MODULES`.
pub fn node_modules() -> PathBuf {
    node_modules_of("tests/js", "node-sdk")
}

/// The `node_modules` of the npm package in `package_dir` (a path relative to the repo root,
/// with its package.json and package-lock.json), installed with `npm ci` into `<target>/<name>`;
/// returns that directory.
pub fn node_modules_of(package_dir: &str, name: &str) -> PathBuf {
    let hint = format!(
        "Node.js {NODE_MAJOR_MIN} or later with npm (https://nodejs.org, or Debian/NodeSource: \
         apt-get install nodejs npm)"
    );
    let version = require_program("node", &hint);
    let major: u32 = version
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the Node.js version from {version:?}"));
    assert!(
        major >= NODE_MAJOR_MIN,
        "node {version} is too old; this test needs {hint}"
    );
    let js = repo_root().join(package_dir);
    let package = fs::read(js.join("package.json")).expect("the package's package.json");
    let lock = fs::read(js.join("package-lock.json")).expect("the package's package-lock.json");
    let mut stamp = package.clone();
    stamp.extend_from_slice(b"\n--- package-lock.json ---\n");
    stamp.extend_from_slice(&lock);
    let dir = target_dir().join(name);
    ensure_installed(&dir, &stamp, |dir| {
        require_program("npm", &hint);
        fs::write(dir.join("package.json"), &package).map_err(|e| e.to_string())?;
        fs::write(dir.join("package-lock.json"), &lock).map_err(|e| e.to_string())?;
        eprintln!("{version}: npm ci in {}", dir.display());
        run(Command::new("npm")
            .args([
                "ci",
                "--no-audit",
                "--no-fund",
                "--ignore-scripts",
                "--loglevel=error",
            ])
            .current_dir(dir))
        .map_err(|e| format!("npm could not install {package_dir}/package-lock.json: {e}"))?;
        Ok(())
    })
}
