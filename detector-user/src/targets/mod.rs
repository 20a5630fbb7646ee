//! The target kinds racewatch watches, each a front end over the same engine: `native` (any
//! ELF program's functions, `racewatch watch`) and `python` (CPython's dicts, `racewatch python`).
//! What they share here: how each turns the kernel's stack records into frames.
use std::collections::HashMap;

use crate::engine::stack::Stack;

pub mod native;
pub mod python;

/// What racewatch asks the kernel for with each event that reaches userspace, and how it turns
/// that into frames.
#[derive(Clone, Debug)]
pub enum StackConfig {
    None,
    Native {
        returned_from: Option<native::stacks::ReturnedFrom>,
    },
    /// Each window's interpreter, by window: a run on the host meets more as it goes on.
    Python(python::host::Layouts),
}

impl StackConfig {
    pub fn mode(&self) -> detector_common::StackMode {
        match self {
            StackConfig::None => detector_common::StackMode::None,
            StackConfig::Native { .. } => detector_common::StackMode::Native,
            StackConfig::Python(_) => detector_common::StackMode::Python,
        }
    }

    pub fn resolver(&self) -> Resolver {
        Resolver {
            config: self.clone(),
            native: Default::default(),
            per_process: HashMap::new(),
        }
    }
}

/// Processes whose stacks are resolved at once; the least recently used is dropped past it.
const RESOLVED_PROCESSES: usize = 64;

/// What resolves one process's stack records.
enum Frames {
    Native(Box<native::stacks::NativeStacks>),
    Python(python::frames::PyStacks),
}

/// Turns the kernel's stack records into frames, each with its own process's mappings and memory
/// (a forked worker runs code its parent never loaded).
pub struct Resolver {
    config: StackConfig,
    /// What every process's native stacks share: each file's sections and symbols.
    native: std::rc::Rc<native::stacks::Shared>,
    /// By pid, with when each was last used.
    per_process: HashMap<u32, (u64, Frames)>,
}

impl Resolver {
    /// Process `pid`'s resolver; `window`: the window of the record that asks (a process runs
    /// one interpreter, so its first record's window names it).
    fn frames_of(&mut self, pid: u32, used: u64, window: u32) -> Option<&mut Frames> {
        if !self.per_process.contains_key(&pid) {
            let frames = match &self.config {
                StackConfig::None => return None,
                StackConfig::Native { returned_from } => {
                    Frames::Native(Box::new(native::stacks::NativeStacks::new(
                        pid,
                        returned_from.clone(),
                        self.native.clone(),
                    )))
                }
                StackConfig::Python(layouts) => Frames::Python(python::frames::PyStacks::new(
                    pid,
                    layouts.borrow().get(window as usize)?,
                )),
            };
            if self.per_process.len() >= RESOLVED_PROCESSES
                && let Some(&oldest) = self
                    .per_process
                    .iter()
                    .min_by_key(|(_, (at, _))| *at)
                    .map(|(p, _)| p)
            {
                self.per_process.remove(&oldest);
            }
            self.per_process.insert(pid, (used, frames));
        }
        let (at, frames) = self.per_process.get_mut(&pid)?;
        *at = used;
        Some(frames)
    }

    /// Process `pid` ended: what resolved its stacks (its files' unwind tables and symbols) goes.
    pub fn forget(&mut self, pid: u32) {
        self.per_process.remove(&pid);
    }

    /// For a stack record: its thread, the time of the event it belongs to, and its frames.
    pub fn resolve(&mut self, event: &detector_common::Event) -> Option<(u32, u64, Stack)> {
        match event {
            detector_common::Event::NativeStack(s) => match self.frames_of(s.tgid, s.ns, 0)? {
                Frames::Native(n) => Some((s.tid, s.ns, n.resolve(s))),
                Frames::Python(_) => None,
            },
            detector_common::Event::PyFrames(f) => match self.frames_of(f.tgid, f.ns, f.window)? {
                Frames::Python(p) => Some((f.tid, f.ns, p.resolve(f))),
                Frames::Native(_) => None,
            },
            _ => None,
        }
    }
}
