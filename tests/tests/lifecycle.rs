//! The identity lifecycle with real processes: a revoked node is refused on its next call within
//! a second, without restarting the coordinator; an auditor certificate reads the audit log and
//! the plans but cannot launch anything; an expired certificate is refused and the node says it
//! expired and how to renew; a renewed certificate (same key) is accepted; `pki list` shows it all.

#![allow(clippy::unwrap_used)] // test helpers: a failed step is a failed test

use std::process::Command;
use std::time::{Duration, Instant};

use sanctum_protocol::pki::{self, Role, SignSpec};
use sanctum_protocol::proto::audit_client::AuditClient;
use sanctum_protocol::proto::federation_client::FederationClient;
use sanctum_protocol::proto::lead_client::LeadClient;
use sanctum_protocol::proto::{AuditLogRequest, ListPlansRequest, PlanResponse, SubmitPlanRequest};
use sanctum_protocol::tls::TlsFiles;
use sanctum_tests::{Consortium, CoordinatorProcess, HEART_SCHEMA, bin, channel, heart_data, run_ok, wait_until};

fn pki_cmd(c: &Consortium, args: &[&str]) -> String {
    let out = run_ok(Command::new(bin("sanctum-coordinator")).arg("pki").args(args).arg("--dir").arg(c.pki()));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn a_revoked_node_is_refused_on_its_next_call_within_a_second() {
    let c = Consortium::new();
    let coord = CoordinatorProcess::start(&c);
    let addr = coord.address();
    let va = c.member("va", "node");
    let mut node = FederationClient::new(channel(&addr, &va).await.unwrap());
    let call = || PlanResponse {
        // A well-formed id of no plan: the call answers, and creates nothing.
        plan_id: "0".repeat(64),
        accept: false,
        reason: "probe".into(),
        privacy: None,
        run: String::new(),
    };
    node.respond_to_plan(call()).await.unwrap();

    pki_cmd(&c, &["revoke", "va", "--reason", "left the consortium"]);
    let revoked_at = Instant::now();
    // The same open connection: its next call is refused once the coordinator has read the list.
    let err = loop {
        match node.respond_to_plan(call()).await {
            Ok(_) if revoked_at.elapsed() < Duration::from_secs(5) => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Ok(_) => panic!("the revoked certificate was still accepted after 5 s"),
            Err(e) => break e,
        }
    };
    let took = revoked_at.elapsed();
    println!("refused {took:?} after `pki revoke`: {}", err.message());
    assert!(took < Duration::from_secs(1), "revocation took {took:?}");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert!(err.message().contains("revoked") && err.message().contains("left the consortium"), "{}", err.message());
    // A new connection is refused at the handshake's end.
    if let Ok(ch) = channel(&addr, &va).await {
        assert!(FederationClient::new(ch).respond_to_plan(call()).await.is_err());
    }
    assert!(wait_until(Duration::from_secs(5), || coord.log_text().contains("was revoked")), "{}", coord.log_text());
    let list = pki_cmd(&c, &["list"]);
    assert!(list.lines().any(|l| l.starts_with("va ") && l.contains("revoked")), "{list}");
    assert!(list.lines().any(|l| l.starts_with("coordinator ") && l.contains("valid")), "{list}");
    // Both audit logs say so, and verify.
    let ca_log = c.pki().join("audit/audit.jsonl");
    assert!(std::fs::read_to_string(&ca_log).unwrap().contains("certificate_revoked"));
    run_ok(Command::new(bin("sanctum-coordinator")).args(["audit", "verify"]).arg(&ca_log));
    let coord_log = c.dir.path().join("coordinator/state/audit/audit.jsonl");
    let text = std::fs::read_to_string(&coord_log).unwrap();
    assert!(text.contains("certificate_revocation_applied"));
    assert!(text.contains("\"event\":\"call_refused\""), "the revoked call is audited");
}

#[tokio::test]
async fn an_auditor_reads_but_cannot_launch() {
    let c = Consortium::new();
    let coord = CoordinatorProcess::start(&c);
    let addr = coord.address();
    let auditor = c.member("inspector", "auditor");
    let mut lead = LeadClient::new(channel(&addr, &auditor).await.unwrap());
    let plan = std::fs::read_to_string(heart_data("cleveland").parent().unwrap().join("../fedavg.toml")).unwrap();
    let err = lead.submit_plan(SubmitPlanRequest { plan_toml: plan, ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(err.message().contains("auditor") && err.message().contains("needs role lead"), "{}", err.message());
    // Reading is allowed: the plan list (none ran) and the audit log, which verifies.
    let mut audit = AuditClient::new(channel(&addr, &auditor).await.unwrap());
    assert!(audit.list_plans(ListPlansRequest {}).await.unwrap().into_inner().plans.is_empty());
    let mut stream = audit.stream_audit_log(AuditLogRequest {}).await.unwrap().into_inner();
    let mut n = 0;
    while let Some(chunk) = stream.message().await.unwrap() {
        n += chunk.log.len();
    }
    assert!(n > 0);
    // Through the CLI: fetch, then verify offline against the CA.
    let cfg = c.dir.path().join("auditor.toml");
    std::fs::write(
        &cfg,
        format!(
            "coordinator = {addr:?}\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
            auditor.ca, auditor.cert, auditor.key
        ),
    )
    .unwrap();
    let out = run_ok(
        Command::new(bin("sanctum-coordinator"))
            .args(["audit", "fetch", "--config"])
            .arg(&cfg)
            .arg("--out")
            .arg(c.dir.path().join("fetched")),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("OK,") && text.contains("issued by the given CA"), "{text}");
    // The log recorded the refused launch and the read.
    let log = std::fs::read_to_string(c.dir.path().join("fetched/coordinator-audit.jsonl")).unwrap();
    assert!(log.contains("\"event\":\"log_opened\""));
    assert!(
        log.contains("\"event\":\"call_refused\"") && log.contains("needs role lead"),
        "the refused launch is audited"
    );
    // A node certificate may not read the audit log.
    let node = c.member("cleveland", "node");
    let err = AuditClient::new(channel(&addr, &node).await.unwrap()).list_plans(ListPlansRequest {}).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
}

#[tokio::test]
async fn an_expired_certificate_is_refused_with_how_to_renew_and_a_renewed_one_works() {
    let c = Consortium::new();
    let coord = CoordinatorProcess::start(&c);
    let addr = coord.address();
    // A certificate that expired yesterday, from the consortium's own CA.
    let ca_cert = std::fs::read_to_string(c.pki().join("ca.pem")).unwrap();
    let ca_key = std::fs::read_to_string(c.pki().join("ca.key")).unwrap();
    let stale =
        pki::issue(&ca_cert, &ca_key, &SignSpec { name: "stale", role: Role::Node, days: -1, hosts: &[] }).unwrap();
    let dir = c.dir.path().join("members/stale");
    std::fs::create_dir_all(&dir).unwrap();
    let files = TlsFiles { ca: c.pki().join("ca.pem"), cert: dir.join("stale.pem"), key: dir.join("stale.key") };
    std::fs::write(&files.cert, &stale.cert_pem).unwrap();
    pki::write_private_key(&files.key, &stale.key_pem).unwrap();
    // The coordinator refuses it at the handshake.
    let refused = match channel(&addr, &files).await {
        Err(_) => true,
        Ok(ch) => FederationClient::new(ch).respond_to_plan(PlanResponse::default()).await.is_err(),
    };
    assert!(refused);
    assert!(wait_until(Duration::from_secs(5), || coord.log_text().contains("Expired")), "{}", coord.log_text());
    // The node says it expired and how to renew, and exits.
    let config = dir.join("node.toml");
    std::fs::write(
        &config,
        format!(
            "coordinator = {addr:?}\ndevice = \"cpu\"\nstate_dir = \"state\"\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n[[datasets]]\nschema = {HEART_SCHEMA:?}\npath = {:?}\n",
            files.ca, files.cert, files.key, heart_data("va")
        ),
    )
    .unwrap();
    let out = Command::new(bin("sanctum-node"))
        .args(["run", "--config"])
        .arg(&config)
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("expired at") && err.contains("pki renew"), "{err}");

    // Renewal: same key, new certificate, accepted; the old one stays listed.
    let hungarian = c.member("hungarian", "node");
    let before = std::fs::read_to_string(&hungarian.cert).unwrap();
    let out = pki_cmd(&c, &["renew", "hungarian", "--days", "30"]);
    assert!(out.contains("renewed hungarian for 30 days"), "{out}");
    let renewed = std::fs::read_to_string(c.pki().join("issued/hungarian.pem")).unwrap();
    assert_ne!(before, renewed);
    std::fs::write(&hungarian.cert, &renewed).unwrap();
    let mut node = FederationClient::new(channel(&addr, &hungarian).await.unwrap());
    node.respond_to_plan(PlanResponse { plan_id: "0".repeat(64), ..Default::default() }).await.unwrap();
    let list = pki_cmd(&c, &["list"]);
    assert_eq!(list.lines().filter(|l| l.starts_with("hungarian ")).count(), 2, "{list}");
    assert!(std::fs::read_to_string(c.pki().join("audit/audit.jsonl")).unwrap().contains("certificate_renewed"));
}
