//! Which container a process runs in, as the host sees it: its pid inside its own pid namespace
//! (`NSpid:` in /proc/PID/status) and the id its container runtime wrote into its cgroup path
//! (/proc/PID/cgroup). racewatch's reports name both beside the host pid, so a finding can be
//! matched with `docker ps`, `crictl ps` or the container's own logs.
use std::fs;

/// A process's identity inside its container; both parts are `None` for a process of the host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    /// Its pid in its own pid namespace, where that differs from the host's.
    pub ns_pid: Option<u32>,
    /// Its container's id (64 hex digits), where its cgroup path names one.
    pub container: Option<String>,
}

/// A process of the host: no pid namespace or container of its own.
pub const HOST: Identity = Identity {
    ns_pid: None,
    container: None,
};

impl Identity {
    /// Process `pid`'s, read from /proc (the host's when it cannot be read: it has gone).
    pub fn of(pid: u32) -> Identity {
        let read = |file: &str| fs::read_to_string(format!("/proc/{pid}/{file}")).ok();
        Identity {
            ns_pid: read("status")
                .and_then(|s| parse_ns_pid(&s))
                .filter(|&ns| ns != pid),
            container: read("cgroup").and_then(|c| container_id(&c)),
        }
    }

    pub fn is_host(&self) -> bool {
        self.ns_pid.is_none() && self.container.is_none()
    }

    /// The container's id as `docker ps` and `crictl ps` print it: its first 12 hex digits.
    pub fn short_container(&self) -> Option<&str> {
        self.container.as_deref().map(|c| &c[..c.len().min(12)])
    }
}

/// `NSpid:`'s last field: the pid in the process's own (innermost) pid namespace; the first is
/// the pid in the namespace of the /proc it was read from.
pub fn parse_ns_pid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))?
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

/// The container id in a `/proc/PID/cgroup` text: the innermost path component that is, or ends
/// in, 64 hex digits (`docker-ID.scope` and `cri-containerd-ID.scope` under systemd, `crio-ID`,
/// `libpod-ID`, bare `ID` under cgroupfs and kubepods). Runtimes' monitors (`libpod-conmon-ID`,
/// `crio-conmon-ID`) are not the container.
pub fn container_id(cgroup: &str) -> Option<String> {
    cgroup.lines().find_map(|line| {
        // `hierarchy-ID:controllers:path`; the path may itself hold colons.
        let path = line.splitn(3, ':').nth(2)?;
        path.rsplit('/').find_map(|component| {
            let name = component.strip_suffix(".scope").unwrap_or(component);
            if name.contains("conmon") {
                return None;
            }
            let id = name.rsplit('-').next()?;
            (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()))
                .then(|| id.to_ascii_lowercase())
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f2a9c1be07d4c5f8a6b2e1d0c9f8e7d6c5b4a39281706f5e4d3c2b1a0f9e8d7";

    #[test]
    fn each_runtime_s_cgroup_path_names_its_container() {
        let cases = [
            // Docker, systemd cgroup driver, cgroup v2.
            (format!("0::/system.slice/docker-{ID}.scope\n"), "docker"),
            // Docker, cgroupfs driver, cgroup v1 (one line per hierarchy).
            (
                format!("12:pids:/docker/{ID}\n11:memory:/docker/{ID}\n0::/docker/{ID}\n"),
                "docker (cgroupfs)",
            ),
            // Kubernetes with containerd, systemd driver.
            (
                format!(
                    "0::/kubepods.slice/kubepods-burstable.slice/\
                     kubepods-burstable-pod5f1c2a9e_3b7d_4e21_9a0c_6d8e2f4b1a73.slice/\
                     cri-containerd-{ID}.scope\n"
                ),
                "containerd",
            ),
            // Kubernetes, cgroupfs driver.
            (
                format!("0::/kubepods/besteffort/pod5f1c2a9e-3b7d-4e21-9a0c-6d8e2f4b1a73/{ID}\n"),
                "kubepods",
            ),
            // CRI-O.
            (
                format!(
                    "0::/kubepods.slice/kubepods-pod5f1c2a9e_3b7d_4e21_9a0c_6d8e2f4b1a73.slice/\
                     crio-{ID}.scope\n"
                ),
                "cri-o",
            ),
            // Podman, rootful and rootless.
            (format!("0::/machine.slice/libpod-{ID}.scope\n"), "podman"),
            (
                format!(
                    "0::/user.slice/user-1000.slice/user@1000.service/user.slice/\
                     libpod-{ID}.scope/container\n"
                ),
                "podman (rootless)",
            ),
        ];
        for (cgroup, runtime) in &cases {
            assert_eq!(
                container_id(cgroup).as_deref(),
                Some(ID),
                "{runtime}: {cgroup}"
            );
        }
        let upper = format!("0::/system.slice/docker-{}.scope\n", ID.to_uppercase());
        assert_eq!(container_id(&upper).as_deref(), Some(ID));
    }

    #[test]
    fn a_host_process_has_no_container() {
        let cases = [
            "0::/user.slice/user-1000.slice/session-2.scope\n",
            "0::/system.slice/docker.service\n",
            "0::/init.scope\n",
            "0::/\n",
            // A 32-hex cgroup name (a sandbox's, not a runtime's container id).
            "4:memory:/process_api/771882960018c91a1a8149920e7fac4e\n0::/\n",
            "",
        ];
        for cgroup in cases {
            assert_eq!(container_id(cgroup), None, "{cgroup:?}");
        }
        // A runtime's monitor is not its container.
        let conmon = format!("0::/machine.slice/libpod-conmon-{ID}.scope\n");
        assert_eq!(container_id(&conmon), None);
        let crio_conmon = format!("0::/kubepods.slice/crio-conmon-{ID}.scope\n");
        assert_eq!(container_id(&crio_conmon), None);
    }

    #[test]
    fn ns_pid_is_the_innermost() {
        let status = "Name:\tpython3\nNSpid:\t4242\t7\nNSsid:\t1\n";
        assert_eq!(parse_ns_pid(status), Some(7));
        assert_eq!(parse_ns_pid("NSpid:\t99\n"), Some(99));
        assert_eq!(parse_ns_pid("Name:\tx\n"), None);
    }

    #[test]
    fn a_process_gone_is_the_host_s_and_ids_print_short() {
        assert_eq!(Identity::of(u32::MAX), HOST);
        assert!(HOST.is_host());
        let inside = Identity {
            ns_pid: Some(7),
            container: Some(ID.to_string()),
        };
        assert_eq!(inside.short_container(), Some("3f2a9c1be07d"));
        assert!(!inside.is_host());
    }
}
