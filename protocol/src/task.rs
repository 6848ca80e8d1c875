//! The durable task lifecycle, as a sans-IO state machine.
//!
//! ```text
//! accepted ──route──▶ routed ──deliver──▶ assigned ──progress──▶ running ──result──▶ completed
//!     │                 ▲  (no agent free: waits)  │ fail / timeout           │ fail
//!     │                 └──────── retry on another agent ◀─────────────────────┘
//!     └─ deadline passes in any live state ──▶ expired        attempts exhausted ──▶ failed
//! ```
//!
//! [`Tasks`] reacts to inputs and returns [`Output`]s. The IO shell must execute them **in
//! order**, and make every [`Output::Persist`] durable before executing any output after it:
//! that is how "each transition is persisted before it is acknowledged" holds.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use crate::keys::{AgentId, NodeId};
use crate::message::{Outcome, TaskId, TaskSpec};
use crate::registry::{Entry, Registry};
use crate::vcv::SkillBloom;

/// Smallest shortlist the ANN index returns per routing decision.
pub const CANDIDATE_SHORTLIST: usize = 64;
use crate::router::{Candidate, RouterParams, assign_batch, rank_with};

/// Most agents whose observed performance is remembered (oldest-updated evicted first).
pub const MAX_AGENT_STATS: usize = 100_000;
/// Latency at which the latency factor of an agent's performance halves, in ms.
pub const LATENCY_HALF_MS: f64 = 10_000.0;

/// Observed behaviour of one agent: the population-level feedback of routing.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AgentStats {
    /// Attempts that returned a result.
    pub successes: u32,
    /// Attempts that failed or timed out.
    pub failures: u32,
    /// Exponentially weighted mean latency of successful attempts, in ms.
    pub latency_ms: f64,
    /// Last update, ms since the epoch.
    pub updated_ms: u64,
}

impl AgentStats {
    /// `perf` in `(0, 1]`: the Laplace-smoothed success rate times a latency factor
    /// `1 / (1 + latency / LATENCY_HALF_MS)`. A new agent starts at 0.5 × 1.
    pub fn perf(&self) -> f32 {
        let success = (f64::from(self.successes) + 1.0)
            / (f64::from(self.successes) + f64::from(self.failures) + 2.0);
        (success / (1.0 + self.latency_ms / LATENCY_HALF_MS)) as f32
    }
}

/// Where a task stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TaskState {
    /// Accepted and persisted; not yet routed.
    Accepted,
    /// Routed, waiting for an agent with spare capacity.
    Routed,
    /// Handed to an agent.
    Assigned,
    /// The agent reported progress.
    Running,
    /// The agent returned a result.
    Completed,
    /// Every attempt failed.
    Failed,
    /// The deadline passed first.
    Expired,
}

impl TaskState {
    /// Every state, in lifecycle order.
    pub const ALL: [TaskState; 7] = [
        TaskState::Accepted,
        TaskState::Routed,
        TaskState::Assigned,
        TaskState::Running,
        TaskState::Completed,
        TaskState::Failed,
        TaskState::Expired,
    ];

    /// True for completed, failed and expired.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TaskState::Completed | TaskState::Failed | TaskState::Expired
        )
    }

    /// The lowercase name used in APIs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Accepted => "accepted",
            TaskState::Routed => "routed",
            TaskState::Assigned => "assigned",
            TaskState::Running => "running",
            TaskState::Completed => "completed",
            TaskState::Failed => "failed",
            TaskState::Expired => "expired",
        }
    }
}

/// Who asked, and where answers go.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requester {
    /// The requester's authenticated principal.
    pub principal: String,
    /// The requester's own id for the request (idempotency key).
    pub request_id: String,
    /// Where replies are published.
    pub reply_topic: String,
    /// MQTT 5 correlation data to echo.
    pub correlation: Option<Vec<u8>>,
}

/// Everything the node keeps about one task; persisted on every transition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    /// The task.
    pub spec: TaskSpec,
    /// Who asked.
    pub requester: Requester,
    /// Current state.
    pub state: TaskState,
    /// The agent of the current (or last) attempt.
    pub agent: Option<AgentId>,
    /// Attempts started so far.
    pub attempts: u32,
    /// Agents already tried (never offered the task again).
    pub tried: Vec<AgentId>,
    /// When the current attempt times out, ms since the epoch.
    pub attempt_deadline_ms: u64,
    /// The final outcome, once known.
    pub outcome: Option<Outcome>,
    /// True once the final outcome was handed to the requester's reply topic.
    pub delivered: bool,
    /// Last transition, ms since the epoch.
    pub updated_at_ms: u64,
}

/// What a requester is told.
#[derive(Clone, Debug, PartialEq)]
pub enum TaskEvent {
    /// The task was accepted (also the answer to a repeated submit of a live task).
    Accepted {
        /// Current state.
        state: TaskState,
    },
    /// The state changed.
    Status {
        /// New state.
        state: TaskState,
        /// The agent, if any.
        agent: Option<AgentId>,
        /// Why, for waits and retries.
        note: Option<String>,
    },
    /// The agent reported progress.
    Progress {
        /// The agent.
        agent: AgentId,
        /// 0–100.
        percent: u8,
        /// Free text.
        note: String,
    },
    /// The task ended.
    Finished {
        /// Completed, failed or expired.
        state: TaskState,
        /// The last agent, if any.
        agent: Option<AgentId>,
        /// The outcome; for expiry, a `Failed` with the reason.
        outcome: Outcome,
    },
}

/// An action for the IO shell.
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    /// Make this record durable before executing any later output.
    Persist(Box<TaskRecord>),
    /// Hand the task to `agent` (on this node: its inbox; elsewhere: an offer to its node).
    Deliver {
        /// The agent.
        agent: AgentId,
        /// Its VCV version at routing time.
        agent_version: u64,
        /// The task.
        task: Box<TaskSpec>,
        /// Attempt number, from 1.
        attempt: u32,
    },
    /// Tell the requester.
    Notify {
        /// Who and where.
        requester: Requester,
        /// The task.
        task: TaskId,
        /// What happened.
        event: TaskEvent,
    },
}

/// Task-engine parameters.
#[derive(Clone, Copy, Debug)]
pub struct TaskParams {
    /// Routing parameters.
    pub router: RouterParams,
    /// Attempts before a task fails.
    pub max_attempts: u32,
    /// How long one attempt may run before it is retried elsewhere, in ms.
    pub attempt_timeout_ms: u64,
    /// Most live (non-final) tasks held; further submits are refused.
    pub max_live_tasks: usize,
}

/// Why a submit was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// Too many live tasks.
    #[error("node overloaded: {0} live tasks")]
    Overloaded(usize),
    /// The deadline already passed.
    #[error("deadline already passed")]
    DeadlinePassed,
}

/// The task engine of one node: every task it accepted, and the load it put on agents.
#[derive(Debug)]
pub struct Tasks {
    node: NodeId,
    params: TaskParams,
    tasks: BTreeMap<TaskId, TaskRecord>,
    inflight: HashMap<AgentId, u16>,
    remote_load: HashMap<AgentId, u16>,
    census: Census,
    stats: HashMap<AgentId, AgentStats>,
    attempt_started: HashMap<TaskId, u64>,
}

impl Tasks {
    /// An empty engine for `node`.
    pub fn new(node: NodeId, params: TaskParams) -> Self {
        Self {
            node,
            params,
            tasks: BTreeMap::new(),
            inflight: HashMap::new(),
            remote_load: HashMap::new(),
            census: Census::default(),
            stats: HashMap::new(),
            attempt_started: HashMap::new(),
        }
    }

    /// Reloads persisted records after a restart. Returns the outputs that resume them:
    /// undelivered final results are re-notified; live tasks re-enter on the next [`tick`](Self::tick).
    pub fn restore(&mut self, records: impl IntoIterator<Item = TaskRecord>) -> Vec<Output> {
        let mut out = Vec::new();
        for r in records {
            if !r.state.is_final() {
                if matches!(r.state, TaskState::Assigned | TaskState::Running)
                    && let Some(a) = &r.agent
                {
                    *self.inflight.entry(a.clone()).or_default() += 1;
                }
            } else if !r.delivered {
                out.push(finished(&r));
            }
            let (id, state) = (r.spec.id, r.state);
            if let Some(old) = self.tasks.insert(id, r) {
                self.census.leave(id, old.state);
            }
            self.census.enter(id, state);
        }
        out
    }

    /// The record of `id`.
    pub fn get(&self, id: &TaskId) -> Option<&TaskRecord> {
        self.tasks.get(id)
    }

    /// Number of tasks per state (kept as the states change: O(1)).
    pub fn counts(&self) -> HashMap<TaskState, usize> {
        debug_assert!(self.census_matches(), "task census out of step");
        TaskState::ALL
            .iter()
            .map(|s| (*s, self.census.by_state[*s as usize]))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// Whether the census agrees with a full recount (O(all tasks): debug checks and tests).
    #[doc(hidden)]
    pub fn census_matches(&self) -> bool {
        let mut by_state = [0usize; TaskState::ALL.len()];
        for r in self.tasks.values() {
            by_state[r.state as usize] += 1;
        }
        let live: BTreeSet<TaskId> = self
            .tasks
            .values()
            .filter(|r| !r.state.is_final())
            .map(|r| r.spec.id)
            .collect();
        by_state == self.census.by_state && live == self.census.live
    }

    /// Tasks this node assigned to `agent` and not yet finished, plus reported remote load.
    pub fn load(&self, agent: &AgentId) -> u16 {
        self.inflight.get(agent).copied().unwrap_or(0)
            + self.remote_load.get(agent).copied().unwrap_or(0)
    }

    /// Records the load another node reported for one of its agents.
    pub fn set_remote_load(&mut self, agent: AgentId, inflight: u16) {
        if inflight == 0 {
            self.remote_load.remove(&agent);
        } else {
            self.remote_load.insert(agent, inflight);
        }
    }

    /// Accepts a task. Idempotent: a spec whose id is known returns the current state (and the
    /// result, if final) instead of a second task.
    pub fn submit(
        &mut self,
        spec: TaskSpec,
        requester: Requester,
        registry: &Registry,
        now_ms: u64,
    ) -> Result<Vec<Output>, SubmitError> {
        if let Some(r) = self.tasks.get(&spec.id) {
            let mut out = vec![notify(r, TaskEvent::Accepted { state: r.state })];
            if r.state.is_final() {
                out.push(finished(r));
            }
            return Ok(out);
        }
        if spec.deadline_ms <= now_ms {
            return Err(SubmitError::DeadlinePassed);
        }
        let live = self.census.live.len();
        if live >= self.params.max_live_tasks {
            return Err(SubmitError::Overloaded(live));
        }
        let record = TaskRecord {
            spec,
            requester,
            state: TaskState::Accepted,
            agent: None,
            attempts: 0,
            tried: Vec::new(),
            attempt_deadline_ms: 0,
            outcome: None,
            delivered: false,
            updated_at_ms: now_ms,
        };
        let id = record.spec.id;
        let mut out = vec![
            Output::Persist(Box::new(record.clone())),
            notify(
                &record,
                TaskEvent::Accepted {
                    state: TaskState::Accepted,
                },
            ),
        ];
        self.tasks.insert(id, record);
        self.census.enter(id, TaskState::Accepted);
        self.route(id, registry, now_ms, &mut out);
        Ok(out)
    }

    /// An agent reported progress on `task`.
    pub fn progress(
        &mut self,
        agent: &AgentId,
        task: TaskId,
        percent: u8,
        note: String,
        now_ms: u64,
    ) -> Vec<Output> {
        let Some(r) = self.tasks.get_mut(&task) else {
            return vec![];
        };
        if r.agent.as_ref() != Some(agent)
            || !matches!(r.state, TaskState::Assigned | TaskState::Running)
        {
            return vec![];
        }
        let mut out = Vec::new();
        if r.state == TaskState::Assigned {
            r.state = TaskState::Running;
            self.census
                .moved(task, TaskState::Assigned, TaskState::Running);
            r.updated_at_ms = now_ms;
            out.push(Output::Persist(Box::new(r.clone())));
        }
        out.push(notify(
            r,
            TaskEvent::Progress {
                agent: agent.clone(),
                percent,
                note,
            },
        ));
        out
    }

    /// An agent (or its node) returned the outcome of `task`. Results from agents that do not
    /// hold the task, or for final tasks, are ignored (late, duplicate or spoofed).
    pub fn result(
        &mut self,
        agent: &AgentId,
        task: TaskId,
        outcome: Outcome,
        registry: &Registry,
        now_ms: u64,
    ) -> Vec<Output> {
        let Some(r) = self.tasks.get(&task) else {
            return vec![];
        };
        if r.agent.as_ref() != Some(agent)
            || !matches!(r.state, TaskState::Assigned | TaskState::Running)
        {
            return vec![];
        }
        self.release(agent);
        self.observe(agent, task, matches!(outcome, Outcome::Ok(_)), now_ms);
        let mut out = Vec::new();
        match outcome {
            Outcome::Ok(_) => self.finish(task, TaskState::Completed, outcome, now_ms, &mut out),
            Outcome::Failed(reason) => self.retry(
                task,
                format!("agent {agent} failed: {reason}"),
                registry,
                now_ms,
                &mut out,
            ),
        }
        out
    }

    /// The hosting node declined the offer of `task` to `agent`: try the next candidate.
    pub fn declined(
        &mut self,
        agent: &AgentId,
        task: TaskId,
        reason: &str,
        registry: &Registry,
        now_ms: u64,
    ) -> Vec<Output> {
        let held = self
            .tasks
            .get(&task)
            .is_some_and(|r| r.agent.as_ref() == Some(agent) && r.state == TaskState::Assigned);
        if !held {
            return vec![];
        }
        self.release(agent);
        let mut out = Vec::new();
        self.retry(
            task,
            format!("agent {agent} declined: {reason}"),
            registry,
            now_ms,
            &mut out,
        );
        out
    }

    /// Re-sends every task currently held by `agent` (assigned or running), same attempt. The
    /// shell calls it when an agent (re)connects and advertises: after a node restart the broker
    /// has forgotten every undelivered message, so the agent may never have seen its tasks.
    /// Agents must treat a repeated `task_id` as the same task.
    pub fn redeliver(&self, agent: &AgentId) -> Vec<Output> {
        self.census
            .live
            .iter()
            .filter_map(|id| self.tasks.get(id))
            .filter(|r| {
                r.agent.as_ref() == Some(agent)
                    && matches!(r.state, TaskState::Assigned | TaskState::Running)
            })
            .map(|r| Output::Deliver {
                agent: agent.clone(),
                agent_version: 0,
                task: Box::new(r.spec.clone()),
                attempt: r.attempts,
            })
            .collect()
    }

    /// The shell handed the final result to the requester's reply topic.
    pub fn mark_delivered(&mut self, task: TaskId) -> Vec<Output> {
        match self.tasks.get_mut(&task) {
            Some(r) if r.state.is_final() && !r.delivered => {
                r.delivered = true;
                vec![Output::Persist(Box::new(r.clone()))]
            }
            _ => vec![],
        }
    }

    /// Advances time: expires tasks past their deadline, retries attempts that timed out, and
    /// routes waiting tasks. Work per call is bounded by the number of live tasks.
    pub fn tick(&mut self, registry: &Registry, now_ms: u64) -> Vec<Output> {
        debug_assert!(self.census_matches(), "task census out of step");
        let mut out = Vec::new();
        let live: Vec<(TaskId, TaskState, u64, u64, Option<AgentId>)> = self
            .census
            .live
            .iter()
            .filter_map(|id| self.tasks.get(id))
            .map(|r| {
                (
                    r.spec.id,
                    r.state,
                    r.spec.deadline_ms,
                    r.attempt_deadline_ms,
                    r.agent.clone(),
                )
            })
            .collect();
        let mut waiting = Vec::new();
        for (id, state, deadline, attempt_deadline, agent) in live {
            let running = matches!(state, TaskState::Assigned | TaskState::Running);
            if now_ms >= deadline {
                if running && let Some(a) = &agent {
                    self.release(a);
                }
                self.finish(
                    id,
                    TaskState::Expired,
                    Outcome::Failed("deadline passed".into()),
                    now_ms,
                    &mut out,
                );
            } else if running && now_ms >= attempt_deadline {
                if let Some(a) = &agent {
                    self.release(a);
                    self.observe(a, id, false, now_ms);
                }
                let who = agent.map(|a| a.to_string()).unwrap_or_default();
                self.retry(
                    id,
                    format!("agent {who} timed out"),
                    registry,
                    now_ms,
                    &mut out,
                );
            } else if matches!(state, TaskState::Accepted | TaskState::Routed) {
                waiting.push(id);
            }
        }
        if waiting.len() == 1 {
            self.route(waiting[0], registry, now_ms, &mut out);
        } else {
            for batch in waiting.chunks(crate::router::MAX_ASSIGN_BATCH) {
                self.route_batch(batch, registry, now_ms, &mut out);
            }
        }
        out
    }

    /// The observed performance of `agent` (FoA's `perf`), 0.5 when nothing is known.
    pub fn perf(&self, agent: &AgentId) -> f32 {
        self.stats.get(agent).map_or(0.5, AgentStats::perf)
    }

    /// The observed statistics of `agent`.
    pub fn stats(&self, agent: &AgentId) -> Option<&AgentStats> {
        self.stats.get(agent)
    }

    fn observe(&mut self, agent: &AgentId, task: TaskId, ok: bool, now_ms: u64) {
        let started = self.attempt_started.remove(&task);
        if !self.stats.contains_key(agent) && self.stats.len() >= MAX_AGENT_STATS {
            let oldest = self
                .stats
                .iter()
                .min_by_key(|(_, s)| s.updated_ms)
                .map(|(a, _)| a.clone());
            if let Some(a) = oldest {
                self.stats.remove(&a);
            }
        }
        let s = self.stats.entry(agent.clone()).or_default();
        s.updated_ms = now_ms;
        if ok {
            s.successes = s.successes.saturating_add(1);
            if let Some(t) = started {
                let ms = now_ms.saturating_sub(t) as f64;
                s.latency_ms = if s.successes == 1 {
                    ms
                } else {
                    0.8 * s.latency_ms + 0.2 * ms
                };
            }
        } else {
            s.failures = s.failures.saturating_add(1);
        }
    }

    fn candidates(&self, id: TaskId, registry: &Registry) -> Vec<Candidate> {
        let Some(r) = self.tasks.get(&id) else {
            return Vec::new();
        };
        // The hard gates run inside the index scan; the index returns a generous shortlist
        // because α has more factors than the cosine it ranks by.
        let bloom = SkillBloom::of(r.spec.skills.iter().map(String::as_str));
        let gate = |e: &Entry| {
            !r.tried.contains(&e.vcv.agent)
                && e.vcv.skill_bloom.may_contain_all(&bloom)
                && r.spec
                    .policies
                    .iter()
                    .all(|p| e.vcv.policies.binary_search(p).is_ok())
        };
        let k = (self.params.router.top_k * 8).max(CANDIDATE_SHORTLIST);
        let shortlist = registry.candidates(&r.spec.requirement, k, &gate);
        rank_with(
            &r.spec,
            shortlist.into_iter().map(|e| &e.vcv),
            |a| self.load(a),
            |a| self.perf(a),
            &r.tried,
            &self.params.router,
        )
    }

    /// Routes several waiting tasks together with FoA Eq. 3 ([`assign_batch`]): the total score
    /// is maximised under every agent's free capacity, instead of first-come-first-served.
    fn route_batch(
        &mut self,
        ids: &[TaskId],
        registry: &Registry,
        now_ms: u64,
        out: &mut Vec<Output>,
    ) {
        let options: Vec<Vec<Candidate>> = ids
            .iter()
            .map(|id| self.candidates(*id, registry))
            .collect();
        let caps: HashMap<&AgentId, u16> = registry
            .iter()
            .map(|e| {
                (
                    &e.vcv.agent,
                    e.vcv
                        .resources
                        .capacity
                        .max(1)
                        .saturating_sub(self.load(&e.vcv.agent)),
                )
            })
            .collect();
        let chosen = assign_batch(&options, |a| caps.get(a).copied().unwrap_or(0));
        for ((id, opts), choice) in ids.iter().zip(options).zip(chosen) {
            match choice.and_then(|i| opts.into_iter().nth(i)) {
                Some(c) => self.assign(*id, c, now_ms, out),
                None => self.mark_waiting(*id, now_ms, out),
            }
        }
    }

    /// Drops final, delivered tasks last updated before `before_ms`. Returns their ids, so the
    /// shell can delete them from storage.
    pub fn prune(&mut self, before_ms: u64) -> Vec<TaskId> {
        let gone: Vec<TaskId> = self
            .tasks
            .values()
            .filter(|r| r.state.is_final() && r.delivered && r.updated_at_ms < before_ms)
            .map(|r| r.spec.id)
            .collect();
        for id in &gone {
            if let Some(r) = self.tasks.remove(id) {
                self.census.leave(*id, r.state);
            }
        }
        gone
    }

    fn release(&mut self, agent: &AgentId) {
        if let Some(n) = self.inflight.get_mut(agent) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.inflight.remove(agent);
            }
        }
    }

    fn retry(
        &mut self,
        id: TaskId,
        why: String,
        registry: &Registry,
        now_ms: u64,
        out: &mut Vec<Output>,
    ) {
        let Some(r) = self.tasks.get_mut(&id) else {
            return;
        };
        if r.attempts >= self.params.max_attempts {
            let reason = format!("{why}; gave up after {} attempts", r.attempts);
            self.finish(id, TaskState::Failed, Outcome::Failed(reason), now_ms, out);
            return;
        }
        self.census.moved(id, r.state, TaskState::Routed);
        r.state = TaskState::Routed;
        r.agent = None;
        r.updated_at_ms = now_ms;
        out.push(Output::Persist(Box::new(r.clone())));
        out.push(notify(
            r,
            TaskEvent::Status {
                state: TaskState::Routed,
                agent: None,
                note: Some(why),
            },
        ));
        self.route(id, registry, now_ms, out);
    }

    fn route(&mut self, id: TaskId, registry: &Registry, now_ms: u64, out: &mut Vec<Output>) {
        match self.candidates(id, registry).into_iter().next() {
            Some(best) => self.assign(id, best, now_ms, out),
            None => self.mark_waiting(id, now_ms, out),
        }
    }

    fn mark_waiting(&mut self, id: TaskId, now_ms: u64, out: &mut Vec<Output>) {
        let Some(r) = self.tasks.get_mut(&id) else {
            return;
        };
        if r.state != TaskState::Accepted {
            return;
        }
        self.census
            .moved(id, TaskState::Accepted, TaskState::Routed);
        r.state = TaskState::Routed;
        r.updated_at_ms = now_ms;
        out.push(Output::Persist(Box::new(r.clone())));
        out.push(notify(
            r,
            TaskEvent::Status {
                state: TaskState::Routed,
                agent: None,
                note: Some("waiting: no matching agent with spare capacity".into()),
            },
        ));
    }

    fn assign(&mut self, id: TaskId, best: Candidate, now_ms: u64, out: &mut Vec<Output>) {
        let timeout = self.params.attempt_timeout_ms;
        let Some(r) = self.tasks.get_mut(&id) else {
            return;
        };
        *self.inflight.entry(best.agent.clone()).or_default() += 1;
        self.attempt_started.insert(id, now_ms);
        self.census.moved(id, r.state, TaskState::Assigned);
        r.state = TaskState::Assigned;
        r.agent = Some(best.agent.clone());
        r.attempts += 1;
        r.tried.push(best.agent.clone());
        r.attempt_deadline_ms = now_ms.saturating_add(timeout).min(r.spec.deadline_ms);
        r.updated_at_ms = now_ms;
        out.push(Output::Persist(Box::new(r.clone())));
        out.push(Output::Deliver {
            agent: best.agent.clone(),
            agent_version: best.version,
            task: Box::new(r.spec.clone()),
            attempt: r.attempts,
        });
        out.push(notify(
            r,
            TaskEvent::Status {
                state: TaskState::Assigned,
                agent: Some(best.agent),
                note: None,
            },
        ));
    }

    fn finish(
        &mut self,
        id: TaskId,
        state: TaskState,
        outcome: Outcome,
        now_ms: u64,
        out: &mut Vec<Output>,
    ) {
        let Some(r) = self.tasks.get_mut(&id) else {
            return;
        };
        debug_assert!(!r.state.is_final(), "finishing a final task");
        self.census.moved(id, r.state, state);
        r.state = state;
        r.outcome = Some(outcome);
        r.updated_at_ms = now_ms;
        out.push(Output::Persist(Box::new(r.clone())));
        out.push(finished(r));
    }

    /// This engine's node.
    pub fn node(&self) -> NodeId {
        self.node
    }
}

/// Tasks per state, and the ids of the live (non-final) ones, kept in step with every state
/// change so that counting and ticking cost O(live tasks), not O(all tasks kept).
#[derive(Debug, Default)]
struct Census {
    by_state: [usize; TaskState::ALL.len()],
    live: BTreeSet<TaskId>,
}

impl Census {
    fn enter(&mut self, id: TaskId, state: TaskState) {
        self.by_state[state as usize] += 1;
        if !state.is_final() {
            self.live.insert(id);
        }
    }

    fn leave(&mut self, id: TaskId, state: TaskState) {
        let n = &mut self.by_state[state as usize];
        *n = n.saturating_sub(1);
        if !state.is_final() {
            self.live.remove(&id);
        }
    }

    fn moved(&mut self, id: TaskId, from: TaskState, to: TaskState) {
        self.leave(id, from);
        self.enter(id, to);
    }
}

fn notify(r: &TaskRecord, event: TaskEvent) -> Output {
    Output::Notify {
        requester: r.requester.clone(),
        task: r.spec.id,
        event,
    }
}

fn finished(r: &TaskRecord) -> Output {
    notify(
        r,
        TaskEvent::Finished {
            state: r.state,
            agent: r.agent.clone(),
            outcome: r
                .outcome
                .clone()
                .unwrap_or(Outcome::Failed("unknown".into())),
        },
    )
}
