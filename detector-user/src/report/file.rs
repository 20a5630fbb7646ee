//! `-o FILE` for a run left on: the file is reopened at its path when asked (SIGHUP from
//! logrotate, after it moved the old one away), and a reopen that fails leaves the run writing
//! where it was, with a warning.
use std::{
    cell::Cell,
    fs::{File, OpenOptions},
    io::{self, Write},
    path::PathBuf,
    rc::Rc,
};

use crate::text::escape;

/// Asks a [`LogFile`] to reopen its path before its next write.
#[derive(Clone, Default)]
pub struct Reopen(Rc<Cell<bool>>);

impl Reopen {
    pub fn request(&self) {
        self.0.set(true);
    }
}

pub struct LogFile {
    path: PathBuf,
    file: File,
    reopen: Reopen,
}

impl LogFile {
    /// Creates (truncates) the file at `path`.
    pub fn create(path: PathBuf) -> io::Result<(LogFile, Reopen)> {
        let file = File::create(&path)?;
        let reopen = Reopen::default();
        Ok((
            LogFile {
                path,
                file,
                reopen: reopen.clone(),
            },
            reopen,
        ))
    }

    fn reopen_if_asked(&mut self) {
        if !self.reopen.0.replace(false) {
            return;
        }
        match OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
        {
            Ok(file) => self.file = file,
            Err(e) => eprintln!(
                "racewatch: warning: cannot reopen {}: {e}; still writing to the file it had open",
                escape(&self.path.to_string_lossy())
            ),
        }
    }
}

impl Write for LogFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.reopen_if_asked();
        self.file.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("racewatch-logfile-{}-{name}", std::process::id()))
    }

    #[test]
    fn a_reopen_after_the_file_moved_writes_a_new_one() {
        let path = temp("rotated");
        let moved = path.with_extension("1");
        let (mut f, reopen) = LogFile::create(path.clone()).unwrap();
        f.write_all(b"before\n").unwrap();
        std::fs::rename(&path, &moved).unwrap();
        reopen.request();
        f.write_all(b"after\n").unwrap();
        assert_eq!(std::fs::read_to_string(&moved).unwrap(), "before\n");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "after\n");
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(&moved);
    }

    #[test]
    fn a_failed_reopen_keeps_the_old_file() {
        let dir = temp("gone-dir");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("out.ndjson");
        let (mut f, reopen) = LogFile::create(path.clone()).unwrap();
        let kept = dir.with_extension("kept");
        std::fs::rename(&dir, &kept).unwrap();
        reopen.request();
        f.write_all(b"still here\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(kept.join("out.ndjson")).unwrap(),
            "still here\n"
        );
        let _ = std::fs::remove_dir_all(&kept);
    }
}
