//! Native stacks: the kernel copies a thread's registers and the top of its stack; this unwinds
//! that copy with the `.eh_frame` CFI of every ELF file the target maps (framehop, as
//! `perf --call-graph dwarf` does), so stacks come out whole from builds without frame pointers
//! and from any instruction a probe sits on, then symbolizes each frame (blazesym: demangled
//! names, inlined calls, file:line from DWARF).
use std::{
    cell::RefCell,
    collections::HashMap,
    path::{Path, PathBuf},
    rc::Rc,
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
    unwinder: UnwinderX86_64<Bytes>,
    cache: CacheX86_64,
    shared: Rc<Shared>,
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

impl NativeStacks {
    /// `returned_from`: the probed function whose return carries stacks ([`STACK_AT_RETURN`]).
    pub fn new(pid: u32, returned_from: Option<ReturnedFrom>, shared: Rc<Shared>) -> NativeStacks {
        NativeStacks {
            pid,
            maps: Vec::new(),
            images: HashMap::new(),
            unwinder: UnwinderX86_64::new(),
            cache: CacheX86_64::new(),
            shared,
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
        // A process in a container maps its files by the container's paths: each is opened
        // through the process's root where the host's path names another file or none.
        let mut opened: HashMap<PathBuf, PathBuf> = HashMap::new();
        for m in &mut self.maps {
            if let Some(path) = m.path.take() {
                let file = opened
                    .entry(path)
                    .or_insert_with_key(|p| crate::process::file_of(self.pid, p));
                m.path = Some(file.clone());
            }
        }
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
            if let Some((bias, module)) = image_module(&self.shared, path, m, range) {
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
            .shared
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
            .shared
            .symbolizer
            .symbolize_single(&Source::Elf(elf), Input::VirtOffset(vaddr))
        {
            Ok(Symbolized::Sym(sym)) => Some(sym.name.into_owned()),
            _ => None,
        }
    }
}

/// Section bytes shared by the unwinders of every process that maps the same file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Bytes(Rc<[u8]>);

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

/// What unwinding needs of one ELF file, read once however many processes map it.
struct FileSections {
    text: (Option<std::ops::Range<u64>>, Option<Bytes>),
    eh_frame: (Option<std::ops::Range<u64>>, Option<Bytes>),
    eh_frame_hdr: (Option<std::ops::Range<u64>>, Option<Bytes>),
    got: Option<std::ops::Range<u64>>,
    /// Each loadable segment: file offset, file size, ELF address (for the load bias).
    segments: Vec<(u64, u64, u64)>,
}

/// A file by device and inode: the same file whatever path a process maps it by.
type FileId = (u64, u64);

/// What every process's stacks share: each file's sections (by device and inode) and the
/// symbolizer, which keeps each file's symbols and DWARF once parsed. A pool of workers mapping
/// the same files costs one parse, not one each.
#[derive(Default)]
pub struct Shared {
    files: RefCell<HashMap<FileId, Option<Rc<FileSections>>>>,
    symbolizer: Symbolizer,
}

impl Shared {
    fn sections(&self, path: &Path) -> Option<Rc<FileSections>> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).ok()?;
        let id = (meta.dev(), meta.ino());
        if let Some(known) = self.files.borrow().get(&id) {
            return known.clone();
        }
        let read = || -> Option<FileSections> {
            let data = std::fs::read(path).ok()?;
            let obj = object::File::parse(&*data).ok()?;
            let bytes = |name: &str| {
                let (range, data) = section(&obj, name);
                (range, data.map(|d| Bytes(d.into())))
            };
            Some(FileSections {
                text: bytes(".text"),
                eh_frame: bytes(".eh_frame"),
                eh_frame_hdr: bytes(".eh_frame_hdr"),
                got: section(&obj, ".got").0,
                segments: obj
                    .segments()
                    .map(|seg| {
                        let (off, size) = seg.file_range();
                        (off, size, seg.address())
                    })
                    .collect(),
            })
        };
        let found = read().map(Rc::new);
        self.files.borrow_mut().insert(id, found.clone());
        found
    }
}

/// The unwind module of the ELF file at `path`, mapped over `range` (`m` is one of its
/// executable mappings), and its load bias; `None` if the file cannot be read as ELF.
fn image_module(
    shared: &Shared,
    path: &Path,
    m: &Mapping,
    range: std::ops::Range<u64>,
) -> Option<(u64, Module<Bytes>)> {
    let file = shared.sections(path)?;
    let bias = file.segments.iter().find_map(|&(off, size, vaddr)| {
        (off..off + size)
            .contains(&m.offset)
            .then(|| m.start.wrapping_sub(vaddr + (m.offset - off)))
    })?;
    let info = ExplicitModuleSectionInfo {
        base_svma: 0,
        text_svma: file.text.0.clone(),
        text: file.text.1.clone(),
        got_svma: file.got.clone(),
        eh_frame_svma: file.eh_frame.0.clone(),
        eh_frame: file.eh_frame.1.clone(),
        eh_frame_hdr_svma: file.eh_frame_hdr.0.clone(),
        eh_frame_hdr: file.eh_frame_hdr.1.clone(),
        ..Default::default()
    };
    let module = Module::new(path.display().to_string(), range, bias, info);
    Some((bias, module))
}
