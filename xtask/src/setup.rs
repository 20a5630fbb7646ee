//! Installs what the eBPF build needs on a fresh machine: the nightly toolchain's rust-src and a
//! bpf-linker built against that toolchain's own LLVM (no prebuilt one can be downloaded here,
//! and the distribution's LLVM is too old). Every step checks first, so running it again is free.
use std::{fs, path::PathBuf, process::Command};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::run_cmd;

const TOOLCHAIN: &str = "nightly";
const BPF_LINKER_VERSION: &str = "0.13.0";

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn ensure_toolchain() -> Result<()> {
    let installed = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !installed.lines().any(|l| l.starts_with(TOOLCHAIN)) {
        eprintln!("setup: installing the {TOOLCHAIN} toolchain");
        run_cmd(Command::new("rustup").args([
            "toolchain",
            "install",
            TOOLCHAIN,
            "--profile",
            "minimal",
        ]))?;
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        TOOLCHAIN,
    ]))?;
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("setup: adding rust-src to {TOOLCHAIN} (the eBPF crate builds core from source)");
        run_cmd(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            TOOLCHAIN,
        ]))?;
    }
    Ok(())
}

/// The nightly toolchain's libLLVM (`libLLVM-NN-rust-VERSION-nightly.so`): its file stem for the
/// linker flag and its major version for bpf-linker's `llvm-NN` feature.
fn nightly_llvm() -> Result<(PathBuf, String, String)> {
    let sysroot = PathBuf::from(output(
        Command::new("rustc")
            .arg(format!("+{TOOLCHAIN}"))
            .args(["--print", "sysroot"]),
    )?);
    let lib = sysroot.join("lib");
    for entry in fs::read_dir(&lib).with_context(|| format!("cannot list {}", lib.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_prefix("lib").and_then(|n| n.strip_suffix(".so"))
            && let Some(rest) = stem.strip_prefix("LLVM-")
            && let Some((major, _)) = rest.split_once('-')
        {
            return Ok((lib.clone(), stem.to_string(), major.to_string()));
        }
    }
    Err(anyhow!(
        "no libLLVM-NN-rust-*.so in {}: is the {TOOLCHAIN} toolchain complete?",
        lib.display()
    ))
}

fn bpf_linker_installed() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
        })
}

fn ensure_bpf_linker() -> Result<()> {
    if bpf_linker_installed() {
        return Ok(());
    }
    let (lib, stem, major) = nightly_llvm()?;
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against the {TOOLCHAIN} toolchain's LLVM {major} (about a minute)"
    );
    let rustflags = format!(
        "-L {} -l dylib={stem} -C link-arg=-Wl,-rpath,{}",
        lib.display(),
        lib.display()
    );
    run_cmd(
        Command::new("cargo")
            .arg(format!("+{TOOLCHAIN}"))
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
            ])
            .args(["--features", &format!("llvm-{major},no-llvm-linking")])
            .env("RUSTFLAGS", rustflags),
    )?;
    if !bpf_linker_installed() {
        bail!("bpf-linker was installed but is not on PATH: add ~/.cargo/bin to PATH");
    }
    Ok(())
}

/// Debian's `package`, unless `command` already answers `--version`.
pub fn ensure_apt(command: &str, package: &str, why: &str) -> Result<()> {
    if Command::new(command)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }
    eprintln!("setup: installing {package} {why}");
    run_cmd(Command::new("apt-get").arg("update"))?;
    run_cmd(Command::new("apt-get").args(["install", "-y", package]))
}

/// The C++ compiler for the native demo.
fn ensure_cxx() -> Result<()> {
    ensure_apt("g++", "g++", "for the native demo")
}

/// The font the benchmark's chart is lettered in (Debian's fonts-dejavu-core).
pub fn ensure_font(path: &str) -> Result<()> {
    if std::path::Path::new(path).exists() {
        return Ok(());
    }
    eprintln!("setup: installing fonts-dejavu-core for the benchmark chart");
    run_cmd(Command::new("apt-get").arg("update"))?;
    run_cmd(Command::new("apt-get").args(["install", "-y", "fonts-dejavu-core"]))
}

/// cargo-fuzz, for the fuzz targets `cargo xtask test` runs.
fn ensure_cargo_fuzz() -> Result<()> {
    if Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }
    eprintln!("setup: installing cargo-fuzz");
    run_cmd(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))
}

pub fn ensure() -> Result<()> {
    ensure_toolchain()?;
    ensure_bpf_linker()?;
    ensure_cxx()?;
    ensure_apt(
        "prometheus",
        "prometheus",
        "to scrape racewatch's metrics in the tests",
    )?;
    ensure_cargo_fuzz()
}
