//! Validation of job specs and TaskManager registrations against the cluster's bounds.
//!
//! Every rejection names the field (a dotted path such as `spec.vertices[1].parallelism`)
//! and the reason. The gRPC layer runs the same checks before proposing, so nothing
//! invalid reaches the log; `apply` runs them again because the log is the authority.

use std::collections::{BTreeMap, BTreeSet};

use super::access::{Role, Token};
use super::command::{ClusterConfig, Rejection, ResourceLimits};
use super::types::{JobSpec, RestartStrategy, TaskManagerSpec, TaskSpec};

fn check_str(field: &str, value: &str, limits: &ClusterConfig) -> Result<(), Rejection> {
    if value.len() > limits.max_string_len as usize {
        return Err(Rejection::invalid(
            field,
            format!(
                "is {} bytes long, more than the limit of {}",
                value.len(),
                limits.max_string_len
            ),
        ));
    }
    Ok(())
}

fn check_name(field: &str, value: &str, limits: &ClusterConfig) -> Result<(), Rejection> {
    if value.trim().is_empty() {
        return Err(Rejection::invalid(field, "must not be empty"));
    }
    check_str(field, value, limits)
}

fn check_map(
    field: &str,
    map: &BTreeMap<String, String>,
    limits: &ClusterConfig,
) -> Result<(), Rejection> {
    if map.len() > limits.max_list_len as usize {
        return Err(Rejection::invalid(
            field,
            format!(
                "has {} entries, more than the limit of {}",
                map.len(),
                limits.max_list_len
            ),
        ));
    }
    for (k, v) in map {
        check_name(&format!("{field}.key"), k, limits)?;
        check_str(&format!("{field}[{k}]"), v, limits)?;
    }
    Ok(())
}

/// Checks a job spec: bounded sizes, unique vertex names, edges between existing vertices,
/// no cycle, and sane task and restart settings.
pub fn validate_job_spec(spec: &JobSpec, limits: &ClusterConfig) -> Result<(), Rejection> {
    check_name("spec.name", &spec.name, limits)?;
    check_map("spec.labels", &spec.labels, limits)?;
    if spec.vertices.is_empty() {
        return Err(Rejection::invalid(
            "spec.vertices",
            "a job needs at least one vertex",
        ));
    }
    if spec.vertices.len() > limits.max_vertices as usize {
        return Err(Rejection::invalid(
            "spec.vertices",
            format!(
                "has {} vertices, more than the limit of {}",
                spec.vertices.len(),
                limits.max_vertices
            ),
        ));
    }
    if spec.edges.len() > limits.max_edges as usize {
        return Err(Rejection::invalid(
            "spec.edges",
            format!(
                "has {} edges, more than the limit of {}",
                spec.edges.len(),
                limits.max_edges
            ),
        ));
    }
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, v) in spec.vertices.iter().enumerate() {
        let field = format!("spec.vertices[{i}]");
        check_name(&format!("{field}.name"), &v.name, limits)?;
        if names.insert(v.name.as_str(), i).is_some() {
            return Err(Rejection::invalid(
                format!("{field}.name"),
                format!("vertex name {:?} is used twice", v.name),
            ));
        }
        if v.parallelism == 0 {
            return Err(Rejection::invalid(
                format!("{field}.parallelism"),
                "must be at least 1",
            ));
        }
        if v.parallelism > limits.max_parallelism {
            return Err(Rejection::invalid(
                format!("{field}.parallelism"),
                format!(
                    "{} is more than the limit of {}",
                    v.parallelism, limits.max_parallelism
                ),
            ));
        }
        check_map(&format!("{field}.node_selector"), &v.node_selector, limits)?;
        validate_task(&format!("{field}.task"), &v.task, limits)?;
    }
    let total = spec.task_count();
    if total > u64::from(limits.max_tasks_per_job) {
        return Err(Rejection::invalid(
            "spec.vertices",
            format!(
                "the job has {total} subtasks in all, more than the limit of {}",
                limits.max_tasks_per_job
            ),
        ));
    }

    // Edges: both ends exist, no self-loop, no duplicate, and the graph is a DAG.
    let n = spec.vertices.len();
    let mut out: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut indegree = vec![0usize; n];
    let mut seen = BTreeSet::new();
    for (i, e) in spec.edges.iter().enumerate() {
        let field = format!("spec.edges[{i}]");
        let from = *names.get(e.from.as_str()).ok_or_else(|| {
            Rejection::invalid(
                format!("{field}.from"),
                format!("no vertex is named {:?}", e.from),
            )
        })?;
        let to = *names.get(e.to.as_str()).ok_or_else(|| {
            Rejection::invalid(
                format!("{field}.to"),
                format!("no vertex is named {:?}", e.to),
            )
        })?;
        if from == to {
            return Err(Rejection::invalid(
                field,
                format!("vertex {:?} has an edge to itself", e.from),
            ));
        }
        if !seen.insert((from, to)) {
            return Err(Rejection::invalid(
                field,
                format!("edge {:?} -> {:?} is listed twice", e.from, e.to),
            ));
        }
        out[from].push(to);
        indegree[to] += 1;
    }
    // Kahn's algorithm: whatever is left with a non-zero in-degree lies on a cycle.
    let mut ready: Vec<usize> = (0..n).filter(|&v| indegree[v] == 0).collect();
    let mut visited = 0;
    while let Some(v) = ready.pop() {
        visited += 1;
        for &w in &out[v] {
            indegree[w] -= 1;
            if indegree[w] == 0 {
                ready.push(w);
            }
        }
    }
    if visited != n {
        let on_cycle: Vec<&str> = (0..n)
            .filter(|&v| indegree[v] > 0)
            .map(|v| spec.vertices[v].name.as_str())
            .collect();
        return Err(Rejection::invalid(
            "spec.edges",
            format!("the job graph has a cycle through {}", on_cycle.join(", ")),
        ));
    }

    if let RestartStrategy::FixedDelay { delay_ms, .. } = spec.restart {
        // A day is far beyond any sane restart delay and keeps `now + delay` from
        // overflowing.
        if delay_ms > MAX_RESTART_DELAY_MS {
            return Err(Rejection::invalid(
                "spec.restart_strategy.fixed_delay.delay_ms",
                "must be at most one day (86400000 ms)",
            ));
        }
    }
    Ok(())
}

fn validate_task(field: &str, task: &TaskSpec, limits: &ClusterConfig) -> Result<(), Rejection> {
    match task {
        TaskSpec::Command { argv, env } => {
            if argv.is_empty() {
                return Err(Rejection::invalid(
                    format!("{field}.command.argv"),
                    "must name a program",
                ));
            }
            if argv.len() > limits.max_list_len as usize {
                return Err(Rejection::invalid(
                    format!("{field}.command.argv"),
                    format!(
                        "has {} arguments, more than the limit of {}",
                        argv.len(),
                        limits.max_list_len
                    ),
                ));
            }
            check_name(&format!("{field}.command.argv[0]"), &argv[0], limits)?;
            for (i, a) in argv.iter().enumerate() {
                check_str(&format!("{field}.command.argv[{i}]"), a, limits)?;
            }
            check_map(&format!("{field}.command.env"), env, limits)
        }
        TaskSpec::Sleep { duration_ms } => {
            if *duration_ms > 7 * 24 * 60 * 60 * 1000 {
                return Err(Rejection::invalid(
                    format!("{field}.sleep.duration_ms"),
                    "must be at most a week",
                ));
            }
            Ok(())
        }
        TaskSpec::Fail {
            after_ms,
            exit_code,
        } => {
            if *exit_code == 0 {
                return Err(Rejection::invalid(
                    format!("{field}.fail.exit_code"),
                    "a failing task needs a non-zero exit code",
                ));
            }
            if *after_ms > 7 * 24 * 60 * 60 * 1000 {
                return Err(Rejection::invalid(
                    format!("{field}.fail.after_ms"),
                    "must be at most a week",
                ));
            }
            Ok(())
        }
    }
}

/// Checks a TaskManager registration.
pub fn validate_task_manager(
    spec: &TaskManagerSpec,
    limits: &ClusterConfig,
) -> Result<(), Rejection> {
    check_name("task_manager_id", spec.id.as_str(), limits)?;
    check_name("instance_id", &spec.instance, limits)?;
    check_str("address", &spec.address, limits)?;
    if spec.slots == 0 {
        return Err(Rejection::invalid("slots", "must be at least 1"));
    }
    if spec.slots > limits.max_slots_per_task_manager {
        return Err(Rejection::invalid(
            "slots",
            format!(
                "{} is more than the limit of {}",
                spec.slots, limits.max_slots_per_task_manager
            ),
        ));
    }
    check_map("labels", &spec.labels, limits)
}

/// Checks a cluster configuration for values that would make the cluster unusable.
pub fn validate_cluster_config(config: &ClusterConfig) -> Result<(), Rejection> {
    let positive = [
        ("config.max_parallelism", config.max_parallelism),
        ("config.max_tasks_per_job", config.max_tasks_per_job),
        ("config.max_vertices", config.max_vertices),
        ("config.max_string_len", config.max_string_len),
        ("config.max_list_len", config.max_list_len),
        (
            "config.max_slots_per_task_manager",
            config.max_slots_per_task_manager,
        ),
        (
            "config.max_retained_checkpoints",
            config.max_retained_checkpoints,
        ),
    ];
    for (field, value) in positive {
        if value == 0 {
            return Err(Rejection::invalid(field, "must be at least 1"));
        }
    }
    if config.max_string_len > 1 << 20 {
        return Err(Rejection::invalid(
            "config.max_string_len",
            "must be at most 1 MiB",
        ));
    }
    Ok(())
}

/// Longest restart delay a job may ask for; it also keeps `now + delay` from overflowing.
const MAX_RESTART_DELAY_MS: u64 = 24 * 60 * 60 * 1000;

/// Checks resource limits for values that would refuse every job or every restart
/// strategy.
pub fn validate_resource_limits(limits: &ResourceLimits) -> Result<(), Rejection> {
    if limits.max_jobs == 0 {
        return Err(Rejection::invalid("limits.max_jobs", "must be at least 1"));
    }
    if limits.max_spec_bytes == 0 {
        return Err(Rejection::invalid(
            "limits.max_spec_bytes",
            "must be at least 1",
        ));
    }
    if limits.min_restart_delay_ms > MAX_RESTART_DELAY_MS {
        return Err(Rejection::invalid(
            "limits.min_restart_delay_ms",
            format!("must be at most one day ({MAX_RESTART_DELAY_MS} ms), the longest delay a job may ask for"),
        ));
    }
    Ok(())
}

/// Checks a job's restart strategy against the cluster's floor on delays and cap on
/// attempts. Refused rather than clamped: a job that silently restarts less often or
/// fewer times than its spec says would surprise its owner.
pub(super) fn validate_restart_limits(
    spec: &JobSpec,
    limits: &ResourceLimits,
) -> Result<(), Rejection> {
    let RestartStrategy::FixedDelay { attempts, delay_ms } = spec.restart else {
        return Ok(());
    };
    if attempts > limits.max_restart_attempts {
        return Err(Rejection::invalid(
            "spec.restart_strategy.fixed_delay.attempts",
            format!(
                "must be at most {} (cluster limit max_restart_attempts)",
                limits.max_restart_attempts
            ),
        ));
    }
    // With no attempt the delay is never waited, so any value is harmless.
    if attempts > 0 && delay_ms < limits.min_restart_delay_ms {
        return Err(Rejection::invalid(
            "spec.restart_strategy.fixed_delay.delay_ms",
            format!(
                "must be at least {} (cluster limit min_restart_delay_ms)",
                limits.min_restart_delay_ms
            ),
        ));
    }
    Ok(())
}

/// Most TaskManager bindings one token may carry.
pub const MAX_TOKEN_BINDINGS: usize = 64;

/// Checks a token before it is proposed (and again in `apply`): its name, its hash, and
/// that only a TaskManager token names TaskManagers, at least one.
pub fn validate_token(token: &Token) -> Result<(), Rejection> {
    let name_ok = !token.name.is_empty()
        && token.name.len() <= 64
        && token
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !name_ok {
        return Err(Rejection::invalid(
            "name",
            "must be 1-64 characters of A-Z, a-z, 0-9, '.', '_' and '-'",
        ));
    }
    let hash_ok = token.hash.len() == 64
        && token
            .hash
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c));
    if !hash_ok {
        return Err(Rejection::invalid(
            "hash",
            "must be a lower-case hex SHA-256 (64 characters)",
        ));
    }
    match (token.role, token.task_managers.is_empty()) {
        (Role::TaskManager, true) => {
            return Err(Rejection::invalid(
                "task_managers",
                "a taskmanager token must name at least one TaskManager id it may act for",
            ))
        }
        (Role::TaskManager, false) => {}
        (role, false) => {
            return Err(Rejection::invalid(
                "task_managers",
                format!("only a taskmanager token names TaskManagers, not a {role} token"),
            ))
        }
        (_, true) => {}
    }
    if token.task_managers.len() > MAX_TOKEN_BINDINGS {
        return Err(Rejection::invalid(
            "task_managers",
            format!("at most {MAX_TOKEN_BINDINGS} entries"),
        ));
    }
    for (i, binding) in token.task_managers.iter().enumerate() {
        let body = binding.strip_suffix('*').unwrap_or(binding);
        if binding.is_empty() || binding.len() > 256 || body.contains('*') {
            return Err(Rejection::invalid(
                format!("task_managers[{i}]"),
                "must be a TaskManager id, or a prefix followed by one '*' (1-256 characters)",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::types::{EdgeSpec, VertexSpec};

    fn vertex(name: &str, parallelism: u32) -> VertexSpec {
        VertexSpec {
            name: name.into(),
            parallelism,
            task: TaskSpec::Sleep { duration_ms: 10 },
            node_selector: BTreeMap::new(),
        }
    }

    fn spec(vertices: Vec<VertexSpec>, edges: &[(&str, &str)]) -> JobSpec {
        JobSpec {
            name: "wordcount".into(),
            vertices,
            edges: edges
                .iter()
                .map(|(f, t)| EdgeSpec {
                    from: (*f).into(),
                    to: (*t).into(),
                })
                .collect(),
            priority: 0,
            restart: RestartStrategy::NoRestart,
            placement: None,
            labels: BTreeMap::new(),
        }
    }

    fn field_of(r: Result<(), Rejection>) -> String {
        match r {
            Err(Rejection::Invalid { field, .. }) => field,
            other => panic!("expected an invalid-field rejection, got {other:?}"),
        }
    }

    #[test]
    fn a_diamond_dag_is_accepted() {
        let s = spec(
            vec![
                vertex("a", 1),
                vertex("b", 2),
                vertex("c", 2),
                vertex("d", 1),
            ],
            &[("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")],
        );
        assert_eq!(validate_job_spec(&s, &ClusterConfig::default()), Ok(()));
    }

    #[test]
    fn a_cycle_is_rejected_naming_its_vertices() {
        let s = spec(
            vec![vertex("src", 1), vertex("a", 1), vertex("b", 1)],
            &[("src", "a"), ("a", "b"), ("b", "a")],
        );
        match validate_job_spec(&s, &ClusterConfig::default()) {
            Err(Rejection::Invalid { field, reason }) => {
                assert_eq!(field, "spec.edges");
                assert!(reason.contains("cycle"), "{reason}");
                assert!(reason.contains('a') && reason.contains('b'), "{reason}");
                assert!(!reason.contains("src"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn dangling_edges_self_loops_and_duplicates_name_the_edge() {
        let c = ClusterConfig::default();
        let s = spec(vec![vertex("a", 1)], &[("a", "nowhere")]);
        assert_eq!(field_of(validate_job_spec(&s, &c)), "spec.edges[0].to");
        let s = spec(vec![vertex("a", 1)], &[("a", "a")]);
        assert_eq!(field_of(validate_job_spec(&s, &c)), "spec.edges[0]");
        let s = spec(
            vec![vertex("a", 1), vertex("b", 1)],
            &[("a", "b"), ("a", "b")],
        );
        assert_eq!(field_of(validate_job_spec(&s, &c)), "spec.edges[1]");
    }

    #[test]
    fn duplicate_names_and_bad_parallelism_name_the_vertex() {
        let c = ClusterConfig::default();
        let s = spec(vec![vertex("a", 1), vertex("a", 1)], &[]);
        assert_eq!(field_of(validate_job_spec(&s, &c)), "spec.vertices[1].name");
        let s = spec(vec![vertex("a", 1), vertex("b", 0)], &[]);
        assert_eq!(
            field_of(validate_job_spec(&s, &c)),
            "spec.vertices[1].parallelism"
        );
        let s = spec(vec![vertex("a", c.max_parallelism + 1)], &[]);
        assert_eq!(
            field_of(validate_job_spec(&s, &c)),
            "spec.vertices[0].parallelism"
        );
    }

    #[test]
    fn total_task_count_and_string_sizes_are_bounded() {
        let c = ClusterConfig {
            max_tasks_per_job: 10,
            max_string_len: 9,
            ..ClusterConfig::default()
        };
        let s = spec(vec![vertex("a", 6), vertex("b", 6)], &[]);
        assert_eq!(field_of(validate_job_spec(&s, &c)), "spec.vertices");
        let s = spec(vec![vertex("much-too-long", 1)], &[]);
        assert_eq!(field_of(validate_job_spec(&s, &c)), "spec.vertices[0].name");
        let mut s = spec(vec![vertex("a", 1)], &[]);
        s.vertices[0].task = TaskSpec::Command {
            argv: vec![],
            env: BTreeMap::new(),
        };
        assert_eq!(
            field_of(validate_job_spec(&s, &c)),
            "spec.vertices[0].task.command.argv"
        );
    }

    #[test]
    fn registrations_need_slots_within_bounds() {
        let c = ClusterConfig::default();
        let mut tm = TaskManagerSpec {
            id: "tm-1".into(),
            instance: "i1".into(),
            address: "127.0.0.1:1".into(),
            slots: 0,
            labels: BTreeMap::new(),
        };
        assert_eq!(field_of(validate_task_manager(&tm, &c)), "slots");
        tm.slots = c.max_slots_per_task_manager + 1;
        assert_eq!(field_of(validate_task_manager(&tm, &c)), "slots");
        tm.slots = 4;
        assert_eq!(validate_task_manager(&tm, &c), Ok(()));
    }
}
