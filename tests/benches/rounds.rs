//! Round overhead against Flower (issue 14, item 4): a round's wall time minus its slowest local
//! work, Sanctum through real mutual-TLS processes (one `sanctum-coordinator serve`, four
//! `sanctum-node run`, loopback) against Flower's deployment engine (SuperLink and SuperNodes as
//! processes) and its simulation engine, in the same run, on the heart-disease logistic
//! regression and a 1 M-parameter MLP, 1 local step, 20 rounds.
//!
//! Both sides are measured the same way. A round's wall time is the time between the ends of two
//! consecutive rounds as the server side sees them (Sanctum: the lead's watcher receiving
//! `RoundClosed`; Flower: its FedAvg's `aggregate_train` returning), so it holds everything of a
//! round: publishing the model, the directive, the download, the local work, the upload, the
//! aggregation. The local work is what each hospital's own code times: building the model from
//! the received weights, evaluating it on the test split and the local step (Sanctum: the two
//! timings of the node's "local training done" log line; Flower: the ClientApp's own
//! `perf_counter`, `scripts/bench-peers/flower_app/`). Overhead = wall − the slowest hospital's
//! local work, over rounds 2..=20 (the first has no previous end).
//!
//! Needs the release binaries (`cargo build --release --bins`, as `scripts/bench` does) and,
//! for Flower's rows, `SANCTUM_PEERS_PYTHON` (the venv `scripts/bench` installs). Prints a
//! markdown block between `<!-- flower:begin -->` and `<!-- flower:end -->`. With
//! `SANCTUM_BENCH_LOGS=DIR`, Sanctum's coordinator and node logs are kept in DIR/lr and DIR/mlp.

#![allow(clippy::expect_used, clippy::panic, clippy::unwrap_used)] // a bench: a failed run is a failed bench

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use sanctum_protocol::proto::plan_event::Kind;
use sanctum_tests::peer::lead_client;
use sanctum_tests::{
    Consortium, CoordinatorProcess, HEART_SCHEMA, HEART_SCHEMA_SHA256, NodeProcess, heart_data, next_event,
    submit_and_watch,
};

const HOSPITALS: [&str; 4] = ["cleveland", "hungarian", "switzerland", "va"];
const ROUNDS: u32 = 20;
const STEPS: u32 = 1;
const BATCH: u32 = 4;
const LEARNING_RATE: f64 = 0.01;
/// Goal for Sanctum's overhead per round.
const GOAL_MS: f64 = 50.0;

/// One model of the benchmark, as Sanctum's plan and Flower's ClientApp build it.
struct Model {
    label: &'static str,
    /// The plan's `[model]` body.
    plan: &'static str,
    /// `model` and `hidden` of the Flower app's configuration.
    flower: (&'static str, &'static [u32]),
}

const MODELS: [Model; 2] = [
    Model {
        label: "logistic regression (14 parameters)",
        plan: "kind = \"logistic_regression\"\ninputs = 13",
        flower: ("lr", &[]),
    },
    Model {
        label: "MLP 13-1000-1000-1 (1,016,001 parameters)",
        plan: "kind = \"mlp\"\ninputs = 13\nhidden = [1000, 1000]",
        flower: ("mlp", &[1000, 1000]),
    },
];

/// A round as the server side saw it end: seconds since an arbitrary origin, and the slowest
/// hospital's local work in seconds.
#[derive(Clone, Copy, Debug)]
struct RoundEnd {
    round: u32,
    end: f64,
    work: f64,
}

/// Per-round overheads (ms) over rounds 2.., with the walls and works they came from.
struct Overheads {
    wall_ms: Vec<f64>,
    work_ms: Vec<f64>,
    overhead_ms: Vec<f64>,
}

fn overheads(mut ends: Vec<RoundEnd>) -> Overheads {
    ends.sort_by_key(|e| e.round);
    assert_eq!(ends.len(), ROUNDS as usize, "every round ended once: {ends:?}");
    let mut o = Overheads { wall_ms: vec![], work_ms: vec![], overhead_ms: vec![] };
    for pair in ends.windows(2) {
        let wall = (pair[1].end - pair[0].end) * 1e3;
        let work = pair[1].work * 1e3;
        o.wall_ms.push(wall);
        o.work_ms.push(work);
        o.overhead_ms.push(wall - work);
    }
    o
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// The local work of each (round) on one node, from its log: "local training done" lines with
/// `round=`, `seconds=` and `evaluate_seconds=`.
fn node_work(log: &Path) -> Vec<(u32, f64)> {
    let text = std::fs::read_to_string(log).expect("node log");
    let field = |line: &str, name: &str| -> Option<String> {
        line.split_whitespace()
            .find_map(|t| t.strip_prefix(name))
            .map(|v| v.trim_matches(|c: char| c == '"' || c.is_ascii_control() || c == '\u{1b}').to_string())
    };
    text.lines()
        .filter(|l| l.contains("local training done"))
        .map(|l| {
            let round = field(l, "round=").and_then(|v| v.parse().ok()).expect("round= in the log line");
            let train: f64 = field(l, "seconds=").and_then(|v| v.parse().ok()).expect("seconds= in the log line");
            let eval: f64 =
                field(l, "evaluate_seconds=").and_then(|v| v.parse().ok()).expect("evaluate_seconds= in the log line");
            (round, train + eval)
        })
        .collect()
}

/// Sanctum: a coordinator and four nodes as processes over loopback mutual TLS, one plan.
fn sanctum(model: &Model) -> (Overheads, f64) {
    let c = Consortium::new();
    // With SANCTUM_BENCH_LOGS, the logs say when each step of a round happened.
    let logs = std::env::var_os("SANCTUM_BENCH_LOGS").is_some();
    let env: &[(&str, &str)] =
        if logs { &[("RUST_LOG", "info,sanctum_node=debug,sanctum_coordinator=debug")] } else { &[] };
    let coord = CoordinatorProcess::start_with(&c, env);
    let policy = "allowed_models = [\"logistic_regression\", \"mlp\"]\n";
    let nodes: Vec<NodeProcess> = HOSPITALS
        .iter()
        .map(|h| {
            let datasets = format!("[[datasets]]\nschema = {HEART_SCHEMA:?}\npath = {:?}\n", heart_data(h));
            NodeProcess::start_with_datasets_env(&c, h, &coord.address(), &datasets, policy, env)
        })
        .collect();
    coord.wait_for_nodes(HOSPITALS.len());
    let plan = format!(
        "name = \"rounds\"\nrounds = {ROUNDS}\nmin_nodes = {}\nround_deadline_secs = 120\nrecruit_deadline_secs = 60\n\
         [model]\n{}\n[data]\nschema = \"heart_disease\"\nschema_sha256 = \"{HEART_SCHEMA_SHA256}\"\n\
         [local]\nsteps = {STEPS}\nbatch_size = {BATCH}\nlearning_rate = {LEARNING_RATE}\n[strategy]\nkind = \"fedavg\"\n",
        HOSPITALS.len(),
        model.plan
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let started = Instant::now();
    let closed: Vec<(u32, f64)> = rt.block_on(async {
        let mut lead = lead_client(&c, &coord).await;
        let (_, mut events) = submit_and_watch(&mut lead, plan).await;
        let mut closed = vec![];
        loop {
            match next_event(&mut events, 300, "the benchmark's plan stalled").await.kind {
                Some(Kind::RoundClosed(r)) => {
                    assert_eq!(r.reported.len(), HOSPITALS.len(), "round {} closed without every node", r.round);
                    closed.push((r.round, started.elapsed().as_secs_f64()));
                }
                Some(Kind::PlanFinished(f)) => {
                    assert!(f.success, "the benchmark's plan failed: {}", f.reason);
                    break closed;
                }
                _ => {}
            }
        }
    });
    let total = started.elapsed().as_secs_f64();
    // The nodes log the round before they upload it, so every line is written by now.
    let works: Vec<Vec<(u32, f64)>> = nodes.iter().map(|n| node_work(&n.log)).collect();
    let ends = closed
        .into_iter()
        .map(|(round, end)| {
            let work = works
                .iter()
                .map(|w| w.iter().find(|(r, _)| *r == round).map(|(_, s)| *s).expect("every node logged the round"))
                .fold(0.0, f64::max);
            RoundEnd { round, end, work }
        })
        .collect();
    // SANCTUM_BENCH_LOGS=DIR keeps the run's logs, to see where a round's time goes.
    if let Some(dir) = std::env::var_os("SANCTUM_BENCH_LOGS") {
        let dir = Path::new(&dir).join(model.flower.0);
        std::fs::create_dir_all(&dir).expect("log directory");
        std::fs::copy(&coord.log, dir.join("coordinator.log")).expect("copy the coordinator's log");
        for (h, n) in HOSPITALS.iter().zip(&nodes) {
            std::fs::copy(&n.log, dir.join(format!("{h}.log"))).expect("copy a node's log");
        }
    }
    drop(nodes);
    (overheads(ends), total)
}

/// Flower on `engine`, through `scripts/bench-peers/flower_rounds.py`; None when the peers'
/// Python is not set.
fn flower(model: &Model, engine: &str) -> Option<(Overheads, f64)> {
    let python = std::env::var_os("SANCTUM_PEERS_PYTHON")?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let data: Vec<String> = HOSPITALS.iter().map(|h| heart_data(h).display().to_string()).collect();
    let config = serde_json::json!({
        "model": model.flower.0, "inputs": 13, "hidden": model.flower.1, "rounds": ROUNDS,
        "nodes": HOSPITALS.len(), "steps": STEPS, "batch": BATCH, "lr": LEARNING_RATE, "data": data,
    });
    let dir = tempfile::tempdir().expect("temp dir");
    let (out, log) = (dir.path().join("result.json"), dir.path().join("flower.log"));
    let started = Instant::now();
    let status = Command::new(python)
        .arg(root.join("scripts/bench-peers/flower_rounds.py"))
        .args(["--engine", engine, "--config", &config.to_string(), "--out"])
        .arg(&out)
        .env_remove("LD_LIBRARY_PATH")
        .stdout(std::fs::File::create(&log).expect("log file"))
        .stderr(std::fs::File::create(dir.path().join("flower.err")).expect("log file"))
        .status()
        .expect("run flower_rounds.py");
    if !status.success() {
        let err = std::fs::read_to_string(dir.path().join("flower.err")).unwrap_or_default();
        let tail: String =
            err.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
        panic!("Flower's {engine} engine failed ({status}); the end of its output:\n{tail}");
    }
    let total = started.elapsed().as_secs_f64();
    let result: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).expect("Flower's result")).expect("JSON");
    let ends = result["rounds"]
        .as_array()
        .expect("rounds")
        .iter()
        .inspect(|r| {
            assert_eq!(
                r["replies"].as_u64(),
                Some(HOSPITALS.len() as u64),
                "a Flower round without every hospital's reply: {r}"
            );
        })
        .map(|r| RoundEnd {
            round: r["round"].as_u64().expect("round") as u32,
            end: r["end"].as_f64().expect("end"),
            work: r["work"].as_f64().expect("work"),
        })
        .collect();
    Some((overheads(ends), total))
}

fn main() {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut rows = vec![];
    // SANCTUM_BENCH_MODELS=lr or =mlp runs one model only (to profile it).
    let only = std::env::var("SANCTUM_BENCH_MODELS").ok();
    for model in MODELS.iter().filter(|m| only.as_deref().is_none_or(|o| o.split(',').any(|n| n == m.flower.0))) {
        eprintln!("rounds: Sanctum, {}", model.label);
        let ours = sanctum(model);
        let mut theirs = vec![];
        for engine in ["deployment", "simulation"] {
            eprintln!("rounds: Flower {engine}, {}", model.label);
            theirs.push((engine, flower(model, engine)));
            std::thread::sleep(Duration::from_secs(1));
        }
        rows.push((model, ours, theirs));
    }
    println!("<!-- flower:begin -->");
    println!(
        "`cargo bench -p sanctum-tests --bench rounds`, {cores} cores, {} hospitals, {ROUNDS} rounds of \
         {STEPS} local step at batch {BATCH}, one libtorch/PyTorch thread per hospital. Sanctum: one \
         `sanctum-coordinator serve` and four `sanctum-node run` processes over loopback mutual TLS 1.3. \
         Flower 1.42.0: its deployment engine (`flower-superlink` and four `flower-supernode` processes, \
         `flwr run`, insecure gRPC, which favours it) and its simulation engine (`run_simulation`, Ray, \
         the four virtual nodes at once on the {cores} cores), with Flower's own `FedAvg`. A round's wall time is the time between two \
         consecutive round ends at the server; the local work is each hospital's own timing of building \
         the received model, evaluating it and the local step; overhead = wall − the slowest hospital's \
         local work, over rounds 2–{ROUNDS}, median (mean). Goal: Sanctum ≤ {GOAL_MS:.0} ms per round and \
         below Flower's simulation engine.\n",
        HOSPITALS.len()
    );
    println!(
        "| model | system | round wall, ms | slowest local work, ms | overhead, ms | Flower's overhead / ours | Flower's wall / ours | whole run, s¹ |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut verdicts = vec![];
    for (model, (ours, ours_total), theirs) in &rows {
        let o = median(&ours.overhead_ms);
        println!(
            "| {} | Sanctum (mTLS processes) | {:.1} | {:.1} | **{:.1}** ({:.1}) | 1 | 1 | {:.1} |",
            model.label,
            median(&ours.wall_ms),
            median(&ours.work_ms),
            o,
            mean(&ours.overhead_ms),
            ours_total
        );
        let mut below_simulation = None;
        for (engine, result) in theirs {
            match result {
                Some((t, total)) => {
                    let to = median(&t.overhead_ms);
                    println!(
                        "| {} | Flower {engine} engine | {:.1} | {:.1} | {:.1} ({:.1}) | {:.1}× | {:.1}× | {:.1} |",
                        model.label,
                        median(&t.wall_ms),
                        median(&t.work_ms),
                        to,
                        mean(&t.overhead_ms),
                        to / o,
                        median(&t.wall_ms) / median(&ours.wall_ms),
                        total
                    );
                    if *engine == "simulation" {
                        below_simulation = Some(o < to);
                    }
                }
                None => println!(
                    "| {} | Flower {engine} engine | not run: SANCTUM_PEERS_PYTHON unset | | | | |",
                    model.label
                ),
            }
        }
        let goal = if o <= GOAL_MS { "met" } else { "missed" };
        let sim = match below_simulation {
            Some(true) => "below Flower's simulation engine: met",
            Some(false) => "below Flower's simulation engine: missed",
            None => "Flower not run",
        };
        verdicts.push(format!("{}: {o:.1} ms ≤ {GOAL_MS:.0} ms: {goal}; {sim}.", model.label));
    }
    println!(
        "\n¹ Not comparable between the systems: Sanctum's from the plan's submission to its end, with \
         the coordinator and nodes already running; Flower's the whole `flower_rounds.py`, its \
         processes' and Ray's start-up included. Each side's local work is its own code's timing \
         (Sanctum's builds the model twice, for the evaluation and the step, and computes the update); \
         the wall-time ratio compares the rounds without subtracting either.\n"
    );
    for v in verdicts {
        println!("- {v}");
    }
    println!("<!-- flower:end -->");
}
