//! Compiles the C eBPF programs in `loopbpf-ebpf/` with clang into an object the binary embeds.

use std::{env, path::PathBuf, process::Command};

fn main() {
    let ebpf_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap()).join("../loopbpf-ebpf");
    let source = ebpf_dir.join("loopbpf.bpf.c");
    let header = ebpf_dir.join("loopbpf.h");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("loopbpf.bpf.o");
    println!("cargo:rerun-if-changed={}", source.display());
    println!("cargo:rerun-if-changed={}", header.display());
    println!("cargo:rerun-if-env-changed=LOOPBPF_CLANG");

    let clang = env::var("LOOPBPF_CLANG").unwrap_or_else(|_| "clang-19".to_owned());
    let status = Command::new(&clang)
        .args(["-target", "bpf", "-g", "-O2", "-D__TARGET_ARCH_x86"])
        .args(["-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter"])
        // The UAPI <asm/...> headers live under the multiarch include directory.
        .args(["-I/usr/include/x86_64-linux-gnu", "-I"])
        .arg(&ebpf_dir)
        .arg("-c")
        .arg(&source)
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| {
            panic!("could not run `{clang}` to build the eBPF programs ({e}): install clang-19 and libbpf-dev (./quickstart.sh does)")
        });
    assert!(
        status.success(),
        "`{clang}` failed to compile {}",
        source.display()
    );
}
