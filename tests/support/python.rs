//! The official Python client (`realtime`, pinned) for the tests: a venv under
//! `target/py-venv` created and filled on first use, and a runner for test scripts that print
//! JSON lines. A missing `python3` or a failed install fails the test; it never skips.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The `realtime` release pinned for these tests (PROTOCOL.md §0.1 baseline).
pub const PY_REALTIME_VERSION: &str = "2.34.1";
pub const PIP_TIMEOUT: Duration = Duration::from_secs(300);

pub fn repo_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `command` in its own process group, killing the group after `timeout`.
/// Returns (status or None on timeout, stdout, stderr).
pub fn run_bounded(mut command: Command, timeout: Duration, what: &str) -> (Option<ExitStatus>, String, String) {
    command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
    let mut child = command.spawn().unwrap_or_else(|e| panic!("could not start {what}: {e}"));
    let pid = child.id() as libc::pid_t;
    let read_all = |mut pipe: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let out = read_all(Box::new(child.stdout.take().unwrap()));
    let err = read_all(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            break None;
        }
        thread::sleep(Duration::from_millis(100));
    };
    // SAFETY: kill(2) on the process group created above; ESRCH (already gone) is fine.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
    }
    let _ = child.kill();
    let _ = child.wait();
    (status, out.join().unwrap_or_default(), err.join().unwrap_or_default())
}

/// The `realtime` version installed in the venv, if any.
pub fn installed_realtime_version(python: &Path) -> Option<String> {
    let mut command = Command::new(python);
    command.args(["-c", "import importlib.metadata as m; print(m.version('realtime'))"]);
    match run_bounded(command, Duration::from_secs(30), "python -c version") {
        (Some(status), out, _) if status.success() => Some(out.trim().to_string()),
        _ => None,
    }
}

/// `target/py-venv/bin/python` with `realtime==PY_REALTIME_VERSION`, created when missing.
pub fn python_with_realtime() -> PathBuf {
    let venv = repo_dir().join("target").join("py-venv");
    let python = venv.join("bin").join("python");
    if python.exists() && installed_realtime_version(&python).as_deref() == Some(PY_REALTIME_VERSION) {
        return python;
    }
    if !python.exists() {
        eprintln!("[python] creating {}", venv.display());
        let mut command = Command::new("python3");
        command.arg("-m").arg("venv").arg(&venv);
        let (status, out, err) = match Command::new("python3").arg("--version").output() {
            Ok(_) => run_bounded(command, Duration::from_secs(120), "python3 -m venv"),
            Err(e) => panic!(
                "`python3` was not found ({e}). The Python client test needs Python 3 with the \
                 venv module on PATH (e.g. `apt-get install python3 python3-venv`)."
            ),
        };
        assert!(
            matches!(status, Some(s) if s.success()) && python.exists(),
            "`python3 -m venv {}` failed (status {status:?})\n--- stdout ---\n{out}\n--- stderr ---\n{err}",
            venv.display()
        );
    }
    eprintln!("[python] installing realtime=={PY_REALTIME_VERSION} into {}", venv.display());
    let mut command = Command::new(&python);
    command.args(["-m", "pip", "install", "--disable-pip-version-check", "--quiet"]);
    command.arg(format!("realtime=={PY_REALTIME_VERSION}"));
    let (status, out, err) = run_bounded(command, PIP_TIMEOUT, "pip install");
    assert!(
        matches!(status, Some(s) if s.success()),
        "`pip install realtime=={PY_REALTIME_VERSION}` failed or timed out (status {status:?})\n\
         --- stdout ---\n{out}\n--- stderr ---\n{err}"
    );
    let installed = installed_realtime_version(&python);
    assert_eq!(
        installed.as_deref(),
        Some(PY_REALTIME_VERSION),
        "after pip install the venv reports realtime {installed:?}"
    );
    python
}

/// A running Python script: its stdout as parsed JSON lines, stderr collected; killed on drop.
pub struct PyScript {
    child: Child,
    lines: mpsc::Receiver<String>,
    stdout: Vec<String>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl PyScript {
    pub fn spawn(mut command: Command) -> PyScript {
        command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
        let mut child = command.spawn().unwrap_or_else(|e| panic!("could not start the Python script: {e}"));
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                eprintln!("[python] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = std::sync::Arc::clone(&stderr);
        let pipe = child.stderr.take().unwrap();
        thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                eprintln!("[python:stderr] {line}");
                let mut text = sink.lock().unwrap();
                text.push_str(&line);
                text.push('\n');
            }
        });
        PyScript { child, lines, stdout: Vec::new(), stderr }
    }

    /// The next stdout JSON object whose `event` is `event` (an `error` event fails at once).
    #[track_caller]
    pub fn wait_event(&mut self, event: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.stdout.push(line.clone());
                    let value: Value = serde_json::from_str(&line).unwrap_or(json!({"event": "text", "line": line}));
                    if value["event"] == event {
                        return value;
                    }
                    if value["event"] == "error" {
                        panic!("the Python script reported an error: {value}\n{}", self.dump());
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("no `{event}` line from the Python script within {timeout:?}\n{}", self.dump())
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.wait_exit(Duration::from_secs(5));
                    panic!(
                        "the Python script ended ({status:?}) before printing `{event}`\n{}",
                        self.dump()
                    )
                }
            }
        }
    }

    /// Closes stdin (the script's signal to leave) and waits for it to exit.
    pub fn finish(&mut self, timeout: Duration) -> Option<ExitStatus> {
        drop(self.child.stdin.take());
        self.wait_exit(timeout)
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn dump(&self) -> String {
        format!(
            "--- python stdout ---\n{}\n--- python stderr ---\n{}",
            self.stdout.join("\n"),
            self.stderr.lock().unwrap()
        )
    }
}

impl Drop for PyScript {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group this script was started in.
        unsafe {
            libc::kill(-(self.child.id() as libc::pid_t), libc::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
