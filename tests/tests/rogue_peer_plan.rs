//! A careless or hostile plan, submitted with the lead's certificate to a real coordinator: a name
//! that is a path, and deadlines no clock can hold. Each is refused at submission with the rule
//! it breaks, nothing is written outside `state/exports`, and the coordinator goes on serving
//! the next plan.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sanctum_protocol::proto::{SubmitPlanRequest, plan_event};
use sanctum_tests::peer::lead_client;
use sanctum_tests::{Consortium, CoordinatorProcess, NodeProcess, heart_data, next_event, submit_and_watch};

/// A one-round plan one node can run in seconds; `{name}` and `{head}` are filled in per case.
fn plan(name: &str, head: &str) -> String {
    format!(
        "name = {name:?}\nrounds = 1\nmin_nodes = 1\n{head}\n\
         [model]\nkind = \"logistic_regression\"\ninputs = 13\n[data]\nschema = \"heart_disease\"\nschema_sha256 = \"39f2b3691b732094488517b366f5bb898ffb1d537dae5f6f2fc1b24c7f225688\"\n\
         [local]\nsteps = 2\nbatch_size = 4\nlearning_rate = 0.01\n[strategy]\nkind = \"fedavg\"\n"
    )
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Files whose name mentions `evil`, in the places a path-shaped plan name could reach.
fn evil_files(roots: &[&Path]) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = roots
        .iter()
        .flat_map(|r| files_under(r))
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().contains("evil")))
        .collect();
    // `/tmp/evil` itself (a name used as an absolute path) and its siblings, one level only.
    found.extend(
        std::fs::read_dir("/tmp")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("evil"))),
    );
    found.sort();
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_named_with_an_absolute_path_or_dot_dot_is_refused_and_writes_nothing_outside_exports() {
    let c = Consortium::new();
    let coord = CoordinatorProcess::start(&c);
    // A node that would run the plan (and so make the coordinator export its model) if it were
    // accepted.
    let _node = NodeProcess::start(&c, "cleveland", &coord.address(), &heart_data("cleveland"));
    coord.wait_for_nodes(1);
    let mut lead = lead_client(&c, &coord).await;
    let roots = [c.dir.path()];
    let before = evil_files(&roots);

    for name in ["/tmp/evil", "../../evil", "a/../../b", ".hidden", "evil/x"] {
        let result =
            lead.submit_plan(SubmitPlanRequest { plan_toml: plan(name, ""), again: false, model_file: vec![] }).await;
        println!(
            "plan named {name:?}: {:?}",
            result.as_ref().map(|r| r.get_ref().plan_id.clone()).map_err(|s| s.message())
        );
        let status = result.expect_err("a plan named with a path is refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains("`name`") && status.message().contains("[A-Za-z0-9]"),
            "the refusal names the field and the rule: {}",
            status.message()
        );
    }
    // Give a run that was (wrongly) started time to finish and export.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = evil_files(&roots);
    println!("files named evil* before: {before:?}, after: {after:?}");
    assert_eq!(before, after, "nothing was written under a plan-chosen name");
    let exports = files_under(&coord.state_dir().join("exports"));
    assert!(exports.is_empty(), "no run was started, so nothing was exported: {exports:?}");
    let rejected = coord.audit_records().iter().filter(|r| r.event == "plan_rejected").count();
    assert_eq!(rejected, 5, "each refusal is in the audit log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_of_two_to_the_sixty_third_seconds_is_refused_and_the_coordinator_serves_the_next_plan() {
    let c = Consortium::new();
    let mut coord = CoordinatorProcess::start(&c);
    let _node = NodeProcess::start(&c, "cleveland", &coord.address(), &heart_data("cleveland"));
    coord.wait_for_nodes(1);
    let mut lead = lead_client(&c, &coord).await;

    // TOML 1.0 integers are i64, but the `toml` crate reads larger ones into a `u64` field: 2⁶³
    // and u64::MAX parse. Before plan limits, `Instant + Duration::from_secs(2⁶³)` panicked in
    // the driver task: at once for a recruitment deadline, at the first round for a round's. The
    // process kept running and answered every later submission "coordinator is shutting down".
    let cases = [
        ("round_deadline_secs = 9223372036854775808", "round_deadline_secs"),
        ("recruit_deadline_secs = 9223372036854775808", "recruit_deadline_secs"),
        ("recruit_deadline_secs = 9223372036854775807", "recruit_deadline_secs"),
        ("recruit_deadline_secs = 18446744073709551615", "recruit_deadline_secs"),
        ("round_deadline_secs = 9223372036854775807", "round_deadline_secs"),
        ("round_deadline_secs = 2592001", "round_deadline_secs"),
    ];
    let mut outcomes = Vec::new();
    for (i, (head, field)) in cases.iter().enumerate() {
        let result = lead
            .submit_plan(SubmitPlanRequest {
                plan_toml: plan(&format!("deadline-{i}"), head),
                again: false,
                model_file: vec![],
            })
            .await;
        let shown = result.as_ref().map(|r| r.get_ref().run.clone()).map_err(|s| (s.code(), s.message().to_string()));
        println!("{head}: {shown:?}");
        outcomes.push((head, field, shown));
    }
    for (head, field, shown) in &outcomes {
        let Err((code, message)) = shown else {
            panic!("{head} was accepted");
        };
        assert_eq!(*code, tonic::Code::InvalidArgument, "{head}: {message}");
        assert!(message.contains(*field), "{head}: the reason names the field: {message}");
    }
    assert!(coord.alive(), "the coordinator is still running");

    // The next, ordinary plan is accepted and runs to the end.
    let (_, mut events) = submit_and_watch(&mut lead, plan("after-the-bad-ones", "round_deadline_secs = 60")).await;
    let finished = loop {
        let ev = next_event(&mut events, 60, "the ordinary plan stalled").await;
        if let Some(plan_event::Kind::PlanFinished(f)) = ev.kind {
            break f;
        }
    };
    println!("ordinary plan after the refusals: success = {}, {}", finished.success, finished.reason);
    assert!(finished.success, "{}", finished.reason);
}
