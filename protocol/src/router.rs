//! Semantic routing after Federation of Agents, Eq. 2:
//!
//! `α(task, agent) = sim(c_t, c_a) · 1[p_t ⊆ p_a] · f(r_t, r_a) · cos(e_t, e_a)`
//!
//! * `sim` is [`capability_similarity`]: the cosine to the agent's capability embedding (the
//!   centroid of its description and examples), blended with the cosine to its best-matching
//!   example vector when the VCV carries them. Vectors of different embedding spaces are never
//!   compared (the agent is skipped).
//! * The policy gate and the skill gate (Bloom pre-filter, then exact tags) are hard.
//! * `f` is a monotone penalty on the resource gap (see [`resource_fit`]).
//! * The spec factor applies only when both sides carry a spec embedding of the same space.
//!
//! Agents with `α > τ` qualify; when none does, the `top_k` best are kept (FoA's fallback). The
//! load term `1 − w · inflight / capacity` then orders the candidates, and agents at capacity
//! are left out. Ties break on the agent id, so routing is deterministic.

use crate::keys::AgentId;
use crate::message::TaskSpec;
use crate::vcv::{Embedding, ExampleVector, ResourceLimits, Resources, SkillBloom, Vcv};

/// Routing parameters (from the node's `[routing]` config).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RouterParams {
    /// FoA's τ: the qualifying score.
    pub threshold: f32,
    /// How many agents to keep when none qualifies.
    pub top_k: usize,
    /// Weight of the load penalty, 0 to ignore load.
    pub load_weight: f32,
}

impl Default for RouterParams {
    fn default() -> Self {
        Self {
            threshold: 0.3,
            top_k: 3,
            load_weight: 0.5,
        }
    }
}

/// One ranked agent.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    /// The agent.
    pub agent: AgentId,
    /// The VCV version the score used.
    pub version: u64,
    /// FoA's α.
    pub alpha: f32,
    /// α after the load penalty: the ranking key.
    pub score: f32,
}

/// Dot product of two equal-length slices.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Cosine of two quantised embeddings, or `None` when their spaces or dimensions differ.
pub fn cosine(a: &Embedding, b: &Embedding) -> Option<f32> {
    if a.space != b.space || a.q.len() != b.q.len() {
        return None;
    }
    let ip: i32 =
        a.q.iter()
            .zip(&b.q)
            .map(|(&x, &y)| i32::from(x) * i32::from(y))
            .sum();
    let na: i32 = a.q.iter().map(|&x| i32::from(x) * i32::from(x)).sum();
    let nb: i32 = b.q.iter().map(|&x| i32::from(x) * i32::from(x)).sum();
    if na == 0 || nb == 0 {
        return Some(0.0);
    }
    Some(ip as f32 / ((na as f32).sqrt() * (nb as f32).sqrt()))
}

/// Cosine of two quantised vectors of the same dimension (the scales cancel out); 0 when either
/// is all zero.
fn cosine_q(a: &[i8], b: &[i8]) -> f32 {
    let (mut ip, mut na, mut nb) = (0i32, 0i32, 0i32);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (i32::from(x), i32::from(y));
        ip += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0 || nb == 0 {
        return 0.0;
    }
    ip as f32 / ((na as f32).sqrt() * (nb as f32).sqrt())
}

/// Weight of the centroid cosine in [`capability_similarity`]; the best example gets the rest.
///
/// Chosen on held-out BANKING77 *training* utterances (not the test split): 0.3 was best or
/// within 0.4 points of the best blend at 16 and 32 examples per agent (BENCHMARKS.md).
pub const CENTROID_WEIGHT: f32 = 0.3;

/// The similarity term of Eq. 2 between a task's requirement and an agent:
///
/// `CENTROID_WEIGHT · cos(c_t, capability) + (1 − CENTROID_WEIGHT) · max_i cos(c_t, example_i)`
///
/// or the plain `cos(c_t, capability)` when the agent carries no example vectors. `None` when the
/// requirement and the capability are of different spaces or dimensions; example vectors of
/// another dimension (impossible in a validated VCV) are ignored. The work is bounded by
/// [`MAX_EXAMPLE_VECTORS`](crate::limits::MAX_EXAMPLE_VECTORS) cosines.
pub fn capability_similarity(
    requirement: &Embedding,
    capability: &Embedding,
    examples: &[ExampleVector],
) -> Option<f32> {
    capability_similarity_weighted(requirement, capability, examples, CENTROID_WEIGHT)
}

/// [`capability_similarity`] with another centroid weight `w` in `[0, 1]` (for measuring; the
/// router always uses [`CENTROID_WEIGHT`]).
pub fn capability_similarity_weighted(
    requirement: &Embedding,
    capability: &Embedding,
    examples: &[ExampleVector],
    w: f32,
) -> Option<f32> {
    let w = w.clamp(0.0, 1.0);
    let centroid = cosine(requirement, capability)?;
    let best = examples
        .iter()
        .take(crate::limits::MAX_EXAMPLE_VECTORS)
        .filter(|x| x.q.len() == requirement.q.len())
        .map(|x| cosine_q(&requirement.q, &x.q))
        .reduce(f32::max);
    Some(match best {
        Some(best) => w * centroid + (1.0 - w) * best,
        None => centroid,
    })
}

/// FoA's `f(r_t, r_a)`: 1 when the agent meets every limit, falling with the square of the
/// relative gap otherwise (monotone in each resource). `None` when a hard limit fails: the input
/// is larger than the agent accepts.
pub fn resource_fit(limits: &ResourceLimits, r: &Resources, input_bytes: usize) -> Option<f32> {
    if r.max_input_bytes != 0 && input_bytes > r.max_input_bytes as usize {
        return None;
    }
    fn at_most(limit: f64, have: f64) -> f64 {
        if limit == 0.0 || have <= limit {
            1.0
        } else {
            (limit / have).powi(2)
        }
    }
    fn at_least(need: f64, have: f64) -> f64 {
        if need == 0.0 || have >= need {
            1.0
        } else {
            (have / need).powi(2)
        }
    }
    let f = at_most(f64::from(limits.max_latency_ms), f64::from(r.latency_ms))
        * at_most(limits.max_cost_micros as f64, r.cost_micros as f64)
        * at_least(
            f64::from(limits.min_context_tokens),
            f64::from(r.context_tokens),
        )
        * at_least(f64::from(limits.min_gpu_mem_mb), f64::from(r.gpu_mem_mb));
    Some(f as f32)
}

/// True when `have` (sorted) contains every label of `need` (sorted).
fn contains_all(have: &[String], need: &[String]) -> bool {
    need.iter().all(|n| have.binary_search(n).is_ok())
}

/// FoA's α for one agent, or `None` when a gate excludes it.
pub fn alpha(task: &TaskSpec, task_bloom: &SkillBloom, vcv: &Vcv) -> Option<f32> {
    if !vcv.skill_bloom.may_contain_all(task_bloom) || !contains_all(&vcv.skills, &task.skills) {
        return None;
    }
    if !contains_all(&vcv.policies, &task.policies) {
        return None;
    }
    let sim = capability_similarity(&task.requirement, &vcv.capability, &vcv.example_vectors)?;
    let fit = resource_fit(&task.limits, &vcv.resources, task.input.len())?;
    let spec = match (&task.spec, &vcv.spec) {
        (Some(t), Some(a)) => cosine(t, a).unwrap_or(1.0).max(0.0),
        _ => 1.0,
    };
    Some(sim * fit * spec)
}

/// Ranks `agents` for `task`. `inflight(agent)` gives current load; agents in `exclude` (already
/// tried) and agents at capacity are skipped. The result is ordered best first.
pub fn rank<'a>(
    task: &TaskSpec,
    agents: impl IntoIterator<Item = &'a Vcv>,
    inflight: impl Fn(&AgentId) -> u16,
    exclude: &[AgentId],
    params: &RouterParams,
) -> Vec<Candidate> {
    rank_with(task, agents, inflight, |_| 1.0, exclude, params)
}

/// [`rank`] with a per-agent performance factor in `[0, 1]` (FoA's `perf` in Eq. 3, fed back
/// from observed success and latency) multiplied into the ranking score. The qualification
/// threshold still applies to the raw α.
pub fn rank_with<'a>(
    task: &TaskSpec,
    agents: impl IntoIterator<Item = &'a Vcv>,
    inflight: impl Fn(&AgentId) -> u16,
    perf: impl Fn(&AgentId) -> f32,
    exclude: &[AgentId],
    params: &RouterParams,
) -> Vec<Candidate> {
    let bloom = SkillBloom::of(task.skills.iter().map(String::as_str));
    let mut scored: Vec<(f32, &Vcv)> = agents
        .into_iter()
        .filter(|v| !exclude.contains(&v.agent))
        .filter_map(|v| alpha(task, &bloom, v).map(|a| (a, v)))
        .collect();
    let by_alpha = |a: &(f32, &Vcv), b: &(f32, &Vcv)| {
        b.0.total_cmp(&a.0).then_with(|| a.1.agent.cmp(&b.1.agent))
    };
    scored.sort_by(by_alpha);
    let qualified = scored
        .iter()
        .take_while(|(a, _)| *a > params.threshold)
        .count();
    scored.truncate(if qualified > 0 {
        qualified
    } else {
        params.top_k
    });
    let mut out: Vec<Candidate> = scored
        .into_iter()
        .filter_map(|(alpha, v)| {
            let cap = v.resources.capacity.max(1);
            let load = inflight(&v.agent);
            (load < cap).then(|| Candidate {
                agent: v.agent.clone(),
                version: v.version,
                alpha,
                score: alpha
                    * perf(&v.agent).clamp(0.0, 1.0)
                    * (1.0 - params.load_weight * f32::from(load) / f32::from(cap)),
            })
        })
        .collect();
    out.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then_with(|| a.agent.cmp(&b.agent))
    });
    out
}

/// Most tasks assigned together by [`assign_batch`].
pub const MAX_ASSIGN_BATCH: usize = 64;
/// Most candidates per task considered by [`assign_batch`].
pub const MAX_ASSIGN_CANDIDATES: usize = 8;

/// FoA Eq. 3 for a batch: choose at most one candidate per task so that the sum of scores is
/// maximal while no agent gets more tasks than `free_slots(agent)`.
///
/// `options[t]` are task `t`'s ranked candidates (only the first [`MAX_ASSIGN_CANDIDATES`] are
/// considered; at most [`MAX_ASSIGN_BATCH`] tasks). Solved exactly as a min-cost flow (source →
/// task → agent → sink, cost = −score) by successive shortest paths with Bellman–Ford, stopping
/// when no augmenting path improves the total. Returns, per task, the index of the chosen
/// candidate. Ties resolve deterministically (input order).
pub fn assign_batch(
    options: &[Vec<Candidate>],
    free_slots: impl Fn(&AgentId) -> u16,
) -> Vec<Option<usize>> {
    let tasks = options.len().min(MAX_ASSIGN_BATCH);
    let mut agents: Vec<&AgentId> = Vec::new();
    for opts in &options[..tasks] {
        for c in opts.iter().take(MAX_ASSIGN_CANDIDATES) {
            if !agents.contains(&&c.agent) {
                agents.push(&c.agent);
            }
        }
    }
    // Nodes: 0 = source, 1..=tasks, then agents, then sink.
    let (src, a0) = (0usize, 1 + tasks);
    let sink = a0 + agents.len();
    let n = sink + 1;
    struct Edge {
        to: usize,
        cap: i32,
        cost: f64,
    }
    let mut edges: Vec<Edge> = Vec::new();
    let mut adj: Vec<Vec<usize>> = vec![Vec::new(); n];
    let add = |edges: &mut Vec<Edge>,
               adj: &mut Vec<Vec<usize>>,
               u: usize,
               v: usize,
               cap: i32,
               cost: f64| {
        adj[u].push(edges.len());
        edges.push(Edge { to: v, cap, cost });
        adj[v].push(edges.len());
        edges.push(Edge {
            to: u,
            cap: 0,
            cost: -cost,
        });
    };
    let mut choice_edges: Vec<Vec<(usize, usize)>> = vec![Vec::new(); tasks];
    for (t, opts) in options[..tasks].iter().enumerate() {
        add(&mut edges, &mut adj, src, 1 + t, 1, 0.0);
        for (i, c) in opts.iter().take(MAX_ASSIGN_CANDIDATES).enumerate() {
            let a = agents.iter().position(|x| *x == &c.agent).unwrap_or(0);
            choice_edges[t].push((edges.len(), i));
            add(
                &mut edges,
                &mut adj,
                1 + t,
                a0 + a,
                1,
                -f64::from(c.score.max(0.0)),
            );
        }
    }
    for (a, agent) in agents.iter().enumerate() {
        let slots = i32::from(free_slots(agent)).min(tasks as i32);
        if slots > 0 {
            add(&mut edges, &mut adj, a0 + a, sink, slots, 0.0);
        }
    }
    // Successive shortest paths; each round is bounded (at most `tasks` augmentations).
    for _ in 0..tasks {
        let mut dist = vec![f64::INFINITY; n];
        let mut prev: Vec<Option<usize>> = vec![None; n];
        dist[src] = 0.0;
        for _ in 0..n {
            let mut changed = false;
            for u in 0..n {
                if dist[u].is_infinite() {
                    continue;
                }
                for &e in &adj[u] {
                    let Edge { to, cap, cost } = edges[e];
                    if cap > 0 && dist[u] + cost < dist[to] - 1e-12 {
                        dist[to] = dist[u] + cost;
                        prev[to] = Some(e);
                        changed = true;
                    }
                }
            }
            if !changed {
                break;
            }
        }
        if dist[sink].is_infinite() || dist[sink] >= -1e-12 {
            break; // no augmenting path improves the total
        }
        let mut v = sink;
        while let Some(e) = prev[v] {
            edges[e].cap -= 1;
            edges[e ^ 1].cap += 1;
            v = edges[e ^ 1].to;
        }
    }
    let mut out = vec![None; options.len()];
    for (t, ch) in choice_edges.iter().enumerate() {
        out[t] = ch.iter().find(|(e, _)| edges[*e].cap == 0).map(|(_, i)| *i);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample;

    const NOW: u64 = 1_790_000_000_000;

    fn agent(seed: u8, name: &str, cap_seed: u64) -> Vcv {
        let mut v = sample::vcv(&sample::key(seed), name, 1, NOW);
        v.capability = sample::embedding(cap_seed, 256);
        v
    }

    fn task_like(cap_seed: u64) -> TaskSpec {
        let mut t = sample::task(&sample::key(1), "r", NOW);
        t.requirement = sample::embedding(cap_seed, 256);
        t
    }

    #[test]
    fn most_similar_agent_wins() {
        let agents = [agent(1, "a", 10), agent(1, "b", 20), agent(1, "c", 30)];
        let r = rank(
            &task_like(20),
            &agents,
            |_| 0,
            &[],
            &RouterParams::default(),
        );
        assert_eq!(r[0].agent.name.as_str(), "b");
        assert!(r[0].alpha > 0.99);
        assert_eq!(r.len(), 1, "only b qualifies");
    }

    /// The normalised sum `a + w·b` of two sample unit vectors, as an embedding.
    fn mix(a: u64, b: u64, w: f32) -> Embedding {
        let (a, b) = (sample::unit_vector(a, 256), sample::unit_vector(b, 256));
        let v: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + w * y).collect();
        Embedding::quantise(sample::SAMPLE_SPACE, &v).expect("non-zero")
    }

    #[test]
    fn a_task_close_to_one_example_routes_to_its_agent() {
        // `a`'s centroid is unrelated to the task, but one of its examples is phrased almost
        // like it; `b`'s centroid is moderately close and it carries no example vectors.
        let mut a = agent(1, "a", 30);
        a.example_vectors = vec![
            ExampleVector::quantise(&sample::unit_vector(31, 256)).expect("q"),
            ExampleVector::quantise(&mix(20, 32, 0.2).to_f32()).expect("q"),
        ];
        let mut b = agent(1, "b", 0);
        b.capability = mix(20, 40, 1.5);
        let task = task_like(20);
        let p = RouterParams::default();
        let r = rank(&task, [&a, &b], |_| 0, &[], &p);
        assert_eq!(r[0].agent.name.as_str(), "a", "{r:?}");
        let best = cosine(&task.requirement, &mix(20, 32, 0.2)).expect("same space");
        let centroid = cosine(&task.requirement, &a.capability).expect("same space");
        let want = CENTROID_WEIGHT * centroid + (1.0 - CENTROID_WEIGHT) * best;
        assert!((r[0].alpha - want).abs() < 1e-3, "{} vs {want}", r[0].alpha);
        // Without its example vectors, `a` is scored by the centroid alone and loses.
        a.example_vectors.clear();
        let r = rank(&task, [&a, &b], |_| 0, &[], &p);
        assert_eq!(r[0].agent.name.as_str(), "b", "{r:?}");
    }

    #[test]
    fn similarity_without_usable_examples_is_the_centroid_cosine() {
        let t = sample::embedding(1, 256);
        let c = sample::embedding(2, 256);
        let plain = cosine(&t, &c).expect("same space");
        assert_eq!(capability_similarity(&t, &c, &[]), Some(plain));
        // An example vector of another dimension (a VCV that skipped validation) is ignored.
        let odd = ExampleVector::quantise(&sample::unit_vector(3, 64)).expect("q");
        assert_eq!(capability_similarity(&t, &c, &[odd]), Some(plain));
        // Another space is never compared, examples or not.
        let mut other = c.clone();
        other.space = "other/v1".into();
        let ex = ExampleVector::quantise(&t.to_f32()).expect("q");
        assert_eq!(capability_similarity(&t, &other, &[ex]), None);
    }

    #[test]
    fn fallback_to_top_k_when_none_qualifies() {
        let agents: Vec<Vcv> = (0..6)
            .map(|i| agent(1, &format!("a{i}"), 100 + i))
            .collect();
        let p = RouterParams {
            threshold: 0.99,
            top_k: 3,
            load_weight: 0.0,
        };
        assert_eq!(rank(&task_like(7), &agents, |_| 0, &[], &p).len(), 3);
    }

    #[test]
    fn policy_skill_and_space_gates() {
        let mut no_policy = agent(1, "a", 20);
        no_policy.policies.clear();
        let mut no_skill = agent(1, "b", 20);
        no_skill.skills = vec!["translate".into()];
        no_skill.normalise();
        let mut other_space = agent(1, "c", 20);
        other_space.capability.space = "other/v1".into();
        let r = rank(
            &task_like(20),
            &[no_policy, no_skill, other_space],
            |_| 0,
            &[],
            &RouterParams::default(),
        );
        assert!(r.is_empty(), "{r:?}");
    }

    #[test]
    fn load_and_capacity_and_exclusion() {
        let a = agent(1, "a", 20);
        let mut b = agent(1, "b", 20);
        b.capability = a.capability.clone();
        let agents = [a.clone(), b.clone()];
        let p = RouterParams::default();
        // Equal scores: the tie breaks on the id.
        assert_eq!(
            rank(&task_like(20), &agents, |_| 0, &[], &p)[0].agent,
            a.agent
        );
        // a is busier: b wins.
        let r = rank(
            &task_like(20),
            &agents,
            |x| u16::from(x == &a.agent),
            &[],
            &p,
        );
        assert_eq!(r[0].agent, b.agent);
        // a at capacity (4): excluded.
        let r = rank(
            &task_like(20),
            &agents,
            |x| if x == &a.agent { 4 } else { 0 },
            &[],
            &p,
        );
        assert_eq!(r.len(), 1);
        // b already tried.
        let r = rank(
            &task_like(20),
            &agents,
            |_| 0,
            std::slice::from_ref(&b.agent),
            &p,
        );
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].agent, a.agent);
    }

    fn cand(name: &str, score: f32) -> Candidate {
        Candidate {
            agent: AgentId::new(
                sample::key(1).node_id(),
                crate::AgentName::new(name).expect("name"),
            ),
            version: 1,
            alpha: score,
            score,
        }
    }

    #[test]
    fn batch_assignment_maximises_the_total_not_each_task_greedily() {
        // Greedy (t1→A, t2→B) totals 1.0; the optimum (t1→B, t2→A) totals 1.65.
        let options = vec![
            vec![cand("a", 0.9), cand("b", 0.85)],
            vec![cand("a", 0.8), cand("b", 0.1)],
        ];
        assert_eq!(assign_batch(&options, |_| 1), vec![Some(1), Some(0)]);
        // With two slots on A, both tasks take their favourite (total 1.7).
        assert_eq!(assign_batch(&options, |_| 2), vec![Some(0), Some(0)]);
        // No capacity anywhere: nothing assigned.
        assert_eq!(assign_batch(&options, |_| 0), vec![None, None]);
    }

    #[test]
    fn batch_assignment_respects_capacity_and_leaves_the_rest_waiting() {
        let options: Vec<Vec<Candidate>> = (0..5)
            .map(|i| vec![cand("a", 0.5 + i as f32 / 100.0)])
            .collect();
        let got = assign_batch(&options, |_| 2);
        assert_eq!(got.iter().filter(|c| c.is_some()).count(), 2);
        // The two best-scoring tasks win the two slots.
        assert_eq!(got[3], Some(0));
        assert_eq!(got[4], Some(0));
    }

    #[test]
    fn feedback_factor_moves_traffic_away() {
        let a = agent(1, "a", 20);
        let mut b = agent(1, "b", 20);
        b.capability = a.capability.clone();
        let agents = [a.clone(), b.clone()];
        let bad_a = |x: &AgentId| if x == &a.agent { 0.2 } else { 1.0 };
        let r = rank_with(
            &task_like(20),
            &agents,
            |_| 0,
            bad_a,
            &[],
            &RouterParams::default(),
        );
        assert_eq!(r[0].agent, b.agent);
    }

    #[test]
    fn resource_penalty_is_monotone_and_input_limit_is_hard() {
        let r = Resources {
            latency_ms: 200,
            max_input_bytes: 10,
            ..Default::default()
        };
        let lim = |ms| ResourceLimits {
            max_latency_ms: ms,
            ..Default::default()
        };
        assert_eq!(resource_fit(&lim(0), &r, 1), Some(1.0));
        assert_eq!(resource_fit(&lim(200), &r, 1), Some(1.0));
        let f100 = resource_fit(&lim(100), &r, 1).expect("fit");
        let f50 = resource_fit(&lim(50), &r, 1).expect("fit");
        assert!(f100 > f50 && f50 > 0.0);
        assert_eq!(resource_fit(&lim(0), &r, 11), None);
    }
}
