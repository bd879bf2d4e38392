//! docs/deploy.md's systemd unit: `systemd-analyze verify` accepts it (Debian package `systemd`,
//! installed by tools/test.sh when missing), and its `ExecStart` line, run with the unit's
//! environment, serves and drains within `TimeoutStopSec` on the unit's `KillSignal`.

mod support;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{free_port, http_request};

const INSTALLED: &str = "/usr/local/bin/powa-realtime";
const ENV_FILE: &str = "/etc/powa-realtime/env";

/// The unit block of docs/deploy.md.
fn unit() -> String {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/deploy.md")).unwrap();
    let after = doc.split("<!-- unit: powa-realtime.service -->\n```ini\n").nth(1).expect("the unit block in docs/deploy.md");
    after.split("\n```").next().unwrap().to_string() + "\n"
}

fn values<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines().filter_map(|line| line.strip_prefix(key)?.strip_prefix('=')).collect()
}

fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("powa-deploy-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn the_unit_verifies_and_its_exec_start_serves_and_drains() {
    let unit = unit();
    for required in ["LimitNOFILE", "LimitMEMLOCK", "Restart", "KillSignal", "TimeoutStopSec", "ExecStart"] {
        assert_eq!(values(&unit, required).len(), 1, "{required} in the unit");
    }
    assert_eq!(values(&unit, "Restart"), ["always"]);
    assert_eq!(values(&unit, "KillSignal"), ["SIGTERM"]);
    let timeout: u64 = values(&unit, "TimeoutStopSec")[0].parse().unwrap();
    let environment: Vec<(String, String)> = values(&unit, "Environment")
        .iter()
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap();
            (k.to_string(), v.to_string())
        })
        .collect();
    let drain: u64 = environment.iter().find(|(k, _)| k == "REALTIME_DRAIN_SECS").expect("REALTIME_DRAIN_SECS in the unit").1.parse().unwrap();
    assert!(timeout > drain + 5, "TimeoutStopSec={timeout} must exceed REALTIME_DRAIN_SECS + 5 = {}", drain + 5);

    // systemd-analyze verify on the unit, with the binary and env file where the test put them.
    let dir = temp_dir();
    let env_file = dir.join("env");
    std::fs::write(&env_file, format!("JWT_SECRET={}\n", support::SECRET)).unwrap();
    let local = unit.replace(INSTALLED, support::binary()).replace(ENV_FILE, env_file.to_str().unwrap());
    let unit_path = dir.join("powa-realtime.service");
    std::fs::write(&unit_path, &local).unwrap();
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit_path)
        .output()
        .expect("systemd-analyze (Debian package systemd) is required; tools/test.sh installs it");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "systemd-analyze verify failed:\n{stderr}");
    assert!(!stderr.contains("powa-realtime.service"), "systemd-analyze verify complained:\n{stderr}");

    // Run ExecStart with the unit's environment on a free loopback port.
    let exec = values(&local, "ExecStart")[0];
    let mut words = exec.split_whitespace();
    let mut command = Command::new(words.next().unwrap());
    command.args(words).env_clear().stdin(Stdio::null());
    for (key, value) in &environment {
        command.env(key, value);
    }
    let addr = format!("127.0.0.1:{}", free_port());
    command.env("REALTIME_ADDR", &addr).env("JWT_SECRET", support::SECRET).env("REALTIME_SHARDS", "2");
    let mut child = command.spawn().unwrap();
    let addr = addr.parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_request(addr, "GET", "/healthz", &[], b"").map(|r| r.0).ok() != Some(200) {
        assert!(Instant::now() < deadline && child.try_wait().unwrap().is_none(), "ExecStart did not serve");
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: kill(2) on our own child, with the unit's KillSignal.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let stop = Instant::now() + Duration::from_secs(timeout);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < stop, "not stopped within TimeoutStopSec");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    let _ = std::fs::remove_dir_all(&dir);
}
