//! WatchJob's bounds through gRPC: past `--max-watchers-per-job` or `--max-watchers` a
//! watch is refused with RESOURCE_EXHAUSTED naming the bound, the open watches go on,
//! and a closed watch frees its place.
//!
//! One replica runs in this process (`server::serve` on a port-0 listener), plain text.

use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

use dispatcher_proto::v1 as pb;
use dispatcher_server::server::config::Args;
use dispatcher_server::server::serve;
use dispatcher_testkit::spec::JobBuilder;
use dispatcher_testkit::{spec, wait_for};
use pb::job_service_client::JobServiceClient;

const A: &str = "00000000-0000-4000-8000-00000000000a";
const B: &str = "00000000-0000-4000-8000-00000000000b";

async fn watch(
    client: &mut JobServiceClient<Channel>,
    job: &str,
) -> Result<Streaming<pb::JobEvent>, tonic::Status> {
    let mut stream = client
        .watch_job(pb::WatchJobRequest { job_id: job.into() })
        .await?
        .into_inner();
    // The first event: the watch is registered on the server.
    match stream.message().await? {
        Some(_) => Ok(stream),
        None => Err(tonic::Status::internal("the watch ended at once")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_past_a_bound_are_refused_with_resource_exhausted_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let config = Args {
        id: Some(1),
        listen: Some(addr),
        data_dir: Some(dir.path().to_path_buf()),
        initial_cluster: Some(format!("1={addr}")),
        heartbeat_ms: Some(50),
        election_timeout_min_ms: Some(150),
        election_timeout_max_ms: Some(300),
        max_watchers_per_job: Some(2),
        max_watchers: Some(3),
        ..Default::default()
    }
    .into_config()
    .expect("a valid configuration");
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(serve(config, listener, async move {
        let _ = stopped.await;
    }));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect_lazy();
    let mut client = JobServiceClient::new(channel);
    for id in [A, B] {
        let job = JobBuilder::new("watched")
            .vertex("v", 1, spec::sleep(60_000))
            .build();
        wait_for(Duration::from_secs(30), "the job is submitted", || {
            let mut client = client.clone();
            let job = job.clone();
            async move {
                client
                    .submit_job(pb::SubmitJobRequest {
                        job_id: id.into(),
                        spec: Some(job),
                    })
                    .await
                    .ok()
            }
        })
        .await;
    }

    let first_a = watch(&mut client, A).await.expect("a first watcher of A");
    let _second_a = watch(&mut client, A).await.expect("a second watcher of A");
    let refused = watch(&mut client, A)
        .await
        .expect_err("a third watcher of A");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("--max-watchers-per-job") && refused.message().contains(A),
        "{}",
        refused.message()
    );
    let _first_b = watch(&mut client, B).await.expect("B is within its bound");
    let refused = watch(&mut client, B)
        .await
        .expect_err("a fourth watcher in all");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("--max-watchers "),
        "{}",
        refused.message()
    );

    // A watcher that goes frees its place (the server learns it from the stream's reset).
    drop(first_a);
    wait_for(
        Duration::from_secs(10),
        "a closed watch frees its place",
        || {
            let mut client = client.clone();
            async move { watch(&mut client, A).await.ok() }
        },
    )
    .await;

    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
}
