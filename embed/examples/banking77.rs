//! Routing accuracy on BANKING77: one agent per intent, every test utterance is a task.
//!
//! ```text
//! cargo run --release -p fedmesh-embed --example banking77 -- \
//!     --data /work/shared/data/banking77 [--wordllama third_party/wordllama] [--examples 5,10,20]
//! ```
//!
//! * Agent `i` (77 of them) is described by its intent name with `_` replaced by spaces, and has as
//!   examples the first `N` training utterances of that intent (file order). Its vector is
//!   [`fedmesh_embed::agent_vector`]: the normalised mean of the embeddings of the description and
//!   of each example, exactly what a node computes for an advertised agent.
//! * Each of the 3,080 test utterances is embedded and scored by cosine against all 77 agents;
//!   top-1 / top-3 accuracy is the share whose true intent is ranked first / in the first three.
//! * `emb/s` is single-thread embedding throughput over the test utterances.
//! * For reference the table also shows `max-ex`: scoring an agent by its best-matching single
//!   text (description or example) instead of the centroid. It needs one vector per example, which
//!   the protocol does not carry, so it is not what the node does.
//!
//! `--examples` takes a comma-separated list (default `5`). WordLlama rows are printed when the
//! weights directory (default `third_party/wordllama`) holds the fetched files.
//!
//! Findings (2 cores, release build; see the table printed by the run):
//! * WordLlama centroid top-1 is 71.7 / 74.8 / 77.6 / 77.6 % at N = 5 / 10 / 16 / 20 (top-3
//!   87–92 %); the hash embedder 63.3 / 67.8 / 71.0 / 72.0 %. Even with *all* ~130 training
//!   utterances per intent the WordLlama centroid stops at 81.1 %: one mean-pooled 256-d static
//!   vector per agent cannot reach 85 % on this data set. Max-over-examples reaches 81.3 % at
//!   N = 20 and 88.2 % with all examples, but needs one vector per example.
//! * Tried and dropped because they did not help the centroid: token weighting by IDF over the
//!   agents' own texts (−1 to −2 points), by vocabulary rank or by inverse/forward token norm
//!   (worse), lowercasing (±0.1), removing the mean / top principal components
//!   ("all-but-the-top", from the vocabulary or the training texts: 0.3–1 point worse, more with
//!   more components), weighting the description 0–3× against the examples (±0.5).
//! * Concatenating WordLlama and hash vectors (a 512-d space, weights 0.7/0.3 on the cosines)
//!   gains +0.4 / +1.2 / +1.6 points at N = 5 / 10 / 20; not shipped as a space yet.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use fedmesh_embed::{Embedder, HashEmbedder, WordLlama, agent_vector, cosine};

struct Args {
    data: PathBuf,
    wordllama: PathBuf,
    examples: Vec<usize>,
}

fn parse_args() -> Result<Args, String> {
    let mut data = None;
    let mut wordllama = PathBuf::from("third_party/wordllama");
    let mut examples = vec![5];
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--data" => data = Some(PathBuf::from(val()?)),
            "--wordllama" => wordllama = PathBuf::from(val()?),
            "--examples" => {
                examples = val()?
                    .split(',')
                    .map(|s| {
                        s.trim()
                            .parse::<usize>()
                            .map_err(|e| format!("--examples {s}: {e}"))
                    })
                    .collect::<Result<_, _>>()?;
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let data = data.ok_or("--data DIR is required")?;
    Ok(Args {
        data,
        wordllama,
        examples,
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

struct Row {
    top1: f64,
    top3: f64,
    max_top1: f64,
    max_top3: f64,
}

/// Rank (0-based) of `want` when `scores` are sorted descending.
fn rank(scores: &[f32], want: usize) -> usize {
    scores.iter().filter(|&&s| s > scores[want]).count()
}

fn evaluate(e: &dyn Embedder, d: &Data, test_vecs: &[Vec<f32>], n: usize) -> Row {
    let empty = Vec::new();
    let mut agents = Vec::new();
    let mut singles: Vec<Vec<Vec<f32>>> = Vec::new();
    for intent in &d.intents {
        let desc = intent.replace('_', " ");
        let all = d.train.get(intent).unwrap_or(&empty);
        let ex = &all[..n.min(all.len())];
        agents.push(agent_vector(e, &desc, ex));
        let texts = std::iter::once(&desc).chain(ex);
        singles.push(texts.map(|t| e.embed(t)).collect());
    }
    let (mut c1, mut c3, mut m1, mut m3) = (0usize, 0, 0, 0);
    for (q, (_, want)) in test_vecs.iter().zip(&d.test) {
        let s: Vec<f32> = agents.iter().map(|a| cosine(q, a)).collect();
        let r = rank(&s, *want);
        c1 += usize::from(r == 0);
        c3 += usize::from(r < 3);
        let s: Vec<f32> = singles
            .iter()
            .map(|vs| vs.iter().map(|v| cosine(q, v)).fold(f32::MIN, f32::max))
            .collect();
        let r = rank(&s, *want);
        m1 += usize::from(r == 0);
        m3 += usize::from(r < 3);
    }
    let pct = |c: usize| 100.0 * c as f64 / d.test.len() as f64;
    Row {
        top1: pct(c1),
        top3: pct(c3),
        max_top1: pct(m1),
        max_top3: pct(m3),
    }
}

fn run(args: &Args) -> Result<(), String> {
    let d = load(&args.data)?;
    let n_train: usize = d.train.values().map(Vec::len).sum();
    println!(
        "BANKING77: {} intents, {n_train} training and {} test utterances",
        d.intents.len(),
        d.test.len()
    );
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
    println!();
    println!("| embedder | N | top-1 | top-3 | max-ex top-1 | max-ex top-3 | emb/s |");
    println!("|---|---|---|---|---|---|---|");
    for (name, e) in &embedders {
        // Throughput: best of three passes over the test utterances (the machine may be shared).
        let mut rate = 0f64;
        let mut test_vecs = Vec::new();
        for _ in 0..3 {
            let t0 = Instant::now();
            test_vecs = d.test.iter().map(|(t, _)| e.embed(t)).collect();
            rate = rate.max(d.test.len() as f64 / t0.elapsed().as_secs_f64());
        }
        for &n in &args.examples {
            let r = evaluate(e.as_ref(), &d, &test_vecs, n);
            println!(
                "| {name} | {n} | {:.2} % | {:.2} % | {:.2} % | {:.2} % | {rate:.0} |",
                r.top1, r.top3, r.max_top1, r.max_top3
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
                "usage: banking77 --data DIR [--wordllama DIR] [--examples N[,N...]]   (default N=5)"
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
