//! Compiles the gRPC protocols in `proto/` into Rust (see `src/proto.rs`).
//!
//! protox is a pure-Rust protobuf compiler, so the build needs no `protoc`.

use std::error::Error;

/// The protocol files, relative to the include root `proto/`.
const PROTO_FILES: [&str; 3] = [
    "proto/csi/v1/csi.proto",
    "proto/scopehold/v1/custody.proto",
    "proto/pluginregistration/v1/api.proto",
];

/// Messages that carry a token or secret value. prost must not derive `Debug`
/// for them: `src/proto.rs` implements a redacting `Debug` instead, so a
/// stray `{:?}` can never print a secret.
const REDACTED_DEBUG_MESSAGES: [&str; 5] = [
    ".csi.v1.NodePublishVolumeRequest",
    ".csi.v1.NodeStageVolumeRequest",
    ".csi.v1.NodeExpandVolumeRequest",
    ".scopehold.v1.ResolveRequest",
    ".scopehold.v1.File",
];

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=build.rs");

    let file_descriptors = protox::compile(PROTO_FILES, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Our own rerun-if-changed above covers the whole directory.
        .emit_rerun_if_changed(false)
        .skip_debug(REDACTED_DEBUG_MESSAGES)
        .compile_fds(file_descriptors)?;
    Ok(())
}
