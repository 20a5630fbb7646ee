//! Stacks of the two sides of a race: the frame type they share, and where they come from
//! (native stacks unwound from the kernel's copy, CPython frames read from the target).
use std::sync::Arc;

use serde::Serialize;

pub mod maps;
pub mod native;

/// One frame of a stack, innermost first in a [`Stack`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Frame {
    /// Demangled function name (native) or qualified name (Python); `??` when unknown.
    pub function: String,
    pub file: Option<String>,
    pub line: Option<u32>,
}

impl Frame {
    pub fn unknown() -> Frame {
        Frame {
            function: "??".into(),
            file: None,
            line: None,
        }
    }
}

/// A resolved stack, shared by every alert of its window or pair.
pub type Stack = Arc<[Frame]>;

/// What racewatch asks the kernel for with each event that reaches userspace, and how it turns
/// that into frames.
#[derive(Clone, Debug)]
pub enum StackConfig {
    None,
    Native {
        returned_from: Option<native::ReturnedFrom>,
    },
    Python(crate::python::frames::FrameLayout),
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
                native::NativeStacks::new(pid, returned_from.clone()),
            )),
            StackConfig::Python(l) => {
                Resolver::Python(crate::python::frames::PyStacks::new(pid, l.code))
            }
        }
    }
}

/// Turns the kernel's stack records into frames.
pub enum Resolver {
    None,
    Native(Box<native::NativeStacks>),
    Python(crate::python::frames::PyStacks),
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
