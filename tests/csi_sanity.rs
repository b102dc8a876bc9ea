//! Runs the Kubernetes CSI conformance suite, csi-sanity (csi-test v5.4.0),
//! against `scopehold node` over its real unix socket.
//!
//! The binary comes from `SCOPEHOLD_CSI_SANITY` (set by `.ci/run`), else
//! from the cache directory, else it is built here with `go install` from the
//! Go module proxy. It is never skipped: a missing tool fails the test.
//!
//! The plugin is started with an unreachable plaintext custody endpoint:
//! the specs that csi-sanity can run against a node-only plugin only check
//! Identity, capabilities, NodeGetInfo and argument validation, none of which
//! needs custody. Probe then answers OK with `ready: false`, which the suite
//! accepts (it asserts only that the call succeeds).
//!
//! csi-test v5.4.0's "Node Service" `BeforeEach` calls
//! ControllerGetCapabilities unconditionally and needs a non-empty answer
//! (the facts file §4.2 says those specs run without a controller; against
//! v5.4.0 they do not). The plugin therefore answers that one Controller RPC
//! with a single UNKNOWN capability while advertising no CONTROLLER_SERVICE
//! (see `src/csi/grpc/controller.rs`); every spec here talks to the real plugin
//! socket.

// The crate denies these lints for every target; tests fail by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CSI_SANITY_VERSION: &str = "v5.4.0";
const CSI_SANITY_PACKAGE: &str = "github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity";
/// Records which version the cached binary is (`go install` names it
/// `csi-sanity` whatever the version). `.ci/run` writes the same file.
const VERSION_STAMP: &str = ".csi-sanity-version";

/// Specs skipped, as one regular expression (ginkgo `--skip`):
///
/// - `\[Controller Server\]`: every Controller group (CreateVolume,
///   snapshots, ControllerExpandVolume, ModifyVolume, ...). ScopeHold is a
///   node-only plugin: kubelet never calls a controller for CSI ephemeral
///   inline volumes, so it advertises no CONTROLLER_SERVICE. These groups do
///   not skip themselves in v5.4.0: they call ControllerGetCapabilities and
///   fail on UNIMPLEMENTED (facts §4.2).
/// - `NodeUnpublishVolume should remove target path`: calls CreateVolume
///   unconditionally to get a volume to publish, which a node-only driver
///   cannot serve (facts §4.2). The behaviour it checks (unpublish removes
///   the target directory) is covered by the unit tests in
///   `src/csi/grpc/node_tests.rs` on real tmpfs mounts.
///
/// Everything else that applies runs. The NodePublishVolume "should work" and
/// "should be idempotent" specs, and the NodeStage/NodeUnstage/
/// NodeGetVolumeStats/NodeExpandVolume and GroupController groups, skip
/// themselves (no controller, no such capabilities); ginkgo reports them as
/// skipped, not as passed.
const SKIP: &str = r"\[Controller Server\]|NodeUnpublishVolume should remove target path";

/// Specs that must have run and passed: Identity (3), NodeGetCapabilities,
/// NodeGetInfo, NodePublishVolume argument checks (3), NodeUnpublishVolume
/// argument checks (2).
const EXPECTED_SPECS_RUN: usize = 10;

fn cache_bin_dir() -> PathBuf {
    let cache = std::env::var_os("SCOPEHOLD_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").expect("HOME is not set");
            PathBuf::from(home).join(".cache").join("scopehold")
        });
    cache.join("bin")
}

fn go_command() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| dir.join("go").is_file()))
        .unwrap_or(false);
    if on_path {
        return PathBuf::from("go");
    }
    let standard = Path::new("/usr/local/go/bin/go");
    assert!(
        standard.is_file(),
        "csi-sanity is not installed and `go` was not found to build it (run .ci/run or install Go)"
    );
    standard.to_path_buf()
}

/// The csi-sanity binary: from `SCOPEHOLD_CSI_SANITY`, the cache, or built.
fn csi_sanity() -> PathBuf {
    if let Some(path) = std::env::var_os("SCOPEHOLD_CSI_SANITY") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "SCOPEHOLD_CSI_SANITY={} does not exist",
            path.display()
        );
        return path;
    }
    let bin_dir = cache_bin_dir();
    let binary = bin_dir.join("csi-sanity");
    let stamp = bin_dir.join(VERSION_STAMP);
    let cached_version = fs::read_to_string(&stamp).unwrap_or_default();
    if binary.is_file() && cached_version.trim() == CSI_SANITY_VERSION {
        return binary;
    }
    fs::create_dir_all(&bin_dir).expect("creating the cache bin directory");
    eprintln!(
        "building csi-sanity {CSI_SANITY_VERSION} into {}",
        bin_dir.display()
    );
    let output = Command::new(go_command())
        .args([
            "install",
            &format!("{CSI_SANITY_PACKAGE}@{CSI_SANITY_VERSION}"),
        ])
        .env("GOBIN", &bin_dir)
        .output()
        .expect("running go install");
    assert!(
        output.status.success(),
        "go install csi-sanity failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    fs::write(&stamp, format!("{CSI_SANITY_VERSION}\n")).expect("writing the version stamp");
    binary
}

/// The node plugin process; killed when dropped.
struct Plugin {
    child: Child,
    log: PathBuf,
}

impl Plugin {
    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_plugin(dir: &Path, socket: &Path, kubelet: &Path) -> Plugin {
    let token = dir.join("token");
    fs::write(&token, "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ0ZXN0In0.c2ln").unwrap();
    let log = dir.join("plugin.log");
    let log_file = fs::File::create(&log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_scopehold"))
        .arg("node")
        .arg("--endpoint")
        .arg(format!("unix://{}", socket.display()))
        .args(["--node-name", "sanity-node"])
        .args([
            "--custody-endpoint",
            "http://127.0.0.1:1",
            "--custody-plaintext",
        ])
        .arg("--token-file")
        .arg(&token)
        .arg("--kubelet-dir")
        .arg(kubelet)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--scratch-dir")
        .arg(dir.join("scratch"))
        .args(["--log-format", "text"])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .expect("starting scopehold node");
    let mut plugin = Plugin { child, log };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        if let Some(status) = plugin.child.try_wait().unwrap() {
            panic!("scopehold node exited with {status}:\n{}", plugin.log());
        }
        assert!(
            Instant::now() < deadline,
            "the CSI socket did not appear:\n{}",
            plugin.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    plugin
}

/// "Ran 10 of 92 Specs" → (10, 92).
fn specs_ran(output: &str) -> Option<(usize, usize)> {
    let line = output
        .lines()
        .find(|line| line.contains("Ran ") && line.contains(" Specs"))?;
    let mut words = line
        .split_whitespace()
        .skip_while(|word| *word != "Ran")
        .skip(1);
    let ran = words.next()?.parse().ok()?;
    let _of = words.next()?;
    let total = words.next()?.parse().ok()?;
    Some((ran, total))
}

#[test]
fn csi_sanity_passes_against_the_node_plugin() {
    let sanity = csi_sanity();
    let dir = tempfile::tempdir().unwrap();
    let kubelet = dir.path().join("kubelet");
    fs::create_dir_all(&kubelet).unwrap();
    let socket = dir.path().join("csi.sock");
    let plugin = start_plugin(dir.path(), &socket, &kubelet);

    // csi-sanity creates (os.Mkdir) and removes these itself before and after
    // each spec, so they must not exist yet.
    let mount_dir = kubelet.join("sanity-mount");
    let staging_dir = kubelet.join("sanity-staging");
    let junit = dir.path().join("junit.xml");
    let mut child = Command::new(&sanity)
        .arg(format!("--csi.endpoint=unix://{}", socket.display()))
        .arg(format!("--csi.mountdir={}", mount_dir.display()))
        .arg(format!("--csi.stagingdir={}", staging_dir.display()))
        .arg(format!("--ginkgo.skip={SKIP}"))
        .arg(format!("--ginkgo.junit-report={}", junit.display()))
        .arg("--ginkgo.no-color")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting csi-sanity");
    let deadline = Instant::now() + Duration::from_secs(300);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("csi-sanity did not finish within 5 minutes");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let report = format!(
        "csi-sanity {CSI_SANITY_VERSION} ({}):\n{stdout}\n{stderr}\n--- plugin log ---\n{}",
        output.status,
        plugin.log()
    );
    println!("{report}");
    assert!(output.status.success(), "csi-sanity failed\n{report}");
    let (ran, total) = specs_ran(&stdout).unwrap_or_else(|| panic!("no spec count\n{report}"));
    assert_eq!(
        ran, EXPECTED_SPECS_RUN,
        "csi-sanity ran {ran} of {total} specs, expected {EXPECTED_SPECS_RUN}\n{report}"
    );
    assert!(
        stdout.contains(&format!("{ran} Passed | 0 Failed")),
        "{report}"
    );
    // The suite's own temporary directories are gone, and nothing was mounted.
    assert!(!mount_dir.exists() && !staging_dir.exists(), "{report}");
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mountinfo.contains(&dir.path().display().to_string()),
        "a mount was left under the test directory"
    );
    assert!(!plugin.log().contains("panicked"), "{report}");
}
