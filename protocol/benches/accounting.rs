//! The PLD accountant against Google's dp_accounting, measured side by side in one run (`cargo
//! bench -p sanctum-protocol --bench accounting`): ε for a grid of (q, σ, T, δ) and the noise
//! multiplier for a target ε, ours in this process and dp_accounting's `PLDAccountant` at the same
//! discretisation interval in `scripts/bench-peers/accounting.py`, run here as a subprocess with
//! the Python named by `SANCTUM_PEERS_PYTHON` (default `~/.cache/sanctum/peers/bin/python`). Then
//! the accounting a DP simulation of `examples/heart_disease/fedavg_dp1.toml` does, by the same
//! calls its nodes make.
//!
//! Goals (printed, never asserted; shared machines are noisy): ≥ 10× faster than dp_accounting
//! with ε within 0.1 %, and under 1 s of accounting for a DP simulation. Prints one markdown
//! block between `<!-- accounting:begin -->` and `<!-- accounting:end -->` for BENCHMARKS.md.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use sanctum_protocol::privacy::{self, Accountant, SampledGaussian, pld};

/// Repetitions per point, ours and dp_accounting's; each time is their median.
const REPEATS: usize = 5;
const PEER_REPEATS: usize = 3;
/// A dp_accounting point slower than this is timed once (its median is that run).
const PEER_MAX_SECONDS: f64 = 10.0;
const DELTA: f64 = 1e-5;
/// `noise_for_epsilon` stops when its bracket is within this fraction of its upper end.
const CALIBRATION_TOLERANCE: f64 = 1e-3;
const GOAL_SPEEDUP: f64 = 10.0;
const GOAL_RELATIVE: f64 = 1e-3;
const GOAL_SIMULATION_SECONDS: f64 = 1.0;

fn median_seconds<T>(repeats: usize, mut f: impl FnMut() -> T) -> (T, f64) {
    let t0 = Instant::now();
    let mut out = f();
    let mut times = vec![t0.elapsed().as_secs_f64()];
    for _ in 1..repeats {
        let t0 = Instant::now();
        out = f();
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    (out, times[times.len() / 2])
}

struct EpsRow {
    q: f64,
    sigma: f64,
    steps: u64,
    ours: f64,
    ours_s: f64,
    peer: Option<(f64, f64)>,
    skipped: Option<String>,
}

struct CalRow {
    target: f64,
    q: f64,
    steps: u64,
    ours: f64,
    ours_s: f64,
    peer: Option<(f64, f64)>,
    skipped: Option<String>,
}

fn peers_python() -> PathBuf {
    if let Some(p) = std::env::var_os("SANCTUM_PEERS_PYTHON") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache/sanctum/peers/bin/python")
}

/// Runs the peer script on the grid; each JSON line it prints, or why there are none.
fn run_peer(spec: &serde_json::Value) -> Result<Vec<serde_json::Value>, String> {
    let python = peers_python();
    if !python.exists() {
        return Err(format!(
            "no peers Python at {} (set SANCTUM_PEERS_PYTHON, or create the venv with dp-accounting 0.6.0 as the scripts/bench setup does); dp_accounting's columns are empty",
            python.display()
        ));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/bench-peers/accounting.py");
    let mut child = Command::new(&python)
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot run {} {}: {e}", python.display(), script.display()))?;
    child
        .stdin
        .take()
        .ok_or("the peer script has no stdin")?
        .write_all(spec.to_string().as_bytes())
        .map_err(|e| format!("cannot write the grid to the peer script: {e}"))?;
    let mut rows = Vec::new();
    let stdout = child.stdout.take().ok_or("the peer script has no stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line.map_err(|e| format!("reading the peer script's output: {e}"))?;
        eprintln!("dp_accounting: {line}");
        match serde_json::from_str(&line) {
            Ok(v) => rows.push(v),
            Err(e) => return Err(format!("the peer script printed a line that is not JSON ({e}): {line}")),
        }
    }
    let status = child.wait().map_err(|e| format!("waiting for the peer script: {e}"))?;
    if !status.success() {
        return Err(format!(
            "the peer script exited with {status} (is dp-accounting installed in {}?)",
            python.display()
        ));
    }
    Ok(rows)
}

fn same(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * a.abs().max(b.abs())
}

/// dp_accounting's (value, seconds) for a row, or its reason for skipping it.
fn peer_value(row: &serde_json::Value, key: &str) -> Result<(f64, f64), String> {
    if let Some(reason) = row.get("skipped").and_then(|s| s.as_str()) {
        return Err(reason.to_owned());
    }
    match (row.get(key).and_then(|v| v.as_f64()), row.get("seconds").and_then(|v| v.as_f64())) {
        (Some(v), Some(s)) => Ok((v, s)),
        _ => Err(format!("no {key} in the peer's line {row}")),
    }
}

fn relative(ours: f64, peer: f64) -> f64 {
    (ours - peer) / peer
}

/// The train rows of one of the example's hospital tables (its `split` column).
fn train_rows(csv: &Path) -> Result<usize, String> {
    let text = std::fs::read_to_string(csv).map_err(|e| format!("{}: {e}", csv.display()))?;
    let mut lines = text.lines();
    let header = lines.next().ok_or_else(|| format!("{} is empty", csv.display()))?;
    let split =
        header.split(',').position(|c| c == "split").ok_or_else(|| format!("{} has no split column", csv.display()))?;
    Ok(lines.filter(|l| l.split(',').nth(split) == Some("train")).count())
}

struct SimulationAccounting {
    plan: String,
    hospitals: Vec<(String, f64, f64)>,
}

/// What each node of a simulation of the example-level DP plan computes, by the calls
/// `sanctum-node` makes (node/src/admission.rs, node/src/budget.rs): the noise multiplier for the
/// plan's target ε (`noise_for_epsilon`, PLD), the plan's ε at that noise (`epsilon_with`), and
/// after every round the run's ε so far (`epsilon_with` at rounds × local steps).
fn simulation_accounting() -> Result<SimulationAccounting, String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/heart_disease");
    let plan_path = dir.join("fedavg_dp1.toml");
    let text = std::fs::read_to_string(&plan_path).map_err(|e| format!("{}: {e}", plan_path.display()))?;
    let plan: toml::Table = toml::from_str(&text).map_err(|e| format!("{}: {e}", plan_path.display()))?;
    let int = |v: Option<&toml::Value>| v.and_then(toml::Value::as_integer).map(|i| i as u64);
    let float = |v: Option<&toml::Value>| v.and_then(toml::Value::as_float);
    let bad = || format!("{} lacks rounds, local.steps, local.batch_size or privacy", plan_path.display());
    let rounds = int(plan.get("rounds")).ok_or_else(bad)?;
    let local_steps = int(plan.get("local").and_then(|l| l.get("steps"))).ok_or_else(bad)?;
    let batch = int(plan.get("local").and_then(|l| l.get("batch_size"))).ok_or_else(bad)?;
    let target = float(plan.get("privacy").and_then(|p| p.get("target_epsilon"))).ok_or_else(bad)?;
    let delta = float(plan.get("privacy").and_then(|p| p.get("delta"))).ok_or_else(bad)?;
    let hospitals =
        plan.get("simulation").and_then(|s| s.get("hospitals")).and_then(toml::Value::as_array).ok_or_else(bad)?;
    let mut out = Vec::new();
    for h in hospitals {
        let name = h.get("name").and_then(toml::Value::as_str).ok_or_else(bad)?.to_owned();
        let data = h.get("data").and_then(toml::Value::as_str).ok_or_else(bad)?;
        let rows = train_rows(&dir.join(data))?;
        let q = (batch as f64 / rows as f64).min(1.0);
        let steps = rounds * local_steps;
        let t0 = Instant::now();
        let sigma = privacy::noise_for_epsilon(Accountant::Pld, target, q, steps, delta).map_err(|e| e.to_string())?;
        let mut run = SampledGaussian { sampling_rate: q, noise_multiplier: sigma, steps };
        privacy::epsilon_with(Accountant::Pld, &run, delta).map_err(|e| e.to_string())?;
        for r in 1..=rounds {
            run.steps = r * local_steps;
            privacy::epsilon_with(Accountant::Pld, &run, delta).map_err(|e| e.to_string())?;
        }
        out.push((name, q, t0.elapsed().as_secs_f64()));
    }
    let plan = format!(
        "{} ({} hospitals, {rounds} rounds × {local_steps} steps, target ε = {target}, δ = {delta:e})",
        plan_path.strip_prefix(Path::new(env!("CARGO_MANIFEST_DIR")).join("..")).unwrap_or(&plan_path).display(),
        out.len()
    );
    Ok(SimulationAccounting { plan, hospitals: out })
}

fn fmt_s(s: f64) -> String {
    if s < 1.0 { format!("{:.1} ms", s * 1e3) } else { format!("{s:.2} s") }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let d = pld::Discretisation::default();
    eprintln!("accounting: PLD at interval {:e}, {cores} core(s); ours first, then dp_accounting", d.interval);

    let mut eps_rows = Vec::new();
    for q in [0.001, 0.01, 0.1] {
        for sigma in [0.8, 1.0, 2.0] {
            for steps in [100u64, 1000, 10000] {
                let run = SampledGaussian { sampling_rate: q, noise_multiplier: sigma, steps };
                let (ours, ours_s) = median_seconds(REPEATS, || privacy::epsilon_with(Accountant::Pld, &run, DELTA));
                let ours = ours?;
                eprintln!("ours: q={q} σ={sigma} T={steps}: ε={ours:.6} in {}", fmt_s(ours_s));
                eps_rows.push(EpsRow { q, sigma, steps, ours, ours_s, peer: None, skipped: None });
            }
        }
    }
    let mut cal_rows = Vec::new();
    for (q, steps) in [(0.01, 1000u64), (0.001, 10000)] {
        for target in [1.0, 3.0, 8.0] {
            let (ours, ours_s) =
                median_seconds(REPEATS, || privacy::noise_for_epsilon(Accountant::Pld, target, q, steps, DELTA));
            let ours = ours?;
            eprintln!("ours: ε={target} q={q} T={steps}: σ={ours:.6} in {}", fmt_s(ours_s));
            cal_rows.push(CalRow { target, q, steps, ours, ours_s, peer: None, skipped: None });
        }
    }
    let sim = simulation_accounting();

    // dp_accounting's calibration is Brent's method to an absolute tolerance in σ: ours is 10⁻³
    // of the answer, so it is given 10⁻³ of our σ; its bracket starts where ours does.
    let spec = serde_json::json!({
        "interval": d.interval,
        "repeats": PEER_REPEATS,
        "max_seconds": PEER_MAX_SECONDS,
        "epsilon": eps_rows.iter().map(|r| serde_json::json!([r.q, r.sigma, r.steps, DELTA])).collect::<Vec<_>>(),
        "calibration": cal_rows.iter().map(|r| serde_json::json!([
            r.target, r.q, r.steps, DELTA,
            sanctum_protocol::plan::limits::MIN_NOISE_MULTIPLIER, CALIBRATION_TOLERANCE * r.ours,
        ])).collect::<Vec<_>>(),
    });
    let peer_note = match run_peer(&spec) {
        Ok(lines) => {
            for r in &mut eps_rows {
                let line = lines.iter().find(|l| {
                    l["kind"] == "epsilon"
                        && l["q"].as_f64().is_some_and(|v| same(v, r.q))
                        && l["sigma"].as_f64().is_some_and(|v| same(v, r.sigma))
                        && l["steps"].as_u64() == Some(r.steps)
                });
                match line.map(|l| peer_value(l, "epsilon")) {
                    Some(Ok(v)) => r.peer = Some(v),
                    Some(Err(why)) => r.skipped = Some(why),
                    None => r.skipped = Some("the peer script printed no line for it".into()),
                }
            }
            for r in &mut cal_rows {
                let line = lines.iter().find(|l| {
                    l["kind"] == "calibration"
                        && l["target_epsilon"].as_f64().is_some_and(|v| same(v, r.target))
                        && l["q"].as_f64().is_some_and(|v| same(v, r.q))
                        && l["steps"].as_u64() == Some(r.steps)
                });
                match line.map(|l| peer_value(l, "noise_multiplier")) {
                    Some(Ok(v)) => r.peer = Some(v),
                    Some(Err(why)) => r.skipped = Some(why),
                    None => r.skipped = Some("the peer script printed no line for it".into()),
                }
            }
            None
        }
        Err(why) => {
            eprintln!("accounting: {why}");
            Some(why)
        }
    };

    let mut worst_rel = 0.0f64;
    let mut slowest_speedup = f64::INFINITY;
    println!("<!-- accounting:begin -->");
    println!(
        "PLD accountant, Poisson-subsampled Gaussian, interval {:e}, against dp_accounting 0.6.0's `PLDAccountant` (add-or-remove, connect-the-dots, pessimistic) at the same interval, measured in the same run on {cores} core(s) (ours computes the remove and add relations on two threads, dp_accounting on one); times are medians of {REPEATS} (ours) and {PEER_REPEATS} (dp_accounting; once if over {PEER_MAX_SECONDS} s).",
        d.interval
    );
    if let Some(why) = &peer_note {
        println!();
        println!("**dp_accounting not measured**: {why}");
    }
    println!();
    println!(
        "| q | σ | T | δ | ε (ours) | ε (dp-accounting) | relative difference | time ours | time dp-accounting | speed-up |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &eps_rows {
        let (peer_eps, rel, peer_t, speedup) = match (r.peer, &r.skipped) {
            (Some((e, s)), _) => {
                let rel = relative(r.ours, e);
                worst_rel = worst_rel.max(rel.abs());
                slowest_speedup = slowest_speedup.min(s / r.ours_s);
                (format!("{e:.6}"), format!("{:+.1e} %", rel * 100.0), fmt_s(s), format!("{:.1}×", s / r.ours_s))
            }
            (None, Some(why)) => (format!("skipped: {why}"), "–".into(), "–".into(), "–".into()),
            (None, None) => ("–".into(), "–".into(), "–".into(), "–".into()),
        };
        println!(
            "| {} | {} | {} | {:e} | {:.6} | {peer_eps} | {rel} | {} | {peer_t} | {speedup} |",
            r.q,
            r.sigma,
            r.steps,
            DELTA,
            r.ours,
            fmt_s(r.ours_s)
        );
    }
    println!();
    println!(
        "Noise multiplier for a target ε (δ = {DELTA:e}): ours `noise_for_epsilon` (to {CALIBRATION_TOLERANCE} of σ, safe side), dp_accounting's `calibrate_dp_mechanism` (tol = {CALIBRATION_TOLERANCE} × our σ, bracket from {}).",
        sanctum_protocol::plan::limits::MIN_NOISE_MULTIPLIER
    );
    println!();
    println!(
        "| target ε | q | T | σ (ours) | σ (dp-accounting) | relative difference | time ours | time dp-accounting | speed-up |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut worst_cal_rel = 0.0f64;
    for r in &cal_rows {
        let (peer_sigma, rel, peer_t, speedup) = match (r.peer, &r.skipped) {
            (Some((v, s)), _) => {
                let rel = relative(r.ours, v);
                worst_cal_rel = worst_cal_rel.max(rel.abs());
                slowest_speedup = slowest_speedup.min(s / r.ours_s);
                (format!("{v:.5}"), format!("{:+.4} %", rel * 100.0), fmt_s(s), format!("{:.1}×", s / r.ours_s))
            }
            (None, Some(why)) => (format!("skipped: {why}"), "–".into(), "–".into(), "–".into()),
            (None, None) => ("–".into(), "–".into(), "–".into(), "–".into()),
        };
        println!(
            "| {} | {} | {} | {:.5} | {peer_sigma} | {rel} | {} | {peer_t} | {speedup} |",
            r.target,
            r.q,
            r.steps,
            r.ours,
            fmt_s(r.ours_s)
        );
    }
    println!();
    if peer_note.is_none() && slowest_speedup.is_infinite() {
        // Every dp_accounting row skipped: nothing compared, so no goal is judged.
        println!("No grid point was measured on both sides: the goals are not judged.");
    } else if peer_note.is_none() {
        let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
        println!(
            "Worst relative difference in ε: {:.1e} % (goal ≤ {} %: {}); in σ: {:.4} % (the calibrations' tolerance is {} %). Slowest speed-up: {slowest_speedup:.1}× (goal ≥ {GOAL_SPEEDUP}×: {}).",
            worst_rel * 100.0,
            GOAL_RELATIVE * 100.0,
            verdict(worst_rel <= GOAL_RELATIVE),
            worst_cal_rel * 100.0,
            CALIBRATION_TOLERANCE * 100.0,
            verdict(slowest_speedup >= GOAL_SPEEDUP)
        );
    }
    println!();
    match sim {
        Ok(sim) => {
            let total: f64 = sim.hospitals.iter().map(|h| h.2).sum();
            let slowest = sim.hospitals.iter().map(|h| h.2).fold(0.0, f64::max);
            let each: Vec<String> =
                sim.hospitals.iter().map(|(n, q, s)| format!("{n} (q = {q:.4}) {}", fmt_s(*s))).collect();
            println!(
                "A DP simulation of {}: accounting per hospital (noise for the target, the plan's ε, the ε after each round) {}; slowest hospital {}, all hospitals one after another {} (goal < {GOAL_SIMULATION_SECONDS} s: {}).",
                sim.plan,
                each.join(", "),
                fmt_s(slowest),
                fmt_s(total),
                if total < GOAL_SIMULATION_SECONDS { "met" } else { "NOT met" }
            );
        }
        Err(e) => println!("A DP simulation's accounting was not measured: {e}"),
    }
    println!("<!-- accounting:end -->");
    Ok(())
}
