//! Counting the messages rumqttd drops for slow subscribers.
//!
//! rumqttd keeps one in-memory commit log per subscription filter, of a bounded number
//! of segments (sizes from the memory budget, see `fedmesh_broker::BrokerLimits`). When
//! a subscriber lags by more than the log, the oldest segment is dropped and the
//! subscriber's read cursor silently jumps to the new head: the messages in between are
//! lost for it. rumqttd neither counts nor reports this except as a `warn` event
//!
//! ```text
//! target rumqttd::router::routing, fields request_cursor = (seg, offset),
//! start_cursor = (seg, offset), error = "Read cursor start jumped from … to … on FILTER"
//! ```
//!
//! (rumqttd 0.20 `router/routing.rs`, `forward_device_data`; offsets are absolute message
//! numbers in the log, so `start.offset - request.offset` messages were skipped), plus a
//! `warn` from `rumqttd::segments` for the same jump. [`DropLog`] is a
//! `tracing_subscriber::Layer` that recognises the jump and
//!
//! * adds the skipped messages to `fedmesh_broker_dropped_total{reason="slow_subscriber"}`
//!   and counts the jump in `fedmesh_broker_drop_events_total{reason="slow_subscriber"}`
//!   (registered by `metrics::Metrics::new` from [`DropCounters::global`]);
//! * has its [`Summarizer`] log a summary at most once per second (`warn`, target
//!   `fedmesh::droplog`, from a thread of its own), in place of rumqttd's own lines, which
//!   come once per pass of the router during a flood: the binary's fmt layer filters
//!   those callsites out ([`is_rumqttd_drop_callsite`]).
//!
//! The layer must see rumqttd's `warn` events whatever the log filter says, so the
//! binary installs it with its own per-layer filter ([`DropLog::filter`]) next to the fmt
//! layer's `EnvFilter` (see `init_tracing` in `main.rs`).
//!
//! **rumqttd's connection chatter.** Every client reaches rumqttd through the proxy, which
//! logs connections itself, and the watchdog probes each internal listener every second.
//! rumqttd logs each of those connections at `info` (accept, registered, subscription,
//! disconnecting) and each clean DISCONNECT as an `error` ("router-drop",
//! `Recv(Disconnected)`): an idle node wrote ≈ 10 `info` and 2 `error` lines a second. So
//! rumqttd is at `warn` unless the filter names it ([`with_rumqttd_default`]), and the
//! "router-drop … Disconnected" event is not written ([`KnownNoise`], which also drops
//! libp2p-kad's start-up warning that a node without peers yet has no known peers).

use std::fmt;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::filter::{FilterFn, filter_fn};
use tracing_subscriber::layer::{Context, Layer};

/// Label value of the drops counted here.
pub const REASON: &str = "slow_subscriber";
/// Text of rumqttd's cursor-jump event.
const JUMP_TEXT: &str = "Read cursor start jumped";
/// Minimum time between two summary lines.
const SUMMARY_EVERY: Duration = Duration::from_secs(1);

/// The counters [`DropLog`] increments.
#[derive(Debug, Clone, Default)]
pub struct DropCounters {
    /// Messages skipped by slow subscribers' cursor jumps.
    pub dropped: Counter,
    /// Cursor jumps.
    pub events: Counter,
}

static GLOBAL: LazyLock<DropCounters> = LazyLock::new(DropCounters::default);

impl DropCounters {
    /// The process-wide counters: the binary's layer increments them, the node's
    /// `/metrics` registry exports them.
    pub fn global() -> Self {
        GLOBAL.clone()
    }
}

/// Whether `meta` is the callsite of one of rumqttd's slow-subscriber drop warnings
/// (the cursor jump in the router, and the matching "jumping to head" / "jumping" from
/// its segment log, whose only `warn`s these are).
pub fn is_rumqttd_drop_callsite(meta: &Metadata<'_>) -> bool {
    let target = meta.target();
    *meta.level() == Level::WARN
        && target.starts_with("rumqttd")
        && (target.starts_with("rumqttd::segments")
            || meta.fields().field("start_cursor").is_some())
}

/// What happened since the last summary.
#[derive(Debug, Default)]
struct Pending {
    events: u64,
    dropped: u64,
    filters: Vec<String>,
}

/// The layer (see the module docs).
#[derive(Debug)]
pub struct DropLog {
    counters: DropCounters,
    pending: Arc<Mutex<Pending>>,
}

/// Writes [`DropLog`]'s summaries. (Events emitted from inside a layer's `on_event` are
/// discarded by `tracing`'s re-entrancy guard, so the summary comes from elsewhere.)
#[derive(Debug, Clone)]
pub struct Summarizer {
    counters: DropCounters,
    pending: Arc<Mutex<Pending>>,
}

impl DropLog {
    /// A layer incrementing `counters`.
    pub fn new(counters: DropCounters) -> Self {
        Self {
            counters,
            pending: Arc::default(),
        }
    }

    /// The per-layer filter to install this layer with: rumqttd's `warn` events only,
    /// independent of the log filter. Its level hint (`warn`) matters: without one the
    /// subscriber's maximum level is `trace`, so every `log` record of every dependency (sled
    /// logs at `trace` many times per write) is converted and offered to the subscriber
    /// before being filtered out, ≈ 3 % of a busy node's CPU.
    pub fn filter() -> FilterFn<fn(&Metadata<'_>) -> bool> {
        filter_fn(
            (|m: &Metadata<'_>| m.target().starts_with("rumqttd") && *m.level() == Level::WARN)
                as fn(&Metadata<'_>) -> bool,
        )
        .with_max_level_hint(Level::WARN)
    }

    /// The summary writer for this layer.
    pub fn summarizer(&self) -> Summarizer {
        Summarizer {
            counters: self.counters.clone(),
            pending: self.pending.clone(),
        }
    }
}

/// `filter` with `rumqttd=warn` added unless it already says something about rumqttd.
pub fn with_rumqttd_default(filter: &str) -> String {
    if filter.contains("rumqttd") {
        filter.to_string()
    } else if filter.trim().is_empty() {
        "rumqttd=warn".to_string()
    } else {
        format!("{filter},rumqttd=warn")
    }
}

/// A per-layer filter that drops two events describing normal operation as failures:
///
/// * rumqttd's `error` for a connection that ended with a clean DISCONNECT ("router-drop",
///   `error = Recv(Disconnected)`, rumqttd 0.20 `server/broker.rs`);
/// * libp2p-kad's `warn` "Failed to trigger bootstrap: No known peers", which a node with no
///   peers yet (a single node, or one whose bootstrap peers are still being dialled, which the
///   node reports itself) logs at start.
///
/// Every other event passes.
#[derive(Debug, Clone, Copy)]
pub struct KnownNoise;

impl KnownNoise {
    fn is_known_noise(event: &Event<'_>) -> bool {
        #[derive(Default)]
        struct V {
            message: String,
            error: String,
        }
        impl Visit for V {
            fn record_str(&mut self, f: &Field, v: &str) {
                if f.name() == "message" {
                    self.message = v.to_string();
                }
            }
            fn record_debug(&mut self, f: &Field, v: &dyn fmt::Debug) {
                match f.name() {
                    "message" => self.message = format!("{v:?}"),
                    "error" => self.error = format!("{v:?}"),
                    _ => {}
                }
            }
        }
        let m = event.metadata();
        let (rumqttd, kad) = (
            *m.level() == Level::ERROR && m.target() == "rumqttd::server::broker",
            *m.level() == Level::WARN && m.target() == "libp2p_kad::behaviour",
        );
        if !rumqttd && !kad {
            return false;
        }
        let mut v = V::default();
        event.record(&mut v);
        (rumqttd && v.message == "router-drop" && v.error == "Recv(Disconnected)")
            || (kad && v.message == "Failed to trigger bootstrap: No known peers.")
    }
}

impl<S> tracing_subscriber::layer::Filter<S> for KnownNoise {
    fn enabled(&self, _: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        true
    }

    fn event_enabled(&self, event: &Event<'_>, _: &Context<'_, S>) -> bool {
        !Self::is_known_noise(event)
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        // No level of its own: the EnvFilter's hint stands (see `DropLog::filter`).
        Some(tracing::level_filters::LevelFilter::TRACE)
    }
}

/// The node's log subscriber: a fmt layer writing to `writer`, filtered by `filter` (an
/// `EnvFilter` directive, with rumqttd at `warn` unless it names rumqttd) minus rumqttd's
/// per-jump drop warnings and normal-disconnect errors, plus a [`DropLog`] counting into
/// `counters`. Returns it with the summarizer to spawn once it is installed.
pub fn subscriber<W>(
    filter: &str,
    counters: DropCounters,
    writer: W,
    ansi: bool,
) -> (impl Subscriber + Send + Sync + 'static, Summarizer)
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    use tracing_subscriber::filter::FilterExt;
    use tracing_subscriber::layer::SubscriberExt;

    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(ansi)
        .with_filter(
            // The exclusion has no level of its own (`TRACE`), so the pair keeps the EnvFilter's
            // level hint: see `DropLog::filter`.
            tracing_subscriber::EnvFilter::new(with_rumqttd_default(filter))
                .and(
                    filter_fn(|m| !is_rumqttd_drop_callsite(m))
                        .with_max_level_hint(tracing::level_filters::LevelFilter::TRACE),
                )
                .and(KnownNoise),
        );
    let drops = DropLog::new(counters);
    let summarizer = drops.summarizer();
    let subscriber = tracing_subscriber::registry()
        .with(fmt)
        .with(drops.with_filter(DropLog::filter()));
    (subscriber, summarizer)
}

impl Summarizer {
    /// Logs one `warn` line (target `fedmesh::droplog`) summarising the drops since the
    /// last call, if there were any; returns whether it did.
    pub fn log(&self) -> bool {
        let p = std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner));
        if p.events == 0 {
            return false;
        }
        let (events, dropped) = (p.events, p.dropped);
        let filters = p.filters.join(", ");
        tracing::warn!(
            target: "fedmesh::droplog",
            events,
            dropped,
            total = self.counters.dropped.get(),
            "slow subscribers: rumqttd dropped {dropped} messages in {events} read cursor jumps \
             on {filters}; counted in fedmesh_broker_dropped_total{{reason=\"{REASON}\"}}"
        );
        true
    }

    /// Calls [`Summarizer::log`] every [`SUMMARY_EVERY`] on a thread of its own, for the
    /// life of the process.
    pub fn spawn(self) {
        let _ = std::thread::Builder::new()
            .name("droplog".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(SUMMARY_EVERY);
                    self.log();
                }
            });
    }
}

/// Picks the cursors and the text out of an event.
#[derive(Debug, Default)]
struct JumpVisitor {
    request: Option<(u64, u64)>,
    start: Option<(u64, u64)>,
    text: String,
}

/// Parses rumqttd's `Debug` of a cursor, `(segment, offset)`.
fn parse_cursor(s: &str) -> Option<(u64, u64)> {
    let inner = s.trim().strip_prefix('(')?.strip_suffix(')')?;
    let (a, b) = inner.split_once(',')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

impl Visit for JumpVisitor {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        match field.name() {
            "request_cursor" => self.request = parse_cursor(&format!("{value:?}")),
            "start_cursor" => self.start = parse_cursor(&format!("{value:?}")),
            "error" | "message" => self.text = format!("{value:?}"),
            _ => {}
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if matches!(field.name(), "error" | "message") {
            self.text = value.to_string();
        }
    }
}

impl<S: Subscriber> Layer<S> for DropLog {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        if !meta.target().starts_with("rumqttd") || *meta.level() != Level::WARN {
            return;
        }
        let mut v = JumpVisitor::default();
        event.record(&mut v);
        // The segment log's warning accompanies the router's for the same jump: count once.
        let Some(pos) = v.text.find(JUMP_TEXT) else {
            return;
        };
        let skipped = match (v.request, v.start) {
            (Some(r), Some(s)) => s.1.saturating_sub(r.1),
            _ => 0,
        };
        self.counters.events.inc();
        self.counters.dropped.inc_by(skipped);
        let filter = v.text[pos..]
            .rsplit_once(" on ")
            .map(|(_, f)| f.trim_matches('"').to_string());
        let mut p = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        p.events += 1;
        p.dropped += skipped;
        if let Some(f) = filter
            && p.filters.len() < 4
            && !p.filters.contains(&f)
        {
            p.filters.push(f);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use tracing_subscriber::Registry;
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    /// Collects the messages of the events it sees.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<String>>>);

    impl<S: Subscriber> Layer<S> for Capture {
        fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
            struct V(String);
            impl Visit for V {
                fn record_debug(&mut self, f: &Field, v: &dyn fmt::Debug) {
                    if f.name() == "message" {
                        self.0 = format!("{v:?}");
                    }
                }
            }
            let mut v = V(String::new());
            event.record(&mut v);
            self.0
                .lock()
                .unwrap()
                .push(format!("{} {}", event.metadata().target(), v.0));
        }
    }

    /// Emits what rumqttd 0.20 emits for a cursor jump (same target, fields, types).
    fn rumqttd_jump(from: (u64, u64), to: (u64, u64)) {
        let error = format!("Read cursor start jumped from {from:?} to {to:?} on flood/#");
        tracing::warn!(
            target: "rumqttd::router::routing",
            request_cursor = ?from,
            start_cursor = ?to,
            error
        );
        tracing::warn!(
            target: "rumqttd::segments",
            "given index {} less than head {}, jumping to head",
            from.0,
            to.1
        );
    }

    /// A `MakeWriter` collecting everything written.
    #[derive(Clone, Default)]
    struct Written(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Written {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> tracing_subscriber::fmt::MakeWriter<'w> for Written {
        type Writer = Written;
        fn make_writer(&'w self) -> Written {
            self.clone()
        }
    }

    /// What rumqttd 0.20 logs for one connection through the proxy that ends with DISCONNECT,
    /// and for a link that failed otherwise.
    fn rumqttd_connection() {
        #[derive(Debug)]
        #[allow(dead_code)] // only its Debug output matters
        enum LinkError {
            Recv(RecvError),
            Send(RecvError),
        }
        #[derive(Debug)]
        struct Disconnected;
        type RecvError = Disconnected;
        tracing::info!(target: "rumqttd::server::broker", name = "fedmesh-internal-V4-1", count = 3, "accept");
        tracing::info!(target: "rumqttd::router::routing", connection_id = 1, "Client connection registered");
        tracing::error!(target: "rumqttd::server::broker", error = ?LinkError::Recv(Disconnected), "router-drop");
        tracing::error!(target: "rumqttd::server::broker", error = ?LinkError::Send(Disconnected), "router-drop");
    }

    #[test]
    fn rumqttd_connection_chatter_is_not_logged_unless_asked_for() {
        let run = |filter: &str| {
            let out = Written::default();
            let (s, _) = subscriber(filter, DropCounters::default(), out.clone(), false);
            tracing::subscriber::with_default(s, || {
                rumqttd_connection();
                let e = "No known peers.";
                tracing::warn!(target: "libp2p_kad::behaviour", "Failed to trigger bootstrap: {e}");
                tracing::warn!(target: "libp2p_kad::behaviour", "Something else");
                tracing::info!(target: "fedmesh::node", "ours");
            });
            String::from_utf8(out.0.lock().unwrap().clone()).unwrap()
        };
        let default = run("info");
        assert!(default.contains("ours"), "{default}");
        assert!(!default.contains('\x1b'), "no colour codes: {default:?}");
        assert!(
            !default.contains("accept"),
            "rumqttd info hidden: {default}"
        );
        assert!(!default.contains("Recv(Disconnected)"), "{default}");
        assert!(
            default.contains("Send(Disconnected)"),
            "other link errors stay: {default}"
        );
        assert!(!default.contains("No known peers"), "{default}");
        assert!(default.contains("Something else"), "{default}");
        let asked = run("info,rumqttd=info");
        assert!(
            asked.contains("accept") && asked.contains("registered"),
            "{asked}"
        );
        assert!(
            !asked.contains("Recv(Disconnected)"),
            "a clean DISCONNECT is never an error line: {asked}"
        );
        assert_eq!(with_rumqttd_default("debug"), "debug,rumqttd=warn");
        assert_eq!(with_rumqttd_default("rumqttd=trace"), "rumqttd=trace");
        assert_eq!(with_rumqttd_default(""), "rumqttd=warn");
    }

    #[test]
    fn the_subscriber_keeps_the_filters_level() {
        use tracing::level_filters::LevelFilter;
        // Without level hints on the two filter functions the maximum is `trace`, and every
        // dependency's `log::trace!` goes through the subscriber.
        for (filter, level) in [("warn", LevelFilter::WARN), ("info", LevelFilter::INFO)] {
            let (s, _) = subscriber(filter, DropCounters::default(), std::io::sink, false);
            assert_eq!(s.max_level_hint(), Some(level), "filter {filter}");
        }
    }

    #[test]
    fn counts_cursor_jumps_whatever_the_log_filter() {
        let counters = DropCounters::default();
        let capture = Capture::default();
        let summaries = Capture::default();
        let layer = DropLog::new(counters.clone());
        let summarizer = layer.summarizer();
        // The fmt-like layer only wants errors, as a strict log filter would.
        let subscriber = Registry::default()
            .with(
                capture
                    .clone()
                    .with_filter(tracing_subscriber::EnvFilter::new("error")),
            )
            .with(layer.with_filter(DropLog::filter()))
            .with(
                summaries
                    .clone()
                    .with_filter(filter_fn(|m| m.target() == "fedmesh::droplog")),
            );
        tracing::subscriber::with_default(subscriber, || {
            assert!(!summarizer.log(), "nothing to summarise yet");
            rumqttd_jump((2, 1000), (4, 1800));
            rumqttd_jump((4, 1810), (5, 2400));
            // Other rumqttd warnings are not drops.
            tracing::warn!(target: "rumqttd::router::routing", "Subscription cannot be validated");
            assert!(summarizer.log());
            assert!(!summarizer.log(), "one summary per batch of jumps");
        });
        assert_eq!(counters.events.get(), 2);
        assert_eq!(counters.dropped.get(), 800 + 590);
        assert!(
            capture.0.lock().unwrap().is_empty(),
            "the strict filter hid all"
        );
        let lines = summaries.0.lock().unwrap().clone();
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].contains("dropped 1390 messages in 2 read cursor jumps on flood/#"),
            "{lines:?}"
        );
    }

    #[test]
    fn recognises_the_callsites_to_hide() {
        struct Check(Arc<Mutex<Vec<bool>>>);
        impl<S: Subscriber> Layer<S> for Check {
            fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
                self.0
                    .lock()
                    .unwrap()
                    .push(is_rumqttd_drop_callsite(event.metadata()));
            }
        }
        let seen = Arc::new(Mutex::new(Vec::new()));
        tracing::subscriber::with_default(Registry::default().with(Check(seen.clone())), || {
            rumqttd_jump((0, 0), (1, 10));
            tracing::warn!(target: "rumqttd::router::routing", "other");
            tracing::warn!(target: "fedmesh::droplog", start_cursor = 1, "ours");
        });
        assert_eq!(*seen.lock().unwrap(), vec![true, true, false, false]);
    }

    #[test]
    fn exported_in_metrics() {
        let mut registry = prometheus_client::registry::Registry::default();
        let _m = crate::metrics::Metrics::new(&mut registry);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        for name in ["broker_dropped_total", "broker_drop_events_total"] {
            let line = format!("fedmesh_{name}{{reason=\"slow_subscriber\"}} ");
            assert!(out.contains(&line), "{line} in {out}");
        }
    }

    #[test]
    fn cursors_parse() {
        assert_eq!(parse_cursor("(3, 1200)"), Some((3, 1200)));
        assert_eq!(parse_cursor("3"), None);
    }
}
