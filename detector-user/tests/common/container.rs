//! Containers without a container runtime, built the way one builds them: a command in its own
//! mount and pid namespaces (util-linux `unshare`), its root a Debian root that `cargo xtask
//! setup` keeps, switched to by `pivot_root` (a plain chroot would leave host paths in
//! `/proc/PID/maps`), with host directories bind-mounted at paths of the container's own.
//!
//! The root is the lower layer of an overlay whose upper layer is scratch space, so the mount
//! points a container needs are made without touching the kept root. Every mount belongs to the
//! container's mount namespace and goes with its last process; the scratch space goes when the
//! [`Container`] is dropped.
use std::{
    io::Read as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

/// Where `cargo xtask setup` keeps its Debian roots (`RACEWATCH_ROOTS` overrides it, as it does
/// for xtask).
pub const ROOTS: &str = "/var/cache/racewatch/roots";

/// The Debian root built from `suite` (`trixie`: CPython 3.13, `sid`: CPython 3.14; both with
/// libstdc++6, so the native demo runs in them).
pub fn debian_root(suite: &str) -> PathBuf {
    let roots =
        std::env::var_os("RACEWATCH_ROOTS").map_or_else(|| PathBuf::from(ROOTS), PathBuf::from);
    let root = roots.join(suite);
    assert!(
        root.join("usr/bin").is_dir(),
        "no Debian {suite} root in {}: run `cargo xtask setup` as root",
        root.display()
    );
    root
}

/// Runs in the new namespaces as their pid 1 (`sh -c SCRIPT sh ROOT SCRATCH [HOST INSIDE]... --
/// COMMAND...`): builds the container's root in SCRATCH, switches to it and becomes COMMAND.
const SCRIPT: &str = r#"
set -eu
root=$1 scratch=$2
shift 2
new=$scratch/root
mkdir -p "$scratch/upper" "$scratch/work" "$new"
mount -t overlay overlay -o "lowerdir=$root,upperdir=$scratch/upper,workdir=$scratch/work" "$new"
while [ "$1" != -- ]; do
    mkdir -p "$new$2"
    mount --bind "$1" "$new$2"
    shift 2
done
shift
mount -t proc proc "$new/proc"
cd "$new"
mkdir -p .host
pivot_root . .host
cd /
umount -l /.host
rmdir /.host
exec "$@"
"#;

/// `unshare` with the mount namespace and `extra` namespaces, set to run `command` in a root
/// built in `scratch` on `root` with `binds` mounted.
fn unshare(
    extra: &[&str],
    root: &Path,
    scratch: &Path,
    binds: &[(&Path, &str)],
    command: &[&str],
) -> Command {
    std::fs::create_dir_all(scratch).expect("create the container's scratch space");
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private"])
        .args(extra)
        .args(["sh", "-c", SCRIPT, "sh"])
        .arg(root)
        .arg(scratch);
    for (host, inside) in binds {
        assert!(
            inside.starts_with('/'),
            "a path inside the container: {inside}"
        );
        cmd.arg(host).arg(inside);
    }
    cmd.arg("--").args(command);
    cmd
}

/// Runs `command` to its end on a root of its own (a mount namespace, an overlay on `root`,
/// `pivot_root`, `binds` mounted) in the host's pid namespace, as a Kubernetes pod with
/// `hostPID: true` runs: racewatch inside sees the pids the kernel's programs see.
pub fn run_with_host_pids(
    root: &Path,
    binds: &[(&Path, &str)],
    command: &[&str],
) -> std::process::Output {
    static RUN: AtomicUsize = AtomicUsize::new(0);
    let n = RUN.fetch_add(1, Ordering::Relaxed);
    let scratch = super::temp_file(&format!("root-{n}"));
    let out = unshare(&["--fork"], root, &scratch, binds, command)
        .stdin(Stdio::null())
        .output()
        .expect("run unshare (util-linux)");
    let _ = std::fs::remove_dir_all(&scratch);
    out
}

/// A command running in a container of its own.
pub struct Container {
    unshare: Option<Child>,
    worker: u32,
    scratch: PathBuf,
}

impl Container {
    /// Starts `command` in a container on `root`, each `(host directory, path inside)` of `binds`
    /// mounted in it; returns once the command runs. `command[0]` is the absolute path, inside
    /// the container, of an executable file (not a symlink): the start is known to be over when
    /// the worker's `/proc/PID/exe` names it.
    pub fn start(root: &Path, binds: &[(&Path, &str)], command: &[&str]) -> Container {
        let program = command.first().expect("a command");
        assert!(
            program.starts_with('/'),
            "the command's path inside the container: {program}"
        );
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        let n = STARTED.fetch_add(1, Ordering::Relaxed);
        let scratch = super::temp_file(&format!("container-{n}"));
        let mut unshare = unshare(&["--pid", "--fork"], root, &scratch, binds, command)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run unshare (util-linux)");
        let worker = wait_for_worker(&mut unshare, program);
        Container {
            unshare: Some(unshare),
            worker,
            scratch,
        }
    }

    /// The host pid of the process running the command (the container's pid 1).
    pub fn worker(&self) -> u32 {
        self.worker
    }

    /// Sends `signal` to the worker once it catches it: the worker is its pid namespace's pid
    /// 1, which the kernel spares every signal it has no handler for (SIGKILL aside), and a
    /// signal sent between its exec and its `signal()` calls would be lost.
    pub fn signal(&self, signal: i32) {
        if signal != libc::SIGKILL {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !catches(self.worker, signal) {
                assert!(
                    Instant::now() < deadline,
                    "the container's command does not catch signal {signal} after 10 s"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        // SAFETY: plain kill(2) of a process this test started.
        unsafe { libc::kill(self.worker as i32, signal) };
    }

    /// Waits for the command to end: its exit status and everything it wrote to stderr.
    pub fn wait(mut self) -> (ExitStatus, String) {
        let child = self.unshare.take().expect("running");
        let out = child.wait_with_output().expect("wait for the container");
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Some(mut child) = self.unshare.take() {
            // The namespace's pid 1 ends every process in it, and its mounts go with them.
            self.signal(libc::SIGKILL);
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

/// Whether process `pid` has a handler for `signal` (`SigCgt:` in /proc/PID/status, a hex mask
/// whose bit N-1 is signal N).
fn catches(pid: u32, signal: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let mask = s.lines().find_map(|l| l.strip_prefix("SigCgt:"))?;
            u64::from_str_radix(mask.trim(), 16).ok()
        })
        .is_some_and(|mask| mask & (1 << (signal - 1)) != 0)
}

/// The host pid of `unshare`'s child once it has become `program`; panics with the container's
/// stderr if it ends first or takes more than 10 s.
fn wait_for_worker(unshare: &mut Child, program: &str) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    let parent = unshare.id();
    loop {
        if let Ok(Some(status)) = unshare.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = unshare.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("the container ended before running {program} ({status}):\n{err}");
        }
        let worker = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
            .ok()
            .and_then(|c| c.split_whitespace().next()?.parse::<u32>().ok());
        if let Some(pid) = worker
            && std::fs::read_link(format!("/proc/{pid}/exe"))
                .is_ok_and(|exe| exe == Path::new(program))
        {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "the container did not run {program} within 10 s (worker {worker:?})"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}
