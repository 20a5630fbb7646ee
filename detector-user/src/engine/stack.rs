//! The frames of one side of a race, as every target kind resolves them.
use std::sync::Arc;

use serde::Serialize;

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
