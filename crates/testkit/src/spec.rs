//! Job specs for tests and tools, as the wire carries them (`dispatcher.v1.JobSpec`):
//! the one place in the test packages that writes the nested messages, so that a new
//! field in the proto is absorbed here and not in every test.
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
    command_with_env(argv, std::iter::empty::<(String, String)>())
}

/// A command task with extra environment variables.
pub fn command_with_env<K, V>(argv: &[&str], env: impl IntoIterator<Item = (K, V)>) -> pb::Task
where
    K: Into<String>,
    V: Into<String>,
{
    pb::Task {
        kind: Some(pb::task::Kind::Command(pb::CommandTask {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: env.into_iter().map(|(k, v)| (k.into(), v.into())).collect(),
        })),
    }
}

/// A command task running `script` with `/bin/sh -c`.
pub fn shell(script: &str) -> pb::Task {
    command(&["/bin/sh", "-c", script])
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
            ..Default::default()
        });
        self
    }

    /// Requires a label on the TaskManagers hosting the last added vertex (so it goes
    /// right after that [`vertex`](Self::vertex) call; before any vertex it does nothing).
    ///
    /// ```
    /// use dispatcher_testkit::spec::{self, JobBuilder};
    /// let job = JobBuilder::new("j")
    ///     .vertex("a", 1, spec::sleep(1))
    ///     .vertex("b", 1, spec::sleep(1))
    ///     .selector("rack", "r1")
    ///     .build();
    /// assert!(job.vertices[0].node_selector.is_empty());
    /// assert_eq!(job.vertices[1].node_selector["rack"], "r1");
    /// ```
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

    /// Sets how slots are chosen among TaskManagers.
    pub fn placement(mut self, strategy: pb::PlacementStrategy) -> Self {
        self.0.placement_strategy = strategy as i32;
        self
    }

    /// Adds a free-form job label (metadata the dispatcher does not interpret).
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.0.labels.insert(key.into(), value.into());
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

/// A job whose spec is about `bytes` long (at least one vertex of 800 kB), within the
/// default limits: vertices that sleep, with long argument lists that are never run.
/// For tests of big log entries.
pub fn big_job(name: &str, bytes: usize) -> pb::JobSpec {
    const ARG: usize = 4000;
    const ARGS_PER_VERTEX: usize = 200;
    let vertices = bytes.div_ceil(ARG * ARGS_PER_VERTEX).max(1);
    let arg = "x".repeat(ARG);
    let mut job = JobBuilder::new(name);
    for v in 0..vertices {
        let argv: Vec<&str> = std::iter::once("/bin/true")
            .chain(std::iter::repeat_n(arg.as_str(), ARGS_PER_VERTEX - 1))
            .collect();
        job = job.vertex(&format!("v{v}"), 1, command(&argv));
    }
    job.build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_built_spec_holds_exactly_what_was_asked() {
        let job = JobBuilder::new("j")
            .vertex("v", 2, command_with_env(&["/bin/true"], [("K", "x")]))
            .placement(pb::PlacementStrategy::BinPack)
            .label("team", "a")
            .build();
        let expected = pb::JobSpec {
            name: "j".into(),
            vertices: vec![pb::Vertex {
                name: "v".into(),
                parallelism: 2,
                task: Some(pb::Task {
                    kind: Some(pb::task::Kind::Command(pb::CommandTask {
                        argv: vec!["/bin/true".into()],
                        env: [("K".to_string(), "x".to_string())].into(),
                    })),
                }),
                ..Default::default()
            }],
            placement_strategy: pb::PlacementStrategy::BinPack as i32,
            labels: [("team".to_string(), "a".to_string())].into(),
            ..Default::default()
        };
        assert_eq!(job, expected);
    }
}
