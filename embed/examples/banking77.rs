//! Routing accuracy on BANKING77: one agent per intent, every test utterance is a task, and the
//! agents are ranked by the router the node runs (`fedmesh_protocol::router::rank`).
//!
//! ```text
//! cargo run --release -p fedmesh-embed --example banking77 -- \
//!     --data /work/shared/data/banking77 [--wordllama third_party/wordllama] [--examples 8,16,32] \
//!     [--weights 0.2,0.3,0.4] [--queries test|dev]
//! ```
//!
//! * Agent `i` (77 of them) is described by its intent name with `_` replaced by spaces, and has as
//!   examples the first `N` training utterances of that intent (file order). Its VCV carries what
//!   a node puts there for an advertised agent: `capability` = [`fedmesh_embed::agent_vector`]
//!   (the normalised mean of the embeddings of description and examples) and `example_vectors` =
//!   [`fedmesh_embed::example_vectors`], both i8-quantised. No skills, policies or limits, so the
//!   gates pass and α is the similarity term.
//! * Each query is embedded and quantised as the node does for a submitted task, and the 77 VCVs
//!   are ranked by `router::rank` with the default parameters (τ = 0.3, top-k fallback 3, no
//!   load). Top-1 / top-3 accuracy is the share whose true intent is ranked first / in the first
//!   three (an agent not in the ranked list counts as a miss).
//! * Columns: `centroid` is the same VCVs with `example_vectors` emptied (what a node did before
//!   envelope version 2); `+examples` is the router as shipped
//!   (`CENTROID_WEIGHT · cos(centroid) + (1 − CENTROID_WEIGHT) · max cos(example)`). `--weights`
//!   adds rows scored with `router::capability_similarity_weighted` at other centroid weights.
//! * `--queries dev` replaces the test split by the training utterances of each intent from
//!   position 64 on (never used as examples, since `N ≤ MAX_EXAMPLES = 32`): the split
//!   `CENTROID_WEIGHT` was chosen on, so that the test figures are not tuned on the test set.
//! * `shortlist miss` counts queries whose true agent is not among the 64 best by centroid cosine
//!   (`task::CANDIDATE_SHORTLIST`, what the ANN index hands the router, which ranks by the
//!   centroid only): with 77 agents, 1–2 of the 3,080 test queries with WordLlama at N = 5–32
//!   (2–12 with the hash embedder). The node would lose at most those; this harness ranks all 77.
//! * `envelope B` is the mean size of the signed `Advertise` envelope of one agent, with the
//!   example vectors and (in parentheses) without.
//! * `emb/s` is single-thread embedding throughput over the queries.
//!
//! Findings (2 cores, release build; see BENCHMARKS.md for the table):
//! * Centroid only, WordLlama top-1 is 74.5 / 77.6 / 79.2 % at N = 8 / 16 / 32, and 81.1 % with
//!   all ~130 training utterances per intent: one mean-pooled 256-d static vector per agent
//!   cannot reach 85 %.
//! * Multi-vector scores measured on the test split at N = 8 / 16 / 32 / 64 (float vectors, a
//!   throw-away harness): max over examples alone 73.2 / 78.7 / 84.4 / 86.7 %; max over
//!   {centroid, examples} 76.6 / 80.5 / 84.9 / 86.9 %; mean of the two best examples 73.4 /
//!   81.1 / 86.2 / 88.5 %; `0.3·centroid + 0.7·max` 75.8 / 81.6 / 86.2 / 88.5 %; `0.2·centroid +
//!   0.8·mean-of-top-2` 74.6 / 81.6 / 86.5 / 88.9 %; log-sum-exp pooling (T = 0.01–0.1) and a
//!   global kNN vote (k = 1–10) were no better. On the dev split the centroid weight 0.3 with
//!   max was best or within 0.4 points of the best blend at N = 16 and 32, hence
//!   `CENTROID_WEIGHT = 0.3`. No variant reaches 85 % at N = 16 (best 82.0 %).
//! * Tried earlier and dropped because they did not help the centroid: token weighting by IDF
//!   over the agents' own texts (−1 to −2 points), by vocabulary rank or by inverse/forward token
//!   norm (worse), lowercasing (±0.1), removing the mean / top principal components
//!   ("all-but-the-top": 0.3–1 point worse), weighting the description 0–3× against the
//!   examples (±0.5). Concatenating WordLlama and hash vectors (a 512-d space, weights 0.7/0.3 on
//!   the cosines) gained +0.4 / +1.2 / +1.6 points at N = 5 / 10 / 20; not shipped as a space.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use fedmesh_embed::{Embedder, HashEmbedder, WordLlama, agent_vector, example_vectors};
use fedmesh_protocol::limits::{MAX_EXAMPLE_VECTOR_BYTES, MAX_EXAMPLE_VECTORS, MAX_EXAMPLES};
use fedmesh_protocol::router::{self, RouterParams};
use fedmesh_protocol::task::CANDIDATE_SHORTLIST;
use fedmesh_protocol::{Embedding, ExampleVector, Message, TaskSpec, Vcv, sample, seal};

struct Args {
    data: PathBuf,
    wordllama: PathBuf,
    examples: Vec<usize>,
    weights: Vec<f32>,
    dev: bool,
}

fn parse_list<T: std::str::FromStr>(flag: &str, v: &str) -> Result<Vec<T>, String>
where
    T::Err: std::fmt::Display,
{
    v.split(',')
        .map(|s| {
            s.trim()
                .parse::<T>()
                .map_err(|e| format!("{flag} {s}: {e}"))
        })
        .collect()
}

fn parse_args() -> Result<Args, String> {
    let mut data = None;
    let mut wordllama = PathBuf::from("third_party/wordllama");
    let mut examples = vec![5];
    let mut weights = Vec::new();
    let mut dev = false;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--data" => data = Some(PathBuf::from(val()?)),
            "--wordllama" => wordllama = PathBuf::from(val()?),
            "--examples" => examples = parse_list("--examples", &val()?)?,
            "--weights" => weights = parse_list("--weights", &val()?)?,
            "--queries" => match val()?.as_str() {
                "test" => dev = false,
                "dev" => dev = true,
                q => return Err(format!("--queries {q}: expected test or dev")),
            },
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let data = data.ok_or("--data DIR is required")?;
    if let Some(n) = examples.iter().find(|&&n| n > MAX_EXAMPLES) {
        return Err(format!(
            "--examples {n}: a node advertises at most MAX_EXAMPLES = {MAX_EXAMPLES} examples"
        ));
    }
    Ok(Args {
        data,
        wordllama,
        examples,
        weights,
        dev,
    })
}

/// Minimal RFC 4180 reader: comma separated, `"`-quoted fields with `""` escapes and embedded
/// newlines; CRLF or LF line ends. Returns all records including the header.
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut field)),
            (false, '\r') => {}
            (false, '\n') => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            (false, c) => field.push(c),
        }
    }
    if !field.is_empty() || !row.is_empty() {
        row.push(field);
        rows.push(row);
    }
    rows
}

/// `(text, category)` pairs of a `text,category` CSV file.
fn read_split(path: &Path) -> Result<Vec<(String, String)>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut rows = parse_csv(&text).into_iter();
    match rows.next() {
        Some(h) if h == ["text", "category"] => {}
        h => return Err(format!("{}: unexpected header {h:?}", path.display())),
    }
    rows.map(|r| match <[String; 2]>::try_from(r) {
        Ok([t, c]) => Ok((t, c)),
        Err(r) => Err(format!("{}: bad record {r:?}", path.display())),
    })
    .collect()
}

struct Data {
    intents: Vec<String>,
    train: BTreeMap<String, Vec<String>>,
    test: Vec<(String, usize)>,
}

/// First training position of each intent used as a `--queries dev` query: above every `N`.
const DEV_FROM: usize = 64;

impl Data {
    /// Replaces the test split by the training utterances from position [`DEV_FROM`] on.
    fn use_dev_queries(&mut self) {
        let empty = Vec::new();
        self.test = self
            .intents
            .iter()
            .enumerate()
            .flat_map(|(i, intent)| {
                let all = self.train.get(intent).unwrap_or(&empty);
                all.iter().skip(DEV_FROM).map(move |t| (t.clone(), i))
            })
            .collect();
    }
}

fn load(dir: &Path) -> Result<Data, String> {
    let train_rows = read_split(&dir.join("train.csv"))?;
    let test_rows = read_split(&dir.join("test.csv"))?;
    let mut intents: Vec<String> = Vec::new();
    let mut train: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (t, c) in train_rows {
        if !train.contains_key(&c) {
            intents.push(c.clone());
        }
        train.entry(c).or_default().push(t);
    }
    let test = test_rows
        .into_iter()
        .map(|(t, c)| match intents.iter().position(|i| *i == c) {
            Some(i) => Ok((t, i)),
            None => Err(format!("test intent {c} has no training data")),
        })
        .collect::<Result<_, String>>()?;
    Ok(Data {
        intents,
        train,
        test,
    })
}

/// Top-1 and top-3 accuracy, in percent, of one scoring over all queries.
#[derive(Default)]
struct Acc {
    top1: usize,
    top3: usize,
}

impl Acc {
    fn add(&mut self, rank: Option<usize>) {
        self.top1 += usize::from(rank == Some(0));
        self.top3 += usize::from(rank.is_some_and(|r| r < 3));
    }

    fn pct(&self, n: usize) -> (f64, f64) {
        let p = |c: usize| 100.0 * c as f64 / n.max(1) as f64;
        (p(self.top1), p(self.top3))
    }
}

/// The VCV a node advertises for agent `i` with `description` and `examples`.
fn agent_vcv(e: &dyn Embedder, i: usize, description: &str, examples: &[String]) -> Vcv {
    let mut v = sample::vcv(&sample::key(1), &format!("intent{i}"), 1, 1);
    v.description = description.to_owned();
    v.examples = examples.to_vec();
    v.skills.clear();
    v.policies.clear();
    v.normalise();
    if let Some(c) = Embedding::quantise(e.space(), &agent_vector(e, description, examples)) {
        v.capability = c;
    }
    // As `node::api::example_vectors`: as many as the limits allow at this dimension.
    let most = MAX_EXAMPLE_VECTORS.min(MAX_EXAMPLE_VECTOR_BYTES / e.dim().max(1));
    v.example_vectors = example_vectors(e, examples, most)
        .iter()
        .filter_map(|x| ExampleVector::quantise(x))
        .collect();
    v
}

/// A task as a node builds it from a submitted text: only the requirement matters here.
fn query_task(e: &dyn Embedder, q: &[f32]) -> TaskSpec {
    let mut t = sample::task(&sample::key(1), "q", 1);
    t.skills.clear();
    t.policies.clear();
    t.input.clear();
    if let Some(r) = Embedding::quantise(e.space(), q) {
        t.requirement = r;
    }
    t
}

struct Row {
    centroid: Acc,
    examples: Acc,
    weighted: Vec<Acc>,
    shortlist_miss: usize,
    /// Mean size of the signed `Advertise` envelope, with and without example vectors.
    envelope_bytes: (usize, usize),
}

/// Mean size of the sealed `Advertise` envelopes of `agents` (0 when one does not seal).
fn mean_envelope(agents: &[Vcv]) -> usize {
    let sizes: Option<Vec<usize>> = agents
        .iter()
        .map(|v| {
            seal(&sample::key(1), 1, &Message::Advertise(v.clone()))
                .ok()
                .map(|b| b.len())
        })
        .collect();
    sizes.map_or(0, |s| s.iter().sum::<usize>() / s.len().max(1))
}

/// Position of agent `want` in `ranked` (router output).
fn position(ranked: &[router::Candidate], agents: &[Vcv], want: usize) -> Option<usize> {
    ranked.iter().position(|c| c.agent == agents[want].agent)
}

/// Rank (0-based) of `want` when `scores` are sorted descending.
fn rank_of(scores: &[f32], want: usize) -> usize {
    scores.iter().filter(|&&s| s > scores[want]).count()
}

fn evaluate(e: &dyn Embedder, d: &Data, queries: &[Vec<f32>], n: usize, weights: &[f32]) -> Row {
    let empty = Vec::new();
    let agents: Vec<Vcv> = d
        .intents
        .iter()
        .enumerate()
        .map(|(i, intent)| {
            let all = d.train.get(intent).unwrap_or(&empty);
            agent_vcv(e, i, &intent.replace('_', " "), &all[..n.min(all.len())])
        })
        .collect();
    let centroid_only: Vec<Vcv> = agents
        .iter()
        .map(|v| Vcv {
            example_vectors: Vec::new(),
            ..v.clone()
        })
        .collect();
    let params = RouterParams {
        load_weight: 0.0,
        ..RouterParams::default()
    };
    let mut row = Row {
        centroid: Acc::default(),
        examples: Acc::default(),
        weighted: weights.iter().map(|_| Acc::default()).collect(),
        shortlist_miss: 0,
        envelope_bytes: (mean_envelope(&agents), mean_envelope(&centroid_only)),
    };
    for (q, (_, want)) in queries.iter().zip(&d.test) {
        let task = query_task(e, q);
        let ranked = router::rank(&task, &agents, |_| 0, &[], &params);
        row.examples.add(position(&ranked, &agents, *want));
        let ranked = router::rank(&task, &centroid_only, |_| 0, &[], &params);
        row.centroid.add(position(&ranked, &centroid_only, *want));
        let cos: Vec<f32> = agents
            .iter()
            .map(|a| router::cosine(&task.requirement, &a.capability).unwrap_or(f32::MIN))
            .collect();
        row.shortlist_miss += usize::from(rank_of(&cos, *want) >= CANDIDATE_SHORTLIST);
        for (acc, &w) in row.weighted.iter_mut().zip(weights) {
            let s: Vec<f32> = agents
                .iter()
                .map(|a| {
                    router::capability_similarity_weighted(
                        &task.requirement,
                        &a.capability,
                        &a.example_vectors,
                        w,
                    )
                    .unwrap_or(f32::MIN)
                })
                .collect();
            acc.add(Some(rank_of(&s, *want)));
        }
    }
    row
}

fn run(args: &Args) -> Result<(), String> {
    let mut d = load(&args.data)?;
    let n_train: usize = d.train.values().map(Vec::len).sum();
    println!(
        "BANKING77: {} intents, {n_train} training and {} test utterances",
        d.intents.len(),
        d.test.len()
    );
    if args.dev {
        d.use_dev_queries();
        println!(
            "queries: {} held-out training utterances (position >= {DEV_FROM} in each intent)",
            d.test.len()
        );
    }
    let mut embedders: Vec<(String, Box<dyn Embedder>)> =
        vec![("hash".into(), Box::new(HashEmbedder::new()))];
    let t0 = Instant::now();
    match WordLlama::load(&args.wordllama) {
        Ok(w) => {
            println!(
                "wordllama loaded from {} in {:.2?}",
                args.wordllama.display(),
                t0.elapsed()
            );
            embedders.push(("wordllama".into(), Box::new(w)));
        }
        Err(e) => println!("wordllama skipped: {e}"),
    }
    println!(
        "router: rank() with tau = {}, centroid weight {}",
        RouterParams::default().threshold,
        router::CENTROID_WEIGHT
    );
    println!();
    let extra: String = args
        .weights
        .iter()
        .map(|w| format!(" w={w} top-1 |"))
        .collect();
    println!(
        "| embedder | N | centroid top-1 | centroid top-3 | +examples top-1 | +examples top-3 |{extra} shortlist miss | envelope B (centroid only) | emb/s |"
    );
    println!(
        "|---|---|---|---|---|---|{}---|---|---|",
        "---|".repeat(args.weights.len())
    );
    for (name, e) in &embedders {
        // Throughput: best of three passes over the queries (the machine may be shared).
        let mut rate = 0f64;
        let mut queries = Vec::new();
        for _ in 0..3 {
            let t0 = Instant::now();
            queries = d.test.iter().map(|(t, _)| e.embed(t)).collect();
            rate = rate.max(d.test.len() as f64 / t0.elapsed().as_secs_f64());
        }
        for &n in &args.examples {
            let r = evaluate(e.as_ref(), &d, &queries, n, &args.weights);
            let total = d.test.len();
            let (c1, c3) = r.centroid.pct(total);
            let (x1, x3) = r.examples.pct(total);
            let extra: String = r
                .weighted
                .iter()
                .map(|a| format!(" {:.2} % |", a.pct(total).0))
                .collect();
            println!(
                "| {name} | {n} | {c1:.2} % | {c3:.2} % | {x1:.2} % | {x3:.2} % |{extra} {} | {} ({}) | {rate:.0} |",
                r.shortlist_miss, r.envelope_bytes.0, r.envelope_bytes.1
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(msg) => {
            if !msg.is_empty() {
                eprintln!("error: {msg}");
            }
            eprintln!(
                "usage: banking77 --data DIR [--wordllama DIR] [--examples N[,N...]] \
                 [--weights W[,W...]] [--queries test|dev]   (default N=5, test queries)"
            );
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_csv;

    #[test]
    fn csv_quotes() {
        let rows = parse_csv("text,category\n\"a, \"\"b\"\"\nc\",x\r\nplain,y\n");
        assert_eq!(
            rows,
            [
                vec!["text", "category"],
                vec!["a, \"b\"\nc", "x"],
                vec!["plain", "y"]
            ]
        );
    }
}
