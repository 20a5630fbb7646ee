//! `racewatch info`: what this kernel and this user allow, one check per feature racewatch uses,
//! each with the fix when it fails. The kernel is asked directly (a tiny map or program is
//! created and dropped) rather than guessed from its version.
use std::path::Path;

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported},
};
use serde::Serialize;

use crate::{probe::preflight, text::escape};

/// Which racewatch commands cannot run without a check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Needed {
    /// `watch` and `python`.
    Both,
    Python,
    /// `--provoke` (its bounded hold in the kernel).
    Provoke,
    /// Watching the processes a target forks (`task_struct`'s layout from BTF).
    Forks,
}

#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    /// What was found.
    pub detail: String,
    /// What to do about a failure (None when it passed).
    pub fix: Option<String>,
    pub needed: Needed,
}

/// Every check, in the order a failure is best read (privileges first: without them the kernel
/// probes that follow cannot answer).
pub fn run() -> Vec<Check> {
    let caps = preflight::missing_caps(preflight::effective_caps());
    let privileged = caps.is_empty();
    let no_privilege_fix = || Some("run racewatch as root (sudo), then check again".to_string());
    let mut checks = vec![Check {
        name: "capabilities",
        ok: privileged,
        detail: if privileged {
            "CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN) held".to_string()
        } else {
            format!("missing {}", caps.join(", "))
        },
        fix: (!privileged).then(|| {
            "run racewatch as root (sudo), or grant it cap_bpf,cap_perfmon+ep (setcap)".to_string()
        }),
        needed: Needed::Both,
    }];
    let map = |name, kind: MapType, what: &str, needed| {
        let result = is_map_supported(kind).map_err(|e| e.io_error);
        kernel_check(name, result, what, needed, privileged, no_privilege_fix)
    };
    checks.push(map(
        "bpf syscall",
        MapType::Array,
        "creating an array map works",
        Needed::Both,
    ));
    checks.push(memlock(checks.last().is_some_and(|c| c.ok), privileged));
    checks.push(kernel_check(
        "uprobe programs",
        is_program_supported(ProgramType::KProbe).map_err(program_io_error),
        "kprobe-type programs load",
        Needed::Both,
        privileged,
        no_privilege_fix,
    ));
    checks.push(path_check(
        "uprobe PMU",
        Path::new(preflight::UPROBE_PMU),
        "the kernel was built without CONFIG_UPROBE_EVENTS: use a kernel that has it",
        Needed::Both,
    ));
    checks.push(map(
        "ring buffer",
        MapType::RingBuf,
        "creating a ring buffer map works",
        Needed::Both,
    ));
    checks.push(map(
        "LRU hash map",
        MapType::LruHash,
        "creating an LRU hash map works",
        Needed::Both,
    ));
    let helper = |name, id, needed| {
        let result = is_helper_supported(ProgramType::KProbe, id).map_err(program_io_error);
        kernel_check(
            name,
            result,
            "the verifier accepts it in a uprobe program",
            needed,
            privileged,
            no_privilege_fix,
        )
    };
    checks.push(helper(
        "bpf_for_each_map_elem",
        BpfHelper::BPF_FUNC_for_each_map_elem,
        Needed::Python,
    ));
    // Each probe finds its configuration through its attach cookie (kernel 5.15+).
    checks.push(helper(
        "attach cookies",
        BpfHelper::BPF_FUNC_get_attach_cookie,
        Needed::Both,
    ));
    checks.push(helper(
        "bpf_loop",
        BpfHelper::BPF_FUNC_loop,
        Needed::Provoke,
    ));
    checks.push(path_check(
        "BTF",
        Path::new("/sys/kernel/btf/vmlinux"),
        "the kernel was built without CONFIG_DEBUG_INFO_BTF: racewatch then cannot tell a forked \
         process from a new thread, so it watches no process the target forks and says so in \
         each run's summary (exit status 4); use a kernel built with BTF",
        Needed::Forks,
    ));
    checks
}

fn program_io_error(e: aya::programs::ProgramError) -> std::io::Error {
    match e {
        aya::programs::ProgramError::SyscallError(s) => s.io_error,
        other => std::io::Error::other(other.to_string()),
    }
}

/// A check that asks the kernel; a refusal for lack of privilege says so rather than "missing".
fn kernel_check(
    name: &'static str,
    result: std::io::Result<bool>,
    what: &str,
    needed: Needed,
    privileged: bool,
    no_privilege_fix: impl Fn() -> Option<String>,
) -> Check {
    let (ok, detail, fix) = match result {
        Ok(true) => (true, what.to_string(), None),
        Ok(false) => (
            false,
            "not supported by this kernel".to_string(),
            Some("use a newer kernel (see README.md for the versions racewatch needs)".into()),
        ),
        Err(e) if !privileged || e.kind() == std::io::ErrorKind::PermissionDenied => (
            false,
            format!("the kernel refused to answer: {e}"),
            no_privilege_fix(),
        ),
        Err(e) => (
            false,
            format!("probing failed: {e}"),
            Some("check dmesg and the kernel's BPF settings".into()),
        ),
    };
    Check {
        name,
        ok,
        detail,
        fix,
        needed,
    }
}

fn path_check(name: &'static str, path: &Path, fix: &str, needed: Needed) -> Check {
    let ok = path.exists();
    Check {
        name,
        ok,
        detail: format!(
            "{} {}",
            path.display(),
            if ok { "exists" } else { "is missing" }
        ),
        fix: (!ok).then(|| fix.to_string()),
        needed,
    }
}

/// RLIMIT_MEMLOCK: kernels before 5.11 charge BPF maps to it; later ones to the memory cgroup.
/// Whatever the limit, what matters is whether maps can be created under it.
fn memlock(maps_work: bool, privileged: bool) -> Check {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct it is given.
    let read = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } == 0;
    let limit = match (read, lim.rlim_cur) {
        (false, _) => "unreadable".to_string(),
        (true, libc::RLIM_INFINITY) => "unlimited".to_string(),
        (true, n) => format!("{} KiB", n / 1024),
    };
    Check {
        name: "memlock",
        ok: maps_work,
        detail: match (maps_work, privileged) {
            (true, _) => format!("RLIMIT_MEMLOCK {limit}; maps can be created under it"),
            (false, false) => format!("RLIMIT_MEMLOCK {limit}; untested without privileges"),
            (false, true) => format!("RLIMIT_MEMLOCK {limit}; no map could be created"),
        },
        fix: match (maps_work, privileged) {
            (true, _) => None,
            (false, false) => Some("run racewatch as root (sudo), then check again".into()),
            (false, true) => Some("raise the limit: ulimit -l unlimited".into()),
        },
        needed: Needed::Both,
    }
}

/// Whether every check some command needs passed.
pub fn all_needed_pass(checks: &[Check]) -> bool {
    checks.iter().all(|c| c.ok)
}

/// The human report: one line per check, the fix under each failure, then the verdict.
pub fn render_human(checks: &[Check]) -> String {
    let mut out = String::new();
    for c in checks {
        let needed = match c.needed {
            Needed::Both => "",
            Needed::Python => " (needed by `racewatch python`)",
            Needed::Provoke => " (needed by `--provoke`)",
            Needed::Forks => " (needed to follow forked processes)",
        };
        let mark = if c.ok { "ok  " } else { "FAIL" };
        out += &format!("{mark} {}: {}{needed}\n", c.name, escape(&c.detail));
        if let Some(fix) = &c.fix {
            out += &format!("     fix: {}\n", escape(fix));
        }
    }
    let failed = |of: &[Needed]| -> Vec<&str> {
        checks
            .iter()
            .filter(|c| !c.ok && of.contains(&c.needed))
            .map(|c| c.name)
            .collect()
    };
    let (core, features) = (
        failed(&[Needed::Both]),
        failed(&[Needed::Python, Needed::Provoke, Needed::Forks]),
    );
    out += &match (core.is_empty(), features.is_empty()) {
        (true, true) => "racewatch can run here\n".to_string(),
        (true, false) => format!(
            "racewatch can run here, but not all of it: {} failed\n",
            features.join(", ")
        ),
        (false, _) => format!(
            "racewatch cannot run here: {} failed\n",
            [core, features].concat().join(", ")
        ),
    };
    out
}

/// The NDJSON report: one `{"type":"info",...}` line.
pub fn render_json(checks: &[Check]) -> String {
    serde_json::json!({
        "type": "info",
        "ok": all_needed_pass(checks),
        "checks": checks,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: &'static str, ok: bool, needed: Needed) -> Check {
        Check {
            name,
            ok,
            detail: "d".into(),
            fix: (!ok).then(|| "do this".into()),
            needed,
        }
    }

    #[test]
    fn the_verdict_says_what_cannot_run() {
        let mut checks = vec![check("a", true, Needed::Both)];
        assert!(all_needed_pass(&checks));
        assert!(render_human(&checks).ends_with("racewatch can run here\n"));
        checks.push(check("c", false, Needed::Python));
        assert!(!all_needed_pass(&checks));
        let text = render_human(&checks);
        assert!(text.contains("FAIL c: d (needed by `racewatch python`)\n     fix: do this\n"));
        assert!(
            text.ends_with("racewatch can run here, but not all of it: c failed\n"),
            "{text}"
        );
        checks.push(check("d", false, Needed::Both));
        let text = render_human(&checks);
        assert!(
            text.ends_with("racewatch cannot run here: d, c failed\n"),
            "{text}"
        );
    }

    #[test]
    fn json_is_one_line_with_every_check() {
        let checks = vec![
            check("a", true, Needed::Both),
            check("b", false, Needed::Forks),
        ];
        let v: serde_json::Value = serde_json::from_str(&render_json(&checks)).unwrap();
        assert_eq!(v["ok"], false);
        assert_eq!(v["checks"][1]["name"], "b");
        assert_eq!(v["checks"][1]["needed"], "forks");
        assert_eq!(v["checks"][1]["fix"], "do this");
    }
}
