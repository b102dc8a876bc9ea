//! The push path, the republish backstop and the expiry timer against real
//! tmpfs mounts, with the fake resolver of the Node service tests.

use std::collections::BTreeSet;
use std::fs;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::Status;

use crate::csi::converge::push::{self, PushState};
use crate::csi::grpc::node::tests::{
    FakeResolver, Fixture, POD_TOKEN, SECRET_A, SECRET_B, TestResult, grant, two_grants,
    visible_files,
};
use crate::csi::volume::context::GRANTS_KEY;
use crate::proto::scopehold::v1::invalidation::Kind;
use crate::proto::scopehold::v1::{Invalidation, ResolveResponse, StoreVersions};

const WAIT: Duration = Duration::from_secs(5);

/// Polls `check` every 10 ms until it holds.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + WAIT;
    while !check() {
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Waits until no volume has work queued or running (the files change
/// before the registry is updated and the previous version retired).
async fn idle(fixture: &Fixture<FakeResolver>) -> Result<(), String> {
    eventually("the workers to finish", || {
        fixture.service.busy_volumes() == 0
    })
    .await
}

fn invalidation(kind: Kind, agent: &str, grant: &str, digest: &str) -> Invalidation {
    Invalidation {
        kind: kind as i32,
        namespace: "agents".to_owned(),
        agent: agent.to_owned(),
        grant: grant.to_owned(),
        secret: String::new(),
        content_digest: digest.to_owned(),
        occurred_at: None,
        versions: None,
    }
}

fn names(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|name| (*name).to_owned()).collect()
}

fn files_are(fixture: &Fixture<FakeResolver>, expected: &[&str]) -> bool {
    visible_files(&fixture.target()).is_ok_and(|files| files == names(expected))
}

#[tokio::test]
async fn a_revocation_push_withdraws_only_that_grant_without_asking_custody() -> TestResult {
    let fixture = Fixture::with_resolver(FakeResolver::new(Ok(two_grants())))?;
    let request = fixture.request();
    fixture.service.publish(&request).await?;
    // Custody is not needed for a withdrawal.
    fixture.set_answer(Err(Status::unavailable("down")));

    push::apply(
        &fixture.service,
        &invalidation(Kind::Revoked, "claude", "supabase-dev", ""),
    );
    eventually("api-key withdrawn", || files_are(&fixture, &["gh-token"])).await?;
    idle(&fixture).await?;
    assert_eq!(fs::read(fixture.target().join("gh-token"))?, SECRET_B);
    assert_eq!(fixture.mounts_at(&fixture.target())?, 1);
    assert_eq!(fixture.resolver.requests().len(), 1, "custody was asked");
    let entry = fixture
        .registry()?
        .load(&request.volume_id)?
        .ok_or("no entry")?;
    let held: Vec<&str> = entry.grants.iter().map(|g| g.grant.as_str()).collect();
    assert_eq!(held, ["github-ro"]);

    // Other agents' and other namespaces' changes leave the volume alone.
    push::apply(
        &fixture.service,
        &invalidation(Kind::Suspended, "someone-else", "", ""),
    );
    let mut elsewhere = invalidation(Kind::Suspended, "claude", "", "");
    elsewhere.namespace = "other".to_owned();
    push::apply(&fixture.service, &elsewhere);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(files_are(&fixture, &["gh-token"]));

    // The agent suspended: everything goes, the mount stays.
    push::apply(
        &fixture.service,
        &invalidation(Kind::Suspended, "claude", "", ""),
    );
    eventually("everything withdrawn", || files_are(&fixture, &[])).await?;
    assert_eq!(fixture.mounts_at(&fixture.target())?, 1);
    Ok(())
}

#[tokio::test]
async fn rotation_and_reinstatement_re_resolve_with_the_held_token() -> TestResult {
    let fixture = Fixture::with_resolver(FakeResolver::new(Ok(two_grants())))?;
    let request = fixture.request();
    fixture.service.publish(&request).await?;
    push::apply(
        &fixture.service,
        &invalidation(Kind::Revoked, "claude", "supabase-dev", ""),
    );
    eventually("api-key withdrawn", || files_are(&fixture, &["gh-token"])).await?;

    // Reinstated, and the other Secret rotated meanwhile.
    fixture.set_answer(Ok(ResolveResponse {
        agent: "claude".to_owned(),
        grants: vec![
            grant(
                "github-ro",
                "cccccccccccc",
                &[("gh-token", b"rotated", 0o400)],
            ),
            grant(
                "supabase-dev",
                "aaaaaaaaaaaa",
                &[("api-key", SECRET_A, 0o440)],
            ),
        ],
        refresh_after_seconds: 0,
        versions: None,
    }));
    push::apply(
        &fixture.service,
        &invalidation(Kind::Changed, "claude", "supabase-dev", ""),
    );
    eventually("both files back", || {
        files_are(&fixture, &["api-key", "gh-token"])
            && fs::read(fixture.target().join("gh-token")).is_ok_and(|c| c == b"rotated")
    })
    .await?;
    idle(&fixture).await?;
    let requests = fixture.resolver.requests();
    let last = requests.last().ok_or("no request")?;
    assert_eq!(last.pod_token, POD_TOKEN, "re-resolved with the held token");
    assert_eq!(last.pod_name, "claude-0");
    assert_eq!(last.fs_group, Some(4567));

    // A rotation whose digest is already mounted asks nobody.
    let before = fixture.resolver.requests().len();
    push::apply(
        &fixture.service,
        &invalidation(Kind::Rotated, "claude", "github-ro", "cccccccccccc"),
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(fixture.resolver.requests().len(), before);
    Ok(())
}

/// A revocation that arrives while a refresh is in flight (custody
/// answered before the change) still wins: the withdrawal is queued behind
/// the refresh even though the grant is not mounted yet.
#[tokio::test]
async fn a_revocation_during_a_refresh_is_applied_after_it() -> TestResult {
    let only_github = ResolveResponse {
        agent: "claude".to_owned(),
        grants: vec![grant(
            "github-ro",
            "bbbbbbbbbbbb",
            &[("gh-token", SECRET_B, 0o400)],
        )],
        refresh_after_seconds: 0,
        versions: None,
    };
    let fixture = Fixture::with_resolver(FakeResolver::new(Ok(only_github)))?;
    fixture.service.publish(&fixture.request()).await?;
    assert!(files_are(&fixture, &["gh-token"]));

    // The grant is granted; the re-resolution takes a while...
    fixture.set_answer(Ok(two_grants()));
    fixture.resolver.set_delay(Duration::from_millis(300));
    push::apply(
        &fixture.service,
        &invalidation(Kind::Changed, "claude", "supabase-dev", ""),
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    // ...and it is revoked before the answer is written.
    push::apply(
        &fixture.service,
        &invalidation(Kind::Revoked, "claude", "supabase-dev", ""),
    );
    idle(&fixture).await?;
    assert!(
        files_are(&fixture, &["gh-token"]),
        "the revoked file stayed"
    );
    Ok(())
}

#[tokio::test]
async fn a_refusal_on_push_withdraws_everything_and_unavailability_keeps() -> TestResult {
    let fixture = Fixture::with_resolver(FakeResolver::new(Ok(two_grants())))?;
    let request = fixture.request();
    fixture.service.publish(&request).await?;

    fixture.set_answer(Err(Status::unavailable("down")));
    push::apply(
        &fixture.service,
        &invalidation(Kind::Changed, "claude", "", ""),
    );
    eventually("the re-resolution", || {
        fixture.resolver.requests().len() == 2
    })
    .await?;
    idle(&fixture).await?;
    assert!(files_are(&fixture, &["api-key", "gh-token"]));

    fixture.set_answer(Err(Status::unauthenticated(
        "TokenRejected: the pod no longer exists",
    )));
    push::apply(
        &fixture.service,
        &invalidation(Kind::Changed, "claude", "", ""),
    );
    eventually("everything withdrawn", || files_are(&fixture, &[])).await?;
    assert_eq!(fixture.mounts_at(&fixture.target())?, 1);
    // A rejected token is not used again.
    let (_, token) = fixture
        .service
        .volumes()
        .get(&request.volume_id, jiff::Timestamp::now())
        .ok_or("untracked")?;
    assert!(token.is_none());

    // The next republish brings a fresh token and the files back.
    fixture.set_answer(Ok(two_grants()));
    fixture.service.publish(&request).await?;
    assert!(files_are(&fixture, &["api-key", "gh-token"]));
    let (_, token) = fixture
        .service
        .volumes()
        .get(&request.volume_id, jiff::Timestamp::now())
        .ok_or("untracked")?;
    assert!(token.is_some());
    Ok(())
}

#[tokio::test]
async fn without_a_token_grant_states_withdraw_only_inactive_grants() -> TestResult {
    let fixture = Fixture::with_resolver(FakeResolver::new(Ok(two_grants())))?;
    let request = fixture.request();
    fixture.service.publish(&request).await?;
    // As after a restart: no token until the next republish.
    fixture.service.volumes().clear_token(&request.volume_id);

    fixture
        .resolver
        .set_inactive(Err(Status::unavailable("down")));
    push::apply(&fixture.service, &invalidation(Kind::Resync, "", "", ""));
    eventually("the grant states call", || {
        fixture.resolver.grant_state_calls().len() == 1
    })
    .await?;
    idle(&fixture).await?;
    assert!(files_are(&fixture, &["api-key", "gh-token"]));

    fixture
        .resolver
        .set_inactive(Ok(&[("github-ro", "Revoked")]));
    push::apply(&fixture.service, &invalidation(Kind::Resync, "", "", ""));
    eventually("gh-token withdrawn", || files_are(&fixture, &["api-key"])).await?;
    assert_eq!(fs::read(fixture.target().join("api-key"))?, SECRET_A);
    assert_eq!(
        fixture.resolver.requests().len(),
        1,
        "no pod token, no Resolve"
    );
    let calls = fixture.resolver.grant_state_calls();
    let refs = calls.last().ok_or("no call")?;
    assert_eq!(refs.len(), 2);
    assert!(
        refs.iter()
            .all(|r| r.agent == "claude" && r.namespace == "agents")
    );
    Ok(())
}

#[tokio::test]
async fn a_volume_naming_its_grants_keeps_the_active_ones_after_a_refusal() -> TestResult {
    let fixture = Fixture::with_resolver(FakeResolver::new(Ok(two_grants())))?;
    let mut request = fixture.request();
    request
        .volume_context
        .insert(GRANTS_KEY.to_owned(), "github-ro,supabase-dev".to_owned());
    fixture.service.publish(&request).await?;

    // One named grant was revoked: custody refuses the whole list.
    fixture.set_answer(Err(Status::permission_denied(
        "NoActiveGrants: SecretGrant \"supabase-dev\" is Revoked",
    )));
    fixture
        .resolver
        .set_inactive(Ok(&[("supabase-dev", "Revoked")]));
    fixture.resolver.set_answer_for(
        &["github-ro"],
        Ok(ResolveResponse {
            agent: "claude".to_owned(),
            grants: vec![grant(
                "github-ro",
                "bbbbbbbbbbbb",
                &[("gh-token", SECRET_B, 0o400)],
            )],
            refresh_after_seconds: 0,
            versions: None,
        }),
    );
    let outcome = fixture.service.publish(&request).await?;
    assert!(!outcome.mounted);
    assert!(files_are(&fixture, &["gh-token"]));
    let requests = fixture.resolver.requests();
    assert_eq!(
        requests.last().map(|r| r.grants.clone()),
        Some(vec!["github-ro".to_owned()])
    );
    // The volume still asks for both next time.
    let entry = fixture
        .registry()?
        .load(&request.volume_id)?
        .ok_or("no entry")?;
    assert_eq!(entry.requested_grants, ["github-ro", "supabase-dev"]);
    Ok(())
}

#[tokio::test]
async fn expired_grants_are_withdrawn_locally_on_time() -> TestResult {
    let now = jiff::Timestamp::now();
    let expires = now.as_second() + 2;
    let mut answer = two_grants();
    for grant in &mut answer.grants {
        grant.expires_at = (grant.grant == "supabase-dev").then_some(prost_types::Timestamp {
            seconds: expires,
            nanos: 0,
        });
    }
    let fixture = Fixture::with_resolver(FakeResolver::new(Ok(answer)))?;
    let timer = tokio::spawn(crate::csi::converge::expiry::run(fixture.service.clone()));
    fixture.service.publish(&fixture.request()).await?;
    // Custody is gone: the node enforces the expiry on its own.
    fixture.set_answer(Err(Status::unavailable("down")));

    let result = eventually("api-key withdrawn at expiry", || {
        files_are(&fixture, &["gh-token"])
    })
    .await;
    let withdrawn_at = jiff::Timestamp::now();
    timer.abort();
    result?;
    assert!(
        withdrawn_at.as_second() >= expires,
        "withdrawn before the expiry"
    );
    assert!(
        withdrawn_at.as_millisecond() <= expires * 1000 + 1000,
        "withdrawn more than a second late"
    );
    assert_eq!(fixture.resolver.requests().len(), 1);
    Ok(())
}

#[tokio::test]
async fn the_stream_is_followed_and_reopened_after_it_breaks() -> TestResult {
    let fixture = Fixture::with_resolver(FakeResolver::new(Ok(two_grants())))?;
    fixture.service.publish(&fixture.request()).await?;
    let first = fixture.resolver.add_stream();
    let state = Arc::new(PushState::default());
    let task = tokio::spawn(push::run(fixture.service.clone(), state.clone()));

    let result = async {
        first.send(Ok(invalidation(Kind::Resync, "", "", "")))?;
        eventually("connected", || state.connected() && state.received() == 1).await?;
        first.send(Ok(invalidation(
            Kind::Revoked,
            "claude",
            "supabase-dev",
            "",
        )))?;
        eventually("api-key withdrawn", || files_are(&fixture, &["gh-token"])).await?;

        // The stream breaks; the plugin reconnects and follows the new one.
        let second = fixture.resolver.add_stream();
        first.send(Err(Status::unavailable("custody restarting")))?;
        eventually("disconnected", || !state.connected()).await?;
        // RESYNC re-resolves: (this fake) custody grants both again.
        second.send(Ok(invalidation(Kind::Resync, "", "", "")))?;
        eventually("reconnected", || state.connected() && state.received() == 3).await?;
        eventually("api-key back after RESYNC", || {
            files_are(&fixture, &["api-key", "gh-token"])
        })
        .await?;
        second.send(Ok(invalidation(Kind::Revoked, "claude", "github-ro", "")))?;
        eventually("gh-token withdrawn", || files_are(&fixture, &["api-key"])).await?;
        Ok::<(), Box<dyn std::error::Error>>(())
    }
    .await;
    task.abort();
    result
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

/// What a pod with a writable copy of its volume did: `..data` points
/// outside, at a directory holding a file of the same name, plus a planted
/// file and a link to a directory outside. Done through a writable view,
/// as the pod's own (writable) bind would.
fn tamper(fixture: &Fixture<FakeResolver>, outside: &std::path::Path) -> TestResult {
    let view = fixture.service.mounter.writable_view(&fixture.target())?;
    let root = view.path();
    fs::remove_file(root.join("..data"))?;
    std::os::unix::fs::symlink(outside, root.join("..data"))?;
    fs::write(root.join("planted"), b"planted by the pod")?;
    std::os::unix::fs::symlink(outside, root.join("evil"))?;
    view.close()?;
    Ok(())
}

/// The pod defeated its own revocation by replacing `..data`: the
/// revocation then failed and the revoked value stayed in the volume.
/// Now the directory is wiped by name (no link followed, nothing outside
/// touched), the revoked value is gone from the tmpfs, the other grant
/// comes back through a refresh, and a republish repairs a tampered volume.
#[tokio::test]
async fn a_tampered_volume_still_loses_a_revoked_value_and_republish_repairs_it() -> TestResult {
    let fixture = Fixture::with_resolver(FakeResolver::new(Ok(two_grants())))?;
    let request = fixture.request();
    fixture.service.publish(&request).await?;
    let outside = fixture.root.path().join("outside");
    fs::create_dir(&outside)?;
    fs::write(outside.join("api-key"), b"outside, not ours")?;
    tamper(&fixture, &outside)?;

    // Only github-ro is still granted.
    fixture.set_answer(Ok(ResolveResponse {
        grants: two_grants()
            .grants
            .into_iter()
            .filter(|grant| grant.grant == "github-ro")
            .collect(),
        ..two_grants()
    }));
    push::apply(
        &fixture.service,
        &invalidation(Kind::Revoked, "claude", "supabase-dev", ""),
    );
    eventually("the revoked value to leave the tmpfs", || {
        contents_in_tmpfs(&fixture).is_ok_and(|found| !found.iter().any(|c| c == SECRET_A))
    })
    .await?;
    eventually("github-ro to come back", || {
        files_are(&fixture, &["gh-token"])
    })
    .await?;
    idle(&fixture).await?;
    assert_eq!(fs::read(fixture.target().join("gh-token"))?, SECRET_B);
    assert!(!contents_in_tmpfs(&fixture)?.iter().any(|c| c == SECRET_A));
    assert_eq!(fs::read(outside.join("api-key"))?, b"outside, not ours");
    assert_eq!(fixture.mounts_at(&fixture.target())?, 1);
    let entry = fixture
        .registry()?
        .load(&request.volume_id)?
        .ok_or("registry entry gone")?;
    assert!(
        !entry
            .grants
            .iter()
            .any(|grant| grant.grant == "supabase-dev")
    );

    // Tampered again while still granted: the next republish repairs it.
    tamper(&fixture, &outside)?;
    fixture.service.publish(&request).await?;
    assert!(
        files_are(&fixture, &["gh-token"]),
        "{:?}",
        visible_files(&fixture.target())
    );
    assert_eq!(fs::read(fixture.target().join("gh-token"))?, SECRET_B);
    let data = fs::read_link(fixture.target().join("..data"))?;
    assert!(
        data.is_relative() && data.components().count() == 1,
        "..data does not name a version directory of the volume: {data:?}"
    );
    assert!(fs::symlink_metadata(fixture.target().join("planted")).is_err());
    assert_eq!(fs::read(outside.join("api-key"))?, b"outside, not ours");
    Ok(())
}

/// `versions` of a custody that has seen grants up to `grants`.
fn at_grants(grants: u64) -> Option<StoreVersions> {
    Some(StoreVersions {
        grants,
        ..Default::default()
    })
}

fn only_github_ro() -> ResolveResponse {
    ResolveResponse {
        grants: two_grants()
            .grants
            .into_iter()
            .filter(|grant| grant.grant == "github-ro")
            .collect(),
        ..two_grants()
    }
}

#[tokio::test]
async fn an_invalidation_during_a_first_publish_makes_its_older_answer_asked_again() -> TestResult {
    let stale = ResolveResponse {
        versions: at_grants(90),
        ..two_grants()
    };
    let fixture = Arc::new(Fixture::with_resolver(FakeResolver::new(Ok(stale)))?);
    fixture.resolver.set_delay(Duration::from_millis(300));
    let request = fixture.request();
    let publishing = {
        let fixture = fixture.clone();
        tokio::spawn(async move { fixture.service.publish(&request).await })
    };
    // The volume is tracked while custody is asked: the revocation (seen
    // at version 100) concerns it.
    eventually("the pending volume", || {
        fixture.service.volumes().len() == 1
    })
    .await?;
    let mut revoked = invalidation(Kind::Revoked, "claude", "supabase-dev", "");
    revoked.versions = at_grants(100);
    push::apply(&fixture.service, &revoked);
    // The first answer (decided at 90) is on its way; the next is current.
    eventually("the first answer", || {
        fixture.resolver.requests().len() == 1
    })
    .await?;
    fixture.resolver.set_answer(Ok(ResolveResponse {
        versions: at_grants(100),
        ..only_github_ro()
    }));
    publishing.await.map_err(|e| e.to_string())??;
    assert!(files_are(&fixture, &["gh-token"]), "never mounted api-key");
    assert_eq!(fixture.resolver.requests().len(), 2);
    idle(&fixture).await?;
    assert!(files_are(&fixture, &["gh-token"]));
    Ok(())
}

#[tokio::test]
async fn a_refresh_answered_by_a_lagging_replica_never_puts_a_withdrawn_grant_back() -> TestResult {
    let fixture = Fixture::with_resolver(FakeResolver::new(Ok(ResolveResponse {
        versions: at_grants(90),
        ..two_grants()
    })))?;
    let request = fixture.request();
    fixture.service.publish(&request).await?;
    // One replica announces the revocation at version 100...
    let mut revoked = invalidation(Kind::Revoked, "claude", "supabase-dev", "");
    revoked.versions = at_grants(100);
    push::apply(&fixture.service, &revoked);
    eventually("api-key withdrawn", || files_are(&fixture, &["gh-token"])).await?;
    idle(&fixture).await?;
    // ...then a refresh reaches the other, which has not seen it yet: asked
    // again a few times, never applied, and the volume is kept as it is.
    let asked = fixture.resolver.requests().len();
    push::apply(
        &fixture.service,
        &invalidation(Kind::Changed, "claude", "", ""),
    );
    idle(&fixture).await?;
    assert!(
        files_are(&fixture, &["gh-token"]),
        "api-key stays withdrawn"
    );
    assert_eq!(fixture.resolver.requests().len() - asked, 6);
    // Caught up: its answer is applied (here a rotated gh-token).
    fixture.resolver.set_answer(Ok(ResolveResponse {
        grants: vec![grant(
            "github-ro",
            "eeeeeeeeeeee",
            &[("gh-token", b"rotated", 0o400)],
        )],
        versions: at_grants(101),
        ..two_grants()
    }));
    push::apply(
        &fixture.service,
        &invalidation(Kind::Changed, "claude", "", ""),
    );
    eventually("the current answer applied", || {
        fs::read(fixture.target().join("gh-token")).is_ok_and(|v| v == b"rotated")
    })
    .await?;
    assert!(files_are(&fixture, &["gh-token"]));
    Ok(())
}
