//! Where a CPython build keeps what racewatch reads: the current thread state, its frames, a
//! frame's value stack, code objects, str and int objects. Read from what the binary describes
//! about itself: `_Py_DebugOffsets` (3.13+), else its DWARF (here or in a separate debug file),
//! else, for a stripped 3.11 or 3.12, a table per version checked against the binary's own static
//! data. A table the binary contradicts is refused, never guessed around.
use std::path::Path;

use detector_common::PyLayout;

use super::{dwarf, image::Image};

/// The versions racewatch knows, oldest first.
pub const VERSIONS: [(u32, u32); 4] = [(3, 11), (3, 12), (3, 13), (3, 14)];

/// Where a code object keeps what a frame line needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodeLayout {
    pub qualname: u64,
    pub filename: u64,
    pub first_line: u64,
    pub linetable: u64,
    pub code_start: u64,
}

/// Where str and int objects keep their contents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObjectLayout {
    /// A compact ASCII str's characters, and any other compact str's.
    pub ascii_data: usize,
    pub compact_data: usize,
    /// An int's digit count is in `lv_tag` (3.12+), not `ob_size`.
    pub long_tagged: bool,
    /// A tuple's first item (3.14 caches the tuple's hash before it).
    pub tuple_items: usize,
}

/// How the layout was learnt, for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    DebugOffsets,
    Dwarf,
    Table,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            Source::DebugOffsets => "its _Py_DebugOffsets",
            Source::Dwarf => "its DWARF",
            Source::Table => "racewatch's table for its version, checked against its static data",
        })
    }
}

/// One build's layout: the kernel's part (where the failed dict is found is set by the plan) and
/// userspace's, which names the frames and keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub version: (u32, u32),
    pub source: Source,
    pub kernel: PyLayout,
    pub code: CodeLayout,
    pub objects: ObjectLayout,
}

/// The file addresses of the runtime state and the types the kernel checks objects against.
#[derive(Clone, Copy)]
struct Anchors {
    runtime: u64,
    dict_type: u64,
    tuple_type: u64,
}

impl Anchors {
    fn set(self, kernel: PyLayout) -> PyLayout {
        PyLayout {
            runtime: self.runtime,
            dict_type: self.dict_type,
            tuple_type: self.tuple_type,
            ..kernel
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error(
        "{path} is CPython {}.{}: racewatch python knows CPython 3.11 to 3.14",
        version.0, version.1
    )]
    Version { path: String, version: (u32, u32) },
    #[error(
        "{path} is a free-threaded CPython {}.{} build (no GIL): racewatch python watches the \
         builds with a GIL (python{}.{}, not python{}.{}t)",
        version.0, version.1, version.0, version.1, version.0, version.1
    )]
    FreeThreaded { path: String, version: (u32, u32) },
    #[error("{path} exports no {symbol}: it is not a CPython interpreter racewatch can read")]
    Missing { path: String, symbol: &'static str },
    #[error(
        "{path} is CPython {}.{} without debug information, and its static data contradicts \
         racewatch's table for that version ({what}): install its debug symbols (the \
         python{}.{}-dbgsym package or a debuginfod server) so racewatch reads its real layout",
        version.0, version.1, version.0, version.1
    )]
    Contradicted {
        path: String,
        version: (u32, u32),
        what: String,
    },
    #[error(
        "{path} does not say which CPython it is (no _Py_DebugOffsets, no version in its name or \
         its read-only data): racewatch python knows CPython 3.11 to 3.14"
    )]
    NoVersion { path: String },
    #[error("{path}'s _Py_DebugOffsets cannot be read: {what}")]
    DebugOffsets { path: String, what: String },
    #[error("{0}")]
    Dwarf(#[from] dwarf::SiteError),
}

/// `(major, minor)` from a name like `python3.11` or `libpython3.11.so.1.0`.
pub fn version_in_name(path: &Path) -> Option<(u32, u32)> {
    let name = path.file_name()?.to_str()?;
    let rest = &name[name.find("python")? + "python".len()..];
    let mut parts = rest.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// The one `3.N.M` version string in `.rodata`, as `Py_GetVersion` prints it.
fn version_string(image: &Image) -> Option<(u32, u32)> {
    let data = image.section(".rodata")?;
    let mut found = None;
    for s in data.split(|&b| b == 0) {
        let Ok(s) = std::str::from_utf8(s) else {
            continue;
        };
        let core = s.trim_end_matches('+');
        let core = core
            .find(|c: char| c.is_ascii_alphabetic())
            .map_or(core, |i| &core[..i]);
        let mut parts = core.split('.');
        let (Some("3"), Some(minor), Some(patch), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let (Ok(minor), true) = (minor.parse::<u32>(), patch.parse::<u32>().is_ok()) else {
            continue;
        };
        match found {
            None => found = Some((3, minor)),
            Some(v) if v != (3, minor) => return None,
            _ => {}
        }
    }
    found
}

/// What a 3.13+ binary's `_Py_DebugOffsets` (at the start of `_PyRuntime`) says.
struct DebugOffsets {
    version: (u32, u32),
    free_threaded: bool,
    fields: std::collections::HashMap<&'static str, u64>,
}

/// The fields of `_Py_DebugOffsets` after its header, in order, as far as racewatch reads, each
/// with the version that added it (3.14 added fields among 3.13's).
const DEBUG_OFFSETS: &[(&str, (u32, u32))] = &[
    ("runtime_state.size", (3, 13)),
    ("runtime_state.finalizing", (3, 13)),
    ("runtime_state.interpreters_head", (3, 13)),
    ("interpreter_state.size", (3, 13)),
    ("interpreter_state.id", (3, 13)),
    ("interpreter_state.next", (3, 13)),
    ("interpreter_state.threads_head", (3, 13)),
    ("interpreter_state.threads_main", (3, 14)),
    ("interpreter_state.gc", (3, 13)),
    ("interpreter_state.imports_modules", (3, 13)),
    ("interpreter_state.sysdict", (3, 13)),
    ("interpreter_state.builtins", (3, 13)),
    ("interpreter_state.ceval_gil", (3, 13)),
    ("interpreter_state.gil_runtime_state", (3, 13)),
    ("interpreter_state.gil_runtime_state_enabled", (3, 13)),
    ("interpreter_state.gil_runtime_state_locked", (3, 13)),
    ("interpreter_state.gil_runtime_state_holder", (3, 13)),
    ("interpreter_state.code_object_generation", (3, 14)),
    ("interpreter_state.tlbc_generation", (3, 14)),
    ("thread_state.size", (3, 13)),
    ("thread_state.prev", (3, 13)),
    ("thread_state.next", (3, 13)),
    ("thread_state.interp", (3, 13)),
    ("thread_state.current_frame", (3, 13)),
    ("thread_state.thread_id", (3, 13)),
    ("thread_state.native_thread_id", (3, 13)),
    ("thread_state.datastack_chunk", (3, 13)),
    ("thread_state.status", (3, 13)),
    ("interpreter_frame.size", (3, 13)),
    ("interpreter_frame.previous", (3, 13)),
    ("interpreter_frame.executable", (3, 13)),
    ("interpreter_frame.instr_ptr", (3, 13)),
    ("interpreter_frame.localsplus", (3, 13)),
    ("interpreter_frame.owner", (3, 13)),
    ("interpreter_frame.stackpointer", (3, 14)),
    ("interpreter_frame.tlbc_index", (3, 14)),
    ("code_object.size", (3, 13)),
    ("code_object.filename", (3, 13)),
    ("code_object.name", (3, 13)),
    ("code_object.qualname", (3, 13)),
    ("code_object.linetable", (3, 13)),
    ("code_object.firstlineno", (3, 13)),
    ("code_object.argcount", (3, 13)),
    ("code_object.localsplusnames", (3, 13)),
    ("code_object.localspluskinds", (3, 13)),
    ("code_object.co_code_adaptive", (3, 13)),
    ("code_object.co_tlbc", (3, 14)),
    ("pyobject.size", (3, 13)),
    ("pyobject.ob_type", (3, 13)),
    ("type_object.size", (3, 13)),
    ("type_object.tp_name", (3, 13)),
    ("type_object.tp_repr", (3, 13)),
    ("type_object.tp_flags", (3, 13)),
    ("tuple_object.size", (3, 13)),
    ("tuple_object.ob_item", (3, 13)),
    ("tuple_object.ob_size", (3, 13)),
    ("list_object.size", (3, 13)),
    ("list_object.ob_item", (3, 13)),
    ("list_object.ob_size", (3, 13)),
    ("set_object.size", (3, 14)),
    ("set_object.used", (3, 14)),
    ("set_object.table", (3, 14)),
    ("set_object.mask", (3, 14)),
    ("dict_object.size", (3, 13)),
    ("dict_object.ma_keys", (3, 13)),
    ("dict_object.ma_values", (3, 13)),
    ("float_object.size", (3, 13)),
    ("float_object.ob_fval", (3, 13)),
    ("long_object.size", (3, 13)),
    ("long_object.lv_tag", (3, 13)),
    ("long_object.ob_digit", (3, 13)),
    ("bytes_object.size", (3, 13)),
    ("bytes_object.ob_size", (3, 13)),
    ("bytes_object.ob_sval", (3, 13)),
    ("unicode_object.size", (3, 13)),
    ("unicode_object.state", (3, 13)),
    ("unicode_object.length", (3, 13)),
    ("unicode_object.asciiobject_size", (3, 13)),
];

impl DebugOffsets {
    /// `None` when the binary has no `_Py_DebugOffsets` (before 3.13).
    fn read(image: &Image) -> Result<Option<DebugOffsets>, String> {
        let Some((runtime, runtime_size)) = image.symbol("_PyRuntime") else {
            return Ok(None);
        };
        if image.bytes_at(runtime, 8) != Some(b"xdebugpy") {
            return Ok(None);
        }
        let word = |i: u64| {
            image
                .bytes_at(runtime + 8 * i, 8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
        };
        let hex = word(1).ok_or("no version after the cookie")?;
        let version = ((hex >> 24) as u32, ((hex >> 16) & 0xff) as u32);
        if !matches!(version, (3, 13) | (3, 14)) {
            return Ok(Some(DebugOffsets {
                version,
                free_threaded: false,
                fields: Default::default(),
            }));
        }
        let names = DEBUG_OFFSETS
            .iter()
            .filter(|(_, since)| *since <= version)
            .map(|(name, _)| *name);
        // The header is the cookie, the version and, from 3.13.1 on, whether the build is
        // free-threaded; the first field after it is `_PyRuntime`'s own size, which tells.
        let first = [3, 2]
            .into_iter()
            .find(|&i| word(i) == Some(runtime_size))
            .ok_or_else(|| {
                format!("no field holds _PyRuntime's size ({runtime_size:#x}) where it should")
            })?;
        let free_threaded = first == 3 && word(2) != Some(0);
        let mut fields = std::collections::HashMap::new();
        for (i, name) in names.enumerate() {
            let v = word(first + i as u64).ok_or_else(|| format!("{name} is past its end"))?;
            fields.insert(name, v);
        }
        Ok(Some(DebugOffsets {
            version,
            free_threaded,
            fields,
        }))
    }

    fn get(&self, name: &str) -> u64 {
        self.fields.get(name).copied().unwrap_or(0)
    }
}

/// What `_Py_DebugOffsets` does not give: `PyCodeObject.co_nlocalsplus` and `.co_stacksize`,
/// checked through the fields it does give (same `co_firstlineno` and `co_argcount`: the same
/// layout head).
const CODE_COUNTS: [((u32, u32), [u64; 4]); 4] = [
    // (version, [co_argcount, co_stacksize, co_firstlineno, co_nlocalsplus])
    ((3, 11), [0x34, 0x44, 0x48, 0x4c]),
    ((3, 12), [0x34, 0x40, 0x44, 0x48]),
    ((3, 13), [0x34, 0x40, 0x44, 0x48]),
    ((3, 14), [0x34, 0x40, 0x44, 0x48]),
];

fn code_counts(version: (u32, u32)) -> [u64; 4] {
    CODE_COUNTS
        .iter()
        .find(|(v, _)| *v == version)
        .map_or([0; 4], |(_, c)| *c)
}

/// Where `version`'s str and int objects keep their contents.
pub fn objects(version: (u32, u32)) -> ObjectLayout {
    if version >= (3, 12) {
        // 3.12 dropped `wstr` and `wstr_length`.
        ObjectLayout {
            ascii_data: 40,
            compact_data: 56,
            long_tagged: true,
            tuple_items: if version >= (3, 14) { 32 } else { 24 },
        }
    } else {
        ObjectLayout {
            ascii_data: 48,
            compact_data: 72,
            long_tagged: false,
            tuple_items: 24,
        }
    }
}

/// The layout of the interpreter in `image`, whose version its `_Py_DebugOffsets` gives, else
/// its file name, else the version string (`PY_VERSION`) in its read-only data.
pub fn layout(image: &Image) -> Result<Layout, LayoutError> {
    let mut l = read_layout(image)?;
    l.kernel.ascii_data = l.objects.ascii_data as u64;
    l.kernel.compact_data = l.objects.compact_data as u64;
    l.kernel.tuple_items = l.objects.tuple_items as u64;
    l.kernel.hash_secret = if hashes_with_siphash13(image) {
        image.symbol("_Py_HashSecret").map_or(0, |s| s.0)
    } else {
        0
    };
    Ok(l)
}

/// Whether the build's str hash is SipHash-1-3 (the default since 3.11; `--with-hash-algorithm`
/// may pick SipHash-2-4 or FNV): its `PyHash_FuncDef` names the one algorithm it was built with
/// (the linker packs strings, so a name may follow other bytes without a NUL between).
fn hashes_with_siphash13(image: &Image) -> bool {
    image.section(".rodata").is_some_and(|data| {
        let names: Vec<&[u8]> = data
            .split(|&b| b == 0)
            .filter_map(|s| {
                [&b"siphash13"[..], b"siphash24", b"fnv"]
                    .into_iter()
                    .find(|n| s.ends_with(n))
            })
            .collect();
        !names.is_empty() && names.iter().all(|n| *n == b"siphash13")
    })
}

fn read_layout(image: &Image) -> Result<Layout, LayoutError> {
    let path = image.path.display().to_string();
    let debug = DebugOffsets::read(image).map_err(|what| LayoutError::DebugOffsets {
        path: path.clone(),
        what,
    })?;
    let version = debug
        .as_ref()
        .map(|d| d.version)
        .or_else(|| version_in_name(&image.path))
        .or_else(|| version_string(image))
        .ok_or_else(|| LayoutError::NoVersion { path: path.clone() })?;
    if !VERSIONS.contains(&version) {
        return Err(LayoutError::Version { path, version });
    }
    let symbol = |symbol: &'static str| {
        image
            .symbol(symbol)
            .map(|s| s.0)
            .ok_or_else(|| LayoutError::Missing {
                path: path.clone(),
                symbol,
            })
    };
    let at = Anchors {
        runtime: symbol("_PyRuntime")?,
        dict_type: symbol("PyDict_Type")?,
        tuple_type: symbol("PyTuple_Type")?,
    };
    if let Some(d) = debug.filter(|d| !d.fields.is_empty()) {
        if d.free_threaded {
            return Err(LayoutError::FreeThreaded { path, version });
        }
        return from_debug_offsets(&d, at).map_err(|what| LayoutError::Contradicted {
            path,
            version,
            what,
        });
    }
    if is_free_threaded_name(&image.path) {
        return Err(LayoutError::FreeThreaded { path, version });
    }
    match from_dwarf(image, version, at) {
        Ok(l) => Ok(l),
        Err(dwarf::SiteError::NoDebugInfo { .. }) => from_table(image, version, at),
        Err(e) => Err(e.into()),
    }
}

/// `python3.13t`, `libpython3.14t.so.1.0`: the ABI flag `t` of a free-threaded build.
fn is_free_threaded_name(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    let Some(at) = name.find("python") else {
        return false;
    };
    let rest =
        name[at + "python".len()..].trim_start_matches(|c: char| c.is_ascii_digit() || c == '.');
    rest.starts_with('t')
}

fn from_debug_offsets(d: &DebugOffsets, at: Anchors) -> Result<Layout, String> {
    let [argcount, stacksize, firstlineno, nlocalsplus] = code_counts(d.version);
    if d.get("code_object.argcount") != argcount || d.get("code_object.firstlineno") != firstlineno
    {
        return Err(format!(
            "its code objects keep co_argcount at {:#x} and co_firstlineno at {:#x}",
            d.get("code_object.argcount"),
            d.get("code_object.firstlineno")
        ));
    }
    let gil = d.get("interpreter_state.gil_runtime_state");
    let holder = d.get("interpreter_state.gil_runtime_state_holder");
    Ok(Layout {
        version: d.version,
        source: Source::DebugOffsets,
        kernel: at.set(PyLayout {
            // The head interpreter's GIL (through `ceval.gil`, which a subinterpreter sharing the
            // main GIL points elsewhere), and the thread holding it.
            tstate: [
                d.get("runtime_state.interpreters_head"),
                d.get("interpreter_state.ceval_gil"),
                holder.wrapping_sub(gil),
            ],
            tstate_hops: 3,
            gil: [
                d.get("runtime_state.interpreters_head"),
                d.get("interpreter_state.ceval_gil"),
                0,
            ],
            gil_hops: 2,
            frame: [d.get("thread_state.current_frame"), 0],
            frame_hops: 1,
            f_code: d.get("interpreter_frame.executable"),
            previous: d.get("interpreter_frame.previous"),
            instr: d.get("interpreter_frame.instr_ptr"),
            localsplus: d.get("interpreter_frame.localsplus"),
            co_nlocalsplus: nlocalsplus,
            co_stacksize: stacksize,
            // 3.14's frames and value stacks hold tagged references.
            tag_bits: if d.version >= (3, 14) { 3 } else { 0 },
            long_tagged: 1,
            ..PyLayout::default()
        }),
        code: CodeLayout {
            qualname: d.get("code_object.qualname"),
            filename: d.get("code_object.filename"),
            first_line: firstlineno,
            linetable: d.get("code_object.linetable"),
            code_start: d.get("code_object.co_code_adaptive"),
        },
        objects: ObjectLayout {
            ascii_data: d.get("unicode_object.asciiobject_size") as usize,
            tuple_items: d.get("tuple_object.ob_item") as usize,
            ..objects(d.version)
        },
    })
}

/// 3.11's and 3.12's fields, by (struct, member); the thread state is reached through 3.11's
/// `gilstate.tstate_current`, or 3.12's main interpreter's GIL holder.
const MEMBERS: [(&str, &str); 19] = [
    ("pyruntimestate", "gilstate"),
    ("_gilstate_runtime_state", "tstate_current"),
    ("pyruntimestate", "interpreters"),
    ("pyinterpreters", "main"),
    ("_ceval_state", "gil"),
    ("_is", "ceval"),
    ("_gil_runtime_state", "last_holder"),
    ("_ts", "cframe"),
    ("_PyCFrame", "current_frame"),
    ("_PyInterpreterFrame", "f_code"),
    ("_PyInterpreterFrame", "previous"),
    ("_PyInterpreterFrame", "prev_instr"),
    ("_PyInterpreterFrame", "localsplus"),
    ("PyCodeObject", "co_qualname"),
    ("PyCodeObject", "co_filename"),
    ("PyCodeObject", "co_linetable"),
    ("PyCodeObject", "co_code_adaptive"),
    // 3.11's GIL, `_PyRuntime.ceval.gil` (3.12's is reached through the interpreter, as above).
    ("pyruntimestate", "ceval"),
    ("_ceval_runtime_state", "gil"),
];

/// The offsets of [`MEMBERS`] (those a version lacks are 0) and the code counts.
struct Offsets {
    members: [u64; MEMBERS.len()],
    counts: [u64; 4],
}

fn assemble(version: (u32, u32), source: Source, at: Anchors, o: &Offsets) -> Layout {
    let m = &o.members;
    let [_, stacksize, firstlineno, nlocalsplus] = o.counts;
    let (tstate, tstate_hops, gil, gil_hops) = if version == (3, 11) {
        ([m[0] + m[1], 0, 0], 1, [m[17] + m[18], 0, 0], 0)
    } else {
        (
            [m[2] + m[3], m[5] + m[4], m[6]],
            3,
            [m[2] + m[3], m[5] + m[4], 0],
            2,
        )
    };
    Layout {
        version,
        source,
        kernel: at.set(PyLayout {
            tstate,
            tstate_hops,
            gil,
            gil_hops,
            frame: [m[7], m[8]],
            frame_hops: 2,
            f_code: m[9],
            previous: m[10],
            instr: m[11],
            localsplus: m[12],
            co_nlocalsplus: nlocalsplus,
            co_stacksize: stacksize,
            long_tagged: u64::from(objects(version).long_tagged),
            ..PyLayout::default()
        }),
        code: CodeLayout {
            qualname: m[13],
            filename: m[14],
            first_line: firstlineno,
            linetable: m[15],
            code_start: m[16],
        },
        objects: objects(version),
    }
}

fn from_dwarf(image: &Image, version: (u32, u32), at: Anchors) -> Result<Layout, dwarf::SiteError> {
    const COUNTS: [(&str, &str); 4] = [
        ("PyCodeObject", "co_argcount"),
        ("PyCodeObject", "co_stacksize"),
        ("PyCodeObject", "co_firstlineno"),
        ("PyCodeObject", "co_nlocalsplus"),
    ];
    dwarf::with_dwarf(&image.path, |_, dpath, d| {
        let dwarf_err = |source| dwarf::SiteError::Dwarf {
            path: dpath.into(),
            source,
        };
        let found = dwarf::member_offsets(d, &MEMBERS).map_err(dwarf_err)?;
        let counts = dwarf::member_offsets(d, &COUNTS).map_err(dwarf_err)?;
        // The members this version reaches the thread state by, and all the others.
        let needed = |i: usize| match i {
            0 | 1 | 17 | 18 => version == (3, 11),
            2..=6 => version != (3, 11),
            _ => true,
        };
        let mut members = [0; MEMBERS.len()];
        for (i, (strukt, member)) in MEMBERS.iter().enumerate() {
            match found[i] {
                Some(v) => members[i] = v,
                None if needed(i) => {
                    return Err(dwarf::SiteError::NoFrameLayout {
                        path: dpath.into(),
                        missing: format!("struct {strukt}'s member {member}"),
                    });
                }
                None => {}
            }
        }
        let mut c = [0; 4];
        for (i, (_, member)) in COUNTS.iter().enumerate() {
            c[i] = counts[i].ok_or_else(|| dwarf::SiteError::NoFrameLayout {
                path: dpath.into(),
                missing: format!("struct PyCodeObject's member {member}"),
            })?;
        }
        Ok(assemble(
            version,
            Source::Dwarf,
            at,
            &Offsets { members, counts: c },
        ))
    })
}

/// The members of [`MEMBERS`] for stripped 3.11 and 3.12 builds, read from the DWARF of
/// CPython 3.11.7 and 3.12.1 (x86-64 release builds; the tests below read them again from those
/// builds).
const TABLES: [((u32, u32), [u64; MEMBERS.len()]); 2] = [
    (
        (3, 11),
        [
            0x238, 0x8, 0x28, 0x8, 0, 0, 0, 0x38, 0x8, 0x20, 0x30, 0x38, 0x48, 0x80, 0x70, 0x88,
            0xb8, 0x160, 0x8,
        ],
    ),
    (
        (3, 12),
        [
            0xa00, 0, 0x28, 0x8, 0x10, 0x170, 0x8, 0x38, 0x0, 0x0, 0x8, 0x38, 0x48, 0x80, 0x70,
            0x88, 0xc0, 0x798, 0,
        ],
    ),
];

fn from_table(image: &Image, version: (u32, u32), at: Anchors) -> Result<Layout, LayoutError> {
    let (_, members) =
        TABLES
            .iter()
            .find(|(v, _)| *v == version)
            .ok_or_else(|| LayoutError::Version {
                path: image.path.display().to_string(),
                version,
            })?;
    // `_PyRuntime` starts out with `interpreters.next_id` -1 (just after `interpreters.main`,
    // which the thread state is reached through) and `gilstate.check_enabled` 1: where the
    // table puts them, the binary's own initial values must be.
    let next_id = members[2] + 0x10;
    let check_enabled = members[0];
    let word = |off: u64, len: u64| {
        image.bytes_at(at.runtime + off, len).map(|b| {
            let mut v = [0u8; 8];
            v[..b.len()].copy_from_slice(b);
            i64::from_le_bytes(v)
        })
    };
    for (what, off, len, want) in [
        ("interpreters.next_id", next_id, 8, -1),
        ("gilstate.check_enabled", check_enabled, 4, 1),
    ] {
        let found = word(off, len);
        if found != Some(want) {
            return Err(LayoutError::Contradicted {
                path: image.path.display().to_string(),
                version,
                what: format!(
                    "_PyRuntime.{what} at +{off:#x} starts as {}, not {want}",
                    found.map_or("nothing racewatch can read".into(), |v| v.to_string())
                ),
            });
        }
    }
    Ok(assemble(
        version,
        Source::Table,
        at,
        &Offsets {
            members: *members,
            counts: code_counts(version),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_from_file_names() {
        assert_eq!(
            version_in_name(Path::new("/usr/lib/libpython3.11.so.1.0")),
            Some((3, 11))
        );
        assert_eq!(
            version_in_name(Path::new("/usr/bin/python3.12")),
            Some((3, 12))
        );
        assert_eq!(version_in_name(Path::new("/usr/bin/python3")), None);
    }

    #[test]
    fn free_threaded_builds_are_named_with_t() {
        assert!(is_free_threaded_name(Path::new("/usr/bin/python3.13t")));
        assert!(is_free_threaded_name(Path::new(
            "/usr/lib/libpython3.14t.so.1.0"
        )));
        assert!(!is_free_threaded_name(Path::new("/usr/bin/python3.13")));
        assert!(!is_free_threaded_name(Path::new(
            "/usr/lib/libpython3.13.so.1.0"
        )));
    }

    /// pyenv's builds, with DWARF: what each table says is what its build's DWARF says, and
    /// each build's static data passes the table's check.
    #[test]
    fn the_tables_are_what_the_builds_they_came_from_describe() {
        for (version, lib) in [
            (
                (3, 11),
                "/root/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0",
            ),
            (
                (3, 12),
                "/root/.pyenv/versions/3.12.1/lib/libpython3.12.so.1.0",
            ),
        ] {
            let image = Image::load(Path::new(lib)).unwrap();
            let symbol = |name| image.symbol(name).unwrap().0;
            let at = Anchors {
                runtime: symbol("_PyRuntime"),
                dict_type: symbol("PyDict_Type"),
                tuple_type: symbol("PyTuple_Type"),
            };
            let dwarf = from_dwarf(&image, version, at).unwrap();
            let table = from_table(&image, version, at).unwrap();
            assert_eq!(
                (dwarf.kernel, dwarf.code, dwarf.objects),
                (table.kernel, table.code, table.objects),
                "{lib}"
            );
        }
    }
}
