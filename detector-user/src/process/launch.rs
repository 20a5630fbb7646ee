//! A command racewatch launches: started at once but held before its exec until every probe is
//! attached, so it keeps the pid racewatch attached to and misses no window from its first
//! instruction. An exec that fails is told back to racewatch, which says why.
use std::{
    ffi::OsString,
    fs,
    io::{Read, Write},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::process::CommandExt,
    },
    path::Path,
};

use crate::{process::TargetError, text::escape};

/// The hidden subcommand the held child runs: it waits on fd [`HOLD_FD`] and then execs the
/// command, so the command keeps the pid racewatch attached to.
pub const HELD_EXEC: &str = "__held-exec";
const HOLD_FD: i32 = 3;
/// Where the held child writes the errno of an exec that failed; it is closed by an exec that
/// succeeds, so racewatch reads either four bytes or the end of the pipe.
const REPORT_FD: i32 = 4;

/// A pipe whose two ends are closed on exec.
fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills the two descriptors, which we own from here on.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A launched command, stopped before its exec until [`Held::release`].
pub struct Held {
    child: tokio::process::Child,
    command: OsString,
    release: OwnedFd,
    report: OwnedFd,
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
        let (read, write) = pipe().map_err(spawn_err)?;
        let (report, report_write) = pipe().map_err(spawn_err)?;
        let me = std::env::current_exe().map_err(spawn_err)?;
        let mut cmd = tokio::process::Command::new(me);
        cmd.arg(HELD_EXEC)
            .arg("--")
            .args(command)
            .kill_on_drop(false);
        let (read_fd, report_fd) = (read.as_raw_fd(), report_write.as_raw_fd());
        // SAFETY: dup2 is async-signal-safe; it gives the child the go pipe's read end as
        // HOLD_FD and the report pipe's write end as REPORT_FD, both without CLOEXEC. The other
        // ends stay CLOEXEC and close in the child.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(read_fd, HOLD_FD) < 0 || libc::dup2(report_fd, REPORT_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(spawn_err)?;
        Ok(Held {
            child,
            command: command.first().cloned().unwrap_or_default(),
            release: write,
            report,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Lets the command run, once its exec is done: a command that could not be run is an
    /// error that says why.
    pub fn release(self) -> Result<tokio::process::Child, TargetError> {
        let Held {
            child,
            command,
            release,
            report,
        } = self;
        let name = command.to_string_lossy().into_owned();
        fs::File::from(release)
            .write_all(b"1")
            .map_err(|source| TargetError::Spawn {
                cmd: name.clone(),
                source,
            })?;
        // The exec takes a moment: the report is either its errno or the pipe's end.
        let mut errno = [0u8; 4];
        if fs::File::from(report).read_exact(&mut errno).is_err() {
            return Ok(child);
        }
        let err = std::io::Error::from_raw_os_error(i32::from_ne_bytes(errno));
        Err(TargetError::Exec {
            reason: exec_failure(&command, &err),
            cmd: name,
        })
    }

    /// Ends a command that will never be released (setup failed after the launch).
    pub fn abandon(mut self) {
        let _ = self.child.start_kill();
    }
}

/// Why `command` could not be run, and what to do, from the exec's error.
fn exec_failure(command: &OsString, err: &std::io::Error) -> String {
    let path = crate::process::resolve_command(command).unwrap_or_else(|_| command.into());
    match err.raw_os_error() {
        // The file was there when racewatch looked: what is missing is its interpreter.
        Some(libc::ENOENT) => match interpreter(&path) {
            Some(interp) => format!(
                "its interpreter {} (the #! line) is not there: install it or fix that line",
                escape(&interp)
            ),
            None => format!(
                "{err}: the file, or the program loader it needs, is not there (see `file {}`)",
                escape(&path.to_string_lossy())
            ),
        },
        Some(libc::EACCES) => "permission denied: this user may not execute it or its \
                               interpreter (see their modes, and whether their file system is \
                               mounted noexec)"
            .to_string(),
        Some(libc::ENOEXEC) => {
            "not a program this system can run (exec format error): run it through its \
             interpreter"
                .to_string()
        }
        _ => err.to_string(),
    }
}

/// The interpreter a script's `#!` line names.
fn interpreter(path: &Path) -> Option<String> {
    let mut head = [0u8; 256];
    let n = fs::File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .ok()?;
    let line = head[..n]
        .strip_prefix(b"#!")?
        .split(|&b| b == b'\n')
        .next()?;
    let interp = String::from_utf8_lossy(line);
    interp.split_whitespace().next().map(str::to_string)
}

/// Runs in the held child: waits for racewatch's go, then becomes the command (or tells
/// racewatch why it could not).
pub fn held_exec(command: &[OsString]) -> i32 {
    // SAFETY: HOLD_FD and REPORT_FD were set up by `Held::spawn`; we own them from here.
    let mut hold = fs::File::from(unsafe { OwnedFd::from_raw_fd(HOLD_FD) });
    let mut report = fs::File::from(unsafe { OwnedFd::from_raw_fd(REPORT_FD) });
    // SAFETY: plain fcntl on a descriptor we own: a successful exec closes it.
    unsafe { libc::fcntl(REPORT_FD, libc::F_SETFD, libc::FD_CLOEXEC) };
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
    let errno = err.raw_os_error().unwrap_or(libc::EIO);
    if report.write_all(&errno.to_ne_bytes()).is_err() {
        eprintln!(
            "racewatch: cannot run {}: {err}",
            escape(&program.to_string_lossy())
        );
    }
    127
}
