//! A panic on a shard ends the process at once, non-zero, with the panic logged (ARCHITECTURE.md,
//! "A panic ends the process"): a half-alive server whose dead shard keeps receiving connections
//! through SO_REUSEPORT is worse than a restart.

mod support;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{binary, free_port, SECRET};

#[test]
fn a_panicking_shard_ends_the_process_with_its_message() {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut child = Command::new(binary())
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("REALTIME_ADDR", &addr)
        .env("JWT_SECRET", SECRET)
        .env("REALTIME_SHARDS", "2")
        .env("POWA_TEST_PANIC_SHARD", "1")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn powa-realtime");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the server kept running after a shard panicked");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert_eq!(status.code(), Some(101), "exit status; stderr:\n{stderr}");
    assert!(stderr.contains("shard listening"), "the shards had started; stderr:\n{stderr}");
    assert!(
        stderr.contains("test hook: shard 1 panics on purpose"),
        "the panic message is logged; stderr:\n{stderr}"
    );
    assert!(stderr.contains("exiting so that a supervisor restarts the server"), "stderr:\n{stderr}");
}
