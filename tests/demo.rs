//! The README's first command runs to the end: `kubectl scopehold demo`
//! (a real API server, the controller and the node plugin, kubelet played
//! in-process, the five steps and the incident path).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Stdio};

#[test]
fn demo_runs_to_the_end_and_cleans_up() {
    let output = Command::new(env!("CARGO_BIN_EXE_kubectl-scopehold"))
        .arg("demo")
        .stdin(Stdio::null())
        .output()
        .expect("running the demo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "demo failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    for step in [
        "1. Store one API key.",
        "2. Create one agent identity.",
        "3. Grant only that key.",
        "4. Resolve it at runtime.",
        "5. See the audit entry.",
        "Incident.",
        "Rotate.",
        "Revoke.",
        "Checking.",
        "Done.",
    ] {
        assert!(stdout.contains(step), "step {step:?} missing\n{stdout}");
    }
    assert!(
        stdout.contains("\"event\":\"SecretResolved\""),
        "no audit line shown\n{stdout}"
    );
    assert!(stdout.contains("was withdrawn"), "{stdout}");
    // The demo's key values start with this prefix; they are never printed.
    assert!(
        !stdout.contains("sb-demo-") && !stderr.contains("sb-demo-"),
        "a secret value was printed"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains("scopehold-demo-"),
        "the demo left a mount behind"
    );
}
