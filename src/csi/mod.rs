//! Building blocks of the CSI node plugin, each testable without Kubernetes:
//!
//! - [`target_path`]: which target paths the plugin accepts.
//! - [`volume_context`]: typed, bounded parse of the publish attributes and
//!   the pod's token.
//! - [`mounter`]: size-limited tmpfs mounts, read-only to the pod, with a
//!   private writable view for updates.
//! - [`atomic_writer`]: kubelet-style `..data` swap of the volume's files.
//! - [`registry`]: on-disk record of published volumes (no secret values).
//! - [`volumes`]: the in-memory view of them, with each pod's token.
//! - [`resolver`]: the custody client behind the [`resolver::Resolver`] seam.
//! - [`locks`]: per-target serialisation of operations.
//! - [`node`], [`identity`]: the CSI Node and Identity services.
//! - [`converge`]: making a published volume hold what its pod may hold now
//!   (republish, push, expiry), with per-volume work queues.
//! - [`push`]: the invalidation stream from custody.
//! - [`expiry`]: the local timer that withdraws expired grants.
//! - [`reports`]: what the plugin changed in running pods, sent to custody
//!   to become Kubernetes Events.
//! - [`controller`]: ControllerGetCapabilities only (for csi-sanity).
//! - [`server`]: the unix socket and the wiring of `scopehold node`.
//!
//! A publish is: validate the target path, parse the attributes, resolve via
//! custody, `mount_tmpfs` + `set_read_only(true)`, then write the payload
//! through the volume's detached writable view (kept for later writes) and
//! record the volume in the registry.

pub mod atomic_writer;
pub mod controller;
pub mod converge;
pub mod expiry;
pub mod identity;
pub mod known_mounts;
pub mod locks;
pub mod mounter;
pub mod node;
pub mod push;
pub mod registry;
pub mod reports;
pub mod resolver;
pub mod server;
pub mod target_path;
pub mod volume_context;
pub mod volumes;

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::MetadataExt;

    use super::atomic_writer::{AtomicWriter, FileContent, Payload, WriteOutcome};
    use super::mounter::{Mounter, TmpfsOptions, UnmountMode, UnmountOutcome};

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn payload(entries: &[(&str, &[u8], u32)]) -> Payload {
        entries
            .iter()
            .map(|(name, bytes, mode)| ((*name).to_owned(), FileContent::new(*bytes, *mode)))
            .collect()
    }

    /// The publish / rotate / withdraw / unpublish sequence on a real tmpfs.
    #[test]
    fn publish_rotate_withdraw_unpublish_on_a_read_only_tmpfs() -> TestResult {
        let root = tempfile::tempdir()?;
        let target = root.path().join("mount");
        let mounter = Mounter::new(root.path().join("scratch"));
        let fs_group = 4567;

        let write_through_view =
            |files: &Payload| -> Result<WriteOutcome, Box<dyn std::error::Error>> {
                let view = mounter.writable_view(&target)?;
                let outcome = AtomicWriter::new(view.path()).write(files, Some(fs_group));
                view.close()?;
                Ok(outcome?)
            };

        let options = TmpfsOptions {
            size_bytes: 1024 * 1024,
            mode: 0o750,
            gid: Some(fs_group),
        };
        let result = (|| -> TestResult {
            mounter.mount_tmpfs(&target, &options)?;
            mounter.set_read_only(&target, true)?;

            let first = payload(&[("api-key", b"value-1", 0o440)]);
            assert_eq!(write_through_view(&first)?, WriteOutcome::Written);
            assert_eq!(fs::read(target.join("api-key"))?, b"value-1");
            let metadata = fs::metadata(target.join("api-key"))?;
            assert_eq!((metadata.mode() & 0o777, metadata.gid()), (0o440, fs_group));
            assert!(fs::write(target.join("api-key"), b"tamper").is_err());

            // Republish with the same content writes nothing.
            assert_eq!(write_through_view(&first)?, WriteOutcome::Unchanged);

            // Rotation.
            let rotated = payload(&[("api-key", b"value-2", 0o440)]);
            assert_eq!(write_through_view(&rotated)?, WriteOutcome::Written);
            assert_eq!(fs::read(target.join("api-key"))?, b"value-2");

            // Revocation: withdraw everything, keep the mount.
            assert_eq!(write_through_view(&Payload::new())?, WriteOutcome::Written);
            assert!(fs::symlink_metadata(target.join("api-key")).is_err());
            assert!(mounter.is_mount_point(&target)?);
            Ok(())
        })();

        let unmounted = mounter.unmount(&target, UnmountMode::Normal);
        result?;
        assert_eq!(unmounted?, UnmountOutcome::Unmounted);
        assert!(!mounter.is_mount_point(&target)?);
        Ok(())
    }
}
