//! Separate debug files from debuginfod servers (`DEBUGINFOD_URLS`), fetched by elfutils'
//! `debuginfod-find` into the client cache gdb and perf share; tried after the local places
//! (`/usr/lib/debug/.build-id`, `.gnu_debuglink`), as they try it.
use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

/// The debug file of the build `build_id` (hex), when a server has it.
pub fn debuginfo(build_id: &str) -> Option<PathBuf> {
    std::env::var_os("DEBUGINFOD_URLS").filter(|u| !u.is_empty())?;
    let out = match Command::new("debuginfod-find")
        .args(["debuginfo", build_id])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            eprintln!(
                "racewatch: DEBUGINFOD_URLS is set but debuginfod-find cannot run ({e}): install \
                 elfutils' debuginfod client (Debian: the debuginfod package)"
            );
            return None;
        }
    };
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    (out.status.success() && path.is_file()).then_some(path)
}
