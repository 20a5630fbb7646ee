//! What racewatch needs from this kernel and this user, checked before anything is loaded so a
//! failure says what to do instead of an errno.
use std::path::Path;

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error(
        "racewatch needs root, or the capabilities CAP_BPF and CAP_PERFMON (missing: {missing}): \
         run it with sudo"
    )]
    Capabilities { missing: String },
    #[error(
        "this kernel has no uprobe support ({path} is missing): racewatch needs a kernel built \
         with CONFIG_UPROBE_EVENTS"
    )]
    NoUprobes { path: &'static str },
}

/// The effective capability set of this process, from /proc/self/status.
pub fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// The capabilities racewatch lacks, by name; empty when it has enough.
pub fn missing_caps(caps: u64) -> Vec<&'static str> {
    let has = |c: u32| caps & (1 << c) != 0;
    if has(CAP_SYS_ADMIN) {
        return Vec::new();
    }
    [(CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")]
        .into_iter()
        .filter(|(c, _)| !has(*c))
        .map(|(_, name)| name)
        .collect()
}

pub const UPROBE_PMU: &str = "/sys/bus/event_source/devices/uprobe/type";

pub fn check() -> Result<(), PreflightError> {
    let missing = missing_caps(effective_caps());
    if !missing.is_empty() {
        return Err(PreflightError::Capabilities {
            missing: missing.join(", "),
        });
    }
    if !Path::new(UPROBE_PMU).exists() {
        return Err(PreflightError::NoUprobes { path: UPROBE_PMU });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_like_caps_need_nothing() {
        assert!(missing_caps(1 << CAP_SYS_ADMIN).is_empty());
        assert!(missing_caps((1 << CAP_BPF) | (1 << CAP_PERFMON)).is_empty());
    }

    #[test]
    fn names_each_missing_cap() {
        assert_eq!(missing_caps(0), vec!["CAP_BPF", "CAP_PERFMON"]);
        assert_eq!(missing_caps(1 << CAP_BPF), vec!["CAP_PERFMON"]);
    }
}
