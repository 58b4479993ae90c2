//! Makes `sanctum-node` run without `LD_LIBRARY_PATH` and keeps libtorch_cuda linked.
//!
//! torch-sys declares `links = "tch"`, so its build script hands us the libtorch it linked
//! against as `DEP_TCH_LIBTORCH_LIB`. We embed that directory as an rpath, and when the libtorch
//! carries CUDA we link `libtorch_cuda.so` with `--no-as-needed`: nothing in our code calls it
//! directly, so the linker would otherwise drop it and CUDA would never be found at run time.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let lib_dir = std::env::var_os("DEP_TCH_LIBTORCH_LIB")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("LIBTORCH").map(|p| PathBuf::from(p).join("lib")));
    let Some(lib_dir) = lib_dir else {
        println!("cargo:warning=libtorch location unknown: binaries will need LD_LIBRARY_PATH");
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    let cuda = lib_dir.join("libtorch_cuda.so");
    if cuda.exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg={}", cuda.display());
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
