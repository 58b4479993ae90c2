//! Receipts: the coordinator's side of a hospital countersigning a round record, with no I/O.
//!
//! - [`Awaiting`] holds each round record sent out for countersigning and decides whether a
//!   countersignature is taken: the record is the one sent, the signer was sent it, the reason
//!   is within bounds, the signature covers the verdict and reason ([`receipt::Statement`]), and
//!   it is the signer's first for that record (one per node and round).
//! - [`check_record`] re-verifies a `receipt` record offline, from what the record carries (the
//!   node's certificate, the signature, the verdict, the reason and the record hash), against the
//!   round record the log actually holds; `audit report` runs it on every receipt.
//! - [`differences`] compares a receipt in the coordinator's log with the hospital's own
//!   `receipt_signed` record of it.

use std::collections::{HashMap, HashSet};

use sanctum_protocol::audit::{AuditEvent, CertCheck, Record};
use sanctum_protocol::hash::ContentHash;
use sanctum_protocol::pki;
use sanctum_protocol::receipt::{MAX_REASON_BYTES, Statement};

/// A round record sent to nodes, waiting for their countersignatures.
#[derive(Debug)]
struct Pending {
    /// The run whose round it records: a plan's runs record the same round numbers.
    run: String,
    /// The record's exact line in the audit log: what was sent and what is countersigned.
    line: String,
    hash: ContentHash,
    /// The nodes the record was sent to (its `reported` list): only they countersign it.
    recipients: HashSet<String>,
    /// The names (from their certificates) that have countersigned this record; a second is
    /// refused. By name, not fingerprint: a renewed node holds two valid certificates, and still
    /// countersigns a round once.
    signed: HashSet<String>,
    /// The recipients the record was sent to. A record the coordinator wrote after a crash (the
    /// round was committed, its record was not) reached nobody: each recipient is sent it when it
    /// next connects.
    delivered: HashSet<String>,
}

/// The records of this many runs of a plan are awaited per round; an older run's go (a node that
/// countersigns one that late is told it is not awaited).
pub const RUNS_AWAITED: usize = 4;

/// Whether a record was sent to its recipients when it was registered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivered {
    /// Sent to every recipient now.
    All,
    /// Sent to nobody yet (written while recovering): each gets it when it connects.
    None,
}

/// The round records awaiting receipts, by (plan, round), one per run (the newest
/// [`RUNS_AWAITED`] runs), told apart by the record's hash, which every countersignature names:
/// a late receipt for an earlier run's round goes to that run's record, never to a later run's.
#[derive(Debug, Default)]
pub struct Awaiting {
    records: HashMap<(String, u32), Vec<Pending>>,
}

/// Who countersigns: read from the verified TLS client certificate.
#[derive(Clone, Copy, Debug)]
pub struct Signer<'a> {
    pub name: &'a str,
    /// SHA-256 (hex) of the certificate: the actor of the `receipt` record.
    pub fingerprint: &'a str,
    pub cert_der: &'a [u8],
}

/// A countersignature as it arrives (the wire type's fields, converted at the edge).
#[derive(Clone, Copy, Debug)]
pub struct Countersignature<'a> {
    pub plan_id: &'a str,
    pub round: u32,
    pub record_sha256: &'a str,
    pub signature: &'a [u8],
    pub agrees: bool,
    pub reason: &'a str,
}

/// Why a countersignature is not taken; nothing is written for it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no round record for plan {plan} round {round} awaits a receipt")]
    NotAwaited { plan: String, round: u32 },
    #[error("record_sha256 is not the hash of the round record that was sent: countersign the record as received")]
    WrongRecord,
    #[error("the round record was not sent to {node}: only the nodes that reported countersign it")]
    NotARecipient { node: String },
    #[error("the reason is {bytes} bytes, more than the {max} a receipt may carry: shorten it")]
    ReasonTooLong { bytes: usize, max: usize },
    #[error("countersignature: {0}")]
    BadSignature(String),
    #[error("{node} already countersigned the record of plan {plan} round {round}: one receipt per node and round")]
    AlreadyCountersigned { node: String, plan: String, round: u32 },
}

/// A countersignature taken: what the `receipt` record holds, enough to re-verify it offline.
#[derive(Clone, Debug, PartialEq)]
pub struct Accepted {
    pub node: String,
    pub plan_id: String,
    /// The run whose round record was countersigned.
    pub run: String,
    pub round: u32,
    pub record_sha256: String,
    pub signature: Vec<u8>,
    pub agrees: bool,
    pub reason: String,
    pub cert_der: Vec<u8>,
}

impl Accepted {
    /// The `receipt` record.
    pub fn event(&self) -> AuditEvent {
        AuditEvent::Receipt {
            node: self.node.clone(),
            plan_id: self.plan_id.clone(),
            round: u64::from(self.round),
            record_sha256: self.record_sha256.clone(),
            signature: hex::encode(&self.signature),
            agrees: self.agrees,
            reason: self.reason.clone(),
            certificate: Some(hex::encode(&self.cert_der)),
        }
    }
}

fn short(hex: &str) -> String {
    hex.chars().take(12).collect()
}

impl Awaiting {
    /// Registers the exact line of run `run`'s record of `round` for countersigning. It returns
    /// the hash of the record it replaced (the same run's record of the round, written again), if
    /// any; the records of other runs stay, up to [`RUNS_AWAITED`] per round. A record that names
    /// its run is that run's, whatever `run` says (the line is what the nodes sign); one naming
    /// none (an earlier coordinator's) is `run`'s.
    pub fn insert(
        &mut self,
        plan_id: &str,
        run: &str,
        round: u32,
        line: String,
        sent: Delivered,
    ) -> Option<ContentHash> {
        // Only the nodes the record lists as reported countersign it; a line that is not a round
        // record (never one this coordinator wrote) has no recipients, so nobody can.
        let (recipients, named): (HashSet<String>, Option<String>) =
            match serde_json::from_str::<Record>(&line).ok().and_then(|r| r.typed().ok()) {
                Some(AuditEvent::RoundRecord { reported, run, .. }) => (reported.into_iter().collect(), run),
                _ => (HashSet::new(), None),
            };
        let run = named.unwrap_or_else(|| run.to_string());
        let delivered = if sent == Delivered::All { recipients.clone() } else { HashSet::new() };
        let hash = ContentHash::of(line.as_bytes());
        let pending = Pending { run, line, hash, recipients, signed: HashSet::new(), delivered };
        let runs = self.records.entry((plan_id.to_string(), round)).or_default();
        let replaced = runs.iter().position(|p| p.run == pending.run).map(|i| runs.remove(i).hash);
        runs.push(pending);
        if runs.len() > RUNS_AWAITED {
            runs.remove(0);
        }
        replaced
    }

    /// Marks `names` as having countersigned the record with this hash already (read back from
    /// the audit log after a restart), so a second receipt from them is refused.
    pub fn already_signed<'a>(&mut self, hash: &ContentHash, names: impl IntoIterator<Item = &'a str>) {
        if let Some(p) = self.records.values_mut().flatten().find(|p| p.hash == *hash) {
            p.signed.extend(names.into_iter().map(str::to_string));
        }
    }

    /// The records `node` is a recipient of and was never sent, as (plan, round, line), now
    /// marked sent: what to send it as it connects.
    pub fn undelivered_to(&mut self, node: &str) -> Vec<(String, u32, String)> {
        let mut out = Vec::new();
        for ((plan_id, round), runs) in &mut self.records {
            for p in runs.iter_mut() {
                if p.recipients.contains(node) && !p.signed.contains(node) && p.delivered.insert(node.to_string()) {
                    out.push((plan_id.clone(), *round, p.line.clone()));
                }
            }
        }
        out.sort();
        out
    }

    /// Decides on one countersignature, and on success marks the signer as having signed (so the
    /// check and the mark are one step under the caller's lock).
    pub fn accept(&mut self, signer: Signer<'_>, c: Countersignature<'_>) -> Result<Accepted, Refusal> {
        let key = (c.plan_id.to_string(), c.round);
        let runs = self
            .records
            .get_mut(&key)
            .filter(|runs| !runs.is_empty())
            .ok_or_else(|| Refusal::NotAwaited { plan: short(c.plan_id), round: c.round })?;
        let pending = runs.iter_mut().find(|p| p.hash.to_hex() == c.record_sha256).ok_or(Refusal::WrongRecord)?;
        if !pending.recipients.contains(signer.name) {
            return Err(Refusal::NotARecipient { node: signer.name.to_string() });
        }
        if c.reason.len() > MAX_REASON_BYTES {
            return Err(Refusal::ReasonTooLong { bytes: c.reason.len(), max: MAX_REASON_BYTES });
        }
        let statement = Statement {
            plan_id: c.plan_id,
            round: c.round,
            record_sha256: pending.hash,
            agrees: c.agrees,
            reason: c.reason,
        };
        statement.verify(c.signature, signer.cert_der).map_err(|e| Refusal::BadSignature(e.to_string()))?;
        if !pending.signed.insert(signer.name.to_string()) {
            return Err(Refusal::AlreadyCountersigned {
                node: signer.name.to_string(),
                plan: short(c.plan_id),
                round: c.round,
            });
        }
        Ok(Accepted {
            node: signer.name.to_string(),
            plan_id: c.plan_id.to_string(),
            run: pending.run.clone(),
            round: c.round,
            record_sha256: c.record_sha256.to_string(),
            signature: c.signature.to_vec(),
            agrees: c.agrees,
            reason: c.reason.to_string(),
            cert_der: signer.cert_der.to_vec(),
        })
    }
}

/// A `receipt` record re-verified offline.
#[derive(Clone, Debug, PartialEq)]
pub struct Checked {
    /// The signer's name from its certificate; the record's own `node` field when the
    /// certificate cannot be read.
    pub node: String,
    pub plan_id: String,
    pub round: u64,
    pub record_sha256: String,
    pub agrees: bool,
    pub reason: String,
    /// Hex, as recorded.
    pub signature: String,
    /// The record's actor: the signer's certificate fingerprint.
    pub actor: String,
    /// Everything wrong with it; empty when the countersignature stands.
    pub problems: Vec<String>,
}

impl Checked {
    /// The countersignature stands: the node's certificate signed this verdict and reason over
    /// the round record the log holds.
    pub fn stands(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Re-verifies a `receipt` record: its certificate (issued by the CA when `ca` is given; its
/// fingerprint is the record's actor; it names the record's node), the signature over the
/// statement rebuilt from the record's verdict, reason and record hash, and that record hash
/// against `held`, the hash of the round record the log holds for that plan and round.
pub fn check_record(r: &Record, held: Option<&str>, ca: Option<CertCheck<'_>>) -> Checked {
    let mut problems = Vec::new();
    // Nothing of a record that does not read as a receipt is used: it never stands.
    let event = match r.typed() {
        Ok(event) => event,
        Err(e) => return unreadable(r, format!("it does not read as a receipt: {e}")),
    };
    let AuditEvent::Receipt { mut node, plan_id, round, record_sha256, signature, agrees, reason, certificate } = event
    else {
        return unreadable(r, format!("it is a {} record, not a receipt", event.name()));
    };
    let cert = match certificate.as_deref() {
        None | Some("") => {
            problems.push(
                "carries no certificate, so its signature cannot be checked (a receipt from before verdicts were signed, or one stripped)"
                    .to_string(),
            );
            None
        }
        Some(h) => match hex::decode(h) {
            Ok(der) => Some(der),
            Err(_) => {
                problems.push("its certificate is not hex".to_string());
                None
            }
        },
    };
    if let Some(der) = &cert {
        if let Some(check) = ca
            && let Err(e) = check(der)
        {
            problems.push(format!("its certificate was not issued by the consortium CA: {e}"));
        }
        let fp = ContentHash::of(der).to_hex();
        if fp != r.actor {
            problems.push(format!("its certificate ({}) is not the record's actor ({})", short(&fp), short(&r.actor)));
        }
        match pki::identity_from_der(der) {
            Ok(id) => {
                if id.name != node {
                    problems.push(format!("it names node '{node}', but its certificate is '{}'", id.name));
                }
                if id.role != pki::Role::Node {
                    problems.push(format!("its certificate is a {} certificate, not a node's", id.role));
                }
                node = id.name;
            }
            Err(e) => problems.push(format!("its certificate: {e}")),
        }
    }
    let hash = ContentHash::parse(&record_sha256);
    match (held, &hash) {
        (_, Err(_)) => problems.push("record_sha256 is not a SHA-256".to_string()),
        (None, _) => problems.push(format!("the log holds no round record for plan {} round {round}", short(&plan_id))),
        (Some(h), _) if h != record_sha256 => problems.push(format!(
            "record_sha256 {} is not the hash of the round record the log holds for plan {} round {round} ({})",
            short(&record_sha256),
            short(&plan_id),
            short(h)
        )),
        _ => {}
    }
    // Every path that does not verify the signature records why: a receipt whose signature was
    // not checked never stands.
    match (&cert, hash, u32::try_from(round)) {
        (Some(der), Ok(hash), Ok(round32)) => match hex::decode(&signature) {
            Err(_) => problems.push("its signature is not hex".to_string()),
            Ok(sig) => {
                let statement =
                    Statement { plan_id: &plan_id, round: round32, record_sha256: hash, agrees, reason: &reason };
                if let Err(e) = statement.verify(&sig, der) {
                    problems.push(e.to_string());
                }
            }
        },
        (_, _, Err(_)) => problems.push(format!(
            "its round {round} is beyond any round a receipt can be signed for, so its signature was not checked"
        )),
        _ => problems.push("its signature was not checked (see the problems above)".to_string()),
    }
    Checked { node, plan_id, round, record_sha256, agrees, reason, signature, actor: r.actor.clone(), problems }
}

/// A record [`check_record`] cannot read as a receipt: nothing of it is used, and it never stands.
fn unreadable(r: &Record, problem: String) -> Checked {
    Checked {
        node: String::new(),
        plan_id: String::new(),
        round: 0,
        record_sha256: String::new(),
        agrees: false,
        reason: String::new(),
        signature: String::new(),
        actor: r.actor.clone(),
        problems: vec![problem],
    }
}

fn verdict(agrees: bool) -> &'static str {
    if agrees { "agrees" } else { "disputes" }
}

/// What differs between a receipt in the coordinator's log and the hospital's own
/// `receipt_signed` record of it (same plan and round); empty when they agree.
pub fn differences(coordinator: &Checked, hospital: &Record) -> Vec<String> {
    let (their_hash, theirs, their_reason, their_sig) = match hospital.typed() {
        Ok(AuditEvent::ReceiptSigned { record_sha256, agrees, reason, signature, .. }) => {
            (record_sha256, agrees, reason, signature.unwrap_or_default())
        }
        // The report passes only the hospital's `receipt_signed` records; anything else differs
        // wholly, and says why.
        Ok(other) => return vec![format!("the hospital's record is a {} record, not a receipt_signed", other.name())],
        Err(e) => return vec![format!("the hospital's record does not read as a receipt_signed: {e}")],
    };
    let mut out = Vec::new();
    if their_hash != coordinator.record_sha256 {
        out.push(format!(
            "record hash: the coordinator's log has {}, the hospital's log {}",
            short(&coordinator.record_sha256),
            short(&their_hash)
        ));
    }
    if theirs != coordinator.agrees {
        out.push(format!(
            "verdict: the coordinator's log says the hospital {}, the hospital's log says it {}",
            verdict(coordinator.agrees),
            verdict(theirs)
        ));
    }
    if their_reason != coordinator.reason {
        out.push(format!(
            "reason: the coordinator's log has {:?}, the hospital's log {:?}",
            coordinator.reason, their_reason
        ));
    }
    // Older node logs did not keep the signature; where they do, it must be the one recorded.
    if !their_sig.is_empty() && their_sig != coordinator.signature {
        out.push("signature: the coordinator's log holds another signature than the one the hospital made".into());
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use sanctum_protocol::audit::GENESIS_PREV;
    use sanctum_protocol::pki::{Role, SignSpec};
    use sanctum_protocol::secagg::keys;
    use serde_json::{Value, json};

    use super::*;

    struct Member {
        name: &'static str,
        der: Vec<u8>,
        key_pem: String,
        fp: String,
    }

    fn consortium() -> (pki::Issued, Vec<Member>) {
        let ca = pki::init_ca("t", 1).unwrap();
        let members = ["cleveland", "hungarian", "lead"]
            .into_iter()
            .map(|name| {
                let role = if name == "lead" { Role::Lead } else { Role::Node };
                let me = pki::issue(&ca.cert_pem, &ca.key_pem, &SignSpec { name, role, days: 1, hosts: &[] }).unwrap();
                let der = keys::cert_der_from_pem(&me.cert_pem).unwrap();
                let fp = ContentHash::of(&der).to_hex();
                Member { name, der, key_pem: me.key_pem, fp }
            })
            .collect();
        (ca, members)
    }

    fn round_record(reported: &[&str]) -> String {
        round_record_of(None, reported)
    }

    /// A round record of plan "p" round 1 naming run `run` (`None`: as earlier coordinators
    /// wrote it).
    fn round_record_of(run: Option<&str>, reported: &[&str]) -> String {
        let event = AuditEvent::RoundRecord {
            plan_id: "p".into(),
            run: run.map(str::to_string),
            round: 1,
            model_sha256: "cd".repeat(32),
            updates: vec![],
            reported: reported.iter().map(|n| n.to_string()).collect(),
            dropped: vec![],
        };
        let params = event.to_parts().unwrap().1;
        Record {
            seq: 5,
            time: "t".into(),
            actor: "c".into(),
            event: "round_record".into(),
            params,
            prev: GENESIS_PREV.into(),
            sig: "00".into(),
        }
        .line()
    }

    fn signed(m: &Member, line: &str, agrees: bool, reason: &str) -> (String, Vec<u8>) {
        let hash = ContentHash::of(line.as_bytes());
        let s = Statement { plan_id: "p", round: 1, record_sha256: hash, agrees, reason };
        (hash.to_hex(), s.sign(|b| keys::sign_message(b, &m.key_pem)).unwrap())
    }

    fn cs<'a>(hash: &'a str, signature: &'a [u8], agrees: bool, reason: &'a str) -> Countersignature<'a> {
        Countersignature { plan_id: "p", round: 1, record_sha256: hash, signature, agrees, reason }
    }

    fn signer(m: &Member) -> Signer<'_> {
        Signer { name: m.name, fingerprint: &m.fp, cert_der: &m.der }
    }

    /// One table: each countersignature, in order against one awaited record, and what happens.
    #[test]
    fn a_countersignature_is_taken_once_per_node_and_round_and_only_when_it_is_sound() {
        let (ca, ms) = consortium();
        let (cle, hun, lead) = (&ms[0], &ms[1], &ms[2]);
        let line = round_record(&["cleveland", "hungarian"]);
        let mut awaiting = Awaiting::default();
        assert_eq!(awaiting.insert("p", "run1", 1, line.clone(), Delivered::All), None);
        let (hash, good) = signed(cle, &line, true, "");
        let (_, disputing) = signed(hun, &line, false, "the record lists an update this node never sent");
        let (_, by_lead) = signed(lead, &line, true, "");
        let (_, agreeing_again) = signed(hun, &line, true, "");
        let long = "x".repeat(MAX_REASON_BYTES + 1);
        let bad_sig = Err(Refusal::BadSignature(
            "the signature does not verify over the recorded verdict, reason and record hash: the receipt was altered or forged"
                .into(),
        ));
        let never_sent = "the record lists an update this node never sent";
        let elsewhere = "ab".repeat(32);
        let cases: Vec<(&str, Signer<'_>, Countersignature<'_>, Result<(), Refusal>)> = vec![
            (
                "no record awaited",
                signer(cle),
                Countersignature { round: 2, ..cs(&hash, &good, true, "") },
                Err(Refusal::NotAwaited { plan: "p".into(), round: 2 }),
            ),
            ("another record's hash", signer(cle), cs(&elsewhere, &good, true, ""), Err(Refusal::WrongRecord)),
            (
                "a node the record was not sent to",
                signer(lead),
                cs(&hash, &by_lead, true, ""),
                Err(Refusal::NotARecipient { node: "lead".into() }),
            ),
            (
                "a reason beyond the bound",
                signer(cle),
                cs(&hash, &good, true, &long),
                Err(Refusal::ReasonTooLong { bytes: MAX_REASON_BYTES + 1, max: MAX_REASON_BYTES }),
            ),
            ("the verdict flipped after signing", signer(cle), cs(&hash, &good, false, ""), bad_sig.clone()),
            ("another node's signature", signer(cle), cs(&hash, &disputing, false, never_sent), bad_sig.clone()),
            ("sound", signer(cle), cs(&hash, &good, true, ""), Ok(())),
            (
                "the same node again",
                signer(cle),
                cs(&hash, &good, true, ""),
                Err(Refusal::AlreadyCountersigned { node: "cleveland".into(), plan: "p".into(), round: 1 }),
            ),
            ("a dispute from the other node", signer(hun), cs(&hash, &disputing, false, never_sent), Ok(())),
            (
                "the other node again, now agreeing",
                signer(hun),
                cs(&hash, &agreeing_again, true, ""),
                Err(Refusal::AlreadyCountersigned { node: "hungarian".into(), plan: "p".into(), round: 1 }),
            ),
        ];
        for (what, who, c, want) in cases {
            let got = awaiting.accept(who, c);
            assert_eq!(got.as_ref().map(|_| ()).map_err(Clone::clone), want, "{what}");
            if let Ok(a) = got {
                assert_eq!((a.node.as_str(), a.agrees, a.cert_der.as_slice()), (who.name, c.agrees, who.cert_der));
            }
        }
        // A renewed node (a second valid certificate under the same name) countersigns once.
        let renewed = pki::issue(
            &ca.cert_pem,
            &ca.key_pem,
            &SignSpec { name: "cleveland", role: Role::Node, days: 1, hosts: &[] },
        )
        .unwrap();
        let der = keys::cert_der_from_pem(&renewed.cert_pem).unwrap();
        let renewed = Member { name: "cleveland", fp: ContentHash::of(&der).to_hex(), der, key_pem: renewed.key_pem };
        assert_ne!(renewed.fp, cle.fp);
        let (_, by_renewed) = signed(&renewed, &line, false, never_sent);
        assert_eq!(
            awaiting.accept(signer(&renewed), cs(&hash, &by_renewed, false, never_sent)).map(|_| ()),
            Err(Refusal::AlreadyCountersigned { node: "cleveland".into(), plan: "p".into(), round: 1 }),
            "a second certificate of the same node"
        );
        // The plan's next run records round 1 again: a new record, and a new receipt is taken,
        // charged to that run; a late receipt for the first run's record still goes to the first.
        let rerun = round_record(&["cleveland", "hungarian"]).replace("\"seq\":5", "\"seq\":9");
        assert_eq!(awaiting.insert("p", "run2", 1, rerun.clone(), Delivered::All), None);
        let (hash2, sig2) = signed(cle, &rerun, true, "");
        assert_eq!(awaiting.accept(signer(cle), cs(&hash2, &sig2, true, "")).map(|a| a.run), Ok("run2".into()));
        assert!(matches!(
            awaiting.accept(signer(cle), cs(&hash2, &sig2, true, "")),
            Err(Refusal::AlreadyCountersigned { .. })
        ));
        let (_, late) = signed(hun, &line, true, "");
        let late = awaiting.accept(signer(hun), cs(&hash, &late, true, ""));
        assert_eq!(
            late.map(|a| a.run),
            Err(Refusal::AlreadyCountersigned { node: "hungarian".into(), plan: "p".into(), round: 1 })
        );
        let (_, hun2) = signed(hun, &rerun, true, "");
        assert_eq!(awaiting.accept(signer(hun), cs(&hash2, &hun2, true, "")).map(|a| a.run), Ok("run2".into()));
        // Writing the same run's record again replaces it (and says which it replaced).
        assert_eq!(awaiting.insert("p", "run2", 1, rerun.clone(), Delivered::All).map(|h| h.to_hex()), Some(hash2));
        // Only the newest RUNS_AWAITED runs' records are awaited per round.
        for n in 3..=(2 + RUNS_AWAITED) {
            let line = round_record(&["cleveland"]).replace("\"seq\":5", &format!("\"seq\":{}", 10 + n));
            awaiting.insert("p", &format!("run{n}"), 1, line, Delivered::All);
        }
        let (_, again) = signed(cle, &line, true, "");
        assert_eq!(awaiting.accept(signer(cle), cs(&hash, &again, true, "")).map(|_| ()), Err(Refusal::WrongRecord));
        // A line that does not read as a round record (here one without its updates) has no
        // recipients: nobody countersigns it.
        let garbled = round_record(&["cleveland"]).replace(",\"updates\":[]", "");
        assert!(!garbled.contains("updates"), "{garbled}");
        awaiting.insert("p", "run9", 2, garbled.clone(), Delivered::All);
        let hash = ContentHash::of(garbled.as_bytes());
        let s = Statement { plan_id: "p", round: 2, record_sha256: hash, agrees: true, reason: "" };
        let sig = s.sign(|b| keys::sign_message(b, &cle.key_pem)).unwrap();
        let hex = hash.to_hex();
        let c = Countersignature { round: 2, ..cs(&hex, &sig, true, "") };
        assert_eq!(
            awaiting.accept(signer(cle), c).map(|_| ()),
            Err(Refusal::NotARecipient { node: "cleveland".into() })
        );
    }

    /// A record written while recovering (the round was committed, its record was not) reaches
    /// each recipient once, when it connects; those the audit log shows as having signed it are
    /// neither sent it again nor let sign it twice.
    #[test]
    fn a_record_written_after_a_crash_reaches_each_recipient_once_as_it_connects() {
        let (_, ms) = consortium();
        let (cle, hun) = (&ms[0], &ms[1]);
        let line = round_record(&["cleveland", "hungarian"]);
        let mut awaiting = Awaiting::default();
        awaiting.insert("p", "run1", 1, line.clone(), Delivered::None);
        let hash = ContentHash::of(line.as_bytes());
        awaiting.already_signed(&hash, ["hungarian"]);
        assert_eq!(awaiting.undelivered_to("cleveland"), vec![("p".to_string(), 1, line.clone())]);
        assert!(awaiting.undelivered_to("cleveland").is_empty(), "sent once");
        assert!(awaiting.undelivered_to("hungarian").is_empty(), "it already signed");
        assert!(awaiting.undelivered_to("lead").is_empty(), "not a recipient");
        let (h, sig) = signed(hun, &line, true, "");
        assert!(matches!(
            awaiting.accept(signer(hun), cs(&h, &sig, true, "")),
            Err(Refusal::AlreadyCountersigned { .. })
        ));
        let (h, sig) = signed(cle, &line, true, "");
        assert_eq!(awaiting.accept(signer(cle), cs(&h, &sig, true, "")).map(|a| a.run), Ok("run1".into()));
        // A record sent when it was written is not sent again at a reconnect.
        let sent = round_record(&["cleveland"]).replace("\"seq\":5", "\"seq\":7");
        awaiting.insert("p", "run1", 2, sent, Delivered::All);
        assert!(awaiting.undelivered_to("cleveland").is_empty());
    }

    /// A record that names its run is awaited as that run's (a receipt for it is charged to it,
    /// and writing that run's record again replaces it); one naming none is the caller's run's.
    #[test]
    fn a_record_that_names_its_run_is_awaited_as_that_runs() {
        let (_, ms) = consortium();
        let cle = &ms[0];
        let mut awaiting = Awaiting::default();
        let named = round_record_of(Some("run2"), &["cleveland"]);
        assert!(named.contains(r#""run":"run2""#), "{named}");
        // Registered under another run by mistake: the line's run is the one it is of.
        assert_eq!(awaiting.insert("p", "run1", 1, named.clone(), Delivered::All), None);
        let (hash, sig) = signed(cle, &named, true, "");
        assert_eq!(awaiting.accept(signer(cle), cs(&hash, &sig, true, "")).map(|a| a.run), Ok("run2".into()));
        // Run 2's record written again replaces it; an unnamed record registered for run 1 does not.
        let again = named.replace("\"seq\":5", "\"seq\":8");
        assert_eq!(awaiting.insert("p", "run2", 1, again, Delivered::All), Some(ContentHash::of(named.as_bytes())));
        let unnamed = round_record(&["cleveland"]);
        assert_eq!(awaiting.insert("p", "run1", 1, unnamed.clone(), Delivered::All), None);
        let (hash, sig) = signed(cle, &unnamed, true, "");
        assert_eq!(awaiting.accept(signer(cle), cs(&hash, &sig, true, "")).map(|a| a.run), Ok("run1".into()));
    }

    fn receipt_record(a: &Accepted, actor: &str) -> Record {
        Record {
            seq: 6,
            time: "t".into(),
            actor: actor.into(),
            event: "receipt".into(),
            params: a.event().to_parts().unwrap().1,
            prev: GENESIS_PREV.into(),
            sig: "00".into(),
        }
    }

    /// A receipt record re-verified offline: sound as written, and each alteration a dishonest
    /// log writer could make is named.
    #[test]
    fn a_receipt_record_is_reverified_offline_and_every_alteration_is_named() {
        let (ca, ms) = consortium();
        let (cle, hun) = (&ms[0], &ms[1]);
        let line = round_record(&["cleveland", "hungarian"]);
        let mut awaiting = Awaiting::default();
        awaiting.insert("p", "run1", 1, line.clone(), Delivered::All);
        let (hash, sig) = signed(cle, &line, true, "");
        let accepted = awaiting.accept(signer(cle), cs(&hash, &sig, true, "")).unwrap();
        let ca_check = |der: &[u8]| sanctum_protocol::audit::issued_by(&ca.cert_pem, der);
        let good = receipt_record(&accepted, &cle.fp);
        let checked = check_record(&good, Some(&hash), Some(&ca_check));
        assert!(checked.stands(), "{:?}", checked.problems);
        assert_eq!((checked.node.as_str(), checked.agrees), ("cleveland", true));

        let other_ca = pki::init_ca("other", 1).unwrap();
        let other_check = |der: &[u8]| sanctum_protocol::audit::issued_by(&other_ca.cert_pem, der);
        let with = |k: &str, v: Value| {
            let mut r = good.clone();
            r.params.insert(k.into(), v);
            r
        };
        let elsewhere = "ab".repeat(32);
        // (what, the record, the round record's hash held, the CA check, a phrase of the finding)
        type Case<'a> = (&'a str, Record, Option<&'a str>, Option<CertCheck<'a>>, &'a str);
        let cases: Vec<Case<'_>> = vec![
            (
                "verdict flipped",
                with("agrees", json!(false)),
                Some(&hash),
                None,
                "does not verify over the recorded verdict",
            ),
            ("reason added", with("reason", json!("forged")), Some(&hash), None, "does not verify"),
            ("no certificate", with("certificate", json!("")), Some(&hash), None, "carries no certificate"),
            ("no verdict", with("agrees", json!("yes")), Some(&hash), None, "does not read as a receipt"),
            (
                "another kind of record",
                Record { event: "receipt_signed".into(), ..good.clone() },
                Some(&hash),
                None,
                "not a receipt",
            ),
            (
                "another node's certificate",
                with("certificate", json!(hex::encode(&hun.der))),
                Some(&hash),
                None,
                "is not the record's actor",
            ),
            ("node renamed", with("node", json!("hungarian")), Some(&hash), None, "names node 'hungarian'"),
            ("another consortium", good.clone(), Some(&hash), Some(&other_check), "not issued by the consortium CA"),
            ("the round record is not in the log", good.clone(), None, None, "holds no round record"),
            ("another round record", good.clone(), Some(&elsewhere), None, "is not the hash of the round record"),
            // A round beyond u32 with a garbage signature: the signature check cannot run, and
            // that alone fails it (it once passed as "verified").
            (
                "a round beyond u32, a garbage signature",
                {
                    let mut r = with("round", json!(4_294_967_299u64));
                    r.params.insert("signature".into(), json!("00"));
                    r
                },
                Some(&hash),
                None,
                "signature was not checked",
            ),
        ];
        for (what, r, held, check, want) in cases {
            let c = check_record(&r, held, check);
            assert!(!c.stands() && c.problems.iter().any(|p| p.contains(want)), "{what}: {:?}", c.problems);
        }
    }

    #[test]
    fn a_receipt_is_compared_with_the_hospitals_own_record() {
        let hospital = |agrees: bool, reason: &str, hash: &str, sig: &str| Record {
            seq: 3,
            time: "t".into(),
            actor: "h".into(),
            event: "receipt_signed".into(),
            params: BTreeMap::from([
                ("plan_id".to_string(), json!("p")),
                ("round".to_string(), json!(1)),
                ("record_sha256".to_string(), json!(hash)),
                ("agrees".to_string(), json!(agrees)),
                ("reason".to_string(), json!(reason)),
                ("signature".to_string(), json!(sig)),
            ]),
            prev: GENESIS_PREV.into(),
            sig: "00".into(),
        };
        let coord = Checked {
            node: "cleveland".into(),
            plan_id: "p".into(),
            round: 1,
            record_sha256: "aa".into(),
            agrees: false,
            reason: "forged".into(),
            signature: "0102".into(),
            actor: "h".into(),
            problems: vec![],
        };
        assert!(
            differences(
                &Checked { agrees: true, reason: String::new(), ..coord.clone() },
                &hospital(true, "", "aa", "0102")
            )
            .is_empty()
        );
        let d = differences(&coord, &hospital(true, "", "bb", "0304"));
        assert_eq!(d.len(), 4, "{d:?}");
        assert!(d[1].contains("says the hospital disputes, the hospital's log says it agrees"), "{d:?}");
        // A node log that did not keep the signature is compared on the rest.
        assert_eq!(differences(&coord, &hospital(false, "forged", "aa", "")), Vec::<String>::new());
        let mut older = hospital(false, "forged", "aa", "");
        older.params.remove("signature");
        assert_eq!(differences(&coord, &older), Vec::<String>::new());
        // A record that does not read as the hospital's receipt differs, and says why.
        let mut garbled = hospital(false, "forged", "aa", "");
        garbled.params.remove("agrees");
        let d = differences(&coord, &garbled);
        assert!(d.len() == 1 && d[0].contains("does not read as a receipt_signed"), "{d:?}");
    }
}
