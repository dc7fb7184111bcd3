//! Job specs for tests, as the wire carries them (`dispatcher.v1.JobSpec`), so that no
//! test writes the nested messages by hand.
//!
//! ```
//! use dispatcher_testkit::spec::{self, JobBuilder};
//! let job = JobBuilder::new("wordcount")
//!     .vertex("source", 2, spec::sleep(60_000))
//!     .vertex("sink", 1, spec::command(&["sh", "-c", "exit 0"]))
//!     .edge("source", "sink")
//!     .build();
//! assert_eq!(job.vertices.len(), 2);
//! ```

use dispatcher_proto::v1 as pb;

/// A built-in task that sleeps `ms`, then finishes.
pub fn sleep(ms: u64) -> pb::Task {
    pb::Task {
        kind: Some(pb::task::Kind::Sleep(pb::SleepTask { duration_ms: ms })),
    }
}

/// A built-in task that runs `after_ms`, then fails with `exit_code`.
pub fn fail(after_ms: u64, exit_code: i32) -> pb::Task {
    pb::Task {
        kind: Some(pb::task::Kind::Fail(pb::FailTask {
            after_ms,
            exit_code,
        })),
    }
}

/// A command task: a child process with this argv and no extra environment.
pub fn command(argv: &[&str]) -> pb::Task {
    pb::Task {
        kind: Some(pb::task::Kind::Command(pb::CommandTask {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: Default::default(),
        })),
    }
}

/// Builds a [`pb::JobSpec`] vertex by vertex.
#[derive(Clone, Debug)]
pub struct JobBuilder(pb::JobSpec);

impl JobBuilder {
    /// A job with this name and no vertices yet.
    pub fn new(name: &str) -> Self {
        JobBuilder(pb::JobSpec {
            name: name.into(),
            ..Default::default()
        })
    }

    /// Adds a vertex of `parallelism` subtasks running `task`.
    pub fn vertex(mut self, name: &str, parallelism: u32, task: pb::Task) -> Self {
        self.0.vertices.push(pb::Vertex {
            name: name.into(),
            parallelism,
            task: Some(task),
            node_selector: Default::default(),
        });
        self
    }

    /// Requires a label on the TaskManagers hosting the last added vertex.
    pub fn selector(mut self, key: &str, value: &str) -> Self {
        if let Some(v) = self.0.vertices.last_mut() {
            v.node_selector.insert(key.into(), value.into());
        }
        self
    }

    /// Adds a data edge.
    pub fn edge(mut self, from: &str, to: &str) -> Self {
        self.0.edges.push(pb::Edge {
            from: from.into(),
            to: to.into(),
        });
        self
    }

    /// Sets the scheduling priority.
    pub fn priority(mut self, priority: i32) -> Self {
        self.0.priority = priority;
        self
    }

    /// Restarts failed tasks up to `attempts` times, `delay_ms` apart.
    pub fn fixed_delay_restarts(mut self, attempts: u32, delay_ms: u64) -> Self {
        self.0.restart_strategy = Some(pb::RestartStrategy {
            kind: Some(pb::restart_strategy::Kind::FixedDelay(
                pb::FixedDelayRestart { attempts, delay_ms },
            )),
        });
        self
    }

    /// The spec.
    pub fn build(self) -> pb::JobSpec {
        self.0
    }
}

/// A job of `parallelism` one-minute sleep tasks in one vertex named `work`.
pub fn sleep_job(name: &str, parallelism: u32) -> pb::JobSpec {
    JobBuilder::new(name)
        .vertex("work", parallelism, sleep(60_000))
        .build()
}
