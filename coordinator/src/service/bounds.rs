//! Bounds on the strings a node chooses, checked where they enter the coordinator and before they
//! reach a map, the audit log, tracing or the event history.
//!
//! Two rules, one per kind of field:
//! - **Names of things** (plan ids, run ids, model and payload hashes) are refused when they are
//!   not of their form: a plan id is 64 lowercase hex characters or it names no plan at all, so an
//!   answer carrying anything else cannot be a legitimate decision and nothing is lost by refusing
//!   it. Plan and run ids are decoded here into `PlanId` and `RunId` ([`plan_id`], [`run_id`]),
//!   so the driver and the engine never see a wire string as an id. The refusal names the field
//!   and what was wrong, never echoes the value.
//! - **Free text** (a refusal's reason, a device or software version, a metric's name) is cut on a
//!   character boundary, marked with `…`, and control characters are replaced: refusing would lose
//!   a legitimate decision (a node that refuses a plan with a long reason has still refused it, and
//!   a round must not wait for it) or keep a hospital off the network over a cosmetic field.

use std::borrow::Cow;

use sanctum_protocol::ids::{PlanId, RunId};
use sanctum_protocol::proto::Metric;
use tonic::Status;

/// The most bytes of a node's reason (a plan refusal's) that are kept, logged and published.
pub(super) const REASON_BYTES: usize = 1024;
/// The most characters of a node's device or software version.
pub(super) const LABEL_CHARS: usize = 128;
/// The most characters of a metric's name.
pub(super) const METRIC_NAME_CHARS: usize = 64;
/// The most metrics one report carries past the handler (a node sends one today).
pub(super) const METRICS_PER_REPORT: usize = 8;

/// Whether `s` is a SHA-256 as the coordinator writes one: 64 lowercase hex characters (plan ids,
/// model and payload hashes).
pub(super) fn is_sha256_hex(s: &str) -> bool {
    sanctum_protocol::plan::is_sha256_hex(s)
}

/// Decodes a wire plan id, or refuses it (`InvalidArgument`) naming the field and what was wrong.
pub(super) fn plan_id(field: &str, value: &str) -> Result<PlanId, Status> {
    PlanId::parse(value).map_err(|e| Status::invalid_argument(format!("{field}: {e}")))
}

/// Decodes a wire run id: empty is protobuf's "not set" and names no run (`None`); anything else
/// is one of this coordinator's run ids (32 lowercase hex) or it is refused (`InvalidArgument`)
/// naming the field and what was wrong. A run id of another form names no run here, so nothing a
/// node could mean is lost by refusing it.
pub(super) fn run_id(field: &str, value: &str) -> Result<Option<RunId>, Status> {
    if value.is_empty() {
        return Ok(None);
    }
    RunId::parse(value).map(Some).map_err(|e| Status::invalid_argument(format!("{field}: {e}")))
}

/// Refuses a `field` that is not a 64-hex SHA-256 (a plan id or a hash), naming the field and the
/// form and the length it had, never its value.
pub(super) fn sha256_field(field: &str, value: &str) -> Result<(), Status> {
    if is_sha256_hex(value) {
        return Ok(());
    }
    Err(Status::invalid_argument(format!(
        "{field} must be 64 lowercase hex characters (a SHA-256); got {} bytes that are not",
        value.len()
    )))
}

/// `s` cut to at most `max_bytes` bytes on a character boundary (with `…` when it was cut), with
/// control characters (newlines, escapes) replaced so that the text cannot forge log lines.
pub(super) fn clip_bytes(s: &str, max_bytes: usize) -> Cow<'_, str> {
    if s.len() <= max_bytes && !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    // Cut first (a 2 MiB reason is never copied whole), then clean, then cut what cleaning grew.
    let head = &s[..floor_char_boundary(s, max_bytes)];
    let cleaned: String = head.chars().map(|c| if c.is_control() { '\u{fffd}' } else { c }).collect();
    if cleaned.len() <= max_bytes && head.len() == s.len() {
        return Cow::Owned(cleaned);
    }
    // Leave room for the marker so the result stays within the bound.
    let end = floor_char_boundary(&cleaned, max_bytes.saturating_sub('…'.len_utf8()));
    Cow::Owned(format!("{}…", &cleaned[..end]))
}

/// The largest index ≤ `i` that is a character boundary of `s` (`str::floor_char_boundary` is
/// not stable yet).
fn floor_char_boundary(s: &str, i: usize) -> usize {
    if i >= s.len() {
        return s.len();
    }
    (0..=i).rev().find(|&j| s.is_char_boundary(j)).unwrap_or(0)
}

/// `s` cut to at most `max_chars` characters (see [`clip_bytes`]).
pub(super) fn clip_chars(s: &str, max_chars: usize) -> Cow<'_, str> {
    match s.char_indices().nth(max_chars) {
        // 4 bytes per character at most: the byte bound then keeps `max_chars` characters.
        None => clip_bytes(s, usize::MAX),
        Some(_) => {
            let kept: String = s.chars().take(max_chars.saturating_sub(1)).collect();
            Cow::Owned(clip_bytes(&kept, usize::MAX).into_owned() + "…")
        }
    }
}

/// A node's reason, bounded ([`REASON_BYTES`]).
pub(super) fn reason(s: String) -> String {
    match clip_bytes(&s, REASON_BYTES) {
        Cow::Borrowed(_) => s,
        Cow::Owned(o) => o,
    }
}

/// A node's device or version string, bounded ([`LABEL_CHARS`]).
pub(super) fn label(s: &str) -> String {
    clip_chars(s, LABEL_CHARS).into_owned()
}

/// A report's metrics, bounded: the first [`METRICS_PER_REPORT`], names cut to
/// [`METRIC_NAME_CHARS`]. Only the first is used today; the rest never reach state.
pub(super) fn metrics(mut m: Vec<Metric>) -> Vec<Metric> {
    m.truncate(METRICS_PER_REPORT);
    for metric in &mut m {
        if let Cow::Owned(name) = clip_chars(&metric.name, METRIC_NAME_CHARS) {
            metric.name = name;
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_64_lowercase_hex_is_a_plan_id() {
        let id = "ab".repeat(32);
        assert!(is_sha256_hex(&id));
        for bad in [String::new(), "AB".repeat(32), "ab".repeat(31), "ab".repeat(33), "g".repeat(64), "é".repeat(32)] {
            assert!(!is_sha256_hex(&bad), "{bad:?}");
        }
        let huge = "a".repeat(2 << 20);
        let e = sha256_field("plan_id", &huge).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("plan_id must be 64 lowercase hex"), "{}", e.message());
        assert!(e.message().len() < 200, "the value is never echoed: {} bytes", e.message().len());
    }

    #[test]
    fn wire_ids_decode_or_are_refused_naming_the_field_and_the_fault() {
        let run = crate::runs::fresh_run_id();
        assert_eq!(run_id("run", run.as_str()).unwrap(), Some(run));
        assert_eq!(run_id("run", "").unwrap(), None, "an unset run is well-formed: it names no run");
        let id = "ab".repeat(32);
        assert_eq!(plan_id("plan_id", &id).unwrap().as_str(), id);
        // Each refused with InvalidArgument, the field named first, the value never echoed.
        let cases: [(&str, Status); 6] = [
            ("plan_id", plan_id("plan_id", "../../etc").unwrap_err()),
            ("plan_id", plan_id("plan_id", &"a".repeat(65)).unwrap_err()),
            ("plan_id", plan_id("plan_id", "").unwrap_err()),
            ("run", run_id("run", "run_2-a").unwrap_err()),
            ("run", run_id("run", &"A".repeat(32)).unwrap_err()),
            ("run", run_id("run", &"x".repeat(2 << 20)).unwrap_err()),
        ];
        for (field, e) in cases {
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().starts_with(&format!("{field}: ")), "{}", e.message());
            assert!(e.message().len() < 200, "the value is never echoed: {}", e.message());
        }
        assert!(plan_id("plan_id", "../../etc").unwrap_err().message().contains("a path character"));
        assert!(plan_id("plan_id", &"a".repeat(65)).unwrap_err().message().contains("has 65 bytes"));
    }

    #[test]
    fn free_text_is_cut_on_a_char_boundary_within_the_bound() {
        assert!(matches!(clip_bytes("short reason", 1024), Cow::Borrowed(_)));
        // Multi-byte characters straddling the bound: never split, never over the bound.
        for s in ["é".repeat(2000), "日本".repeat(1000), "a".repeat(5000), "🩺".repeat(400)] {
            let c = clip_bytes(&s, REASON_BYTES);
            assert!(c.len() <= REASON_BYTES, "{} bytes", c.len());
            assert!(c.ends_with('…'));
            assert!(s.starts_with(c.trim_end_matches('…')));
        }
        let long = "é".repeat(500);
        let c = clip_chars(&long, LABEL_CHARS);
        assert_eq!(c.chars().count(), LABEL_CHARS);
        assert_eq!(label("cuda:0"), "cuda:0");
    }

    #[test]
    fn control_characters_cannot_forge_log_lines() {
        let c = reason("refused\n2026-01-01 INFO plan finished\u{1b}[2J".into());
        assert!(!c.chars().any(char::is_control), "{c:?}");
        assert!(c.starts_with("refused\u{fffd}2026"));
        assert_eq!(label("cpu\r\n"), "cpu\u{fffd}\u{fffd}");
    }

    #[test]
    fn metrics_are_few_and_their_names_short() {
        let m: Vec<Metric> =
            (0..100).map(|i| Metric { name: "x".repeat(1 << 16), value: f64::from(i), samples: 1 }).collect();
        let m = metrics(m);
        assert_eq!(m.len(), METRICS_PER_REPORT);
        assert!(m.iter().all(|m| m.name.chars().count() == METRIC_NAME_CHARS));
        assert_eq!(m[0].value, 0.0, "the first metrics are kept, in order");
    }
}
