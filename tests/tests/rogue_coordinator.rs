//! A curious or malicious coordinator attacks a real hospital node (issue 9). Each test scripts
//! the directives a rogue coordinator, holding the consortium's real coordinator certificate,
//! sends down the node's directive stream, records everything the node sends back, then reads
//! the node's egress log and privacy ledger. What must hold, whatever the coordinator sends:
//! one charge per release, no round outside the plan, every run of a plan accounted in full and
//! capped with everything spent before, no evaluation of a model outside the plan's lineage, no
//! secure aggregation whose threshold lets two disjoint survivor sets each unmask, and no cell
//! value or header of the hospital's data in what leaves. In every test the releases counted in
//! the egress log equal the charges in the ledger.
//!
//! Each test gathers every broken promise before failing, so one run shows all of them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// Proto messages are built with `..Default::default()`: the protocol gains fields.
#![allow(clippy::needless_update)]

use std::path::Path;
use std::time::Duration;

use sanctum_protocol::hash::ContentHash;
use sanctum_protocol::plan::Plan;
use sanctum_protocol::proto::{self, PlanResponse};
use sanctum_tests::rogue::{Model, RogueCoordinator, Sent, WAIT, directives as d};
use sanctum_tests::{Consortium, NodeProcess, epsilon_by_run, heart_data};

/// An example-level DP plan: `fedavg_dp3.toml` cut to `rounds` rounds of `steps` DP-SGD steps, with
/// the noise calibrated by each node so the whole plan costs `epsilon` (δ = 1e-5).
fn dp_plan(name: &str, rounds: u32, steps: u32, epsilon: f64) -> String {
    format!(
        "name = \"{name}\"\nseed = 0\nrounds = {rounds}\nmin_nodes = 1\nround_deadline_secs = 300\nrecruit_deadline_secs = 60\n\
         [model]\nkind = \"logistic_regression\"\ninputs = 13\n[data]\nschema = \"heart_disease\"\nschema_sha256 = \"39f2b3691b732094488517b366f5bb898ffb1d537dae5f6f2fc1b24c7f225688\"\n\
         [local]\nsteps = {steps}\nbatch_size = 4\noptimizer = \"sgd\"\nlearning_rate = 0.01\n\
         [strategy]\nkind = \"fedavg\"\nweighting = \"samples\"\n\
         [privacy]\nmode = \"example\"\ntarget_epsilon = {epsilon:?}\ndelta = 1e-5\nclip_norm = 1.0\n"
    )
}

/// Every broken promise of one test, reported together.
#[derive(Default)]
struct Findings {
    failures: Vec<String>,
}

impl Findings {
    fn check(&mut self, ok: bool, what: impl Into<String>) {
        if !ok {
            self.failures.push(what.into());
        }
    }

    fn finish(self, context: impl FnOnce() -> String) {
        if !self.failures.is_empty() {
            let list: String = self.failures.iter().map(|f| format!("  - {f}\n")).collect();
            panic!("{} promise(s) broken:\n{list}\n{}", self.failures.len(), context());
        }
    }
}

/// A consortium, a rogue coordinator and the nodes connected to it. Fields drop in order: the
/// nodes are killed before the server stops and the PKI directory goes.
struct Scene {
    nodes: Vec<(String, NodeProcess)>,
    rogue: RogueCoordinator,
    c: Consortium,
}

impl Scene {
    async fn new() -> Self {
        let c = Consortium::new();
        let rogue = RogueCoordinator::start(&c).await;
        Self { nodes: Vec::new(), rogue, c }
    }

    /// Starts a node (`--exit-after-plan` unless `serving`) and waits until it subscribed.
    async fn add(&mut self, name: &str, data: &Path, policy: &str, serving: bool) {
        let addr = self.rogue.address();
        let node = if serving {
            NodeProcess::start_serving(&self.c, name, &addr, data, policy)
        } else {
            NodeProcess::start_with_policy(&self.c, name, &addr, data, policy)
        };
        self.nodes.push((name.to_string(), node));
        if let Err(e) = self.rogue.wait_connected(name, Duration::from_secs(90)).await {
            panic!("{e}\n{}", self.context());
        }
    }

    fn node(&self, name: &str) -> &NodeProcess {
        &self.nodes.iter().find(|(n, _)| n == name).expect("a node of this scene").1
    }

    /// Offers `plan` for `run` and returns the node's decision.
    async fn offer(&self, node: &str, plan: &str, run: &str) -> PlanResponse {
        let mark = self.rogue.mark();
        self.rogue.send(node, d::offer(plan, run));
        self.rogue
            .wait_decision(node, &d::plan_id(plan), run, mark, WAIT)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", self.context()))
    }

    /// Offers `plan` and insists the node accepts it (the attack comes after).
    async fn accept(&self, node: &str, plan: &str, run: &str) {
        let decision = self.offer(node, plan, run).await;
        if !decision.accept {
            panic!("fixture: {node} refused the plan ({}); it must accept it\n{}", decision.reason, self.context());
        }
    }

    async fn barrier(&self, node: &str) {
        if let Err(e) = self.rogue.barrier(node, WAIT).await {
            panic!("{e}\n{}", self.context());
        }
    }

    /// Closes the plan and waits for the `--exit-after-plan` node to exit, so everything it
    /// was going to send has been sent and its state directory is final.
    async fn close_and_wait_exit(&mut self, node: &str, plan_id: &str, run: &str) {
        self.rogue.send(node, d::plan_closed(plan_id, run, true));
        let i = self.nodes.iter().position(|(n, _)| n == node).expect("a node of this scene");
        let status = self.nodes[i].1.exited(WAIT).await;
        if status.is_none() {
            panic!("{node} did not exit after PlanClosed\n{}", self.context());
        }
    }

    /// What a failure message needs: what the rogue coordinator recorded, and each node's
    /// egress log, ledger and the tail of its own log.
    fn context(&self) -> String {
        let mut out = format!("--- rogue coordinator recorded\n{}", self.rogue.summary());
        for (name, node) in &self.nodes {
            let egress: String = node.egress().iter().map(|e| format!("  {}\n", e.raw)).collect();
            let ledger: String = node.ledger().iter().map(|c| format!("  {}\n", c.raw)).collect();
            let log = node.log_text();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: String = tail.into_iter().rev().map(|l| format!("  {l}\n")).collect();
            out.push_str(&format!(
                "--- {name}: egress log\n{egress}--- {name}: privacy ledger\n{ledger}--- {name}: log (tail)\n{tail}"
            ));
        }
        out
    }

    /// One charge per release: the egress log's new releases, the distinct payloads the rogue
    /// coordinator received and the ledger's charges are the same number.
    fn check_releases_match_charges(&self, f: &mut Findings, node: &str) {
        let p = self.node(node);
        let released = p.egress().iter().filter(|e| e.is_release()).count();
        let charges = p.ledger().len();
        let distinct = self.rogue.distinct_releases(node).len();
        f.check(
            released == charges,
            format!("{node}: {released} release(s) in the egress log, {charges} charge(s) in the ledger"),
        );
        f.check(
            distinct == charges,
            format!("{node}: {distinct} distinct payload(s) received, {charges} charge(s) in the ledger"),
        );
    }
}

const CLEVELAND: &str = "cleveland";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_start_round_ten_times_releases_one_update_and_one_charge() {
    let mut s = Scene::new().await;
    s.add(CLEVELAND, &heart_data(CLEVELAND), "max_epsilon = 10.0", false).await;
    let plan = dp_plan("rogue-repeat", 2, 5, 1.0);
    let id = d::plan_id(&plan);
    s.accept(CLEVELAND, &plan, "run-1").await;
    let model = s.rogue.register_initial_model(&plan, 0);
    let mark = s.rogue.mark();
    s.rogue.send(CLEVELAND, d::start_round(&id, "run-1", 1, &model));
    let first =
        s.rogue.wait_upload(CLEVELAND, &id, 1, mark, WAIT).await.unwrap_or_else(|e| panic!("{e}\n{}", s.context()));
    // The same directive nine more times, as a coordinator fishing for fresh noise would.
    for _ in 1..10 {
        s.rogue.send(CLEVELAND, d::start_round(&id, "run-1", 1, &model));
    }
    s.barrier(CLEVELAND).await;
    s.close_and_wait_exit(CLEVELAND, &id, "run-1").await;

    let mut f = Findings::default();
    let uploads: Vec<_> = s.rogue.uploads_since(CLEVELAND, mark).into_iter().filter(|u| u.header.round == 1).collect();
    let differing = uploads.iter().filter(|u| u.sha256 != first.sha256).count();
    println!("round 1 started 10 times: {} upload(s), {differing} with other bytes than the first", uploads.len());
    f.check(
        differing == 0,
        format!(
            "{} uploads for round 1, {differing} of them with other bytes than the first (fresh noise on a round already released)",
            uploads.len()
        ),
    );
    let charges: Vec<_> = s.node(CLEVELAND).ledger().into_iter().filter(|c| c.plan_id == id && c.round == 1).collect();
    f.check(charges.len() == 1, format!("{} ledger charges for (plan, run-1, round 1), want exactly 1", charges.len()));
    for c in &charges {
        f.check(
            c.run.as_deref().is_none_or(|r| r == "run-1"),
            format!("the round-1 charge names run {:?}, not run-1", c.run),
        );
    }
    s.check_releases_match_charges(&mut f, CLEVELAND);
    f.finish(|| s.context());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rounds_outside_one_to_the_plans_rounds_are_refused_with_nothing_sent_or_charged() {
    let mut s = Scene::new().await;
    s.add(CLEVELAND, &heart_data(CLEVELAND), "max_epsilon = 10.0", false).await;
    let rounds = 2;
    let plan = dp_plan("rogue-out-of-range", rounds, 5, 1.0);
    let id = d::plan_id(&plan);
    s.accept(CLEVELAND, &plan, "run-1").await;
    // Round 1 first: the node is live and trains a round inside the plan.
    let model = s.rogue.register_initial_model(&plan, 0);
    let mark = s.rogue.mark();
    s.rogue.send(CLEVELAND, d::start_round(&id, "run-1", 1, &model));
    s.rogue.wait_upload(CLEVELAND, &id, 1, mark, WAIT).await.unwrap_or_else(|e| panic!("{e}\n{}", s.context()));
    let next = s.rogue.register_initial_model(&plan, 1);
    let mark = s.rogue.mark();
    s.rogue.send(CLEVELAND, d::start_round(&id, "run-1", 0, &next));
    s.rogue.send(CLEVELAND, d::start_round(&id, "run-1", rounds + 1, &next));
    s.barrier(CLEVELAND).await;
    s.close_and_wait_exit(CLEVELAND, &id, "run-1").await;

    let mut f = Findings::default();
    for bad in [0, rounds + 1] {
        let sent: Vec<&'static str> = s
            .rogue
            .received()
            .into_iter()
            .filter(|r| r.node == CLEVELAND && r.seq >= mark)
            .filter(|r| match &r.message {
                Sent::Update(u) => u.header.round == bad,
                Sent::SecAgg(m) => m.round == bad,
                Sent::Evaluation(_) => true,
                _ => false,
            })
            .map(|r| r.message.call())
            .collect();
        f.check(sent.is_empty(), format!("round {bad} of a {rounds}-round plan: the node sent {sent:?}"));
        let charged = s.node(CLEVELAND).ledger().into_iter().filter(|c| c.round == bad).count();
        f.check(charged == 0, format!("round {bad} of a {rounds}-round plan: {charged} charge(s) in the ledger"));
    }
    s.check_releases_match_charges(&mut f, CLEVELAND);
    f.finish(|| s.context());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_run_twice_is_charged_twice_and_the_cap_refuses_the_run_that_would_exceed_it() {
    const GENEROUS: &str = "cleveland";
    const CAPPED: &str = "hungarian";
    // Each run costs ε ≈ 1 on either dataset; the capped node can afford one run, not two.
    let cap = 1.5;
    let mut s = Scene::new().await;
    s.add(GENEROUS, &heart_data(GENEROUS), "max_epsilon = 10.0", true).await;
    s.add(CAPPED, &heart_data(CAPPED), &format!("max_epsilon = {cap:?}"), true).await;
    let rounds = 2;
    let plan = dp_plan("rogue-rerun", rounds, 5, 1.0);
    let id = d::plan_id(&plan);
    let nodes = [GENEROUS, CAPPED];

    // Run 1, as a coordinator would run it.
    for n in nodes {
        s.accept(n, &plan, "run-1").await;
    }
    for round in 1..=rounds {
        let model = s.rogue.register_initial_model(&plan, u64::from(round));
        let mark = s.rogue.mark();
        for n in nodes {
            s.rogue.send(n, d::start_round(&id, "run-1", round, &model));
        }
        for n in nodes {
            s.rogue.wait_upload(n, &id, round, mark, WAIT).await.unwrap_or_else(|e| panic!("{e}\n{}", s.context()));
        }
    }
    for n in nodes {
        s.rogue.send(n, d::plan_closed(&id, "run-1", true));
    }
    let spent_run1 = epsilon_by_run(&s.node(CAPPED).ledger()).values().sum::<f64>();

    // Run 2: the very same plan text, a new run id.
    let mark = s.rogue.mark();
    let again_generous = s.offer(GENEROUS, &plan, "run-2").await;
    let again_capped = s.offer(CAPPED, &plan, "run-2").await;
    println!("{CAPPED} on run 2: accept={} reason={:?}", again_capped.accept, again_capped.reason);
    let mut f = Findings::default();
    f.check(again_generous.accept, format!("{GENEROUS} (cap 10) refused run 2: {}", again_generous.reason));
    for round in 1..=rounds {
        let model = s.rogue.register_initial_model(&plan, 100 + u64::from(round));
        let round_mark = s.rogue.mark();
        for n in nodes {
            s.rogue.send(n, d::start_round(&id, "run-2", round, &model));
        }
        if again_generous.accept {
            s.rogue
                .wait_upload(GENEROUS, &id, round, round_mark, WAIT)
                .await
                .unwrap_or_else(|e| panic!("{e}\n{}", s.context()));
        }
    }
    for n in nodes {
        s.barrier(n).await;
    }

    // The generous node: both runs in its ledger, run 2 charged in full.
    let ledger = s.node(GENEROUS).ledger();
    let of_plan: Vec<_> = ledger.iter().filter(|c| c.plan_id == id).collect();
    f.check(
        of_plan.len() == 2 * rounds as usize,
        format!(
            "{GENEROUS}: {} charges for the plan after two runs of {rounds} rounds, want {}",
            of_plan.len(),
            2 * rounds
        ),
    );
    for run in ["run-1", "run-2"] {
        let n = of_plan.iter().filter(|c| c.run.as_deref() == Some(run)).count();
        f.check(n == rounds as usize, format!("{GENEROUS}: {n} charges name {run}, want {rounds}"));
    }
    let runs = epsilon_by_run(&ledger);
    f.check(
        runs.len() == 2,
        format!("{GENEROUS}: the ledger holds {} run(s) of the plan, want 2: {runs:?}", runs.len()),
    );

    // The capped node: never past its cap, and the run that would exceed it refused (at the
    // offer, with the figures, or at the round that would cross the cap).
    let spent = epsilon_by_run(&s.node(CAPPED).ledger()).values().sum::<f64>();
    f.check(spent <= cap + 1e-9, format!("{CAPPED}: the ledger shows ε = {spent} spent, above its cap {cap}"));
    let released_in_run2 = s.rogue.uploads_since(CAPPED, mark).len();
    if again_capped.accept {
        // At most the rounds it could afford; here none (run 1 spent ≈ 1 of 1.5 and round 1 of
        // run 2 alone costs more than 0.5).
        f.check(
            released_in_run2 == 0,
            format!(
                "{CAPPED} accepted run 2 with ε = {spent_run1:.3} already spent of {cap} and released {released_in_run2} update(s) in it"
            ),
        );
    } else {
        let r = &again_capped.reason;
        f.check(
            r.contains("max_epsilon") && r.contains(&format!("{cap}")) && r.contains('ε'),
            format!("{CAPPED} refused run 2 without the figures (cap {cap}, ε spent): {r:?}"),
        );
        f.check(
            released_in_run2 == 0,
            format!("{CAPPED} refused run 2 but released {released_in_run2} update(s) in it"),
        );
    }
    for n in nodes {
        s.check_releases_match_charges(&mut f, n);
    }
    f.finish(|| s.context());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evaluation_of_a_model_outside_the_plans_lineage_is_refused() {
    let mut s = Scene::new().await;
    // Exact metrics allowed, so nothing but the lineage rule stands between the request and a
    // reply.
    s.add(CLEVELAND, &heart_data(CLEVELAND), "max_epsilon = 10.0\ntest_metrics = \"exact\"", false).await;
    let plan = dp_plan("rogue-evaluate", 2, 5, 1.0);
    let id = d::plan_id(&plan);
    s.accept(CLEVELAND, &plan, "run-1").await;
    let model = s.rogue.register_initial_model(&plan, 0);
    let mark = s.rogue.mark();
    s.rogue.send(CLEVELAND, d::start_round(&id, "run-1", 1, &model));
    s.rogue.wait_upload(CLEVELAND, &id, 1, mark, WAIT).await.unwrap_or_else(|e| panic!("{e}\n{}", s.context()));
    // A model the node can fetch that was never a round's model (a coordinator probing the test
    // split with a model of its choice), and a hash of nothing at all.
    let probe = s.rogue.register_initial_model(&plan, 987_654);
    assert_ne!(probe, model, "fixture: the probe must differ from the round's model");
    let nothing = Model { sha256: ContentHash::of(b"never a model of this plan").to_hex(), bytes: 1000 };
    s.rogue.send(CLEVELAND, d::evaluate(&id, "run-1", &probe));
    s.rogue.send(CLEVELAND, d::evaluate(&id, "run-1", &nothing));
    // The round's own model is of the lineage: answered, so the refusals above are not a node
    // that answers nothing.
    s.rogue.send(CLEVELAND, d::evaluate(&id, "run-1", &model));
    s.barrier(CLEVELAND).await;
    s.close_and_wait_exit(CLEVELAND, &id, "run-1").await;

    let mut f = Findings::default();
    let reports: Vec<proto::EvaluationReport> = s
        .rogue
        .from(CLEVELAND)
        .into_iter()
        .filter_map(|m| match m {
            Sent::Evaluation(e) => Some(e),
            _ => None,
        })
        .collect();
    f.check(
        reports.iter().any(|r| r.model_sha256 == model.sha256 && !r.metrics.is_empty()),
        "the evaluation of the round's own model (of the lineage, policy.test_metrics = exact) was not answered",
    );
    // A refused evaluation is answered without a value (so an honest coordinator does not wait).
    for (what, m) in [("a model that was never a round's model", &probe), ("an unknown hash", &nothing)] {
        let sent: Vec<_> = reports.iter().filter(|r| r.model_sha256 == m.sha256 && !r.metrics.is_empty()).collect();
        f.check(sent.is_empty(), format!("evaluation of {what} ({}) was answered: {sent:?}", &m.sha256[..12]));
    }
    let logged = s.node(CLEVELAND).egress().iter().filter(|e| e.call == "ReportEvaluation").count();
    f.check(
        logged == reports.len(),
        format!("{logged} ReportEvaluation record(s) in the egress log, {} received", reports.len()),
    );
    s.check_releases_match_charges(&mut f, CLEVELAND);
    f.finish(|| s.context());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secure_aggregation_threshold_of_two_of_five_is_refused() {
    let mut s = Scene::new().await;
    s.add(CLEVELAND, &heart_data(CLEVELAND), "max_epsilon = 10.0", false).await;
    // Client-level DP by distributed noise under secure aggregation, the plan's own threshold 2.
    let plan = "name = \"rogue-secagg\"\nseed = 0\nrounds = 2\nmin_nodes = 2\nround_deadline_secs = 300\n\
                secure_aggregation = true\n[secagg]\nthreshold = 2\n\
                [model]\nkind = \"logistic_regression\"\ninputs = 13\n[data]\nschema = \"heart_disease\"\nschema_sha256 = \"39f2b3691b732094488517b366f5bb898ffb1d537dae5f6f2fc1b24c7f225688\"\n\
                [local]\nsteps = 5\nbatch_size = 4\noptimizer = \"sgd\"\nlearning_rate = 0.01\n\
                [strategy]\nkind = \"fedavg\"\nweighting = \"uniform\"\n\
                [privacy]\nmode = \"client\"\ntarget_epsilon = 5.0\ndelta = 1e-5\nclip_norm = 0.3\n";
    let id = d::plan_id(plan);
    let decision = s.offer(CLEVELAND, plan, "run-1").await;
    println!("offer: accept={} reason={:?}", decision.accept, decision.reason);
    let settings = Plan::parse(plan).unwrap().secagg_settings();
    // t = 2 of n = 5: two disjoint survivor lists of 2 could each gather t signatures.
    let setup = proto::SecAggSetup {
        participants: ["aachen", "bern", CLEVELAND, "dublin", "essen"].map(String::from).to_vec(),
        threshold: 2,
        clip_norm: settings.clip_norm,
        max_samples: settings.max_samples,
        step_timeout_secs: settings.step_timeout_secs,
        ..Default::default()
    };
    let model = s.rogue.register_initial_model(plan, 0);
    let mark = s.rogue.mark();
    s.rogue.send(CLEVELAND, d::start_secagg_round(&id, "run-1", 1, &model, setup));
    s.barrier(CLEVELAND).await;
    s.close_and_wait_exit(CLEVELAND, &id, "run-1").await;

    let mut f = Findings::default();
    let sent: Vec<&'static str> = s
        .rogue
        .received()
        .into_iter()
        .filter(|r| r.node == CLEVELAND && r.seq >= mark)
        .filter(|r| matches!(r.message, Sent::SecAgg(_) | Sent::Update(_)))
        .map(|r| r.message.call())
        .collect();
    f.check(sent.is_empty(), format!("t = 2 of n = 5: the node took part and sent {sent:?}"));
    s.check_releases_match_charges(&mut f, CLEVELAND);
    f.finish(|| s.context());
}

/// The cell and the header a hospital's data must never show the coordinator.
const SECRET_CELL: &str = "SECRET-CELL-7731";
const SECRET_HEADER: &str = "SECRET-HDR-5190";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusal_reasons_name_the_rule_file_and_column_but_no_cell_value_or_header() {
    const BAD_CELL: &str = "cleveland";
    const BAD_HEADER: &str = "hungarian";
    let mut s = Scene::new().await;
    let dir = s.c.dir.path().join("data");
    std::fs::create_dir_all(&dir).unwrap();
    // A cell of the `chol` column holding a distinctive value (line 3)...
    let text = std::fs::read_to_string(heart_data(BAD_CELL)).unwrap();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    let chol = lines[0].split(',').position(|h| h == "chol").expect("fixture: a chol column");
    let mut cells: Vec<String> = lines[2].split(',').map(String::from).collect();
    cells[chol] = SECRET_CELL.into();
    lines[2] = cells.join(",");
    let bad_cell = dir.join("cleveland_bad_cell.csv");
    std::fs::write(&bad_cell, lines.join("\n") + "\n").unwrap();
    // ...and a file whose `chol` column is named by a distinctive header (so the required
    // column is missing and the header is what an error would list).
    let text = std::fs::read_to_string(heart_data(BAD_HEADER)).unwrap();
    let (header, rest) = text.split_once('\n').unwrap();
    let renamed: Vec<&str> = header.split(',').map(|h| if h == "chol" { SECRET_HEADER } else { h }).collect();
    let bad_header = dir.join("hungarian_bad_header.csv");
    std::fs::write(&bad_header, format!("{}\n{rest}", renamed.join(","))).unwrap();

    s.add(BAD_CELL, &bad_cell, "max_epsilon = 10.0", false).await;
    s.add(BAD_HEADER, &bad_header, "max_epsilon = 10.0", false).await;
    let plan = dp_plan("rogue-reasons", 2, 5, 1.0);
    let id = d::plan_id(&plan);
    let mut f = Findings::default();
    for (node, file) in [(BAD_CELL, &bad_cell), (BAD_HEADER, &bad_header)] {
        let decision = s.offer(node, &plan, "run-1").await;
        if decision.accept {
            panic!("fixture: {node} accepted a plan on a bad data file\n{}", s.context());
        }
        let r = &decision.reason;
        let file_name = file.file_name().unwrap().to_string_lossy().into_owned();
        f.check(
            r.contains(&file_name) && r.contains("chol"),
            format!("{node}'s refusal does not name the file {file_name:?} and the column 'chol': {r:?}"),
        );
    }
    for node in [BAD_CELL, BAD_HEADER] {
        s.close_and_wait_exit(node, &id, "run-1").await;
    }
    for (node, secret) in [(BAD_CELL, SECRET_CELL), (BAD_HEADER, SECRET_HEADER)] {
        for m in s.rogue.from(node) {
            let bytes = m.wire_bytes();
            for leak in [SECRET_CELL, SECRET_HEADER] {
                let found = bytes.windows(leak.len()).any(|w| w == leak.as_bytes());
                let shown = match &m {
                    Sent::PlanResponse(p) => format!("{:?}", p.reason),
                    other => format!("{other:?}"),
                };
                f.check(!found, format!("{node}'s {} carries {leak}: {shown}", m.call()));
            }
        }
        // Not asserted: the audit log is the node's own, though auditors may be shown it.
        let audit = s.node(node).audit_records().iter().map(|r| format!("{:?}", r.params)).collect::<String>();
        println!("{node}'s audit log names {secret}: {}", audit.contains(secret));
        // The hospital's own log keeps the full detail for its data steward.
        f.check(s.node(node).log_text().contains(secret), format!("{node}'s own log does not name {secret}"));
        s.check_releases_match_charges(&mut f, node);
    }
    f.finish(|| s.context());
}

// ---- Review of issue 9's changes (attacks found after the first set) ----

/// A plan in the shape of [`dp_plan`] with the given `[privacy]` body, uniform weighting (so a
/// node that withholds sample counts can take it) and batch size `batch`.
fn plan_with(name: &str, rounds: u32, steps: u32, batch: u32, privacy: &str) -> String {
    format!(
        "name = \"{name}\"\nseed = 0\nrounds = {rounds}\nmin_nodes = 1\nround_deadline_secs = 300\nrecruit_deadline_secs = 60\n\
         [model]\nkind = \"logistic_regression\"\ninputs = 13\n[data]\nschema = \"heart_disease\"\nschema_sha256 = \"39f2b3691b732094488517b366f5bb898ffb1d537dae5f6f2fc1b24c7f225688\"\n\
         [local]\nsteps = {steps}\nbatch_size = {batch}\noptimizer = \"sgd\"\nlearning_rate = 0.01\n\
         [strategy]\nkind = \"fedavg\"\nweighting = \"uniform\"\n\
         [privacy]\n{privacy}"
    )
}

/// The evaluation reports `node` sent that carry a value, by model hash.
fn answered_evaluations(s: &Scene, node: &str) -> Vec<proto::EvaluationReport> {
    s.rogue
        .from(node)
        .into_iter()
        .filter_map(|m| match m {
            Sent::Evaluation(e) if !e.metrics.is_empty() => Some(e),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_named_only_in_a_repeated_start_round_is_not_evaluated() {
    let mut s = Scene::new().await;
    s.add(CLEVELAND, &heart_data(CLEVELAND), "max_epsilon = 10.0\ntest_metrics = \"exact\"", false).await;
    let plan = dp_plan("rogue-resend-lineage", 2, 5, 1.0);
    let id = d::plan_id(&plan);
    s.accept(CLEVELAND, &plan, "run-1").await;
    let model = s.rogue.register_initial_model(&plan, 0);
    let mark = s.rogue.mark();
    s.rogue.send(CLEVELAND, d::start_round(&id, "run-1", 1, &model));
    s.rogue.wait_upload(CLEVELAND, &id, 1, mark, WAIT).await.unwrap_or_else(|e| panic!("{e}\n{}", s.context()));
    // Round 1 asked for again, each time naming another model of the coordinator's choice. The
    // node re-sends its stored bytes without fetching or training on any of them, so none is of
    // the run's lineage; a coordinator that could evaluate them would have an unbounded supply
    // of exact test-split queries on models it picked.
    let probes: Vec<Model> = (0..3).map(|i| s.rogue.register_initial_model(&plan, 555_000 + i)).collect();
    for p in &probes {
        s.rogue.send(CLEVELAND, d::start_round(&id, "run-1", 1, p));
    }
    s.barrier(CLEVELAND).await;
    for p in &probes {
        s.rogue.send(CLEVELAND, d::evaluate(&id, "run-1", p));
    }
    s.rogue.send(CLEVELAND, d::evaluate(&id, "run-1", &model));
    s.barrier(CLEVELAND).await;
    s.close_and_wait_exit(CLEVELAND, &id, "run-1").await;

    let mut f = Findings::default();
    let reports = answered_evaluations(&s, CLEVELAND);
    f.check(
        reports.iter().any(|r| r.model_sha256 == model.sha256),
        "the evaluation of the round's own model (of the lineage, policy.test_metrics = exact) was not answered",
    );
    for p in &probes {
        let sent: Vec<_> = reports.iter().filter(|r| r.model_sha256 == p.sha256).collect();
        f.check(
            sent.is_empty(),
            format!("a model named only in a repeated StartRound ({}) was evaluated: {sent:?}", &p.sha256[..12]),
        );
    }
    s.check_releases_match_charges(&mut f, CLEVELAND);
    f.finish(|| s.context());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_final_model_is_evaluated_only_after_the_node_released_the_last_round() {
    let mut s = Scene::new().await;
    s.add(CLEVELAND, &heart_data(CLEVELAND), "max_epsilon = 10.0\ntest_metrics = \"exact\"", false).await;
    let rounds = 2;
    let plan = dp_plan("rogue-free-final", rounds, 5, 1.0);
    let id = d::plan_id(&plan);
    // A fresh run (offers cost nothing) whose last round names a model the node cannot fetch:
    // nothing is trained, released or charged, but the round directive was seen.
    s.accept(CLEVELAND, &plan, "run-1").await;
    let nothing = Model { sha256: ContentHash::of(b"no model has these bytes").to_hex(), bytes: 1000 };
    s.rogue.send(CLEVELAND, d::start_round(&id, "run-1", rounds, &nothing));
    s.barrier(CLEVELAND).await;
    // Then "the final model": any model the coordinator likes.
    let probe = s.rogue.register_initial_model(&plan, 424_242);
    s.rogue.send(CLEVELAND, d::evaluate(&id, "run-1", &probe));
    s.barrier(CLEVELAND).await;
    s.close_and_wait_exit(CLEVELAND, &id, "run-1").await;

    let mut f = Findings::default();
    let uploads = s.rogue.uploads(CLEVELAND).len();
    f.check(uploads == 0, format!("fixture: the unfetchable round released {uploads} update(s)"));
    let sent: Vec<_> =
        answered_evaluations(&s, CLEVELAND).into_iter().filter(|r| r.model_sha256 == probe.sha256).collect();
    f.check(
        sent.is_empty(),
        format!(
            "a model of the coordinator's choice was evaluated as the run's final model although the node released no round of the run: {sent:?}"
        ),
    );
    s.check_releases_match_charges(&mut f, CLEVELAND);
    f.finish(|| s.context());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metric_charges_and_update_charges_never_share_a_ledger_run_whatever_the_run_ids() {
    let mut s = Scene::new().await;
    s.add(
        CLEVELAND,
        &heart_data(CLEVELAND),
        "max_epsilon = 100.0\ntest_metrics = \"noised\"\ntest_metric_noise = 2.0",
        false,
    )
    .await;
    let plan = dp_plan("rogue-metrics-key", 2, 5, 1.0);
    let id = d::plan_id(&plan);
    // Run "a/metrics" is the ledger key the node uses for run "a"'s noised test metrics. Its
    // DP-SGD charges and run "a"'s metric charges would then be one ledger "run", counted by its
    // largest ε instead of the sum of two different mechanisms' ε.
    let colliding = s.offer(CLEVELAND, &plan, "a/metrics").await;
    println!("run \"a/metrics\": accept={} reason={:?}", colliding.accept, colliding.reason);
    if colliding.accept {
        for round in 1..=2 {
            let model = s.rogue.register_initial_model(&plan, u64::from(round));
            let mark = s.rogue.mark();
            s.rogue.send(CLEVELAND, d::start_round(&id, "a/metrics", round, &model));
            s.rogue
                .wait_upload(CLEVELAND, &id, round, mark, WAIT)
                .await
                .unwrap_or_else(|e| panic!("{e}\n{}", s.context()));
        }
    }
    s.accept(CLEVELAND, &plan, "a").await;
    let model = s.rogue.register_initial_model(&plan, 3);
    let mark = s.rogue.mark();
    s.rogue.send(CLEVELAND, d::start_round(&id, "a", 1, &model));
    s.rogue.wait_upload(CLEVELAND, &id, 1, mark, WAIT).await.unwrap_or_else(|e| panic!("{e}\n{}", s.context()));
    s.barrier(CLEVELAND).await;
    s.close_and_wait_exit(CLEVELAND, &id, "a").await;

    let mut f = Findings::default();
    let ledger = s.node(CLEVELAND).ledger();
    let accountant = |c: &sanctum_tests::LedgerCharge| {
        c.raw.get("accountant").and_then(|v| v.as_str()).unwrap_or_default().to_string()
    };
    let mut mechanisms: std::collections::BTreeMap<(String, Option<String>), std::collections::BTreeSet<String>> =
        Default::default();
    let mut by_mechanism: std::collections::BTreeMap<(String, Option<String>, String), f64> = Default::default();
    for c in &ledger {
        mechanisms.entry((c.plan_id.clone(), c.run.clone())).or_default().insert(accountant(c));
        let e = by_mechanism.entry((c.plan_id.clone(), c.run.clone(), accountant(c))).or_insert(0.0);
        *e = e.max(c.epsilon);
    }
    for ((_, run), kinds) in &mechanisms {
        f.check(
            kinds.len() == 1,
            format!("ledger run {run:?} holds charges of {} mechanisms ({kinds:?}): counted by its largest ε, not their sum", kinds.len()),
        );
    }
    let counted: f64 = epsilon_by_run(&ledger).values().sum();
    let spent: f64 = by_mechanism.values().sum();
    println!("ε the ledger counts: {counted:.3}; ε of its mechanisms added up: {spent:.3}");
    f.check(
        counted >= spent - 1e-9,
        format!("the ledger counts ε = {counted:.3} while its releases add up to ε = {spent:.3}"),
    );
    f.finish(|| s.context());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_sample_counts_withheld_plan_decisions_do_not_depend_on_the_dataset_size() {
    // 199 and 30 training rows; the same policy. Whether a node accepts a plan with a fixed σ
    // depends on ε(q = batch / n), so a coordinator (or a lead) that sweeps the batch size and
    // watches accept / refuse reads n off the threshold, for free: offers are never charged.
    const SMALL: &str = "switzerland";
    // Both publish the same lower bound on their rows, so decisions are made on public numbers.
    let policy = "share_sample_counts = false\nmax_epsilon = 2.0\npublic_min_train_rows = 25";
    let mut s = Scene::new().await;
    s.add(CLEVELAND, &heart_data(CLEVELAND), policy, true).await;
    s.add(SMALL, &heart_data(SMALL), policy, true).await;
    let mut f = Findings::default();
    let mut decisions = Vec::new();
    for batch in [1, 2, 3, 4, 6, 8, 12, 16, 24, 32] {
        let plan = plan_with(
            &format!("rogue-size-oracle-{batch}"),
            1,
            10,
            batch,
            "mode = \"example\"\nnoise_multiplier = 1.0\ndelta = 1e-5\nclip_norm = 1.0\n",
        );
        let big = s.offer(CLEVELAND, &plan, "run-1").await;
        let small = s.offer(SMALL, &plan, "run-1").await;
        decisions.push((batch, big.accept, small.accept));
        f.check(
            big.accept == small.accept,
            format!(
                "batch {batch}: {CLEVELAND} (199 rows) accept={}, {SMALL} (30 rows) accept={}: the decision depends on n",
                big.accept, small.accept
            ),
        );
    }
    println!("(batch, {CLEVELAND} accepts, {SMALL} accepts): {decisions:?}");
    f.check(decisions.iter().any(|d| d.1) && decisions.iter().any(|d| !d.1), "the sweep crosses the cap");
    f.finish(|| s.context());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_sample_counts_withheld_exact_test_metrics_do_not_reveal_the_test_split_size() {
    // A plan without DP: test_metrics = auto sends the exact accuracy c / n_test, an exact
    // fraction in f64 whose denominator is a divisor of n_test; a few models' accuracies give
    // n_test itself (their least common denominator), and n_test is about a third of the data.
    let mut s = Scene::new().await;
    s.add(CLEVELAND, &heart_data(CLEVELAND), "share_sample_counts = false", false).await;
    let n_test =
        std::fs::read_to_string(heart_data(CLEVELAND)).unwrap().lines().filter(|l| l.ends_with(",test")).count() as u64;
    let rounds = 5;
    let plan = plan_with("rogue-test-size", rounds, 2, 8, "mode = \"none\"\n");
    let id = d::plan_id(&plan);
    s.accept(CLEVELAND, &plan, "run-1").await;
    for round in 1..=rounds {
        let model = s.rogue.register_initial_model(&plan, 7_000 + u64::from(round));
        let mark = s.rogue.mark();
        s.rogue.send(CLEVELAND, d::start_round(&id, "run-1", round, &model));
        s.rogue.wait_upload(CLEVELAND, &id, round, mark, WAIT).await.unwrap_or_else(|e| panic!("{e}\n{}", s.context()));
    }
    s.close_and_wait_exit(CLEVELAND, &id, "run-1").await;

    // The smallest q with round(v·q) / q == v exactly: the reduced denominator of v.
    let denominator = |v: f64| (1..=100_000u64).find(|&q| ((v * q as f64).round() / q as f64) == v);
    let gcd = |mut a: u64, mut b: u64| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    let values: Vec<f64> =
        s.rogue.uploads(CLEVELAND).iter().flat_map(|u| u.header.metrics.iter().map(|m| m.value)).collect();
    let lcm = values.iter().filter_map(|&v| denominator(v)).fold(1u64, |l, q| l / gcd(l, q) * q);
    println!("test split: {n_test} rows; metrics sent: {values:?}; their least common denominator: {lcm}");
    let mut f = Findings::default();
    f.check(
        lcm != n_test,
        format!(
            "share_sample_counts = false, yet the exact accuracies sent ({values:?}) have least common denominator {lcm}, the test split's size"
        ),
    );
    f.finish(|| s.context());
}
