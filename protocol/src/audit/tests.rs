//! The log's tests: writing, reopening, verification against tampering, and the typed events
//! against lines real logs hold.

use proptest::prelude::*;

use std::collections::BTreeSet;

use super::*;
use crate::pki::{self, Role, SignSpec};

struct Fixture {
    dir: tempfile::TempDir,
    log: Vec<u8>,
    head: Vec<u8>,
}

/// A node certificate (DER) and its key (PEM) from a fresh CA.
fn member(name: &str) -> (Vec<u8>, String) {
    member_as(name, Role::Node)
}

fn member_as(name: &str, role: Role) -> (Vec<u8>, String) {
    let ca = pki::init_ca("t", 1).unwrap();
    let me = pki::issue(&ca.cert_pem, &ca.key_pem, &SignSpec { name, role, days: 1, hosts: &[] }).unwrap();
    (crate::secagg::keys::cert_der_from_pem(&me.cert_pem).unwrap(), me.key_pem)
}

fn build(records: usize) -> Fixture {
    let (der, key_pem) = member_as("coordinator", Role::Coordinator);
    let sign = |m: &[u8]| crate::secagg::keys::sign_message(m, &key_pem).map_err(SignError::from);
    let dir = tempfile::tempdir().unwrap();
    let writer = Writer { name: "coordinator", role: "coordinator", cert_der: &der, sign_with_cert_key: &sign };
    let mut log = AuditLog::open(dir.path(), &writer).unwrap();
    for i in 1..records {
        let params = BTreeMap::from([
            ("round".to_string(), Value::from(i as u64)),
            ("model".to_string(), Value::from(ContentHash::of(&i.to_le_bytes()).to_hex())),
        ]);
        log.append("ab".repeat(32).as_str(), "round_closed", params).unwrap();
    }
    let log_bytes = std::fs::read(dir.path().join("audit.jsonl")).unwrap();
    let head = std::fs::read(head_path(&dir.path().join("audit.jsonl"))).unwrap();
    Fixture { dir, log: log_bytes, head }
}

fn lines(log: &[u8]) -> Vec<Vec<u8>> {
    log.split(|&b| b == b'\n').filter(|l| !l.is_empty()).map(<[u8]>::to_vec).collect()
}

fn join(lines: &[Vec<u8>]) -> Vec<u8> {
    lines.iter().flat_map(|l| l.iter().copied().chain(std::iter::once(b'\n'))).collect()
}

/// The record that holds byte `pos`.
fn record_at(log: &[u8], pos: usize) -> u64 {
    log[..pos].iter().filter(|&&b| b == b'\n').count() as u64
}

fn first_bad(log: &[u8], head: &[u8]) -> Option<u64> {
    match verify(log, Some(head), None) {
        Ok(_) => None,
        Err(VerifyError::Record { seq, .. }) => Some(seq),
        Err(e) => panic!("unexpected {e}"),
    }
}

#[test]
fn a_log_verifies_and_reopening_continues_the_chain() {
    let f = build(20);
    let v = verify(&f.log, Some(&f.head), None).unwrap();
    assert_eq!((v.records, v.writer.as_str(), v.head_behind), (20, "coordinator", false));
    assert!(verify(&f.log, None, None).is_err(), "a missing head is an error");
    let _ = f.dir;
}

proptest! {
    /// Any finite f64 in a record's parameters survives the write → read → canonical-form
    /// round trip exactly (serde_json's float_roundtrip), so a verifier never mistakes a
    /// number for an altered line.
    #[test]
    fn numbers_keep_their_canonical_form(x in proptest::num::f64::NORMAL | proptest::num::f64::SUBNORMAL | proptest::num::f64::ZERO) {
        let r = Record {
            seq: 1,
            time: now_rfc3339(),
            actor: "a".into(),
            event: "e".into(),
            params: BTreeMap::from([("x".to_string(), Value::from(x))]),
            prev: GENESIS_PREV.into(),
            sig: "00".into(),
        };
        let line = r.line();
        let back: Record = serde_json::from_str(&line).unwrap();
        prop_assert_eq!(back.line(), line);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// In a log of 300 records, any single changed byte is caught at the record holding it.
    #[test]
    fn any_changed_byte_is_caught_at_its_record(pos_frac in 0.0f64..1.0, delta in 1u8..=255) {
        let f = fixture();
        let mut log = f.log.clone();
        let pos = ((log.len() - 1) as f64 * pos_frac) as usize;
        log[pos] = log[pos].wrapping_add(delta);
        let at = record_at(&f.log, pos);
        if first_bad(&log, &f.head) != Some(at) {
            eprintln!("DEBUG orig {:?} new {:?} ctx {:?} err {:?}", f.log[pos], log[pos], String::from_utf8_lossy(&f.log[pos.saturating_sub(60)..pos+20]), verify(&log, Some(&f.head), None).err().map(|e| e.to_string()));
        }
        prop_assert_eq!(first_bad(&log, &f.head), Some(at), "byte {} of the log", pos);
    }

    /// Deleting any record, swapping any two, or cutting the tail anywhere is caught, and the
    /// first bad record is named.
    #[test]
    fn removed_swapped_and_cut_records_are_caught(i in 0usize..300, j in 0usize..300, cut in 1usize..300) {
        let f = fixture();
        let original = lines(&f.log);
        let mut deleted = original.clone();
        deleted.remove(i);
        prop_assert_eq!(first_bad(&join(&deleted), &f.head), Some(i as u64));
        if i != j {
            let mut swapped = original.clone();
            swapped.swap(i, j);
            prop_assert_eq!(first_bad(&join(&swapped), &f.head), Some(i.min(j) as u64));
        }
        let kept = original.len() - cut;
        prop_assert_eq!(first_bad(&join(&original[..kept]), &f.head), Some(kept as u64));
        // A cut inside a line: that record is incomplete.
        let mut torn = join(&original[..kept]);
        torn.extend_from_slice(&original[kept][..original[kept].len() / 2]);
        prop_assert_eq!(first_bad(&torn, &f.head), Some(kept as u64));
    }
}

fn fixture() -> &'static Fixture {
    static F: std::sync::OnceLock<Fixture> = std::sync::OnceLock::new();
    F.get_or_init(|| build(300))
}

/// A log that names another writer or role than its certificate is refused at its first
/// record; an honest one reports the certificate's identity, and the CA's own log is `ca`.
#[test]
fn a_logs_writer_and_role_come_from_its_certificate() {
    let verify_as = |der: &[u8], key_pem: &str, name: &str, role: &str| {
        let sign = |m: &[u8]| crate::secagg::keys::sign_message(m, key_pem).map_err(SignError::from);
        let dir = tempfile::tempdir().unwrap();
        let writer = Writer { name, role, cert_der: der, sign_with_cert_key: &sign };
        let mut log = AuditLog::open(dir.path(), &writer).unwrap();
        log.append("x", "e", BTreeMap::new()).unwrap();
        verify_file(&dir.path().join("audit.jsonl"), None)
    };
    let (der, key) = member("cleveland");
    let v = verify_as(&der, &key, "cleveland", "node").unwrap();
    assert_eq!((v.writer.as_str(), v.role.as_str()), ("cleveland", "node"));
    for (name, role) in [("coordinator", "node"), ("cleveland", "coordinator"), ("hungarian", "lead")] {
        let err = verify_as(&der, &key, name, role).unwrap_err().to_string();
        assert!(
            err.starts_with("record 0:") && err.contains("but its certificate is 'cleveland' (node)"),
            "{name} ({role}): {err}"
        );
    }
    let ca = pki::init_ca("t", 1).unwrap();
    let ca_der = crate::secagg::keys::cert_der_from_pem(&ca.cert_pem).unwrap();
    let v = verify_as(&ca_der, &ca.key_pem, "ca", "ca").unwrap();
    assert_eq!((v.writer.as_str(), v.role.as_str()), ("ca", "ca"));
    assert!(verify_as(&ca_der, &ca.key_pem, "coordinator", "coordinator").is_err());
}

#[test]
fn reopening_reads_only_the_tail_and_continues_the_chain_even_after_a_long_record() {
    let (der, key_pem) = member("n");
    let sign = |m: &[u8]| crate::secagg::keys::sign_message(m, &key_pem).map_err(SignError::from);
    let writer = Writer { name: "n", role: "node", cert_der: &der, sign_with_cert_key: &sign };
    let dir = tempfile::tempdir().unwrap();
    let mut log = AuditLog::open(dir.path(), &writer).unwrap();
    for i in 0..200u64 {
        log.append("x", "e", BTreeMap::from([("i".to_string(), Value::from(i))])).unwrap();
    }
    // A record longer than the first tail window read on reopen.
    log.append("x", "long", BTreeMap::from([("reason".to_string(), Value::from("r".repeat(200_000)))])).unwrap();
    drop(log);
    let mut log = AuditLog::open(dir.path(), &writer).unwrap();
    log.append("x", "after", BTreeMap::new()).unwrap();
    let v = verify_file(&dir.path().join("audit.jsonl"), None).unwrap();
    assert_eq!(v.records, 203);
}

#[test]
fn a_torn_tail_is_cut_on_reopen_and_the_recovery_recorded() {
    let (der, key_pem) = member("n");
    let sign = |m: &[u8]| crate::secagg::keys::sign_message(m, &key_pem).map_err(SignError::from);
    let writer = Writer { name: "n", role: "node", cert_der: &der, sign_with_cert_key: &sign };
    let dir = tempfile::tempdir().unwrap();
    let mut log = AuditLog::open(dir.path(), &writer).unwrap();
    log.append("x", "e", BTreeMap::new()).unwrap();
    drop(log);
    let path = dir.path().join("audit.jsonl");
    let mut f = OpenOptions::new().append(true).open(&path).unwrap();
    f.write_all(b"{\"seq\":2,\"ti").unwrap();
    drop(f);
    let mut log = AuditLog::open(dir.path(), &writer).unwrap();
    log.append("x", "after", BTreeMap::new()).unwrap();
    let v = verify_file(&path, None).unwrap();
    assert_eq!(v.records, 4);
    let events: Vec<String> = read_records(&path).unwrap().into_iter().map(|r| r.event).collect();
    assert_eq!(events, ["log_opened", "e", "log_recovered", "after"]);
}

// --- The typed events ----------------------------------------------------------------------------
//
// `protocol/testdata/audit/` holds logs the test suite wrote at commit 9007500 (2026-12-01, before
// the typed events): a coordinator's, a hospital's and the CA's from `tests/tests/audit.rs`-style
// runs, one coordinator log from before receipts carried certificates, and `events.jsonl`, the
// latest line of each kind those logs (and the other logs the suite left) hold. Kinds no test
// log held are checked against the parameters today's writer built, copied from its call site.

fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/audit").join(name)
}

/// Reads `r` typed and writes it back: the same kind, not `Unknown`, and the same line.
fn assert_round_trip(r: &Record, line: &str) {
    let typed = r.typed().unwrap_or_else(|e| panic!("{e}"));
    assert!(!matches!(typed, AuditEvent::Unknown { .. }), "record {} ({}) read as unknown", r.seq, r.event);
    assert_eq!(typed.name(), r.event);
    let (event, params) = typed.to_parts().unwrap();
    let rebuilt = Record { event, params, ..r.clone() };
    assert_eq!(rebuilt.line(), line, "record {} ({}) does not write back the same", r.seq, r.event);
}

#[test]
fn every_kind_a_real_log_holds_reads_typed_and_writes_back_the_same_line() {
    let text = std::fs::read_to_string(testdata("events.jsonl")).unwrap();
    let mut kinds = BTreeSet::new();
    for line in text.lines() {
        let r: Record = serde_json::from_str(line).unwrap();
        assert_round_trip(&r, line);
        kinds.insert(r.event.clone());
    }
    assert_eq!(kinds.len(), 23, "{kinds:?}");
}

/// Old logs keep verifying (the split moved no byte of the format) and every record in them reads
/// typed, old receipts without certificates included.
#[test]
fn logs_written_before_the_typed_events_verify_and_read_typed() {
    for name in ["coordinator.jsonl", "node.jsonl", "ca.jsonl", "coordinator_old_receipts.jsonl"] {
        let path = testdata(name);
        let v = verify_file(&path, None).unwrap_or_else(|e| panic!("{name}: {e}"));
        let text = std::fs::read_to_string(&path).unwrap();
        let records = read_records(&path).unwrap();
        assert_eq!(records.len() as u64, v.records);
        for (r, line) in records.iter().zip(text.lines()) {
            assert_round_trip(r, line);
        }
    }
    let old = read_records(&testdata("coordinator_old_receipts.jsonl")).unwrap();
    assert!(
        old.iter().any(|r| matches!(r.typed(), Ok(AuditEvent::Receipt { certificate: None, .. }))),
        "the old log holds receipts without a certificate"
    );
}

/// The kinds no test log held: each typed event gives exactly the parameters its writer built
/// before the enum (copied from the call site's `json!` list), and reads back as itself.
#[test]
fn kinds_no_test_log_holds_give_the_parameters_their_writers_built() {
    use serde_json::json;
    let h = "ab".repeat(32);
    let cases: Vec<(AuditEvent, &str, Value)> = vec![
        (AuditEvent::LogRecovered { torn_bytes_cut: 12 }, "log_recovered", json!({"torn_bytes_cut": 12usize})),
        (
            AuditEvent::PlanRejected { lead: Some("lead".into()), name: None, reason: "bad toml".into() },
            "plan_rejected",
            json!({"lead": "lead", "reason": "bad toml"}),
        ),
        (
            AuditEvent::PlanRejected { lead: None, name: Some("heart".into()), reason: "no".into() },
            "plan_rejected",
            json!({"name": "heart", "reason": "no"}),
        ),
        (
            AuditEvent::PlanRefused(PlanDecision {
                node: Some("va".into()),
                plan_id: h.clone(),
                run: None,
                reason: "budget".into(),
                epsilon: Some(1.5),
                delta: None,
            }),
            "plan_refused",
            json!({"node": "va", "plan_id": h, "reason": "budget", "epsilon": Some(1.5), "delta": Option::<f64>::None}),
        ),
        (
            AuditEvent::PlanCancelled { plan_id: h.clone(), run: "r".into(), by: "lead".into(), rounds_completed: 3 },
            "plan_cancelled",
            json!({"plan_id": h, "run": "r", "by": "lead", "rounds_completed": 3u32}),
        ),
        (
            AuditEvent::PlanResumed {
                plan_id: h.clone(),
                run: "r".into(),
                rounds_completed: 6,
                model_sha256: h.clone(),
            },
            "plan_resumed",
            json!({"plan_id": h, "run": "r", "rounds_completed": 6u32, "model_sha256": h}),
        ),
        (
            AuditEvent::AuditRecordsSuppressed {
                node: "va".into(),
                event: "update_rejected".into(),
                suppressed: 990,
                itemised: 10,
                period_secs: 60,
            },
            "audit_records_suppressed",
            json!({"node": "va", "event": "update_rejected", "suppressed": 990u64, "itemised": 10u64, "period_secs": 60u64}),
        ),
        (
            AuditEvent::AuthenticationFailed {
                remote: "127.0.0.1".into(),
                reason: "3 no certificate".into(),
                refused: Some(3),
                by_reason: Some(BTreeMap::from([("no_certificate".to_string(), 3)])),
                distinct_remotes: Some(1),
                distinct_remotes_capped: Some(false),
                sample_remotes: Some(vec!["127.0.0.1".into()]),
                sample_reasons: Some(vec!["no certificate".into()]),
                over_secs: Some(2),
            },
            "authentication_failed",
            json!({
                "remote": "127.0.0.1", "reason": "3 no certificate", "refused": 3u64,
                "by_reason": {"no_certificate": 3u64}, "distinct_remotes": 1usize,
                "distinct_remotes_capped": false, "sample_remotes": ["127.0.0.1"],
                "sample_reasons": ["no certificate"], "over_secs": 2u64
            }),
        ),
        (
            AuditEvent::CallRefused { remote: "127.0.0.1:5".into(), reason: "needs lead".into() },
            "call_refused",
            json!({"remote": "127.0.0.1:5", "reason": "needs lead"}),
        ),
        (
            AuditEvent::CertificateRevocationApplied {
                name: "va".into(),
                fingerprint: h.clone(),
                revoked_at: "2026-12-01T00:00:00Z".into(),
            },
            "certificate_revocation_applied",
            json!({"name": "va", "fingerprint": h, "revoked_at": "2026-12-01T00:00:00Z"}),
        ),
        (
            AuditEvent::RevocationListUnusable(RevocationListState {
                path: "/etc/revoked.toml".into(),
                error: "line 3".into(),
                kept_revocations: 2,
                broken_secs: 0,
            }),
            "revocation_list_unusable",
            json!({"path": "/etc/revoked.toml", "error": "line 3", "kept_revocations": 2usize, "broken_secs": 0u64}),
        ),
        (
            AuditEvent::RevocationListRestored(RevocationListState {
                path: "/etc/revoked.toml".into(),
                error: String::new(),
                kept_revocations: 2,
                broken_secs: 30,
            }),
            "revocation_list_restored",
            json!({"path": "/etc/revoked.toml", "error": "", "kept_revocations": 2usize, "broken_secs": 30u64}),
        ),
        (
            AuditEvent::AuditLogRead { reader: "auditor".into(), role: "auditor".into(), bytes: 4096 },
            "audit_log_read",
            json!({"reader": "auditor", "role": "auditor", "bytes": 4096u64}),
        ),
        (
            AuditEvent::ModelExportRead {
                reader: "lead".into(),
                plan_id: h.clone(),
                run: "r".into(),
                model_sha256: h.clone(),
                bytes: 77,
            },
            "model_export_read",
            json!({"reader": "lead", "plan_id": h, "run": "r", "model_sha256": h, "bytes": 77u64}),
        ),
        (
            AuditEvent::CoordinatorStopped {
                reason: "signal".into(),
                signal: "SIGTERM".into(),
                running: vec!["r".into()],
            },
            "coordinator_stopped",
            json!({"reason": "signal", "signal": "SIGTERM", "running": ["r"]}),
        ),
        (
            AuditEvent::CertificateRenewed {
                name: "va".into(),
                role: "node".into(),
                fingerprint: h.clone(),
                not_after: "2027".into(),
                previous_fingerprint: h.clone(),
            },
            "certificate_renewed",
            json!({"name": "va", "role": "node", "fingerprint": h, "not_after": "2027", "previous_fingerprint": h}),
        ),
        (
            AuditEvent::CertificateRevoked {
                name: "va".into(),
                role: "node".into(),
                fingerprint: h.clone(),
                not_after: "2027".into(),
                reason: "lost".into(),
            },
            "certificate_revoked",
            json!({"name": "va", "role": "node", "fingerprint": h, "not_after": "2027", "reason": "lost"}),
        ),
        (
            AuditEvent::CertificateRefused {
                name: "va".into(),
                role: "node".into(),
                fingerprint: h.clone(),
                not_after: "2027".into(),
                reason: "taken".into(),
                requested_role: "node".into(),
                requested_key_sha256: h.clone(),
            },
            "certificate_refused",
            json!({
                "name": "va", "role": "node", "fingerprint": h, "not_after": "2027", "reason": "taken",
                "requested_role": "node", "requested_key_sha256": h
            }),
        ),
        (
            AuditEvent::NodeStopped { reason: "signal".into(), signal: "SIGTERM".into() },
            "node_stopped",
            json!({"reason": "signal", "signal": "SIGTERM"}),
        ),
        (
            AuditEvent::ModelApproved {
                sha256: h.clone(),
                name: "mlp".into(),
                approved_by: "dr".into(),
                approved_at: "t".into(),
                key: "k".into(),
                parameters: 241,
                file: "mlp.pt".into(),
            },
            "model_approved",
            json!({
                "sha256": h, "name": "mlp", "approved_by": "dr", "approved_at": "t", "key": "k",
                "parameters": 241u64, "file": "mlp.pt"
            }),
        ),
        (
            AuditEvent::ModelRevoked {
                sha256: h.clone(),
                name: "mlp".into(),
                approved_by: "dr".into(),
                approved_at: "t".into(),
                key: "k2".into(),
                revoked_by: "dr".into(),
                revoked_at: "t2".into(),
            },
            "model_revoked",
            json!({
                "sha256": h, "name": "mlp", "approved_by": "dr", "approved_at": "t", "key": "k2",
                "revoked_by": "dr", "revoked_at": "t2"
            }),
        ),
    ];
    let mut kinds: BTreeSet<String> = BTreeSet::new();
    for (event, name, params) in cases {
        let params: Params = serde_json::from_value(params).unwrap();
        assert_eq!(event.to_parts().unwrap(), (name.to_string(), params.clone()), "{name}");
        assert_eq!(AuditEvent::from_parts(1, name, &params).unwrap(), event, "{name}");
        kinds.insert(name.to_string());
    }
    // With the 23 kinds of `events.jsonl`, every kind this version knows is covered.
    let text = std::fs::read_to_string(testdata("events.jsonl")).unwrap();
    for line in text.lines() {
        kinds.insert(serde_json::from_str::<Record>(line).unwrap().event);
    }
    let known: BTreeSet<String> = KNOWN_EVENTS.iter().map(|s| s.to_string()).collect();
    assert_eq!(kinds, known, "every known kind has a golden line or parameters, and nothing else does");
}

/// A `round_record` names its run since runs of one plan record the same round numbers: the
/// golden line (written before, no `run`) reads as `run: None` and writes back byte for byte; the
/// same line with a run (in its sorted place, as the writer puts it) reads as that run and writes
/// back byte for byte, and a record built with a run writes it.
#[test]
fn a_round_record_reads_and_writes_back_with_and_without_its_run() {
    let text = std::fs::read_to_string(testdata("events.jsonl")).unwrap();
    let old = text.lines().find(|l| l.contains(r#""event":"round_record""#)).unwrap();
    let r: Record = serde_json::from_str(old).unwrap();
    assert!(matches!(r.typed().unwrap(), AuditEvent::RoundRecord { run: None, .. }), "an old record names no run");
    assert_round_trip(&r, old);

    let run = "0123456789abcdef0123456789abcdef";
    // `run` sorts after `round` and before `updates`.
    let with = old.replacen(r#","updates":"#, &format!(r#","run":"{run}","updates":"#), 1);
    assert_ne!(with, old);
    let r: Record = serde_json::from_str(&with).unwrap();
    assert_eq!(r.line(), with, "the line with a run is canonical");
    match r.typed().unwrap() {
        AuditEvent::RoundRecord { run: Some(named), round: 1, .. } => assert_eq!(named, run),
        other => panic!("{other:?}"),
    }
    assert_round_trip(&r, &with);

    let event = AuditEvent::RoundRecord {
        plan_id: "p".into(),
        run: Some(run.into()),
        round: 2,
        model_sha256: "m".into(),
        updates: vec![RoundUpdate { node: "va".into(), payload_sha256: "h".into(), bytes: 56 }],
        reported: vec!["va".into()],
        dropped: vec![],
    };
    let (name, params) = event.to_parts().unwrap();
    assert_eq!(params.get("run"), Some(&Value::from(run)));
    assert_eq!(AuditEvent::from_parts(1, &name, &params).unwrap(), event);
    let mut unnamed = event;
    if let AuditEvent::RoundRecord { run, .. } = &mut unnamed {
        *run = None;
    }
    let (_, without) = unnamed.to_parts().unwrap();
    assert!(!without.contains_key("run"), "no run, no parameter: {without:?}");
}

/// serde_json writes a non-finite f64 as null; the record reads back and writes the same.
#[test]
fn a_non_finite_number_writes_null_and_reads_back_to_the_same_line() {
    let charged = AuditEvent::EpsilonCharged {
        plan_id: "p".into(),
        run: Some("r".into()),
        round: 1,
        epsilon: f64::INFINITY,
        delta: 1e-5,
        accountant: "pld".into(),
        epsilon_cap: None,
    };
    let (event, params) = charged.to_parts().unwrap();
    assert_eq!(params["epsilon"], Value::Null);
    let back = AuditEvent::from_parts(0, &event, &params).unwrap();
    assert_eq!(back.to_parts().unwrap(), (event, params));
}

#[test]
fn an_unknown_event_reads_as_unknown_and_writes_back_unchanged() {
    let params: Params = serde_json::from_value(serde_json::json!({"x": 1, "event": "e"})).unwrap();
    let e = AuditEvent::from_parts(4, "quantum_round_opened", &params).unwrap();
    assert_eq!(e, AuditEvent::Unknown { event: "quantum_round_opened".into(), params: params.clone() });
    assert_eq!(e.name(), "quantum_round_opened");
    assert_eq!(e.to_parts().unwrap(), ("quantum_round_opened".to_string(), params));
}

/// A known kind whose parameter has the wrong type, or lacks one, is an error naming the record's
/// sequence number, its kind and the parameter (nested ones by their path).
#[test]
fn a_parameter_of_the_wrong_type_or_missing_names_the_record_and_the_parameter() {
    use serde_json::json;
    let cases = [
        ("round_closed", json!({"plan_id": "p", "round": "7", "reported": [], "dropped": []}), "round"),
        (
            "plan_finished",
            json!({"plan_id": "p", "success": "yes", "reason": "", "rounds_completed": 1,
            "final_model_sha256": "", "client_epsilon": 0.0, "client_delta": 0.0}),
            "success",
        ),
        (
            "round_record",
            json!({"plan_id": "p", "round": 1, "model_sha256": "m", "reported": [], "dropped": [],
            "updates": [{"node": "a", "payload_sha256": "h", "bytes": "ten"}]}),
            "updates[0].bytes",
        ),
        (
            "update_sent",
            json!({"plan_id": "p", "round": 1, "payload_sha256": "h", "bytes": 3, "masked": false}),
            "resend",
        ),
    ];
    for (event, params, field) in cases {
        let params: Params = serde_json::from_value(params).unwrap();
        match AuditEvent::from_parts(41, event, &params) {
            Err(e @ EventError::Field { .. }) => {
                let EventError::Field { seq, event: ref kind, field: ref named, .. } = e else { unreachable!() };
                assert_eq!((seq, kind.as_str(), named.as_str()), (41, event, field), "{e}");
                let text = e.to_string();
                assert!(text.starts_with(&format!("audit record 41 ({event}): parameter `{field}`: ")), "{text}");
            }
            other => panic!("{event}: {other:?}"),
        }
    }
}

/// `append_event` writes what `append` with the event's parts writes, and the log verifies.
#[test]
fn append_event_writes_a_log_that_verifies_and_reads_back_typed() {
    let (der, key_pem) = member("va");
    let sign = |m: &[u8]| crate::secagg::keys::sign_message(m, &key_pem).map_err(SignError::from);
    let writer = Writer { name: "va", role: "node", cert_der: &der, sign_with_cert_key: &sign };
    let dir = tempfile::tempdir().unwrap();
    let mut log = AuditLog::open(dir.path(), &writer).unwrap();
    let own = log.own_fingerprint().to_string();
    let stopped = AuditEvent::NodeStopped { reason: "signal".into(), signal: "SIGTERM".into() };
    let (_, line) = log.append_event_line(&own, &stopped).unwrap();
    assert!(line.contains(r#""event":"node_stopped","params":{"reason":"signal","signal":"SIGTERM"}"#), "{line}");
    let path = dir.path().join("audit.jsonl");
    assert_eq!(verify_file(&path, None).unwrap().records, 2);
    let typed: Vec<AuditEvent> = read_records(&path).unwrap().iter().map(|r| r.typed().unwrap()).collect();
    assert!(matches!(typed[0], AuditEvent::LogOpened { ref writer, .. } if writer == "va"));
    assert_eq!(typed[1], stopped);
}
