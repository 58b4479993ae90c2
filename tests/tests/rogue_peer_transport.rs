//! Anyone who can reach the port, against a real coordinator: failed handshakes are counted and
//! audited in bounded periodic records (never one signed, fsync'd record each) while a node's
//! calls still answer within a second; connections beyond `limits.max_connections` are closed at
//! once and counted; silent sockets (slowloris) from one address, or from many, do not keep a
//! node out; one member's certificate cannot take every connection; a member calling what its
//! role may not is audited one by one only up to a bound per period, the rest counted.
//!
//! Other hosts are stood for by other loopback addresses (127.0.0.2 and up: Linux routes all of
//! 127.0.0.0/8 to the loopback device); the nodes connect from 127.0.0.1.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed step is a failed test

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sanctum_protocol::proto::FetchModelRequest;
use sanctum_protocol::proto::federation_client::FederationClient;
use sanctum_tests::peer::{self, RefusalTotals};
use sanctum_tests::{Consortium, CoordinatorProcess, channel};
use tokio::io::AsyncReadExt;

/// A model hash nobody stored: `FetchModel` answers `NotFound` after one look at the disk, which
/// makes it a cheap call that still goes through the guard and a handler.
fn no_such_model() -> FetchModelRequest {
    FetchModelRequest { sha256: "00".repeat(32), offset: 0 }
}

/// Waits (without blocking the runtime) until the periodic refusal records satisfy `done`.
async fn refusals_until(
    coord: &CoordinatorProcess,
    timeout: Duration,
    done: impl Fn(&RefusalTotals) -> bool,
) -> RefusalTotals {
    let end = Instant::now() + timeout;
    loop {
        let t = peer::refusal_totals(&coord.audit_records());
        if done(&t) || Instant::now() > end {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_failed_handshakes_cost_a_bounded_number_of_audit_records_and_a_node_still_answers_within_a_second()
 {
    const HANDSHAKES: usize = 10_000;
    const PERIOD_SECS: u64 = 1;
    const PER_IP: usize = 128;
    let c = Consortium::new();
    let coord = Arc::new(CoordinatorProcess::start_configured(
        &c,
        // All 64 flooding sockets and the nodes come from 127.0.0.1: the per-address cap on
        // handshakes in flight is raised above them, so this test measures the rest.
        &format!("[limits]\nrefusal_report_secs = {PERIOD_SECS}\nhandshakes_per_ip = {PER_IP}\n"),
        &[],
    ));
    let fresh_files = c.member("va", "node");
    let mut node = peer::node_client(&c, &coord, "cleveland").await;
    // The node answers before the flood.
    let status = node.fetch_model(no_such_model()).await.expect_err("no such model");
    assert_eq!(status.code(), tonic::Code::NotFound, "{}", status.message());

    let records_before = coord.audit_records().len();
    let started = Instant::now();
    let flood = tokio::spawn(peer::failed_handshakes(coord.addr, HANDSHAKES, 64, Duration::from_secs(10)));

    // Meanwhile the node calls every 20 ms; 100 ms in, a second node connects afresh (its
    // handshake queues with the garbage ones).
    let (mut calls, mut slowest, mut fresh_connect) = (0u32, Duration::ZERO, None);
    while !flood.is_finished() {
        let t = Instant::now();
        let status = node.fetch_model(no_such_model()).await.expect_err("no such model");
        assert_eq!(status.code(), tonic::Code::NotFound, "the node's call failed: {}", status.message());
        slowest = slowest.max(t.elapsed());
        calls += 1;
        if fresh_connect.is_none() && started.elapsed() > Duration::from_millis(100) {
            let t = Instant::now();
            let ch = channel(&coord.address(), &fresh_files).await.expect("a fresh node connects during the flood");
            let status = FederationClient::new(ch).fetch_model(no_such_model()).await.expect_err("no such model");
            assert_eq!(status.code(), tonic::Code::NotFound);
            fresh_connect = Some(t.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (closed, flood_took) = flood.await.unwrap();
    println!(
        "{HANDSHAKES} failed handshakes (64 at a time, limits.handshakes_per_ip = {PER_IP}) in {flood_took:?} ({:.0}/s); the server closed {closed} of them",
        HANDSHAKES as f64 / flood_took.as_secs_f64()
    );
    println!(
        "node: {calls} calls during the flood, slowest {slowest:?}; a fresh node connected and answered in {fresh_connect:?}"
    );
    assert_eq!(closed, HANDSHAKES, "every refused connection is closed by the server");
    assert!(slowest < Duration::from_secs(1), "a node's call took {slowest:?} during the flood");
    let fresh = fresh_connect.expect("a fresh node connected during the flood");
    assert!(fresh < Duration::from_secs(5), "a fresh node took {fresh:?} to connect during the flood");

    // The counts reach the audit log within a period or two of the flood's end.
    let totals =
        refusals_until(&coord, Duration::from_secs(3 * PERIOD_SECS + 5), |t| t.refused >= HANDSHAKES as u64).await;
    let elapsed = started.elapsed();
    let added = coord.audit_records().len() - records_before;
    // One periodic record per period at most, plus slack for the partial periods at either end
    // (and anything else the service audits meanwhile: nothing, here).
    let bound = elapsed.as_secs().div_ceil(PERIOD_SECS) as usize + 2;
    println!(
        "audit log: {added} records added over {elapsed:?} (bound {bound}); {} periodic refusal records, {} refusals counted, by reason {:?}, largest record {} bytes",
        totals.records, totals.refused, totals.by_reason, totals.largest_record_bytes
    );
    assert!(added <= bound, "{added} audit records for {HANDSHAKES} failed handshakes (bound {bound})");
    assert_eq!(totals.refused, HANDSHAKES as u64, "the periodic records count every refusal once: {totals:?}");
    assert_eq!(totals.by_reason.get("handshake_failed").copied(), Some(HANDSHAKES as u64), "{totals:?}");
    assert!(totals.largest_record_bytes < 4096, "a periodic record is bounded: {totals:?}");
    // The log says so too, but not once per refusal.
    let lines = coord.log_text().lines().filter(|l| l.contains("refused connection")).count();
    println!("coordinator log: {lines} 'refused connection' lines");
    assert!(lines < 200, "{lines} log lines for {HANDSHAKES} refusals");
}

#[tokio::test]
async fn connections_beyond_the_limit_are_closed_at_once_and_counted_and_a_node_connects_once_they_go() {
    const LIMIT: usize = 8;
    const SILENT: usize = 20;
    let c = Consortium::new();
    let coord = CoordinatorProcess::start_configured(
        &c,
        // The per-address cap is raised so that only max_connections decides (all from 127.0.0.1).
        &format!(
            "[limits]\nmax_connections = {LIMIT}\nhandshakes_per_ip = 64\nhandshake_timeout_secs = 2\nrefusal_report_secs = 1\n"
        ),
        &[],
    );
    let node = c.member("cleveland", "node");
    let mut silent = Vec::new();
    for _ in 0..SILENT {
        silent.push(peer::silent_connection(&coord).await.expect("TCP connect"));
    }
    // Which of them the server closes at once (well within the 2 s handshake timeout).
    let reads: Vec<_> = silent
        .into_iter()
        .map(|mut tcp| {
            tokio::spawn(async move {
                let mut buf = [0u8; 16];
                let closed = matches!(
                    tokio::time::timeout(Duration::from_millis(1000), tcp.read(&mut buf)).await,
                    Ok(Ok(0) | Err(_))
                );
                (closed, tcp)
            })
        })
        .collect();
    let mut held = Vec::new();
    let mut closed_at_once = 0;
    for r in reads {
        let (closed, tcp) = r.await.unwrap();
        if closed {
            closed_at_once += 1;
        } else {
            held.push(tcp);
        }
    }
    println!(
        "{SILENT} silent connections with max_connections = {LIMIT}: {closed_at_once} closed at once, {} held",
        held.len()
    );
    assert_eq!(closed_at_once, SILENT - LIMIT, "connections beyond the limit are closed at once");

    // The handshake timeout frees the held slots; then a node connects and is served.
    let t = Instant::now();
    let mut attempts = 0;
    let mut client = loop {
        attempts += 1;
        match channel(&coord.address(), &node).await {
            Ok(ch) => break FederationClient::new(ch),
            Err(e) if t.elapsed() < Duration::from_secs(10) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("the node never connected: {e}"),
        }
    };
    let status = client.fetch_model(no_such_model()).await.expect_err("no such model");
    assert_eq!(status.code(), tonic::Code::NotFound);
    println!("the node connected {:?} after the flood ({attempts} attempts) and is served", t.elapsed());
    drop(held);

    let totals = refusals_until(&coord, Duration::from_secs(5), |t| {
        t.by_reason.get("connection_limit").copied().unwrap_or(0) >= (SILENT - LIMIT) as u64
            && t.by_reason.get("handshake_timed_out").copied().unwrap_or(0) >= LIMIT as u64
    })
    .await;
    println!("audited: {} periodic records, by reason {:?}", totals.records, totals.by_reason);
    assert!(totals.by_reason.get("connection_limit").copied().unwrap_or(0) >= (SILENT - LIMIT) as u64, "{totals:?}");
    assert!(totals.by_reason.get("handshake_timed_out").copied().unwrap_or(0) >= LIMIT as u64, "{totals:?}");
}

/// Keeps `per_address` silent sockets open from each of `sources` until `stop`: each reconnects
/// as soon as the server closes it. Returns (connections made, closed at once, the longest any
/// was held open by the server).
async fn silent_flood(
    sources: Vec<IpAddr>,
    per_address: usize,
    addr: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
) -> (usize, usize, Duration) {
    let made = Arc::new(AtomicUsize::new(0));
    let at_once = Arc::new(AtomicUsize::new(0));
    let longest = Arc::new(std::sync::Mutex::new(Duration::ZERO));
    let workers: Vec<_> = sources
        .iter()
        .flat_map(|&source| std::iter::repeat_n(source, per_address))
        .map(|source| {
            let (made, at_once, longest, stop) =
                (Arc::clone(&made), Arc::clone(&at_once), Arc::clone(&longest), Arc::clone(&stop));
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut tcp) = peer::silent_connection_from(source, addr).await else {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    made.fetch_add(1, Ordering::Relaxed);
                    // Held until the server closes it; 15 s is past any timeout of the server's.
                    let held = peer::until_closed(&mut tcp, Duration::from_secs(15)).await.unwrap_or(Duration::MAX);
                    if held < Duration::from_millis(200) {
                        at_once.fetch_add(1, Ordering::Relaxed);
                        // Still thousands a second in all, without spinning the test's cores.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    let mut l = longest.lock().unwrap();
                    *l = (*l).max(held);
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let longest = *longest.lock().unwrap();
    (made.load(Ordering::Relaxed), at_once.load(Ordering::Relaxed), longest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn silent_connections_from_one_address_do_not_keep_a_node_out() {
    // 200 silent sockets held open without pause: first all from one other host, then 4 each
    // from 50 hosts (more than the 64 handshake slots). Defaults otherwise: 4 handshakes per
    // address, 2 s to the first byte, 10 s to the end of the handshake, 64 handshakes in flight.
    const SILENT: usize = 200;
    let c = Consortium::new();
    let coord = CoordinatorProcess::start_configured(&c, "[limits]\nrefusal_report_secs = 1\n", &[]);
    let node = c.member("cleveland", "node");
    let one: Vec<IpAddr> = vec![IpAddr::from([127, 0, 0, 2])];
    let many: Vec<IpAddr> = (0..50u8).map(|i| IpAddr::from([127, 0, 1, i + 1])).collect();
    for (what, sources) in [("one address", one), ("50 addresses", many)] {
        let per_address = SILENT / sources.len();
        let stop = Arc::new(AtomicBool::new(false));
        let flood = tokio::spawn(silent_flood(sources, per_address, coord.addr, Arc::clone(&stop)));
        // Let the flood fill what it can.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let t = Instant::now();
        let ch = channel(&coord.address(), &node).await.expect("the node connects during the flood");
        let connected = t.elapsed();
        let status = FederationClient::new(ch).fetch_model(no_such_model()).await.expect_err("no such model");
        assert_eq!(status.code(), tonic::Code::NotFound, "{}", status.message());
        let served = t.elapsed();
        // The flood holds through at least one round of first-byte timeouts.
        tokio::time::sleep(Duration::from_millis(3000)).await;
        stop.store(true, Ordering::Relaxed);
        let (made, at_once, longest) = flood.await.unwrap();
        println!(
            "{SILENT} silent sockets from {what}, held open without pause: {made} connections made, {at_once} closed at once, the longest held {longest:?}; the node connected in {connected:?} and was served in {served:?}"
        );
        assert!(connected < Duration::from_secs(3), "the node took {connected:?} to connect during the flood");
        assert!(longest < Duration::from_secs(4), "a silent socket was held {longest:?} (first-byte timeout 2 s)");
    }
    let totals = refusals_until(&coord, Duration::from_secs(5), |t| {
        t.by_reason.contains_key("address_limit") && t.by_reason.contains_key("handshake_timed_out")
    })
    .await;
    println!("audited: {} periodic records, by reason {:?}", totals.records, totals.by_reason);
    assert!(totals.by_reason.get("address_limit").copied().unwrap_or(0) > 0, "{totals:?}");
    assert!(totals.by_reason.get("handshake_timed_out").copied().unwrap_or(0) >= SILENT as u64, "{totals:?}");
}

#[tokio::test]
async fn one_certificate_cannot_take_every_connection() {
    const PER_IDENTITY: usize = 8;
    const EXTRA: usize = 5;
    let c = Consortium::new();
    let coord = CoordinatorProcess::start_configured(
        &c,
        &format!(
            "[limits]\nconnections_per_identity = {PER_IDENTITY}\nhandshakes_per_ip = 64\nrefusal_report_secs = 1\n"
        ),
        &[],
    );
    let rogue = c.member("rogue", "node");
    // One connection at a time, each called once: the first PER_IDENTITY are served.
    let mut open = Vec::new();
    let (mut served, mut refused) = (0usize, 0usize);
    for _ in 0..PER_IDENTITY + EXTRA {
        let Ok(ch) = channel(&coord.address(), &rogue).await else {
            refused += 1;
            continue;
        };
        let mut client = FederationClient::new(ch);
        match client.fetch_model(no_such_model()).await {
            Err(s) if s.code() == tonic::Code::NotFound => served += 1,
            Err(_) | Ok(_) => refused += 1,
        }
        open.push(client);
    }
    println!(
        "{} connections with one node certificate (limits.connections_per_identity = {PER_IDENTITY}): {served} served, {refused} refused",
        PER_IDENTITY + EXTRA
    );
    assert_eq!((served, refused), (PER_IDENTITY, EXTRA));
    // Another member connects and is served meanwhile.
    let t = Instant::now();
    let ch = channel(&coord.address(), &c.member("va", "node")).await.expect("another node connects");
    let status = FederationClient::new(ch).fetch_model(no_such_model()).await.expect_err("no such model");
    assert_eq!(status.code(), tonic::Code::NotFound, "{}", status.message());
    println!("another node connected and was served in {:?}", t.elapsed());
    // The slot of a dropped connection goes back.
    open.truncate(PER_IDENTITY - 1);
    let t = Instant::now();
    let again = loop {
        let ch = channel(&coord.address(), &rogue).await;
        if let Ok(ch) = ch
            && FederationClient::new(ch).fetch_model(no_such_model()).await.err().map(|s| s.code())
                == Some(tonic::Code::NotFound)
        {
            break t.elapsed();
        }
        assert!(t.elapsed() < Duration::from_secs(5), "the freed slot never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!("with one connection dropped, the certificate connected again in {again:?}");
    let totals = refusals_until(&coord, Duration::from_secs(5), |t| {
        t.by_reason.get("identity_limit").copied().unwrap_or(0) >= EXTRA as u64
    })
    .await;
    println!("audited: {} periodic records, by reason {:?}", totals.records, totals.by_reason);
    assert!(totals.by_reason.get("identity_limit").copied().unwrap_or(0) >= EXTRA as u64, "{totals:?}");
}

#[tokio::test]
async fn a_member_calling_what_its_role_may_not_is_audited_one_by_one_only_up_to_a_bound() {
    const CALLS: u64 = 300;
    let c = Consortium::new();
    let coord = CoordinatorProcess::start_configured(&c, "[limits]\nrefusal_report_secs = 1\n", &[]);
    // The lead's certificate on the node-facing service: every call is refused for its role.
    let mut wrong = FederationClient::new(channel(&coord.address(), &c.lead()).await.unwrap());
    let before = coord.audit_records().len();
    let started = Instant::now();
    for _ in 0..CALLS {
        let status = wrong.fetch_model(no_such_model()).await.expect_err("refused for its role");
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{}", status.message());
    }
    let took = started.elapsed();
    let totals = refusals_until(&coord, Duration::from_secs(5), |t| t.by_reason.contains_key("call_refused")).await;
    let records = coord.audit_records();
    let itemised = records[before..].iter().filter(|r| r.event == "call_refused").count() as u64;
    let counted = totals.by_reason.get("call_refused").copied().unwrap_or(0);
    println!(
        "{CALLS} wrong-role calls in {took:?}: {itemised} audited one by one, {counted} counted in {} periodic records",
        totals.records
    );
    assert!(itemised >= 1, "the first refusal is audited with who called");
    assert!(itemised <= 16 * (took.as_secs() + 2), "{itemised} call_refused records");
    assert_eq!(itemised + counted, CALLS, "every refused call is in the log once");
}
