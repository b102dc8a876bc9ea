//! Unit tests of the Node and Identity services with a fake resolver and
//! real tmpfs mounts under a temporary directory (the tests run as root).
//! The fixtures are shared with the push-path tests (`converge_tests.rs`).

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tonic::{Code, Request, Status};

use super::*;
use crate::csi::converge::resolver::{CustodyClientConfig, CustodyResolver};
use crate::csi::grpc::identity::{DRIVER_NAME, IdentityService};
use crate::csi::volume::context::{
    EPHEMERAL_KEY, GRANTS_KEY, POD_NAME_KEY, POD_NAMESPACE_KEY, POD_UID_KEY,
    SERVICE_ACCOUNT_NAME_KEY, SERVICE_ACCOUNT_TOKENS_KEY, TOKEN_AUDIENCE,
};
use crate::csi::volume::mounter::parse_mountinfo;
use crate::csi::volume::target_path::{TargetPathPolicy, kubelet_volume_id};
use crate::proto::csi::v1::identity_server::Identity;
use crate::proto::csi::v1::volume_capability::{AccessMode, BlockVolume, MountVolume};
use crate::proto::scopehold::v1::{
    File as CustodyFile, GrantRef, GrantState, Invalidation, ResolveResponse, ResolvedGrant,
};

pub(crate) type TestResult = Result<(), Box<dyn std::error::Error>>;

pub(crate) const UID: &str = "0f8e6a2c-3b1d-4c5e-9f70-1a2b3c4d5e6f";
pub(crate) const VOLUME: &str = "credentials";
pub(crate) const POD_TOKEN: &str =
    "eyJhbGciOiJSUzI1NiJ9.eyJwb2QiOiJjbGF1ZGUtMCJ9.cG9kLXRva2VuLXNpZw";
pub(crate) const SECRET_A: &[u8] = b"sk-live-unit-test-value-a";
pub(crate) const SECRET_B: &[u8] = b"ghp-unit-test-value-b";
pub(crate) const FS_GROUP: u32 = 4567;
pub(crate) const TMPFS_SIZE: u64 = 1024 * 1024;

/// The sender side of one invalidation stream a [`FakeResolver`] hands out.
pub(crate) type StreamSender = tokio::sync::mpsc::UnboundedSender<Result<Invalidation, Status>>;

/// A resolver that records requests and gives preset answers.
pub(crate) struct FakeResolver {
    answer: Mutex<Result<ResolveResponse, Status>>,
    /// Answers for requests naming exactly these grants (before `answer`).
    answer_for: Mutex<HashMap<Vec<String>, Result<ResolveResponse, Status>>>,
    requests: Mutex<Vec<ResolveRequest>>,
    /// Inactive grants (grant → reason) for GrantStates; `Err` to fail it.
    inactive: Mutex<Result<HashMap<String, String>, Status>>,
    grant_state_calls: Mutex<Vec<Vec<GrantRef>>>,
    /// Streams handed out by watch_invalidations, one per call; when none is
    /// left the call fails with UNAVAILABLE.
    streams: Mutex<Vec<tokio::sync::mpsc::UnboundedReceiver<Result<Invalidation, Status>>>>,
    /// How long each Resolve takes.
    delay: Mutex<std::time::Duration>,
    reachable: bool,
}

impl FakeResolver {
    pub(crate) fn new(answer: Result<ResolveResponse, Status>) -> Self {
        Self {
            answer: Mutex::new(answer),
            answer_for: Mutex::new(HashMap::new()),
            requests: Mutex::new(Vec::new()),
            inactive: Mutex::new(Ok(HashMap::new())),
            grant_state_calls: Mutex::new(Vec::new()),
            streams: Mutex::new(Vec::new()),
            delay: Mutex::new(std::time::Duration::ZERO),
            reachable: true,
        }
    }

    pub(crate) fn set_delay(&self, delay: std::time::Duration) {
        if let Ok(mut current) = self.delay.lock() {
            *current = delay;
        }
    }

    pub(crate) fn set_answer(&self, answer: Result<ResolveResponse, Status>) {
        if let Ok(mut current) = self.answer.lock() {
            *current = answer;
        }
    }

    pub(crate) fn set_answer_for(&self, grants: &[&str], answer: Result<ResolveResponse, Status>) {
        if let Ok(mut answers) = self.answer_for.lock() {
            answers.insert(grants.iter().map(|g| (*g).to_owned()).collect(), answer);
        }
    }

    pub(crate) fn set_inactive(&self, inactive: Result<&[(&str, &str)], Status>) {
        if let Ok(mut current) = self.inactive.lock() {
            *current = inactive.map(|pairs| {
                pairs
                    .iter()
                    .map(|(grant, reason)| ((*grant).to_owned(), (*reason).to_owned()))
                    .collect()
            });
        }
    }

    /// A new stream for the next watch_invalidations call.
    pub(crate) fn add_stream(&self) -> StreamSender {
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        if let Ok(mut streams) = self.streams.lock() {
            streams.push(receiver);
        }
        sender
    }

    pub(crate) fn requests(&self) -> Vec<ResolveRequest> {
        self.requests
            .lock()
            .map(|requests| requests.clone())
            .unwrap_or_default()
    }

    pub(crate) fn grant_state_calls(&self) -> Vec<Vec<GrantRef>> {
        self.grant_state_calls
            .lock()
            .map(|calls| calls.clone())
            .unwrap_or_default()
    }
}

impl Resolver for FakeResolver {
    async fn resolve(&self, request: ResolveRequest) -> Result<ResolveResponse, Status> {
        let delay = self.delay.lock().map(|d| *d).unwrap_or_default();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let specific = self
            .answer_for
            .lock()
            .map_err(|_| Status::internal("poisoned"))?
            .get(&request.grants)
            .cloned();
        if let Ok(mut requests) = self.requests.lock() {
            requests.push(request);
        }
        if let Some(answer) = specific {
            return answer;
        }
        self.answer
            .lock()
            .map_err(|_| Status::internal("poisoned"))?
            .clone()
    }

    async fn probe(&self) -> bool {
        self.reachable
    }

    async fn watch_invalidations(
        &self,
        _node_name: String,
    ) -> Result<crate::csi::converge::resolver::InvalidationStream, Status> {
        let receiver = self
            .streams
            .lock()
            .map_err(|_| Status::internal("poisoned"))?
            .pop();
        match receiver {
            Some(receiver) => Ok(Box::pin(
                tokio_stream::wrappers::UnboundedReceiverStream::new(receiver),
            )),
            None => Err(Status::unavailable("custody is down")),
        }
    }

    async fn grant_states(&self, grants: Vec<GrantRef>) -> Result<Vec<GrantState>, Status> {
        if let Ok(mut calls) = self.grant_state_calls.lock() {
            calls.push(grants.clone());
        }
        let inactive = self
            .inactive
            .lock()
            .map_err(|_| Status::internal("poisoned"))?
            .clone()?;
        Ok(grants
            .into_iter()
            .map(|grant_ref| {
                let reason = inactive.get(&grant_ref.grant).cloned();
                GrantState {
                    active: reason.is_none(),
                    reason: reason.unwrap_or_else(|| "Active".to_owned()),
                    expires_at: None,
                    content_digest: String::new(),
                    grant_ref: Some(grant_ref),
                }
            })
            .collect())
    }
}

pub(crate) fn grant(name: &str, digest: &str, files: &[(&str, &[u8], u32)]) -> ResolvedGrant {
    ResolvedGrant {
        grant: name.to_owned(),
        secret: format!("{name}-secret"),
        content_digest: digest.to_owned(),
        expires_at: Some(prost_types::Timestamp {
            seconds: 1_900_000_000,
            nanos: 0,
        }),
        files: files
            .iter()
            .map(|(path, content, mode)| CustodyFile {
                path: (*path).to_owned(),
                key: (*path).to_owned(),
                mode: *mode,
                content: content.to_vec(),
            })
            .collect(),
    }
}

pub(crate) fn two_grants() -> ResolveResponse {
    ResolveResponse {
        agent: "claude".to_owned(),
        grants: vec![
            grant(
                "github-ro",
                "bbbbbbbbbbbb",
                &[("gh-token", SECRET_B, 0o400)],
            ),
            grant(
                "supabase-dev",
                "aaaaaaaaaaaa",
                &[("api-key", SECRET_A, 0o440)],
            ),
        ],
        refresh_after_seconds: 0,
        versions: None,
    }
}

/// A kubelet directory under a temp dir, a Node service over it, and
/// cleanup of any mount a failing test leaves.
pub(crate) struct Fixture<R: Resolver> {
    pub(crate) root: tempfile::TempDir,
    pub(crate) resolver: Arc<R>,
    pub(crate) service: NodeService<R>,
}

impl<R: Resolver> Fixture<R> {
    pub(crate) fn with_resolver(resolver: R) -> Result<Self, Box<dyn std::error::Error>> {
        Self::with_scratch(resolver, None)
    }

    pub(crate) fn with_scratch(
        resolver: R,
        scratch: Option<PathBuf>,
    ) -> Result<Self, Box<dyn std::error::Error>> {
        let root = tempfile::tempdir()?;
        let kubelet = root.path().join("kubelet");
        // Kubelet creates the parent of the target path, never the target.
        fs::create_dir_all(
            target_in(&kubelet, UID, VOLUME)
                .parent()
                .ok_or("no parent")?,
        )?;
        let resolver = Arc::new(resolver);
        let service = NodeService::new(
            NodeConfig {
                node_name: "node-1".to_owned(),
                target_paths: TargetPathPolicy::kubelet(&kubelet.to_string_lossy())?,
                tmpfs_size_bytes: TMPFS_SIZE,
            },
            resolver.clone(),
            Mounter::new(scratch.unwrap_or_else(|| root.path().join("scratch"))),
            Registry::open(root.path().join("state"))?,
        );
        Ok(Self {
            root,
            resolver,
            service,
        })
    }

    pub(crate) fn kubelet_dir(&self) -> PathBuf {
        self.root.path().join("kubelet")
    }

    pub(crate) fn target(&self) -> PathBuf {
        target_in(&self.kubelet_dir(), UID, VOLUME)
    }

    pub(crate) fn registry(&self) -> Result<Registry, RegistryError> {
        Registry::open(self.root.path().join("state"))
    }

    /// A NodePublishVolume request as kubelet sends it for this pod.
    pub(crate) fn request(&self) -> csi::NodePublishVolumeRequest {
        publish_request(&self.target(), UID, VOLUME)
    }

    /// How many mounts sit exactly at `path`.
    pub(crate) fn mounts_at(&self, path: &Path) -> Result<usize, Box<dyn std::error::Error>> {
        let Ok(canonical) = fs::canonicalize(path) else {
            return Ok(0);
        };
        Ok(mounts()?
            .iter()
            .filter(|entry| entry.mount_point == canonical)
            .count())
    }

    /// Mounts anywhere under the fixture's root.
    pub(crate) fn mounts_under_root(&self) -> Result<usize, Box<dyn std::error::Error>> {
        let root = fs::canonicalize(self.root.path())?;
        Ok(mounts()?
            .iter()
            .filter(|entry| entry.mount_point.starts_with(&root))
            .count())
    }

    /// Every path under the root (not following links), for "nothing was
    /// created" checks.
    pub(crate) fn tree(&self) -> Result<BTreeSet<PathBuf>, std::io::Error> {
        let mut paths = BTreeSet::new();
        let mut pending = vec![self.root.path().to_path_buf()];
        while let Some(dir) = pending.pop() {
            for entry in fs::read_dir(&dir)? {
                let entry = entry?;
                if entry.file_type()?.is_dir() {
                    pending.push(entry.path());
                }
                paths.insert(entry.path());
            }
        }
        Ok(paths)
    }
}

impl<R: Resolver> Drop for Fixture<R> {
    fn drop(&mut self) {
        let Ok(root) = fs::canonicalize(self.root.path()) else {
            return;
        };
        let Ok(entries) = mounts() else {
            return;
        };
        // Deepest first.
        for entry in entries.iter().rev() {
            if entry.mount_point.starts_with(&root) {
                let _ = nix::mount::umount2(&entry.mount_point, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}

pub(crate) fn mounts()
-> Result<Vec<crate::csi::volume::mounter::MountInfoEntry>, Box<dyn std::error::Error>> {
    Ok(parse_mountinfo(&fs::read("/proc/self/mountinfo")?)?)
}

pub(crate) fn target_in(kubelet: &Path, uid: &str, volume: &str) -> PathBuf {
    kubelet
        .join("pods")
        .join(uid)
        .join("volumes")
        .join("kubernetes.io~csi")
        .join(volume)
        .join("mount")
}

pub(crate) fn mount_capability(volume_mount_group: &str) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_mode: Some(AccessMode { mode: 1 }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: String::new(),
            mount_flags: Vec::new(),
            volume_mount_group: volume_mount_group.to_owned(),
        })),
    }
}

pub(crate) fn publish_request(
    target: &Path,
    uid: &str,
    volume: &str,
) -> csi::NodePublishVolumeRequest {
    let tokens = serde_json::json!({
        TOKEN_AUDIENCE: {"token": POD_TOKEN, "expirationTimestamp": "2030-01-01T00:00:00Z"}
    })
    .to_string();
    csi::NodePublishVolumeRequest {
        volume_id: crate::csi::volume::target_path::kubelet_volume_id(uid, volume),
        target_path: target.to_string_lossy().into_owned(),
        volume_capability: Some(mount_capability(&FS_GROUP.to_string())),
        readonly: true,
        secrets: HashMap::from([(SERVICE_ACCOUNT_TOKENS_KEY.to_owned(), tokens)]),
        volume_context: [
            (POD_NAME_KEY, "claude-0"),
            (POD_NAMESPACE_KEY, "agents"),
            (POD_UID_KEY, uid),
            (SERVICE_ACCOUNT_NAME_KEY, "claude"),
            (EPHEMERAL_KEY, "true"),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect(),
        ..Default::default()
    }
}

pub(crate) fn unpublish_request(volume_id: &str, target: &Path) -> csi::NodeUnpublishVolumeRequest {
    csi::NodeUnpublishVolumeRequest {
        volume_id: volume_id.to_owned(),
        target_path: target.to_string_lossy().into_owned(),
    }
}

/// User-visible names in a volume (without the writer's `..` entries).
pub(crate) fn visible_files(target: &Path) -> Result<BTreeSet<String>, std::io::Error> {
    let mut names = BTreeSet::new();
    for entry in fs::read_dir(target)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if !name.starts_with("..") {
            names.insert(name);
        }
    }
    Ok(names)
}

pub(crate) fn assert_clean_message(status: &Status) {
    let message = status.message();
    assert!(!message.contains(POD_TOKEN), "token leaked: {message}");
    assert!(
        !message.contains("cG9kLXRva2VuLXNpZw"),
        "token leaked: {message}"
    );
    assert!(
        !message.contains(std::str::from_utf8(SECRET_A).unwrap_or("x")),
        "secret leaked: {message}"
    );
}

#[tokio::test]
async fn publish_writes_exactly_the_returned_files_with_modes_and_group() -> TestResult {
    let fixture = Fixture::with_resolver(FakeResolver::new(Ok(two_grants())))?;
    let mut request = fixture.request();
    request
        .volume_context
        .insert(GRANTS_KEY.to_owned(), "supabase-dev, github-ro".to_owned());
    let outcome = fixture.service.publish(&request).await?;
    assert_eq!(
        outcome,
        PublishOutcome {
            mounted: true,
            files: WriteOutcome::Written
        }
    );
    let target = fixture.target();

    // One read-only tmpfs of ours.
    assert_eq!(fixture.mounts_at(&target)?, 1);
    let mount = Mounter::new(fixture.root.path().join("scratch"))
        .mount_at(&target)?
        .ok_or("not mounted")?;
    assert!(mount.is_scopehold_tmpfs());
    assert!(mount.is_read_only());
    let root_metadata = fs::metadata(&target)?;
    assert_eq!(
        (root_metadata.mode() & 0o7777, root_metadata.gid()),
        (0o750, FS_GROUP)
    );

    // Exactly the returned files, with their modes and the pod's fsGroup.
    assert_eq!(
        visible_files(&target)?,
        BTreeSet::from(["api-key".to_owned(), "gh-token".to_owned()])
    );
    for (name, content, mode) in [("api-key", SECRET_A, 0o440), ("gh-token", SECRET_B, 0o400)] {
        let path = target.join(name);
        assert_eq!(fs::read(&path)?, content);
        let metadata = fs::metadata(&path)?;
        assert_eq!(
            (metadata.mode() & 0o7777, metadata.gid()),
            (mode, FS_GROUP),
            "{name}"
        );
    }
    assert!(fs::write(target.join("api-key"), b"tamper").is_err());
    assert!(fs::write(target.join("new-file"), b"x").is_err());

    // What custody was asked.
    let requests = fixture.resolver.requests();
    assert_eq!(requests.len(), 1);
    let sent = &requests[0];
    assert_eq!(sent.pod_token, POD_TOKEN);
    assert_eq!(
        (
            sent.pod_namespace.as_str(),
            sent.pod_name.as_str(),
            sent.pod_uid.as_str(),
            sent.service_account_name.as_str(),
            sent.node_name.as_str(),
        ),
        ("agents", "claude-0", UID, "claude", "node-1")
    );
    assert_eq!(sent.volume_id, request.volume_id);
    assert_eq!(sent.grants, vec!["github-ro", "supabase-dev"]);
    assert_eq!(sent.fs_group, Some(i64::from(FS_GROUP)));
    assert_eq!(sent.request_id.len(), 32);
    assert!(sent.request_id.bytes().all(|b| b.is_ascii_hexdigit()));

    // The registry knows the volume, without values or tokens.
    let registry = fixture.registry()?;
    let entry = registry
        .load(&request.volume_id)?
        .ok_or("no registry entry")?;
    assert_eq!(entry.target_path, target);
    assert_eq!(entry.agent, "claude");
    assert_eq!(entry.fs_group, Some(FS_GROUP));
    assert_eq!(entry.requested_grants, vec!["github-ro", "supabase-dev"]);
    let grants: Vec<(&str, &str, Vec<String>)> = entry
        .grants
        .iter()
        .map(|g| (g.grant.as_str(), g.content_digest.as_str(), g.files.clone()))
        .collect();
    assert_eq!(
        grants,
        vec![
            ("github-ro", "bbbbbbbbbbbb", vec!["gh-token".to_owned()]),
            ("supabase-dev", "aaaaaaaaaaaa", vec!["api-key".to_owned()]),
        ]
    );
    assert!(entry.grants.iter().all(|g| g.expires_at.is_some()));
    let stored = fs::read(registry.path_for(&request.volume_id))?;
    let stored = String::from_utf8_lossy(&stored);
    for leaked in [
        POD_TOKEN,
        std::str::from_utf8(SECRET_A)?,
        std::str::from_utf8(SECRET_B)?,
    ] {
        assert!(!stored.contains(leaked), "registry holds a value: {stored}");
    }
    Ok(())
}

#[tokio::test]
async fn publish_without_fs_group_uses_root_group_and_a_traversable_root() -> TestResult {
    let answer = ResolveResponse {
        agent: "claude".to_owned(),
        grants: vec![grant("g", "cccccccccccc", &[("api-key", SECRET_A, 0o444)])],
        refresh_after_seconds: 0,
        versions: None,
    };
    let fixture = Fixture::with_resolver(FakeResolver::new(Ok(answer)))?;
    let mut request = fixture.request();
    request.volume_capability = Some(mount_capability(""));
    fixture.service.publish(&request).await?;
    let target = fixture.target();
    assert_eq!(fs::metadata(&target)?.mode() & 0o7777, 0o755);
    let metadata = fs::metadata(target.join("api-key"))?;
    assert_eq!(
        (metadata.mode() & 0o7777, metadata.gid()),
        (0o444, nix::unistd::getegid().as_raw())
    );
    assert_eq!(fixture.resolver.requests()[0].fs_group, None);
    Ok(())
}

#[tokio::test]
async fn second_publish_is_idempotent_and_converges_content() -> TestResult {
    let fixture = Fixture::with_resolver(FakeResolver::new(Ok(two_grants())))?;
    let request = fixture.request();
    let target = fixture.target();
    fixture.service.publish(&request).await?;
    let first_entry = fixture
        .registry()?
        .load(&request.volume_id)?
        .ok_or("no entry")?;

    // Same answer: nothing rewritten, never a second mount.
    let again = fixture.service.publish(&request).await?;
    assert_eq!(
        again,
        PublishOutcome {
            mounted: false,
            files: WriteOutcome::Unchanged
        }
    );
    assert_eq!(fixture.mounts_at(&target)?, 1);
    assert_eq!(
        fixture.resolver.requests().len(),
        2,
        "a republish re-resolves"
    );

    // Rotation and a withdrawn grant converge.
    fixture.set_answer(Ok(ResolveResponse {
        agent: "claude".to_owned(),
        grants: vec![grant(
            "supabase-dev",
            "dddddddddddd",
            &[("api-key", b"rotated-value", 0o440)],
        )],
        refresh_after_seconds: 0,
        versions: None,
    }));
    let rotated = fixture.service.publish(&request).await?;
    assert_eq!(rotated.files, WriteOutcome::Written);
    assert_eq!(fixture.mounts_at(&target)?, 1);
    assert_eq!(
        visible_files(&target)?,
        BTreeSet::from(["api-key".to_owned()])
    );
    assert_eq!(fs::read(target.join("api-key"))?, b"rotated-value");
    let entry = fixture
        .registry()?
        .load(&request.volume_id)?
        .ok_or("no entry")?;
    assert_eq!(entry.published_at, first_entry.published_at);
    assert_eq!(entry.grants.len(), 1);
    assert_eq!(entry.grants[0].content_digest, "dddddddddddd");
    Ok(())
}

impl Fixture<FakeResolver> {
    pub(crate) fn set_answer(&self, answer: Result<ResolveResponse, Status>) {
        self.resolver.set_answer(answer);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishes_of_one_target_mount_once() -> TestResult {
    let fixture = Arc::new(Fixture::with_resolver(FakeResolver::new(Ok(two_grants())))?);
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let fixture = fixture.clone();
        tasks.push(tokio::spawn(async move {
            let request = fixture.request();
            fixture.service.publish(&request).await.map(|o| o.mounted)
        }));
    }
    let mut mounted = 0;
    for task in tasks {
        if task.await?? {
            mounted += 1;
        }
    }
    assert_eq!(mounted, 1);
    assert_eq!(fixture.mounts_at(&fixture.target())?, 1);
    Ok(())
}

#[tokio::test]
async fn unpublish_removes_everything_and_is_idempotent() -> TestResult {
    let fixture = Fixture::with_resolver(FakeResolver::new(Ok(two_grants())))?;
    let request = fixture.request();
    let target = fixture.target();
    fixture.service.publish(&request).await?;

    let unpublish = unpublish_request(&request.volume_id, &target);
    fixture.service.unpublish(&unpublish).await?;
    assert_eq!(fixture.mounts_under_root()?, 0);
    assert!(!target.exists(), "target directory left behind");
    assert!(
        target.parent().is_some_and(Path::exists),
        "kubelet's parent removed"
    );
    assert_eq!(fixture.registry()?.load(&request.volume_id)?, None);
    assert_eq!(fixture.registry()?.load_all()?.volumes.len(), 0);

    // Again, and for a volume never published: OK.
    fixture.service.unpublish(&unpublish).await?;
    let other_target = target_in(&fixture.kubelet_dir(), UID, "never-published");
    fixture
        .service
        .unpublish(&unpublish_request(
            &kubelet_volume_id(UID, "never-published"),
            &other_target,
        ))
        .await?;
    Ok(())
}

#[tokio::test]
async fn unpublish_of_an_unmounted_but_existing_target_removes_the_empty_directory() -> TestResult {
    let fixture = Fixture::with_resolver(FakeResolver::new(Ok(two_grants())))?;
    let target = fixture.target();
    fs::create_dir(&target)?;
    fixture
        .service
        .unpublish(&unpublish_request("csi-x", &target))
        .await?;
    assert!(!target.exists());

    // A non-empty directory that is not our mount is not deleted.
    fs::create_dir(&target)?;
    fs::write(target.join("someone-elses"), b"keep")?;
    let error = fixture
        .service
        .unpublish(&unpublish_request("csi-x", &target))
        .await
        .err()
        .ok_or("accepted")?;
    assert_eq!(error.code(), Code::FailedPrecondition);
    assert_eq!(fs::read(target.join("someone-elses"))?, b"keep");
    Ok(())
}

#[tokio::test]
async fn hostile_publish_requests_are_invalid_argument_and_touch_nothing() -> TestResult {
    let fixture = Fixture::with_resolver(FakeResolver::new(Ok(two_grants())))?;
    let outside = fixture.root.path().join("outside");
    let base = fixture.request();
    let kubelet = fixture.kubelet_dir();
    type Mutation = Box<dyn Fn(&mut csi::NodePublishVolumeRequest)>;
    let path_case = |path: String| -> Mutation {
        Box::new(move |request: &mut csi::NodePublishVolumeRequest| {
            request.target_path = path.clone()
        })
    };
    let cases: Vec<(&str, Mutation)> = vec![
        ("empty volume id", Box::new(|r| r.volume_id.clear())),
        (
            "long volume id",
            Box::new(|r| r.volume_id = "v".repeat(MAX_VOLUME_ID_BYTES + 1)),
        ),
        ("empty target", Box::new(|r| r.target_path.clear())),
        (
            "target outside the kubelet dir",
            path_case(
                target_in(&outside, UID, VOLUME)
                    .to_string_lossy()
                    .into_owned(),
            ),
        ),
        (
            "dot-dot in the target",
            path_case(format!(
                "{}/pods/{UID}/volumes/kubernetes.io~csi/{VOLUME}/../../../../../../outside/mount",
                kubelet.display()
            )),
        ),
        ("etc", path_case("/etc".to_owned())),
        ("relative target", path_case("pods/x/mount".to_owned())),
        (
            "not the kubelet layout",
            path_case(format!(
                "{}/pods/{UID}/volumes/kubernetes.io~csi/{VOLUME}",
                kubelet.display()
            )),
        ),
        ("no capability", Box::new(|r| r.volume_capability = None)),
        (
            "no access type",
            Box::new(|r| {
                r.volume_capability = Some(csi::VolumeCapability {
                    access_mode: Some(AccessMode { mode: 1 }),
                    access_type: None,
                })
            }),
        ),
        (
            "block",
            Box::new(|r| {
                r.volume_capability = Some(csi::VolumeCapability {
                    access_mode: Some(AccessMode { mode: 1 }),
                    access_type: Some(AccessType::Block(BlockVolume {})),
                })
            }),
        ),
        (
            "volume id of another volume",
            Box::new(|r| r.volume_id = kubelet_volume_id(UID, "other")),
        ),
        (
            "pod uid attribute differs from the path",
            Box::new(|r| {
                r.volume_context.insert(
                    POD_UID_KEY.to_owned(),
                    "11111111-2222-3333-4444-555555555555".to_owned(),
                );
            }),
        ),
        (
            "oversized attribute",
            Box::new(|r| {
                r.volume_context
                    .insert(GRANTS_KEY.to_owned(), "a".repeat(20 * 1024));
            }),
        ),
        (
            "unknown attribute",
            Box::new(|r| {
                r.volume_context
                    .insert("grant".to_owned(), "typo".to_owned());
            }),
        ),
        (
            "path traversal in grants",
            Box::new(|r| {
                r.volume_context
                    .insert(GRANTS_KEY.to_owned(), "../../etc".to_owned());
            }),
        ),
        (
            "hostile pod name",
            Box::new(|r| {
                r.volume_context
                    .insert(POD_NAME_KEY.to_owned(), "../../etc/passwd".to_owned());
            }),
        ),
        (
            "non-numeric mount group",
            Box::new(|r| r.volume_capability = Some(mount_capability("wheel"))),
        ),
        (
            "negative mount group",
            Box::new(|r| r.volume_capability = Some(mount_capability("-1"))),
        ),
        ("no token", Box::new(|r| r.secrets.clear())),
        (
            "malformed token",
            Box::new(|r| {
                r.secrets.insert(
                    SERVICE_ACCOUNT_TOKENS_KEY.to_owned(),
                    format!("{{\"scopehold.dev\":\"{POD_TOKEN}\""),
                );
            }),
        ),
    ];
    let before = fixture.tree()?;
    for (name, mutate) in &cases {
        let mut request = base.clone();
        mutate(&mut request);
        let error = fixture
            .service
            .publish(&request)
            .await
            .err()
            .ok_or(format!("{name}: accepted"))?;
        assert_eq!(error.code(), Code::InvalidArgument, "{name}: {error}");
        assert_clean_message(&Status::from(error));
    }
    assert!(fixture.resolver.requests().is_empty(), "custody was asked");
    assert_eq!(fixture.tree()?, before, "something was created");
    assert_eq!(fixture.mounts_under_root()?, 0);

    // A persistent (non-ephemeral) volume is refused as a precondition.
    let mut request = base.clone();
    request
        .volume_context
        .insert(EPHEMERAL_KEY.to_owned(), "false".to_owned());
    let error = fixture
        .service
        .publish(&request)
        .await
        .err()
        .ok_or("accepted")?;
    assert_eq!(error.code(), Code::FailedPrecondition);
    assert_eq!(fixture.tree()?, before);
    Ok(())
}

#[tokio::test]
async fn hostile_unpublish_requests_are_invalid_argument_and_touch_nothing() -> TestResult {
    let fixture = Fixture::with_resolver(FakeResolver::new(Ok(two_grants())))?;
    let outside = target_in(&fixture.root.path().join("outside"), UID, VOLUME);
    fs::create_dir_all(&outside)?;
    let volume_id = kubelet_volume_id(UID, VOLUME);
    let before = fixture.tree()?;
    let cases = [
        unpublish_request("", &fixture.target()),
        unpublish_request(&volume_id, Path::new("")),
        unpublish_request(&"v".repeat(MAX_VOLUME_ID_BYTES + 1), &fixture.target()),
        unpublish_request(&volume_id, &outside),
        unpublish_request(
            &volume_id,
            Path::new(&format!(
                "{}/pods/{UID}/volumes/kubernetes.io~csi/{VOLUME}/../../../../../../outside/pods/{UID}/volumes/kubernetes.io~csi/{VOLUME}/mount",
                fixture.kubelet_dir().display()
            )),
        ),
        unpublish_request(&volume_id, Path::new("/")),
    ];
    for request in &cases {
        let error = fixture
            .service
            .unpublish(request)
            .await
            .err()
            .ok_or(format!("{request:?}: accepted"))?;
        assert_eq!(error.code(), Code::InvalidArgument, "{request:?}: {error}");
    }
    assert_eq!(fixture.tree()?, before);
    assert!(outside.is_dir());
    Ok(())
}

#[tokio::test]
async fn custody_refusal_passes_through_and_leaves_nothing() -> TestResult {
    for code in [
        Code::PermissionDenied,
        Code::Unauthenticated,
        Code::FailedPrecondition,
        Code::NotFound,
    ] {
        let fixture = Fixture::with_resolver(FakeResolver::new(Err(Status::new(
            code,
            "grant supabase-dev was revoked",
        ))))?;
        let before = fixture.tree()?;
        let request = fixture.request();
        let error = fixture
            .service
            .publish(&request)
            .await
            .err()
            .ok_or("accepted")?;
        assert_eq!(error.code(), code);
        let status = Status::from(error);
        assert!(
            status.message().contains("grant supabase-dev was revoked"),
            "{status:?}"
        );
        assert_clean_message(&status);
        assert_eq!(fixture.mounts_under_root()?, 0);
        assert!(!fixture.target().exists(), "target directory left behind");
        assert_eq!(fixture.tree()?, before);
        assert_eq!(fixture.registry()?.load(&request.volume_id)?, None);
    }
    Ok(())
}

#[tokio::test]
async fn custody_unavailable_is_unavailable() -> TestResult {
    for status in [
        Status::unavailable("tcp connect error"),
        Status::deadline_exceeded("too slow"),
        Status::cancelled("Timeout expired"),
    ] {
        let fixture = Fixture::with_resolver(FakeResolver::new(Err(status)))?;
        let error = fixture
            .service
            .publish(&fixture.request())
            .await
            .err()
            .ok_or("accepted")?;
        assert_eq!(error.code(), Code::Unavailable);
        assert_eq!(fixture.mounts_under_root()?, 0);
        assert!(!fixture.target().exists());
    }
    // Other custody failures are internal, with custody's message.
    let fixture = Fixture::with_resolver(FakeResolver::new(Err(Status::unknown("boom"))))?;
    let error = fixture
        .service
        .publish(&fixture.request())
        .await
        .err()
        .ok_or("accepted")?;
    assert_eq!(error.code(), Code::Internal);
    assert!(Status::from(error).message().contains("boom"));
    Ok(())
}

#[tokio::test]
async fn unreachable_custody_through_the_real_client_is_unavailable() -> TestResult {
    let token_dir = tempfile::tempdir()?;
    let token_file = token_dir.path().join("token");
    fs::write(&token_file, "eyJub2RlIjoxfQ.eyJub2RlIjoxfQ.c2ln")?;
    let resolver = CustodyResolver::new(&CustodyClientConfig {
        endpoint: "http://127.0.0.1:1".to_owned(),
        plaintext: true,
        ca_file: None,
        token_file,
    })?;
    let fixture = Fixture::with_resolver(resolver)?;
    let error = fixture
        .service
        .publish(&fixture.request())
        .await
        .err()
        .ok_or("accepted")?;
    assert_eq!(error.code(), Code::Unavailable, "{error}");
    assert_eq!(fixture.mounts_under_root()?, 0);
    assert!(!fixture.target().exists());
    Ok(())
}

#[tokio::test]
async fn refusal_on_republish_withdraws_the_files_but_unavailability_keeps_them() -> TestResult {
    let fixture = Fixture::with_resolver(FakeResolver::new(Ok(two_grants())))?;
    let request = fixture.request();
    let target = fixture.target();
    fixture.service.publish(&request).await?;

    // Custody unreachable: keep what the pod has (the push stream and the
    // next republish decide; expiry still applies) and tell kubelet OK.
    fixture.set_answer(Err(Status::unavailable("down")));
    let kept = fixture.service.publish(&request).await?;
    assert_eq!(kept.files, WriteOutcome::Unchanged);
    assert_eq!(visible_files(&target)?.len(), 2);

    // Custody refuses: the files go, the (read-only) mount stays for
    // kubelet's unpublish, and the republish still succeeds
    // (kubernetes#121271).
    fixture.set_answer(Err(Status::permission_denied(
        "AgentSuspended: agent is suspended",
    )));
    let withdrawn = fixture.service.publish(&request).await?;
    assert_eq!(withdrawn.files, WriteOutcome::Written);
    assert_eq!(visible_files(&target)?, BTreeSet::new());
    assert_eq!(fixture.mounts_at(&target)?, 1);
    let entry = fixture
        .registry()?
        .load(&request.volume_id)?
        .ok_or("entry removed")?;
    assert!(entry.grants.is_empty());
    // Nothing but the writer's own entries is left in the volume.
    let leftovers: Vec<String> = fs::read_dir(&target)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name != "..data")
        .collect();
    assert_eq!(leftovers.len(), 1, "{leftovers:?}");

    // Custody grants again: the next republish brings the files back.
    fixture.set_answer(Ok(two_grants()));
    fixture.service.publish(&request).await?;
    assert_eq!(visible_files(&target)?.len(), 2);

    fixture
        .service
        .unpublish(&unpublish_request(&request.volume_id, &target))
        .await?;
    assert_eq!(fixture.mounts_under_root()?, 0);
    assert!(!target.exists());
    assert!(fixture.service.volumes().is_empty());
    Ok(())
}

#[tokio::test]
async fn unusable_custody_responses_are_refused_before_mounting() -> TestResult {
    let big = vec![b'x'; (TMPFS_SIZE / 2) as usize];
    let cases: Vec<(ResolveResponse, Code)> = vec![
        (
            ResolveResponse {
                grants: vec![grant("g", "d", &[("../escape", SECRET_A, 0o440)])],
                ..Default::default()
            },
            Code::Internal,
        ),
        (
            ResolveResponse {
                grants: vec![grant("g", "d", &[("dir/file", SECRET_A, 0o440)])],
                ..Default::default()
            },
            Code::Internal,
        ),
        (
            ResolveResponse {
                grants: vec![grant("g", "d", &[("..data", SECRET_A, 0o440)])],
                ..Default::default()
            },
            Code::Internal,
        ),
        (
            ResolveResponse {
                grants: vec![grant("g", "d", &[("api-key", SECRET_A, 0o4755)])],
                ..Default::default()
            },
            Code::Internal,
        ),
        (
            ResolveResponse {
                grants: vec![
                    grant("a", "d", &[("api-key", SECRET_A, 0o440)]),
                    grant("b", "d", &[("api-key", SECRET_B, 0o440)]),
                ],
                ..Default::default()
            },
            Code::FailedPrecondition,
        ),
        (
            ResolveResponse {
                grants: vec![grant("g", "d", &[("big", &big, 0o440)])],
                ..Default::default()
            },
            Code::FailedPrecondition,
        ),
    ];
    for (answer, code) in cases {
        let fixture = Fixture::with_resolver(FakeResolver::new(Ok(answer)))?;
        let before = fixture.tree()?;
        let error = fixture
            .service
            .publish(&fixture.request())
            .await
            .err()
            .ok_or("accepted")?;
        assert_eq!(error.code(), code, "{error}");
        assert_clean_message(&Status::from(error));
        assert_eq!(fixture.mounts_under_root()?, 0);
        assert_eq!(fixture.tree()?, before);
    }
    Ok(())
}

#[tokio::test]
async fn failure_after_mounting_leaves_no_mount_and_no_directory() -> TestResult {
    // The scratch "directory" is a file, so the writable view (after the
    // mount) cannot be created.
    let scratch_parent = tempfile::tempdir()?;
    let scratch = scratch_parent.path().join("scratch");
    fs::write(&scratch, b"not a directory")?;
    let fixture =
        Fixture::with_scratch(FakeResolver::new(Ok(two_grants())), Some(scratch.clone()))?;
    let request = fixture.request();
    let error = fixture
        .service
        .publish(&request)
        .await
        .err()
        .ok_or("accepted")?;
    assert_eq!(error.code(), Code::Internal, "{error}");
    assert_eq!(fixture.mounts_under_root()?, 0);
    assert!(!fixture.target().exists(), "target directory left behind");
    assert_eq!(fixture.registry()?.load(&request.volume_id)?, None);
    Ok(())
}

#[tokio::test]
async fn a_foreign_mount_at_the_target_is_never_touched() -> TestResult {
    let fixture = Fixture::with_resolver(FakeResolver::new(Ok(two_grants())))?;
    let target = fixture.target();
    fs::create_dir(&target)?;
    nix::mount::mount(
        Some("not-scopehold"),
        &target,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=64k"),
    )?;
    fs::write(target.join("theirs"), b"keep")?;
    let request = fixture.request();
    let error = fixture
        .service
        .publish(&request)
        .await
        .err()
        .ok_or("accepted")?;
    assert_eq!(error.code(), Code::FailedPrecondition, "{error}");
    let error = fixture
        .service
        .unpublish(&unpublish_request(&request.volume_id, &target))
        .await
        .err()
        .ok_or("accepted")?;
    assert_eq!(error.code(), Code::FailedPrecondition, "{error}");
    assert_eq!(fixture.mounts_at(&target)?, 1);
    assert_eq!(fs::read(target.join("theirs"))?, b"keep");
    assert!(fixture.resolver.requests().is_empty());
    Ok(())
}

#[tokio::test]
async fn a_corrupt_registry_entry_blocks_neither_publish_nor_unpublish() -> TestResult {
    let fixture = Fixture::with_resolver(FakeResolver::new(Ok(two_grants())))?;
    let request = fixture.request();
    let registry = fixture.registry()?;
    fs::write(registry.path_for(&request.volume_id), b"{not json")?;
    fixture.service.publish(&request).await?;
    assert!(
        registry.load(&request.volume_id)?.is_some(),
        "entry not rewritten"
    );

    fs::write(registry.path_for(&request.volume_id), b"{not json")?;
    fixture
        .service
        .unpublish(&unpublish_request(&request.volume_id, &fixture.target()))
        .await?;
    assert!(!registry.path_for(&request.volume_id).exists());
    assert_eq!(fixture.mounts_under_root()?, 0);
    Ok(())
}

#[tokio::test]
async fn volume_published_at_another_target_is_already_exists() -> TestResult {
    let fixture = Fixture::with_resolver(FakeResolver::new(Ok(two_grants())))?;
    let request = fixture.request();
    fixture.service.publish(&request).await?;
    // Forge a registry entry claiming the id for another target, then
    // publish again.
    let registry = fixture.registry()?;
    let mut entry = registry.load(&request.volume_id)?.ok_or("no entry")?;
    entry.target_path = fixture.root.path().join("elsewhere");
    registry.store(&entry)?;
    let error = fixture
        .service
        .publish(&request)
        .await
        .err()
        .ok_or("accepted")?;
    assert_eq!(error.code(), Code::AlreadyExists);
    Ok(())
}

#[tokio::test]
async fn node_rpcs_report_capabilities_info_and_unimplemented() -> TestResult {
    let fixture = Fixture::with_resolver(FakeResolver::new(Ok(two_grants())))?;
    let service = &fixture.service;
    let capabilities = service
        .node_get_capabilities(Request::new(csi::NodeGetCapabilitiesRequest {}))
        .await?
        .into_inner();
    assert_eq!(
        capabilities.capabilities,
        vec![csi::NodeServiceCapability {
            r#type: Some(csi::node_service_capability::Type::Rpc(
                csi::node_service_capability::Rpc {
                    r#type: RpcType::VolumeMountGroup as i32
                }
            ))
        }]
    );
    let info = service
        .node_get_info(Request::new(csi::NodeGetInfoRequest {}))
        .await?
        .into_inner();
    assert_eq!(info.node_id, "node-1");
    assert_eq!(info.max_volumes_per_node, 0);

    let stage = service
        .node_stage_volume(Request::new(Default::default()))
        .await
        .err()
        .map(|s| s.code());
    let unstage = service
        .node_unstage_volume(Request::new(Default::default()))
        .await
        .err()
        .map(|s| s.code());
    let stats = service
        .node_get_volume_stats(Request::new(Default::default()))
        .await
        .err()
        .map(|s| s.code());
    let expand = service
        .node_expand_volume(Request::new(Default::default()))
        .await
        .err()
        .map(|s| s.code());
    assert_eq!(
        [stage, unstage, stats, expand],
        [Some(Code::Unimplemented); 4]
    );

    // The gRPC layer returns the mapped code.
    let status = service
        .node_publish_volume(Request::new(csi::NodePublishVolumeRequest::default()))
        .await
        .err()
        .ok_or("accepted")?;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(status.message(), "volume_id is missing");
    Ok(())
}

#[tokio::test]
async fn identity_reports_name_version_no_capabilities_and_honest_probe() -> TestResult {
    let mut unreachable = FakeResolver::new(Ok(ResolveResponse::default()));
    unreachable.reachable = false;
    for (resolver, ready) in [
        (FakeResolver::new(Ok(ResolveResponse::default())), true),
        (unreachable, false),
    ] {
        let identity = IdentityService::new(Arc::new(resolver));
        let info = identity
            .get_plugin_info(Request::new(csi::GetPluginInfoRequest {}))
            .await?
            .into_inner();
        assert_eq!(info.name, DRIVER_NAME);
        assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
        let capabilities = identity
            .get_plugin_capabilities(Request::new(csi::GetPluginCapabilitiesRequest {}))
            .await?
            .into_inner();
        assert!(capabilities.capabilities.is_empty());
        let probe = identity
            .probe(Request::new(csi::ProbeRequest {}))
            .await?
            .into_inner();
        assert_eq!(probe.ready, Some(ready));
    }
    Ok(())
}

#[tokio::test]
async fn a_writable_publish_is_refused_with_how_to_fix_it_and_touches_nothing() -> TestResult {
    let fixture = Fixture::with_resolver(FakeResolver::new(Ok(two_grants())))?;
    let before = fixture.tree()?;
    let mut request = fixture.request();
    request.readonly = false;
    let error = fixture
        .service
        .publish(&request)
        .await
        .err()
        .ok_or("a writable volume was published")?;
    assert_eq!(error.code(), Code::InvalidArgument, "{error}");
    let status = Status::from(error);
    assert!(
        status.message().contains("readOnly: true"),
        "the message does not say how to fix it: {status:?}"
    );
    assert!(fixture.resolver.requests().is_empty(), "custody was asked");
    assert_eq!(fixture.mounts_under_root()?, 0);
    assert_eq!(fixture.tree()?, before);
    Ok(())
}

/// The plugin crashed after mounting and before writing (nothing recorded
/// in the registry); kubelet retries, and custody now refuses. The retry
/// must fail and leave nothing mounted, not answer OK with an empty volume.
#[tokio::test]
async fn a_publish_after_a_crash_between_mount_and_write_resolves_again() -> TestResult {
    let fixture = Fixture::with_resolver(FakeResolver::new(Err(Status::permission_denied(
        "AgentSuspended: agent \"claude-code\" is suspended",
    ))))?;
    let target = fixture.target();
    let request = fixture.request();
    // What the crashed publish left: our tmpfs, no files, no registry entry.
    fixture.service.mounter.mount_tmpfs(
        &target,
        &TmpfsOptions {
            size_bytes: TMPFS_SIZE,
            mode: 0o750,
            gid: Some(FS_GROUP),
        },
    )?;
    assert_eq!(fixture.mounts_at(&target)?, 1);

    let error = fixture
        .service
        .publish(&request)
        .await
        .err()
        .ok_or("the retried publish answered OK after a refusal")?;
    assert_eq!(error.code(), Code::PermissionDenied, "{error}");
    assert_eq!(fixture.mounts_under_root()?, 0, "the tmpfs stayed mounted");
    assert!(!target.exists(), "target directory left behind");
    assert_eq!(fixture.registry()?.load(&request.volume_id)?, None);

    // Custody grants again: the next retry publishes normally.
    fixture.resolver.set_answer(Ok(two_grants()));
    fixture.service.publish(&request).await?;
    assert_eq!(
        visible_files(&target)?,
        BTreeSet::from(["api-key".to_owned(), "gh-token".to_owned()])
    );
    fixture
        .service
        .unpublish(&unpublish_request(&request.volume_id, &target))
        .await?;
    Ok(())
}

/// A symlink in any parent of the target path (here the pod's directory
/// pointing outside the kubelet directory) is refused; nothing is mounted
/// or created anywhere, and custody is not asked for the value.
#[tokio::test]
async fn a_symlink_on_the_way_to_the_target_is_refused_and_nothing_is_mounted() -> TestResult {
    let fixture = Fixture::with_resolver(FakeResolver::new(Ok(two_grants())))?;
    let request = fixture.request();
    let pod_dir = fixture.kubelet_dir().join("pods").join(UID);
    let elsewhere = fixture.root.path().join("elsewhere");
    // The same layout, but outside the kubelet directory.
    let moved = elsewhere.join(UID);
    fs::create_dir_all(moved.join("volumes/kubernetes.io~csi").join(VOLUME))?;
    fs::remove_dir_all(&pod_dir)?;
    std::os::unix::fs::symlink(&moved, &pod_dir)?;
    let outside_before = fixture.tree()?;

    let error = fixture
        .service
        .publish(&request)
        .await
        .err()
        .ok_or("published through a symlink")?;
    assert_eq!(error.code(), Code::FailedPrecondition, "{error}");
    let status = Status::from(error);
    assert!(status.message().contains("symbolic link"), "{status:?}");
    assert_eq!(fixture.mounts_under_root()?, 0);
    assert_eq!(fixture.tree()?, outside_before, "something was created");
    assert!(
        !moved
            .join("volumes/kubernetes.io~csi")
            .join(VOLUME)
            .join("mount")
            .exists()
    );

    // Unpublish through the same link touches nothing either.
    let unpublished = fixture
        .service
        .unpublish(&unpublish_request(&request.volume_id, &fixture.target()))
        .await;
    assert!(unpublished.is_err(), "unpublish followed the symlink");
    assert_eq!(fixture.tree()?, outside_before);
    Ok(())
}

/// NodePublishVolume from the plugin's own mount namespace, with the
/// kubelet directory shared both ways (kubelet's `Bidirectional` mount of
/// it into the plugin's container), checked from the test's namespace (the
/// host's, from which kubelet and the runtime bind the volume into the pod):
/// the host's copy is read-only, nothing can be written, created, renamed or
/// replaced, and `..data` stays the plugin's.
#[test]
fn a_publish_from_the_plugins_mount_namespace_is_read_only_on_the_host() -> TestResult {
    use nix::mount::MsFlags;
    use nix::sched::{CloneFlags, unshare};

    let fixture = Fixture::with_resolver(FakeResolver::new(Ok(two_grants())))?;
    let kubelet = fixture.kubelet_dir();
    nix::mount::mount(
        Some(&kubelet),
        &kubelet,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )?;
    nix::mount::mount(
        None::<&str>,
        &kubelet,
        None::<&str>,
        MsFlags::MS_SHARED,
        None::<&str>,
    )?;
    let request = fixture.request();
    let target = fixture.target();
    let service = fixture.service.clone();
    let (published_tx, published_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let plugin = std::thread::spawn(move || -> Result<(), String> {
        unshare(CloneFlags::CLONE_NEWNS).map_err(|error| format!("unshare: {error}"))?;
        // Built after unshare: its blocking threads start in this namespace.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|error| error.to_string())?;
        let published = runtime
            .block_on(service.publish(&request))
            .map(|_| ())
            .map_err(|error| error.to_string());
        let failed = published.is_err();
        let _ = published_tx.send(published);
        if failed {
            return Ok(());
        }
        let _ = done_rx.recv();
        runtime
            .block_on(service.unpublish(&unpublish_request(&request.volume_id, &target)))
            .map_err(|error| error.to_string())
    });
    published_rx.recv()??;

    let target = fixture.target();
    let checks = (|| -> TestResult {
        let entries = mounts()?;
        let entry = entries
            .iter()
            .rev()
            .find(|entry| Some(&entry.mount_point) == fs::canonicalize(&target).ok().as_ref())
            .ok_or("the volume did not propagate to the host")?;
        assert!(entry.is_scopehold_tmpfs(), "{entry:?}");
        assert!(
            entry.is_read_only(),
            "the host's copy is writable: {entry:?}"
        );
        assert_eq!(fs::read(target.join("api-key"))?, SECRET_A);
        let data = fs::read_link(target.join("..data"))?;
        assert!(fs::write(target.join("api-key"), b"tampered").is_err());
        assert!(fs::write(target.join("planted"), b"x").is_err());
        assert!(fs::create_dir(target.join("dir")).is_err());
        assert!(std::os::unix::fs::symlink("/etc", target.join("..data_tmp")).is_err());
        assert!(fs::rename(target.join("..data"), target.join("..old")).is_err());
        assert!(fs::remove_file(target.join("..data")).is_err());
        assert_eq!(fs::read_link(target.join("..data"))?, data);
        assert_eq!(fs::read(target.join("api-key"))?, SECRET_A);
        Ok(())
    })();
    let _ = done_tx.send(());
    let unpublished = plugin.join().map_err(|_| "the plugin thread panicked")?;
    checks?;
    unpublished?;
    assert!(!target.exists(), "the unpublish did not propagate");
    Ok(())
}
