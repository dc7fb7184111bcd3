//! Interoperability: a client generated from `proto/` by Python's grpcio connects to a
//! secured cluster over TLS (trusting the cluster's CA) with a bearer token, submits and
//! lists jobs, is refused UNAUTHENTICATED without a valid token, sees the standard health
//! service SERVING and discovers the services by reflection. The interpreter comes from
//! `DISPATCHER_PYTHON` (`make test` sets it to the virtualenv `make python-deps` builds).

use std::time::Duration;

use dispatcher_testkit::ProcCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_grpc_client_over_tls_with_a_token_submits_lists_checks_health_and_reflects() {
    let python = std::env::var("DISPATCHER_PYTHON")
        .unwrap_or_else(|_| format!("{}/../target/pyenv/bin/python", env!("CARGO_MANIFEST_DIR")));
    assert!(
        std::path::Path::new(&python).exists(),
        "no Python with grpcio at {python}: run `make python-deps` (or `make test`, which does)"
    );
    let (c, client, leader) = ProcCluster::start_elected(3, Duration::from_secs(30)).await;
    let sec = c
        .security
        .as_ref()
        .expect("ProcCluster is secured by default");
    // Through a follower (`127.0.0.1:PORT`, an IP SAN of the replica certificates): the
    // write is forwarded to the leader.
    let follower = c.follower_addr(leader);
    let out = tokio::process::Command::new(&python)
        // This package is `tests/`; the protos are the workspace's.
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/python/client_check.py"
        ))
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../proto"))
        .arg(&follower)
        .arg(sec.ca())
        .arg(sec.admin_token())
        .output()
        .await
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("python client ok over TLS"),
        "the script ran to its end: {stdout}"
    );
    // What Python submitted is in the replicated state, seen by the Rust client too.
    let jobs = client
        .list_jobs(Default::default())
        .await
        .expect("list jobs");
    assert_eq!(
        jobs.jobs.iter().filter(|j| j.name == "from-python").count(),
        1,
        "exactly one job from Python (its retry was the same job): {jobs:?}"
    );
}
