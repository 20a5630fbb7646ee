//! Builds the eBPF object (detector-ebpf's `detector` binary) for the BPF target with aya-build;
//! main.rs embeds it from OUT_DIR. Also names the commit the binary is built from
//! (`RACEWATCH_COMMIT`, for `racewatch --version`).
use std::{path::PathBuf, process::Command};

/// `git rev-parse ARGS` in this crate's directory, or None outside a git checkout.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(env!("CARGO_MANIFEST_DIR"))
        .arg("rev-parse")
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn commit() -> String {
    // Rebuilt when HEAD moves: HEAD names a branch whose ref changes at each commit (loose, or
    // packed); a worktree keeps its HEAD apart from the refs it shares.
    if let (Some(git_dir), Some(common)) = (
        git(&["--path-format=absolute", "--git-dir"]),
        git(&["--path-format=absolute", "--git-common-dir"]),
    ) {
        let mut watched = vec![PathBuf::from(&git_dir).join("HEAD")];
        watched.push(PathBuf::from(&common).join("packed-refs"));
        if let Some(branch) = git(&["--symbolic-full-name", "HEAD"]).filter(|b| b != "HEAD") {
            watched.push(PathBuf::from(&common).join(branch));
        }
        // A path that does not exist would make cargo run this script at every build.
        for path in watched.iter().filter(|p| p.exists()) {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    git(&["--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into())
}

fn main() -> anyhow::Result<()> {
    println!("cargo:rustc-env=RACEWATCH_COMMIT={}", commit());
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../detector-ebpf");
    let ebpf = aya_build::Package {
        name: "detector-ebpf",
        root_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::default())
}
