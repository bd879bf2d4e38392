//! Runs the official `@supabase/realtime-js` client (the Node project in `tests/js`) against a
//! real `powa-realtime serve` process.
//!
//! Requires `node` (20 or newer) and `npm` on `PATH`. Their absence is a failure, not a skip:
//! client compatibility is part of what this repository promises.

mod support;

use std::time::Duration;

use support::{node, Server};

/// The node test run is killed after this long.
const NODE_TIMEOUT: Duration = Duration::from_secs(120);

/// The `*.test.mjs` files at the top of the Node project, sorted. The suites that need a
/// database live in `tests/js/db/` and have their own runners.
fn test_files(dir: &std::path::Path) -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .expect("read tests/js")
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".test.mjs"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no *.test.mjs files in {}", dir.display());
    files
}

#[test]
fn official_realtime_js_client_works_against_the_server() {
    let dir = node::prepare();
    let mut server = Server::start(&[]);

    let user_sub = "0b0e6c9e-3f1a-4a57-9c2f-6f1c2d3e4a5b";
    let anon = support::anon_key();
    let files = test_files(&dir);
    let files: Vec<&str> = files.iter().map(String::as_str).collect();
    let mut command = node::command(&dir, &files);
    command
        .env("POWA_ENDPOINT", server.realtime_js_endpoint())
        .env("POWA_ANON_KEY", &anon)
        .env("POWA_SERVICE_KEY", support::service_key())
        .env("POWA_USER_TOKEN", support::token("authenticated", &["--sub", user_sub]))
        .env("POWA_EXPIRED_TOKEN", support::token("authenticated", &["--sub", user_sub, "--exp=-30"]))
        .env("POWA_BAD_TOKEN", node::tamper_signature(&anon));
    node::run("realtime-js", command, NODE_TIMEOUT, &mut server);
}
