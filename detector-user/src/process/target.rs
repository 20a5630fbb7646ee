//! The end of a run's target: a launched command's exit, or a running process's (pidfd).
use std::{
    os::fd::{FromRawFd, OwnedFd},
    process::ExitStatus,
    time::Duration,
};

use tokio::io::unix::AsyncFd;

use crate::process::{TargetError, children_cpu, proc_cpu};

/// Waits for a process racewatch did not start to exit.
pub struct PidWatch {
    fd: AsyncFd<OwnedFd>,
    pid: u32,
    /// The process's CPU time when racewatch began watching it.
    cpu_at_start: Option<Duration>,
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

    /// Whether the process has exited already (its pidfd is readable now).
    pub fn has_exited(&self) -> bool {
        use std::os::fd::AsRawFd as _;
        let mut poll = libc::pollfd {
            fd: self.fd.get_ref().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no wait.
        let ready = unsafe { libc::poll(&mut poll, 1, 0) };
        ready > 0
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
    /// Every process on the host that maps the probed files: the run ends on a signal or
    /// `--duration` only.
    Host,
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
            Target::Host => std::future::pending().await,
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
            Target::Host => None,
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
