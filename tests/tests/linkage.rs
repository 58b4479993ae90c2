//! The node binary finds libtorch without `LD_LIBRARY_PATH`, keeps libtorch_cuda linked when the
//! libtorch it was built against has it, and says which device `auto` chose.

use std::process::Command;

use sanctum_tests::{Consortium, HEART_SCHEMA, bin, heart_data, run_ok};

#[test]
fn node_binary_keeps_libtorch_cuda_and_starts_without_ld_library_path() {
    let node = bin("sanctum-node");
    let readelf = Command::new("readelf").arg("-d").arg(&node).output().expect("readelf (binutils) is installed");
    let dynamic = String::from_utf8_lossy(&readelf.stdout);
    println!("{dynamic}");
    assert!(dynamic.contains("libtorch_cpu.so"), "not linked against libtorch");
    assert!(dynamic.contains("RUNPATH") || dynamic.contains("RPATH"), "no rpath: LD_LIBRARY_PATH would be needed");
    let libtorch = std::env::var("LIBTORCH").expect("scripts/test exports LIBTORCH");
    let has_cuda = std::path::Path::new(&libtorch).join("lib/libtorch_cuda.so").exists();
    println!("LIBTORCH={libtorch} (libtorch_cuda.so present: {has_cuda})");
    if has_cuda {
        assert!(dynamic.contains("[libtorch_cuda.so]"), "libtorch_cuda.so was dropped by the linker");
    }

    // Starts, loads libtorch, and reports the device `auto` picked.
    let c = Consortium::new();
    let files = c.member("cleveland", "node");
    let dir = c.dir.path().join("members/cleveland");
    let config = dir.join("node.toml");
    std::fs::write(
        &config,
        format!(
            "coordinator = \"localhost:1\"\ndevice = \"auto\"\nstate_dir = \"state\"\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n[[datasets]]\nschema = {HEART_SCHEMA:?}\npath = {:?}\n",
            files.ca,
            files.cert,
            files.key,
            heart_data("cleveland")
        ),
    )
    .unwrap();
    let out = run_ok(Command::new(&node).args(["check", "--config"]).arg(&config).env_remove("LD_LIBRARY_PATH"));
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(text.contains("identity: cleveland (node)"));
    assert!(text.contains("device:   cpu") || text.contains("device:   cuda:0"));
    assert!(text.contains("heart_disease") && text.contains("199 train rows, 104 test rows"));
}
