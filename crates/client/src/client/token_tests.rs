//! The token RPCs against an in-process ClusterService that keeps tokens in memory and can
//! lose an answer after applying the change, as a leader that dies right after committing.

use std::sync::atomic::{AtomicUsize, Ordering};

use dispatcher_proto::v1::cluster_service_server::{ClusterService, ClusterServiceServer};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response};

use super::*;

#[derive(Default)]
struct Tokens {
    tokens: Mutex<Vec<pb::TokenInfo>>,
    /// How many of the next writes apply and then answer UNAVAILABLE.
    lose_answers: AtomicUsize,
    writes: AtomicUsize,
}

impl Tokens {
    fn answer<T>(&self, value: T) -> Result<Response<T>, Status> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        let lost = self
            .lose_answers
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if lost {
            return Err(Status::unavailable("leadership lost before answering"));
        }
        Ok(Response::new(value))
    }

    fn tokens(&self) -> std::sync::MutexGuard<'_, Vec<pb::TokenInfo>> {
        self.tokens.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[tonic::async_trait]
impl ClusterService for Tokens {
    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn add_node(
        &self,
        _: Request<pb::AddNodeRequest>,
    ) -> Result<Response<pb::AddNodeResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn remove_node(
        &self,
        _: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::RemoveNodeResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    type SnapshotStream = tokio_stream::Empty<Result<pb::SnapshotChunk, Status>>;

    async fn snapshot(
        &self,
        _: Request<pb::SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn create_token(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let req = request.into_inner();
        let info = pb::TokenInfo {
            name: req.name.clone(),
            role: req.role,
            task_managers: req.task_managers,
            created_at_ms: 1_700_000_000_000,
        };
        {
            let mut tokens = self.tokens();
            if tokens.iter().any(|t| t.name == req.name) {
                return Err(Status::already_exists(format!(
                    "a token named {:?} exists",
                    req.name
                )));
            }
            tokens.push(info.clone());
        }
        self.answer(pb::CreateTokenResponse {
            token: Some(info),
            secret: "the-secret".into(),
        })
    }

    async fn list_tokens(
        &self,
        _: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        Ok(Response::new(pb::ListTokensResponse {
            tokens: self.tokens().clone(),
        }))
    }

    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        let name = request.into_inner().name;
        {
            let mut tokens = self.tokens();
            let before = tokens.len();
            tokens.retain(|t| t.name != name);
            if tokens.len() == before {
                return Err(Status::not_found(format!("no token named {name:?}")));
            }
        }
        self.answer(pb::RevokeTokenResponse {})
    }
}

async fn serve() -> (Client, Arc<Tokens>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr").to_string();
    let state = Arc::new(Tokens::default());
    let server = tonic::transport::Server::builder()
        .add_service(ClusterServiceServer::from_arc(state.clone()))
        .serve_with_incoming(TcpListenerStream::new(listener));
    tokio::spawn(server);
    let mut config = ClientConfig::new(vec![addr]);
    config.timeout = Duration::from_secs(10);
    config.min_backoff = Duration::from_millis(1);
    config.max_backoff = Duration::from_millis(10);
    (Client::new(config).expect("client"), state)
}

#[tokio::test]
async fn tokens_are_created_listed_and_revoked() {
    let (client, state) = serve().await;
    let tms = vec!["tm-1".to_string(), "pool-*".to_string()];
    let created = client
        .create_token("agents", pb::TokenRole::TaskManager, tms.clone())
        .await
        .expect("created");
    assert_eq!(created.secret, "the-secret");
    let listed = client.list_tokens().await.expect("listed");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].name, "agents");
    assert_eq!(listed[0].role, pb::TokenRole::TaskManager as i32);
    assert_eq!(listed[0].task_managers, tms);

    client.revoke_token("agents").await.expect("revoked");
    assert!(client.list_tokens().await.expect("listed").is_empty());
    // Revoking what never existed is an error when no earlier try could have done it.
    match client.revoke_token("agents").await {
        Err(e @ ClientError::Rejected(_)) => {
            assert_eq!(e.code(), Some(Code::NotFound));
            assert_eq!(e.to_string(), "no token named \"agents\"");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        state.writes.load(Ordering::SeqCst),
        2,
        "no write was retried"
    );
}

#[tokio::test]
async fn a_revocation_whose_answer_was_lost_is_done_after_the_retry() {
    let (client, state) = serve().await;
    client
        .create_token("ci", pb::TokenRole::Submit, vec![])
        .await
        .expect("created");
    state.lose_answers.store(1, Ordering::SeqCst);
    client
        .revoke_token("ci")
        .await
        .expect("revoked, as far as the caller can tell");
    assert!(state.tokens().is_empty());
}

#[tokio::test]
async fn a_creation_whose_answer_was_lost_says_the_secret_is_gone() {
    let (client, state) = serve().await;
    state.lose_answers.store(1, Ordering::SeqCst);
    match client
        .create_token("ci", pb::TokenRole::Submit, vec![])
        .await
    {
        Err(e @ ClientError::Rejected(_)) => {
            assert_eq!(e.code(), Some(Code::AlreadyExists));
            let message = e.to_string();
            assert!(
                message.starts_with("a token named \"ci\" exists"),
                "{message}"
            );
            assert!(
                message.contains("revoke it and create it again"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
    // A plain conflict, on the first try, is reported as the replica words it.
    match client.create_token("ci", pb::TokenRole::Read, vec![]).await {
        Err(e) => assert_eq!(e.to_string(), "a token named \"ci\" exists"),
        Ok(r) => panic!("{r:?}"),
    }
}
