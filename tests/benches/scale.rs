//! Aggregation at scale (issue 14, item 5): 50 scripted nodes upload a 10 M-parameter update each,
//! all at once, to a real release `sanctum-coordinator` over loopback mutual TLS. Measured: the
//! coordinator's throughput against a plain loopback TCP copy of the same bytes by the same
//! number of connections (goal ≥ 0.5×), and its peak RSS against the model's size (goal ≤ 3×).
//! Beside them, what the spool's file system allows: the same bytes written at once into as many
//! new files, fsync'd at every chunk as the coordinator's partial uploads are.
//!
//! Each repetition is one round of one plan: the nodes build their header (the payload's hash)
//! when `StartRound` arrives, wait until all of them hold theirs, then upload together; the
//! coordinator's time runs from that barrier to the last `UpdateReceipt`. The plain TCP copy
//! and the disk copy run just before each round, while the coordinator waits for its uploads, so
//! the three alternate. The scripted nodes do not fetch the global model (a real node does, before it
//! trains: outside the window either way), and share one payload to keep the bench's own memory
//! down (the coordinator hashes, spools and aggregates each as its own).
//!
//! Run: `cargo build --release --bins && cargo bench -p sanctum-tests --bench scale`. The
//! markdown block goes to stdout between `<!-- scale:begin -->` and `<!-- scale:end -->`;
//! progress goes to stderr. Nothing is asserted on the timings; a run that fails (a refused
//! upload, a plan that does not finish) panics.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failed step is a failed bench

use std::sync::Arc;
use std::time::{Duration, Instant};

use sanctum_protocol::plan::Plan;
use sanctum_protocol::proto::plan_event::Kind;
use sanctum_protocol::proto::{PlanEvent, UpdateReceipt};
use sanctum_tests::peer::lead_client;
use sanctum_tests::scripted::{chunked, follow_directives, header, subscribed};
use sanctum_tests::{Consortium, CoordinatorProcess, HEART_SCHEMA_SHA256, next_event, submit_and_watch};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Barrier, mpsc};
use tonic::Streaming;

/// Nodes uploading at once.
const NODES: usize = 50;
/// Rounds of the plan, each one repetition of the three measurements, unless
/// `SANCTUM_BENCH_SCALE_ROUNDS` says otherwise (a longer run shows whether the coordinator's
/// resident set settles from round to round).
fn reps() -> usize {
    std::env::var("SANCTUM_BENCH_SCALE_ROUNDS").ok().and_then(|v| v.parse().ok()).filter(|&n| n > 0).unwrap_or(3)
}
/// 13·3160 + 3160 + 3160² + 3160 + 3160 + 1 = 10,036,161 parameters (40.1 MB of f32).
const MODEL: &str = "kind = \"mlp\"\ninputs = 13\nhidden = [3160, 3160]";
/// How long a step may take before the bench gives up on the run.
const STALL_SECS: u64 = 600;

fn plan_toml() -> String {
    let reps = reps();
    format!(
        "name = \"scale\"\nrounds = {reps}\nmin_nodes = {NODES}\n\
         round_deadline_secs = 1800\nrecruit_deadline_secs = 300\n\
         [model]\n{MODEL}\n[data]\nschema = \"heart_disease\"\nschema_sha256 = \"{HEART_SCHEMA_SHA256}\"\n\
         [local]\nsteps = 1\nbatch_size = 4\nlearning_rate = 0.01\n[strategy]\nkind = \"fedavg\"\n"
    )
}

/// Small finite values, different for each parameter (a cheap hash of the index).
fn payload(num_params: usize) -> Arc<[u8]> {
    let mut bytes = Vec::with_capacity(num_params * 4);
    for i in 0..num_params as u64 {
        let h = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
        let v = (h as f32 / (1u64 << 24) as f32 - 0.5) * 0.02;
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    bytes.into()
}

/// User + system CPU seconds of a process so far (`/proc/PID/stat`), given the clock tick.
fn cpu_secs(pid: &str, tick: f64) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces), from field 3 (state) on.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect();
    // utime and stime are fields 14 and 15: indices 11 and 12 from the state.
    (f.get(11).unwrap_or(&0) + f.get(12).unwrap_or(&0)) as f64 / tick
}

fn clock_tick() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// One plain TCP copy: `NODES` connections to a sink on 127.0.0.1, each writing `payload` once
/// all are connected; the time from that barrier to the last byte read by the sink.
async fn tcp_copy(payload: &Arc<[u8]>) -> Duration {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the sink");
    let addr = listener.local_addr().expect("the sink's address");
    let expect = payload.len() as u64;
    let sink = tokio::spawn(async move {
        let mut readers = Vec::new();
        for _ in 0..NODES {
            let (mut tcp, _) = listener.accept().await.expect("accept");
            readers.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 1 << 20];
                let mut got = 0u64;
                loop {
                    match tcp.read(&mut buf).await.expect("the sink reads") {
                        0 => break,
                        n => got += n as u64,
                    }
                }
                assert_eq!(got, expect, "the sink got every byte of a connection");
                Instant::now()
            }));
        }
        let mut last = None;
        for r in readers {
            let at = r.await.expect("a sink reader");
            last = Some(last.map_or(at, |l: Instant| l.max(at)));
        }
        last.expect("connections")
    });
    let go = Arc::new(Barrier::new(NODES + 1));
    let mut writers = Vec::new();
    for _ in 0..NODES {
        let mut tcp = TcpStream::connect(addr).await.expect("connect to the sink");
        tcp.set_nodelay(true).expect("nodelay");
        let (go, payload) = (go.clone(), payload.clone());
        writers.push(tokio::spawn(async move {
            go.wait().await;
            tcp.write_all(&payload).await.expect("write to the sink");
            tcp.shutdown().await.expect("shut down");
        }));
    }
    go.wait().await;
    let started = Instant::now();
    for w in writers {
        w.await.expect("a writer");
    }
    sink.await.expect("the sink") - started
}

/// The disk alone: `NODES` threads at once each write `payload` to a new file in `dir` (the
/// coordinator's state directory, so the same file system) in 1 MiB chunks, fsync'ing its data
/// after each chunk and the whole file at the end, as the coordinator's partial uploads are
/// (`store::PartialUpload`); the time from the barrier to the last file on disk. The files are
/// removed at once after, so the coordinator's round starts, as this copy did, just after the
/// other side freed the same amount of page cache (on a VM that hands freed memory back to its
/// host, writing into memory that was not touched lately is several times slower).
async fn disk_copy(payload: &Arc<[u8]>, dir: &std::path::Path) -> Duration {
    use std::io::Write;
    std::fs::create_dir_all(dir).expect("the disk copy's directory");
    let go = Arc::new(std::sync::Barrier::new(NODES + 1));
    let mut writers = Vec::new();
    for i in 0..NODES {
        let (go, payload, path) = (go.clone(), payload.clone(), dir.join(format!("copy-{i:02}")));
        writers.push(tokio::task::spawn_blocking(move || {
            let mut file = std::fs::File::create(&path).expect("create a disk copy");
            go.wait();
            for chunk in payload.chunks(1 << 20) {
                file.write_all(chunk).expect("write a disk copy");
                file.sync_data().expect("fsync a disk copy");
            }
            file.sync_all().expect("fsync a disk copy");
            Instant::now()
        }));
    }
    let barrier = go.clone();
    tokio::task::spawn_blocking(move || barrier.wait()).await.expect("the disk copy's barrier");
    let started = Instant::now();
    let mut last = started;
    for w in writers {
        last = last.max(w.await.expect("a disk writer"));
    }
    std::fs::remove_dir_all(dir).expect("remove the disk copy");
    last - started
}

/// Waits for `round`'s `RoundClosed`; panics if the run ends first.
async fn round_closed(events: &mut Streaming<PlanEvent>, round: u32) {
    loop {
        match next_event(events, STALL_SECS, "the round did not close").await.kind {
            Some(Kind::RoundClosed(r)) if r.round == round => {
                assert_eq!(r.reported.len(), NODES, "round {round}: only {:?} reported", r.reported);
                return;
            }
            Some(Kind::PlanFinished(f)) => panic!("the plan finished before round {round} closed: {}", f.reason),
            Some(Kind::UpdateRejected(r)) => panic!("round {round}: an update was rejected: {r:?}"),
            _ => {}
        }
    }
}

struct Figures {
    num_params: usize,
    payload_bytes: u64,
    ours: Vec<Duration>,
    tcp: Vec<Duration>,
    disk: Vec<Duration>,
    coord_cpu: Vec<f64>,
    bench_cpu: Vec<f64>,
    baseline_kib: u64,
    peak_kib: u64,
    /// The coordinator's RSS once each round has closed.
    after_round_kib: Vec<u64>,
}

#[tokio::main]
async fn main() {
    let toml = plan_toml();
    let plan = Plan::parse(&toml).expect("the bench's plan parses");
    let num_params = plan.model.num_params();
    let payload = payload(num_params);
    let payload_bytes = payload.len() as u64;
    eprintln!("model: {num_params} parameters, {payload_bytes} bytes of f32; {NODES} nodes, {} rounds", reps());

    let c = Consortium::new();
    let coord = CoordinatorProcess::start(&c);
    let pid = coord.pid().to_string();
    eprintln!("coordinator pid {pid} at {}", coord.address());
    let started = Instant::now();
    let ready = Arc::new(Barrier::new(NODES + 1));
    let go = Arc::new(Barrier::new(NODES + 1));
    let (tx, mut receipts) = mpsc::channel::<(u32, Result<UpdateReceipt, tonic::Status>, Instant)>(NODES);
    let mut nodes = Vec::new();
    // One at a time: the coordinator takes a few handshakes per address at once.
    for i in 0..NODES {
        let (_files, client, directives) = subscribed(&c, &coord, &format!("h{i:02}")).await;
        let (tx, ready, go, payload) = (tx.clone(), ready.clone(), go.clone(), payload.clone());
        nodes.push(tokio::spawn(follow_directives(client, directives, move |mut client, start| {
            let (tx, ready, go, payload) = (tx.clone(), ready.clone(), go.clone(), payload.clone());
            async move {
                let first = header(&start.plan_id, &start, &payload, num_params as u64, 100);
                ready.wait().await;
                go.wait().await;
                let receipt = client.submit_update(chunked(first, payload)).await.map(tonic::Response::into_inner);
                tx.send((start.round, receipt, Instant::now())).await.expect("the bench hears the receipt");
            }
        })));
    }
    drop(tx);
    coord.wait_for_nodes(NODES);
    eprintln!("{NODES} nodes subscribed in {:.1?}", started.elapsed());

    let mut lead = lead_client(&c, &coord).await;
    let (_plan_id, mut events) = submit_and_watch(&mut lead, toml).await;
    let tick = clock_tick();
    let mut f = Figures {
        num_params,
        payload_bytes,
        ours: vec![],
        tcp: vec![],
        disk: vec![],
        coord_cpu: vec![],
        bench_cpu: vec![],
        baseline_kib: 0,
        peak_kib: 0,
        after_round_kib: vec![],
    };
    for rep in 1..=reps() as u32 {
        // Every node holds round `rep`'s StartRound and its header: the coordinator waits.
        tokio::time::timeout(Duration::from_secs(STALL_SECS), ready.wait()).await.expect("round did not start");
        if rep == 1 {
            f.baseline_kib = coord.rss_kib();
            eprintln!(
                "coordinator before the uploads: RSS {} KiB, peak so far {} KiB",
                f.baseline_kib,
                coord.peak_rss_kib()
            );
        }
        let tcp = tcp_copy(&payload).await;
        eprintln!("rep {rep}: plain TCP {tcp:.2?}");
        f.tcp.push(tcp);
        let disk_dir = coord.state_dir().join("bench-disk-copy");
        let disk = disk_copy(&payload, &disk_dir).await;
        eprintln!("rep {rep}: disk copy {disk:.2?}");
        f.disk.push(disk);
        let (coord0, self0) = (cpu_secs(&pid, tick), cpu_secs("self", tick));
        go.wait().await;
        let t0 = Instant::now();
        let mut at_each = Vec::with_capacity(NODES);
        for _ in 0..NODES {
            let (round, receipt, at) = tokio::time::timeout(Duration::from_secs(STALL_SECS), receipts.recv())
                .await
                .expect("the uploads stalled")
                .expect("a node left before its receipt");
            match receipt {
                Ok(r) if r.accepted && round == rep => {}
                other => panic!("round {rep}: upload for round {round} answered {other:?}"),
            }
            at_each.push(at - t0);
        }
        at_each.sort();
        let ours = at_each[NODES - 1];
        f.coord_cpu.push(cpu_secs(&pid, tick) - coord0);
        f.bench_cpu.push(cpu_secs("self", tick) - self0);
        eprintln!(
            "rep {rep}: coordinator {ours:.2?} (receipts: first {:.2?}, median {:.2?}; its CPU {:.1} s, the bench's \
             {:.1} s); RSS {} KiB, peak {} KiB",
            at_each[0],
            at_each[NODES / 2],
            f.coord_cpu.last().unwrap_or(&0.0),
            f.bench_cpu.last().unwrap_or(&0.0),
            coord.rss_kib(),
            coord.peak_rss_kib()
        );
        f.ours.push(ours);
        round_closed(&mut events, rep).await;
        f.after_round_kib.push(coord.rss_kib());
    }
    let finished = loop {
        if let Some(Kind::PlanFinished(done)) =
            next_event(&mut events, STALL_SECS, "the plan did not finish").await.kind
        {
            break done;
        }
    };
    assert!(finished.success, "the plan failed: {}", finished.reason);
    for n in nodes {
        n.await.expect("a scripted node");
    }
    f.peak_kib = coord.peak_rss_kib();
    eprintln!("done in {:.1?}; coordinator peak RSS {} KiB", started.elapsed(), f.peak_kib);
    print_block(&f);
}

fn print_block(f: &Figures) {
    let mb = |bytes: f64| bytes / 1e6;
    let total = (f.payload_bytes * NODES as u64) as f64;
    let (ours, tcp) = (median(f.ours.clone()), median(f.tcp.clone()));
    let (ours_mbs, tcp_mbs) = (mb(total) / ours.as_secs_f64(), mb(total) / tcp.as_secs_f64());
    let ratio = ours_mbs / tcp_mbs;
    let disk = median(f.disk.clone());
    let disk_mbs = mb(total) / disk.as_secs_f64();
    let peak_bytes = f.peak_kib as f64 * 1024.0;
    let rss_ratio = peak_bytes / f.payload_bytes as f64;
    let verdict = |met: bool| if met { "met" } else { "missed" };
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let secs = |v: &[Duration]| v.iter().map(|d| format!("{:.2}", d.as_secs_f64())).collect::<Vec<_>>().join(", ");
    let cores_busy = |cpu: &[f64]| {
        let total: f64 = cpu.iter().sum();
        total / f.ours.iter().map(Duration::as_secs_f64).sum::<f64>()
    };
    println!("<!-- scale:begin -->");
    println!(
        "{NODES} scripted nodes (no node process, no training) upload a {}-parameter update each, all at once, to \
         the release `sanctum-coordinator` over loopback mutual TLS, in 1 MiB chunks as the real node sends them; \
         the coordinator's time runs from the barrier the nodes start from to the last `UpdateReceipt` (each \
         update decrypted, hashed, spooled to disk with its fsyncs, read back and folded into the round's sum; \
         the last one's receipt comes after the round's close). Against it, {NODES} plain loopback TCP \
         connections write the same bytes at once into a sink that reads and discards them (no TLS, no disk); \
         and, for what the spool's file system allows, {NODES} threads write them at once into new files beside \
         the coordinator's state, fsync'd at every 1 MiB chunk as its partial uploads are (no TLS, no network). \
         {} repetitions of each, alternating (each round of one plan, the two copies just before it); medians. \
         Machine: {cores} cores ({cpu}), shared by the coordinator and the bench's clients. Peak RSS is the \
         coordinator's `VmHWM` after the run. `cargo bench -p sanctum-tests --bench scale`.",
        f.num_params,
        f.ours.len()
    );
    println!();
    println!("| | measured | goal |");
    println!("|---|---|---|");
    println!("| model | {} parameters, {:.1} MB of f32 | ~10 M |", f.num_params, mb(f.payload_bytes as f64));
    println!("| nodes uploading at once | {NODES} ({:.0} MB in all) | 50 |", mb(total));
    println!(
        "| coordinator, mutual TLS: upload time (median; each) | {:.2} s ({} s) → {ours_mbs:.0} MB/s | |",
        ours.as_secs_f64(),
        secs(&f.ours)
    );
    println!(
        "| plain loopback TCP into a sink: time (median; each) | {:.2} s ({} s) → {tcp_mbs:.0} MB/s | |",
        tcp.as_secs_f64(),
        secs(&f.tcp)
    );
    println!("| throughput ratio, coordinator / plain TCP | {ratio:.2} | ≥ 0.5: {} |", verdict(ratio >= 0.5));
    println!(
        "| the disk alone: the same bytes into {NODES} new files at once, fsync'd every 1 MiB (median; each) | \
         {:.2} s ({} s) → {disk_mbs:.0} MB/s | |",
        disk.as_secs_f64(),
        secs(&f.disk)
    );
    println!("| throughput ratio, coordinator / the disk alone | {:.2} | |", ours_mbs / disk_mbs);
    println!(
        "| CPU in the upload window (cores busy, of {cores}): coordinator; the bench's clients | {:.2}; {:.2} | |",
        cores_busy(&f.coord_cpu),
        cores_busy(&f.bench_cpu)
    );
    println!(
        "| coordinator RSS before the uploads → peak (VmHWM) | {:.0} MB → {:.0} MB | |",
        mb(f.baseline_kib as f64 * 1024.0),
        mb(peak_bytes)
    );
    println!("| peak RSS / model size | {rss_ratio:.2}× | ≤ 3×: {} |", verdict(rss_ratio <= 3.0));
    let after: Vec<String> = f.after_round_kib.iter().map(|k| format!("{:.0}", mb(*k as f64 * 1024.0))).collect();
    println!("| coordinator RSS once each round closed, MB | {} | |", after.join(", "));
    println!("| the same run with secure aggregation | not built yet | |");
    println!("<!-- scale:end -->");
}
