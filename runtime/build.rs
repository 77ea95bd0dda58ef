//! Records the target triple the runtime is compiled for: the key under which
//! it looks for a precompiled guest in a bundle.
fn main() {
    let target = std::env::var("TARGET").expect("cargo sets TARGET");
    println!("cargo:rustc-env=FERRY_TARGET={target}");
    println!("cargo:rerun-if-changed=build.rs");
}
