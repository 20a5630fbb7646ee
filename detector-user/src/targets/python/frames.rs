//! The Python frames of both sides of a race. The kernel copies, at the event, each frame's code
//! object and current instruction (the frame chain's layout, read here from libpython's DWARF,
//! reaches it as [`PyLayout`]); this reads each code object's names, first line and location
//! table from the target's memory once, and turns the instruction into a line.
use std::{collections::HashMap, path::Path, sync::Arc};

use detector_common::{PyFrames, PyLayout};

use super::{
    dwarf::{SiteError, member_offsets, symbol, with_dwarf},
    key::{COMPACT_DATA, STR_LENGTH, STR_STATE, chars, str_data},
    linetable,
};
use crate::engine::stack::{Frame, Stack};

/// The CPython 3.11 members racewatch reads, by (struct, member).
const MEMBERS: [(&str, &str); 11] = [
    ("pyruntimestate", "gilstate"),
    ("_gilstate_runtime_state", "tstate_current"),
    ("_ts", "cframe"),
    ("_PyCFrame", "current_frame"),
    ("_PyInterpreterFrame", "f_code"),
    ("_PyInterpreterFrame", "previous"),
    ("_PyInterpreterFrame", "prev_instr"),
    ("PyCodeObject", "co_qualname"),
    ("PyCodeObject", "co_filename"),
    ("PyCodeObject", "co_firstlineno"),
    ("PyCodeObject", "co_linetable"),
];
/// `co_code_adaptive`, where the bytecode starts, looked up apart: the instruction offset is
/// measured from it.
const CODE_START: (&str, &str) = ("PyCodeObject", "co_code_adaptive");

/// Where a code object keeps what a frame line needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodeLayout {
    qualname: u64,
    filename: u64,
    first_line: u64,
    linetable: u64,
    code_start: u64,
}

/// What racewatch needs to name Python frames: the kernel's part and userspace's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameLayout {
    pub kernel: PyLayout,
    pub code: CodeLayout,
}

/// The frame layout of the libpython (or python) `image`, for probes on the clear function at
/// ELF address `clear_at` and on the KeyError function at `keyerror_at`.
pub fn layout(image: &Path, clear_at: u64, keyerror_at: u64) -> Result<FrameLayout, SiteError> {
    let runtime = symbol(image, "_PyRuntime")?.ok_or_else(|| SiteError::NoFrameLayout {
        path: image.into(),
        missing: "the symbol _PyRuntime".into(),
    })?;
    with_dwarf(image, |_, dpath, dwarf| {
        let missing = |what: String| SiteError::NoFrameLayout {
            path: dpath.into(),
            missing: what,
        };
        let dwarf_err = |source| SiteError::Dwarf {
            path: dpath.into(),
            source,
        };
        let found = member_offsets(dwarf, &MEMBERS).map_err(dwarf_err)?;
        let [code_start] = member_offsets(dwarf, &[CODE_START]).map_err(dwarf_err)?;
        let mut o = [0u64; MEMBERS.len()];
        for (i, (strukt, member)) in MEMBERS.iter().enumerate() {
            o[i] = found[i].ok_or_else(|| missing(format!("struct {strukt}'s member {member}")))?;
        }
        let code_start = code_start
            .ok_or_else(|| missing("struct PyCodeObject's member co_code_adaptive".into()))?;
        let tstate = runtime + o[0] + o[1];
        Ok(FrameLayout {
            kernel: PyLayout {
                tstate_from_clear: tstate.wrapping_sub(clear_at) as i64,
                tstate_from_keyerror: tstate.wrapping_sub(keyerror_at) as i64,
                cframe: o[2],
                current_frame: o[3],
                f_code: o[4],
                previous: o[5],
                prev_instr: o[6],
            },
            code: CodeLayout {
                qualname: o[7],
                filename: o[8],
                first_line: o[9],
                linetable: o[10],
                code_start,
            },
        })
    })
}

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
    pub fn new(pid: u32, layout: CodeLayout) -> PyStacks {
        PyStacks {
            pid,
            layout,
            codes: HashMap::new(),
        }
    }

    fn ptr(&self, addr: u64) -> Option<u64> {
        u64_at(&read_mem(self.pid, addr, 8)?, 0)
    }

    /// A compact str object's text.
    fn str_at(&self, obj: u64) -> Option<String> {
        let head = read_mem(self.pid, obj, COMPACT_DATA)?;
        let len = usize::try_from(u64_at(&head, STR_LENGTH)?)
            .ok()?
            .min(MAX_STR);
        let state = u32::from_ne_bytes(head.get(STR_STATE..STR_STATE + 4)?.try_into().ok()?);
        let (start, width) = str_data(state)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    const LIBPYTHON: &str = "/root/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0";

    /// gdb's value of each C expression, in hex.
    fn gdb(lib: &Path, exprs: &[&str]) -> Option<Vec<u64>> {
        let mut cmd = std::process::Command::new("gdb");
        cmd.arg("-batch");
        for e in exprs {
            cmd.args(["-ex", &format!("print/x (long){e}")]);
        }
        let out = cmd.arg(lib).output().ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let v: Vec<u64> = text
            .lines()
            .filter_map(|l| l.split("0x").nth(1))
            .filter_map(|h| u64::from_str_radix(h.trim(), 16).ok())
            .collect();
        (v.len() == exprs.len()).then_some(v)
    }

    #[test]
    fn offsets_are_the_ones_gdb_reads_from_the_same_dwarf() {
        let lib = Path::new(LIBPYTHON);
        if !lib.is_file() {
            eprintln!("skipped: no {LIBPYTHON}");
            return;
        }
        let l = layout(lib, 0x1000, 0x2000).unwrap();
        let Some(want) = gdb(
            lib,
            &[
                "&_PyRuntime.gilstate.tstate_current",
                "&((PyThreadState*)0)->cframe",
                "&((_PyCFrame*)0)->current_frame",
                "&((_PyInterpreterFrame*)0)->f_code",
                "&((_PyInterpreterFrame*)0)->previous",
                "&((_PyInterpreterFrame*)0)->prev_instr",
                "&((PyCodeObject*)0)->co_qualname",
                "&((PyCodeObject*)0)->co_filename",
                "&((PyCodeObject*)0)->co_firstlineno",
                "&((PyCodeObject*)0)->co_linetable",
                "&((PyCodeObject*)0)->co_code_adaptive",
            ],
        ) else {
            eprintln!("skipped: no gdb");
            return;
        };
        let k = l.kernel;
        assert_eq!(k.tstate_from_clear, want[0] as i64 - 0x1000);
        assert_eq!(k.tstate_from_keyerror, want[0] as i64 - 0x2000);
        assert_eq!(
            [
                k.cframe,
                k.current_frame,
                k.f_code,
                k.previous,
                k.prev_instr
            ],
            want[1..6]
        );
        let c = l.code;
        assert_eq!(
            [
                c.qualname,
                c.filename,
                c.first_line,
                c.linetable,
                c.code_start
            ],
            want[6..11]
        );
    }

    #[test]
    fn an_image_without_the_runtime_says_what_is_missing() {
        let err = layout(Path::new("/bin/true"), 0, 0).unwrap_err();
        assert!(
            err.to_string()
                .contains("/bin/true does not describe the symbol _PyRuntime in its DWARF"),
            "{err}"
        );
    }
}
