//! Tests of plan parsing, validation and the wire form.

use super::*;

const PLAN: &str = r#"
name = "t"
rounds = 2
min_nodes = 1
[model]
kind = "logistic_regression"
inputs = 13
[data]
schema = "heart_disease"
schema_sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
[local]
steps = 3
batch_size = 4
learning_rate = 0.01
[strategy]
kind = "fedadam"
server_learning_rate = 0.01
"#;

/// The plan against its schema: hash, name, inputs, outputs, model kind, class weights and
/// the privacy a task allows, each refusal naming its field.
#[test]
fn a_plan_is_checked_against_its_schema() {
    use crate::dataset::Schema;
    let heart = Schema::parse(include_str!("../../../examples/heart_disease/schema.toml")).unwrap();
    let hash = heart.sha256().to_hex();
    let plan = |edit: &dyn Fn(String) -> String| {
        let text = PLAN.replace("0000000000000000000000000000000000000000000000000000000000000000", &hash);
        Plan::parse(&edit(text)).unwrap()
    };
    let same = |t: String| t;
    plan(&same).check_schema(&heart).unwrap();
    let refused = |p: Plan, field: &str| {
        let e = p.check_schema(&heart).unwrap_err().to_string();
        assert!(e.contains(field), "{field}: {e}");
        e
    };
    refused(plan(&|t| t.replace("inputs = 13", "inputs = 12")), "model.inputs");
    refused(plan(&|t| t.replace("inputs = 13", "inputs = 13\noutputs = 2")), "model.outputs");
    refused(plan(&|t| t.replace("schema = \"heart_disease\"", "schema = \"other\"")), "data.schema");
    let e = refused(plan(&|t| t.replace(&hash, &"ab".repeat(32))), "data.schema_sha256");
    assert!(e.contains(&hash), "the file's own hash is named: {e}");
    refused(plan(&|t| t.replace("kind = \"logistic_regression\"", "kind = \"cox\"")), "model.kind");
    refused(plan(&|t| t.replace("steps = 3", "steps = 3\nclass_weights = [1.0, 2.0, 3.0]")), "local.class_weights");
    plan(&|t| t.replace("steps = 3", "steps = 3\nclass_weights = [1.0, 9.0]")).check_schema(&heart).unwrap();
    plan(&|t| t.replace("steps = 3", "steps = 3\nclass_weights = \"balanced\"")).check_schema(&heart).unwrap();
    // Balanced weights depend on the node's counts: refused under example-level DP, at parse.
    let dp = "[privacy]\nmode = \"example\"\nnoise_multiplier = 1.0\nclip_norm = 1.0\ndelta = 1e-5\n";
    let balanced = PLAN.replace("steps = 3", "steps = 3\nclass_weights = \"balanced\"");
    let e = Plan::parse(&format!("{balanced}{dp}")).unwrap_err().to_string();
    assert!(e.contains("local.class_weights") && e.contains("declare the weights"), "{e}");
    for bad in ["[0.0, 1.0]", "[1.0]", "[1.0, inf]"] {
        let t = PLAN.replace("steps = 3", &format!("steps = 3\nclass_weights = {bad}"));
        let e = Plan::parse(&t).unwrap_err().to_string();
        assert!(e.contains("local.class_weights"), "{bad}: {e}");
    }
    // Survival: no example-level DP (the partial likelihood has no per-example gradient).
    let survival = Schema::parse(include_str!("../../../examples/tcga_brca/schema.toml")).unwrap();
    let cox = format!(
        "name = \"c\"\nrounds = 1\nmin_nodes = 1\n[model]\nkind = \"cox\"\ninputs = 39\n[data]\nschema = \"{}\"\nschema_sha256 = \"{}\"\n[local]\nsteps = 1\nbatch_size = 8\nlearning_rate = 0.1\n[strategy]\nkind = \"fedavg\"\nweighting = \"uniform\"\n",
        survival.name(),
        survival.sha256().to_hex()
    );
    Plan::parse(&cox).unwrap().check_schema(&survival).unwrap();
    let e = Plan::parse(&format!("{cox}{dp}")).unwrap().check_schema(&survival).unwrap_err().to_string();
    assert!(e.contains("privacy.mode") && e.contains("client"), "{e}");
    let client = "[privacy]\nmode = \"client\"\nnoise_multiplier = 1.0\nclip_norm = 1.0\ndelta = 1e-5\n";
    Plan::parse(&format!("{cox}{client}")).unwrap().check_schema(&survival).unwrap();
}

/// The plan id is the SHA-256 of the wire form: a field added with a default must be left
/// out of it at that default, or every plan written before gets a new id (and a node's
/// ledger and releases, keyed by plan id, would no longer find it). The id below was
/// computed from `PLAN` before `retries` existed (commit 8381a30).
#[test]
fn a_plan_written_before_retries_keeps_its_id() {
    let plan = Plan::parse(PLAN).unwrap();
    let wire = plan.to_wire_toml().unwrap();
    assert!(!wire.contains("retries"), "{wire}");
    assert_eq!(Plan::id_of(&wire).to_hex(), "eefc5694b55d69b7b269de24ac5bbe0db01e633592f8036fad54362dd89400a7");
    let explicit_zero = Plan::parse(&PLAN.replace("min_nodes = 1", "min_nodes = 1\nretries = 0")).unwrap();
    assert_eq!(explicit_zero.to_wire_toml().unwrap(), wire, "retries = 0 is the default, the same plan");
    // Retries change what the run does, so they are part of the plan (and of its id).
    let retried = Plan::parse(&PLAN.replace("min_nodes = 1", "min_nodes = 1\nretries = 2")).unwrap();
    let retried_wire = retried.to_wire_toml().unwrap();
    assert!(retried_wire.contains("retries = 2"), "{retried_wire}");
    assert_eq!(Plan::parse(&retried_wire).unwrap(), retried);
    assert_ne!(Plan::id_of(&retried_wire), Plan::id_of(&wire));
}

#[test]
fn parses_and_roundtrips_through_the_wire_form() {
    let plan = Plan::parse(PLAN).unwrap();
    assert_eq!(plan.strategy.name(), "fedadam");
    let wire = plan.to_wire_toml().unwrap();
    assert_eq!(Plan::parse(&wire).unwrap(), plan);
}

#[test]
fn errors_name_the_field_or_line() {
    let e = Plan::parse(&PLAN.replace("heart_disease", "no/pe")).unwrap_err().to_string();
    assert!(e.contains("data.schema"), "{e}");
    let e = Plan::parse(&PLAN.replace("schema_sha256 = \"0000", "schema_sha256 = \"ZZ00")).unwrap_err().to_string();
    assert!(e.contains("data.schema_sha256"), "{e}");
    let no_hash: String = PLAN.lines().filter(|l| !l.starts_with("schema_sha256")).map(|l| format!("{l}\n")).collect();
    let e = Plan::parse(&no_hash).unwrap_err().to_string();
    assert!(e.contains("data.schema_sha256") && e.contains("schema_file"), "{e}");
    let e = Plan::parse(&PLAN.replace("rounds = 2", "rounds = \"two\"")).unwrap_err().to_string();
    assert!(e.contains("line 3"), "{e}");
    let e = Plan::parse(&PLAN.replace("steps = 3", "steps = 3\nstepz = 1")).unwrap_err().to_string();
    assert!(e.contains("stepz"), "{e}");
    let e = Plan::parse(&PLAN.replace("rounds = 2", "rounds = 0")).unwrap_err().to_string();
    assert!(e.contains("rounds"), "{e}");
    let dp = |extra: &str| Plan::parse(&format!("{PLAN}[privacy]\nmode = \"example\"\n{extra}"));
    let e = dp("clip_norm = 1.0\ndelta = 1e-5").unwrap_err().to_string();
    assert!(e.contains("exactly one of noise_multiplier or target_epsilon"), "{e}");
    let e = dp("noise_multiplier = 1.0\ndelta = 1e-5").unwrap_err().to_string();
    assert!(e.contains("privacy.clip_norm"), "{e}");
    let e = dp("noise_multiplier = 1.0\nclip_norm = 1.0\ndelta = 2").unwrap_err().to_string();
    assert!(e.contains("privacy.delta"), "{e}");
    let ok = dp("target_epsilon = 3.0\nclip_norm = 1.0\ndelta = 1e-5").unwrap();
    assert_eq!(Plan::parse(&ok.to_wire_toml().unwrap()).unwrap(), ok);
}

#[test]
fn plan_names_are_file_names_and_nothing_else() {
    let named = |name: &str| Plan::parse(&PLAN.replace("name = \"t\"", &format!("name = {name:?}")));
    for ok in ["t", "heart-disease-fedavg", "A.b_c-9", "x".repeat(64).as_str(), "v1.2"] {
        assert!(named(ok).is_ok(), "{ok}");
    }
    for bad in [
        "/tmp/evil",
        "../../evil",
        "a/../../b",
        "a..b",
        "..",
        ".hidden",
        "-flag",
        "",
        " ",
        "a b",
        "a\\b",
        "C:evil",
        "Hôpital",
        "病院",
        "x\ty",
        &"x".repeat(65),
    ] {
        let e = named(bad).unwrap_err().to_string();
        assert!(e.contains("`name`") && e.contains(PLAN_NAME_RULE), "{bad:?}: {e}");
    }
    // A long non-ASCII name is shortened by characters in the error, never cut inside one.
    let e = named(&"é".repeat(100)).unwrap_err().to_string();
    assert!(e.contains(&format!("{}…", "é".repeat(64))), "{e}");
}

#[test]
fn numbers_outside_the_limits_are_refused_with_the_field_and_the_bound() {
    let with = |from: &str, to: &str| {
        assert!(PLAN.contains(from), "{from}");
        Plan::parse(&PLAN.replace(from, to)).map(|_| ()).map_err(|e| e.to_string())
    };
    let head = |extra: &str| with("min_nodes = 1", &format!("min_nodes = 1\n{extra}"));
    let max_i64 = i64::MAX.to_string();
    let cases: Vec<(Result<(), String>, &str)> = vec![
        (head(&format!("round_deadline_secs = {max_i64}")), "round_deadline_secs"),
        (head(&format!("recruit_deadline_secs = {max_i64}")), "recruit_deadline_secs"),
        (head("round_deadline_secs = 2592001"), "2592000"),
        (head("recruit_deadline_secs = 0"), "recruit_deadline_secs"),
        // Beyond TOML's i64, but the `toml` crate reads it into a u64 field.
        (head("round_deadline_secs = 9223372036854775808"), "round_deadline_secs"),
        (head("recruit_deadline_secs = 18446744073709551615"), "recruit_deadline_secs"),
        (head("round_deadline_secs = -1"), "line"),
        (with("rounds = 2", "rounds = 10001"), "rounds"),
        (with("rounds = 2", "rounds = 4294967295"), "rounds"),
        (with("min_nodes = 1", "min_nodes = 10001"), "min_nodes"),
        (head("retries = 11"), "retries"),
        (head("retries = -1"), "line"),
        (with("steps = 3", "steps = 100001"), "local.steps"),
        (with("steps = 3", "steps = 4294967295"), "local.steps"),
        (with("batch_size = 4", "batch_size = 1048577"), "local.batch_size"),
        (with("inputs = 13", "inputs = 9223372036854775807"), "9223372036854775808 parameters"),
        (
            with(
                "kind = \"logistic_regression\"\ninputs = 13",
                "kind = \"mlp\"\ninputs = 13\nhidden = [4294967296, 4294967296]",
            ),
            "more than 2^64",
        ),
        (
            with("kind = \"logistic_regression\"\ninputs = 13", "kind = \"mlp\"\ninputs = 13\nhidden = [16385, 16385]"),
            "268435456",
        ),
        (
            with(
                "kind = \"logistic_regression\"\ninputs = 13",
                &format!("kind = \"mlp\"\ninputs = 13\nhidden = [{}]", ["1"; 65].join(", ")),
            ),
            "65 layers",
        ),
        (
            with(
                "kind = \"logistic_regression\"\ninputs = 13",
                "kind = \"cnn\"\nchannels = 4611686018427387904\nheight = 4\nwidth = 4\nfilters = [1]\nkernel_size = 3",
            ),
            "model",
        ),
    ];
    for (result, needle) in cases {
        let e = result.expect_err(needle);
        assert!(e.contains(needle), "{needle}: {e}");
    }
    let secagg = |extra: &str| {
        let text = PLAN.replace("min_nodes = 1", "min_nodes = 2");
        Plan::parse(&format!("secure_aggregation = true\n{text}[secagg]\n{extra}\n")).map_err(|e| e.to_string())
    };
    assert!(secagg(&format!("step_timeout_secs = {max_i64}")).unwrap_err().contains("secagg.step_timeout_secs"));
    assert!(secagg("threshold = 10001").unwrap_err().contains("secagg.threshold"));
    let retried = PLAN.replace("min_nodes = 1", "min_nodes = 2\nretries = 1");
    let e = Plan::parse(&format!("secure_aggregation = true\n{retried}")).unwrap_err().to_string();
    assert!(e.contains("retries") && e.contains("masked input twice"), "{e}");
    // The bounds themselves are accepted.
    assert!(head("round_deadline_secs = 2592000\nrecruit_deadline_secs = 2592000").is_ok());
    assert!(with("rounds = 2", "rounds = 10000").is_ok());
    assert!(head("retries = 10").is_ok());
    assert!(with("steps = 3", "steps = 100000").is_ok());
    assert!(secagg("step_timeout_secs = 2592000").is_ok());
    let big =
        with("kind = \"logistic_regression\"\ninputs = 13", "kind = \"mlp\"\ninputs = 13\nhidden = [11200, 11200]");
    assert!(big.is_ok(), "{big:?}");
}

/// The review's plans: σ = 10⁻³ (a 10¹⁰-point PLD grid), σ = 10⁻³⁰⁰ (σ² underflows), ε = 10⁶
/// (a search down to σ ≈ 0.07), and every other float that feeds an accountant or the
/// secure-aggregation sizing, each refused with its field and its bound.
#[test]
fn privacy_and_secagg_numbers_outside_the_limits_are_refused_with_the_field_and_the_bound() {
    let client =
        PLAN.replace("kind = \"fedadam\"\nserver_learning_rate = 0.01", "kind = \"fedavg\"\nweighting = \"uniform\"");
    let dp = |mode: &str, body: &str| {
        Plan::parse(&format!("{client}[privacy]\nmode = \"{mode}\"\n{body}\n")).map(|_| ()).map_err(|e| e.to_string())
    };
    let base = "clip_norm = 1.0\ndelta = 1e-5";
    let adaptive = |a: &str| format!("noise_multiplier = 1.0\n{base}\nadaptive_clipping = {{ {a} }}");
    let cases = [
        ("example", format!("noise_multiplier = 1e-3\n{base}"), "privacy.noise_multiplier", "0.1"),
        ("client", format!("noise_multiplier = 1e-3\n{base}"), "privacy.noise_multiplier", "0.1"),
        ("example", format!("noise_multiplier = 1e-300\n{base}"), "privacy.noise_multiplier", "0.1"),
        ("example", format!("noise_multiplier = 1001.0\n{base}"), "privacy.noise_multiplier", "1000.0"),
        ("example", format!("noise_multiplier = nan\n{base}"), "privacy.noise_multiplier", "0.1"),
        ("example", format!("noise_multiplier = inf\n{base}"), "privacy.noise_multiplier", "1000.0"),
        ("example", format!("target_epsilon = 1e6\n{base}"), "privacy.target_epsilon", "100.0"),
        ("client", format!("target_epsilon = 100.5\n{base}"), "privacy.target_epsilon", "100.0"),
        ("example", format!("target_epsilon = 0.0\n{base}"), "privacy.target_epsilon", "above 0"),
        ("example", "noise_multiplier = 1.0\nclip_norm = 1.0\ndelta = 1e-13".into(), "privacy.delta", "1e-12"),
        ("example", "noise_multiplier = 1.0\nclip_norm = 1.0\ndelta = 0.1".into(), "privacy.delta", "0.1"),
        ("example", "noise_multiplier = 1.0\nclip_norm = 1.0".into(), "privacy.delta", "missing"),
        ("example", "noise_multiplier = 1.0\nclip_norm = 1e7\ndelta = 1e-5".into(), "privacy.clip_norm", "1000000.0"),
        ("example", "noise_multiplier = 1.0\nclip_norm = 1e-7\ndelta = 1e-5".into(), "privacy.clip_norm", "1e-6"),
        ("example", "noise_multiplier = 1.0\nclip_norm = inf\ndelta = 1e-5".into(), "privacy.clip_norm", "1e-6"),
        ("client", adaptive("count_noise_multiplier = 1e-3"), "count_noise_multiplier", "0.1"),
        ("client", adaptive("count_noise_multiplier = 1e9"), "count_noise_multiplier", "1000.0"),
        (
            "client",
            adaptive("count_noise_multiplier = 10.0, learning_rate = 11.0"),
            "adaptive_clipping.learning_rate",
            "10.0",
        ),
        ("client", adaptive("count_noise_multiplier = 10.0, target_quantile = 1.0"), "target_quantile", "(0, 1)"),
    ];
    for (mode, body, field, bound) in &cases {
        let e = dp(mode, body).expect_err(body);
        assert!(e.contains(field) && e.contains(bound), "{body}: {e}");
    }
    // The bounds themselves are admitted.
    for (mode, body) in [
        ("example", format!("noise_multiplier = 0.1\n{base}")),
        ("client", format!("noise_multiplier = 1000.0\n{base}")),
        ("example", format!("target_epsilon = 100.0\n{base}")),
        ("example", "noise_multiplier = 1.0\nclip_norm = 1e6\ndelta = 1e-12".into()),
        ("example", "noise_multiplier = 1.0\nclip_norm = 1e-6\ndelta = 0.0999".into()),
        ("client", adaptive("count_noise_multiplier = 0.6, learning_rate = 10.0")),
    ] {
        assert!(dp(mode, &body).is_ok(), "{body}: {:?}", dp(mode, &body));
    }
    let secagg = |extra: &str| {
        let text = PLAN.replace("min_nodes = 1", "min_nodes = 2");
        Plan::parse(&format!("secure_aggregation = true\n{text}[secagg]\n{extra}\n")).map_err(|e| e.to_string())
    };
    for (extra, field, bound) in [
        ("clip_norm = 1e7", "secagg.clip_norm", "1000000.0"),
        ("clip_norm = nan", "secagg.clip_norm", "1e-6"),
        ("max_samples = 1000000001", "secagg.max_samples", "1000000000"),
        ("max_samples = 18446744073709551615", "secagg.max_samples", "1000000000"),
        ("max_samples = 0", "secagg.max_samples", "1000000000"),
    ] {
        let e = secagg(extra).expect_err(extra);
        assert!(e.contains(field) && e.contains(bound), "{extra}: {e}");
    }
    assert!(secagg("clip_norm = 1e6\nmax_samples = 1000000000").is_ok());
}

/// Every plan shipped in `examples/` is within the limits.
#[test]
fn every_bundled_example_plan_is_within_the_limits() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let sub = entry.unwrap().path();
        let Ok(files) = std::fs::read_dir(&sub) else { continue };
        for file in files {
            let path = file.unwrap().path();
            let is_schema = path.file_name().is_some_and(|n| n.to_string_lossy().starts_with("schema"));
            if path.extension().is_some_and(|e| e == "toml") && !is_schema {
                let text = std::fs::read_to_string(&path).unwrap();
                let plan = Plan::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                // Every example names its schema file, and fits it.
                let file =
                    plan.data.schema_file.clone().unwrap_or_else(|| panic!("{} has no schema_file", path.display()));
                let schema = crate::dataset::Schema::load(&sub.join(file)).unwrap();
                plan.check_schema(&schema).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                seen += 1;
            }
        }
    }
    assert!(seen >= 10, "found {seen} example plans in {}", dir.display());
}

#[test]
fn the_secagg_threshold_is_a_strict_majority_whatever_the_plan_asks() {
    let secagg = |threshold: &str, min_nodes: usize| {
        let text = PLAN.replace("min_nodes = 1", &format!("min_nodes = {min_nodes}"));
        Plan::parse(&format!("secure_aggregation = true\n{text}[secagg]\n{threshold}\n")).unwrap()
    };
    // A plan asking for t = 2 gets 3 of 5 (2·2 ≤ 5 would let two survivor lists each gather
    // t signatures); a floor above the majority is kept; so is min_nodes.
    assert_eq!(secagg("threshold = 2", 2).secagg_threshold(5), 3);
    assert_eq!(secagg("threshold = 2", 2).secagg_threshold(4), 3);
    assert_eq!(secagg("threshold = 4", 2).secagg_threshold(5), 4);
    assert_eq!(secagg("", 4).secagg_threshold(5), 4);
    for plan in [secagg("threshold = 2", 2), secagg("", 2), secagg("threshold = 3", 3)] {
        for n in 2..=200 {
            let t = plan.secagg_threshold(n);
            assert!(2 * t > n && t >= 2, "t = {t} of n = {n}");
        }
    }
    let e = Plan::parse(&format!(
        "secure_aggregation = true\n{}[secagg]\nthreshold = 1\n",
        PLAN.replace("min_nodes = 1", "min_nodes = 2")
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("secagg.threshold"), "{e}");
}

/// Each strategy parses with its parameters; the combinations that cannot keep their promise are
/// refused with the reason, naming the field.
#[test]
fn strategies_parse_and_their_unsound_combinations_are_refused() {
    let with = |strategy: &str, extra: &str| {
        let text = PLAN
            .replace("[strategy]\nkind = \"fedadam\"\nserver_learning_rate = 0.01\n", "")
            .replace("min_nodes = 1", "min_nodes = 5");
        if extra.starts_with('[') {
            Plan::parse(&format!("{text}{extra}\n[strategy]\n{strategy}\n"))
        } else {
            Plan::parse(&format!("{extra}\n{text}[strategy]\n{strategy}\n"))
        }
    };
    let ok = |s: &str| with(s, "").unwrap_or_else(|e| panic!("{s}: {e}"));
    assert_eq!(ok("kind = \"fedprox\"\nmu = 0.01").strategy.proximal_mu(), Some(0.01));
    assert!(ok("kind = \"scaffold\"").strategy.is_scaffold());
    assert_eq!(
        ok("kind = \"fedavgm\"").strategy,
        Strategy::Fedavgm { server_learning_rate: 1.0, momentum: 0.9, weighting: Weighting::Samples }
    );
    for robust in ["kind = \"median\"", "kind = \"trimmed_mean\"\ntrim = 0.2"] {
        let p = ok(robust);
        assert!(p.strategy.is_robust());
        assert_eq!(p.strategy.weighting(), Weighting::Uniform, "coordinate-wise rules count every update the same");
    }
    let refused = |s: &str, extra: &str, field: &str, words: &str| {
        let e = with(s, extra).unwrap_err().to_string();
        assert!(e.contains(field) && e.contains(words), "{s} / {extra}: {e}");
    };
    let secagg = "secure_aggregation = true";
    let client_dp = "[privacy]\nmode = \"client\"\nnoise_multiplier = 1.0\nclip_norm = 1.0\ndelta = 1e-5";
    refused("kind = \"median\"", secagg, "strategy", "reveals only their sum");
    refused("kind = \"trimmed_mean\"\ntrim = 0.1", client_dp, "strategy", "calibrated to a mean");
    refused("kind = \"trimmed_mean\"\ntrim = 0.5", "", "strategy.trim", "[0, 0.5)");
    refused("kind = \"multi_krum\"\nbyzantine = 2", "", "min_nodes", "2f + 3 = 7");
    assert!(ok("kind = \"multi_krum\"\nbyzantine = 1").strategy.is_robust(), "5 nodes hold f = 1");
    refused("kind = \"scaffold\"\nweighting = \"uniform\"", client_dp, "strategy", "not accounted");
    refused("kind = \"scaffold\"", secagg, "strategy", "secure aggregation");
    refused("kind = \"fedprox\"\nmu = -1", "", "strategy.mu", "≥ 0");
    refused("kind = \"fedprox\"\nmu = 200", "", "strategy.mu", "diverges");
    assert_eq!(ok("kind = \"multi_krum\"\nbyzantine = 1").strategy.weighting(), Weighting::Uniform);
    refused("kind = \"fedavgm\"\nmomentum = 1.0", "", "strategy.momentum", "[0, 1)");
    let adam = PLAN.replace("steps = 3\n", "steps = 3\noptimizer = \"adam\"\n");
    let adam = adam.replace("kind = \"fedadam\"\nserver_learning_rate = 0.01", "kind = \"scaffold\"");
    let e = Plan::parse(&adam).unwrap_err().to_string();
    assert!(e.contains("plain SGD"), "{e}");
    // SCAFFOLD's global model carries c after the model's own tensors, c starting at zero.
    let p = ok("kind = \"scaffold\"");
    let layout = p.global_layout();
    assert_eq!(layout.len(), 4);
    assert_eq!(layout[2].name, format!("{CONTROL_VARIATE_PREFIX}fc.weight"));
    let g = p.initial_global();
    assert_eq!(&g.values()[..14], p.model.init(p.seed).values());
    assert!(g.values()[14..].iter().all(|v| *v == 0.0));
    // `init = "pytorch"` starts from PyTorch's weights, and keeps the plan id of plans without it.
    let torch = with("kind = \"fedavg\"", "init = \"pytorch\"").unwrap();
    assert_eq!(torch.initial_global(), crate::torch_init::pytorch_init(torch.model.layout(), 0));
    assert!(!ok("kind = \"fedavg\"").to_wire_toml().unwrap_or_default().contains("init"));
}
