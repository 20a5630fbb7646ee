//! The processes racewatch watches: finding them (/proc), launching a command held until the
//! probes are attached, and waiting for either to end.
use std::time::Duration;
use std::{
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("command not found: {0} (is it on PATH?)")]
    CommandNotFound(String),
    #[error("{} is not executable: make it so (chmod +x) or run it through its interpreter", .0.display())]
    NotExecutable(PathBuf),
    #[error("{} is a directory, not a command", .0.display())]
    IsADirectory(PathBuf),
    #[error(
        "permission denied: this user may not execute {} (see its owner and mode, the \
         directories on its way, and whether its file system is mounted noexec)",
        .0.display()
    )]
    PermissionDenied(PathBuf),
    #[error("cannot run {cmd}: {reason}")]
    Exec { cmd: String, reason: String },
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
    #[error(
        "{} is not there for process {pid}: neither on the host nor in its root ({}); give the path it maps the file by (see /proc/{pid}/maps)",
        .path.display(), .inside.display()
    )]
    NotInProcess {
        pid: u32,
        path: PathBuf,
        inside: PathBuf,
    },
}

/// Resolves a command name as the shell would (PATH lookup); a file that is there but that may
/// not be executed (no execute bit, or not for this user) is told apart from one that is not
/// there.
pub fn resolve_command(cmd: &OsString) -> Result<PathBuf, TargetError> {
    use std::os::unix::fs::PermissionsExt as _;
    which::which(cmd).map_err(|_| {
        let path = Path::new(cmd);
        let candidate = if path.components().count() > 1 {
            Some(path.to_path_buf())
        } else {
            std::env::var_os("PATH").and_then(|dirs| {
                std::env::split_paths(&dirs)
                    .map(|d| d.join(cmd))
                    .find(|p| p.exists())
            })
        };
        let not_found = || TargetError::CommandNotFound(cmd.to_string_lossy().into_owned());
        let Some(p) = candidate else {
            return not_found();
        };
        match fs::metadata(&p) {
            Ok(m) if m.is_dir() => TargetError::IsADirectory(p),
            Ok(m) if m.permissions().mode() & 0o111 == 0 => TargetError::NotExecutable(p),
            // Executable by someone, or on a noexec file system: not by this user.
            Ok(_) => TargetError::PermissionDenied(p),
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                TargetError::PermissionDenied(p)
            }
            Err(_) => not_found(),
        }
    })
}

/// A file process `pid` maps, as racewatch can open it: the process's own path where racewatch
/// sees the very same file there, else through `/proc/PID/root` (a process in another mount
/// namespace, as in a container, whose paths may not exist here or name other files).
pub fn file_of(pid: u32, path: &Path) -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    let inside =
        PathBuf::from(format!("/proc/{pid}/root")).join(path.strip_prefix("/").unwrap_or(path));
    match (fs::metadata(path), fs::metadata(&inside)) {
        (Ok(a), Ok(b)) if (a.dev(), a.ino()) == (b.dev(), b.ino()) => path.to_path_buf(),
        (_, Ok(_)) => inside,
        _ => path.to_path_buf(),
    }
}

/// The file `--binary PATH` names for process `pid`: an absolute path as the process sees it
/// (see [`file_of`]), a relative one as racewatch does.
pub fn binary_of(pid: u32, path: &Path) -> Result<PathBuf, TargetError> {
    if !path.is_absolute() {
        return Ok(path.to_path_buf());
    }
    let file = file_of(pid, path);
    if file.exists() {
        return Ok(file);
    }
    Err(TargetError::NotInProcess {
        pid,
        path: path.to_path_buf(),
        inside: PathBuf::from(format!("/proc/{pid}/root"))
            .join(path.strip_prefix("/").unwrap_or(path)),
    })
}

/// The live processes, from /proc.
pub fn all_pids() -> Vec<u32> {
    fs::read_dir("/proc")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
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
    let exe = fs::read_link(format!("/proc/{pid}/exe"))
        .map_err(|source| TargetError::Exe { pid, source })?;
    Ok(file_of(pid, &exe))
}

pub mod container;
pub mod cpu;
pub mod launch;
pub mod maps;
pub mod table;
pub mod target;

/// CPU time (user + system, all threads) a live process has used, from /proc/PID/stat.
pub(crate) fn proc_cpu(pid: u32) -> Option<Duration> {
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
pub(crate) fn children_cpu() -> Option<Duration> {
    // SAFETY: getrusage fills the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) } != 0 {
        return None;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    Some(tv(usage.ru_utime) + tv(usage.ru_stime))
}

/// The parent of process `pid`, from `/proc/PID/stat` (the field after the state).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Every live process descended from `pid` (children, their children, ...), each with its
/// parent, from /proc.
pub fn descendants(pid: u32) -> Vec<(u32, u32)> {
    let parents: Vec<(u32, u32)> = all_pids()
        .into_iter()
        .filter_map(|p| Some((p, parent_of(p)?)))
        .collect();
    let mut found = vec![(pid, 0)];
    let mut i = 0;
    while i < found.len() {
        let of = found[i].0;
        found.extend(parents.iter().filter(|(_, pp)| *pp == of));
        i += 1;
    }
    found.remove(0);
    found
}
