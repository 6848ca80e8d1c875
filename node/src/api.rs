//! The agent-facing JSON API of `docs/agent-api.md`: parsing what agents and requesters publish
//! under `fedmesh/v1/`, and formatting what the node sends back.
//!
//! Parsing is two-step: the payload is decoded into a private `*Json` struct with
//! `deny_unknown_fields` (wrong JSON types and unknown fields are reported with their path, e.g.
//! `resources.capacity` or `embedding.values[3]`), then validated field by field against the
//! protocol limits. Every failure is an [`ApiError`] naming the field and the reason, carrying
//! the request's `request_id` when one was readable, so the error reply can be correlated.
//!
//! The JSON Schemas in `docs/schemas/` describe the same rules.

use std::fmt;

use base64::Engine as _;
use base64::alphabet;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use fedmesh_protocol::limits::{
    MAX_DESCRIPTION_BYTES, MAX_DIM, MAX_EXAMPLE_BYTES, MAX_EXAMPLE_VECTOR_BYTES,
    MAX_EXAMPLE_VECTORS, MAX_EXAMPLES, MAX_LABEL_BYTES, MAX_NOTE_BYTES, MAX_PAYLOAD_BYTES,
    MAX_POLICIES, MAX_REDUNDANCY, MAX_SKILLS, MAX_SPACE_BYTES, MAX_VCV_TTL_MS, MIN_DIM,
};
use fedmesh_protocol::task::{TaskEvent, TaskRecord, TaskState};
use fedmesh_protocol::{
    AgentId, ContentId, Embedding, ExampleVector, Outcome, ResourceLimits, Resources, TaskId,
    TaskSpec,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Longest `request_id`, in bytes.
pub const MAX_REQUEST_ID_BYTES: usize = 128;
/// Longest `reply_to` topic, in bytes.
pub const MAX_TOPIC_BYTES: usize = 1024;
/// Largest JSON payload parsed, in bytes (the broker's `mqtt.max_payload_bytes` default).
pub const MAX_JSON_BYTES: usize = 256 * 1024;
/// Capability lifetime when `ttl_s` is omitted, in seconds.
pub const DEFAULT_TTL_S: u64 = 3600;
/// Longest relative task deadline, in ms (7 days).
pub const MAX_DEADLINE_MS: u64 = 7 * 24 * 3600 * 1000;

/// Base64 decoding: the standard alphabet, padding optional.
const B64_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A refused request: which operation, which field, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    /// The operation (`advertise`, `submit`, ...; `agent`/`client` for an unknown topic).
    pub op: &'static str,
    /// The offending field as a path (`skills[2]`, `embedding.values[3]`), or `payload`/`topic`.
    pub field: String,
    /// Why it was refused.
    pub reason: String,
    /// The request's `request_id`, when the payload carried a valid one.
    pub request_id: Option<String>,
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.op, self.field, self.reason)
    }
}

impl std::error::Error for ApiError {}

/// A vector supplied by the agent or requester instead of the node's own embedding.
#[derive(Clone, Debug, PartialEq)]
pub struct Embedded {
    /// Embedding-space id; vectors of different spaces are never compared.
    pub space: String,
    /// The components (finite, not all zero, `MIN_DIM..=MAX_DIM` of them).
    pub values: Vec<f32>,
}

/// `fedmesh/v1/agent/P/advertise`.
#[derive(Clone, Debug, PartialEq)]
pub struct AdvertiseReq {
    /// What the agent does, in plain language.
    pub description: String,
    /// Example requests it serves well.
    pub examples: Vec<String>,
    /// Skill tags (as given; the node normalises them).
    pub skills: Vec<String>,
    /// Policy labels.
    pub policies: Vec<String>,
    /// Resources offered (`capacity` ≥ 1).
    pub resources: Resources,
    /// The agent's own capability vector, if any.
    pub embedding: Option<Embedded>,
    /// Spec text (goals, tools, rules) to embed, if any.
    pub spec: Option<String>,
    /// Lifetime of this advertisement, in seconds.
    pub ttl_s: u64,
}

/// `fedmesh/v1/client/P/submit`.
#[derive(Clone, Debug, PartialEq)]
pub struct SubmitReq {
    /// The idempotency key, if given.
    pub request_id: Option<String>,
    /// What to do, in plain language.
    pub description: String,
    /// The task input (decoded from `input` or `input_b64`).
    pub input: Vec<u8>,
    /// Required skills.
    pub skills: Vec<String>,
    /// Required policy labels.
    pub policies: Vec<String>,
    /// Resource limits.
    pub limits: ResourceLimits,
    /// Relative deadline in ms, if given.
    pub deadline_ms: Option<u64>,
    /// Reply topic, if given.
    pub reply_to: Option<String>,
    /// The requester's own requirement vector, if any.
    pub embedding: Option<Embedded>,
    /// Spec text to embed, if any.
    pub spec: Option<String>,
    /// How many distinct agents should run it.
    pub redundancy: u8,
}

/// `fedmesh/v1/agent/P/progress`.
#[derive(Clone, Debug, PartialEq)]
pub struct ProgressReq {
    /// The task.
    pub task_id: TaskId,
    /// 0–100.
    pub percent: u8,
    /// Free text (truncated to `MAX_NOTE_BYTES`).
    pub note: String,
}

/// `fedmesh/v1/agent/P/result`.
#[derive(Clone, Debug, PartialEq)]
pub struct ResultReq {
    /// The task.
    pub task_id: TaskId,
    /// Output, or the failure reason (truncated to `MAX_NOTE_BYTES`).
    pub outcome: Outcome,
}

/// `fedmesh/v1/client/P/status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StatusReq {
    /// By task id.
    Task(TaskId),
    /// By the requester's `request_id`.
    Request(String),
}

/// What an agent asked for.
// Parsed once per message and moved out at once: boxing the advertise buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum AgentOp {
    /// Publish or refresh its capability vector.
    Advertise(AdvertiseReq),
    /// Leave.
    Withdraw,
    /// Progress on a task.
    Progress(ProgressReq),
    /// The outcome of a task.
    Result(ResultReq),
}

/// What a requester asked for.
// Same as `AgentOp`: parsed once, moved out at once.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum ClientOp {
    /// A new task.
    Submit(SubmitReq),
    /// The state of a task.
    Status(StatusReq),
}

// ---------------------------------------------------------------------------------------------
// Wire structs. Every field is optional at this level so that "required" is reported by the
// validation below with the field's name; `null` means absent.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmbeddingJson {
    space: Option<String>,
    values: Option<Vec<f32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResourcesJson {
    latency_ms: Option<u32>,
    cost_micros: Option<u64>,
    capacity: Option<u16>,
    max_input_bytes: Option<u32>,
    context_tokens: Option<u32>,
    tokens_per_s: Option<u32>,
    gpu_mem_mb: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsJson {
    max_latency_ms: Option<u32>,
    max_cost_micros: Option<u64>,
    min_context_tokens: Option<u32>,
    min_gpu_mem_mb: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdvertiseJson {
    description: Option<String>,
    examples: Option<Vec<String>>,
    skills: Option<Vec<String>>,
    policies: Option<Vec<String>>,
    resources: Option<ResourcesJson>,
    embedding: Option<EmbeddingJson>,
    spec: Option<String>,
    ttl_s: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WithdrawJson {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProgressJson {
    task_id: Option<String>,
    percent: Option<u8>,
    note: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResultJson {
    task_id: Option<String>,
    output: Option<String>,
    output_b64: Option<String>,
    error: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitJson {
    request_id: Option<String>,
    description: Option<String>,
    input: Option<String>,
    input_b64: Option<String>,
    skills: Option<Vec<String>>,
    policies: Option<Vec<String>>,
    limits: Option<LimitsJson>,
    deadline_ms: Option<u64>,
    reply_to: Option<String>,
    embedding: Option<EmbeddingJson>,
    spec: Option<String>,
    redundancy: Option<u8>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusJson {
    task_id: Option<String>,
    request_id: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Parsing.

/// Parses what an agent published on `fedmesh/v1/agent/P/<op>`.
pub fn parse_agent(op: &str, payload: &[u8]) -> Result<AgentOp, ApiError> {
    match op {
        "advertise" => {
            let mut cx = Cx::new("advertise");
            let j: AdvertiseJson = cx.decode(payload)?;
            cx.advertise(j).map(AgentOp::Advertise)
        }
        "withdraw" => {
            let mut cx = Cx::new("withdraw");
            if !payload.iter().all(u8::is_ascii_whitespace) {
                let WithdrawJson {} = cx.decode(payload)?;
            }
            Ok(AgentOp::Withdraw)
        }
        "progress" => {
            let mut cx = Cx::new("progress");
            let j: ProgressJson = cx.decode(payload)?;
            cx.progress(j).map(AgentOp::Progress)
        }
        "result" => {
            let mut cx = Cx::new("result");
            let j: ResultJson = cx.decode(payload)?;
            cx.result(j).map(AgentOp::Result)
        }
        other => Err(Cx::new("agent").err(
            "topic",
            format!(
                "unknown operation {:?}; expected advertise, withdraw, progress or result",
                truncated(other, 64)
            ),
        )),
    }
}

/// Parses what a requester published on `fedmesh/v1/client/P/<op>`.
pub fn parse_client(op: &str, payload: &[u8]) -> Result<ClientOp, ApiError> {
    match op {
        "submit" => {
            let mut cx = Cx::new("submit");
            let j: SubmitJson = cx.decode(payload)?;
            cx.submit(j).map(ClientOp::Submit)
        }
        "status" => {
            let mut cx = Cx::new("status");
            let j: StatusJson = cx.decode(payload)?;
            cx.status(j).map(ClientOp::Status)
        }
        other => Err(Cx::new("client").err(
            "topic",
            format!(
                "unknown operation {:?}; expected submit or status",
                truncated(other, 64)
            ),
        )),
    }
}

/// Parsing context: the operation, and the request id once known (for error replies).
struct Cx {
    op: &'static str,
    request_id: Option<String>,
}

impl Cx {
    fn new(op: &'static str) -> Self {
        Self {
            op,
            request_id: None,
        }
    }

    fn err(&self, field: impl Into<String>, reason: impl Into<String>) -> ApiError {
        ApiError {
            op: self.op,
            field: field.into(),
            reason: reason.into(),
            request_id: self.request_id.clone(),
        }
    }

    /// UTF-8 → JSON object → (request id noted) → `T`, errors naming the JSON path.
    fn decode<T: DeserializeOwned>(&mut self, payload: &[u8]) -> Result<T, ApiError> {
        if payload.len() > MAX_JSON_BYTES {
            return Err(self.err(
                "payload",
                format!("{} bytes, at most {MAX_JSON_BYTES}", payload.len()),
            ));
        }
        let text = std::str::from_utf8(payload)
            .map_err(|e| self.err("payload", format!("not UTF-8: {e}")))?;
        if text.trim().is_empty() {
            return Err(self.err("payload", "empty; expected a JSON object"));
        }
        let value: Value = serde_json::from_str(text)
            .map_err(|e| self.err("payload", format!("not valid JSON: {e}")))?;
        let Value::Object(map) = value else {
            return Err(self.err(
                "payload",
                format!("expected a JSON object, got {}", json_kind(&value)),
            ));
        };
        if let Some(Value::String(id)) = map.get("request_id")
            && request_id_problem(id).is_none()
        {
            self.request_id = Some(id.clone());
        }
        serde_path_to_error::deserialize(Value::Object(map)).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." {
                "payload".to_string()
            } else {
                path
            };
            self.err(field, e.into_inner().to_string())
        })
    }

    fn advertise(&self, j: AdvertiseJson) -> Result<AdvertiseReq, ApiError> {
        let description =
            self.required_text("description", j.description, MAX_DESCRIPTION_BYTES)?;
        let examples = j.examples.unwrap_or_default();
        if examples.len() > MAX_EXAMPLES {
            return Err(self.err(
                "examples",
                format!("{} examples, at most {MAX_EXAMPLES}", examples.len()),
            ));
        }
        for (i, e) in examples.iter().enumerate() {
            let field = format!("examples[{i}]");
            if e.trim().is_empty() {
                return Err(self.err(field, "must not be empty"));
            }
            self.max_len(&field, e, MAX_EXAMPLE_BYTES)?;
        }
        let skills = self.labels("skills", j.skills, MAX_SKILLS)?;
        let policies = self.labels("policies", j.policies, MAX_POLICIES)?;
        let resources = match j.resources {
            None => Resources {
                capacity: 1,
                ..Resources::default()
            },
            Some(r) => {
                let capacity = r.capacity.unwrap_or(1);
                if capacity == 0 {
                    return Err(self.err("resources.capacity", "must be at least 1"));
                }
                Resources {
                    latency_ms: r.latency_ms.unwrap_or(0),
                    cost_micros: r.cost_micros.unwrap_or(0),
                    capacity,
                    max_input_bytes: r.max_input_bytes.unwrap_or(0),
                    context_tokens: r.context_tokens.unwrap_or(0),
                    tokens_per_s: r.tokens_per_s.unwrap_or(0),
                    gpu_mem_mb: r.gpu_mem_mb.unwrap_or(0),
                }
            }
        };
        let embedding = j.embedding.map(|e| self.embedding(e)).transpose()?;
        let spec = self.optional_text("spec", j.spec, MAX_DESCRIPTION_BYTES)?;
        let max_ttl_s = MAX_VCV_TTL_MS / 1000;
        let ttl_s = j.ttl_s.unwrap_or(DEFAULT_TTL_S);
        if ttl_s == 0 || ttl_s > max_ttl_s {
            return Err(self.err(
                "ttl_s",
                format!("must be 1..={max_ttl_s} (seconds), got {ttl_s}"),
            ));
        }
        Ok(AdvertiseReq {
            description,
            examples,
            skills,
            policies,
            resources,
            embedding,
            spec,
            ttl_s,
        })
    }

    fn progress(&self, j: ProgressJson) -> Result<ProgressReq, ApiError> {
        let task_id = self.task_id("task_id", j.task_id)?;
        let percent = j.percent.unwrap_or(0);
        if percent > 100 {
            return Err(self.err("percent", format!("must be 0..=100, got {percent}")));
        }
        let note = truncated(&j.note.unwrap_or_default(), MAX_NOTE_BYTES).to_string();
        Ok(ProgressReq {
            task_id,
            percent,
            note,
        })
    }

    fn result(&self, j: ResultJson) -> Result<ResultReq, ApiError> {
        let task_id = self.task_id("task_id", j.task_id)?;
        let outcome = match (j.output, j.output_b64, j.error) {
            (Some(out), None, None) => {
                self.max_len("output", &out, MAX_PAYLOAD_BYTES)?;
                Outcome::Ok(out.into_bytes())
            }
            (None, Some(b64), None) => Outcome::Ok(self.base64("output_b64", &b64)?),
            (None, None, Some(error)) => {
                if error.trim().is_empty() {
                    return Err(self.err("error", "must not be empty"));
                }
                Outcome::Failed(truncated(&error, MAX_NOTE_BYTES).to_string())
            }
            (None, None, None) => {
                return Err(self.err("output", "required: one of output, output_b64 or error"));
            }
            (_, b64, _) => {
                // Two or more given: name the one that should not be there.
                let field = if b64.is_some() { "output_b64" } else { "error" };
                return Err(self.err(field, "give exactly one of output, output_b64 or error"));
            }
        };
        Ok(ResultReq { task_id, outcome })
    }

    fn submit(&self, j: SubmitJson) -> Result<SubmitReq, ApiError> {
        if let Some(id) = &j.request_id
            && let Some(reason) = request_id_problem(id)
        {
            return Err(self.err("request_id", reason));
        }
        let description =
            self.required_text("description", j.description, MAX_DESCRIPTION_BYTES)?;
        let input = match (j.input, j.input_b64) {
            (Some(_), Some(_)) => {
                return Err(self.err("input_b64", "give either input or input_b64, not both"));
            }
            (Some(text), None) => {
                self.max_len("input", &text, MAX_PAYLOAD_BYTES)?;
                text.into_bytes()
            }
            (None, Some(b64)) => self.base64("input_b64", &b64)?,
            (None, None) => Vec::new(),
        };
        let skills = self.labels("skills", j.skills, MAX_SKILLS)?;
        let policies = self.labels("policies", j.policies, MAX_POLICIES)?;
        let limits = j
            .limits
            .map_or_else(ResourceLimits::default, |l| ResourceLimits {
                max_latency_ms: l.max_latency_ms.unwrap_or(0),
                max_cost_micros: l.max_cost_micros.unwrap_or(0),
                min_context_tokens: l.min_context_tokens.unwrap_or(0),
                min_gpu_mem_mb: l.min_gpu_mem_mb.unwrap_or(0),
            });
        if let Some(d) = j.deadline_ms
            && (d == 0 || d > MAX_DEADLINE_MS)
        {
            return Err(self.err(
                "deadline_ms",
                format!("must be 1..={MAX_DEADLINE_MS} (ms from now), got {d}"),
            ));
        }
        if let Some(topic) = &j.reply_to
            && let Some(reason) = reply_topic_problem(topic)
        {
            return Err(self.err("reply_to", reason));
        }
        let embedding = j.embedding.map(|e| self.embedding(e)).transpose()?;
        let spec = self.optional_text("spec", j.spec, MAX_DESCRIPTION_BYTES)?;
        let redundancy = j.redundancy.unwrap_or(1);
        if redundancy == 0 || redundancy > MAX_REDUNDANCY {
            return Err(self.err(
                "redundancy",
                format!("must be 1..={MAX_REDUNDANCY}, got {redundancy}"),
            ));
        }
        Ok(SubmitReq {
            request_id: j.request_id,
            description,
            input,
            skills,
            policies,
            limits,
            deadline_ms: j.deadline_ms,
            reply_to: j.reply_to,
            embedding,
            spec,
            redundancy,
        })
    }

    fn status(&self, j: StatusJson) -> Result<StatusReq, ApiError> {
        match (j.task_id, j.request_id) {
            (Some(_), Some(_)) => {
                Err(self.err("request_id", "give either task_id or request_id, not both"))
            }
            (Some(id), None) => self.task_id("task_id", Some(id)).map(StatusReq::Task),
            (None, Some(id)) => match request_id_problem(&id) {
                Some(reason) => Err(self.err("request_id", reason)),
                None => Ok(StatusReq::Request(id)),
            },
            (None, None) => Err(self.err("task_id", "required: task_id or request_id")),
        }
    }

    // --- field validators -------------------------------------------------------------------

    fn max_len(&self, field: &str, text: &str, max: usize) -> Result<(), ApiError> {
        if text.len() > max {
            return Err(self.err(field, format!("{} bytes, at most {max}", text.len())));
        }
        Ok(())
    }

    fn required_text(
        &self,
        field: &str,
        text: Option<String>,
        max: usize,
    ) -> Result<String, ApiError> {
        let Some(text) = text else {
            return Err(self.err(field, "required"));
        };
        if text.trim().is_empty() {
            return Err(self.err(field, "must not be empty"));
        }
        self.max_len(field, &text, max)?;
        Ok(text)
    }

    fn optional_text(
        &self,
        field: &str,
        text: Option<String>,
        max: usize,
    ) -> Result<Option<String>, ApiError> {
        match text {
            Some(t) if t.trim().is_empty() => Ok(None),
            Some(t) => {
                self.max_len(field, &t, max)?;
                Ok(Some(t))
            }
            None => Ok(None),
        }
    }

    fn labels(
        &self,
        field: &str,
        labels: Option<Vec<String>>,
        max: usize,
    ) -> Result<Vec<String>, ApiError> {
        let labels = labels.unwrap_or_default();
        if labels.len() > max {
            return Err(self.err(field, format!("{} labels, at most {max}", labels.len())));
        }
        for (i, l) in labels.iter().enumerate() {
            let field = format!("{field}[{i}]");
            if l.is_empty() {
                return Err(self.err(field, "must not be empty"));
            }
            self.max_len(&field, l, MAX_LABEL_BYTES)?;
            if l.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(self.err(field, "must not contain whitespace or control characters"));
            }
        }
        Ok(labels)
    }

    fn embedding(&self, e: EmbeddingJson) -> Result<Embedded, ApiError> {
        let Some(space) = e.space else {
            return Err(self.err("embedding.space", "required"));
        };
        if space.is_empty() {
            return Err(self.err("embedding.space", "must not be empty"));
        }
        self.max_len("embedding.space", &space, MAX_SPACE_BYTES)?;
        if space.chars().any(char::is_control) {
            return Err(self.err("embedding.space", "must not contain control characters"));
        }
        let Some(values) = e.values else {
            return Err(self.err("embedding.values", "required"));
        };
        if !(MIN_DIM..=MAX_DIM).contains(&values.len()) {
            return Err(self.err(
                "embedding.values",
                format!("{} dimensions, must be {MIN_DIM}..={MAX_DIM}", values.len()),
            ));
        }
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(self.err(
                format!("embedding.values[{i}]"),
                "not a finite 32-bit float",
            ));
        }
        let norm = values.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm == 0.0 {
            return Err(self.err("embedding.values", "all-zero vector"));
        }
        if !norm.is_finite() {
            return Err(self.err(
                "embedding.values",
                "components too large (the norm overflows)",
            ));
        }
        Ok(Embedded { space, values })
    }

    fn task_id(&self, field: &str, id: Option<String>) -> Result<TaskId, ApiError> {
        let Some(id) = id else {
            return Err(self.err(field, "required"));
        };
        if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(self.err(field, "must be 32 hex characters"));
        }
        TaskId::from_hex(&id).ok_or_else(|| self.err(field, "must be 32 hex characters"))
    }

    fn base64(&self, field: &str, text: &str) -> Result<Vec<u8>, ApiError> {
        // Refuse before decoding anything larger than the limit can produce.
        let max_encoded = MAX_PAYLOAD_BYTES.div_ceil(3) * 4;
        if text.len() > max_encoded {
            return Err(self.err(
                field,
                format!("decodes to more than {MAX_PAYLOAD_BYTES} bytes"),
            ));
        }
        let bytes = B64_LENIENT
            .decode(text)
            .map_err(|e| self.err(field, format!("invalid base64: {e}")))?;
        if bytes.len() > MAX_PAYLOAD_BYTES {
            return Err(self.err(
                field,
                format!(
                    "decodes to {} bytes, at most {MAX_PAYLOAD_BYTES}",
                    bytes.len()
                ),
            ));
        }
        Ok(bytes)
    }
}

/// Why `id` is not a valid `request_id`, if it is not.
pub fn request_id_problem(id: &str) -> Option<String> {
    if id.is_empty() {
        return Some("must not be empty".into());
    }
    if id.len() > MAX_REQUEST_ID_BYTES {
        return Some(format!(
            "{} bytes, at most {MAX_REQUEST_ID_BYTES}",
            id.len()
        ));
    }
    if id.chars().any(char::is_control) {
        return Some("must not contain control characters".into());
    }
    None
}

/// Why `topic` is not a usable reply topic, if it is not.
pub fn reply_topic_problem(topic: &str) -> Option<String> {
    if topic.is_empty() {
        return Some("must not be empty".into());
    }
    if topic.len() > MAX_TOPIC_BYTES {
        return Some(format!("{} bytes, at most {MAX_TOPIC_BYTES}", topic.len()));
    }
    if topic.contains(['+', '#']) {
        return Some("must not contain the wildcards + or #".into());
    }
    if topic.starts_with('$') {
        return Some("must not start with $ (reserved topics)".into());
    }
    if topic.chars().any(char::is_control) {
        return Some("must not contain control characters".into());
    }
    None
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn truncated(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

// ---------------------------------------------------------------------------------------------
// Formatting. Replies are serialised from structs so that keys keep the documented order
// (`type` first); absent fields are left out.

/// Text when valid UTF-8, else base64: (`text`, `b64`) with exactly one set.
fn text_or_b64(bytes: &[u8]) -> (Option<&str>, Option<String>) {
    match std::str::from_utf8(bytes) {
        Ok(s) => (Some(s), None),
        Err(_) => (None, Some(STANDARD.encode(bytes))),
    }
}

/// Every reply but `task`, in one shape.
#[derive(Default, Serialize)]
struct Reply<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    op: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    task_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    state: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    agent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    attempts: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    percent: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    vcv_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output_b64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
}

impl<'a> Reply<'a> {
    fn task(kind: &'a str, task: TaskId, request_id: &'a str) -> Self {
        Self {
            kind,
            task_id: Some(task.to_string()),
            request_id: Some(request_id),
            ..Self::default()
        }
    }

    fn outcome(mut self, outcome: &'a Outcome) -> Self {
        match outcome {
            Outcome::Ok(out) => (self.output, self.output_b64) = text_or_b64(out),
            Outcome::Failed(reason) => self.error = Some(reason),
        }
        self
    }

    fn to_vec(&self) -> Vec<u8> {
        to_json(self)
    }
}

/// `{"type":"task", ...}`.
#[derive(Serialize)]
struct TaskJson<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    task_id: String,
    attempt: u32,
    description: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    input: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    input_b64: Option<String>,
    skills: &'a [String],
    policies: &'a [String],
    deadline_ms: u64,
}

/// JSON of plain strings, integers and sequences: serialisation cannot fail, but should it,
/// an empty object is sent rather than panicking.
/// The per-example vectors the node puts into an advertised VCV: `embed(example)` for each
/// non-blank example, in order, as many as [`MAX_EXAMPLE_VECTORS`] and
/// [`MAX_EXAMPLE_VECTOR_BYTES`] allow at the capability's dimension.
///
/// Empty when `capability` is not in the embedder's space and dimension (the agent sent its own
/// vector of another model): example vectors must share the capability's space.
pub fn example_vectors(
    embedder: &dyn fedmesh_embed::Embedder,
    examples: &[String],
    capability: &Embedding,
) -> Vec<ExampleVector> {
    let dim = capability.dim();
    if capability.space != embedder.space() || dim != embedder.dim() || dim == 0 {
        return Vec::new();
    }
    let most = MAX_EXAMPLE_VECTORS.min(MAX_EXAMPLE_VECTOR_BYTES / dim);
    fedmesh_embed::example_vectors(embedder, examples, most)
        .iter()
        .filter_map(|v| ExampleVector::quantise(v))
        .collect()
}

fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec())
}

/// `{"type":"task", ...}`: a task for an agent's inbox.
pub fn task_message(spec: &TaskSpec, attempt: u32) -> Vec<u8> {
    let (input, input_b64) = text_or_b64(&spec.input);
    to_json(&TaskJson {
        kind: "task",
        task_id: spec.id.to_string(),
        attempt,
        description: &spec.description,
        input,
        input_b64,
        skills: &spec.skills,
        policies: &spec.policies,
        deadline_ms: spec.deadline_ms,
    })
}

/// `{"type":"advertised", ...}`: the answer to an advertise.
pub fn advertised_message(
    agent: &AgentId,
    version: u64,
    vcv_id: &ContentId,
    expires_at_ms: u64,
) -> Vec<u8> {
    Reply {
        kind: "advertised",
        agent: Some(agent.to_string()),
        version: Some(version),
        vcv_id: Some(vcv_id.to_string()),
        expires_at_ms: Some(expires_at_ms),
        ..Reply::default()
    }
    .to_vec()
}

/// `{"type":"withdrawn", ...}`: the answer to a withdraw.
pub fn withdrawn_message(agent: &AgentId) -> Vec<u8> {
    Reply {
        kind: "withdrawn",
        agent: Some(agent.to_string()),
        ..Reply::default()
    }
    .to_vec()
}

/// A requester notification: `accepted`, `status`, `progress` or `result`.
pub fn event_message(task: TaskId, request_id: &str, event: &TaskEvent) -> Vec<u8> {
    let reply = match event {
        TaskEvent::Accepted { state } => Reply {
            state: Some(state.as_str()),
            ..Reply::task("accepted", task, request_id)
        },
        TaskEvent::Status { state, agent, note } => Reply {
            state: Some(state.as_str()),
            agent: agent.as_ref().map(ToString::to_string),
            note: note.as_deref(),
            ..Reply::task("status", task, request_id)
        },
        TaskEvent::Progress {
            agent,
            percent,
            note,
        } => Reply {
            state: Some(TaskState::Running.as_str()),
            agent: Some(agent.to_string()),
            percent: Some(*percent),
            note: Some(note),
            ..Reply::task("progress", task, request_id)
        },
        TaskEvent::Finished {
            state,
            agent,
            outcome,
        } => Reply {
            state: Some(state.as_str()),
            agent: agent.as_ref().map(ToString::to_string),
            ..Reply::task("result", task, request_id)
        }
        .outcome(outcome),
    };
    reply.to_vec()
}

/// `{"type":"error", ...}`: a refused request.
pub fn error_message(err: &ApiError) -> Vec<u8> {
    Reply {
        kind: "error",
        op: Some(err.op),
        request_id: err.request_id.as_deref(),
        field: Some(&err.field),
        reason: Some(&err.reason),
        ..Reply::default()
    }
    .to_vec()
}

/// `{"type":"status", ...}`: the answer to a status request, with the outcome once final.
pub fn status_message(record: &TaskRecord) -> Vec<u8> {
    let reply = Reply {
        state: Some(record.state.as_str()),
        agent: record.agent.as_ref().map(ToString::to_string),
        attempts: Some(record.attempts),
        ..Reply::task("status", record.spec.id, &record.requester.request_id)
    };
    match &record.outcome {
        Some(outcome) if record.state.is_final() => reply.outcome(outcome).to_vec(),
        _ => reply.to_vec(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use fedmesh_embed::Embedder as _;
    use fedmesh_protocol::keys::{AgentName, NodeId};
    use fedmesh_protocol::task::Requester;
    use serde_json::json;

    const ID: &str = "00112233445566778899aabbccddeeff";

    /// A `dim`-dimensional test embedder: a one-hot vector chosen by the text's length.
    struct OneHot(usize);

    impl fedmesh_embed::Embedder for OneHot {
        fn space(&self) -> &str {
            "one-hot/v1"
        }
        fn dim(&self) -> usize {
            self.0
        }
        fn embed(&self, text: &str) -> Vec<f32> {
            let mut v = vec![0.0; self.0];
            v[text.len() % self.0] = 1.0;
            v
        }
    }

    #[test]
    fn example_vectors_follow_the_examples_within_the_limits() {
        let e = fedmesh_embed::HashEmbedder::new();
        let examples: Vec<String> = ["translate to German", "  ", "say hello in French"]
            .map(String::from)
            .to_vec();
        let v = fedmesh_embed::agent_vector(&e, "translator", &examples);
        let capability = Embedding::quantise(e.space(), &v).unwrap();
        let got = example_vectors(&e, &examples, &capability);
        // One per non-blank example, in order, quantised from the embedder's own vector.
        let want: Vec<ExampleVector> = [&examples[0], &examples[2]]
            .iter()
            .map(|t| ExampleVector::quantise(&e.embed(t)).unwrap())
            .collect();
        assert_eq!(got, want);
        // The agent's own vector of another space: no example vectors (they could not be
        // compared with it).
        let own = Embedding::quantise("their-model/v1", &v).unwrap();
        assert!(example_vectors(&e, &examples, &own).is_empty());
        // Many examples: at most MAX_EXAMPLE_VECTORS at 256-d, fewer at 1024-d (byte budget).
        let many: Vec<String> = (0..MAX_EXAMPLES).map(|i| "x".repeat(i + 1)).collect();
        for (dim, most) in [
            (256, MAX_EXAMPLE_VECTORS),
            (1024, MAX_EXAMPLE_VECTOR_BYTES / 1024),
        ] {
            let e = OneHot(dim);
            let c = Embedding::quantise(e.space(), &e.embed("c")).unwrap();
            let got = example_vectors(&e, &many, &c);
            assert_eq!(got.len(), most, "{dim}-d");
            assert!(got.iter().all(|x| x.dim() == dim));
        }
    }

    fn vec_json(values: &[&str]) -> String {
        format!("[{}]", values.join(","))
    }

    fn n_strings(n: usize, f: impl Fn(usize) -> String) -> String {
        let v: Vec<String> = (0..n).map(|i| format!("{:?}", f(i))).collect();
        format!("[{}]", v.join(","))
    }

    /// (op, payload, expected field). Agent ops first, then client ops.
    fn bad_corpus() -> Vec<(&'static str, Vec<u8>, &'static str)> {
        let long_desc = "x".repeat(MAX_DESCRIPTION_BYTES + 1);
        let eight = vec_json(&["0.1"; 8]);
        let mut values_bad_type: Vec<&str> = vec!["0.1"; 8];
        values_bad_type[3] = "\"x\"";
        let mut values_inf: Vec<&str> = vec!["0.1"; 8];
        values_inf[3] = "1e39";
        let b = |s: String| s.into_bytes();
        vec![
            ("advertise", b("not json".into()), "payload"),
            ("advertise", b("[1,2]".into()), "payload"),
            ("advertise", vec![b'{', 0xff, b'}'], "payload"),
            ("advertise", Vec::new(), "payload"),
            ("advertise", b("{}".into()), "description"),
            (
                "advertise",
                b(r#"{"description": 5}"#.into()),
                "description",
            ),
            (
                "advertise",
                b(r#"{"description": "   "}"#.into()),
                "description",
            ),
            (
                "advertise",
                b(format!(r#"{{"description": "{long_desc}"}}"#)),
                "description",
            ),
            (
                "advertise",
                b(r#"{"description":"d","skills":"ocr"}"#.into()),
                "skills",
            ),
            (
                "advertise",
                b(r#"{"description":"d","skills":["a","b","c d"]}"#.into()),
                "skills[2]",
            ),
            (
                "advertise",
                b(format!(
                    r#"{{"description":"d","skills":{}}}"#,
                    n_strings(MAX_SKILLS + 1, |i| format!("s{i}"))
                )),
                "skills",
            ),
            (
                "advertise",
                b(format!(
                    r#"{{"description":"d","skills":["{}"]}}"#,
                    "k".repeat(MAX_LABEL_BYTES + 1)
                )),
                "skills[0]",
            ),
            (
                "advertise",
                b(format!(
                    r#"{{"description":"d","examples":{}}}"#,
                    n_strings(MAX_EXAMPLES + 1, |i| format!("e{i}"))
                )),
                "examples",
            ),
            (
                "advertise",
                b(format!(
                    r#"{{"description":"d","examples":["ok","{}"]}}"#,
                    "e".repeat(MAX_EXAMPLE_BYTES + 1)
                )),
                "examples[1]",
            ),
            (
                "advertise",
                b(r#"{"description":"d","resources":{"capacity":0}}"#.into()),
                "resources.capacity",
            ),
            (
                "advertise",
                b(r#"{"description":"d","resources":{"capacity":"4"}}"#.into()),
                "resources.capacity",
            ),
            (
                "advertise",
                b(r#"{"description":"d","resources":{"capacity":70000}}"#.into()),
                "resources.capacity",
            ),
            (
                "advertise",
                b(r#"{"description":"d","resources":{"cpus":2}}"#.into()),
                "resources.cpus",
            ),
            (
                "advertise",
                b(r#"{"description":"d","embedding":{"space":"m","values":[1,2,3,4]}}"#.into()),
                "embedding.values",
            ),
            (
                "advertise",
                b(format!(
                    r#"{{"description":"d","embedding":{{"space":"m","values":{}}}}}"#,
                    vec_json(&["0"; 8])
                )),
                "embedding.values",
            ),
            (
                "advertise",
                b(format!(
                    r#"{{"description":"d","embedding":{{"space":"m","values":{}}}}}"#,
                    vec_json(&values_bad_type)
                )),
                "embedding.values[3]",
            ),
            (
                "advertise",
                b(format!(
                    r#"{{"description":"d","embedding":{{"space":"m","values":{}}}}}"#,
                    vec_json(&values_inf)
                )),
                "embedding.values[3]",
            ),
            (
                "advertise",
                b(format!(
                    r#"{{"description":"d","embedding":{{"space":"","values":{eight}}}}}"#
                )),
                "embedding.space",
            ),
            (
                "advertise",
                b(format!(
                    r#"{{"description":"d","embedding":{{"space":"{}","values":{eight}}}}}"#,
                    "s".repeat(MAX_SPACE_BYTES + 1)
                )),
                "embedding.space",
            ),
            (
                "advertise",
                b(r#"{"description":"d","embedding":{"space":"m"}}"#.into()),
                "embedding.values",
            ),
            (
                "advertise",
                b(r#"{"description":"d","ttl_s":0}"#.into()),
                "ttl_s",
            ),
            (
                "advertise",
                b(format!(
                    r#"{{"description":"d","ttl_s":{}}}"#,
                    MAX_VCV_TTL_MS / 1000 + 1
                )),
                "ttl_s",
            ),
            (
                "advertise",
                b(r#"{"description":"d","foo":1}"#.into()),
                "foo",
            ),
            ("withdraw", b(r#"{"reason":"bye"}"#.into()), "reason"),
            ("withdraw", b("[]".into()), "payload"),
            (
                "progress",
                b(r#"{"task_id":"abc","percent":5}"#.into()),
                "task_id",
            ),
            ("progress", b(r#"{"percent":5}"#.into()), "task_id"),
            (
                "progress",
                b(format!(r#"{{"task_id":"{ID}","percent":101}}"#)),
                "percent",
            ),
            (
                "progress",
                b(format!(r#"{{"task_id":"{ID}","percent":-1}}"#)),
                "percent",
            ),
            ("result", b(format!(r#"{{"task_id":"{ID}"}}"#)), "output"),
            (
                "result",
                b(format!(r#"{{"task_id":"{ID}","output":"a","error":"b"}}"#)),
                "error",
            ),
            (
                "result",
                b(format!(
                    r#"{{"task_id":"{ID}","output":"a","output_b64":"YQ=="}}"#
                )),
                "output_b64",
            ),
            (
                "result",
                b(format!(
                    r#"{{"task_id":"{ID}","output_b64":"!!notbase64"}}"#
                )),
                "output_b64",
            ),
            (
                "result",
                b(format!(
                    r#"{{"task_id":"{ID}","output":"{}"}}"#,
                    "o".repeat(MAX_PAYLOAD_BYTES + 1)
                )),
                "output",
            ),
            (
                "result",
                b(format!(r#"{{"task_id":"{ID}","error":""}}"#)),
                "error",
            ),
            (
                "result",
                b(format!(r#"{{"task_id":"+{}","output":"a"}}"#, &ID[1..])),
                "task_id",
            ),
            ("bogus", b("{}".into()), "topic"),
            ("submit", b("{}".into()), "description"),
            (
                "submit",
                b(format!(
                    r#"{{"description":"d","input":"{}"}}"#,
                    "i".repeat(MAX_PAYLOAD_BYTES + 1)
                )),
                "input",
            ),
            (
                "submit",
                b(r#"{"description":"d","input_b64":"a$b="}"#.into()),
                "input_b64",
            ),
            (
                "submit",
                b(r#"{"description":"d","input":"a","input_b64":"YQ=="}"#.into()),
                "input_b64",
            ),
            (
                "submit",
                b(r#"{"description":"d","deadline_ms":0}"#.into()),
                "deadline_ms",
            ),
            (
                "submit",
                b(r#"{"description":"d","deadline_ms":1.5}"#.into()),
                "deadline_ms",
            ),
            (
                "submit",
                b(r#"{"description":"d","reply_to":"a/+/b"}"#.into()),
                "reply_to",
            ),
            (
                "submit",
                b(r#"{"description":"d","reply_to":"a/#"}"#.into()),
                "reply_to",
            ),
            (
                "submit",
                b(r#"{"description":"d","reply_to":""}"#.into()),
                "reply_to",
            ),
            (
                "submit",
                b(r#"{"description":"d","reply_to":"$SYS/x"}"#.into()),
                "reply_to",
            ),
            (
                "submit",
                b(format!(
                    r#"{{"description":"d","request_id":"{}"}}"#,
                    "r".repeat(MAX_REQUEST_ID_BYTES + 1)
                )),
                "request_id",
            ),
            (
                "submit",
                b(r#"{"description":"d","request_id":"a\u0007b"}"#.into()),
                "request_id",
            ),
            (
                "submit",
                b(r#"{"description":"d","redundancy":0}"#.into()),
                "redundancy",
            ),
            (
                "submit",
                b(format!(
                    r#"{{"description":"d","redundancy":{}}}"#,
                    MAX_REDUNDANCY + 1
                )),
                "redundancy",
            ),
            (
                "submit",
                b(r#"{"description":"d","limits":{"max_latency_ms":-5}}"#.into()),
                "limits.max_latency_ms",
            ),
            (
                "submit",
                b(r#"{"description":"d","policies":["gdpr",""]}"#.into()),
                "policies[1]",
            ),
            (
                "submit",
                b(r#"{"description":"d","skills":[1]}"#.into()),
                "skills[0]",
            ),
            (
                "submit",
                b(r#"{"description":"d","priority":9}"#.into()),
                "priority",
            ),
            ("status", b("{}".into()), "task_id"),
            (
                "status",
                b(format!(r#"{{"task_id":"{ID}","request_id":"r"}}"#)),
                "request_id",
            ),
            (
                "status",
                b(r#"{"task_id":"zz112233445566778899aabbccddeeff"}"#.into()),
                "task_id",
            ),
            ("advertise", b(r#"{"description":"d"}"#.into()), "topic"),
        ]
    }

    fn parse(op: &str, payload: &[u8]) -> Result<(), ApiError> {
        match op {
            "advertise" | "withdraw" | "progress" | "result" | "bogus" => {
                parse_agent(op, payload).map(drop)
            }
            _ => parse_client(op, payload).map(drop),
        }
    }

    #[test]
    fn bad_payloads_name_the_field() {
        let corpus = bad_corpus();
        assert!(corpus.len() >= 25);
        let mut failures = Vec::new();
        for (i, (op, payload, field)) in corpus.iter().enumerate() {
            // The last entry sends an agent op to the client parser: an unknown client op.
            let result = if i == corpus.len() - 1 {
                parse_client(op, payload).map(drop)
            } else {
                parse(op, payload)
            };
            match result {
                Ok(()) => {
                    failures.push(format!("#{i} {op}: accepted, expected an error on {field}"))
                }
                Err(e) => {
                    if e.field != *field {
                        failures.push(format!(
                            "#{i} {op}: field {:?} ({}), expected {field}",
                            e.field, e.reason
                        ));
                    }
                    assert!(!e.reason.is_empty(), "#{i}: empty reason");
                    assert!(
                        e.to_string()
                            .starts_with(&format!("{}: {}: ", e.op, e.field))
                    );
                }
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn errors_carry_the_request_id() {
        let e = parse_client(
            "submit",
            br#"{"request_id":"r-1","description":"d","deadline_ms":0}"#,
        )
        .unwrap_err();
        assert_eq!(e.request_id.as_deref(), Some("r-1"));
        assert_eq!((e.op, e.field.as_str()), ("submit", "deadline_ms"));
        // Also when the failure is a JSON type error caught by serde.
        let e = parse_client("submit", br#"{"request_id":"r-2","description":7}"#).unwrap_err();
        assert_eq!(e.request_id.as_deref(), Some("r-2"));
        assert_eq!(e.field, "description");
        // An invalid request id is not echoed.
        let e = parse_client("submit", br#"{"request_id":"","description":"d"}"#).unwrap_err();
        assert_eq!((e.field.as_str(), e.request_id), ("request_id", None));
        let e = parse_client("status", br#"{"request_id":"q","task_id":"x"}"#).unwrap_err();
        assert_eq!(e.request_id.as_deref(), Some("q"));
        let reply: Value = serde_json::from_slice(&error_message(&e)).unwrap();
        assert_eq!(reply["request_id"], "q");
    }

    #[test]
    fn advertise_round_trip() {
        let values: Vec<String> = (0..16)
            .map(|i| format!("{}", (i as f32 - 7.5) / 10.0))
            .collect();
        let payload = format!(
            r#"{{"description":"Translates English text into German.",
                "examples":["translate 'good morning' to German"],
                "skills":["translation","german"], "policies":["gdpr"],
                "resources":{{"latency_ms":200,"cost_micros":0,"capacity":4,"max_input_bytes":262144}},
                "embedding":{{"space":"my-model/v1","values":[{}]}},
                "spec":"never stores input", "ttl_s":600}}"#,
            values.join(",")
        );
        let AgentOp::Advertise(a) = parse_agent("advertise", payload.as_bytes()).unwrap() else {
            panic!("not an advertise")
        };
        assert_eq!(a.description, "Translates English text into German.");
        assert_eq!(a.examples.len(), 1);
        assert_eq!(a.skills, ["translation", "german"]);
        assert_eq!(a.policies, ["gdpr"]);
        assert_eq!(a.resources.capacity, 4);
        assert_eq!(a.resources.latency_ms, 200);
        assert_eq!(a.resources.max_input_bytes, 262_144);
        let e = a.embedding.unwrap();
        assert_eq!((e.space.as_str(), e.values.len()), ("my-model/v1", 16));
        assert_eq!(a.spec.as_deref(), Some("never stores input"));
        assert_eq!(a.ttl_s, 600);

        // Only description is required; capacity defaults to 1 and ttl to an hour.
        let AgentOp::Advertise(a) =
            parse_agent("advertise", br#"{"description":"echo","embedding":null}"#).unwrap()
        else {
            panic!("not an advertise")
        };
        assert_eq!(
            (a.resources.capacity, a.ttl_s, a.embedding, a.spec),
            (1, DEFAULT_TTL_S, None, None)
        );
        let AgentOp::Advertise(a) = parse_agent(
            "advertise",
            br#"{"description":"e","resources":{"latency_ms":5}}"#,
        )
        .unwrap() else {
            panic!("not an advertise")
        };
        assert_eq!(a.resources.capacity, 1);
    }

    #[test]
    fn agent_ops_round_trip() {
        assert_eq!(parse_agent("withdraw", b"").unwrap(), AgentOp::Withdraw);
        assert_eq!(parse_agent("withdraw", b" {} ").unwrap(), AgentOp::Withdraw);
        let task_id = TaskId::from_hex(ID).unwrap();
        assert_eq!(
            parse_agent(
                "progress",
                format!(r#"{{"task_id":"{ID}","percent":50,"note":"halfway"}}"#).as_bytes()
            )
            .unwrap(),
            AgentOp::Progress(ProgressReq {
                task_id,
                percent: 50,
                note: "halfway".into()
            })
        );
        let long_note = "é".repeat(MAX_NOTE_BYTES);
        let AgentOp::Progress(p) = parse_agent(
            "progress",
            format!(
                r#"{{"task_id":"{}","note":"{long_note}"}}"#,
                ID.to_uppercase()
            )
            .as_bytes(),
        )
        .unwrap() else {
            panic!("not progress")
        };
        assert_eq!((p.task_id, p.percent), (task_id, 0));
        assert!(p.note.len() <= MAX_NOTE_BYTES && p.note.len() >= MAX_NOTE_BYTES - 1);

        // Every outcome form round-trips through the formatter's own encoding.
        for outcome in [
            Outcome::Ok(b"Danke".to_vec()),
            Outcome::Ok(vec![0, 159, 146, 150, 255]),
            Outcome::Ok(Vec::new()),
            Outcome::Failed("no German today".into()),
        ] {
            let mut reply = Reply::default().outcome(&outcome);
            reply.task_id = Some(ID.into());
            let mut v: Value = serde_json::from_slice(&reply.to_vec()).unwrap();
            v.as_object_mut().unwrap().remove("type");
            let payload = v.to_string();
            assert_eq!(
                parse_agent("result", payload.as_bytes()).unwrap(),
                AgentOp::Result(ResultReq {
                    task_id,
                    outcome: outcome.clone()
                }),
                "{payload}"
            );
        }
        // Unpadded base64 is accepted too.
        let AgentOp::Result(r) = parse_agent(
            "result",
            format!(r#"{{"task_id":"{ID}","output_b64":"YQ"}}"#).as_bytes(),
        )
        .unwrap() else {
            panic!("not a result")
        };
        assert_eq!(r.outcome, Outcome::Ok(b"a".to_vec()));
    }

    #[test]
    fn submit_and_status_round_trip() {
        let payload = br#"{"request_id": "r-1", "description": "translate 'thank you' into German", "input": "thank you",
            "skills": ["translation"], "policies": [], "limits": {"max_latency_ms": 100, "max_cost_micros": 0},
            "deadline_ms": 30000, "reply_to": "my/reply/topic", "embedding": null, "redundancy": 2}"#;
        let ClientOp::Submit(s) = parse_client("submit", payload).unwrap() else {
            panic!("not a submit")
        };
        assert_eq!(s.request_id.as_deref(), Some("r-1"));
        assert_eq!(s.description, "translate 'thank you' into German");
        assert_eq!(s.input, b"thank you");
        assert_eq!(s.skills, ["translation"]);
        assert_eq!(s.limits.max_latency_ms, 100);
        assert_eq!(s.deadline_ms, Some(30_000));
        assert_eq!(s.reply_to.as_deref(), Some("my/reply/topic"));
        assert_eq!((s.embedding, s.redundancy), (None, 2));

        let ClientOp::Submit(s) =
            parse_client("submit", br#"{"description":"d","input_b64":"AP8="}"#).unwrap()
        else {
            panic!("not a submit")
        };
        assert_eq!(
            (s.input, s.request_id, s.deadline_ms, s.redundancy),
            (vec![0, 255], None, None, 1)
        );

        let task_id = TaskId::from_hex(ID).unwrap();
        assert_eq!(
            parse_client("status", format!(r#"{{"task_id":"{ID}"}}"#).as_bytes()).unwrap(),
            ClientOp::Status(StatusReq::Task(task_id))
        );
        assert_eq!(
            parse_client("status", br#"{"request_id":"r-1"}"#).unwrap(),
            ClientOp::Status(StatusReq::Request("r-1".into()))
        );
    }

    fn agent() -> AgentId {
        AgentId::new(NodeId([7; 32]), AgentName::new("translator").unwrap())
    }

    fn keys(v: &Value) -> Vec<&str> {
        let mut k: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        k.sort_unstable();
        k
    }

    fn parsed(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).unwrap()
    }

    #[test]
    fn task_message_is_documented_json() {
        let key = fedmesh_protocol::sample::key(1);
        let mut spec = fedmesh_protocol::sample::task(&key, "r-1", 1_000);
        spec.input = b"thank you".to_vec();
        let v = parsed(&task_message(&spec, 2));
        assert_eq!(
            keys(&v),
            [
                "attempt",
                "deadline_ms",
                "description",
                "input",
                "policies",
                "skills",
                "task_id",
                "type"
            ]
        );
        assert_eq!(v["type"], "task");
        assert_eq!(v["task_id"], spec.id.to_string());
        assert_eq!(v["attempt"], 2);
        assert_eq!(v["input"], "thank you");
        assert_eq!(v["skills"], json!(["ocr"]));
        assert_eq!(v["deadline_ms"], spec.deadline_ms);

        spec.input = vec![0xff, 0x00];
        let v = parsed(&task_message(&spec, 1));
        assert!(v.get("input").is_none());
        assert_eq!(v["input_b64"], "/wA=");
    }

    #[test]
    fn agent_replies_are_documented_json() {
        let v = parsed(&advertised_message(&agent(), 3, &ContentId([9; 32]), 42));
        assert_eq!(
            keys(&v),
            ["agent", "expires_at_ms", "type", "vcv_id", "version"]
        );
        assert_eq!(v["type"], "advertised");
        assert_eq!(v["agent"], agent().to_string());
        assert!(v["agent"].as_str().unwrap().starts_with("translator@"));
        assert_eq!(v["vcv_id"], "09".repeat(32));
        assert_eq!(
            (v["version"].as_u64(), v["expires_at_ms"].as_u64()),
            (Some(3), Some(42))
        );

        let v = parsed(&withdrawn_message(&agent()));
        assert_eq!(keys(&v), ["agent", "type"]);
        assert_eq!(v["type"], "withdrawn");
    }

    #[test]
    fn events_are_documented_json() {
        let task = TaskId::from_hex(ID).unwrap();
        let ev = |e: TaskEvent| parsed(&event_message(task, "r-1", &e));

        let v = ev(TaskEvent::Accepted {
            state: TaskState::Accepted,
        });
        assert_eq!(keys(&v), ["request_id", "state", "task_id", "type"]);
        assert_eq!(
            (
                v["type"].as_str(),
                v["state"].as_str(),
                v["task_id"].as_str()
            ),
            (Some("accepted"), Some("accepted"), Some(ID))
        );
        assert_eq!(v["request_id"], "r-1");

        let v = ev(TaskEvent::Status {
            state: TaskState::Assigned,
            agent: Some(agent()),
            note: None,
        });
        assert_eq!(
            keys(&v),
            ["agent", "request_id", "state", "task_id", "type"]
        );
        assert_eq!(
            (v["type"].as_str(), v["state"].as_str()),
            (Some("status"), Some("assigned"))
        );
        let v = ev(TaskEvent::Status {
            state: TaskState::Routed,
            agent: None,
            note: Some("waiting".into()),
        });
        assert_eq!(keys(&v), ["note", "request_id", "state", "task_id", "type"]);

        let v = ev(TaskEvent::Progress {
            agent: agent(),
            percent: 50,
            note: "halfway".into(),
        });
        assert_eq!(
            keys(&v),
            [
                "agent",
                "note",
                "percent",
                "request_id",
                "state",
                "task_id",
                "type"
            ]
        );
        assert_eq!(
            (v["type"].as_str(), v["percent"].as_u64()),
            (Some("progress"), Some(50))
        );

        let v = ev(TaskEvent::Finished {
            state: TaskState::Completed,
            agent: Some(agent()),
            outcome: Outcome::Ok(b"Danke".to_vec()),
        });
        assert_eq!(
            keys(&v),
            ["agent", "output", "request_id", "state", "task_id", "type"]
        );
        assert_eq!(
            (
                v["type"].as_str(),
                v["state"].as_str(),
                v["output"].as_str()
            ),
            (Some("result"), Some("completed"), Some("Danke"))
        );
        let v = ev(TaskEvent::Finished {
            state: TaskState::Completed,
            agent: Some(agent()),
            outcome: Outcome::Ok(vec![0xc3]),
        });
        assert_eq!(v["output_b64"], "ww==");
        let v = ev(TaskEvent::Finished {
            state: TaskState::Expired,
            agent: None,
            outcome: Outcome::Failed("deadline passed".into()),
        });
        assert_eq!(
            keys(&v),
            ["error", "request_id", "state", "task_id", "type"]
        );
        assert_eq!(
            (v["state"].as_str(), v["error"].as_str()),
            (Some("expired"), Some("deadline passed"))
        );
    }

    #[test]
    fn error_and_status_are_documented_json() {
        let err = ApiError {
            op: "submit",
            field: "deadline_ms".into(),
            reason: "must be > 0".into(),
            request_id: Some("r-1".into()),
        };
        assert_eq!(err.to_string(), "submit: deadline_ms: must be > 0");
        let v = parsed(&error_message(&err));
        assert_eq!(
            v,
            json!({"type": "error", "op": "submit", "request_id": "r-1", "field": "deadline_ms", "reason": "must be > 0"})
        );
        let v = parsed(&error_message(&ApiError {
            request_id: None,
            ..err
        }));
        assert_eq!(keys(&v), ["field", "op", "reason", "type"]);

        let key = fedmesh_protocol::sample::key(1);
        let spec = fedmesh_protocol::sample::task(&key, "r-1", 1_000);
        let mut record = TaskRecord {
            spec,
            requester: Requester {
                principal: "alice".into(),
                request_id: "r-1".into(),
                reply_topic: "t".into(),
                correlation: None,
            },
            state: TaskState::Running,
            agent: Some(agent()),
            attempts: 1,
            tried: vec![agent()],
            attempt_deadline_ms: 0,
            outcome: None,
            delivered: false,
            updated_at_ms: 0,
        };
        let v = parsed(&status_message(&record));
        assert_eq!(
            keys(&v),
            [
                "agent",
                "attempts",
                "request_id",
                "state",
                "task_id",
                "type"
            ]
        );
        assert_eq!(
            (
                v["type"].as_str(),
                v["state"].as_str(),
                v["attempts"].as_u64()
            ),
            (Some("status"), Some("running"), Some(1))
        );
        record.state = TaskState::Completed;
        record.outcome = Some(Outcome::Ok(b"Danke".to_vec()));
        let v = parsed(&status_message(&record));
        assert_eq!(v["output"], "Danke");
        record.state = TaskState::Failed;
        record.outcome = Some(Outcome::Failed("gave up".into()));
        let v = parsed(&status_message(&record));
        assert_eq!(
            (v["state"].as_str(), v["error"].as_str()),
            (Some("failed"), Some("gave up"))
        );
    }

    #[test]
    fn type_comes_first() {
        let key = fedmesh_protocol::sample::key(1);
        let spec = fedmesh_protocol::sample::task(&key, "r-1", 1_000);
        let task = TaskId::from_hex(ID).unwrap();
        let err = ApiError {
            op: "submit",
            field: "f".into(),
            reason: "r".into(),
            request_id: None,
        };
        for bytes in [
            task_message(&spec, 1),
            advertised_message(&agent(), 1, &ContentId([0; 32]), 1),
            withdrawn_message(&agent()),
            event_message(
                task,
                "r",
                &TaskEvent::Accepted {
                    state: TaskState::Accepted,
                },
            ),
            error_message(&err),
        ] {
            let text = String::from_utf8(bytes).unwrap();
            assert!(text.starts_with("{\"type\":"), "{text}");
        }
        let text = String::from_utf8(error_message(&err)).unwrap();
        assert_eq!(
            text,
            r#"{"type":"error","op":"submit","field":"f","reason":"r"}"#
        );
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        assert_eq!(truncated("héllo", 2), "h");
        assert_eq!(truncated("héllo", 3), "hé");
        assert_eq!(truncated("abc", 10), "abc");
    }
}
