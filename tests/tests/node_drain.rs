//! A node asked to stop drains: on SIGTERM or SIGINT it takes no new directive, lets the one in
//! flight finish (never cutting a charge from its record), appends `node_stopped` (reason
//! "signal") to its audit log and exits 0; the log then verifies against the consortium CA.
//! Before the drain, SIGTERM killed the node where it stood (status "signal 15", no last record)
//! and SIGINT stopped it without any record.

#![allow(clippy::unwrap_used)] // a test helper: a failed read is a failed test

use std::process::Command;
use std::time::Duration;

use sanctum_protocol::proto::lead_client::LeadClient;
use sanctum_tests::{
    Consortium, CoordinatorProcess, NodeProcess, bin, channel, heart_data, next_event, submit_and_watch, wait_until,
};

fn send(signal: &str, node: &NodeProcess) {
    let status = Command::new("kill").arg(format!("-{signal}")).arg(node.pid().to_string()).status().unwrap();
    assert!(status.success(), "kill -{signal} failed");
}

/// Checks the drained node's exit and its audit log: verifies against the CA, ends with
/// `node_stopped` naming the signal; returns the log's events.
async fn check_drained(c: &Consortium, node: &mut NodeProcess, signal: &str) -> Vec<sanctum_protocol::audit::Record> {
    let started = std::time::Instant::now();
    let status = node.exited(Duration::from_secs(30)).await;
    assert!(status.is_some(), "the node did not stop within 30 s of {signal}:\n{}", node.log_text());
    let status = status.unwrap();
    println!("{signal}: exited with {status} after {:.2} s", started.elapsed().as_secs_f64());
    assert!(status.success(), "{signal}: {status}\n{}", node.log_text());
    let log = node.state_dir().join("audit/audit.jsonl");
    let out = Command::new(bin("sanctum-node"))
        .args(["audit", "verify"])
        .arg(&log)
        .arg("--ca")
        .arg(c.pki().join("ca.pem"))
        .output()
        .unwrap();
    assert!(out.status.success(), "audit verify: {}", String::from_utf8_lossy(&out.stderr));
    let records = node.audit_records();
    let last = records.last().unwrap();
    assert_eq!(last.event, "node_stopped", "{:?}", records.iter().map(|r| &r.event).collect::<Vec<_>>());
    assert_eq!(last.params["reason"], "signal");
    assert_eq!(last.params["signal"], signal);
    records
}

#[tokio::test]
async fn sigterm_drains_a_connected_node_and_sigint_one_that_is_reconnecting() {
    let c = Consortium::new();
    let coord = CoordinatorProcess::start(&c);
    let addr = coord.address();
    let mut connected = NodeProcess::start_serving(&c, "cleveland", &addr, &heart_data("cleveland"), "");
    // No coordinator listens there: this node is between attempts, in its back-off.
    let mut reconnecting = NodeProcess::start_serving(&c, "hungarian", "127.0.0.1:1", &heart_data("hungarian"), "");
    coord.wait_for_nodes(1);
    assert!(wait_until(Duration::from_secs(30), || connected.audit_records().iter().any(|r| r.event == "connected")));
    assert!(wait_until(Duration::from_secs(30), || reconnecting.log_text().contains("retrying in")));
    send("TERM", &connected);
    send("INT", &reconnecting);
    check_drained(&c, &mut connected, "SIGTERM").await;
    check_drained(&c, &mut reconnecting, "SIGINT").await;
}

#[tokio::test]
async fn sigterm_during_a_dp_plan_leaves_every_charge_with_its_audit_record() {
    let c = Consortium::new();
    let coord = CoordinatorProcess::start(&c);
    let addr = coord.address();
    let mut node = NodeProcess::start_serving(&c, "cleveland", &addr, &heart_data("cleveland"), "max_epsilon = 50.0");
    coord.wait_for_nodes(1);
    // Many short DP rounds, so the signal lands in the middle of the run.
    let plan = "name = \"drain\"\nrounds = 200\nmin_nodes = 1\n\
                [model]\nkind = \"logistic_regression\"\ninputs = 13\n[data]\nschema = \"heart_disease\"\nschema_sha256 = \"39f2b3691b732094488517b366f5bb898ffb1d537dae5f6f2fc1b24c7f225688\"\n\
                [local]\nsteps = 5\nbatch_size = 4\nlearning_rate = 0.01\n[strategy]\nkind = \"fedavg\"\n\
                [privacy]\nmode = \"example\"\nnoise_multiplier = 3.0\nclip_norm = 1.0\ndelta = 1e-5\n";
    let mut lead = LeadClient::new(channel(&addr, &c.lead()).await.unwrap());
    let (_plan_id, mut events) = submit_and_watch(&mut lead, plan).await;
    let _ = next_event(&mut events, 60, "the plan was not offered").await;
    assert!(
        wait_until(Duration::from_secs(120), || node.ledger().len() >= 3),
        "the node did not release three rounds:\n{}",
        node.log_text()
    );
    send("TERM", &node);
    let records = check_drained(&c, &mut node, "SIGTERM").await;
    let charges = node.ledger();
    let charged = records.iter().filter(|r| r.event == "epsilon_charged").count();
    let sent = node.egress().iter().filter(|e| e.call == "SubmitUpdate").count();
    println!("after SIGTERM: {} ledger charges, {charged} epsilon_charged records, {sent} updates sent", charges.len());
    assert_eq!(charges.len(), charged, "every charge has its audit record");
    assert!(
        sent <= charges.len() && charges.len() <= sent + 1,
        "releases left ({sent}) against charges ({})",
        charges.len()
    );
}
