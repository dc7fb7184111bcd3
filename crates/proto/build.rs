//! Compiles `proto/dispatcher/v1/dispatcher.proto` with protox, a pure-Rust protobuf
//! compiler (no system `protoc` is needed), then generates the prost messages and the
//! tonic clients and servers from the resulting descriptor set.
//!
//! Outputs in `$OUT_DIR`:
//! - `dispatcher.v1.rs`: included with `tonic::include_proto!("dispatcher.v1")`;
//! - `dispatcher_descriptor.bin`: the encoded `FileDescriptorSet`, included with
//!   `tonic::include_file_descriptor_set!("dispatcher_descriptor")` for server reflection.

use std::env;
use std::error::Error;
use std::fs;
use std::path::PathBuf;

use protox::prost::Message as _;

/// The proto root (the workspace's `proto/`), relative to this package.
const PROTO_ROOT: &str = "../../proto";
/// The proto file to compile, relative to `PROTO_ROOT`.
const PROTO_FILE: &str = "dispatcher/v1/dispatcher.proto";

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed={PROTO_ROOT}");

    let fds = protox::compile([PROTO_FILE], [PROTO_ROOT])
        .map_err(|e| format!("failed to compile {PROTO_ROOT}/{PROTO_FILE}: {e:?}"))?;

    let out_dir = PathBuf::from(
        env::var_os("OUT_DIR").ok_or("OUT_DIR is not set; build.rs must run under cargo")?,
    );
    let descriptor_path = out_dir.join("dispatcher_descriptor.bin");
    fs::write(&descriptor_path, fds.encode_to_vec()).map_err(|e| {
        format!(
            "failed to write the file descriptor set to {}: {e}",
            descriptor_path.display()
        )
    })?;

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Ordered maps: deterministic output (tables, JSON) and a direct match for the
        // state machine's BTreeMaps.
        .btree_map(".")
        .compile_fds(fds)
        .map_err(|e| format!("failed to generate Rust code from {PROTO_ROOT}/{PROTO_FILE}: {e}"))?;

    Ok(())
}
