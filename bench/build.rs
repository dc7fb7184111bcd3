//! Compiles the etcd API subset in `proto/etcd.proto` with protox (no system `protoc`).

use std::error::Error;

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["etcd.proto"], ["proto"])
        .map_err(|e| format!("failed to compile proto/etcd.proto: {e:?}"))?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .compile_fds(fds)
        .map_err(|e| format!("failed to generate code from proto/etcd.proto: {e}"))?;
    Ok(())
}
