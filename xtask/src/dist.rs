//! `cargo xtask dist`: racewatch as people install it. One static release build (musl, so it runs
//! on any x86_64 Linux whatever its libc), with its eBPF object embedded as every build has, and
//! from it, in `<target>/dist/`: a Python wheel (maturin's `bin` bindings: `pip install` puts
//! `racewatch` on PATH) and a `.deb` (cargo-deb); `dist/Dockerfile` makes the image for the
//! system-wide mode from the same binary.
//! The manual pages and completions come from the binary itself (`racewatch man`, `racewatch
//! completions`), so they always match its clap definitions. Cargo keeps the build incremental;
//! the packages are remade each time, which takes seconds.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{run_cmd, setup, workspace_root};

/// The target the shipped binary is built for: static, no libc of the host's needed.
pub const TARGET: &str = "x86_64-unknown-linux-musl";

/// Cargo's target directory (`CARGO_TARGET_DIR` and `.cargo/config` included).
pub fn target_dir() -> Result<PathBuf> {
    let out = Command::new(env!("CARGO"))
        .current_dir(workspace_root())
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("cannot run cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("cargo metadata's output")?;
    meta["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .context("cargo metadata names no target_directory")
}

/// Runs `racewatch ARGS` and returns its stdout.
fn racewatch_output(racewatch: &Path, args: &[&str]) -> Result<Vec<u8>> {
    let out = Command::new(racewatch)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {}", racewatch.display()))?;
    if !out.status.success() {
        bail!(
            "racewatch {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

/// The manual pages (gzipped, as Debian installs them) and the bash, zsh and fish completions,
/// in `share` laid out as under `/usr/share`.
fn generate_docs(racewatch: &Path, share: &Path) -> Result<()> {
    if share.exists() {
        // A subcommand removed since the last run must not leave its page behind.
        fs::remove_dir_all(share).with_context(|| format!("cannot remove {}", share.display()))?;
    }
    let man1 = share.join("man/man1");
    fs::create_dir_all(&man1)?;
    racewatch_output(racewatch, &["man", &man1.to_string_lossy()])?;
    for page in fs::read_dir(&man1)? {
        // -n: no name or time stamp in the header, so the same page gives the same bytes.
        run_cmd(Command::new("gzip").args(["-9nf"]).arg(page?.path()))?;
    }
    for (shell, file) in [
        ("bash", "bash-completion/completions/racewatch"),
        ("zsh", "zsh/vendor-completions/_racewatch"),
        ("fish", "fish/vendor_completions.d/racewatch.fish"),
    ] {
        let path = share.join(file);
        fs::create_dir_all(path.parent().context("a completion's directory")?)?;
        fs::write(&path, racewatch_output(racewatch, &["completions", shell])?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// The single file in `dir` whose name starts with `prefix` and ends with `suffix`.
fn only_file(dir: &Path, prefix: &str, suffix: &str) -> Result<PathBuf> {
    let found: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix) && n.ends_with(suffix))
        })
        .collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!(
            "expected one {prefix}*{suffix} in {}, found {found:?}",
            dir.display()
        ),
    }
}

/// Starts `dir` afresh (the packages of an older version must not be taken for these).
fn fresh_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}

/// Builds the packages; returns the directory that holds them.
pub fn run() -> Result<PathBuf> {
    let target = target_dir()?;
    let maturin = setup::ensure_dist(&target.join("dist-tools"))?;
    let release = target.join(TARGET).join("release");
    let dir = target.join("dist");
    fresh_dir(&dir)?;

    run_cmd(
        Command::new(env!("CARGO"))
            .current_dir(workspace_root())
            .args(["build", "--release", "--package", "detector-user"])
            .args(["--target", TARGET]),
    )?;
    let racewatch = release.join("racewatch");
    // Under `target/release/`, where cargo-deb's asset paths point (it maps them to the
    // target's own directory).
    let share = release.join("share");
    generate_docs(&racewatch, &share)?;

    run_cmd(
        Command::new(env!("CARGO"))
            .current_dir(workspace_root())
            // Not stripped: `racewatch calibrate` and the end-of-run cost find racewatch's own
            // functions by their symbols.
            .args([
                "deb",
                "--package",
                "detector-user",
                "--no-build",
                "--no-strip",
            ])
            .args(["--target", TARGET, "--output"])
            .arg(&dir),
    )?;
    let deb = only_file(&dir, "racewatch_", ".deb")?;

    let wheel = build_wheel(&maturin, &share, &dir)?;
    eprintln!(
        "dist: {}\n      {}\n      {}",
        racewatch.display(),
        deb.display(),
        wheel.display()
    );
    Ok(dir)
}

/// Copies the tree `from` into `to`.
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from).with_context(|| format!("cannot list {}", from.display()))? {
        let entry = entry?;
        let dest = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &dest)?;
        } else {
            fs::copy(entry.path(), &dest)
                .with_context(|| format!("cannot copy {}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// The wheel, by maturin from `detector-user/pyproject.toml`. maturin takes a wheel's data files
/// only from beside the pyproject.toml it reads, so it reads a copy in a directory of generated
/// files, with its readme, the crate's manifest named, with `share` as the data that pip installs under the
/// environment's prefix (`VENV/share/man/man1`, where `man` looks for a `VENV/bin` on PATH).
fn build_wheel(maturin: &Path, share: &Path, out: &Path) -> Result<PathBuf> {
    let crate_dir = workspace_root().join("detector-user");
    let stage = out.with_file_name("dist-wheel");
    fresh_dir(&stage)?;
    let pyproject = fs::read_to_string(crate_dir.join("pyproject.toml"))?;
    let mut staged = String::new();
    for line in pyproject.lines() {
        match line
            .strip_prefix("readme = \"")
            .and_then(|r| r.strip_suffix('"'))
        {
            Some(readme) => {
                // maturin wants the readme beside (or below) the pyproject.toml.
                let from = crate_dir.join(readme);
                let name = from.file_name().context("the readme's file name")?;
                fs::copy(&from, stage.join(name))
                    .with_context(|| format!("cannot copy {}", from.display()))?;
                staged += &format!("readme = {:?}\n", name.to_string_lossy());
            }
            None => staged += &format!("{line}\n"),
        }
    }
    // [tool.maturin] is the file's last table.
    staged += &format!(
        "manifest-path = {:?}\n",
        crate_dir.join("Cargo.toml").display().to_string()
    );
    fs::write(stage.join("pyproject.toml"), staged)?;
    copy_tree(share, &stage.join("racewatch.data/data/share"))?;
    run_cmd(
        Command::new(maturin)
            .current_dir(&stage)
            .args(["build", "--release", "--quiet", "--target", TARGET, "--out"])
            .arg(out),
    )?;
    only_file(out, "racewatch-", ".whl")
}
