//! Installs what the eBPF build needs on a fresh machine: the nightly toolchain's rust-src and a
//! bpf-linker built against that toolchain's own LLVM (no prebuilt one can be downloaded here,
//! and the distribution's LLVM is too old). Every step checks first, so running it again is free.
//! As root, it also keeps the Debian roots the container tests run their interpreters and demos
//! in.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

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

/// clang, the zoo's second C and C++ compiler (`detector-user/tests/zoo.rs` builds every cache
/// with gcc and with clang).
fn ensure_clang() -> Result<()> {
    ensure_apt("clang", "clang", "for the zoo's clang builds")
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

/// What `cargo xtask dist` needs on top of the build: the musl target of the stable toolchain
/// (a static binary runs on any glibc), cargo-deb, and maturin in a venv of its own under
/// `tools` (never the system's Python). Returns the maturin executable.
pub fn ensure_dist(tools: &Path) -> Result<PathBuf> {
    let targets = output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if !targets.lines().any(|t| t == crate::dist::TARGET) {
        eprintln!("setup: adding the {} target", crate::dist::TARGET);
        run_cmd(Command::new("rustup").args(["target", "add", crate::dist::TARGET]))?;
    }
    if !Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        eprintln!("setup: installing cargo-deb");
        run_cmd(Command::new("cargo").args(["install", "cargo-deb", "--locked"]))?;
    }
    let venv = tools.join("maturin");
    let maturin = venv.join("bin/maturin");
    let current = Command::new(&maturin)
        .arg("--version")
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout).trim() == format!("maturin {MATURIN_VERSION}")
        });
    if !current {
        eprintln!(
            "setup: installing maturin {MATURIN_VERSION} into {}",
            venv.display()
        );
        run_cmd(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        run_cmd(Command::new(venv.join("bin/pip")).args([
            "install",
            "--quiet",
            &format!("maturin=={MATURIN_VERSION}"),
        ]))?;
    }
    Ok(maturin)
}

const MATURIN_VERSION: &str = "1.16.0";

/// Where the Debian roots are kept (`RACEWATCH_ROOTS` overrides it); detector-user/tests/common
/// names the same directory.
pub const ROOTS: &str = "/var/cache/racewatch/roots";

pub fn roots_dir() -> PathBuf {
    std::env::var_os("RACEWATCH_ROOTS").map_or_else(|| PathBuf::from(ROOTS), PathBuf::from)
}

/// Each root: its directory under [`ROOTS`] (the Debian suite it is built from) and the packages
/// it must hold.
const ROOT_SUITES: [(&str, &[&str]); 2] = [
    // python3.13-venv: the install test puts the wheel in a venv with the root's own pip.
    ("trixie", &["python3.13", "libstdc++6", "python3.13-venv"]),
    ("sid", &["python3.14", "libstdc++6"]),
];

/// The packages of `wanted` that dpkg in `root` does not have installed (all of them when the
/// root holds no dpkg database).
fn missing_packages<'a>(root: &Path, wanted: &[&'a str]) -> Vec<&'a str> {
    let status = fs::read_to_string(root.join("var/lib/dpkg/status")).unwrap_or_default();
    let installed: Vec<&str> = status
        .split("\n\n")
        .filter(|stanza| stanza.lines().any(|l| l == "Status: install ok installed"))
        .filter_map(|stanza| stanza.lines().find_map(|l| l.strip_prefix("Package: ")))
        .collect();
    wanted
        .iter()
        .copied()
        .filter(|p| !installed.contains(p))
        .collect()
}

/// Builds `dir` from Debian's `suite` with `packages`, in `dir.tmp` first so that an
/// interrupted build never looks complete.
fn debootstrap(suite: &str, packages: &[&str], dir: &Path) -> Result<()> {
    let tmp = dir.with_extension("tmp");
    if tmp.exists() {
        fs::remove_dir_all(&tmp).with_context(|| format!("cannot remove {}", tmp.display()))?;
    }
    run_cmd(
        Command::new("debootstrap")
            .arg("--variant=minbase")
            .arg(format!("--include={}", packages.join(",")))
            .arg(suite)
            .arg(&tmp),
    )?;
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    fs::rename(&tmp, dir)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), dir.display()))
}

/// The Debian roots the container tests use, built once (about 30 s each) and completed when an
/// earlier build lacks a package.
fn ensure_roots() -> Result<()> {
    if !crate::is_root() {
        eprintln!(
            "setup: not root: the Debian roots in {} are left as they are",
            roots_dir().display()
        );
        return Ok(());
    }
    let roots = roots_dir();
    fs::create_dir_all(&roots).with_context(|| format!("cannot create {}", roots.display()))?;
    for (suite, packages) in ROOT_SUITES {
        let dir = roots.join(suite);
        let missing = missing_packages(&dir, packages);
        let state = if missing.is_empty() {
            "present"
        } else if missing.len() < packages.len() {
            eprintln!("setup: adding {} to the {suite} root", missing.join(", "));
            let added = run_cmd(
                Command::new("chroot")
                    .arg(&dir)
                    .args(["apt-get", "install", "-y", "--no-install-recommends"])
                    .args(&missing),
            );
            if let Err(e) = added {
                eprintln!("setup: {e:#}: building the {suite} root again");
                debootstrap(suite, packages, &dir)?;
            }
            "completed"
        } else {
            ensure_apt(
                "debootstrap",
                "debootstrap",
                "to build the Debian roots the container tests use",
            )?;
            eprintln!("setup: building the {suite} root (about 30 s)");
            debootstrap(suite, packages, &dir)?;
            "built"
        };
        let still = missing_packages(&dir, packages);
        if !still.is_empty() {
            bail!(
                "the {suite} root in {} lacks {}",
                dir.display(),
                still.join(", ")
            );
        }
        eprintln!(
            "setup: root {} ({}): {state}",
            dir.display(),
            packages.join(", ")
        );
    }
    Ok(())
}

pub fn ensure() -> Result<()> {
    ensure_toolchain()?;
    ensure_bpf_linker()?;
    ensure_cxx()?;
    ensure_clang()?;
    ensure_apt(
        "prometheus",
        "prometheus",
        "to scrape racewatch's metrics in the tests",
    )?;
    ensure_apt(
        "debuginfod-find",
        "debuginfod",
        "to serve and fetch debug files in the tests",
    )?;
    ensure_cargo_fuzz()?;
    ensure_roots()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_package_counts_once_dpkg_has_it_installed() {
        let root = std::env::temp_dir().join(format!("racewatch-setup-{}", std::process::id()));
        fs::create_dir_all(root.join("var/lib/dpkg")).unwrap();
        fs::write(
            root.join("var/lib/dpkg/status"),
            "Package: libstdc++6\nStatus: install ok installed\nVersion: 14.2.0-19\n\n\
             Package: python3.13\nStatus: deinstall ok config-files\nVersion: 3.13.5-2\n",
        )
        .unwrap();
        let wanted = ["python3.13", "libstdc++6"];
        assert_eq!(missing_packages(&root, &wanted), ["python3.13"]);
        assert_eq!(missing_packages(&root.join("none"), &wanted), wanted);
        fs::remove_dir_all(&root).unwrap();
    }
}
