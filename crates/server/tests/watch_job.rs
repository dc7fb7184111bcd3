//! WatchJob through gRPC, on one replica in this process (`server::serve` on a port-0
//! listener, plain text on loopback):
//!
//! - past `--max-watchers-per-job` or `--max-watchers` a watch is refused with
//!   RESOURCE_EXHAUSTED naming the bound, the open watches go on, and a closed watch
//!   frees its place;
//! - watchers of one job with different roles share its view, yet a reader sees env
//!   values redacted and an admin does not, and a revoked token ends its watch at the
//!   next change while the other watch goes on.

use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::Channel;
use tonic::{Code, Request, Status, Streaming};

use dispatcher_proto::v1 as pb;
use dispatcher_server::server::config::Args;
use dispatcher_server::server::{serve, ServerError};
use dispatcher_testkit::spec::JobBuilder;
use dispatcher_testkit::{spec, wait_for};
use pb::cluster_service_client::ClusterServiceClient;
use pb::job_service_client::JobServiceClient;

const A: &str = "00000000-0000-4000-8000-00000000000a";
const B: &str = "00000000-0000-4000-8000-00000000000b";

/// Sends `authorization: Bearer <secret>` when it has a secret.
#[derive(Clone)]
struct Bearer(Option<String>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(secret) = &self.0 {
            let value = format!("Bearer {secret}").parse().expect("ascii");
            req.metadata_mut().insert("authorization", value);
        }
        Ok(req)
    }
}

type Jobs = JobServiceClient<InterceptedService<Channel, Bearer>>;

/// One replica with `extra` settings, and a channel to it.
struct Replica {
    channel: Channel,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServerError>>,
    _dir: tempfile::TempDir,
}

impl Replica {
    async fn start(extra: impl FnOnce(&std::path::Path) -> Args) -> Replica {
        let dir = tempfile::tempdir().expect("tempdir");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let config = Args {
            id: Some(1),
            listen: Some(addr),
            data_dir: Some(dir.path().join("data")),
            initial_cluster: Some(format!("1={addr}")),
            heartbeat_ms: Some(50),
            election_timeout_min_ms: Some(150),
            election_timeout_max_ms: Some(300),
            ..extra(dir.path())
        }
        .into_config()
        .expect("a valid configuration");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(config, listener, async move {
            let _ = stopped.await;
        }));
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect_lazy();
        Replica {
            channel,
            stop: Some(stop),
            task,
            _dir: dir,
        }
    }

    fn jobs(&self, secret: Option<&str>) -> Jobs {
        JobServiceClient::with_interceptor(self.channel.clone(), Bearer(secret.map(Into::into)))
    }

    fn cluster(&self, secret: &str) -> ClusterServiceClient<InterceptedService<Channel, Bearer>> {
        ClusterServiceClient::with_interceptor(self.channel.clone(), Bearer(Some(secret.into())))
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

/// Submits `spec` as `id`, retrying until the replica leads (and, with tokens, has
/// created the bootstrap token).
async fn submit(jobs: &Jobs, id: &str, spec: pb::JobSpec) {
    wait_for(Duration::from_secs(30), "the job is submitted", || {
        let mut jobs = jobs.clone();
        let spec = spec.clone();
        async move {
            jobs.submit_job(pb::SubmitJobRequest {
                job_id: id.into(),
                spec: Some(spec),
            })
            .await
            .ok()
        }
    })
    .await;
}

/// A watch of `job`, after its first event (the watch is then registered).
async fn watch(jobs: &Jobs, job: &str) -> Result<(Streaming<pb::JobEvent>, pb::JobEvent), Status> {
    let mut stream = jobs
        .clone()
        .watch_job(pb::WatchJobRequest { job_id: job.into() })
        .await?
        .into_inner();
    match stream.message().await? {
        Some(first) => Ok((stream, first)),
        None => Err(Status::internal("the watch ended at once")),
    }
}

async fn next(stream: &mut Streaming<pb::JobEvent>) -> Result<Option<pb::JobEvent>, Status> {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("the watch is sent something within 10 s")
}

fn sleeper() -> pb::JobSpec {
    JobBuilder::new("watched")
        .vertex("v", 1, spec::sleep(60_000))
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_past_a_bound_are_refused_with_resource_exhausted_naming_it() {
    let replica = Replica::start(|_| Args {
        max_watchers_per_job: Some(2),
        max_watchers: Some(3),
        ..Default::default()
    })
    .await;
    let jobs = replica.jobs(None);
    submit(&jobs, A, sleeper()).await;
    submit(&jobs, B, sleeper()).await;

    let first_a = watch(&jobs, A).await.expect("a first watcher of A");
    let _second_a = watch(&jobs, A).await.expect("a second watcher of A");
    let refused = watch(&jobs, A).await.expect_err("a third watcher of A");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("--max-watchers-per-job") && refused.message().contains(A),
        "{}",
        refused.message()
    );
    let _first_b = watch(&jobs, B).await.expect("B is within its bound");
    let refused = watch(&jobs, B).await.expect_err("a fourth watcher in all");
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
            let jobs = jobs.clone();
            async move { watch(&jobs, A).await.ok() }
        },
    )
    .await;
    replica.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_see_env_values_by_role_and_a_revoked_token_ends_its_watch() {
    let admin_secret = "watch-test-admin-secret-0123456789abcdef";
    let replica = Replica::start(|dir| {
        let file = dir.join("admin.token");
        std::fs::write(&file, admin_secret).expect("token file");
        Args {
            bootstrap_token_file: Some(file),
            ..Default::default()
        }
    })
    .await;
    let admin = replica.jobs(Some(admin_secret));
    let job = JobBuilder::new("secret")
        .vertex(
            "v",
            1,
            spec::command_with_env(&["/bin/true"], [("SECRET", "hunter2")]),
        )
        .build();
    submit(&admin, A, job).await;
    let reader_secret = replica
        .cluster(admin_secret)
        .create_token(pb::CreateTokenRequest {
            name: "reader".into(),
            role: pb::TokenRole::Read as i32,
            task_managers: vec![],
        })
        .await
        .expect("a reader token")
        .into_inner()
        .secret;
    let reader = replica.jobs(Some(&reader_secret));

    let env = |event: &pb::JobEvent| -> String {
        let task = event
            .job
            .as_ref()
            .and_then(|j| j.spec.as_ref())
            .and_then(|s| s.vertices.first())
            .and_then(|v| v.task.as_ref())
            .and_then(|t| t.kind.as_ref());
        match task {
            Some(pb::task::Kind::Command(c)) => c.env.get("SECRET").cloned().unwrap_or_default(),
            _ => String::new(),
        }
    };
    let (mut as_admin, first) = watch(&admin, A).await.expect("the admin's watch");
    assert_eq!(env(&first), "hunter2");
    let (mut as_reader, first) = watch(&reader, A).await.expect("the reader's watch");
    assert_eq!(env(&first), "<redacted>");

    replica
        .cluster(admin_secret)
        .revoke_token(pb::RevokeTokenRequest {
            name: "reader".into(),
        })
        .await
        .expect("revoked");
    admin
        .clone()
        .cancel_job(pb::CancelJobRequest { job_id: A.into() })
        .await
        .expect("canceled");
    let ended = next(&mut as_reader)
        .await
        .expect_err("the revoked token's watch ends");
    assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
    let canceled = next(&mut as_admin)
        .await
        .expect("the admin's watch goes on")
        .expect("an event");
    assert_eq!(
        canceled.job.as_ref().map(|j| j.state),
        Some(pb::JobState::Canceled as i32)
    );
    assert_eq!(env(&canceled), "hunter2");
    replica.stop().await;
}
