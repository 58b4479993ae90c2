//! What the report says, before it is rendered: the verified logs read as typed events, each
//! plan's view (its submission, decisions, rounds, countersignatures and what is missing), and
//! each hospital's ε charges. Pure apart from [`Log::load`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sanctum_protocol::audit::{self, AuditEvent, EventError, Record, VerifyFileError};
use sanctum_protocol::hash::ContentHash;

use crate::receipts::{self, Checked};

/// One record with its typed event.
#[derive(Clone, Debug)]
pub(super) struct Entry {
    pub(super) record: Record,
    pub(super) event: AuditEvent,
}

/// One input log, verified, its records read as typed events.
pub(super) struct Log {
    pub(super) path: PathBuf,
    pub(super) verdict: Result<audit::Verified, VerifyFileError>,
    pub(super) records: Vec<Record>,
    /// The records whose event reads (unknown kinds included, as `Unknown`).
    pub(super) entries: Vec<Entry>,
    /// Records of a known kind whose parameters do not fit it: listed, never used.
    pub(super) unreadable: Vec<EventError>,
}

impl Log {
    pub(super) fn load(path: &Path, ca: Option<&str>) -> Self {
        let check = |der: &[u8]| match ca {
            Some(pem) => audit::issued_by(pem, der),
            None => Ok(()),
        };
        let verdict = audit::verify_file(path, Some(&check));
        let records = audit::read_records(path).unwrap_or_default();
        Self::from_records(path.to_path_buf(), verdict, records)
    }

    pub(super) fn from_records(
        path: PathBuf,
        verdict: Result<audit::Verified, VerifyFileError>,
        records: Vec<Record>,
    ) -> Self {
        let (mut entries, mut unreadable) = (Vec::new(), Vec::new());
        for r in &records {
            match r.typed() {
                Ok(event) => entries.push(Entry { record: r.clone(), event }),
                Err(e) => unreadable.push(e),
            }
        }
        Self { path, verdict, records, entries, unreadable }
    }

    /// Who wrote the log, from its verified certificate; a log that failed verification names
    /// no one (what it claims is shown as a claim).
    pub(super) fn writer(&self) -> String {
        match &self.verdict {
            Ok(v) => v.writer.clone(),
            Err(_) => {
                let claim = match self.entries.first().map(|e| &e.event) {
                    Some(AuditEvent::LogOpened { writer, .. }) => writer.as_str(),
                    _ => "",
                };
                if claim.is_empty() { "unverified".into() } else { format!("unverified (claims '{claim}')") }
            }
        }
    }

    /// The records a report may use: none from a log that failed verification.
    pub(super) fn trusted(&self) -> &[Entry] {
        if self.verdict.is_ok() { &self.entries } else { &[] }
    }

    /// The unreadable records a report lists: none of a log that failed verification.
    pub(super) fn trusted_unreadable(&self) -> &[EventError] {
        if self.verdict.is_ok() { &self.unreadable } else { &[] }
    }
}

/// The first 12 characters (never a byte slice: a name or reason may be any text).
pub(super) fn short(h: &str) -> &str {
    let end = h.char_indices().nth(12).map_or(h.len(), |(i, _)| i);
    &h[..end]
}

/// A round's `round_opened`, `round_closed` and `aggregate_released` records.
pub(super) type RoundEvents = (Option<Entry>, Option<Entry>, Option<Entry>);

/// What the report says of one plan.
pub(super) struct PlanView {
    pub(super) id: String,
    pub(super) name: String,
    /// Its `plan_submitted` entry.
    pub(super) submitted: Entry,
    /// `plan_accepted` and `plan_refused` entries.
    pub(super) decisions: Vec<Entry>,
    /// Per round: opened, closed, released. A map, not a vector indexed by round: the round
    /// number is the log's, and a round of 10^12 must cost one entry, not 10^12.
    pub(super) rounds: BTreeMap<u64, RoundEvents>,
    pub(super) rejected: Vec<Entry>,
    pub(super) finished: Option<Entry>,
    pub(super) exported: Option<Entry>,
    /// SHA-256 of each round's `round_record` line as this log holds it (the latest per round),
    /// and the nodes it was sent to for countersigning (its `reported` list).
    pub(super) round_records: BTreeMap<u64, (String, Vec<String>)>,
    /// Every countersignature, re-verified, with the hospital's side where its log was given.
    pub(super) countersignatures: Vec<Countersigned>,
    /// (round, node): a node a round record was sent to, of which no log given holds a receipt
    /// for that record (the coordinator never asked, the node never answered, or the receipt was
    /// deleted from the coordinator's log).
    pub(super) missing: Vec<(u64, String)>,
}

/// One countersignature as the report shows it.
pub(super) struct Countersigned {
    /// From the coordinator's `receipt` record, re-verified; `None` when only the hospital's log
    /// holds it (the coordinator's log does not).
    pub(super) coordinator: Option<Checked>,
    /// The hospital's own `receipt_signed` entry, when its log was given.
    pub(super) hospital: Option<Entry>,
    /// The hospital's name and the round, for rows with no coordinator side.
    pub(super) node: String,
    pub(super) round: u64,
    /// What differs between the two logs; empty when they agree or only one log was given.
    pub(super) differences: Vec<String>,
    /// The hospital's log was given (so a missing side is a finding, not an absence).
    pub(super) cross_checked: bool,
}

impl Countersigned {
    pub(super) fn failed(&self) -> bool {
        self.coordinator.as_ref().is_none_or(|c| !c.stands()) || !self.differences.is_empty()
    }

    /// The hospital's own record's hash of the round record, when its log holds it.
    fn hospital_record_sha256(&self) -> Option<&str> {
        match self.hospital.as_ref().map(|e| &e.event) {
            Some(AuditEvent::ReceiptSigned { record_sha256, .. }) => Some(record_sha256),
            _ => None,
        }
    }
}

/// The plan an event of a running plan names, with its round where it has one.
fn plan_and_round(event: &AuditEvent) -> Option<(&str, u64)> {
    use AuditEvent as E;
    Some(match event {
        E::PlanAccepted(d) | E::PlanRefused(d) => (d.plan_id.as_str(), 0),
        E::RoundOpened { plan_id, round, .. }
        | E::RoundClosed { plan_id, round, .. }
        | E::AggregateReleased { plan_id, round, .. }
        | E::UpdateRejected { plan_id, round, .. }
        | E::RoundRecord { plan_id, round, .. }
        | E::Receipt { plan_id, round, .. } => (plan_id.as_str(), *round),
        E::PlanFinished { plan_id, .. } | E::ModelExported { plan_id, .. } => (plan_id.as_str(), 0),
        _ => return None,
    })
}

pub(super) fn plans(coord: &Log, ca: Option<audit::CertCheck<'_>>) -> Vec<PlanView> {
    let mut out: Vec<PlanView> = Vec::new();
    for entry in coord.trusted() {
        if let AuditEvent::PlanSubmitted { plan_id, name, .. } = &entry.event {
            out.push(PlanView {
                id: plan_id.clone(),
                name: name.clone(),
                submitted: entry.clone(),
                decisions: vec![],
                rounds: BTreeMap::new(),
                rejected: vec![],
                finished: None,
                exported: None,
                round_records: BTreeMap::new(),
                countersignatures: Vec::new(),
                missing: Vec::new(),
            });
            continue;
        }
        let Some((id, round)) = plan_and_round(&entry.event) else { continue };
        let Some(p) = out.iter_mut().rev().find(|p| p.id == id) else { continue };
        match &entry.event {
            AuditEvent::PlanAccepted(_) | AuditEvent::PlanRefused(_) => p.decisions.push(entry.clone()),
            AuditEvent::RoundOpened { .. } if round > 0 => p.rounds.entry(round).or_default().0 = Some(entry.clone()),
            AuditEvent::RoundClosed { .. } if round > 0 => p.rounds.entry(round).or_default().1 = Some(entry.clone()),
            AuditEvent::AggregateReleased { .. } if round > 0 => {
                p.rounds.entry(round).or_default().2 = Some(entry.clone());
            }
            AuditEvent::UpdateRejected { .. } => p.rejected.push(entry.clone()),
            AuditEvent::PlanFinished { .. } => p.finished = Some(entry.clone()),
            AuditEvent::RoundRecord { reported, .. } => {
                let hash = ContentHash::of(entry.record.line().as_bytes()).to_hex();
                p.round_records.insert(round, (hash, reported.clone()));
            }
            AuditEvent::Receipt { .. } => {
                let held = p.round_records.get(&round).map(|(h, _)| h.as_str());
                let checked = receipts::check_record(&entry.record, held, ca);
                p.countersignatures.push(Countersigned {
                    node: checked.node.clone(),
                    round: checked.round,
                    coordinator: Some(checked),
                    hospital: None,
                    differences: Vec::new(),
                    cross_checked: false,
                });
            }
            AuditEvent::ModelExported { .. } => p.exported = Some(entry.clone()),
            _ => {}
        }
    }
    out
}

/// Matches each countersignature with the hospital's own record of it, for every hospital whose
/// log was given and verified: what differs, a receipt the hospital's log does not hold, and one
/// it holds that the coordinator's log does not.
pub(super) fn cross_check(plans: &mut [PlanView], nodes: &[Log]) {
    for node in nodes {
        let Ok(v) = &node.verdict else { continue };
        let mut theirs: Vec<&Entry> =
            node.trusted().iter().filter(|e| matches!(e.event, AuditEvent::ReceiptSigned { .. })).collect();
        let key = |e: &Entry| match &e.event {
            AuditEvent::ReceiptSigned { plan_id, round, record_sha256, .. } => {
                (plan_id.clone(), *round, record_sha256.clone())
            }
            _ => Default::default(),
        };
        for p in plans.iter_mut() {
            for c in &mut p.countersignatures {
                let Some(coord) = c.coordinator.as_ref().filter(|c| c.actor == v.fingerprint) else { continue };
                c.cross_checked = true;
                let same = |e: &&Entry| {
                    let (plan, round, _) = key(e);
                    plan == coord.plan_id && round == coord.round
                };
                // The record with the same hash, else the hospital's last one for that round.
                let pos = theirs
                    .iter()
                    .position(|e| same(e) && key(e).2 == coord.record_sha256)
                    .or_else(|| theirs.iter().rposition(same));
                match pos {
                    Some(i) => {
                        let e = theirs.remove(i);
                        c.differences = receipts::differences(coord, &e.record);
                        c.hospital = Some(e.clone());
                    }
                    None => c.differences = vec!["the hospital's log holds no receipt for this round record".into()],
                }
            }
        }
        // What is left the hospital signed, and the coordinator's log does not hold.
        for e in theirs {
            let (plan_id, round, hash) = key(e);
            let plan = plans
                .iter_mut()
                .rev()
                .find(|p| p.id == plan_id && p.round_records.get(&round).is_some_and(|(h, _)| *h == hash));
            let Some(p) = plan else { continue };
            p.countersignatures.push(Countersigned {
                coordinator: None,
                hospital: Some(e.clone()),
                node: v.writer.clone(),
                round,
                differences: vec!["the coordinator's log holds no receipt for this countersignature".into()],
                cross_checked: true,
            });
        }
    }
}

/// For each round record, each node it was sent to of which neither log holds a receipt for
/// that record: a dropped receipt is a finding, not an absence. A receipt the coordinator's log
/// holds (verified or not) or the hospital's own record of one (listed by [`cross_check`]) is
/// shown in its own row and is not missing.
pub(super) fn find_missing(plans: &mut [PlanView]) {
    for p in plans.iter_mut() {
        let mut missing = Vec::new();
        for (round, (hash, reported)) in &p.round_records {
            for node in reported {
                let held = p.countersignatures.iter().any(|c| {
                    c.round == *round
                        && c.node == *node
                        && match (&c.coordinator, c.hospital_record_sha256()) {
                            (Some(k), _) => k.record_sha256 == *hash,
                            (None, Some(h)) => h == hash,
                            (None, None) => false,
                        }
                });
                if !held {
                    missing.push((*round, node.clone()));
                }
            }
        }
        p.missing = missing;
    }
}

/// ε charged by a hospital, per plan run (the short plan id, and the run when the log names one)
/// in round order: (round, ε spent so far, the cap). Two runs of one plan are two series.
pub(super) type Charges = BTreeMap<String, Vec<(u64, f64, Option<f64>)>>;

pub(super) fn charges(node: &Log) -> Charges {
    let mut out = Charges::new();
    for e in node.trusted() {
        let AuditEvent::EpsilonCharged { plan_id, run, round, epsilon, epsilon_cap, .. } = &e.event else { continue };
        let key = match run {
            Some(run) if !run.is_empty() => format!("{} run {}", short(plan_id), short(run)),
            _ => short(plan_id).to_string(),
        };
        // A non-finite ε (written as null) plots as 0, as the report always showed it.
        let spent = if epsilon.is_finite() { *epsilon } else { 0.0 };
        out.entry(key).or_default().push((*round, spent, epsilon_cap.filter(|c| c.is_finite())));
    }
    out
}
