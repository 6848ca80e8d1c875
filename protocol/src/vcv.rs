//! The Versioned Capability Vector (FoA's `VCV = (c, s, r, p, e, v)`), signed by its host node.

use serde::{Deserialize, Serialize};

use crate::error::Rejection;
use crate::keys::{AgentId, NodeId};
use crate::limits::*;

/// A dense, L2-normalised embedding in a named embedding space.
///
/// On the wire and in storage it is quantised to one signed byte per dimension with one `f32`
/// scale (`v[i] ≈ q[i] · scale`): 4× smaller than `f32`, with a cosine error far below the
/// differences routing cares about. Vectors of different [`Embedding::space`]s are never compared.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Embedding {
    /// Embedding-space id, e.g. `fedmesh-hash-256/v1`.
    pub space: String,
    /// Dequantisation scale.
    pub scale: f32,
    /// Quantised components; `q.len()` is the dimension.
    pub q: Vec<i8>,
}

impl std::fmt::Debug for Embedding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Embedding({}, {}-d)", self.space, self.q.len())
    }
}

impl Embedding {
    /// Quantises `values` (which need not be normalised: they are L2-normalised first).
    ///
    /// Returns `None` for an empty, all-zero or non-finite vector.
    pub fn quantise(space: impl Into<String>, values: &[f32]) -> Option<Self> {
        let norm = values.iter().map(|x| x * x).sum::<f32>().sqrt();
        if values.is_empty() || !norm.is_finite() || norm == 0.0 {
            return None;
        }
        let max = values.iter().fold(0f32, |m, x| m.max(x.abs())) / norm;
        let scale = max / 127.0;
        let q = values
            .iter()
            .map(|x| (x / norm / scale).round().clamp(-127.0, 127.0) as i8)
            .collect();
        Some(Self {
            space: space.into(),
            scale,
            q,
        })
    }

    /// The dimension.
    pub fn dim(&self) -> usize {
        self.q.len()
    }

    /// The dequantised values, renormalised to unit length.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut v: Vec<f32> = self.q.iter().map(|&x| f32::from(x) * self.scale).collect();
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        if n > 0.0 {
            v.iter_mut().for_each(|x| *x /= n);
        }
        v
    }

    /// Checks finiteness, dimension bounds and normalisation. `field` names the field in errors.
    pub fn validate(&self, field: &'static str) -> Result<(), Rejection> {
        check_len(field, self.space.len(), MAX_SPACE_BYTES)?;
        if self.space.is_empty() {
            return Err(Rejection::Malformed("empty embedding space id"));
        }
        if !(MIN_DIM..=MAX_DIM).contains(&self.q.len()) {
            return Err(Rejection::DimensionOutOfRange {
                field,
                dim: self.q.len(),
            });
        }
        check_quantised(field, self.scale, &self.q)
    }
}

/// Checks that `q · scale` is finite and unit-norm (within [`NORM_TOLERANCE`]).
fn check_quantised(field: &'static str, scale: f32, q: &[i8]) -> Result<(), Rejection> {
    if !scale.is_finite() || scale <= 0.0 {
        return Err(Rejection::NotFinite { field });
    }
    let norm = q
        .iter()
        .map(|&x| {
            let v = f32::from(x) * scale;
            v * v
        })
        .sum::<f32>()
        .sqrt();
    if !norm.is_finite() {
        return Err(Rejection::NotFinite { field });
    }
    if (norm - 1.0).abs() > NORM_TOLERANCE {
        return Err(Rejection::NotNormalised { field, norm });
    }
    Ok(())
}

/// The embedding of one of an agent's examples, in the space and dimension of the agent's
/// [`Vcv::capability`] (so it carries no space id of its own), quantised like [`Embedding`].
///
/// Routing scores an agent by a blend of the task's cosine to the capability centroid and to
/// the agent's best-matching example ([`crate::router::capability_similarity`]): a mean of many
/// examples blurs the distinct ways one capability is asked for, the best single example keeps
/// them.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct ExampleVector {
    /// Dequantisation scale.
    pub scale: f32,
    /// Quantised components; `q.len()` equals the capability's dimension.
    pub q: Vec<i8>,
}

impl std::fmt::Debug for ExampleVector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ExampleVector({}-d)", self.q.len())
    }
}

impl ExampleVector {
    /// Quantises `values` (L2-normalised first) exactly as [`Embedding::quantise`] does.
    ///
    /// Returns `None` for an empty, all-zero or non-finite vector.
    pub fn quantise(values: &[f32]) -> Option<Self> {
        Embedding::quantise(String::new(), values).map(|e| Self {
            scale: e.scale,
            q: e.q,
        })
    }

    /// The dimension.
    pub fn dim(&self) -> usize {
        self.q.len()
    }
}

/// A 256-bit Bloom filter over skill tags (k = 3), FoA's fast skill pre-filter.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SkillBloom(pub [u8; 32]);

impl std::fmt::Debug for SkillBloom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ones: u32 = self.0.iter().map(|b| b.count_ones()).sum();
        write!(f, "SkillBloom({ones} bits)")
    }
}

impl SkillBloom {
    const K: usize = 3;

    /// The filter of a set of tags (case-insensitive).
    pub fn of<'a>(tags: impl IntoIterator<Item = &'a str>) -> Self {
        let mut bloom = Self::default();
        for tag in tags {
            bloom.insert(tag);
        }
        bloom
    }

    /// Adds a tag.
    pub fn insert(&mut self, tag: &str) {
        let h = blake3::derive_key(
            "fedmesh skill bloom v1",
            tag.to_ascii_lowercase().as_bytes(),
        );
        for &byte in &h[..Self::K] {
            let bit = byte as usize;
            self.0[bit / 8] |= 1 << (bit % 8);
        }
    }

    /// True when every bit of `required` is set here: all required skills may be present
    /// (false positives possible, false negatives impossible).
    pub fn may_contain_all(&self, required: &SkillBloom) -> bool {
        self.0.iter().zip(&required.0).all(|(a, r)| a & r == *r)
    }
}

/// Resources and guarantees an agent offers (FoA's `r`). Units are in the names.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// Typical latency of one task, in ms (0 = unknown).
    pub latency_ms: u32,
    /// Cost of one task, in millionths of the federation's accounting unit.
    pub cost_micros: u64,
    /// How many tasks the agent runs at once.
    pub capacity: u16,
    /// Largest task input the agent accepts, in bytes.
    pub max_input_bytes: u32,
    /// Context window, in tokens (0 = not applicable).
    pub context_tokens: u32,
    /// Throughput, in tokens per second (0 = unknown).
    pub tokens_per_s: u32,
    /// GPU memory, in MiB (0 = none).
    pub gpu_mem_mb: u32,
}

/// Resource limits a task demands (FoA's `r_t`). `0` means "no limit".
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceLimits {
    /// Largest acceptable typical latency, in ms.
    pub max_latency_ms: u32,
    /// Largest acceptable cost, in micros.
    pub max_cost_micros: u64,
    /// Smallest acceptable context window, in tokens.
    pub min_context_tokens: u32,
    /// Smallest acceptable GPU memory, in MiB.
    pub min_gpu_mem_mb: u32,
}

/// A signed, versioned capability vector: what one agent can do.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Vcv {
    /// The agent; `agent.node` must be the envelope's signer.
    pub agent: AgentId,
    /// Version `v`, strictly increasing per agent.
    pub version: u64,
    /// When the host node issued this version, ms since the Unix epoch.
    pub issued_at_ms: u64,
    /// When it stops being valid, ms since the Unix epoch.
    pub expires_at_ms: u64,
    /// Plain-language description (A2A agent card style).
    pub description: String,
    /// Example requests the agent serves well.
    pub examples: Vec<String>,
    /// Capability embedding `c`.
    pub capability: Embedding,
    /// Skill tags `s` (sorted, unique, lowercase).
    pub skills: Vec<String>,
    /// Bloom filter of `skills`, for pre-filtering; must equal `SkillBloom::of(skills)`.
    pub skill_bloom: SkillBloom,
    /// Resources `r`.
    pub resources: Resources,
    /// Policy-compliance labels `p` (sorted, unique).
    pub policies: Vec<String>,
    /// Optional spec embedding `e` (goals, tools, rules).
    pub spec: Option<Embedding>,
    /// One embedding per example (at most [`MAX_EXAMPLE_VECTORS`], together at most
    /// [`MAX_EXAMPLE_VECTOR_BYTES`] components), in `capability`'s space and dimension; may be
    /// empty, and then routing uses `capability` alone. Added with envelope version 2.
    pub example_vectors: Vec<ExampleVector>,
}

impl Vcv {
    /// Canonicalises labels (lowercase skills; sorted, deduplicated skills and policies) and
    /// recomputes the Bloom filter. Call before signing.
    pub fn normalise(&mut self) {
        normalise_labels(&mut self.skills, true);
        normalise_labels(&mut self.policies, false);
        self.skill_bloom = SkillBloom::of(self.skills.iter().map(String::as_str));
    }

    /// Checks everything that does not depend on time or on other VCVs.
    pub fn validate_static(&self, signer: &NodeId) -> Result<(), Rejection> {
        if &self.agent.node != signer {
            return Err(Rejection::HostMismatch);
        }
        check_len("description", self.description.len(), MAX_DESCRIPTION_BYTES)?;
        check_count("examples", self.examples.len(), MAX_EXAMPLES)?;
        for e in &self.examples {
            check_len("examples[]", e.len(), MAX_EXAMPLE_BYTES)?;
        }
        check_labels("skills", &self.skills, MAX_SKILLS, true)?;
        check_labels("policies", &self.policies, MAX_POLICIES, false)?;
        if self.skill_bloom != SkillBloom::of(self.skills.iter().map(String::as_str)) {
            return Err(Rejection::BloomMismatch);
        }
        self.capability.validate("capability")?;
        if let Some(spec) = &self.spec {
            spec.validate("spec")?;
            if spec.space == self.capability.space && spec.dim() != self.capability.dim() {
                return Err(Rejection::DimensionMismatch {
                    field: "spec",
                    expected: self.capability.dim(),
                    got: spec.dim(),
                });
            }
        }
        check_count(
            "example_vectors",
            self.example_vectors.len(),
            MAX_EXAMPLE_VECTORS,
        )?;
        let components: usize = self.example_vectors.iter().map(ExampleVector::dim).sum();
        check_len("example_vectors", components, MAX_EXAMPLE_VECTOR_BYTES)?;
        for x in &self.example_vectors {
            if x.dim() != self.capability.dim() {
                return Err(Rejection::DimensionMismatch {
                    field: "example_vectors[]",
                    expected: self.capability.dim(),
                    got: x.dim(),
                });
            }
            check_quantised("example_vectors[]", x.scale, &x.q)?;
        }
        if self.resources.capacity == 0 {
            return Err(Rejection::Malformed(
                "resources.capacity must be at least 1",
            ));
        }
        if self.expires_at_ms <= self.issued_at_ms {
            return Err(Rejection::Malformed(
                "expires_at_ms must be after issued_at_ms",
            ));
        }
        if self.expires_at_ms - self.issued_at_ms > MAX_VCV_TTL_MS {
            return Err(Rejection::TtlTooLong {
                ttl_ms: self.expires_at_ms - self.issued_at_ms,
            });
        }
        Ok(())
    }

    /// Checks the validity window against `now_ms`.
    pub fn validate_time(&self, now_ms: u64) -> Result<(), Rejection> {
        check_time(self.issued_at_ms, Some(self.expires_at_ms), now_ms)
    }
}

pub(crate) fn check_time(
    issued_at_ms: u64,
    expires_at_ms: Option<u64>,
    now_ms: u64,
) -> Result<(), Rejection> {
    if issued_at_ms > now_ms.saturating_add(MAX_CLOCK_SKEW_MS) {
        return Err(Rejection::IssuedInFuture {
            issued_at_ms,
            now_ms,
        });
    }
    if let Some(expires_at_ms) = expires_at_ms
        && expires_at_ms <= now_ms
    {
        return Err(Rejection::Expired {
            expires_at_ms,
            now_ms,
        });
    }
    Ok(())
}

/// Lowercases (optionally), sorts and deduplicates labels.
pub fn normalise_labels(labels: &mut Vec<String>, lowercase: bool) {
    if lowercase {
        labels
            .iter_mut()
            .for_each(|l| *l = l.trim().to_ascii_lowercase());
    }
    labels.sort();
    labels.dedup();
}

pub(crate) fn check_len(field: &'static str, len: usize, max: usize) -> Result<(), Rejection> {
    if len > max {
        return Err(Rejection::TooLong { field, len, max });
    }
    Ok(())
}

pub(crate) fn check_count(field: &'static str, count: usize, max: usize) -> Result<(), Rejection> {
    if count > max {
        return Err(Rejection::TooMany { field, count, max });
    }
    Ok(())
}

/// Labels must be within limits, non-empty, printable, sorted and unique (so that the encoding
/// of a label set is canonical), and lowercase where `lowercase` is set.
pub(crate) fn check_labels(
    field: &'static str,
    labels: &[String],
    max: usize,
    lowercase: bool,
) -> Result<(), Rejection> {
    check_count(field, labels.len(), max)?;
    for l in labels {
        check_len(field, l.len(), MAX_LABEL_BYTES)?;
        if l.is_empty()
            || l.chars().any(|c| c.is_control() || c.is_whitespace())
            || (lowercase && l.bytes().any(|b| b.is_ascii_uppercase()))
        {
            return Err(Rejection::BadLabel { field });
        }
    }
    if labels.windows(2).any(|w| w[0] >= w[1]) {
        return Err(Rejection::BadLabel { field });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantise_round_trip_keeps_direction() {
        let v: Vec<f32> = (0..256)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let e = Embedding::quantise("s", &v).expect("quantise");
        e.validate("c").expect("valid");
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        let cos: f32 = e.to_f32().iter().zip(&v).map(|(a, b)| a * b / n).sum();
        assert!(cos > 0.999, "cos {cos}");
        assert!(Embedding::quantise("s", &[0.0; 16]).is_none());
        assert!(Embedding::quantise("s", &[f32::NAN; 16]).is_none());
    }

    #[test]
    fn bloom_prefilter() {
        let have = SkillBloom::of(["ocr", "pdf", "german"]);
        assert!(have.may_contain_all(&SkillBloom::of(["OCR", "pdf"])));
        assert!(have.may_contain_all(&SkillBloom::default()));
        assert!(!have.may_contain_all(&SkillBloom::of(["translation-zz-9"])));
    }
}
