//! A volume changed behind the plugin's back (through a writable copy, as a
//! pod with a writable bind could before volumes were read-only, or a bug
//! elsewhere): withdrawals remove what the registry names, by name, and
//! everything else is removed without being followed; republish repairs.
//! Real tmpfs mounts, the fake resolver of the Node service tests.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::csi::converge::push;
use crate::csi::grpc::node::tests::{
    FakeResolver, Fixture, SECRET_A, SECRET_B, TestResult, two_grants, visible_files,
};
use crate::csi::volume::table::TokenUpdate;
use crate::proto::scopehold::v1::invalidation::Kind;
use crate::proto::scopehold::v1::{Invalidation, ResolveResponse};

/// Polls `check` every 10 ms for up to 5 s.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !check() {
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

async fn idle(fixture: &Fixture<FakeResolver>) -> Result<(), String> {
    eventually("the workers to finish", || {
        fixture.service.busy_volumes() == 0
    })
    .await
}

fn invalidation(kind: Kind, grant: &str) -> Invalidation {
    Invalidation {
        kind: kind as i32,
        namespace: "agents".to_owned(),
        agent: if grant.is_empty() { "" } else { "claude" }.to_owned(),
        grant: grant.to_owned(),
        secret: String::new(),
        content_digest: String::new(),
        occurred_at: None,
        ..Default::default()
    }
}

/// Custody's answer once supabase-dev (api-key, SECRET_A) is revoked.
fn only_github() -> ResolveResponse {
    ResolveResponse {
        grants: two_grants()
            .grants
            .into_iter()
            .filter(|grant| grant.grant == "github-ro")
            .collect(),
        ..two_grants()
    }
}

/// Every regular file's content anywhere in the volume's tmpfs, read
/// through a private writable view without following any link.
fn contents_in_tmpfs(
    fixture: &Fixture<FakeResolver>,
) -> Result<Vec<Vec<u8>>, Box<dyn std::error::Error>> {
    let view = fixture.service.mounter.writable_view(&fixture.target())?;
    let mut found = Vec::new();
    let mut pending = vec![view.path().to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_file() {
                found.push(fs::read(entry.path())?);
            }
        }
    }
    view.close()?;
    Ok(found)
}

fn holds(fixture: &Fixture<FakeResolver>, value: &[u8]) -> bool {
    contents_in_tmpfs(fixture).map_or(true, |found| found.iter().any(|c| c == value))
}

/// Through a writable copy of the volume: the current version directory
/// (holding SECRET_A) moved aside under a name that is not a version's,
/// `..data` removed, a file and a link to a directory outside planted.
fn move_the_version_aside(fixture: &Fixture<FakeResolver>, outside: &Path) -> TestResult {
    let view = fixture.service.mounter.writable_view(&fixture.target())?;
    let root = view.path();
    let version = fs::read_link(root.join("..data"))?;
    fs::rename(root.join(&version), root.join("stash"))?;
    fs::remove_file(root.join("..data"))?;
    fs::write(root.join("planted"), b"planted")?;
    symlink(outside, root.join("evil"))?;
    view.close()?;
    Ok(())
}

fn outside_dir(fixture: &Fixture<FakeResolver>) -> Result<std::path::PathBuf, std::io::Error> {
    let outside = fixture.root.path().join("outside");
    fs::create_dir(&outside)?;
    fs::write(outside.join("api-key"), b"outside, not ours")?;
    Ok(outside)
}

/// The defect: a withdrawal found the volume's files through `..data`, and
/// swept only entries named like version directories. With the version
/// moved aside, a revocation left the revoked value in the volume.
#[tokio::test]
async fn a_revocation_removes_a_value_moved_aside_in_the_volume() -> TestResult {
    let fixture = Fixture::with_resolver(FakeResolver::new(Ok(two_grants())))?;
    let request = fixture.request();
    fixture.service.publish(&request).await?;
    let outside = outside_dir(&fixture)?;
    move_the_version_aside(&fixture, &outside)?;

    fixture.resolver.set_answer(Ok(only_github()));
    push::apply(
        &fixture.service,
        &invalidation(Kind::Revoked, "supabase-dev"),
    );
    eventually("the revoked value to leave the tmpfs", || {
        !holds(&fixture, SECRET_A)
    })
    .await?;
    idle(&fixture).await?;
    assert!(!holds(&fixture, SECRET_A));
    assert_eq!(
        visible_files(&fixture.target())?,
        ["gh-token".to_owned()].into()
    );
    assert_eq!(fs::read(fixture.target().join("gh-token"))?, SECRET_B);
    assert_eq!(fs::read(outside.join("api-key"))?, b"outside, not ours");
    Ok(())
}

/// The same without the pod's token (after a plugin restart): custody's
/// grant states withdraw supabase-dev. The defect: with `..data` gone the
/// read-back found nothing and wrote that back, while the revoked value
/// stayed. Now the registered version is missing, so nothing of the
/// directory is trusted: it is emptied by name, and the still granted
/// file comes back with the next republish (the pod's token is needed to
/// resolve it again).
#[tokio::test]
async fn a_withdrawal_by_grant_states_removes_a_value_moved_aside() -> TestResult {
    let fixture = Fixture::with_resolver(FakeResolver::new(Ok(two_grants())))?;
    let request = fixture.request();
    fixture.service.publish(&request).await?;
    fixture.service.volumes().clear_token(&request.volume_id);
    let outside = outside_dir(&fixture)?;
    move_the_version_aside(&fixture, &outside)?;

    fixture
        .resolver
        .set_inactive(Ok(&[("supabase-dev", "Revoked")]));
    push::apply(&fixture.service, &invalidation(Kind::Resync, ""));
    eventually("the revoked value to leave the tmpfs", || {
        !holds(&fixture, SECRET_A)
    })
    .await?;
    idle(&fixture).await?;
    assert!(!holds(&fixture, SECRET_A));
    assert!(!holds(&fixture, b"planted"));
    assert_eq!(fs::read(outside.join("api-key"))?, b"outside, not ours");

    fixture.resolver.set_answer(Ok(only_github()));
    fixture.service.publish(&request).await?;
    idle(&fixture).await?;
    assert_eq!(
        visible_files(&fixture.target())?,
        ["gh-token".to_owned()].into()
    );
    assert_eq!(fs::read(fixture.target().join("gh-token"))?, SECRET_B);
    assert!(!holds(&fixture, SECRET_A));
    Ok(())
}

/// The registry names what the volume holds, and after a restart (no
/// handle, no token) a withdrawal works from that record: the kept file
/// is read back from the recorded version even though `..data` was
/// pointed at a planted directory with other content, which is neither
/// read nor kept.
#[tokio::test]
async fn after_a_restart_a_withdrawal_works_from_the_registry_not_from_data() -> TestResult {
    let fixture = Fixture::with_resolver(FakeResolver::new(Ok(two_grants())))?;
    let request = fixture.request();
    fixture.service.publish(&request).await?;
    let registry = fixture.registry()?;
    let entry = registry.load(&request.volume_id)?.ok_or("no entry")?;
    let layout = entry.layout.clone().ok_or("no layout recorded")?;
    let data = fs::read_link(fixture.target().join("..data"))?;
    assert_eq!(
        layout.current.as_deref().map(Path::new),
        Some(data.as_path())
    );
    assert_eq!(layout.versions.len(), 1);
    assert_eq!(
        layout.links,
        ["api-key".to_owned(), "gh-token".to_owned()].into()
    );

    // As after a restart: the entry from the registry, no handle, no token.
    fixture.service.volumes().remove(&request.volume_id);
    fixture.service.volumes().upsert(entry, TokenUpdate::Clear);
    let view = fixture.service.mounter.writable_view(&fixture.target())?;
    let planted = "..2020_01_01_00_00_00.7";
    fs::create_dir(view.path().join(planted))?;
    fs::write(view.path().join(planted).join("gh-token"), b"planted")?;
    fs::remove_file(view.path().join("..data"))?;
    symlink(planted, view.path().join("..data"))?;
    view.close()?;

    fixture
        .resolver
        .set_inactive(Ok(&[("supabase-dev", "Revoked")]));
    push::apply(&fixture.service, &invalidation(Kind::Resync, ""));
    eventually("api-key withdrawn", || {
        visible_files(&fixture.target()).is_ok_and(|files| files == ["gh-token".to_owned()].into())
    })
    .await?;
    idle(&fixture).await?;
    assert_eq!(fs::read(fixture.target().join("gh-token"))?, SECRET_B);
    assert!(!holds(&fixture, SECRET_A));
    assert!(!holds(&fixture, b"planted"));
    // No Resolve was needed to keep gh-token: it was read back.
    assert_eq!(fixture.resolver.requests().len(), 1);
    let recorded = registry
        .load(&request.volume_id)?
        .and_then(|entry| entry.layout)
        .ok_or("no layout")?;
    assert_eq!(recorded.links, ["gh-token".to_owned()].into());
    assert_eq!(
        recorded.current.as_deref().map(Path::new),
        Some(fs::read_link(fixture.target().join("..data"))?.as_path())
    );
    Ok(())
}

/// A volume published by a plugin that recorded no layout (an older
/// version): its layout is adopted from the directory once, a withdrawal
/// removes the revoked file and keeps the other, and the entry then
/// records the layout.
#[tokio::test]
async fn a_volume_of_an_older_plugin_is_adopted_and_withdrawn_by_name() -> TestResult {
    let fixture = Fixture::with_resolver(FakeResolver::new(Ok(two_grants())))?;
    let request = fixture.request();
    fixture.service.publish(&request).await?;
    let registry = fixture.registry()?;
    let mut entry = registry.load(&request.volume_id)?.ok_or("no entry")?;
    entry.layout = None;
    registry.store(&entry)?;
    fixture.service.volumes().remove(&request.volume_id);
    fixture.service.volumes().upsert(entry, TokenUpdate::Clear);

    fixture
        .resolver
        .set_inactive(Ok(&[("supabase-dev", "Revoked")]));
    push::apply(&fixture.service, &invalidation(Kind::Resync, ""));
    eventually("api-key withdrawn", || {
        visible_files(&fixture.target()).is_ok_and(|files| files == ["gh-token".to_owned()].into())
    })
    .await?;
    idle(&fixture).await?;
    assert_eq!(fs::read(fixture.target().join("gh-token"))?, SECRET_B);
    assert!(!holds(&fixture, SECRET_A));
    assert_eq!(fixture.resolver.requests().len(), 1);
    let recorded = registry
        .load(&request.volume_id)?
        .and_then(|entry| entry.layout)
        .ok_or("the layout was not recorded after adoption")?;
    assert_eq!(recorded.links, ["gh-token".to_owned()].into());
    Ok(())
}

/// Tampered while still granted (`..data` pointed outside, a user-visible
/// link replaced by a directory, a file and a link planted): the next
/// republish repairs the volume without touching anything outside.
#[tokio::test]
async fn republish_repairs_a_tampered_volume_that_is_still_granted() -> TestResult {
    let fixture = Fixture::with_resolver(FakeResolver::new(Ok(two_grants())))?;
    let request = fixture.request();
    fixture.service.publish(&request).await?;
    let outside = outside_dir(&fixture)?;
    let view = fixture.service.mounter.writable_view(&fixture.target())?;
    let root = view.path().to_path_buf();
    fs::remove_file(root.join("..data"))?;
    symlink(&outside, root.join("..data"))?;
    fs::remove_file(root.join("api-key"))?;
    fs::create_dir(root.join("api-key"))?;
    fs::write(root.join("api-key").join("inside"), b"x")?;
    fs::write(root.join("planted"), b"planted")?;
    symlink(&outside, root.join("evil"))?;
    view.close()?;

    fixture.service.publish(&request).await?;
    idle(&fixture).await?;
    assert_eq!(
        visible_files(&fixture.target())?,
        ["api-key".to_owned(), "gh-token".to_owned()].into()
    );
    assert_eq!(fs::read(fixture.target().join("api-key"))?, SECRET_A);
    assert_eq!(fs::read(fixture.target().join("gh-token"))?, SECRET_B);
    let data = fs::read_link(fixture.target().join("..data"))?;
    assert!(
        data.is_relative() && data.components().count() == 1,
        "{data:?}"
    );
    assert!(!holds(&fixture, b"planted"));
    assert_eq!(fs::read(outside.join("api-key"))?, b"outside, not ours");
    assert_eq!(fs::read_dir(&outside)?.count(), 1);
    Ok(())
}

/// Through a writable copy: a directory tree deeper than the plugin takes
/// apart, planted in the volume.
fn plant_a_tree_too_deep(fixture: &Fixture<FakeResolver>) -> TestResult {
    let view = fixture.service.mounter.writable_view(&fixture.target())?;
    let mut deep = view.path().join("deep");
    for _ in 0..=crate::csi::volume::dir_fd::MAX_REMOVE_DEPTH {
        deep.push("d");
    }
    fs::create_dir_all(&deep)?;
    view.close()?;
    Ok(())
}

/// A revocation seen by a refresh (a RESYNC re-resolves; custody's answer
/// lacks the grant) into a directory that
/// cannot be brought back to a known state: the volume is unmounted rather
/// than left half withdrawn, and the next publish mounts it afresh with
/// what is still granted. Before, only withdrawals by grant states had
/// this fallback: a refresh's failing write just failed.
#[tokio::test]
async fn a_revocation_that_cannot_restore_a_known_state_unmounts_and_republish_repairs()
-> TestResult {
    let fixture = Fixture::with_resolver(FakeResolver::new(Ok(two_grants())))?;
    let request = fixture.request();
    fixture.service.publish(&request).await?;
    plant_a_tree_too_deep(&fixture)?;

    fixture.resolver.set_answer(Ok(only_github()));
    push::apply(&fixture.service, &invalidation(Kind::Resync, ""));
    eventually("the volume to be unmounted", || {
        fixture.mounts_at(&fixture.target()).is_ok_and(|n| n == 0)
    })
    .await?;
    idle(&fixture).await?;
    let entry = fixture
        .registry()?
        .load(&request.volume_id)?
        .ok_or("registry entry gone")?;
    assert!(entry.grants.is_empty(), "{:?}", entry.grants);

    fixture.service.publish(&request).await?;
    assert_eq!(fixture.mounts_at(&fixture.target())?, 1);
    assert_eq!(
        visible_files(&fixture.target())?,
        ["gh-token".to_owned()].into()
    );
    assert!(!holds(&fixture, SECRET_A));
    Ok(())
}
