//! Two plans run at once on the same four hospitals (submitted together from the lead's CLI)
//! and both finish, each with the accuracy it reaches when it runs alone; two DP plans at once
//! are each charged to their own run in every hospital's ledger, each round once.
//!
//! The accuracy is compared on plans without DP: their training is a function of the plan's
//! seed (the batch order of each node and round), so a plan run alone and the same plan run
//! beside another must reach the same model up to the order in which the coordinator sums the
//! updates. DP-SGD draws its noise and batches from the OS by design, so no DP run is
//! reproducible; the DP pair shows the ledger side.

#![allow(clippy::expect_used, clippy::panic)] // test helpers: a failed step is a failed test

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use sanctum_tests::runs::{FinalAccuracy, lead_config, lead_json};
use sanctum_tests::{Consortium, CoordinatorProcess, NodeProcess, bin, heart_data};

const HOSPITALS: [&str; 4] = ["cleveland", "hungarian", "switzerland", "va"];
const ROUNDS: u32 = 5;

fn plan(name: &str, seed: u64, learning_rate: f64, dp: bool) -> String {
    let privacy =
        if dp { "[privacy]\nmode = \"example\"\nnoise_multiplier = 1.0\nclip_norm = 1.0\ndelta = 1e-5\n" } else { "" };
    format!(
        "name = \"{name}\"\nrounds = {ROUNDS}\nmin_nodes = 4\nrecruit_deadline_secs = 60\nround_deadline_secs = 120\nseed = {seed}\n\
    [model]\nkind = \"logistic_regression\"\ninputs = 13\n[data]\nschema = \"heart_disease\"\nschema_sha256 = \"39f2b3691b732094488517b366f5bb898ffb1d537dae5f6f2fc1b24c7f225688\"\n\
    [local]\nsteps = 30\nbatch_size = 8\nlearning_rate = {learning_rate}\n[strategy]\nkind = \"fedavg\"\n{privacy}"
    )
}

fn write_plan(c: &Consortium, name: &str, seed: u64, learning_rate: f64, dp: bool) -> PathBuf {
    let path = c.dir.path().join(format!("{name}.toml"));
    std::fs::write(&path, plan(name, seed, learning_rate, dp)).expect("plan");
    path
}

/// `plan submit` from the lead's CLI, which follows the run to its end; the run id it printed.
fn submit(lead: &Path, plan: &Path, again: bool) -> (Child, String) {
    let mut cmd = Command::new(bin("sanctum-coordinator"));
    cmd.args(["plan", "submit", "--config"]).arg(lead).arg("--plan").arg(plan);
    if again {
        cmd.arg("--again");
    }
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn plan submit");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("stdout")).read_line(&mut line).expect("read");
    // "plan 'NAME' submitted: PLAN_ID (run N, RUN_ID)"
    let run = line.trim().strip_suffix(')').and_then(|l| l.rsplit(", ").next()).map(str::to_string);
    (child, run.unwrap_or_else(|| panic!("plan submit printed {line:?}")))
}

/// Waits for the CLI following `run` to exit, insisting the run succeeded.
fn finished(child: Child, run: &str, lead: &Path, coord: &CoordinatorProcess, nodes: &[NodeProcess]) {
    let out = child.wait_with_output().expect("plan submit");
    if !out.status.success() {
        let node_logs: String = nodes
            .iter()
            .flat_map(|n| {
                n.log_text()
                    .lines()
                    .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                    .map(|l| format!("{}: {l}\n", n.config.display()))
                    .collect::<Vec<_>>()
            })
            .collect();
        panic!(
            "run {run} did not succeed ({}):\nstdout: {}\nstderr: {}\ncoordinator:\n{}\nnode warnings:\n{node_logs}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            coord.log_text()
        );
    }
    let status = lead_json(lead, &["plan", "status", run]);
    assert_eq!((&status["status"], &status["rounds_completed"]), (&"succeeded".into(), &ROUNDS.into()), "{status}");
}

#[test]
fn two_plans_at_once_on_four_hospitals_finish_with_the_accuracy_each_reaches_alone() {
    let c = Consortium::new();
    let coord = CoordinatorProcess::start(&c);
    let addr = coord.address();
    let nodes: Vec<NodeProcess> =
        HOSPITALS.iter().map(|n| NodeProcess::start_serving(&c, n, &addr, &heart_data(n), "")).collect();
    coord.wait_for_nodes(HOSPITALS.len());
    let lead = lead_config(&c, &addr);
    let a = write_plan(&c, "concurrent-a", 11, 0.05, false);
    let b = write_plan(&c, "concurrent-b", 23, 0.02, false);

    // Both at once, from two CLI processes started together.
    let started = Instant::now();
    let (cli_a, run_a) = submit(&lead, &a, false);
    let (cli_b, run_b) = submit(&lead, &b, false);
    let listed = lead_json(&lead, &["plan", "list"]);
    let running: Vec<&str> = listed
        .as_array()
        .expect("plan list")
        .iter()
        .filter(|p| p["status"] == "running")
        .filter_map(|p| p["run"].as_str())
        .collect();
    println!("running together: {running:?}");
    assert!(running.contains(&run_a.as_str()) && running.contains(&run_b.as_str()), "{listed}");
    finished(cli_a, &run_a, &lead, &coord, &nodes);
    finished(cli_b, &run_b, &lead, &coord, &nodes);
    println!("both finished in {:.1} s", started.elapsed().as_secs_f64());
    let together = [FinalAccuracy::of_run(&lead, &run_a), FinalAccuracy::of_run(&lead, &run_b)];

    // Each alone: the same plans again (same seeds, same hospitals), one after the other.
    let mut alone = Vec::new();
    for p in [&a, &b] {
        let t = Instant::now();
        let (cli, run) = submit(&lead, p, true);
        finished(cli, &run, &lead, &coord, &nodes);
        println!("{} alone in {:.1} s", p.display(), t.elapsed().as_secs_f64());
        alone.push(FinalAccuracy::of_run(&lead, &run));
    }
    for ((name, t), a) in ["concurrent-a", "concurrent-b"].iter().zip(&together).zip(&alone) {
        let difference = t.max_difference(a);
        println!(
            "{name}: accuracy together {:.4} {:?}, alone {:.4} {:?}, largest difference {difference:.6}",
            t.weighted, t.per_node, a.weighted, a.per_node
        );
        assert!(difference <= 0.01, "{name}: run beside another plan, its accuracy differs by {difference}");
    }
    assert!(
        (together[0].weighted - together[1].weighted).abs() > 0.0 || together[0].per_node != together[1].per_node,
        "the two plans are different plans: {together:?}"
    );
}

#[test]
fn two_dp_plans_at_once_are_each_charged_to_their_own_run_each_round_once() {
    let c = Consortium::new();
    let coord = CoordinatorProcess::start(&c);
    let addr = coord.address();
    let nodes: Vec<NodeProcess> =
        HOSPITALS.iter().map(|n| NodeProcess::start_serving(&c, n, &addr, &heart_data(n), "")).collect();
    coord.wait_for_nodes(HOSPITALS.len());
    let lead = lead_config(&c, &addr);
    let a = write_plan(&c, "concurrent-dp-a", 11, 0.05, true);
    let b = write_plan(&c, "concurrent-dp-b", 23, 0.02, true);
    let started = Instant::now();
    let (cli_a, run_a) = submit(&lead, &a, false);
    let (cli_b, run_b) = submit(&lead, &b, false);
    finished(cli_a, &run_a, &lead, &coord, &nodes);
    finished(cli_b, &run_b, &lead, &coord, &nodes);
    println!("both DP plans finished in {:.1} s", started.elapsed().as_secs_f64());
    let plan_of = |run: &str| lead_json(&lead, &["plan", "status", run])["plan_id"].as_str().map(str::to_string);
    let (plan_a, plan_b) = (plan_of(&run_a).expect("plan id"), plan_of(&run_b).expect("plan id"));
    assert_ne!(plan_a, plan_b);
    for (node, name) in nodes.iter().zip(HOSPITALS) {
        let mut per_run: BTreeMap<(String, String), BTreeMap<u32, usize>> = BTreeMap::new();
        for charge in node.ledger() {
            let key = (charge.plan_id.clone(), charge.run.clone().unwrap_or_default());
            *per_run.entry(key).or_default().entry(charge.round).or_default() += 1;
        }
        println!("{name}: charges per (plan, run) and round {per_run:?}");
        let all: Vec<u32> = (1..=ROUNDS).collect();
        for (plan, run) in [(&plan_a, &run_a), (&plan_b, &run_b)] {
            let rounds = per_run
                .get(&(plan.clone(), run.clone()))
                .unwrap_or_else(|| panic!("{name}: nothing charged to run {run} of plan {plan}: {per_run:?}"));
            assert_eq!(rounds.keys().copied().collect::<Vec<_>>(), all, "{name}: run {run}");
            assert!(rounds.values().all(|&n| n == 1), "{name}: a round of run {run} charged twice: {rounds:?}");
        }
        assert_eq!(per_run.len(), 2, "{name}: charges under runs other than the two: {per_run:?}");
    }
}
