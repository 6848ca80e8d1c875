//! Task state machine: inject events, assert on the outputs.

use fedmesh_protocol::registry::{Entry, Registry};
use fedmesh_protocol::router::RouterParams;
use fedmesh_protocol::task::{Output, Requester, TaskEvent, TaskParams, TaskState, Tasks};
use fedmesh_protocol::{AgentId, ContentId, Outcome, TaskSpec, sample};

const NOW: u64 = 1_790_000_000_000;

fn params() -> TaskParams {
    TaskParams {
        router: RouterParams::default(),
        max_attempts: 2,
        attempt_timeout_ms: 1000,
        max_live_tasks: 10,
    }
}

fn registry(names: &[&str]) -> Registry {
    let mut r = Registry::new(100);
    let task = sample::task(&sample::key(1), "x", NOW);
    for n in names {
        let mut v = sample::vcv(&sample::key(1), n, 1, NOW);
        v.capability = task.requirement.clone();
        v.resources.capacity = 1;
        r.insert(
            Entry {
                vcv: v,
                id: ContentId([0; 32]),
                envelope: vec![],
            },
            NOW,
        )
        .expect("insert");
    }
    r
}

fn requester() -> Requester {
    Requester {
        principal: "req".into(),
        request_id: "r1".into(),
        reply_topic: "t".into(),
        correlation: None,
    }
}

fn delivered_to(out: &[Output]) -> Option<AgentId> {
    out.iter().find_map(|o| match o {
        Output::Deliver { agent, .. } => Some(agent.clone()),
        _ => None,
    })
}

fn final_event(out: &[Output]) -> Option<(TaskState, Outcome)> {
    out.iter().find_map(|o| match o {
        Output::Notify {
            event: TaskEvent::Finished { state, outcome, .. },
            ..
        } => Some((*state, outcome.clone())),
        _ => None,
    })
}

/// Every output batch persists a state before it tells anyone about it.
fn assert_persist_first(out: &[Output]) {
    if let Some(first_effect) = out.iter().position(|o| !matches!(o, Output::Persist(_))) {
        let persisted_after = out[first_effect..]
            .iter()
            .any(|o| matches!(o, Output::Persist(_)));
        let any_before = out[..first_effect]
            .iter()
            .any(|o| matches!(o, Output::Persist(_)));
        assert!(
            any_before || !persisted_after || out.is_empty(),
            "effect before persist: {out:?}"
        );
    }
    assert!(
        !matches!(out.first(), Some(Output::Deliver { .. })),
        "deliver before persist"
    );
}

fn spec() -> TaskSpec {
    sample::task(&sample::key(1), "r1", NOW)
}

#[test]
fn submit_routes_and_result_completes() {
    let reg = registry(&["a"]);
    let mut t = Tasks::new(sample::key(1).node_id(), params());
    let out = t.submit(spec(), requester(), &reg, NOW).expect("submit");
    assert_persist_first(&out);
    let agent = delivered_to(&out).expect("delivered");
    assert_eq!(
        t.get(&spec().id).map(|r| r.state),
        Some(TaskState::Assigned)
    );
    let out = t.progress(&agent, spec().id, 50, "half".into(), NOW + 1);
    assert_persist_first(&out);
    assert_eq!(t.get(&spec().id).map(|r| r.state), Some(TaskState::Running));
    let out = t.result(
        &agent,
        spec().id,
        Outcome::Ok(b"42".to_vec()),
        &reg,
        NOW + 2,
    );
    assert_persist_first(&out);
    assert_eq!(
        final_event(&out),
        Some((TaskState::Completed, Outcome::Ok(b"42".to_vec())))
    );
    assert_eq!(t.load(&agent), 0);
    // A late duplicate result changes nothing.
    assert!(
        t.result(
            &agent,
            spec().id,
            Outcome::Ok(b"43".to_vec()),
            &reg,
            NOW + 3
        )
        .is_empty()
    );
}

#[test]
fn submit_is_idempotent() {
    let reg = registry(&["a"]);
    let mut t = Tasks::new(sample::key(1).node_id(), params());
    t.submit(spec(), requester(), &reg, NOW).expect("submit");
    let again = t.submit(spec(), requester(), &reg, NOW).expect("again");
    assert!(
        delivered_to(&again).is_none(),
        "second submit must not run the task again"
    );
    assert!(again.iter().all(|o| !matches!(o, Output::Persist(_))));
    assert_eq!(t.counts().values().sum::<usize>(), 1);
}

#[test]
fn failure_retries_on_another_agent_then_gives_up() {
    let reg = registry(&["a", "b"]);
    let mut t = Tasks::new(sample::key(1).node_id(), params());
    let first =
        delivered_to(&t.submit(spec(), requester(), &reg, NOW).expect("submit")).expect("first");
    let out = t.result(
        &first,
        spec().id,
        Outcome::Failed("boom".into()),
        &reg,
        NOW + 1,
    );
    let second = delivered_to(&out).expect("retried");
    assert_ne!(first, second);
    let out = t.result(
        &second,
        spec().id,
        Outcome::Failed("boom".into()),
        &reg,
        NOW + 2,
    );
    let (state, outcome) = final_event(&out).expect("final");
    assert_eq!(state, TaskState::Failed);
    assert!(matches!(outcome, Outcome::Failed(r) if r.contains("gave up after 2 attempts")));
}

#[test]
fn attempt_timeout_retries_and_deadline_expires() {
    let reg = registry(&["a", "b"]);
    let mut t = Tasks::new(sample::key(1).node_id(), params());
    let first =
        delivered_to(&t.submit(spec(), requester(), &reg, NOW).expect("submit")).expect("first");
    assert!(t.tick(&reg, NOW + 999).is_empty());
    let out = t.tick(&reg, NOW + 1000);
    let second = delivered_to(&out).expect("retried after timeout");
    assert_ne!(first, second);
    assert_eq!(t.load(&first), 0, "timed-out attempt frees capacity");
    let out = t.tick(&reg, spec().deadline_ms);
    assert_eq!(final_event(&out).map(|f| f.0), Some(TaskState::Expired));
}

#[test]
fn waits_for_capacity_then_routes() {
    let reg = registry(&["a"]);
    let mut t = Tasks::new(sample::key(1).node_id(), params());
    let a = delivered_to(&t.submit(spec(), requester(), &reg, NOW).expect("submit")).expect("a");
    let mut s2 = sample::task(&sample::key(1), "r2", NOW);
    s2.requirement = spec().requirement;
    let out = t
        .submit(s2.clone(), requester(), &reg, NOW)
        .expect("submit 2");
    assert!(delivered_to(&out).is_none(), "agent a is at capacity 1");
    assert_eq!(t.get(&s2.id).map(|r| r.state), Some(TaskState::Routed));
    t.result(&a, spec().id, Outcome::Ok(vec![]), &reg, NOW + 1);
    assert_eq!(delivered_to(&t.tick(&reg, NOW + 2)), Some(a));
}

#[test]
fn restore_resumes_and_redelivers_undelivered_results() {
    let reg = registry(&["a"]);
    let mut t = Tasks::new(sample::key(1).node_id(), params());
    let mut persisted = std::collections::BTreeMap::new();
    let mut record = |out: &[Output]| {
        for o in out {
            if let Output::Persist(r) = o {
                persisted.insert(r.spec.id, (**r).clone());
            }
        }
    };
    let out = t.submit(spec(), requester(), &reg, NOW).expect("submit");
    record(&out);
    let a = delivered_to(&out).expect("a");
    let mut s2 = sample::task(&sample::key(1), "r2", NOW);
    s2.requirement = spec().requirement;
    record(&t.submit(s2.clone(), requester(), &reg, NOW).expect("s2"));
    record(&t.result(&a, spec().id, Outcome::Ok(b"done".to_vec()), &reg, NOW + 1));
    // Crash: the result of task 1 was never marked delivered; task 2 was waiting.
    let mut t2 = Tasks::new(sample::key(1).node_id(), params());
    let out = t2.restore(persisted.values().cloned());
    assert_eq!(
        final_event(&out).map(|f| f.1),
        Some(Outcome::Ok(b"done".to_vec()))
    );
    assert_eq!(
        delivered_to(&t2.tick(&reg, NOW + 2)),
        Some(a.clone()),
        "waiting task carries on"
    );
    assert_eq!(t2.mark_delivered(spec().id).len(), 1);
    // The task routed after the restart is held by `a`; a reconnecting `a` gets it again.
    let again = t2.redeliver(&a);
    assert_eq!(delivered_to(&again), Some(a.clone()));
    assert_eq!(again.len(), 1);
    assert!(t2.mark_delivered(spec().id).is_empty());
}

#[test]
fn overload_is_refused() {
    let reg = registry(&[]);
    let mut t = Tasks::new(
        sample::key(1).node_id(),
        TaskParams {
            max_live_tasks: 1,
            ..params()
        },
    );
    t.submit(spec(), requester(), &reg, NOW).expect("first");
    let s2 = sample::task(&sample::key(1), "r2", NOW);
    assert!(t.submit(s2, requester(), &reg, NOW).is_err());
}

#[test]
fn agents_that_fail_lose_traffic() {
    let reg = registry(&["a", "b"]);
    let mut t = Tasks::new(sample::key(1).node_id(), params());
    // Equal similarity: the tie goes to `a` first.
    let first =
        delivered_to(&t.submit(spec(), requester(), &reg, NOW).expect("submit")).expect("first");
    assert_eq!(first.name.as_str(), "a");
    let out = t.result(
        &first,
        spec().id,
        Outcome::Failed("boom".into()),
        &reg,
        NOW + 1,
    );
    let second = delivered_to(&out).expect("retried on b");
    t.result(&second, spec().id, Outcome::Ok(vec![]), &reg, NOW + 2);
    assert!(
        t.perf(&first) < t.perf(&second),
        "{} vs {}",
        t.perf(&first),
        t.perf(&second)
    );
    // The next task now goes to `b`, although `a` would win the tie.
    let mut s2 = sample::task(&sample::key(1), "r2", NOW);
    s2.requirement = spec().requirement;
    let out = t.submit(s2, requester(), &reg, NOW + 3).expect("submit 2");
    assert_eq!(delivered_to(&out), Some(second));
}

/// The per-state counts and the live set are kept incrementally (so `tick` and `counts` do
/// not scan every task ever kept); they must agree with a full recount after every kind of
/// transition, including restore and prune.
#[test]
fn census_follows_every_transition() {
    let reg = registry(&["a", "b"]);
    let mut t = Tasks::new(sample::key(1).node_id(), params());
    let count = |t: &Tasks, s: TaskState| t.counts().get(&s).copied().unwrap_or(0);
    let mut specs = Vec::new();
    for i in 0..4 {
        let mut s = sample::task(&sample::key(1), &format!("r{i}"), NOW);
        s.requirement = spec().requirement;
        t.submit(s.clone(), requester(), &reg, NOW).expect("submit");
        assert!(t.census_matches());
        specs.push(s);
    }
    assert_eq!(count(&t, TaskState::Assigned), 2, "capacity 1 each");
    assert_eq!(count(&t, TaskState::Routed), 2);
    let holder = |t: &Tasks, id| t.get(id).and_then(|r| r.agent.clone());
    let a0 = holder(&t, &specs[0].id).expect("assigned");
    t.progress(&a0, specs[0].id, 10, String::new(), NOW + 1);
    assert_eq!(count(&t, TaskState::Running), 1);
    t.result(&a0, specs[0].id, Outcome::Ok(vec![]), &reg, NOW + 2);
    assert!(t.census_matches());
    let a1 = holder(&t, &specs[1].id).expect("assigned");
    t.result(
        &a1,
        specs[1].id,
        Outcome::Failed("no".into()),
        &reg,
        NOW + 3,
    );
    assert!(t.census_matches());
    t.tick(&reg, NOW + 4);
    t.tick(&reg, NOW + 5000);
    assert!(t.census_matches());
    assert_eq!(count(&t, TaskState::Completed), 1);
    let mut persisted = Vec::new();
    for s in &specs {
        t.mark_delivered(s.id);
        persisted.push(t.get(&s.id).expect("kept").clone());
    }
    t.tick(&reg, specs[0].deadline_ms);
    assert!(t.census_matches());
    assert_eq!(
        t.counts().values().sum::<usize>(),
        4,
        "every task counted once"
    );
    let finals: usize = [TaskState::Completed, TaskState::Failed, TaskState::Expired]
        .iter()
        .map(|s| count(&t, *s))
        .sum();
    assert_eq!(finals, 4, "everything finished by the deadline");
    for s in &specs {
        t.mark_delivered(s.id);
    }
    assert_eq!(t.prune(u64::MAX).len(), 4);
    assert!(t.census_matches());
    assert!(t.counts().is_empty());
    // Restoring the same records twice counts each once.
    let mut r = Tasks::new(sample::key(1).node_id(), params());
    r.restore(persisted.clone());
    r.restore(persisted);
    assert!(r.census_matches());
    assert_eq!(r.counts().values().sum::<usize>(), 4);
}
