//! Offline text embedders for fedmesh.
//!
//! Every embedder maps text to an L2-normalised vector in a named *embedding space*
//! ([`Embedder::space`]). Vectors from different spaces are never comparable, so the space id
//! travels with every vector and routing only compares vectors of the same space.
//!
//! * [`HashEmbedder`] (`"hash"`, space [`HASH_SPACE`]): zero set-up, pure Rust, no files.
//!   Lexical feature hashing; good for exact and near-exact wording.
//! * [`WordLlama`] (`"wordllama"`, space [`WORDLLAMA_SPACE`]): static neural token embeddings
//!   from the `wordllama==0.4.0.post1` wheel (fetched once by `scripts/fetch-wordllama.sh`);
//!   captures paraphrases.
//!
//! Nothing here touches the network. Embedding never fails: text without usable content (empty,
//! whitespace or punctuation only) maps to [`fallback_vector`], a fixed, documented unit vector.

use std::path::{Path, PathBuf};

mod hash;
mod wordllama;

pub use hash::{HASH_DIM, HASH_SPACE, HashEmbedder};
pub use wordllama::{TOKENIZER_FILE, WEIGHTS_FILE, WORDLLAMA_SPACE, WordLlama};

/// A text embedder producing L2-normalised vectors of a fixed dimension in one named space.
pub trait Embedder: Send + Sync {
    /// The id of the embedding space, e.g. `"fedmesh-hash-256/v1"`. Two embedders with the same
    /// id produce comparable vectors; the id changes whenever the output would change.
    fn space(&self) -> &str;
    /// The vector dimension.
    fn dim(&self) -> usize;
    /// Embeds `text`. The result has length [`dim`](Embedder::dim) and unit L2 norm; it is never
    /// the zero vector (see [`fallback_vector`]).
    fn embed(&self, text: &str) -> Vec<f32>;
}

/// Everything that can go wrong while setting up an embedder.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// A file the embedder needs is absent.
    #[error(
        "WordLlama file {} is missing; fetch it once with `scripts/fetch-wordllama.sh {}` \
         (downloads the wordllama==0.4.0.post1 wheel from PyPI)",
        path.display(),
        dir.display()
    )]
    MissingFile {
        /// The missing file.
        path: PathBuf,
        /// The directory that was searched (the argument to pass to the fetch script).
        dir: PathBuf,
    },
    /// A file exists but could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The tokenizer JSON could not be parsed.
    #[error("cannot load tokenizer {}: {message}", path.display())]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// The tokenizer library's message.
        message: String,
    },
    /// The safetensors file is malformed or holds an unexpected tensor.
    #[error("invalid WordLlama weights {}: {message}", path.display())]
    Weights {
        /// The weights file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// [`from_name`] was given a name it does not know.
    #[error("unknown embedder {0:?}; expected \"hash\" or \"wordllama\"")]
    UnknownEmbedder(String),
}

/// Builds an embedder by name: `"hash"` ([`HashEmbedder`]) or `"wordllama"` ([`WordLlama`],
/// loaded from `wordllama_dir`, which is ignored for `"hash"`).
pub fn from_name(name: &str, wordllama_dir: &Path) -> Result<Box<dyn Embedder>, EmbedError> {
    match name {
        "hash" => Ok(Box::new(HashEmbedder::new())),
        "wordllama" => Ok(Box::new(WordLlama::load(wordllama_dir)?)),
        other => Err(EmbedError::UnknownEmbedder(other.to_owned())),
    }
}

/// The capability vector of an agent: the normalised mean of `embed(description)` and
/// `embed(example)` for every example, each input counting once. Empty or blank texts are
/// skipped; with no usable text at all the result is [`fallback_vector`].
///
/// Averaging unit vectors gives the spherical centroid of the agent's texts, so a task phrased
/// like any one example lands close to it; on BANKING77 this beats using the description alone by
/// a wide margin (see `examples/banking77.rs`).
pub fn agent_vector(e: &dyn Embedder, description: &str, examples: &[String]) -> Vec<f32> {
    let mut acc = vec![0f32; e.dim()];
    let texts = std::iter::once(description).chain(examples.iter().map(String::as_str));
    for text in texts.filter(|t| !t.trim().is_empty()) {
        for (a, x) in acc.iter_mut().zip(e.embed(text)) {
            *a += x;
        }
    }
    normalize_or_fallback(&mut acc);
    acc
}

/// The embeddings of an agent's examples taken one by one: `embed(example)` for each non-blank
/// example, in order, at most `max` of them. A node advertises them beside [`agent_vector`] so
/// that routing can score a task by its best-matching example as well as by the centroid (on
/// BANKING77 that lifts top-1 from 79 % to 86 % at 32 examples, see `examples/banking77.rs`).
pub fn example_vectors(e: &dyn Embedder, examples: &[String], max: usize) -> Vec<Vec<f32>> {
    examples
        .iter()
        .filter(|t| !t.trim().is_empty())
        .take(max)
        .map(|t| e.embed(t))
        .collect()
}

/// Cosine similarity of two vectors of the same space (a plain dot product when both are
/// unit-norm, as every embedder output is). Mismatched lengths compare the common prefix.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The fixed vector returned for text without usable content: every component equals
/// `1/sqrt(dim)`. It is a unit vector, deterministic and identical across platforms, and
/// equally (dis)similar to every coordinate axis, so it favours no particular agent.
pub fn fallback_vector(dim: usize) -> Vec<f32> {
    vec![1.0 / (dim.max(1) as f32).sqrt(); dim]
}

/// Scales `v` to unit L2 norm; replaces it by [`fallback_vector`] when its norm is zero or not
/// finite.
pub(crate) fn normalize_or_fallback(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 1e-12 && norm.is_finite() {
        v.iter_mut().for_each(|x| *x /= norm);
    } else {
        let f = 1.0 / (v.len().max(1) as f32).sqrt();
        v.iter_mut().for_each(|x| *x = f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(v: &[f32]) -> f32 {
        v.iter().map(|x| x * x).sum::<f32>().sqrt()
    }

    #[test]
    fn fallback_is_unit() {
        assert!((norm(&fallback_vector(256)) - 1.0).abs() < 1e-5);
        let mut z = vec![0.0; 7];
        normalize_or_fallback(&mut z);
        assert_eq!(z, fallback_vector(7));
    }

    #[test]
    fn agent_vector_is_unit_and_near_its_texts() {
        let e = HashEmbedder::new();
        let ex = vec![
            "please translate this letter into german".to_owned(),
            "german translation of an english text".to_owned(),
        ];
        let a = agent_vector(&e, "translate english to german", &ex);
        assert!((norm(&a) - 1.0).abs() < 1e-5);
        let near = cosine(&a, &e.embed("translate my email to german"));
        let far = cosine(&a, &e.embed("resize a photo to 200 pixels"));
        assert!(near > far + 0.1, "near {near} far {far}");
        assert_eq!(agent_vector(&e, "  ", &[]), fallback_vector(HASH_DIM));
    }

    #[test]
    fn from_name_knows_hash_and_rejects_unknown() {
        let e = from_name("hash", Path::new("/nonexistent")).expect("hash needs no files");
        assert_eq!(e.space(), HASH_SPACE);
        assert_eq!(e.dim(), HASH_DIM);
        let err = from_name("bert", Path::new("/nonexistent")).err();
        assert!(matches!(err, Some(EmbedError::UnknownEmbedder(ref n)) if n == "bert"));
        let err = from_name("wordllama", Path::new("/nonexistent/wl")).err();
        assert!(matches!(err, Some(EmbedError::MissingFile { .. })));
    }
}
