//! The zero-set-up lexical embedder: signed feature hashing into 256 dimensions.

use crate::{Embedder, normalize_or_fallback};

/// Dimension of [`HashEmbedder`] vectors.
pub const HASH_DIM: usize = 256;
/// Embedding-space id of [`HashEmbedder`]. Bump the version whenever the output changes.
pub const HASH_SPACE: &str = "fedmesh-hash-256/v1";

// Feature weights (before sublinear TF). Tuned lightly on BANKING77 (examples/banking77.rs).
const W_WORD: f32 = 1.0;
const W_BIGRAM: f32 = 0.35;
const W_CHARGRAM: f32 = 0.4;
/// Multiplier for features made only of stopwords.
const W_STOP: f32 = 0.5;

// Feature kinds, hashed in so that e.g. the word "ing" and the 3-gram "ing" differ.
const K_WORD: u8 = 1;
const K_BIGRAM: u8 = 2;
const K_CHARGRAM: u8 = 3;

/// Small English stopword list (sorted, for binary search).
const STOPWORDS: &[&str] = &[
    "a", "about", "am", "an", "and", "any", "are", "as", "at", "be", "been", "but", "by", "can",
    "could", "did", "do", "does", "for", "from", "had", "has", "have", "he", "her", "him", "his",
    "how", "i", "if", "in", "into", "is", "it", "its", "me", "my", "of", "on", "or", "our",
    "please", "she", "so", "that", "the", "their", "them", "then", "there", "these", "they",
    "this", "to", "us", "was", "we", "were", "what", "when", "where", "which", "who", "why",
    "will", "with", "would", "you", "your",
];

/// Deterministic lexical embedder; needs no files and no set-up.
///
/// Features, each hashed with a fixed 64-bit FNV-1a + avalanche finaliser (stable across
/// platforms, Rust versions and runs) into one of 256 buckets with a hash-derived sign:
/// * lowercased word unigrams, after a light suffix stemmer (`-s`, `-es`, `-ies`, `-ing`, `-ed`,
///   `-ly`, final `-e`/`-y`, doubled final consonant), so "transfer"/"transferring"/"transferred"
///   share a feature;
/// * bigrams of adjacent stemmed words;
/// * character 3- and 4-grams of each lowercased word wrapped in `<` `>` boundary markers
///   (robust to typos and inflections the stemmer misses).
///
/// Words are maximal runs of alphanumeric characters (apostrophes inside words are dropped, so
/// "don't" is "dont"). Features made only of stopwords are down-weighted ×0.5. A feature seen
/// `tf` times weighs `w·(1 + ln tf)` (sublinear TF). The result is L2-normalised; text with no
/// word at all gives [`crate::fallback_vector`].
#[derive(Debug, Clone, Copy, Default)]
pub struct HashEmbedder;

impl HashEmbedder {
    /// A new hashing embedder (it has no state).
    pub fn new() -> Self {
        Self
    }
}

impl Embedder for HashEmbedder {
    fn space(&self) -> &str {
        HASH_SPACE
    }

    fn dim(&self) -> usize {
        HASH_DIM
    }

    fn embed(&self, text: &str) -> Vec<f32> {
        let words = split_words(text);
        let mut feats: Vec<(u64, f32)> = Vec::with_capacity(words.len() * 12);
        let mut prev: Option<(&str, bool)> = None;
        let mut chars: Vec<char> = Vec::with_capacity(32);
        for w in &words {
            let stop = is_stopword(w);
            let sw = if stop { W_STOP } else { 1.0 };
            let st = stem(w);
            feats.push((Fnv::new(K_WORD).str(st).finish(), W_WORD * sw));
            if let Some((p, pstop)) = prev {
                let wb = if stop && pstop { W_STOP } else { 1.0 };
                let h = Fnv::new(K_BIGRAM).str(p).byte(b' ').str(st).finish();
                feats.push((h, W_BIGRAM * wb));
            }
            prev = Some((st, stop));
            chars.clear();
            chars.push('<');
            chars.extend(w.chars());
            chars.push('>');
            for n in [3, 4] {
                for win in chars.windows(n) {
                    let mut f = Fnv::new(K_CHARGRAM);
                    for &c in win {
                        f = f.char(c);
                    }
                    feats.push((f.finish(), W_CHARGRAM * sw));
                }
            }
        }
        let mut v = vec![0f32; HASH_DIM];
        feats.sort_unstable_by_key(|&(h, _)| h);
        for group in feats.chunk_by(|a, b| a.0 == b.0) {
            let tf = group.len() as f32;
            let mean_w = group.iter().map(|&(_, w)| w).sum::<f32>() / tf;
            let h = group[0].0;
            let sign = if h >> 63 == 1 { -1.0 } else { 1.0 };
            v[(h as usize) % HASH_DIM] += sign * mean_w * (1.0 + tf.ln());
        }
        normalize_or_fallback(&mut v);
        v
    }
}

/// Lowercased words: maximal runs of alphanumeric characters, apostrophes inside words dropped.
fn split_words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    for c in text.chars() {
        if c.is_alphanumeric() {
            cur.extend(c.to_lowercase());
        } else if (c == '\'' || c == '\u{2019}') && !cur.is_empty() {
            // "don't" -> "dont"
        } else if !cur.is_empty() {
            words.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    words
}

fn is_stopword(w: &str) -> bool {
    STOPWORDS.binary_search(&w).is_ok()
}

/// A deliberately light English suffix stemmer; always returns a prefix of `w`.
fn stem(w: &str) -> &str {
    let n = w.len();
    let ends = |xs: &[&str]| xs.iter().any(|x| w.ends_with(x));
    // Checked in this order; the first matching rule strips `cut` bytes (all suffixes are ASCII).
    let cut = if (n >= 5 && ends(&["ies"])) || (n >= 6 && ends(&["ing"])) {
        3
    } else if (n >= 5 && ends(&["ed"]) && !ends(&["eed"]))
        || (n >= 5 && ends(&["ses", "xes", "zes", "ches", "shes"]))
    {
        2
    } else if n >= 4 && ends(&["s"]) && !ends(&["ss", "us", "is"]) {
        1
    } else if n >= 6 && ends(&["ly"]) {
        2
    } else {
        0
    };
    let mut s = &w[..n - cut];
    if s.len() >= 4 && (s.ends_with('e') || s.ends_with('y')) {
        s = &s[..s.len() - 1];
    }
    let b = s.as_bytes();
    if let [.., x, y] = b
        && b.len() >= 4
        && x == y
        && x.is_ascii_alphabetic()
        && !b"aeiouylsz".contains(x)
    {
        s = &s[..s.len() - 1];
    }
    s
}

/// 64-bit FNV-1a with a kind byte as seed and a murmur3-style finaliser for bucket/sign bits.
#[derive(Clone, Copy)]
struct Fnv(u64);

impl Fnv {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    fn new(kind: u8) -> Self {
        Self(Self::OFFSET).byte(kind)
    }

    fn byte(self, b: u8) -> Self {
        Self((self.0 ^ u64::from(b)).wrapping_mul(Self::PRIME))
    }

    fn str(self, s: &str) -> Self {
        s.bytes().fold(self, Self::byte)
    }

    fn char(self, c: char) -> Self {
        let mut buf = [0u8; 4];
        self.str(c.encode_utf8(&mut buf))
    }

    fn finish(self) -> u64 {
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{cosine, fallback_vector};

    #[test]
    fn stopwords_sorted() {
        assert!(STOPWORDS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn stemmer_conflates_inflections() {
        for group in [
            &["transfer", "transfers", "transferring", "transferred"][..],
            &["charge", "charges", "charged", "charging"],
            &["country", "countries"],
            &["box", "boxes"],
            &["need", "needed"],
            &["quick", "quickly"],
            &["add", "added"],
        ] {
            let s0 = stem(group[0]);
            for w in group {
                assert_eq!(stem(w), s0, "{w} vs {}", group[0]);
            }
        }
        assert_eq!(stem("is"), "is");
        assert_eq!(stem("pass"), "pass");
        assert_eq!(stem("bus"), "bus");
        assert_eq!(stem("été"), "été");
    }

    #[test]
    fn words_are_lowercased_and_split() {
        assert_eq!(
            split_words("Don't  STOP-me now!"),
            ["dont", "stop", "me", "now"]
        );
        assert!(split_words(" ,.;- ").is_empty());
    }

    #[test]
    fn unit_norm_and_deterministic() {
        let e = HashEmbedder::new();
        for t in [
            "hello",
            "Translate English to German, please.",
            "ÜBER café 東京 ✓",
            "a",
        ] {
            let v = e.embed(t);
            assert_eq!(v.len(), HASH_DIM);
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((n - 1.0).abs() < 1e-5, "{t}: {n}");
            assert_eq!(v, e.embed(t));
        }
    }

    #[test]
    fn empty_text_gives_fallback() {
        let e = HashEmbedder::new();
        assert_eq!(e.embed(""), fallback_vector(HASH_DIM));
        assert_eq!(e.embed("  ?! "), fallback_vector(HASH_DIM));
    }

    #[test]
    fn case_and_punctuation_do_not_matter() {
        let e = HashEmbedder::new();
        assert_eq!(e.embed("Resize an IMAGE!"), e.embed("resize an image"));
    }

    #[test]
    fn similar_texts_score_higher() {
        let e = HashEmbedder::new();
        let a = e.embed("translate english to german");
        let b = e.embed("translate this text into german");
        let c = e.embed("resize an image");
        let (ab, ac, bc) = (cosine(&a, &b), cosine(&a, &c), cosine(&b, &c));
        assert!(ab > 0.3, "ab {ab}");
        assert!(ab > ac + 0.25 && ab > bc + 0.25, "ab {ab} ac {ac} bc {bc}");
        let t1 = e.embed("transfer money to my account");
        let t2 = e.embed("transferring money into an account");
        let t3 = e.embed("my card was declined at the shop");
        assert!(cosine(&t1, &t2) > cosine(&t1, &t3) + 0.3);
    }

    /// Pins the output so that any change to tokenisation, stemming, hashing or weights is
    /// noticed: such a change must bump `HASH_SPACE`.
    #[test]
    fn golden_values() {
        let v = HashEmbedder::new().embed("Transfer 100 EUR to my German bank account");
        let golden: [(usize, f32); 9] = [
            (0, 0.0),
            (7, 0.090_017_01),
            (19, 0.045_008_507),
            (20, 0.078_764_886),
            (74, 0.315_059_54),
            (167, -0.315_059_54),
            (204, 0.039_382_443),
            (232, 0.202_538_27),
            (253, -0.090_017_01),
        ];
        for (i, want) in golden {
            assert!((v[i] - want).abs() < 1e-6, "v[{i}] = {} != {want}", v[i]);
        }
        assert_eq!(v.iter().filter(|x| **x != 0.0).count(), 61);
    }
}
