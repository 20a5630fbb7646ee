//! One window of a native program: the function that empties an object (`open`), the one whose
//! return refills it (`close`), and the read that may miss in between (`access`). `watch`'s
//! flags name one; a config file names several.
use std::path::PathBuf;

use crate::cli::WatchArgs;

/// What a function does to the window's object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Open,
    Close,
    Access,
}

impl Role {
    /// Its key in a config file.
    pub fn key(self) -> &'static str {
        match self {
            Role::Open => "open",
            Role::Close => "close",
            Role::Access => "access",
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct Window {
    /// In alerts and the summary.
    pub name: String,
    /// The file holding the functions; None: the run's (`--binary`, or the target's executable).
    pub binary: Option<PathBuf>,
    pub open: String,
    pub close: String,
    pub access: String,
    /// Which argument (0-based) of the three functions is the object (0 is `this`).
    pub object_arg: u32,
    /// The access's return value meaning "not found".
    pub miss_ret: Option<i64>,
}

impl Window {
    /// `--clear`, `--update` and `--lookup` as one window named after the lookup as given; None
    /// when they are not given (then `--config` is).
    pub fn from_flags(args: &WatchArgs) -> Option<Window> {
        Some(Window {
            name: args.lookup.clone()?,
            binary: None,
            open: args.clear.clone()?,
            close: args.update.clone()?,
            access: args.lookup.clone()?,
            object_arg: args.cache_arg,
            miss_ret: args.miss_ret,
        })
    }

    pub fn symbol(&self, role: Role) -> &str {
        match role {
            Role::Open => &self.open,
            Role::Close => &self.close,
            Role::Access => &self.access,
        }
    }
}
