//! The status page and the metrics endpoint during a real plan: a coordinator with `[status]`
//! on loopback port 0 runs a DP plan on the four heart-disease hospitals (switzerland's ε cap is
//! too small, so it declines: a refusal with its reason). While the plan runs, headless Chromium
//! renders the page (the screenshot's path is printed) and its DOM names the plan and every
//! hospital; `GET /metrics` parses as Prometheus text under a strict parser, and the rounds
//! counter equals the rounds the coordinator reports completed at that moment, and the plan's
//! rounds at its end.
//!
//! Behind mutual TLS (`[status] tls = true`), curl reads `/metrics` with an auditor's certificate,
//! a hospital's certificate gets 403, no certificate gets no answer, and `pki revoke` ends the
//! auditor's access.
//!
//! Build first: `cargo build --workspace --bins`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failed step is a failed test

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use sanctum_protocol::proto::audit_client::AuditClient;
use sanctum_protocol::proto::lead_client::LeadClient;
use sanctum_protocol::proto::{PlanStatusRequest, plan_event};
use sanctum_protocol::tls::TlsFiles;
use sanctum_tests::{
    Consortium, CoordinatorProcess, HEART_SCHEMA_SHA256, NodeProcess, bin, channel, heart_data, next_event, run_ok,
    submit_and_watch, wait_until,
};

const HOSPITALS: [&str; 4] = ["cleveland", "hungarian", "switzerland", "va"];
const DECLINES: &str = "switzerland";
const ROUNDS: u32 = 12;
const PLAN_NAME: &str = "status-page-heart";

fn plan() -> String {
    format!(
        "name = \"{PLAN_NAME}\"\nrounds = {ROUNDS}\nmin_nodes = 3\nrecruit_deadline_secs = 60\nround_deadline_secs = 120\nseed = 7\n\
         [model]\nkind = \"logistic_regression\"\ninputs = 13\n[data]\nschema = \"heart_disease\"\nschema_sha256 = \"{HEART_SCHEMA_SHA256}\"\n\
         [local]\nsteps = 40\nbatch_size = 8\nlearning_rate = 0.05\n[strategy]\nkind = \"fedavg\"\n\
         [privacy]\nmode = \"example\"\nnoise_multiplier = 1.0\nclip_norm = 1.0\ndelta = 1e-5\n"
    )
}

/// A plain HTTP/1.1 GET on loopback: (status code, body).
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\r\n", addr.port()).unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no HTTP header end: {raw:?}"));
    let code = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("status line: {head}"));
    (code, body.to_string())
}

/// One sample: metric name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

fn is_name(s: &str) -> bool {
    let mut b = s.bytes();
    b.next().is_some_and(|c| c.is_ascii_alphabetic() || c == b'_' || c == b':')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b':')
}

/// A strict parser of the Prometheus / OpenMetrics text format as the endpoint writes it: every
/// line is `# HELP`, `# TYPE` (a known type), `# UNIT`, a sample of a declared family
/// (`name{k="v",...} value`) or the final `# EOF`; anything else fails.
fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut families: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = Vec::new();
    let mut eof = false;
    for (n, line) in text.lines().enumerate() {
        assert!(!eof, "line {n} after # EOF: {line:?}");
        if line == "# EOF" {
            eof = true;
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kind, name, arg) = (parts.next().unwrap(), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            assert!(is_name(name), "line {n}: bad family name {name:?}");
            match kind {
                "HELP" | "UNIT" => {}
                "TYPE" => {
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "info", "stateset", "unknown", "gaugehistogram"]
                            .contains(&arg),
                        "line {n}: unknown type {arg:?}"
                    );
                    families.insert(name.to_string(), arg.to_string());
                }
                _ => panic!("line {n}: unknown comment {line:?}"),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("line {n}: no value: {line:?}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("line {n}: value {v:?}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series, BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').unwrap_or_else(|| panic!("line {n}: unclosed labels: {line:?}"));
                let mut labels = BTreeMap::new();
                let mut rest = body;
                while !rest.is_empty() {
                    let (key, after) = rest.split_once("=\"").unwrap_or_else(|| panic!("line {n}: label {rest:?}"));
                    assert!(is_name(key), "line {n}: label name {key:?}");
                    let mut value = String::new();
                    let mut chars = after.char_indices();
                    let end = loop {
                        match chars.next() {
                            Some((_, '\\')) => match chars.next() {
                                Some((_, 'n')) => value.push('\n'),
                                Some((_, c @ ('\\' | '"'))) => value.push(c),
                                other => panic!("line {n}: bad escape {other:?}"),
                            },
                            Some((i, '"')) => break i,
                            Some((_, c)) => value.push(c),
                            None => panic!("line {n}: unterminated label value"),
                        }
                    };
                    assert!(labels.insert(key.to_string(), value).is_none(), "line {n}: label {key} twice");
                    rest = &after[end + 1..];
                    rest = rest.strip_prefix(',').unwrap_or(rest);
                }
                (name, labels)
            }
        };
        assert!(is_name(name), "line {n}: bad metric name {name:?}");
        let family = families
            .keys()
            .find(|f| {
                name == f.as_str()
                    || ["_total", "_bucket", "_count", "_sum", "_created", "_info"]
                        .iter()
                        .any(|s| name.strip_suffix(s) == Some(f.as_str()))
            })
            .unwrap_or_else(|| panic!("line {n}: sample {name} of no declared family"));
        if families[family] == "counter" {
            assert!(name.ends_with("_total") || name.ends_with("_created"), "line {n}: counter sample {name}");
            assert!(value >= 0.0, "line {n}: negative counter");
        }
        samples.push((name.to_string(), labels, value));
    }
    assert!(eof, "no # EOF at the end");
    samples
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v)))
        .map(|s| s.2)
}

/// The rounds counter of `run` (absent before its first round closes: 0).
fn rounds_counter(samples: &[Sample], plan_id: &str, run: &str) -> f64 {
    value(samples, "sanctum_rounds_completed_total", &[("plan", plan_id), ("run", run)]).unwrap_or(0.0)
}

fn chromium(args: &[&str], url: &str) -> std::process::Output {
    let out = Command::new("chromium")
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"])
        .args(args)
        .arg(url)
        .output()
        .expect("chromium must be installed (scripts/test installs Debian's chromium)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_renders_during_a_plan_and_the_metrics_follow_its_rounds() {
    let c = Consortium::new();
    let coord = CoordinatorProcess::start_configured(&c, "[status]\nlisten = \"127.0.0.1:0\"\nrefresh_secs = 3\n", &[]);
    // The address it bound is in its log (stdout carries only the gRPC address).
    let mut status: Option<SocketAddr> = None;
    assert!(wait_until(Duration::from_secs(10), || {
        status =
            coord.log_text().split("status page on http://").nth(1).and_then(|r| r.split('/').next()?.parse().ok());
        status.is_some()
    }));
    let status = status.unwrap();
    println!("status page at http://{status}/");
    let addr = coord.address();
    let _nodes: Vec<NodeProcess> = HOSPITALS
        .iter()
        .map(|h| {
            // Every hospital but va shares its budget with the page (`policy.share_budget`).
            let share = if *h == "va" { "" } else { "share_budget = true\n" };
            let policy = if *h == DECLINES {
                "max_epsilon = 0.5\n".to_string()
            } else {
                format!("max_epsilon = 1000.0\ntest_metrics = \"exact\"\n{share}")
            };
            NodeProcess::start_with_policy(&c, h, &addr, &heart_data(h), &policy)
        })
        .collect();
    coord.wait_for_nodes(HOSPITALS.len());

    let lead_channel = channel(&addr, &c.lead()).await.unwrap();
    let mut lead = LeadClient::new(lead_channel.clone());
    let mut audit = AuditClient::new(lead_channel);
    let (plan_id, mut events) = submit_and_watch(&mut lead, plan()).await;
    let completed = |s: sanctum_protocol::proto::PlanStatusResponse| s.plan.map_or(0, |p| p.rounds_completed);

    // Wait for round 2 to close, then look while the plan runs.
    loop {
        let ev = next_event(&mut events, 120, "the plan stalled").await;
        match ev.kind {
            Some(plan_event::Kind::RoundClosed(r)) if r.round >= 2 => break,
            Some(plan_event::Kind::PlanFinished(f)) => {
                panic!("the plan ended before round 2: {f:?}\n{}", coord.log_text())
            }
            _ => {}
        }
    }
    let run =
        audit.plan_status(PlanStatusRequest { id: plan_id.clone() }).await.unwrap().into_inner().plan.unwrap().run;

    // The page in a real browser: its DOM names the plan and every hospital, and shows the run running.
    let url = format!("http://{status}/");
    let t = Instant::now();
    let dom = String::from_utf8(chromium(&["--dump-dom"], &url).stdout).unwrap();
    assert!(dom.contains(PLAN_NAME), "the DOM lacks the plan's name:\n{dom}");
    for h in HOSPITALS {
        assert!(dom.contains(h), "the DOM lacks hospital {h}");
    }
    assert!(dom.contains("class=\"running\">running</td>"), "the plan was running when the page rendered");
    assert!(dom.contains("declined the plan"), "switzerland's refusal is listed");
    assert!(dom.contains("<svg"), "the charts are inline SVG");
    // ε against the cap: cleveland shares its budget (nothing spent before this run), va does not.
    assert!(dom.contains(" of 1000</span> (0 %; 0.000 before this run)"), "ε in all against the cap:\n{dom}");
    assert!(dom.contains("cleveland cap"), "the cap is drawn in the ε chart");
    assert!(dom.contains("not shared (<code>policy.share_budget</code>)"), "va's budget is said not to be shared");
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    chromium(&["--window-size=1280,2000", &format!("--screenshot={}", shot.display())], &url);
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 30_000, "screenshot of {} bytes", png.len());
    println!("status page screenshot: {}", shot.display());
    println!("chromium took {:.1} s for the DOM and the screenshot", t.elapsed().as_secs_f64());

    // The metrics, bracketed by the coordinator's own count of completed rounds: when the count
    // did not move across the scrape, the counter must equal it.
    let mut checked = None;
    for _ in 0..50 {
        let before = completed(audit.plan_status(PlanStatusRequest { id: run.clone() }).await.unwrap().into_inner());
        let (code, text) = get(status, "/metrics");
        assert_eq!(code, 200, "{text}");
        let samples = parse_metrics(&text);
        let after = completed(audit.plan_status(PlanStatusRequest { id: run.clone() }).await.unwrap().into_inner());
        let counter = rounds_counter(&samples, &plan_id, &run);
        assert!(f64::from(before) <= counter && counter <= f64::from(after), "{before} <= {counter} <= {after}");
        if before == after {
            assert_eq!(counter, f64::from(before));
            assert_eq!(value(&samples, "sanctum_connected_nodes", &[]), Some(4.0), "after {after} rounds:\n{text}");
            assert!(
                value(&samples, "sanctum_updates_accepted_total", &[]).unwrap_or(0.0) >= 6.0,
                "3 hospitals × 2 rounds"
            );
            assert!(value(&samples, "sanctum_received_bytes_total", &[]).unwrap_or(0.0) > 0.0);
            assert!(value(&samples, "sanctum_sent_bytes_total", &[]).unwrap_or(0.0) > 0.0);
            assert_eq!(value(&samples, "sanctum_refusals_total", &[("kind", "plan_declined")]), Some(1.0));
            assert!(value(&samples, "sanctum_round_duration_seconds_count", &[]).unwrap_or(0.0) >= 2.0);
            println!(
                "mid-plan: {counter} rounds in the counter, {after} reported completed ({} samples)",
                samples.len()
            );
            checked = Some(after);
            break;
        }
    }
    let mid = checked.expect("the completed count kept moving across 50 scrapes");
    assert!(mid < ROUNDS, "checked while the plan ran");

    // To the end: the counter equals the plan's rounds.
    let finished = loop {
        if let Some(plan_event::Kind::PlanFinished(f)) = next_event(&mut events, 120, "the plan stalled").await.kind {
            break f;
        }
    };
    assert!(finished.success, "{finished:?}");
    assert_eq!(finished.rounds_completed, ROUNDS);
    let (_, text) = get(status, "/metrics");
    let samples = parse_metrics(&text);
    assert_eq!(rounds_counter(&samples, &plan_id, &run), f64::from(ROUNDS));
    println!("at the end: {ROUNDS} rounds in the counter");
    // What an operator's `curl` gets is the same text, and parses the same way.
    match Command::new("curl").args(["-sf", &format!("http://{status}/metrics")]).output() {
        Ok(out) => {
            assert!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
            let samples = parse_metrics(&String::from_utf8(out.stdout).unwrap());
            assert_eq!(rounds_counter(&samples, &plan_id, &run), f64::from(ROUNDS));
            println!("curl http://{status}/metrics: {} samples, rounds counter {ROUNDS}", samples.len());
        }
        Err(e) => println!("curl not run ({e}): the strict parse above read the same endpoint"),
    }
    // Read-only: anything but GET is refused, and nothing else is served.
    let mut s = std::net::TcpStream::connect(status).unwrap();
    write!(s, "POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    assert!(raw.starts_with("HTTP/1.1 405"), "{raw}");
    assert_eq!(get(status, "/plan/cancel").0, 404);
}

/// `curl` over HTTPS to `url` with the consortium CA and, when given, a member's certificate:
/// (curl's exit code, the HTTP status it printed, the body).
fn curl_https(c: &Consortium, member: Option<&TlsFiles>, url: &str) -> (i32, String, String) {
    let body = c.dir.path().join("curl-body");
    let _ = std::fs::remove_file(&body);
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "--max-time", "10", "-o"])
        .arg(&body)
        .args(["-w", "%{http_code}", "--cacert"])
        .arg(c.pki().join("ca.pem"));
    if let Some(m) = member {
        cmd.arg("--cert").arg(&m.cert).arg("--key").arg(&m.key);
    }
    let out = cmd.arg(url).output().expect("curl must be installed (scripts/test installs it)");
    let code = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.code().unwrap_or(-1), code, std::fs::read_to_string(&body).unwrap_or_default())
}

#[test]
fn behind_mutual_tls_curl_reads_the_metrics_with_a_lead_certificate_and_a_node_certificate_is_refused() {
    let c = Consortium::new();
    let coord = CoordinatorProcess::start_configured(&c, "[status]\nlisten = \"127.0.0.1:0\"\ntls = true\n", &[]);
    let mut status: Option<SocketAddr> = None;
    assert!(wait_until(Duration::from_secs(10), || {
        status =
            coord.log_text().split("status page on https://").nth(1).and_then(|r| r.split('/').next()?.parse().ok());
        status.is_some()
    }));
    // The coordinator's certificate names localhost (`pki init`).
    let url = format!("https://localhost:{}/metrics", status.unwrap().port());
    let (lead, auditor, node) = (c.lead(), c.member("inspector", "auditor"), c.member("cleveland", "node"));

    for (who, files) in [("lead", &lead), ("auditor", &auditor)] {
        let (rc, code, text) = curl_https(&c, Some(files), &url);
        assert_eq!((rc, code.as_str()), (0, "200"), "{who}: {text}");
        let samples = parse_metrics(&text);
        assert!(samples.iter().any(|(name, _, _)| name == "sanctum_connected_nodes"), "{who}: {text}");
        println!("curl --cert {who}: 200, {} samples", samples.len());
    }
    let (rc, code, why) = curl_https(&c, Some(&node), &url);
    assert_eq!((rc, code.as_str()), (0, "403"), "{why}");
    assert!(why.contains("'cleveland' holds a node certificate; this call needs role lead or auditor"), "{why}");
    println!("curl --cert cleveland (node): 403: {}", why.trim());
    let (rc, code, text) = curl_https(&c, None, &url);
    assert!(rc != 0 && code != "200" && text.is_empty(), "no certificate, yet: {rc} {code} {text}");
    println!("curl without a certificate: exit {rc}, HTTP {code:?}");
    // Plain HTTP on the same port gets no page.
    let (rc, code, _) = curl_https(&c, Some(&auditor), &url.replace("https://", "http://"));
    assert!(code != "200", "plain HTTP was served: {rc} {code}");

    // The auditor is revoked: the coordinator follows revoked.json and stops answering it.
    run_ok(
        Command::new(bin("sanctum-coordinator"))
            .args(["pki", "revoke", "inspector", "--reason", "left the consortium", "--dir"])
            .arg(c.pki()),
    );
    assert!(
        wait_until(Duration::from_secs(10), || curl_https(&c, Some(&auditor), &url).1 != "200"),
        "a revoked auditor still reads the status page"
    );
    assert_eq!(curl_https(&c, Some(&lead), &url).1, "200", "the lead is unaffected");
    println!("after pki revoke inspector: refused; the lead still reads it");
}
