//! The process racewatch watches: a command it launches, held until the probes are attached, or
//! a running process given by pid.
use std::time::Duration;
use std::{
    ffi::OsString,
    fs,
    io::Read,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::process::CommandExt,
    },
    path::PathBuf,
    process::ExitStatus,
};

use tokio::io::unix::AsyncFd;

/// The hidden subcommand the held child runs: it waits on fd [`HOLD_FD`] and then execs the
/// command, so the command keeps the pid racewatch attached to.
pub const HELD_EXEC: &str = "__held-exec";
const HOLD_FD: i32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("command not found: {0} (is it on PATH?)")]
    CommandNotFound(String),
    #[error("pid 0 is not a process: give the pid of the running program (see `pgrep`)")]
    PidZero,
    #[error("no process with pid {0}: is it still running? (see `pgrep`)")]
    NoSuchPid(u32),
    #[error("process {0} has exited (zombie): nothing left to watch")]
    Zombie(u32),
    #[error("cannot read the executable of process {pid}: {source}")]
    Exe { pid: u32, source: std::io::Error },
    #[error("cannot start {cmd}: {source}")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("cannot watch process {pid} for exit: {source}")]
    Pidfd { pid: u32, source: std::io::Error },
}

/// Resolves a command name as the shell would (PATH lookup).
pub fn resolve_command(cmd: &OsString) -> Result<PathBuf, TargetError> {
    which::which(cmd).map_err(|_| TargetError::CommandNotFound(cmd.to_string_lossy().into_owned()))
}

/// Checks that `pid` is a live process and returns the path of its executable.
pub fn running_exe(pid: u32) -> Result<PathBuf, TargetError> {
    if pid == 0 {
        return Err(TargetError::PidZero);
    }
    let stat =
        fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|_| TargetError::NoSuchPid(pid))?;
    // The state follows the parenthesised command name, which may itself hold ") ".
    if stat
        .rsplit_once(") ")
        .is_some_and(|(_, rest)| rest.starts_with('Z'))
    {
        return Err(TargetError::Zombie(pid));
    }
    fs::read_link(format!("/proc/{pid}/exe")).map_err(|source| TargetError::Exe { pid, source })
}

/// A launched command, stopped before its exec until [`Held::release`].
pub struct Held {
    child: tokio::process::Child,
    release: OwnedFd,
}

impl Held {
    pub fn spawn(command: &[OsString]) -> Result<Held, TargetError> {
        let cmd_name = command
            .first()
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default();
        let spawn_err = |source| TargetError::Spawn {
            cmd: cmd_name.clone(),
            source,
        };
        let mut fds = [0i32; 2];
        // SAFETY: pipe2 fills the two descriptors, which we own from here on.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(spawn_err(std::io::Error::last_os_error()));
        }
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let me = std::env::current_exe().map_err(spawn_err)?;
        let mut cmd = tokio::process::Command::new(me);
        cmd.arg(HELD_EXEC)
            .arg("--")
            .args(command)
            .kill_on_drop(false);
        let read_fd = read.as_raw_fd();
        // SAFETY: dup2 is async-signal-safe; it gives the child the read end as HOLD_FD without
        // CLOEXEC. The write end stays CLOEXEC and closes in the child.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(read_fd, HOLD_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(spawn_err)?;
        drop(read);
        Ok(Held {
            child,
            release: write,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Lets the command run.
    pub fn release(self) -> std::io::Result<tokio::process::Child> {
        let Held { child, release } = self;
        let file = fs::File::from(release);
        std::io::Write::write_all(&mut &file, b"1")?;
        Ok(child)
    }

    /// Ends a command that will never be released (setup failed after the launch).
    pub fn abandon(mut self) {
        let _ = self.child.start_kill();
    }
}

/// Runs in the held child: waits for racewatch's go, then becomes the command.
pub fn held_exec(command: &[OsString]) -> i32 {
    // SAFETY: HOLD_FD was set up by `Held::spawn`; we own it from here.
    let mut hold = fs::File::from(unsafe { OwnedFd::from_raw_fd(HOLD_FD) });
    let mut go = [0u8; 1];
    // EOF without a byte: racewatch gave up (or died) before the probes were attached.
    if !matches!(hold.read(&mut go), Ok(1)) {
        return 125;
    }
    drop(hold);
    let Some((program, args)) = command.split_first() else {
        return 127;
    };
    let err = std::process::Command::new(program).args(args).exec();
    eprintln!(
        "racewatch: cannot run {}: {err}",
        crate::output::escape(&program.to_string_lossy())
    );
    127
}

/// Waits for a process racewatch did not start to exit.
pub struct PidWatch {
    fd: AsyncFd<OwnedFd>,
    pid: u32,
    /// The process's CPU time when racewatch began watching it.
    cpu_at_start: Option<Duration>,
}

/// CPU time (user + system, all threads) a live process has used, from /proc/PID/stat.
fn proc_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may hold spaces and parentheses: state is the first,
    // utime and stime the 12th and 13th.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let ticks = fields.next()?.parse::<u64>().ok()? + fields.next()?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| Duration::from_nanos(ticks * 1_000_000_000 / hz as u64))
}

/// CPU time of racewatch's reaped children: the launched command, once it has exited.
fn children_cpu() -> Option<Duration> {
    // SAFETY: getrusage fills the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) } != 0 {
        return None;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    Some(tv(usage.ru_utime) + tv(usage.ru_stime))
}

impl PidWatch {
    pub fn new(pid: u32) -> Result<PidWatch, TargetError> {
        // SAFETY: pidfd_open returns a new descriptor or -1.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
        if raw < 0 {
            return Err(TargetError::Pidfd {
                pid,
                source: std::io::Error::last_os_error(),
            });
        }
        let fd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        // SAFETY: the OwnedFd is moved into the AsyncFd and lives exactly as long.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| TargetError::Pidfd {
            pid,
            source: e.into_parts().1,
        })?;
        Ok(PidWatch {
            fd,
            pid,
            cpu_at_start: proc_cpu(pid),
        })
    }

    pub async fn exited(&self) {
        // A pidfd becomes readable when the process exits; errors mean it is gone too.
        let _ = self.fd.readable().await;
    }
}

/// What racewatch watches for the run's end.
pub enum Target {
    Launched(tokio::process::Child),
    Attached(PidWatch),
}

impl Target {
    /// Resolves when the target exits, with the launched command's status where known.
    pub async fn exited(&mut self) -> Option<ExitStatus> {
        match self {
            Target::Launched(child) => child.wait().await.ok(),
            Target::Attached(watch) => {
                watch.exited().await;
                None
            }
        }
    }

    /// CPU time the target used while racewatch watched it, where it can still be known: a
    /// launched command's once reaped, an attached process's while it lives.
    pub fn cpu_used(&mut self) -> Option<Duration> {
        match self {
            Target::Launched(child) => match child.try_wait() {
                Ok(Some(_)) => children_cpu(),
                _ => child.id().and_then(proc_cpu),
            },
            Target::Attached(watch) => Some(proc_cpu(watch.pid)? - watch.cpu_at_start?),
        }
    }

    /// Stops a launched command when racewatch stops first (it started it); a process racewatch
    /// attached to keeps running.
    pub async fn finish(&mut self) {
        if let Target::Launched(child) = self {
            if let Some(pid) = child.id() {
                // SAFETY: plain kill(2) of our own child.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
            let _ = child.wait().await;
        }
    }
}
