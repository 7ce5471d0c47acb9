//! What the trace replays (`replay.rs`, `replay_live.rs`) share: how a recorded reply is compared
//! with the simulator's and how events are grouped per job or export.

use std::collections::BTreeMap;

use serde_json::{Value, json};
use vbackup_sim::QmpError;

/// The parts of a `query-named-block-nodes` reply the simulator must reproduce, per named node:
/// driver, read-only, guest size (not for file nodes: their length is the host's allocation),
/// named bitmaps, and the members `extra` names, verbatim (null when absent).
pub fn node_summary(nodes: &Value, extra: &[&str]) -> BTreeMap<String, Value> {
    nodes
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| !n["node-name"].as_str().unwrap().starts_with('#'))
        .map(|n| {
            let bitmaps: Vec<Value> = n["dirty-bitmaps"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter(|b| b.get("name").is_some())
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            let size = if n["drv"] == "file" {
                Value::Null
            } else {
                n["image"]["virtual-size"].clone()
            };
            let mut summary =
                json!({"drv": n["drv"], "ro": n["ro"], "size": size, "bitmaps": bitmaps});
            for member in extra {
                summary[*member] = n.get(*member).cloned().unwrap_or(Value::Null);
            }
            (n["node-name"].as_str().unwrap().to_string(), summary)
        })
        .collect()
}

/// How a replay compares the simulator's reply with the recorded one.
pub struct Compare<'a> {
    /// Members of node records compared besides those [`node_summary`] always compares.
    pub node_members: &'a [&'a str],
    /// Blanks what of a `query-jobs` entry depends on timing.
    pub loosen_job: &'a dyn Fn(&mut Value),
}

impl Compare<'_> {
    /// Asserts that `got` answers `cmd` as the recorded `want` (`{"return": ...}` or
    /// `{"error": ...}`) did: errors exactly, node queries by [`node_summary`], job queries once
    /// loosened, anything else exactly.
    pub fn reply(&self, cmd: &Value, want: &Value, got: &Result<Value, QmpError>) {
        let name = cmd["execute"].as_str().unwrap();
        if let Some(err) = want.get("error") {
            let got = got
                .as_ref()
                .expect_err(&format!("{cmd} should fail with {err}"));
            assert_eq!(got.to_json(), *err, "error of {cmd}");
            return;
        }
        let got = got
            .as_ref()
            .unwrap_or_else(|e| panic!("{cmd} failed on the simulator: {e}"));
        let want = &want["return"];
        match name {
            "query-named-block-nodes" => assert_eq!(
                node_summary(got, self.node_members),
                node_summary(want, self.node_members),
                "reply of {cmd}"
            ),
            "query-jobs" => assert_eq!(self.jobs(got), self.jobs(want), "reply of {cmd}"),
            _ => assert_eq!(got, want, "reply of {cmd}"),
        }
    }

    fn jobs(&self, jobs: &Value) -> Vec<Value> {
        jobs.as_array()
            .unwrap()
            .iter()
            .map(|j| {
                let mut j = j.clone();
                (self.loosen_job)(&mut j);
                j
            })
            .collect()
    }
}

/// The job or export an event is about (`""` for others) and its label: the status of a
/// status change, the name and data (after `loosen(name, data)`) of a job's end, the name of
/// anything else.
pub fn event_label(event: &Value, loosen: impl Fn(&str, &mut Value)) -> (String, String) {
    let name = event["event"].as_str().unwrap();
    let d = &event["data"];
    let (id, label) = match name {
        "JOB_STATUS_CHANGE" => (
            d["id"].as_str().unwrap(),
            d["status"].as_str().unwrap().to_string(),
        ),
        "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED" | "BLOCK_JOB_ERROR" | "BLOCK_JOB_PENDING" => {
            let id = d
                .get("device")
                .or(d.get("id"))
                .and_then(Value::as_str)
                .unwrap();
            let mut data = d.clone();
            loosen(name, &mut data);
            (id, format!("{name} {data}"))
        }
        "BLOCK_EXPORT_DELETED" => (d["id"].as_str().unwrap(), name.to_string()),
        _ => ("", name.to_string()),
    };
    (id.to_string(), label)
}
