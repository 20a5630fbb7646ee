//! The zoo's caches (`demo/zoo/caches.toml`) for `cargo xtask bench`: each built the way its
//! language's release builds usually are, watched by naming its three functions alone.
use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result};
use serde::Deserialize;

use crate::{run_cmd, workspace_root};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Cache {
    source: String,
    functions: [String; 3],
    miss_ret: Option<String>,
}

#[derive(Deserialize)]
struct Manifest {
    cache: Vec<Cache>,
}

/// One build of one zoo cache.
pub struct Build {
    /// The source and how it was built.
    pub name: String,
    pub binary: PathBuf,
    /// `racewatch watch`'s arguments for it, before `--`.
    pub watch: Vec<String>,
}

/// Each C and C++ cache by gcc and by clang at -O2, each Rust cache at opt-level 3 (cargo's
/// release profile), all with symbols and DWARF.
pub fn builds() -> Result<Vec<Build>> {
    let dir = workspace_root().join("demo/zoo");
    let path = dir.join("caches.toml");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let manifest: Manifest =
        toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
    let out = workspace_root().join("target/bench-zoo");
    std::fs::create_dir_all(&out)?;
    let mut builds = Vec::new();
    for cache in &manifest.cache {
        let compilers: &[(&str, &[&str])] = match cache.source.rsplit_once('.').map(|(_, e)| e) {
            Some("rs") => &[("rustc", &["--edition", "2021", "-C", "opt-level=3"])],
            Some("cpp") => &[
                ("g++", &["-std=c++17", "-pthread", "-O2"]),
                ("clang++", &["-std=c++17", "-pthread", "-O2"]),
            ],
            _ => &[
                ("gcc", &["-pthread", "-O2"]),
                ("clang", &["-pthread", "-O2"]),
            ],
        };
        for (compiler, flags) in compilers {
            let name = format!("{} {compiler} {}", cache.source, flags.last().unwrap());
            let binary = out.join(name.replace([' ', '='], "_"));
            run_cmd(
                Command::new(compiler)
                    .args(*flags)
                    .arg("-g")
                    .arg("-o")
                    .arg(&binary)
                    .arg(dir.join(&cache.source)),
            )
            .with_context(|| format!("building {name} (cargo xtask setup installs {compiler})"))?;
            let [clear, update, lookup] = &cache.functions;
            let mut watch: Vec<String> = ["watch", "--clear", clear, "--update", update]
                .into_iter()
                .chain(["--lookup", lookup])
                .map(String::from)
                .collect();
            if let Some(miss) = &cache.miss_ret {
                watch.extend(["--miss-ret".into(), miss.clone()]);
            }
            builds.push(Build {
                name,
                binary,
                watch,
            });
        }
    }
    Ok(builds)
}
