//! WordLlama static token embeddings (`wordllama==0.4.0.post1`, MIT): Llama-2 BPE tokenizer and an
//! f16 `[32000 × 256]` embedding table, mean-pooled.

use std::path::Path;

use safetensors::{Dtype, SafeTensors};
use tokenizers::Tokenizer;

use crate::{EmbedError, Embedder, normalize_or_fallback};

/// Tokenizer file, relative to the WordLlama directory (same layout as inside the wheel's
/// `wordllama/` package).
pub const TOKENIZER_FILE: &str = "tokenizers/l2_supercat_tokenizer_config.json";
/// Weights file, relative to the WordLlama directory.
pub const WEIGHTS_FILE: &str = "weights/l2_supercat_256.safetensors";
/// Embedding-space id of [`WordLlama`]. Bump the version whenever the output changes.
pub const WORDLLAMA_SPACE: &str = "wordllama-l2-supercat-256/v1";

const TENSOR: &str = "embedding.weight";

/// The WordLlama "l2_supercat" 256-d neural embedder.
///
/// `embed` tokenizes without special tokens (no `<s>`), averages the f32 rows of the embedding
/// table for the tokens and L2-normalises the mean, as WordLlama's own `embed(norm=True)` does.
/// Text with no token gives [`crate::fallback_vector`].
pub struct WordLlama {
    tokenizer: Tokenizer,
    table: Vec<f32>,
    vocab: usize,
    dim: usize,
}

impl std::fmt::Debug for WordLlama {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WordLlama")
            .field("vocab", &self.vocab)
            .field("dim", &self.dim)
            .finish_non_exhaustive()
    }
}

impl WordLlama {
    /// Loads [`TOKENIZER_FILE`] and [`WEIGHTS_FILE`] from `dir` (the unpacked wheel's `wordllama/`
    /// folder, or what `scripts/fetch-wordllama.sh` installs, by default `third_party/wordllama`).
    /// Takes about a second. A missing file gives [`EmbedError::MissingFile`], naming the file and
    /// the command that fetches it.
    pub fn load(dir: &Path) -> Result<Self, EmbedError> {
        let tok_path = dir.join(TOKENIZER_FILE);
        let wts_path = dir.join(WEIGHTS_FILE);
        for p in [&tok_path, &wts_path] {
            if !p.is_file() {
                return Err(EmbedError::MissingFile {
                    path: p.clone(),
                    dir: dir.to_path_buf(),
                });
            }
        }
        let tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| EmbedError::Tokenizer {
            path: tok_path.clone(),
            message: e.to_string(),
        })?;
        let bytes = std::fs::read(&wts_path).map_err(|source| EmbedError::Io {
            path: wts_path.clone(),
            source,
        })?;
        let (table, vocab, dim) = read_table(&bytes).map_err(|message| EmbedError::Weights {
            path: wts_path,
            message,
        })?;
        let tok_vocab = tokenizer.get_vocab_size(true);
        if tok_vocab > vocab {
            return Err(EmbedError::Tokenizer {
                path: tok_path,
                message: format!("tokenizer has {tok_vocab} tokens but the table only {vocab}"),
            });
        }
        Ok(Self {
            tokenizer,
            table,
            vocab,
            dim,
        })
    }

    fn row(&self, id: u32) -> &[f32] {
        let i = (id as usize).min(self.vocab - 1);
        &self.table[i * self.dim..(i + 1) * self.dim]
    }
}

/// Decodes the `[vocab × dim]` f16 table into f32.
fn read_table(bytes: &[u8]) -> Result<(Vec<f32>, usize, usize), String> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    let t = st.tensor(TENSOR).map_err(|e| e.to_string())?;
    let &[vocab, dim] = t.shape() else {
        return Err(format!("{TENSOR} has shape {:?}, expected 2-D", t.shape()));
    };
    if t.dtype() != Dtype::F16 || vocab == 0 || dim == 0 {
        return Err(format!(
            "{TENSOR} is {:?} {vocab}×{dim}, expected non-empty F16",
            t.dtype()
        ));
    }
    let table = t
        .data()
        .chunks_exact(2)
        .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect();
    Ok((table, vocab, dim))
}

impl Embedder for WordLlama {
    fn space(&self) -> &str {
        WORDLLAMA_SPACE
    }

    fn dim(&self) -> usize {
        self.dim
    }

    fn embed(&self, text: &str) -> Vec<f32> {
        let mut v = vec![0f32; self.dim];
        // Encoding only fails on pathological input (e.g. over-long after truncation rules,
        // which this tokenizer has none of); treat it as "no tokens".
        if let Ok(enc) = self.tokenizer.encode_fast(text, false) {
            for &id in enc.get_ids() {
                for (a, x) in v.iter_mut().zip(self.row(id)) {
                    *a += x;
                }
            }
        }
        normalize_or_fallback(&mut v);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{cosine, fallback_vector};
    use std::path::PathBuf;

    /// `$FEDMESH_WORDLLAMA_DIR`, else `<workspace>/third_party/wordllama`.
    fn default_dir() -> PathBuf {
        std::env::var_os("FEDMESH_WORDLLAMA_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../third_party/wordllama")
            })
    }

    fn loaded() -> Option<WordLlama> {
        let dir = default_dir();
        if !dir.join(WEIGHTS_FILE).is_file() {
            eprintln!(
                "skipping WordLlama test: no weights in {} (run scripts/fetch-wordllama.sh or set \
                 FEDMESH_WORDLLAMA_DIR)",
                dir.display()
            );
            return None;
        }
        Some(WordLlama::load(&dir).expect("weights present but failed to load"))
    }

    #[test]
    fn missing_files_are_named_with_the_fix() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let err = WordLlama::load(tmp.path()).expect_err("empty dir must fail");
        let msg = err.to_string();
        assert!(msg.contains(TOKENIZER_FILE), "{msg}");
        assert!(msg.contains("scripts/fetch-wordllama.sh"), "{msg}");
        assert!(msg.contains(&tmp.path().display().to_string()), "{msg}");

        std::fs::create_dir_all(tmp.path().join("tokenizers")).expect("mkdir");
        std::fs::write(tmp.path().join(TOKENIZER_FILE), "{}").expect("write");
        let msg = WordLlama::load(tmp.path())
            .expect_err("no weights")
            .to_string();
        assert!(msg.contains(WEIGHTS_FILE), "{msg}");
        assert!(msg.contains("scripts/fetch-wordllama.sh"), "{msg}");
    }

    #[test]
    fn corrupt_weights_are_reported() {
        let tmp = tempfile::tempdir().expect("tempdir");
        for (f, body) in [(TOKENIZER_FILE, "{}"), (WEIGHTS_FILE, "not safetensors")] {
            let p = tmp.path().join(f);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(p, body).expect("write");
        }
        let err = WordLlama::load(tmp.path()).expect_err("bad files");
        assert!(matches!(err, EmbedError::Tokenizer { .. }), "{err}");
    }

    #[test]
    fn wordllama_embeds_unit_vectors_that_capture_meaning() {
        let Some(m) = loaded() else { return };
        assert_eq!((m.dim(), m.space()), (256, WORDLLAMA_SPACE));
        assert_ne!(m.space(), crate::HASH_SPACE);
        let caps = [
            "optical character recognition of scanned invoices",
            "translate english text to german",
            "resize and crop images",
        ];
        let caps: Vec<Vec<f32>> = caps.iter().map(|c| m.embed(c)).collect();
        for (q, want) in [
            ("extract the text from this photographed receipt", 0),
            ("convert this paragraph into german language", 1),
            ("make this picture smaller", 2),
        ] {
            let e = m.embed(q);
            let n = e.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((n - 1.0).abs() < 1e-5);
            assert_eq!(e, m.embed(q), "deterministic");
            let best = (0..caps.len())
                .max_by(|&a, &b| cosine(&e, &caps[a]).total_cmp(&cosine(&e, &caps[b])))
                .expect("non-empty");
            assert_eq!(best, want, "{q}");
        }
        assert_eq!(m.embed(""), fallback_vector(256));
    }

    /// The first components of `WordLlamaInference.embed(text, norm=True)` from the Python
    /// package (wordllama 0.4.0.post1, same files): the Rust embedder reproduces the reference.
    #[test]
    fn wordllama_matches_python_reference() {
        let Some(m) = loaded() else { return };
        let cases: [(&str, [f32; 6]); 2] = [
            (
                "How do I locate my card?",
                [0.030982, 0.14129, -0.105237, 0.003137, 0.022046, 0.02244],
            ),
            (
                "ÜBER café 東京 ✓",
                [
                    -0.124721, -0.002059, -0.004853, -0.071849, 0.090797, -0.050609,
                ],
            ),
        ];
        for (text, want) in cases {
            let got = m.embed(text);
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() < 2e-5, "{text}: {:?} vs {want:?}", &got[..6]);
            }
        }
    }
}
