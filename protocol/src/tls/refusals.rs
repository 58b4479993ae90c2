//! Refused peers, counted rather than written one by one.
//!
//! Anyone who can reach the port can fail a handshake thousands of times a second; if each
//! failure cost a signed, fsync'd audit record and a warning line, the attacker would choose how
//! fast the disk and the log fill. So refusals are counted here, by reason, with the number of
//! distinct addresses and a few samples, and whoever owns the audit log takes a bounded
//! [`RefusalReport`] at most once per period ([`RefusalCounter::take_due`]). Log lines are
//! rate-limited the same way: the first few refusals of a period are logged, the rest only
//! counted until the next report.
//!
//! A call refused by the role guard comes from a verified member, so the first few of each
//! period are itemised (audited with who called, as before); beyond that they are counted too.
//!
//! [`RefusalCounter`] is pure (time is an argument); [`Refusals`] shares one behind a lock and
//! reads the clock.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Why a peer was refused. Its [`RefusalClass::key`] is what the audit record counts it under.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RefusalClass {
    /// The TLS handshake failed: not TLS, no client certificate, another CA, expired.
    HandshakeFailed,
    /// The peer sent nothing within `first_byte_timeout_secs`, or did not finish the handshake
    /// within `handshake_timeout_secs`.
    HandshakeTimedOut,
    /// A certificate from the consortium CA without a Sanctum identity.
    NoIdentity,
    /// A revoked certificate at the handshake.
    Revoked,
    /// Closed at once: `max_connections` were already open.
    ConnectionLimit,
    /// Closed at once: `handshakes_per_ip` handshakes from the same address were in flight.
    AddressLimit,
    /// Closed after the handshake: `connections_per_identity` connections of the same
    /// certificate were already open.
    IdentityLimit,
    /// A verified member's call refused by the role guard (wrong role, revoked or expired on an
    /// open connection), beyond those itemised in the period.
    CallRefused,
}

impl RefusalClass {
    /// Every class, in the order reports list them.
    pub const ALL: [RefusalClass; 8] = [
        RefusalClass::HandshakeFailed,
        RefusalClass::HandshakeTimedOut,
        RefusalClass::NoIdentity,
        RefusalClass::Revoked,
        RefusalClass::ConnectionLimit,
        RefusalClass::AddressLimit,
        RefusalClass::IdentityLimit,
        RefusalClass::CallRefused,
    ];

    /// The key an audit record counts this class under.
    pub fn key(self) -> &'static str {
        match self {
            RefusalClass::HandshakeFailed => "handshake_failed",
            RefusalClass::HandshakeTimedOut => "handshake_timed_out",
            RefusalClass::NoIdentity => "no_identity",
            RefusalClass::Revoked => "revoked",
            RefusalClass::ConnectionLimit => "connection_limit",
            RefusalClass::AddressLimit => "address_limit",
            RefusalClass::IdentityLimit => "identity_limit",
            RefusalClass::CallRefused => "call_refused",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for RefusalClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RefusalClass::HandshakeFailed => "TLS handshake failed",
            RefusalClass::HandshakeTimedOut => "TLS handshake timed out",
            RefusalClass::NoIdentity => "no Sanctum identity in the certificate",
            RefusalClass::Revoked => "revoked certificate",
            RefusalClass::ConnectionLimit => "connection limit reached",
            RefusalClass::AddressLimit => "too many handshakes from one address",
            RefusalClass::IdentityLimit => "too many connections of one certificate",
            RefusalClass::CallRefused => "call refused",
        })
    }
}

/// Distinct addresses remembered per report; beyond it the report says "at least".
pub const MAX_DISTINCT_REMOTES: usize = 1024;
/// Addresses a report names.
pub const SAMPLE_REMOTES: usize = 8;
/// Distinct reasons a report quotes, and the characters kept of each.
pub const SAMPLE_REASONS: usize = 4;
pub const REASON_CHARS: usize = 160;
/// Refusals logged one by one per period; the rest are counted until the next report.
pub const LOGGED_PER_PERIOD: u32 = 10;
/// Refused calls of verified members audited one by one per period; the rest are counted.
pub const CALLS_ITEMISED_PER_PERIOD: u32 = 16;

/// What to do with one refusal, beyond counting it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Disposition {
    /// Log it on its own line.
    pub log: bool,
    /// This is the first refusal of the period not logged: say that the rest are only counted.
    pub log_silenced: bool,
    /// Audit it on its own (a member's refused call, within the period's allowance); it is then
    /// not in the next report.
    pub itemise: bool,
}

/// The refusals counted since the last report: bounded in size whatever was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefusalReport {
    /// Refusals counted (each exactly once, in exactly one report).
    pub refused: u64,
    /// Per class, in [`RefusalClass::ALL`] order; classes with none are left out.
    pub by_reason: Vec<(RefusalClass, u64)>,
    /// Distinct IP addresses refused (ports differ per connection and are not counted).
    pub distinct_remotes: usize,
    /// Whether there were more than [`MAX_DISTINCT_REMOTES`], so `distinct_remotes` is a floor.
    pub distinct_remotes_capped: bool,
    /// At most [`SAMPLE_REMOTES`] of them, lowest first.
    pub sample_remotes: Vec<IpAddr>,
    /// At most [`SAMPLE_REASONS`] distinct reasons, each at most [`REASON_CHARS`] characters.
    pub sample_reasons: Vec<String>,
    /// Seconds from the first refusal counted to the report.
    pub over_secs: u64,
}

impl RefusalReport {
    /// The addresses in one line: `127.0.0.1` or `10.0.0.1, 10.0.0.2 and 40 others`.
    pub fn remotes_summary(&self) -> String {
        let shown: Vec<String> = self.sample_remotes.iter().map(IpAddr::to_string).collect();
        let others = self.distinct_remotes.saturating_sub(shown.len());
        let floor = if self.distinct_remotes_capped { "at least " } else { "" };
        match others {
            0 => shown.join(", "),
            n => format!("{} and {floor}{n} other address{}", shown.join(", "), if n == 1 { "" } else { "es" }),
        }
    }

    /// The counts in one line: `10000 refused over 12 s: 9990 TLS handshake failed, 10 ...`.
    pub fn summary(&self) -> String {
        let parts: Vec<String> = self.by_reason.iter().map(|(c, n)| format!("{n} {c}")).collect();
        format!("{} refused over {} s: {}", self.refused, self.over_secs, parts.join(", "))
    }
}

/// Counts refusals between reports. Pure: every call takes the time.
#[derive(Debug)]
pub struct RefusalCounter {
    /// At most one report per period; also the window of the log and itemising allowances.
    period: Duration,
    last_report: Option<Instant>,
    /// When the first refusal in the pending counts came.
    first_pending: Option<Instant>,
    counts: [u64; RefusalClass::ALL.len()],
    /// Capped at [`MAX_DISTINCT_REMOTES`]; `remotes_capped` says when one was left out.
    remotes: BTreeSet<IpAddr>,
    remotes_capped: bool,
    /// Capped at [`SAMPLE_REASONS`], each truncated to [`REASON_CHARS`].
    reasons: Vec<String>,
    /// The allowance window: when it began, and what was spent of it.
    window_start: Option<Instant>,
    logged: u32,
    itemised: u32,
}

impl RefusalCounter {
    /// A counter reporting at most once per `period` (at least a millisecond).
    pub fn new(period: Duration) -> Self {
        Self {
            period: period.max(Duration::from_millis(1)),
            last_report: None,
            first_pending: None,
            counts: [0; RefusalClass::ALL.len()],
            remotes: BTreeSet::new(),
            remotes_capped: false,
            reasons: Vec::new(),
            window_start: None,
            logged: 0,
            itemised: 0,
        }
    }

    /// Counts one refusal (unless it is itemised) and says whether to log and audit it alone.
    pub fn record(&mut self, class: RefusalClass, remote: IpAddr, reason: &str, now: Instant) -> Disposition {
        if self.window_start.is_none_or(|start| now.saturating_duration_since(start) >= self.period) {
            self.window_start = Some(now);
            self.logged = 0;
            self.itemised = 0;
        }
        let log = self.logged < LOGGED_PER_PERIOD;
        let log_silenced = self.logged == LOGGED_PER_PERIOD;
        self.logged = self.logged.saturating_add(1);
        if class == RefusalClass::CallRefused && self.itemised < CALLS_ITEMISED_PER_PERIOD {
            self.itemised += 1;
            return Disposition { log, log_silenced, itemise: true };
        }
        self.counts[class.index()] = self.counts[class.index()].saturating_add(1);
        self.first_pending.get_or_insert(now);
        if self.remotes.len() < MAX_DISTINCT_REMOTES {
            self.remotes.insert(remote);
        } else if !self.remotes.contains(&remote) {
            self.remotes_capped = true;
        }
        if self.reasons.len() < SAMPLE_REASONS {
            let reason: String = reason.chars().take(REASON_CHARS).collect();
            if !self.reasons.contains(&reason) {
                self.reasons.push(reason);
            }
        }
        Disposition { log, log_silenced, itemise: false }
    }

    /// Whether anything is counted and not yet reported.
    pub fn pending(&self) -> bool {
        self.counts.iter().any(|&n| n > 0)
    }

    /// The report of what was counted, if anything was and a period has passed since the last
    /// report; the counts start again from zero.
    pub fn take_due(&mut self, now: Instant) -> Option<RefusalReport> {
        if self.last_report.is_some_and(|last| now.saturating_duration_since(last) < self.period) {
            return None;
        }
        self.take(now)
    }

    /// The report of what was counted, whatever the period (at shutdown).
    pub fn take(&mut self, now: Instant) -> Option<RefusalReport> {
        if !self.pending() {
            return None;
        }
        self.last_report = Some(now);
        let by_reason =
            RefusalClass::ALL.iter().map(|&c| (c, self.counts[c.index()])).filter(|&(_, n)| n > 0).collect();
        let report = RefusalReport {
            refused: self.counts.iter().fold(0u64, |a, &n| a.saturating_add(n)),
            by_reason,
            distinct_remotes: self.remotes.len(),
            distinct_remotes_capped: self.remotes_capped,
            sample_remotes: self.remotes.iter().take(SAMPLE_REMOTES).copied().collect(),
            sample_reasons: std::mem::take(&mut self.reasons),
            over_secs: self.first_pending.map_or(0, |first| now.saturating_duration_since(first).as_secs()),
        };
        self.counts = [0; RefusalClass::ALL.len()];
        self.first_pending = None;
        self.remotes.clear();
        self.remotes_capped = false;
        Some(report)
    }
}

/// A [`RefusalCounter`] shared by the accept loop, its handshake tasks and the role guards; it
/// also writes the rate-limited log lines.
#[derive(Debug)]
pub struct Refusals {
    counter: Mutex<RefusalCounter>,
}

impl Default for Refusals {
    /// Reports at most once a minute.
    fn default() -> Self {
        Self::new(Duration::from_secs(60))
    }
}

impl Refusals {
    pub fn new(period: Duration) -> Self {
        Self { counter: Mutex::new(RefusalCounter::new(period)) }
    }

    fn counter(&self) -> std::sync::MutexGuard<'_, RefusalCounter> {
        // Counts stay meaningful after a panic elsewhere: take the guard anyway.
        self.counter.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a refusal and logs it if the period's allowance is not spent; returns whether the
    /// caller should audit this one on its own.
    pub fn refuse(&self, class: RefusalClass, remote: SocketAddr, reason: &str) -> bool {
        let d = self.counter().record(class, remote.ip(), reason, Instant::now());
        if d.log {
            tracing::warn!(%remote, "refused connection: {reason}");
        } else if d.log_silenced {
            tracing::warn!(
                "more than {LOGGED_PER_PERIOD} refusals this period: the rest are counted, not logged, and the audit log's next refusal record has the counts"
            );
        }
        d.itemise
    }

    /// The report due now, if any (see [`RefusalCounter::take_due`]).
    pub fn take_due(&self) -> Option<RefusalReport> {
        self.counter().take_due(Instant::now())
    }

    /// Whatever is pending, due or not (at shutdown).
    pub fn take(&self) -> Option<RefusalReport> {
        self.counter().take(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn every_refusal_is_counted_once_by_its_class() {
        let t0 = Instant::now();
        let mut c = RefusalCounter::new(Duration::from_secs(60));
        for i in 0..10_000u32 {
            c.record(RefusalClass::HandshakeFailed, ip(1), "TLS handshake failed: corrupt message", t0);
            if i % 100 == 0 {
                c.record(RefusalClass::HandshakeTimedOut, ip(2), "TLS handshake timed out", t0);
            }
        }
        c.record(RefusalClass::ConnectionLimit, ip(3), "connection limit reached", t0);
        let r = c.take(t0 + Duration::from_secs(5)).expect("a report");
        assert_eq!(r.refused, 10_101);
        assert_eq!(
            r.by_reason,
            vec![
                (RefusalClass::HandshakeFailed, 10_000),
                (RefusalClass::HandshakeTimedOut, 100),
                (RefusalClass::ConnectionLimit, 1)
            ]
        );
        assert_eq!((r.distinct_remotes, r.distinct_remotes_capped), (3, false));
        assert_eq!(r.sample_remotes, vec![ip(1), ip(2), ip(3)]);
        assert_eq!(r.over_secs, 5);
        assert!(
            r.summary().starts_with("10101 refused over 5 s: 10000 TLS handshake failed, 100 TLS"),
            "{}",
            r.summary()
        );
        // Counted once: the next report has nothing to say.
        assert!(!c.pending());
        assert_eq!(c.take(t0 + Duration::from_secs(6)), None);
    }

    #[test]
    fn at_most_one_report_per_period() {
        let period = Duration::from_secs(10);
        let t0 = Instant::now();
        let mut c = RefusalCounter::new(period);
        assert_eq!(c.take_due(t0), None, "nothing counted, nothing reported");
        c.record(RefusalClass::HandshakeFailed, ip(1), "x", t0);
        assert_eq!(c.take_due(t0).map(|r| r.refused), Some(1), "the first report is due at once");
        c.record(RefusalClass::HandshakeFailed, ip(1), "x", t0 + Duration::from_secs(1));
        assert_eq!(c.take_due(t0 + Duration::from_secs(9)), None, "a period has not passed");
        // Still counted, and reported once the period is over.
        c.record(RefusalClass::HandshakeFailed, ip(1), "x", t0 + Duration::from_secs(9));
        assert_eq!(c.take_due(t0 + period).map(|r| r.refused), Some(2));
        // At shutdown whatever is pending is taken regardless.
        c.record(RefusalClass::Revoked, ip(1), "revoked", t0 + period);
        assert_eq!(c.take(t0 + period).map(|r| r.refused), Some(1));
    }

    #[test]
    fn a_report_stays_small_whatever_was_refused() {
        let t0 = Instant::now();
        let mut c = RefusalCounter::new(Duration::from_secs(60));
        for i in 0..100_000u32 {
            let remote = IpAddr::from(i.to_be_bytes());
            // Distinct from the first character on, longer than kept, and not all ASCII.
            let reason = format!("{i} TLS handshake failed: {}é", "é".repeat(1000));
            c.record(RefusalClass::ALL[i as usize % 5], remote, &reason, t0);
        }
        let r = c.take(t0).expect("a report");
        assert_eq!(r.refused, 100_000);
        assert_eq!((r.distinct_remotes, r.distinct_remotes_capped), (MAX_DISTINCT_REMOTES, true));
        assert_eq!(r.sample_remotes.len(), SAMPLE_REMOTES);
        assert_eq!(r.sample_reasons.len(), SAMPLE_REASONS);
        assert!(r.sample_reasons.iter().all(|s| s.chars().count() <= REASON_CHARS));
        assert!(r.remotes_summary().contains("and at least 1016 other addresses"), "{}", r.remotes_summary());
        let size = r.summary().len()
            + r.remotes_summary().len()
            + r.sample_reasons.iter().map(String::len).sum::<usize>()
            + r.sample_remotes.len() * 40;
        assert!(size < 2048, "a report of {size} bytes");
    }

    #[test]
    fn log_lines_and_itemised_calls_are_rate_limited_per_period() {
        let period = Duration::from_secs(1);
        let t0 = Instant::now();
        let mut c = RefusalCounter::new(period);
        let ds: Vec<Disposition> = (0..100).map(|_| c.record(RefusalClass::HandshakeFailed, ip(1), "x", t0)).collect();
        assert_eq!(ds.iter().filter(|d| d.log).count(), LOGGED_PER_PERIOD as usize);
        assert_eq!(ds.iter().filter(|d| d.log_silenced).count(), 1);
        assert!(ds.iter().all(|d| !d.itemise), "connection refusals are never itemised");
        // A member's refused calls: the first few itemised (and not counted), the rest counted.
        let calls: Vec<Disposition> =
            (0..50).map(|_| c.record(RefusalClass::CallRefused, ip(2), "wrong role", t0)).collect();
        let itemised = calls.iter().filter(|d| d.itemise).count() as u64;
        assert_eq!(itemised, u64::from(CALLS_ITEMISED_PER_PERIOD));
        // A new period renews both allowances.
        let next = c.record(RefusalClass::CallRefused, ip(2), "wrong role", t0 + period);
        assert!(next.log && next.itemise);
        let r = c.take(t0 + period).expect("a report");
        assert_eq!(r.by_reason, vec![(RefusalClass::HandshakeFailed, 100), (RefusalClass::CallRefused, 50 - itemised)]);
    }
}
