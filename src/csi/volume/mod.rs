//! The volume on disk: what is accepted as a target, how it is mounted and
//! written, and what the plugin records about it. Nothing here talks to
//! custody or knows about gRPC.
//!
//! - [`target_path`]: which target paths the plugin accepts.
//! - [`context`]: typed, bounded parse of the publish attributes and the
//!   pod's token.
//! - [`mounter`]: size-limited tmpfs mounts, read-only to the pod, with a
//!   private writable view for updates ([`known_mounts`] remembers ours).
//! - [`atomic_writer`]: kubelet-style `..data` swap of the volume's files.
//! - [`dir_fd`]: the descriptor-relative file operations it is made of.
//! - [`registry`]: on-disk record of published volumes (no secret values).
//! - [`table`]: the in-memory view of them, with each pod's token.
//! - [`locks`]: per-target serialisation of operations.

pub mod atomic_writer;
pub mod context;
pub mod dir_fd;
pub mod known_mounts;
pub mod locks;
pub mod mounter;
pub mod registry;
pub mod table;
pub mod target_path;
