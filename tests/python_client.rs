//! Interoperability: a client generated from `proto/` by Python's grpcio submits and
//! lists jobs, sees the standard health service SERVING and discovers the services by
//! reflection. The interpreter comes from `DISPATCHER_PYTHON` (`make test` sets it to the
//! virtualenv `make python-deps` builds).

use std::time::Duration;

use dispatcher_testkit::ProcCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_grpc_client_submits_lists_checks_health_and_reflects() {
    let python = std::env::var("DISPATCHER_PYTHON")
        .unwrap_or_else(|_| format!("{}/../target/pyenv/bin/python", env!("CARGO_MANIFEST_DIR")));
    assert!(
        std::path::Path::new(&python).exists(),
        "no Python with grpcio at {python}: run `make python-deps` (or `make test`, which does)"
    );
    let (c, _, leader) = ProcCluster::start_elected(3, Duration::from_secs(30)).await;
    // Through a follower: the write is forwarded to the leader.
    let follower = c.follower_addr(leader);
    let out = tokio::process::Command::new(&python)
        // This package is `tests/`; the protos are the workspace's.
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/python/client_check.py"
        ))
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../proto"))
        .arg(&follower)
        .output()
        .await
        .expect("run python");
    assert!(
        out.status.success(),
        "python client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
