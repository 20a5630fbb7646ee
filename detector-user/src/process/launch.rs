//! A command racewatch launches: started at once but held before its exec until every probe is
//! attached, so it keeps the pid racewatch attached to and misses no window from its first
//! instruction.
use std::{
    ffi::OsString,
    fs,
    io::Read,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::process::CommandExt,
    },
};

use crate::{process::TargetError, text::escape};

/// The hidden subcommand the held child runs: it waits on fd [`HOLD_FD`] and then execs the
/// command, so the command keeps the pid racewatch attached to.
pub const HELD_EXEC: &str = "__held-exec";
const HOLD_FD: i32 = 3;

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
        escape(&program.to_string_lossy())
    );
    127
}
