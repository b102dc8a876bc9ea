//! Custody's answer, checked and turned into a volume's files.

use crate::csi::errors::{MAX_FILES, PublishError, shorten};
use crate::csi::volume::atomic_writer::{FileContent, Payload};
use crate::csi::volume::registry::PublishedGrant;
use crate::proto::scopehold::v1::ResolveResponse;

/// The files of a response, checked, plus what the registry keeps of them.
#[derive(Debug)]
pub(crate) struct ResolvedPayload {
    pub(crate) payload: Payload,
    pub(crate) grants: Vec<PublishedGrant>,
}

/// Turns custody's answer into the volume's files. Refuses names the
/// writer would refuse, modes beyond 0o777, one file name from two grants,
/// and more content than the volume can hold through a rotation.
pub(crate) fn build_payload(
    response: &ResolveResponse,
    limit_bytes: u64,
) -> Result<ResolvedPayload, PublishError> {
    let mut payload = Payload::new();
    let mut owner_of: std::collections::BTreeMap<&str, &str> = Default::default();
    let mut grants = Vec::with_capacity(response.grants.len());
    let mut total: u64 = 0;
    for grant in &response.grants {
        let mut files = Vec::with_capacity(grant.files.len());
        let mut keys = Vec::with_capacity(grant.files.len());
        for file in &grant.files {
            crate::api::validation::validate_file_name(&file.path).map_err(|reason| {
                PublishError::BadResponse {
                    reason: format!(
                        "grant {:?} has an invalid file name {:?}: {reason}",
                        shorten(&grant.grant, 64),
                        shorten(&file.path, 64)
                    ),
                }
            })?;
            if file.mode & !0o777 != 0 {
                return Err(PublishError::BadResponse {
                    reason: format!(
                        "grant {:?} gives file {:?} the mode {:#o}; only permission bits are allowed",
                        shorten(&grant.grant, 64),
                        file.path,
                        file.mode
                    ),
                });
            }
            if let Some(first) = owner_of.insert(&file.path, &grant.grant) {
                return Err(PublishError::FileConflict {
                    file: file.path.clone(),
                    first: first.to_owned(),
                    second: grant.grant.clone(),
                });
            }
            total = total
                .saturating_add(file.content.len() as u64)
                .saturating_add(file.path.len() as u64);
            payload.insert(
                file.path.clone(),
                FileContent::new(file.content.clone(), file.mode),
            );
            files.push(file.path.clone());
            keys.push(file.key.clone());
        }
        files.sort();
        keys.sort();
        keys.dedup();
        grants.push(PublishedGrant {
            grant: grant.grant.clone(),
            secret: grant.secret.clone(),
            content_digest: grant.content_digest.clone(),
            expires_at: grant
                .expires_at
                .as_ref()
                .and_then(|at| jiff::Timestamp::new(at.seconds, at.nanos).ok()),
            files,
            keys,
        });
    }
    if payload.len() > MAX_FILES {
        return Err(PublishError::TooManyFiles {
            count: payload.len(),
        });
    }
    if total > limit_bytes {
        return Err(PublishError::PayloadTooLarge {
            total,
            limit: limit_bytes,
        });
    }
    Ok(ResolvedPayload { payload, grants })
}
