//! The crate dependency rule (ARCHITECTURE.md, "Crates and their dependencies"), read from
//! `cargo metadata`: `engine` and `auth` depend on no workspace crate; `tenants` (pure) only on
//! them; `net` (sockets, wire) and `replication` (PostgreSQL) depend only on those three, never
//! on each other; only the binary, `benches` and `tools` wire the sides together.

use std::collections::BTreeMap;
use std::process::Command;

use serde_json::Value;

/// Workspace crate → the workspace crates it may depend on (normal, build and dev).
const ALLOWED: &[(&str, &[&str])] = &[
    ("powa-engine", &[]),
    ("powa-auth", &[]),
    ("powa-tenants", &["powa-engine", "powa-auth"]),
    ("powa-net", &["powa-engine", "powa-auth", "powa-tenants"]),
    ("powa-replication", &["powa-engine", "powa-auth", "powa-tenants"]),
];

#[test]
fn crates_depend_only_inward() {
    let output = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo metadata");
    assert!(output.status.success(), "cargo metadata failed: {}", String::from_utf8_lossy(&output.stderr));
    let metadata: Value = serde_json::from_slice(&output.stdout).expect("cargo metadata prints JSON");
    let packages = metadata["packages"].as_array().expect("packages");
    let workspace: Vec<&str> = packages.iter().filter_map(|p| p["name"].as_str()).collect();
    let mut found: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for package in packages {
        let name = package["name"].as_str().expect("name");
        let deps = package["dependencies"].as_array().expect("dependencies");
        found.insert(name, deps.iter().filter_map(|d| d["name"].as_str()).filter(|d| workspace.contains(d)).collect());
    }
    for (name, allowed) in ALLOWED {
        let deps = found.get(name).unwrap_or_else(|| panic!("{name} is not in the workspace"));
        for dep in deps {
            assert!(allowed.contains(dep), "{name} depends on {dep}, which the layering rule forbids (allowed: {allowed:?})");
        }
    }
    // The binary is where the two sides meet.
    let binary = &found["powa-realtime"];
    assert!(binary.contains(&"powa-net") && binary.contains(&"powa-replication"), "{binary:?}");
}
