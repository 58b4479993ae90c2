//! Bad configuration and bad PKI input: clear errors naming the cause, exit code 64 for configs,
//! and nothing overwritten.

#![allow(clippy::unwrap_used)] // a test helper: a failed spawn is a failed test

use std::process::Command;

use sanctum_tests::{Consortium, bin};

fn run(cmd: &mut Command) -> (i32, String) {
    let out = cmd.env_remove("LD_LIBRARY_PATH").output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{text}");
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn bad_configs_exit_64_and_name_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.toml");
    let (code, text) = run(Command::new(bin("sanctum-node")).args(["run", "--config"]).arg(&missing));
    assert_eq!(code, 64);
    assert!(text.contains("nope.toml") && text.contains("cannot read"), "{text}");

    let typo = dir.path().join("node.toml");
    std::fs::write(
        &typo,
        "coordinator = \"localhost:1\"\nstate_dir = \"s\"\ndevcie = \"cpu\"\n[tls]\nca=\"a\"\ncert=\"b\"\nkey=\"c\"\n",
    )
    .unwrap();
    let (code, text) = run(Command::new(bin("sanctum-node")).args(["run", "--config"]).arg(&typo));
    assert_eq!(code, 64);
    assert!(text.contains("devcie") && text.contains("line 3"), "{text}");

    let no_certs = dir.path().join("coordinator.toml");
    std::fs::write(
        &no_certs,
        "listen = \"127.0.0.1:0\"\nstate_dir = \"s\"\n[tls]\nca=\"ca.pem\"\ncert=\"c.pem\"\nkey=\"c.key\"\n",
    )
    .unwrap();
    let (code, text) = run(Command::new(bin("sanctum-coordinator")).args(["serve", "--config"]).arg(&no_certs));
    assert_eq!(code, 64);
    assert!(text.contains("ca.pem") && text.contains("[tls] section"), "{text}");
    assert!(!text.contains("listening on"), "a bad config must fail before binding a port");
}

#[test]
fn pki_refuses_to_overwrite_a_ca_and_rejects_garbage_requests() {
    let c = Consortium::new();
    let ca_before = std::fs::read(c.pki().join("ca.key")).unwrap();
    let (code, text) = run(Command::new(bin("sanctum-coordinator")).args(["pki", "init", "--dir"]).arg(c.pki()));
    assert_ne!(code, 0);
    assert!(text.contains("already exists"), "{text}");
    assert_eq!(std::fs::read(c.pki().join("ca.key")).unwrap(), ca_before, "the CA key was touched");

    let csr = c.dir.path().join("garbage.csr");
    std::fs::write(&csr, "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n").unwrap();
    let (code, text) = run(Command::new(bin("sanctum-coordinator"))
        .args(["pki", "sign", "--dir"])
        .arg(c.pki())
        .arg("--csr")
        .arg(&csr)
        .args(["--name", "x", "--role", "node"]));
    assert_ne!(code, 0);
    assert!(text.contains("certificate request is not valid"), "{text}");

    let (code, text) = run(Command::new(bin("sanctum-coordinator"))
        .args(["pki", "sign", "--dir"])
        .arg(c.pki())
        .arg("--csr")
        .arg(&csr)
        .args(["--name", "Bad Name", "--role", "node"]));
    assert_ne!(code, 0);
    assert!(text.contains("invalid member name"), "{text}");

    // A hospital's key is never overwritten by a second request.
    let out = c.dir.path().join("keys");
    let req = |out: &std::path::Path| {
        run(Command::new(bin("sanctum-node")).args(["pki", "request", "--name", "va", "--out-dir"]).arg(out))
    };
    assert_eq!(req(&out).0, 0);
    let key = std::fs::read(out.join("va.key")).unwrap();
    let (code, text) = req(&out);
    assert_ne!(code, 0);
    assert!(text.contains("never overwritten"), "{text}");
    assert_eq!(std::fs::read(out.join("va.key")).unwrap(), key);
}

#[test]
fn privacy_commands_answer_the_public_check_from_both_binaries() {
    for binary in ["sanctum-coordinator", "sanctum-node"] {
        let (code, text) = run(Command::new(bin(binary)).args([
            "privacy",
            "epsilon",
            "--sampling-rate",
            "0.0042666666666666667",
            "--noise-multiplier",
            "1.1",
            "--steps",
            "14040",
            "--delta",
            "1e-5",
            "--json",
        ]));
        assert_eq!(code, 0, "{text}");
        let report: serde_json::Value = serde_json::from_str(&text).unwrap();
        // Abadi et al.'s MNIST setting: RDP ε ≈ 2.594 (Opacus), PLD ε ≈ 2.38 (dp_accounting).
        assert!((report["rdp_epsilon"].as_f64().unwrap() - 2.594).abs() < 1e-3, "{text}");
        assert!((report["pld_epsilon"].as_f64().unwrap() - 2.380).abs() < 1e-3, "{text}");
    }
    let (code, text) = run(Command::new(bin("sanctum-node")).args([
        "privacy",
        "epsilon",
        "--sampling-rate",
        "2",
        "--noise-multiplier",
        "1",
        "--steps",
        "3",
        "--delta",
        "1e-5",
    ]));
    assert_ne!(code, 0);
    assert!(text.contains("sampling rate 2 is not in (0, 1]"), "{text}");
}

#[test]
fn a_second_node_on_the_same_state_directory_refuses_to_start() {
    let c = Consortium::new();
    // No coordinator is needed: the first node holds its state directory while it retries.
    let first = sanctum_tests::NodeProcess::start_serving(
        &c,
        "cleveland",
        "localhost:1",
        &sanctum_tests::heart_data("cleveland"),
        "",
    );
    assert!(
        sanctum_tests::wait_until(std::time::Duration::from_secs(30), || first.state_dir().join("LOCK").exists()),
        "the first node never locked its state directory:\n{}",
        first.log_text()
    );
    let log = first.config.with_file_name("second.log");
    let mut second = Command::new(bin("sanctum-node"))
        .args(["run", "--config"])
        .arg(&first.config)
        .env_remove("LD_LIBRARY_PATH")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // Without the lock the second node would share the ledger and run on: it must stop at once.
    let stopped =
        sanctum_tests::wait_until(std::time::Duration::from_secs(20), || matches!(second.try_wait(), Ok(Some(_))));
    let _ = second.kill();
    let status = second.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(stopped && !status.success(), "the second node did not refuse to start ({status}):\n{text}");
    assert!(text.contains("in use by another sanctum-node process"), "{text}");
    // The ledger it would have shared is untouched and the first node is still running.
    assert!(first.ledger().is_empty());
    let log = first.log_text();
    assert!(!log.contains("panicked"), "{log}");
}
