//! `racewatch python` on the whole host. Each distinct interpreter file the host's CPython
//! processes map (by device and inode, so a container's copy at the same path is another file)
//! is a window of its own, watched in every process that maps it. Files are met at the start and
//! then as processes start or exec, so an interpreter first run after racewatch started is
//! watched too, or named in `unwatched`.
use std::{
    cell::RefCell,
    collections::{HashMap, HashSet},
    os::unix::fs::MetadataExt,
    path::PathBuf,
    rc::Rc,
};

use super::{Interpreter, Options, PythonError, for_pid, layout::Layout, plan};
use crate::probe::plan::{Discover, Plan};

/// How often a run on the host looks for new interpreter files, in seconds (the run loop's
/// `DISCOVER`).
pub const LOOK_EVERY_S: u64 = 2;

/// The layouts of the run's windows, by window: shared with the stack resolver and the key
/// renderer, which meet new windows as the run goes on.
pub type Layouts = Rc<RefCell<Vec<Layout>>>;

/// An interpreter file met in a scan, with the processes that map it.
struct Met {
    file: (u64, u64),
    interp: Interpreter,
    pids: Vec<u32>,
}

pub struct Host {
    /// Its `--provoke` handover is set up for the first window's interpreter alone.
    options: Options,
    layouts: Layouts,
    /// Each interpreter file met so far, by (device, inode).
    files: HashSet<(u64, u64)>,
    /// Each running process looked at, with the executable it ran then (an exec makes it new).
    seen: HashMap<u32, PathBuf>,
}

/// `process 12` or `processes 12, 13`.
fn processes(pids: &[u32]) -> String {
    let list: Vec<String> = pids.iter().map(u32::to_string).collect();
    let s = if pids.len() == 1 { "" } else { "es" };
    format!("process{s} {}", list.join(", "))
}

impl Host {
    pub fn new(options: Options) -> Host {
        Host {
            options,
            layouts: Layouts::default(),
            files: HashSet::new(),
            seen: HashMap::new(),
        }
    }

    pub fn layouts(&self) -> Layouts {
        self.layouts.clone()
    }

    /// The interpreter files of the processes that started or exec'd since the last scan, each
    /// one not met before, the most used first.
    fn meet(&mut self) -> Vec<Met> {
        let me = std::process::id();
        let live: HashSet<u32> = crate::process::all_pids().into_iter().collect();
        self.seen.retain(|pid, _| live.contains(pid));
        let mut met: Vec<Met> = Vec::new();
        for &pid in live.iter().filter(|&&p| p != me) {
            let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) else {
                continue;
            };
            if self.seen.get(&pid) == Some(&exe) {
                continue;
            }
            self.seen.insert(pid, exe);
            let Ok(interp) = for_pid(pid) else {
                continue;
            };
            let Ok(meta) = std::fs::metadata(&interp.image) else {
                continue;
            };
            let file = (meta.dev(), meta.ino());
            if self.files.contains(&file) {
                continue;
            }
            match met.iter_mut().find(|m| m.file == file) {
                Some(m) => m.pids.push(pid),
                None => met.push(Met {
                    file,
                    interp,
                    pids: vec![pid],
                }),
            }
        }
        met.sort_by_key(|m| std::cmp::Reverse(m.pids.len()));
        met
    }

    /// Plans the interpreter files met since the last scan, each as a new window; says what
    /// cannot be watched. With `--provoke`, more than one file at the start is an error (its
    /// handover is one interpreter's), and a file met later is not watched.
    pub fn scan(&mut self) -> Result<(Vec<Plan>, Vec<String>), PythonError> {
        let met = self.meet();
        let first = self.layouts.borrow().is_empty();
        if self.options.provoke && first && met.len() > 1 {
            return Err(PythonError::ProvokeOnHost {
                files: met.iter().map(|m| m.interp.image.clone()).collect(),
            });
        }
        let mut plans = Vec::new();
        let mut unwatched = Vec::new();
        for m in met {
            self.files.insert(m.file);
            let window = self.layouts.borrow().len() as u32;
            let who = processes(&m.pids);
            if window >= detector_common::MAX_WINDOWS {
                unwatched.push(format!(
                    "{who}: they run {}, and racewatch watches at most {} interpreter files in \
                     one run",
                    m.interp.image.display(),
                    detector_common::MAX_WINDOWS
                ));
                continue;
            }
            if self.options.provoke && !first {
                unwatched.push(format!(
                    "{who}: they run {}, another interpreter, started after racewatch: \
                     --provoke watches one interpreter per run",
                    m.interp.image.display()
                ));
                continue;
            }
            match plan(&m.interp, window, &self.options) {
                Ok((p, layout)) => {
                    self.layouts.borrow_mut().push(layout);
                    plans.push(p);
                    // Later processes on this file are watched from their start; these ran
                    // unwatched until now.
                    if !first {
                        unwatched.push(format!(
                            "{who} ran {} for up to {} s before racewatch met that file (it \
                             looks for new interpreter files that often): what ran before is \
                             not counted",
                            m.interp.image.display(),
                            LOOK_EVERY_S
                        ));
                    }
                }
                Err(e) => unwatched.push(format!("{who}: {e}")),
            }
        }
        Ok((plans, unwatched))
    }

    /// With no CPython running at the start: the interpreter `python3` on PATH runs, for the
    /// processes still to come.
    pub fn fallback(&mut self) -> Result<Plan, PythonError> {
        let interp = super::for_command(&["python3".into()])?;
        if let Ok(meta) = std::fs::metadata(&interp.image) {
            self.files.insert((meta.dev(), meta.ino()));
        }
        let window = self.layouts.borrow().len() as u32;
        let (p, layout) = plan(&interp, window, &self.options)?;
        self.layouts.borrow_mut().push(layout);
        Ok(p)
    }
}

impl Discover for Host {
    fn discover(&mut self) -> (Vec<Plan>, Vec<String>) {
        self.scan()
            .unwrap_or_else(|e| (Vec::new(), vec![e.to_string()]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn processes_are_named_in_one_phrase() {
        assert_eq!(processes(&[12]), "process 12");
        assert_eq!(processes(&[12, 13]), "processes 12, 13");
    }
}
