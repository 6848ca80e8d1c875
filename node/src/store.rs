//! Durable node state in sled: task records and this node's own capability vectors.
//!
//! Every write goes through [`Store::apply`], which the node calls once per batch of events and
//! follows with one [`Store::flush`]: a group commit. Nothing is acknowledged before its batch is
//! flushed.

use std::path::Path;

use anyhow::Context;
use fedmesh_protocol::TaskId;
use fedmesh_protocol::task::TaskRecord;

/// The node's sled database.
#[derive(Debug, Clone)]
pub struct Store {
    db: sled::Db,
    tasks: sled::Tree,
    vcvs: sled::Tree,
    hosted: sled::Tree,
}

/// One pending write.
#[derive(Debug)]
pub enum Write {
    /// Insert or replace a task record.
    Task(Box<TaskRecord>),
    /// Delete a task record.
    DeleteTask(TaskId),
    /// Store this node's signed VCV envelope for an agent.
    Vcv { name: String, envelope: Vec<u8> },
    /// Delete an agent's VCV.
    DeleteVcv(String),
    /// Insert or replace a hosted task (a task this node runs for another node).
    Hosted(TaskId, Vec<u8>),
    /// Delete a hosted task.
    DeleteHosted(TaskId),
}

impl Store {
    /// Opens (or creates) the database under `data_dir/db`.
    pub fn open(data_dir: &Path) -> anyhow::Result<Self> {
        let path = data_dir.join("db");
        let db = sled::Config::new()
            .path(&path)
            // Less eager segment cleaning than `LowSpace`: 12 % more tasks/s in the local
            // round trip (BENCHMARKS.md); the task store is pruned, so space stays bounded.
            .mode(sled::Mode::HighThroughput)
            .open()
            .with_context(|| {
                format!(
                    "opening the database at {} (is another node using this data directory?)",
                    path.display()
                )
            })?;
        Ok(Self {
            tasks: db.open_tree("tasks")?,
            vcvs: db.open_tree("vcvs")?,
            hosted: db.open_tree("hosted")?,
            db,
        })
    }

    /// The underlying database (the audit log shares it).
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    /// Applies writes (not yet durable: call [`Store::flush`]).
    pub fn apply(&self, writes: impl IntoIterator<Item = Write>) -> anyhow::Result<()> {
        for w in writes {
            match w {
                Write::Task(r) => {
                    let bytes = postcard::to_allocvec(&*r).context("encoding a task record")?;
                    self.tasks.insert(r.spec.id.0, bytes)?;
                }
                Write::DeleteTask(id) => {
                    self.tasks.remove(id.0)?;
                }
                Write::Vcv { name, envelope } => {
                    self.vcvs.insert(name.as_bytes(), envelope)?;
                }
                Write::DeleteVcv(name) => {
                    self.vcvs.remove(name.as_bytes())?;
                }
                Write::Hosted(id, bytes) => {
                    self.hosted.insert(id.0, bytes)?;
                }
                Write::DeleteHosted(id) => {
                    self.hosted.remove(id.0)?;
                }
            }
        }
        Ok(())
    }

    /// Makes everything applied so far durable.
    pub async fn flush(&self) -> anyhow::Result<()> {
        self.db
            .flush_async()
            .await
            .context("flushing the database")?;
        Ok(())
    }

    /// Every stored task record. Records that fail to decode are logged and skipped (never fatal).
    pub fn tasks(&self) -> Vec<TaskRecord> {
        self.tasks
            .iter()
            .filter_map(|kv| match kv {
                Ok((k, v)) => match postcard::from_bytes::<TaskRecord>(&v) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        tracing::error!(key = ?k, error = %e, "skipping an undecodable task record");
                        None
                    }
                },
                Err(e) => {
                    tracing::error!(error = %e, "reading task records");
                    None
                }
            })
            .collect()
    }

    /// Every stored VCV envelope of this node's agents.
    pub fn vcvs(&self) -> Vec<Vec<u8>> {
        self.vcvs
            .iter()
            .filter_map(|kv| kv.ok().map(|(_, v)| v.to_vec()))
            .collect()
    }
}

impl Store {
    /// Every stored hosted-task record (encoded by the node).
    pub fn hosted(&self) -> Vec<Vec<u8>> {
        self.hosted
            .iter()
            .filter_map(|kv| kv.ok().map(|(_, v)| v.to_vec()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedmesh_protocol::sample;
    use fedmesh_protocol::task::{Requester, TaskState};

    #[tokio::test]
    async fn task_records_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = sample::task(&sample::key(1), "r", 1);
        let record = TaskRecord {
            spec: spec.clone(),
            requester: Requester {
                principal: "p".into(),
                request_id: "r".into(),
                reply_topic: "t".into(),
                correlation: None,
            },
            state: TaskState::Accepted,
            agent: None,
            attempts: 0,
            tried: vec![],
            attempt_deadline_ms: 0,
            outcome: None,
            delivered: false,
            updated_at_ms: 1,
        };
        {
            let s = Store::open(dir.path()).expect("open");
            s.apply([
                Write::Task(Box::new(record.clone())),
                Write::Vcv {
                    name: "a".into(),
                    envelope: vec![1, 2],
                },
            ])
            .expect("apply");
            s.flush().await.expect("flush");
        }
        let s = Store::open(dir.path()).expect("reopen");
        assert_eq!(s.tasks(), vec![record]);
        assert_eq!(s.vcvs(), vec![vec![1, 2]]);
        s.apply([Write::DeleteTask(spec.id)]).expect("delete");
        assert!(s.tasks().is_empty());
    }
}
