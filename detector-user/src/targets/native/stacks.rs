//! Native stacks: the kernel copies a thread's registers and the top of its stack; this unwinds
//! that copy with the `.eh_frame` CFI of every ELF file the target maps (framehop, as
//! `perf --call-graph dwarf` does), so stacks come out whole from builds without frame pointers
//! and from any instruction a probe sits on, then symbolizes each frame (blazesym: demangled
//! names, inlined calls, file:line from DWARF).
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use blazesym::symbolize::{
    Input, Symbolized, Symbolizer,
    source::{Elf, Source},
};
use detector_common::{NativeStack, STACK_AT_RETURN};
use framehop::{
    ExplicitModuleSectionInfo, FrameAddress, Module, Unwinder,
    x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64},
};
use object::{Object, ObjectSection, ObjectSegment};

use crate::{
    engine::stack::{Frame, Stack},
    process::maps::{self, Mapping},
};

/// Deeper stacks are cut here (innermost frames kept).
const MAX_FRAMES: usize = 64;

/// A function whose return is probed: its own frame is gone from the stack at that point, so it
/// is put back as the innermost frame.
#[derive(Clone, Debug)]
pub struct ReturnedFrom {
    pub binary: PathBuf,
    /// ELF virtual address of the function.
    pub address: u64,
}

pub struct NativeStacks {
    pid: u32,
    maps: Vec<Mapping>,
    /// Files given to the unwinder, with their load bias (runtime address minus ELF address).
    images: HashMap<PathBuf, u64>,
    unwinder: UnwinderX86_64<Vec<u8>>,
    cache: CacheX86_64,
    symbolizer: Symbolizer,
    /// Frames of each code address seen, keyed by (address, is a return address).
    symbols: HashMap<(u64, bool), Vec<Frame>>,
    /// Each distinct unwound stack, symbolized once: a thread in a loop unwinds to the same
    /// addresses again and again.
    stacks: HashMap<Vec<(u64, bool)>, Stack>,
    returned_from: Option<(ReturnedFrom, Option<Vec<Frame>>)>,
}

/// Section `name` of `obj`: its address range and a copy of its bytes.
fn section(obj: &object::File, name: &str) -> (Option<std::ops::Range<u64>>, Option<Vec<u8>>) {
    match obj.section_by_name(name) {
        Some(s) => (
            Some(s.address()..s.address() + s.size()),
            s.uncompressed_data().ok().map(|d| d.into_owned()),
        ),
        None => (None, None),
    }
}

/// Runtime address minus ELF address for `file`, from one of its mappings.
fn load_bias(obj: &object::File, m: &Mapping) -> Option<u64> {
    obj.segments().find_map(|seg| {
        let (off, size) = seg.file_range();
        (off..off + size)
            .contains(&m.offset)
            .then(|| m.start.wrapping_sub(seg.address() + (m.offset - off)))
    })
}

impl NativeStacks {
    /// `returned_from`: the probed function whose return carries stacks ([`STACK_AT_RETURN`]).
    pub fn new(pid: u32, returned_from: Option<ReturnedFrom>) -> NativeStacks {
        NativeStacks {
            pid,
            maps: Vec::new(),
            images: HashMap::new(),
            unwinder: UnwinderX86_64::new(),
            cache: CacheX86_64::new(),
            symbolizer: Symbolizer::new(),
            symbols: HashMap::new(),
            stacks: HashMap::new(),
            returned_from: returned_from.map(|r| (r, None)),
        }
    }

    /// Re-reads the target's mappings and gives the unwinder every executable file not seen yet
    /// (the first stack comes after the target's exec; later ones may follow a dlopen). Keeps the
    /// old mappings if the target is gone.
    fn refresh(&mut self) {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{}/maps", self.pid)) else {
            return;
        };
        self.maps = maps::parse(&text);
        let files: Vec<&Mapping> = self
            .maps
            .iter()
            .filter(|m| m.executable && m.path.is_some())
            .collect();
        let mut added = Vec::new();
        for m in files {
            let Some(path) = &m.path else { continue };
            if self.images.contains_key(path) || added.iter().any(|(p, _)| p == path) {
                continue;
            }
            let range = self
                .maps
                .iter()
                .filter(|o| o.path.as_ref() == Some(path))
                .fold(m.start..m.end, |r, o| {
                    r.start.min(o.start)..r.end.max(o.end)
                });
            if let Some((bias, module)) = image_module(path, m, range) {
                self.unwinder.add_module(module);
                added.push((path.clone(), bias));
            }
        }
        self.images.extend(added);
    }

    fn covered(&self, addr: u64) -> bool {
        maps::find(&self.maps, addr)
            .and_then(|m| m.path.as_ref())
            .is_some_and(|p| self.images.contains_key(p))
    }

    /// The code addresses of `s`, innermost first, each with whether it is a return address.
    fn unwind(&mut self, s: &NativeStack) -> Vec<(u64, bool)> {
        let len = (s.len as usize).min(s.stack.len());
        let mut read_stack = |addr: u64| -> Result<u64, ()> {
            let off = usize::try_from(addr.checked_sub(s.rsp).ok_or(())?).map_err(|_| ())?;
            let bytes = s.stack[..len].get(off..off + 8).ok_or(())?;
            Ok(u64::from_le_bytes(bytes.try_into().map_err(|_| ())?))
        };
        let regs = UnwindRegsX86_64::new(s.rip, s.rsp, s.rbp);
        let at_return = s.flags & STACK_AT_RETURN != 0;
        let mut frames = Vec::new();
        let mut it = self
            .unwinder
            .iter_frames(s.rip, regs, &mut self.cache, &mut read_stack);
        // A stack the unwinder cannot finish (an address outside any file, a stack deeper than
        // the copy) keeps the frames found so far.
        while let Ok(Some(f)) = it.next() {
            frames.push(match f {
                FrameAddress::InstructionPointer(a) => (a, at_return),
                FrameAddress::ReturnAddress(a) => (a.get(), true),
            });
            if frames.len() == MAX_FRAMES {
                break;
            }
        }
        frames
    }

    /// Unwinds and symbolizes `s`, innermost frame first.
    pub fn resolve(&mut self, s: &NativeStack) -> Stack {
        if !self.covered(s.rip) {
            self.refresh();
        }
        let mut addrs = self.unwind(s);
        // The last frame outside every known file may be code mapped since the last refresh.
        if addrs.last().is_some_and(|&(a, _)| !self.covered(a)) {
            self.refresh();
            addrs = self.unwind(s);
        }
        let at_return = s.flags & STACK_AT_RETURN != 0;
        // Part of the key: the same addresses with the returned-from frame put back differ.
        addrs.push((u64::from(at_return), false));
        if let Some(stack) = self.stacks.get(&addrs) {
            return stack.clone();
        }
        let mut frames = Vec::new();
        if at_return {
            frames.extend(self.returned_from_frames());
        }
        for &(addr, is_return) in &addrs[..addrs.len() - 1] {
            frames.extend(self.symbolize(addr, is_return));
        }
        let stack: Stack = frames.into();
        self.stacks.insert(addrs, stack.clone());
        stack
    }

    fn returned_from_frames(&mut self) -> Vec<Frame> {
        let Some((r, cached)) = &self.returned_from else {
            return Vec::new();
        };
        if let Some(frames) = cached {
            return frames.clone();
        }
        let frames = self.symbolize_in(&r.binary.clone(), r.address);
        if let Some((_, cached)) = &mut self.returned_from {
            *cached = Some(frames.clone());
        }
        frames
    }

    fn symbolize(&mut self, addr: u64, is_return: bool) -> Vec<Frame> {
        if let Some(f) = self.symbols.get(&(addr, is_return)) {
            return f.clone();
        }
        // A return address is the instruction after the call: the call's line is one byte back.
        let lookup = if is_return {
            addr.wrapping_sub(1)
        } else {
            addr
        };
        let found = maps::find(&self.maps, lookup)
            .and_then(|m| m.path.clone())
            .and_then(|p| self.images.get(&p).map(|bias| (p, *bias)));
        let frames = match found {
            Some((path, bias)) => self.symbolize_in(&path, lookup.wrapping_sub(bias)),
            None => vec![Frame::unknown()],
        };
        self.symbols.insert((addr, is_return), frames.clone());
        frames
    }

    /// The frames at ELF address `vaddr` of `path`: inlined calls first, then the function
    /// that holds them.
    fn symbolize_in(&self, path: &Path, vaddr: u64) -> Vec<Frame> {
        let src = Source::Elf(Elf::new(path));
        match self
            .symbolizer
            .symbolize_single(&src, Input::VirtOffset(vaddr))
        {
            Ok(Symbolized::Sym(sym)) => {
                // blazesym gives each function the location inside it: the outer function's
                // is its call of the first inlined one, and the last inlined one's is `vaddr`'s.
                let frame = |name: &str, info: Option<&blazesym::symbolize::CodeInfo>| Frame {
                    function: name.to_string(),
                    file: info.map(|i| i.to_path().display().to_string()),
                    line: info.and_then(|i| i.line),
                };
                let mut frames: Vec<Frame> = sym
                    .inlined
                    .iter()
                    .rev()
                    .map(|f| frame(&f.name, f.code_info.as_ref()))
                    .collect();
                // DWARF names the function without its scope (`operator()` for a lambda); the
                // symbol table has the full demangled name.
                let name = self.elf_name(path, vaddr).unwrap_or(sym.name.into_owned());
                frames.push(frame(&name, sym.code_info.as_deref()));
                frames
            }
            _ => vec![Frame {
                function: format!(
                    "?? ({}+{vaddr:#x})",
                    path.file_name().unwrap_or_default().to_string_lossy()
                ),
                file: None,
                line: None,
            }],
        }
    }
}

impl NativeStacks {
    /// The demangled symbol-table name of the function at `vaddr`.
    fn elf_name(&self, path: &Path, vaddr: u64) -> Option<String> {
        let mut elf = Elf::new(path);
        elf.debug_syms = false;
        match self
            .symbolizer
            .symbolize_single(&Source::Elf(elf), Input::VirtOffset(vaddr))
        {
            Ok(Symbolized::Sym(sym)) => Some(sym.name.into_owned()),
            _ => None,
        }
    }
}

/// The unwind module of the ELF file at `path`, mapped over `range` (`m` is one of its
/// executable mappings), and its load bias; `None` if the file cannot be read as ELF.
fn image_module(
    path: &Path,
    m: &Mapping,
    range: std::ops::Range<u64>,
) -> Option<(u64, Module<Vec<u8>>)> {
    let data = std::fs::read(path).ok()?;
    let obj = object::File::parse(&*data).ok()?;
    let bias = load_bias(&obj, m)?;
    let (text_svma, text) = section(&obj, ".text");
    let (eh_frame_svma, eh_frame) = section(&obj, ".eh_frame");
    let (eh_frame_hdr_svma, eh_frame_hdr) = section(&obj, ".eh_frame_hdr");
    let (got_svma, _) = section(&obj, ".got");
    let info = ExplicitModuleSectionInfo {
        base_svma: 0,
        text_svma,
        text,
        got_svma,
        eh_frame_svma,
        eh_frame,
        eh_frame_hdr_svma,
        eh_frame_hdr,
        ..Default::default()
    };
    let module = Module::new(path.display().to_string(), range, bias, info);
    Some((bias, module))
}
