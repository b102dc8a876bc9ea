//! The CSI node plugin, in three layers (each imports only the ones below
//! it; nothing imports upward):
//!
//! - [`volume`], the volume on disk: which target paths are accepted
//!   ([`volume::target_path`]), the publish attributes and the pod's token
//!   ([`volume::context`]), size-limited tmpfs mounts ([`volume::mounter`]),
//!   kubelet-style `..data` swaps ([`volume::atomic_writer`]), the on-disk
//!   record of published volumes without secret values
//!   ([`volume::registry`]), its in-memory view with each pod's token
//!   ([`volume::table`]) and per-target locks ([`volume::locks`]).
//! - [`errors`]: why a Node RPC failed and the gRPC code for it.
//! - [`converge`], keeping volumes current: the plugin's shared state
//!   ([`converge::NodeService`]), convergence of one volume, the work
//!   queues, the push stream, the expiry timer, the custody client and the
//!   reports to custody.
//! - [`grpc`], the gRPC surface: the Identity and Node services, the
//!   Controller stub for csi-sanity, kubelet's plugin registration service
//!   ([`grpc::registration`], behind [`grpc::authority`]: kubelet sends the
//!   socket path as `:authority`), the `/healthz` and `/readyz` endpoint
//!   ([`grpc::health`]), and the unix-socket server that wires `scopehold
//!   node` together.
//!
//! A publish is: validate the target path, parse the attributes, resolve via
//! custody, `mount_tmpfs` + `set_read_only(true)`, then write the payload
//! through the volume's detached writable view (kept for later writes) and
//! record the volume in the registry.

pub mod converge;
pub mod errors;
pub mod grpc;
pub mod volume;

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::MetadataExt;

    use super::volume::atomic_writer::{AtomicWriter, FileContent, Payload, WriteOutcome};
    use super::volume::mounter::{Mounter, TmpfsOptions, UnmountMode, UnmountOutcome};

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
                let outcome = AtomicWriter::open(view.path())?.write(files, Some(fs_group));
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
