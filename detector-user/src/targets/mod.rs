//! The target kinds racewatch watches, each a front end over the same engine: `native` (any
//! ELF program's functions, `racewatch watch`) and `python` (CPython's dicts, `racewatch python`).
//! What they share here: how each turns the kernel's stack records into frames.
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
    Python(python::frames::FrameLayout),
}

impl StackConfig {
    pub fn mode(&self) -> detector_common::StackMode {
        match self {
            StackConfig::None => detector_common::StackMode::None,
            StackConfig::Native { .. } => detector_common::StackMode::Native,
            StackConfig::Python(_) => detector_common::StackMode::Python,
        }
    }

    /// The CPython layout the kernel needs (zeros when not used).
    pub fn py_layout(&self) -> detector_common::PyLayout {
        match self {
            StackConfig::Python(l) => l.kernel,
            _ => detector_common::PyLayout::default(),
        }
    }

    pub fn resolver(&self, pid: u32) -> Resolver {
        match self {
            StackConfig::None => Resolver::None,
            StackConfig::Native { returned_from } => Resolver::Native(Box::new(
                native::stacks::NativeStacks::new(pid, returned_from.clone()),
            )),
            StackConfig::Python(l) => Resolver::Python(python::frames::PyStacks::new(pid, l.code)),
        }
    }
}

/// Turns the kernel's stack records into frames.
pub enum Resolver {
    None,
    Native(Box<native::stacks::NativeStacks>),
    Python(python::frames::PyStacks),
}

impl Resolver {
    /// For a stack record: its thread, the time of the event it belongs to, and its frames.
    pub fn resolve(&mut self, event: &detector_common::Event) -> Option<(u32, u64, Stack)> {
        match (self, event) {
            (Resolver::Native(n), detector_common::Event::NativeStack(s)) => {
                Some((s.tid, s.ns, n.resolve(s)))
            }
            (Resolver::Python(p), detector_common::Event::PyFrames(f)) => {
                Some((f.tid, f.ns, p.resolve(f)))
            }
            _ => None,
        }
    }
}
