//! `transaction`: all actions are prepared in order and take effect together, or, if one
//! fails, every prepared action is rolled back in reverse order and nothing happened.
//!
//! Jobs the transaction creates start at commit in reverse action order, inside the drained
//! section the transaction holds, so each shows running then paused, and all resume at its
//! end. Jobs already running are paused at its start and resumed at its end.

use serde_json::{Value, json};

use crate::args::Args;
use crate::bitmap_commands::Undo;
use crate::errors::QmpError;
use crate::job::Abort;
use crate::qemu::Qemu;

/// One parsed action.
pub(crate) enum Action<'a> {
    BitmapAdd(Args<'a>),
    BitmapRemove(Args<'a>),
    BitmapClear(Args<'a>),
    BitmapEnable(Args<'a>),
    BitmapDisable(Args<'a>),
    BitmapMerge(Args<'a>),
    Backup(Args<'a>),
    Abort,
}

enum Prepared {
    Bitmap(Undo),
    Job(String),
}

const QEMU_ONLY_ACTIONS: &[&str] = &[
    "blockdev-snapshot",
    "blockdev-snapshot-sync",
    "blockdev-snapshot-internal-sync",
    "drive-backup",
];

impl Qemu {
    pub(crate) fn cmd_transaction(&mut self, a: &Args<'_>) -> Result<Value, QmpError> {
        a.only(&["actions", "properties"])?;
        let list = a.array("actions")?;
        let props = a.sub("properties")?;
        props.only(&["completion-mode"])?;
        let grouped =
            props.opt_enum("completion-mode", &["individual", "grouped"])? == Some("grouped");
        let mut actions = Vec::new();
        let mut types = Vec::new();
        for (i, item) in list.iter().enumerate() {
            let act = Args::new(Some(item), &format!("actions[{i}]."))?;
            act.only(&["type", "data"])?;
            let ty = act.str("type")?;
            let data = Args::new(item.get("data"), &format!("actions[{i}].data."))?;
            let action = match ty {
                "block-dirty-bitmap-add" => Action::BitmapAdd(data),
                "block-dirty-bitmap-remove" => Action::BitmapRemove(data),
                "block-dirty-bitmap-clear" => Action::BitmapClear(data),
                "block-dirty-bitmap-enable" => Action::BitmapEnable(data),
                "block-dirty-bitmap-disable" => Action::BitmapDisable(data),
                "block-dirty-bitmap-merge" => Action::BitmapMerge(data),
                "blockdev-backup" => Action::Backup(data),
                "abort" => Action::Abort,
                t if QEMU_ONLY_ACTIONS.contains(&t) => {
                    return Err(QmpError::unsupported(&format!("transaction action '{t}'")));
                }
                t => {
                    return Err(QmpError::invalid_enum_value(
                        &format!("actions[{i}].type"),
                        t,
                    ));
                }
            };
            types.push(ty);
            actions.push(action);
        }
        if grouped
            && let Some(t) = types
                .iter()
                .find(|t| !matches!(**t, "blockdev-backup" | "drive-backup"))
        {
            return Err(QmpError::grouped_unsupported(t));
        }
        self.run_transaction(actions, grouped)
    }

    pub(crate) fn run_transaction(
        &mut self,
        actions: Vec<Action<'_>>,
        grouped: bool,
    ) -> Result<Value, QmpError> {
        let existing = self.running_jobs("");
        self.pause_for_drain(&existing);
        let txn = grouped.then(|| {
            self.st.next_txn += 1;
            self.st.next_txn
        });
        let mut prepared: Vec<Prepared> = Vec::new();
        let mut failure = None;
        for action in &actions {
            let r = match action {
                Action::BitmapAdd(a) => self.bitmap_add(a).map(Prepared::Bitmap),
                Action::BitmapRemove(a) => self.bitmap_remove(a).map(Prepared::Bitmap),
                Action::BitmapClear(a) => self.bitmap_clear(a).map(Prepared::Bitmap),
                Action::BitmapEnable(a) => self.bitmap_set_enabled(a, true).map(Prepared::Bitmap),
                Action::BitmapDisable(a) => self.bitmap_set_enabled(a, false).map(Prepared::Bitmap),
                Action::BitmapMerge(a) => self.bitmap_merge(a).map(Prepared::Bitmap),
                Action::Backup(a) => self.prepare_backup(a, txn).map(Prepared::Job),
                Action::Abort => Err(QmpError::transaction_aborted()),
            };
            match r {
                Ok(p) => prepared.push(p),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failure {
            for p in prepared.into_iter().rev() {
                match p {
                    Prepared::Bitmap(u) => self.undo(u),
                    Prepared::Job(id) => self.abort_job(&id, Abort::Cancelled, None),
                }
            }
            self.resume_after_drain(&existing);
            return Err(e);
        }
        let new_jobs: Vec<String> = prepared
            .iter()
            .rev()
            .filter_map(|p| match p {
                Prepared::Job(id) => Some(id.clone()),
                Prepared::Bitmap(_) => None,
            })
            .collect();
        for id in &new_jobs {
            self.start_job_in_drain(id);
        }
        self.resume_after_drain(&existing);
        self.resume_after_drain(&new_jobs);
        // A job with nothing to copy (an incremental over a clean bitmap) runs to its end in
        // the drain that closes the transaction: QEMU 10 sends its whole event sequence,
        // through `concluded`, before the transaction's reply.
        let now = self.now_ms;
        self.run_jobs_until(now);
        Ok(json!({}))
    }
}

#[cfg(test)]
mod tests {
    use crate::image::FileSystem;
    use crate::qemu::{Config, Qemu};
    use serde_json::json;

    #[test]
    fn snapshot_actions_are_reported_as_not_modelled_and_arguments_are_checked() {
        let mut q = Qemu::negotiated(FileSystem::new(), Config::default());
        let e = q.execute(0, &json!({"execute": "transaction", "arguments": {"actions": [{"type": "blockdev-snapshot-sync", "data": {}}]}})).unwrap_err();
        assert_eq!(
            e.desc,
            "Not supported by the simulated QEMU: transaction action 'blockdev-snapshot-sync'"
        );
        let e = q
            .execute(0, &json!({"execute": "transaction", "arguments": {}}))
            .unwrap_err();
        assert_eq!(e.desc, "Parameter 'actions' is missing");
        let e = q.execute(0, &json!({"execute": "transaction", "arguments": {"actions": [], "properties": {"completion-mode": "all"}}})).unwrap_err();
        assert_eq!(
            e.desc,
            "Parameter 'properties.completion-mode' does not accept value 'all'"
        );
    }
}
