//! Job spec files (TOML, or JSON for `.json`), as a user writes them, turned into the
//! protobuf spec. Parse errors name the file and the line.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use dispatcher_proto::v1 as pb;

/// A spec file could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct SpecFileError {
    /// The file.
    pub path: String,
    /// What is wrong (with line and column for syntax errors).
    pub message: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SpecFile {
    /// Optional fixed job id (a UUID), so that re-submitting the file is idempotent.
    id: Option<String>,
    name: String,
    #[serde(default)]
    priority: i32,
    placement: Option<PlacementFile>,
    restart: Option<RestartFile>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    vertices: Vec<VertexFile>,
    #[serde(default)]
    edges: Vec<EdgeFile>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum PlacementFile {
    Spread,
    BinPack,
    RoundRobin,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum RestartFile {
    None,
    FixedDelay { attempts: u32, delay_ms: u64 },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VertexFile {
    name: String,
    parallelism: u32,
    task: TaskFile,
    #[serde(default)]
    node_selector: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum TaskFile {
    Command {
        argv: Vec<String>,
        #[serde(default)]
        env: BTreeMap<String, String>,
    },
    Sleep {
        duration_ms: u64,
    },
    Fail {
        after_ms: u64,
        exit_code: i32,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EdgeFile {
    from: String,
    to: String,
}

/// A parsed spec file: the optional fixed id and the spec.
pub struct LoadedSpec {
    /// The `id` the file fixes, if any.
    pub id: Option<String>,
    /// The spec.
    pub spec: pb::JobSpec,
}

/// Reads and parses a spec file.
pub fn load(path: &Path) -> Result<LoadedSpec, SpecFileError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| SpecFileError {
        path: name.clone(),
        message: e.to_string(),
    })?;
    parse(&name, &text)
}

/// Parses spec text; `name` decides the format (`.json` or TOML) and labels errors.
pub fn parse(name: &str, text: &str) -> Result<LoadedSpec, SpecFileError> {
    let err = |message: String| SpecFileError {
        path: name.to_string(),
        message,
    };
    let file: SpecFile = if name.ends_with(".json") {
        serde_json::from_str(text).map_err(|e| err(e.to_string()))?
    } else {
        toml::from_str(text).map_err(|e| err(e.to_string().trim_end().to_string()))?
    };
    Ok(LoadedSpec {
        id: file.id,
        spec: pb::JobSpec {
            name: file.name,
            vertices: file
                .vertices
                .into_iter()
                .map(|v| pb::Vertex {
                    name: v.name,
                    parallelism: v.parallelism,
                    task: Some(pb::Task {
                        kind: Some(match v.task {
                            TaskFile::Command { argv, env } => {
                                pb::task::Kind::Command(pb::CommandTask { argv, env })
                            }
                            TaskFile::Sleep { duration_ms } => {
                                pb::task::Kind::Sleep(pb::SleepTask { duration_ms })
                            }
                            TaskFile::Fail {
                                after_ms,
                                exit_code,
                            } => pb::task::Kind::Fail(pb::FailTask {
                                after_ms,
                                exit_code,
                            }),
                        }),
                    }),
                    node_selector: v.node_selector,
                })
                .collect(),
            edges: file
                .edges
                .into_iter()
                .map(|e| pb::Edge {
                    from: e.from,
                    to: e.to,
                })
                .collect(),
            priority: file.priority,
            restart_strategy: file.restart.map(|r| pb::RestartStrategy {
                kind: Some(match r {
                    RestartFile::None => pb::restart_strategy::Kind::None(pb::NoRestart {}),
                    RestartFile::FixedDelay { attempts, delay_ms } => {
                        pb::restart_strategy::Kind::FixedDelay(pb::FixedDelayRestart {
                            attempts,
                            delay_ms,
                        })
                    }
                }),
            }),
            placement_strategy: match file.placement {
                None => pb::PlacementStrategy::Unspecified,
                Some(PlacementFile::Spread) => pb::PlacementStrategy::Spread,
                Some(PlacementFile::BinPack) => pb::PlacementStrategy::BinPack,
                Some(PlacementFile::RoundRobin) => pb::PlacementStrategy::RoundRobin,
            } as i32,
            labels: file.labels,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOML: &str = r#"
name = "wordcount"
priority = 5
placement = "bin-pack"
restart = { fixed_delay = { attempts = 3, delay_ms = 1000 } }

[[vertices]]
name = "source"
parallelism = 2
task = { sleep = { duration_ms = 500 } }

[[vertices]]
name = "sink"
parallelism = 1
task = { command = { argv = ["/bin/echo", "done"], env = { MODE = "test" } } }
node_selector = { rack = "r1" }

[[edges]]
from = "source"
to = "sink"
"#;

    #[test]
    fn a_toml_spec_parses_into_the_proto_spec() {
        let s = parse("wc.toml", TOML).expect("valid").spec;
        assert_eq!(s.name, "wordcount");
        assert_eq!(s.vertices.len(), 2);
        assert_eq!(s.placement_strategy, pb::PlacementStrategy::BinPack as i32);
        assert_eq!(
            s.vertices[1].node_selector.get("rack").map(String::as_str),
            Some("r1")
        );
        assert!(matches!(
            s.restart_strategy.and_then(|r| r.kind),
            Some(pb::restart_strategy::Kind::FixedDelay(
                pb::FixedDelayRestart {
                    attempts: 3,
                    delay_ms: 1000
                }
            ))
        ));
    }

    #[test]
    fn json_works_too_and_errors_name_the_file_and_line() {
        let json = r#"{"name": "x", "restart": "none", "vertices": [{"name": "a", "parallelism": 1, "task": {"sleep": {"duration_ms": 1}}}]}"#;
        assert!(parse("x.json", json).is_ok());
        let e = parse("bad.toml", "name = \"x\"\nvertices = 3\n")
            .err()
            .expect("error");
        let msg = e.to_string();
        assert!(
            msg.starts_with("bad.toml: ") && msg.contains("line 2"),
            "{msg}"
        );
        let e = parse("typo.toml", "name = \"x\"\nvertexes = []\n")
            .err()
            .expect("error");
        assert!(e.to_string().contains("vertexes"), "{e}");
    }
}
