//! The Python frames of both sides of a race. The kernel copies, at the event, each frame's code
//! object and current instruction (the frame chain's layout, read here from libpython's DWARF,
//! reaches it as [`PyLayout`]); this reads each code object's names, first line and location
//! table from the target's memory once, and turns the instruction into a line.
use std::{collections::HashMap, sync::Arc};

use detector_common::PyFrames;

use super::{
    key::{STR_LENGTH, STR_STATE, chars, str_data},
    layout::{CodeLayout, Layout, ObjectLayout},
    linetable,
};
use crate::engine::stack::{Frame, Stack};

/// A code object's part of a frame line.
struct Code {
    qualname: String,
    filename: String,
    first_line: i64,
    linetable: Vec<u8>,
    /// The bytecode's address: a frame's instruction minus this is its offset.
    start: u64,
}

/// Longest name or path read from the target.
const MAX_STR: usize = 4096;
// PyBytesObject (an anonymous struct in DWARF): ob_size at 16, data at 32.
const BYTES_SIZE: usize = 16;
const BYTES_DATA: u64 = 32;
/// Longest location table read.
const MAX_LINETABLE: usize = 1 << 20;

pub struct PyStacks {
    pid: u32,
    layout: CodeLayout,
    objects: ObjectLayout,
    /// Code objects read so far (`None`: unreadable), by address. Code objects of functions live
    /// as long as their module, so an address is not reused for another code while the
    /// program runs its functions.
    codes: HashMap<u64, Option<Arc<Code>>>,
}

/// Reads `len` bytes at `addr` of process `pid`.
fn read_mem(pid: u32, addr: u64, len: usize) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: len,
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: len,
    };
    // SAFETY: `local` covers `buf`, which outlives the call; the kernel checks `remote`.
    let n = unsafe { libc::process_vm_readv(pid as libc::pid_t, &local, 1, &remote, 1, 0) };
    (usize::try_from(n).ok()? == len).then_some(buf)
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

impl PyStacks {
    pub fn new(pid: u32, layout: &Layout) -> PyStacks {
        PyStacks {
            pid,
            layout: layout.code,
            objects: layout.objects,
            codes: HashMap::new(),
        }
    }

    fn ptr(&self, addr: u64) -> Option<u64> {
        u64_at(&read_mem(self.pid, addr, 8)?, 0)
    }

    /// A compact str object's text.
    fn str_at(&self, obj: u64) -> Option<String> {
        let head = read_mem(self.pid, obj, self.objects.compact_data)?;
        let len = usize::try_from(u64_at(&head, STR_LENGTH)?)
            .ok()?
            .min(MAX_STR);
        let state = u32::from_ne_bytes(head.get(STR_STATE..STR_STATE + 4)?.try_into().ok()?);
        let (start, width) = str_data(state, &self.objects)?;
        let data = read_mem(self.pid, obj + start as u64, len * width)?;
        Some(chars(&data, width).collect())
    }

    fn read_code(&self, code: u64) -> Option<Code> {
        let l = &self.layout;
        let table = self.ptr(code + l.linetable)?;
        let head = read_mem(self.pid, table, BYTES_DATA as usize)?;
        let size = usize::try_from(u64_at(&head, BYTES_SIZE)?)
            .ok()?
            .min(MAX_LINETABLE);
        let first_line = read_mem(self.pid, code + l.first_line, 4)?;
        Some(Code {
            qualname: self.str_at(self.ptr(code + l.qualname)?)?,
            filename: self.str_at(self.ptr(code + l.filename)?)?,
            first_line: i64::from(i32::from_ne_bytes(first_line.try_into().ok()?)),
            linetable: read_mem(self.pid, table + BYTES_DATA, size)?,
            start: code + l.code_start,
        })
    }

    /// The frames of `f`, innermost first; a frame whose code cannot be read is `??`.
    pub fn resolve(&mut self, f: &PyFrames) -> Stack {
        let depth = (f.depth as usize).min(f.frames.len());
        let mut frames: Vec<Frame> = f.frames[..depth]
            .iter()
            .map(|fr| {
                let code = match self.codes.get(&fr.code) {
                    Some(c) => c.clone(),
                    None => {
                        let c = self.read_code(fr.code).map(Arc::new);
                        self.codes.insert(fr.code, c.clone());
                        c
                    }
                };
                match code {
                    Some(c) => Frame {
                        function: c.qualname.clone(),
                        file: Some(c.filename.clone()),
                        line: linetable::line_at(
                            &c.linetable,
                            c.first_line,
                            fr.prev_instr.wrapping_sub(c.start) as i64,
                        ),
                    },
                    None => Frame::unknown(),
                }
            })
            .collect();
        if f.truncated != 0 {
            frames.push(Frame {
                function: "... (deeper frames not copied)".into(),
                file: None,
                line: None,
            });
        }
        frames.into()
    }
}
