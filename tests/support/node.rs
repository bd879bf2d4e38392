//! Running the official realtime-js client's test files (the Node project in `tests/js`) with
//! `node --test`, bounded in time, for every test binary that drives the server through it.
//!
//! Node 20+ and npm are required: their absence fails the test, it never skips.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use super::Server;

/// `npm ci` gets this long.
const NPM_TIMEOUT: Duration = Duration::from_secs(300);

/// The Node project.
pub fn js_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("js")
}

/// Panics with an actionable message when `program --version` cannot run.
fn require_tool(program: &str) -> String {
    match Command::new(program).arg("--version").output() {
        Ok(output) if output.status.success() => String::from_utf8_lossy(&output.stdout).trim().to_string(),
        Ok(output) => panic!(
            "`{program} --version` failed ({}): {}\nThe realtime-js tests need Node.js 20+ and npm on PATH.",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ),
        Err(err) => panic!(
            "`{program}` was not found ({err}). The realtime-js tests need Node.js 20+ and npm on PATH; \
             install them (e.g. `apt-get install nodejs npm`) and run the test again."
        ),
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Checks node (20+) and npm, runs `npm ci` when `node_modules` is missing or older than
/// `package-lock.json`, and returns the project directory.
pub fn prepare() -> PathBuf {
    let node_version = require_tool("node");
    let npm_version = require_tool("npm");
    eprintln!("[realtime-js] node {node_version}, npm {npm_version}");
    let major: u32 = node_version.trim_start_matches('v').split('.').next().and_then(|m| m.parse().ok()).unwrap_or(0);
    assert!(major >= 20, "node {node_version} is too old; Node.js 20+ is required");
    let dir = js_dir();
    let lock = dir.join("package-lock.json");
    let lock_time = modified(&lock).unwrap_or_else(|| panic!("{} is missing; it is part of the repository", lock.display()));
    let modules = dir.join("node_modules");
    // npm rewrites node_modules/.package-lock.json on every install; fall back to the directory.
    let installed_time = modified(&modules.join(".package-lock.json")).or_else(|| modified(&modules));
    let fresh = matches!(installed_time, Some(t) if t >= lock_time)
        && modules.join("@supabase").join("realtime-js").is_dir()
        && modules.join("ws").is_dir()
        && modules.join("puppeteer-core").is_dir()
        && modules.join("esbuild").is_dir();
    if !fresh {
        eprintln!("[realtime-js] running `npm ci` in {}", dir.display());
        let mut command = Command::new("npm");
        command.args(["ci", "--no-audit", "--no-fund"]).current_dir(&dir).stdin(Stdio::null());
        let (status, stdout, stderr) = run_with_timeout(command, NPM_TIMEOUT, "npm");
        assert!(
            matches!(status, Some(s) if s.success()),
            "`npm ci` failed or timed out (status {status:?})\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
        );
    }
    dir
}

/// `node --test --test-concurrency=1 <files>` in `dir`, without colour codes; the caller adds
/// the `POWA_*` environment.
pub fn command(dir: &Path, files: &[&str]) -> Command {
    for file in files {
        assert!(dir.join(file).is_file(), "{file} is missing from {}", dir.display());
    }
    let mut command = Command::new("node");
    command
        .args(["--test", "--test-concurrency=1"])
        .args(files)
        .current_dir(dir)
        .stdin(Stdio::null())
        .env("NO_COLOR", "1");
    command
}

/// Runs a node command built by [`command`], killing it after `timeout`, then asserts that the
/// server is still up and that every node test passed.
pub fn run(label: &str, command: Command, timeout: Duration, server: &mut Server) {
    let started = Instant::now();
    let (status, stdout, stderr) = run_with_timeout(command, timeout, "node");
    eprintln!("[{label}] node finished in {:?} with {status:?}", started.elapsed());
    assert!(server.is_running(), "powa-realtime exited during the {label} run");
    match status {
        None => panic!(
            "the {label} tests did not finish within {timeout:?} and were killed; the full node output is above\n\
             --- last lines of stdout ---\n{}\n--- last lines of stderr ---\n{}",
            tail(&stdout, 40),
            tail(&stderr, 20)
        ),
        Some(status) => assert!(
            status.success(),
            "the {label} tests failed ({status}); see the node output above\n--- summary ---\n{}",
            summary(&stdout)
        ),
    }
}

/// Spawns `command` in its own process group, echoes its output line by line while it runs,
/// and kills the whole group after `timeout`. Returns (status or None on timeout, stdout, stderr).
fn run_with_timeout(mut command: Command, timeout: Duration, tag: &str) -> (Option<ExitStatus>, String, String) {
    command.stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
    let mut child = command.spawn().unwrap_or_else(|err| panic!("could not start {tag}: {err}"));
    let pid = child.id() as libc::pid_t;
    let collect = |stream: Box<dyn Read + Send>, label: String| {
        let buffer = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&buffer);
        let handle = thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                eprintln!("[{label}] {line}");
                let mut text = sink.lock().unwrap();
                text.push_str(&line);
                text.push('\n');
            }
        });
        (buffer, handle)
    };
    let (out_buf, out_thread) = collect(Box::new(child.stdout.take().unwrap()), tag.to_string());
    let (err_buf, err_thread) = collect(Box::new(child.stderr.take().unwrap()), format!("{tag}:stderr"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            eprintln!("[realtime-js] {tag} still running after {timeout:?}: killing it");
            // SAFETY: plain kill(2) on the process group this function created.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(100));
    };
    // Children of the group may still hold the pipes; make sure they are gone too.
    // SAFETY: as above; the group is ours, and ESRCH (already gone) is fine.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
    }
    let _ = out_thread.join();
    let _ = err_thread.join();
    let stdout = out_buf.lock().unwrap().clone();
    let stderr = err_buf.lock().unwrap().clone();
    (status, stdout, stderr)
}

/// A well-formed JWT whose signature does not verify: the last four characters of a valid
/// token's signature segment are replaced.
pub fn tamper_signature(token: &str) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "not a JWT: {token}");
    let signature = parts[2];
    assert!(signature.len() > 4, "signature too short: {token}");
    let keep = &signature[..signature.len() - 4];
    let tail = &signature[signature.len() - 4..];
    // A replacement that differs from the original tail in every position. 'A' and 'Q' (0 and
    // 16) have their low bits clear, so even the final character, whose last bits are padding
    // in base64url, stays canonical: the token remains well-formed, only its signature is wrong.
    let replacement: String = tail.chars().map(|c| if c == 'A' { 'Q' } else { 'A' }).collect();
    let tampered = format!("{}.{}.{keep}{replacement}", parts[0], parts[1]);
    assert_ne!(tampered, token);
    tampered
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The failing test names and the TAP totals, for the panic message.
fn summary(stdout: &str) -> String {
    stdout
        .lines()
        .filter(|line| {
            let t = line.trim_start();
            ["not ok", "# tests", "# pass", "# fail", "# cancelled", "✖"].iter().any(|p| t.starts_with(p))
        })
        .collect::<Vec<_>>()
        .join("\n")
}
