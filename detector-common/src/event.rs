//! Events the eBPF programs send through the ring buffer. Every event starts with its
//! [`EventKind`] so userspace can tell the layouts apart before it reads the rest.

/// Length of a thread name as the kernel stores it (`TASK_COMM_LEN`).
pub const COMM_LEN: usize = 16;
/// Bytes of a Python key object copied at a KeyError (header plus the start of its data).
pub const KEY_OBJ_LEN: usize = 128;
/// Bytes of the key's type name (`tp_name`) copied at a KeyError.
pub const TYPE_NAME_LEN: usize = 16;
/// Bytes of user stack copied from the stack pointer up, to be unwound in userspace with the
/// binary's `.eh_frame` (the way `perf --call-graph dwarf` does).
pub const STACK_BYTES: usize = 8192;
/// The stack is copied in chunks, so a stack whose top is nearer than [`STACK_BYTES`] still
/// yields every chunk below it.
pub const STACK_CHUNK: usize = 512;
/// Python frames copied per event, innermost first.
pub const PY_FRAMES_MAX: usize = 32;

#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// `clear` entered on a cache with no open window: [`WindowEvent`].
    WindowOpen = 1,
    /// The refill that follows returned: [`WindowEvent`].
    WindowClose = 2,
    /// A lookup by another thread overlapped an open window: [`LookupEvent`].
    Lookup = 3,
    /// A Python `d[k]` raised KeyError on a dict whose window was open: [`KeyErrorEvent`].
    KeyError = 4,
    /// Whether the key of earlier KeyErrors is in the dict once refilled: [`KeyVerdict`].
    KeyVerdict = 5,
    /// The user stack of the thread whose event follows: [`NativeStack`].
    NativeStack = 6,
    /// The Python frames of the thread whose event follows: [`PyFrames`].
    PyFrames = 7,
    /// A reader's first lookup on a cache since a window opened there: [`NearEvent`].
    Near = 8,
    /// A watched process forked a new process, now watched too: [`ProcessEvent`].
    Fork = 9,
    /// A watched process ended: [`ProcessEvent`].
    Exit = 10,
}

impl EventKind {
    pub const ALL: [EventKind; 10] = [
        Self::WindowOpen,
        Self::WindowClose,
        Self::Lookup,
        Self::KeyError,
        Self::KeyVerdict,
        Self::NativeStack,
        Self::PyFrames,
        Self::Near,
        Self::Fork,
        Self::Exit,
    ];

    pub fn from_u32(v: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|k| *k as u32 == v)
    }
}

/// A watched object in one process, in one of the run's windows: the key of every per-object
/// map. Forked workers share their parent's addresses, so the address alone names no object.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjKey {
    pub object: u64,
    pub tgid: u32,
    pub window: u32,
}

/// A window boundary.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowEvent {
    pub kind: u32,
    pub writer_tid: u32,
    /// The writer's process (host pid namespace).
    pub tgid: u32,
    /// Which of the run's windows ([`crate::ProbeConfig::window`]).
    pub window: u32,
    pub cache: u64,
    pub open_ns: u64,
    /// 0 on [`EventKind::WindowOpen`].
    pub close_ns: u64,
    /// On [`EventKind::WindowClose`] of a CPython window: how many times the GIL went to another
    /// thread while it was open (its `switch_number`'s increase): 0 means no other thread ran
    /// Python code inside it. [`NO_GIL`] for a native window, or on an opening.
    pub gil_switches: u64,
    /// On [`EventKind::WindowClose`] of a window whose cache's lock racewatch sees: the time
    /// from each of the clear's unlocks to the refill's lock that followed, summed over
    /// `reach_pairs` such spans, with racewatch's two traps in each (`Costs::lock_edges_ns`
    /// takes them out). `reach_pairs` 0: not measured, all of the window counts.
    pub reach_ns: u64,
    pub reach_pairs: u32,
    pub _pad: u32,
    pub writer_comm: [u8; COMM_LEN],
}

/// [`WindowEvent::gil_switches`] of a window no GIL serialises (or whose count is not known).
pub const NO_GIL: u64 = u64::MAX;

/// A lookup that overlapped an open window.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LookupEvent {
    pub kind: u32,
    pub reader_tid: u32,
    pub tgid: u32,
    pub window: u32,
    pub cache: u64,
    /// When the lookup was entered.
    pub lookup_ns: u64,
    pub window_open_ns: u64,
    pub writer_tid: u32,
    /// 1 when `ret` holds the lookup's return value (its return is probed).
    pub has_ret: u32,
    pub ret: i64,
    pub reader_comm: [u8; COMM_LEN],
}

/// A reader's first lookup on a cache since a window opened there: at most one per reader and
/// window, so userspace learns how close each reader came to each window without receiving every
/// lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NearEvent {
    pub kind: u32,
    pub reader_tid: u32,
    pub tgid: u32,
    pub window: u32,
    pub cache: u64,
    /// The reader's previous lookup on this cache.
    pub prev_lookup_ns: u64,
    pub lookup_ns: u64,
    /// When the cache's last window closed, if that was after `prev_lookup_ns`; 0 otherwise (or
    /// while a window is open).
    pub close_ns: u64,
}

/// A watched process forked another (now watched as well), or a watched process ended.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessEvent {
    pub kind: u32,
    /// The new process on [`EventKind::Fork`], the ended one on [`EventKind::Exit`].
    pub tgid: u32,
    /// The process it was forked from (0 on exit).
    pub parent: u32,
    pub _pad: u32,
    pub ns: u64,
    /// The process's name (a forked child starts with its parent's).
    pub comm: [u8; COMM_LEN],
}

/// A reader of one cache: the key of the kernel's `READERS` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ReaderKey {
    pub obj: ObjKey,
    pub tid: u32,
    pub _pad: u32,
}

/// What the kernel counts for each reader of a cache, read by userspace at each hazard report.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReaderState {
    /// Lookups probed (all of them for `watch`; those inside sampling bursts for `python`).
    pub lookups: u64,
    pub last_ns: u64,
    /// The thread's name at its first lookup.
    pub comm: [u8; COMM_LEN],
}

/// [`KeyErrorEvent::form`]: how a Python lookup missed. `d[k]` raised KeyError;
pub const FORM_SUBSCRIPT: u32 = 0;
/// `d.get(k)` returned its default;
pub const FORM_GET: u32 = 1;
/// `k in d` was false.
pub const FORM_CONTAINS: u32 = 2;
/// `lst[i]` raised IndexError (the event's `hash` is the index);
pub const FORM_INDEX: u32 = 3;
/// `d.pop(k, default)` returned its default;
pub const FORM_POP: u32 = 4;
/// `d.setdefault(k, default)` inserted and returned its default.
pub const FORM_SETDEFAULT: u32 = 5;
/// The forms' names in the summary's `misses_by_form`, by number.
pub const FORM_NAMES: [&str; 6] = ["subscript", "get", "contains", "index", "pop", "setdefault"];

/// A Python lookup that missed on a dict whose window was open: a KeyError, or a quiet miss
/// (`form`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyErrorEvent {
    pub kind: u32,
    pub reader_tid: u32,
    pub tgid: u32,
    pub window: u32,
    pub dict: u64,
    pub raised_ns: u64,
    pub window_open_ns: u64,
    pub writer_tid: u32,
    /// How it missed: one of the `FORM_` numbers ([`FORM_NAMES`]).
    pub form: u32,
    /// The key's address, so userspace can tell a copy that failed from an empty one.
    pub key: u64,
    /// The key's hash ([`crate::key_hash`]), as its verdict will name it.
    pub hash: i64,
    pub reader_comm: [u8; COMM_LEN],
    pub key_type: [u8; TYPE_NAME_LEN],
    pub key_obj: [u8; KEY_OBJ_LEN],
}

/// [`KeyVerdict::present`]: the key is not in the refilled dict, so the KeyError was not the
/// window's doing.
pub const KEY_ABSENT: u32 = 0;
pub const KEY_PRESENT: u32 = 1;
/// The key could not be hashed or looked up: its KeyErrors count as window misses.
pub const KEY_UNKNOWN: u32 = 2;

/// The verdict on the KeyErrors that `key` raised on `dict` during a window, sent when the
/// refill closing that window returns, or at once ([`KEY_UNKNOWN`]) when the kernel cannot
/// judge the key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyVerdict {
    pub kind: u32,
    pub present: u32,
    pub tgid: u32,
    pub window: u32,
    pub dict: u64,
    pub key: u64,
    /// The key's hash ([`crate::key_hash`]), which tells apart keys that had one address.
    pub hash: i64,
}

/// [`NativeStack::flags`]: the registers are those at a function's return, so `rip` is a return
/// address in the caller and the probed function's own frame is gone.
pub const STACK_AT_RETURN: u32 = 1;

/// The registers and the top of the user stack of a thread, sent just before the event it belongs
/// to (a window's opening, a flagged lookup): `tid` and `ns` name that event (its thread and its
/// `open_ns` or `lookup_ns`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NativeStack {
    pub kind: u32,
    pub tid: u32,
    /// The thread's process, whose mappings the stack is unwound with.
    pub tgid: u32,
    pub _pad: u32,
    pub ns: u64,
    pub rip: u64,
    pub rsp: u64,
    pub rbp: u64,
    /// Bytes of `stack` copied from `rsp` up (a multiple of [`STACK_CHUNK`]).
    pub len: u32,
    pub flags: u32,
    pub stack: [u8; STACK_BYTES],
}

/// One CPython frame: its code object and the instruction it is executing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyFrame {
    pub code: u64,
    pub prev_instr: u64,
}

/// The Python frames of a thread, innermost first, sent just before the event it belongs to
/// (`tid` and `ns` as in [`NativeStack`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PyFrames {
    pub kind: u32,
    pub tid: u32,
    /// The thread's process, whose memory holds the code objects.
    pub tgid: u32,
    /// The window of the probe that sent them: its interpreter's layout reads the code objects.
    pub window: u32,
    pub ns: u64,
    /// Frames filled in `frames`.
    pub depth: u32,
    /// 1 when the thread had more frames than [`PY_FRAMES_MAX`].
    pub truncated: u32,
    pub frames: [PyFrame; PY_FRAMES_MAX],
}

/// Hops from `_PyRuntime` to the current thread state, at most.
pub const TSTATE_HOPS: usize = 3;
/// `switch_number`'s offset in CPython's `struct _gil_runtime_state`, after `interval`,
/// `last_holder` and `locked` (and 3.13+'s `enabled`) in every version with a GIL, 3.11 to 3.14.
pub const GIL_SWITCH_NUMBER: u64 = 24;
/// Value stack slots the kernel searches for the failed dict, at most.
pub const STACK_SLOTS: usize = 64;

/// Where a CPython interpreter keeps what the kernel reads (the current thread state, its
/// frames, a frame's value stack), from the binary's `_Py_DebugOffsets` (3.13+), its DWARF or a
/// per-version table checked against the binary; stored for each window's interpreter in the
/// `PY_LAYOUTS` map before its probes are attached.
/// Offsets are in bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyLayout {
    /// `_PyRuntime`'s, `PyDict_Type`'s and `PyTuple_Type`'s addresses in the file (each probe
    /// adds where the file is loaded).
    pub runtime: u64,
    pub dict_type: u64,
    pub tuple_type: u64,
    /// The thread holding the GIL (the one in dict code): a pointer read at `_PyRuntime +
    /// tstate[0]`, then at that pointer plus `tstate[i]` for each of `tstate_hops` reads.
    pub tstate: [u64; TSTATE_HOPS],
    pub tstate_hops: u64,
    /// The main interpreter's GIL (`struct _gil_runtime_state`), whose `switch_number` at
    /// [`GIL_SWITCH_NUMBER`] says whether another thread took it during a window: at
    /// `_PyRuntime + gil[0]` (3.11's static `ceval.gil`), or through `gil_hops` pointer reads,
    /// each followed by adding the next offset (3.12+: the main interpreter, its `ceval.gil`).
    /// `gil[0]` 0: not known.
    pub gil: [u64; 3],
    pub gil_hops: u64,
    /// From the thread state to its innermost frame the same way: one read, or two through
    /// 3.11's and 3.12's `cframe`.
    pub frame: [u64; 2],
    pub frame_hops: u64,
    /// `_PyInterpreterFrame`'s code object (`f_code`, `f_executable`), previous frame, current
    /// instruction (`prev_instr`, `instr_ptr`) and `localsplus`.
    pub f_code: u64,
    pub previous: u64,
    pub instr: u64,
    pub localsplus: u64,
    /// `PyCodeObject.co_nlocalsplus` and `.co_stacksize` (`int`s).
    pub co_nlocalsplus: u64,
    pub co_stacksize: u64,
    /// Low bits of a frame's code reference and of value stack slots that are tags (3.14's
    /// stack references), cleared before use.
    pub tag_bits: u64,
    /// 1 when an int keeps its digit count in `lv_tag` (3.12+), 0 in `ob_size`.
    pub long_tagged: u64,
    /// Where a compact ASCII str's characters start, and any other compact str's.
    pub ascii_data: u64,
    pub compact_data: u64,
    /// A tuple's first item (3.14 caches the tuple's hash before it).
    pub tuple_items: u64,
    /// `_Py_HashSecret`'s address in the file, for hashing a str CPython has not hashed yet
    /// (0: the build's str hash is not SipHash-1-3, or it exports no secret).
    pub hash_secret: u64,
}

/// A key that raised KeyError in a dict's open window, to be judged when the window closes (the
/// kernel's `PENDING` set).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingKey {
    pub dict: ObjKey,
    /// The key object's address: a freed key's address can be reused by another key, hence the
    /// hash too.
    pub key: u64,
    pub hash: i64,
}

/// Indexes of the per-CPU `STATS` array: events the kernel could not deliver, state that did not
/// fit in its map, and probe hits.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    LostWindowOpen = 0,
    LostWindowClose = 1,
    LostLookup = 2,
    LostKeyError = 3,
    /// Window or in-flight state that did not fit in its map.
    MapFull = 4,
    HitsClear = 5,
    HitsRefillEntry = 6,
    HitsRefillReturn = 7,
    HitsLookupEntry = 8,
    HitsLookupReturn = 9,
    HitsKeyError = 10,
    /// KeyErrors whose key did not fit in the `PENDING` map (judged unknown).
    PendingFull = 11,
    LostKeyVerdict = 12,
    /// The lookup's miss path (`--miss-ret`, when its code tells where the miss is returned).
    HitsLookupMiss = 13,
    LostNear = 14,
    /// The lookup's entry while a sampling burst has it attached.
    HitsLookupSample = 15,
    /// Lookups the kernel found overlapping a window, each then sent or counted in
    /// `LostLookup`: the ground truth that delivered plus lost lookups must add up to.
    WindowLookups = 16,
    LostNativeStack = 17,
    LostPyFrames = 18,
    LostProcess = 19,
    /// Processes forked by watched ones, now watched too.
    Forks = 20,
    /// Forked processes that could not be watched (`WATCHED` full).
    ForksUnwatched = 21,
    /// KeyErrors in a window whose key the kernel could not look up in the refilled dict: counted
    /// as window misses, so that none is hidden.
    UnjudgedKeys = 22,
    /// KeyErrors whose dict the kernel could not find while a window of their process was open:
    /// each may be a window's miss, so a run that has any cannot report clean.
    UnplacedKeyErrors = 23,
    /// Writers' stacks a reader could not copy: the writer had left its window meanwhile.
    WriterStacksUnread = 24,
    /// Native stacks not copied because the ring was over half full: events before stacks, so
    /// that a burst costs alerts their frames, never their counts.
    StacksShed = 25,
    /// `d.get(k)` and `k in d` probed (`--quiet-misses`).
    HitsQuietLookup = 26,
    /// `d.get(k)` or `k in d` in a window whose key the kernel could not hash or look up: each
    /// may have missed, so a run that has any cannot report clean.
    UnjudgedQuiet = 27,
    /// The clear's unlock and the refill's lock (`on_clear_unlock`, `on_refill_locked`).
    HitsLockEdge = 28,
}

impl Stat {
    pub const COUNT: u32 = 29;
    /// Every kind of event the kernel could not deliver.
    pub const LOST: [Stat; 9] = [
        Stat::LostWindowOpen,
        Stat::LostWindowClose,
        Stat::LostLookup,
        Stat::LostKeyError,
        Stat::LostKeyVerdict,
        Stat::LostNear,
        Stat::LostNativeStack,
        Stat::LostPyFrames,
        Stat::LostProcess,
    ];

    pub fn lost(kind: EventKind) -> Stat {
        match kind {
            EventKind::WindowOpen => Stat::LostWindowOpen,
            EventKind::WindowClose => Stat::LostWindowClose,
            EventKind::Lookup => Stat::LostLookup,
            EventKind::KeyError => Stat::LostKeyError,
            EventKind::KeyVerdict => Stat::LostKeyVerdict,
            EventKind::Near => Stat::LostNear,
            EventKind::NativeStack => Stat::LostNativeStack,
            EventKind::PyFrames => Stat::LostPyFrames,
            EventKind::Fork | EventKind::Exit => Stat::LostProcess,
        }
    }
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    use crate::Window;

    // SAFETY: all are #[repr(C)] with only integer fields and no padding (checked in the tests).
    unsafe impl aya::Pod for Window {}
    unsafe impl aya::Pod for WindowEvent {}
    unsafe impl aya::Pod for LookupEvent {}
    unsafe impl aya::Pod for KeyErrorEvent {}
    unsafe impl aya::Pod for KeyVerdict {}
    unsafe impl aya::Pod for PendingKey {}
    unsafe impl aya::Pod for Inflight {}
    unsafe impl aya::Pod for NearEvent {}
    unsafe impl aya::Pod for crate::ProvokeState {}
    unsafe impl aya::Pod for crate::GilHold {}
    unsafe impl aya::Pod for ReaderKey {}
    unsafe impl aya::Pod for ReaderState {}
    unsafe impl aya::Pod for NativeStack {}
    unsafe impl aya::Pod for PyFrames {}
    unsafe impl aya::Pod for PyLayout {}
    unsafe impl aya::Pod for ObjKey {}
    unsafe impl aya::Pod for ProcessEvent {}
    unsafe impl aya::Pod for crate::ProbeConfig {}

    /// `obj()`: the object an event is about, keyed by its process and window, as the kernel's
    /// per-object maps key it.
    macro_rules! obj_key {
        ($($event:ty => $object:ident),* $(,)?) => {$(
            impl $event {
                pub fn obj(&self) -> ObjKey {
                    ObjKey {
                        object: self.$object,
                        tgid: self.tgid,
                        window: self.window,
                    }
                }
            }
        )*};
    }

    obj_key!(
        WindowEvent => cache,
        LookupEvent => cache,
        NearEvent => cache,
        KeyErrorEvent => dict,
        KeyVerdict => dict,
    );
}

#[cfg(feature = "user")]
pub use decode::*;

#[cfg(feature = "user")]
mod decode {
    use super::*;
    use alloc::boxed::Box;

    /// An event read from the ring buffer (the large ones boxed).
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub enum Event {
        WindowOpen(WindowEvent),
        WindowClose(WindowEvent),
        Lookup(LookupEvent),
        KeyError(KeyErrorEvent),
        KeyVerdict(KeyVerdict),
        Near(NearEvent),
        Fork(ProcessEvent),
        Exit(ProcessEvent),
        NativeStack(Box<NativeStack>),
        PyFrames(Box<PyFrames>),
    }

    #[derive(Debug, thiserror::Error, PartialEq, Eq)]
    pub enum DecodeError {
        #[error("event of {0} bytes is too short to hold its kind")]
        TooShort(usize),
        #[error("unknown event kind {0}")]
        UnknownKind(u32),
        #[error("{kind:?} event has {got} bytes, expected {want}")]
        WrongSize {
            kind: EventKind,
            got: usize,
            want: usize,
        },
    }

    fn read<T: Copy>(kind: EventKind, bytes: &[u8]) -> Result<T, DecodeError> {
        let want = core::mem::size_of::<T>();
        if bytes.len() != want {
            return Err(DecodeError::WrongSize {
                kind,
                got: bytes.len(),
                want,
            });
        }
        // SAFETY: the length matches and T is a padding-free #[repr(C)] struct of integers, so
        // every bit pattern is a valid T; read_unaligned copes with the buffer's alignment.
        Ok(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
    }

    /// [`read`] for events too large to copy around by value.
    fn read_boxed<T: Copy + aya::Pod>(
        kind: EventKind,
        bytes: &[u8],
    ) -> Result<Box<T>, DecodeError> {
        let want = core::mem::size_of::<T>();
        if bytes.len() != want {
            return Err(DecodeError::WrongSize {
                kind,
                got: bytes.len(),
                want,
            });
        }
        // SAFETY: as in `read`; the box is allocated for a T and filled before it is assumed init.
        unsafe {
            let mut b = Box::<T>::new_uninit();
            core::ptr::copy_nonoverlapping(bytes.as_ptr(), b.as_mut_ptr().cast::<u8>(), want);
            Ok(b.assume_init())
        }
    }

    impl Event {
        /// The process the event happened in.
        pub fn tgid(&self) -> u32 {
            match self {
                Event::WindowOpen(w) | Event::WindowClose(w) => w.tgid,
                Event::Lookup(l) => l.tgid,
                Event::KeyError(k) => k.tgid,
                Event::KeyVerdict(v) => v.tgid,
                Event::Near(n) => n.tgid,
                Event::Fork(p) | Event::Exit(p) => p.tgid,
                Event::NativeStack(s) => s.tgid,
                Event::PyFrames(f) => f.tgid,
            }
        }

        pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
            let head: [u8; 4] = bytes
                .get(..4)
                .and_then(|h| h.try_into().ok())
                .ok_or(DecodeError::TooShort(bytes.len()))?;
            let raw = u32::from_ne_bytes(head);
            let kind = EventKind::from_u32(raw).ok_or(DecodeError::UnknownKind(raw))?;
            Ok(match kind {
                EventKind::WindowOpen => Event::WindowOpen(read(kind, bytes)?),
                EventKind::WindowClose => Event::WindowClose(read(kind, bytes)?),
                EventKind::Lookup => Event::Lookup(read(kind, bytes)?),
                EventKind::KeyError => Event::KeyError(read(kind, bytes)?),
                EventKind::KeyVerdict => Event::KeyVerdict(read(kind, bytes)?),
                EventKind::Near => Event::Near(read(kind, bytes)?),
                EventKind::Fork => Event::Fork(read(kind, bytes)?),
                EventKind::Exit => Event::Exit(read(kind, bytes)?),
                EventKind::NativeStack => Event::NativeStack(read_boxed(kind, bytes)?),
                EventKind::PyFrames => Event::PyFrames(read_boxed(kind, bytes)?),
            })
        }
    }

    /// The bytes of a plain-old-data value, as the kernel would write them.
    pub fn as_bytes<T: aya::Pod>(v: &T) -> &[u8] {
        // SAFETY: Pod types have no padding and no invalid bit patterns.
        unsafe {
            core::slice::from_raw_parts((v as *const T).cast::<u8>(), core::mem::size_of::<T>())
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use core::mem::size_of;

        #[test]
        fn layouts_have_no_padding() {
            assert_eq!(
                size_of::<WindowEvent>(),
                4 * 4 + 8 + 8 + 8 + 8 + 8 + 4 + 4 + COMM_LEN
            );
            assert_eq!(
                size_of::<LookupEvent>(),
                4 * 4 + 8 + 8 + 8 + 4 + 4 + 8 + COMM_LEN
            );
            assert_eq!(
                size_of::<KeyErrorEvent>(),
                4 * 4 + 8 + 8 + 8 + 4 + 4 + 8 + 8 + COMM_LEN + TYPE_NAME_LEN + KEY_OBJ_LEN
            );
            assert_eq!(size_of::<KeyVerdict>(), 4 * 4 + 8 + 8 + 8);
            assert_eq!(size_of::<PendingKey>(), 16 + 8 + 8);
            assert_eq!(size_of::<NearEvent>(), 4 * 4 + 8 + 8 + 8 + 8);
            assert_eq!(size_of::<ReaderKey>(), 16 + 4 + 4);
            assert_eq!(size_of::<ObjKey>(), 8 + 4 + 4);
            assert_eq!(size_of::<ProcessEvent>(), 4 * 4 + 8 + COMM_LEN);
            assert_eq!(
                size_of::<crate::ProbeConfig>(),
                4 + 4 + 8 + 8 + 4 + 4 + 8 + 4 + 4 + 8
            );
            assert_eq!(size_of::<Inflight>(), 16 + 8);
            assert_eq!(size_of::<ReaderState>(), 8 + 8 + COMM_LEN);
            assert_eq!(
                size_of::<crate::Window>(),
                4 + 4 + 8 + 8 + 8 + 8 + 8 + 8 + 4 + 4
            );
            assert_eq!(
                size_of::<NativeStack>(),
                4 * 4 + 8 * 4 + 4 + 4 + STACK_BYTES
            );
            assert_eq!(
                size_of::<PyFrames>(),
                4 * 4 + 8 + 4 + 4 + 16 * PY_FRAMES_MAX
            );
            assert_eq!(size_of::<PyLayout>(), 8 * 26);
        }

        #[test]
        fn round_trip_every_kind() {
            let w = WindowEvent {
                kind: EventKind::WindowClose as u32,
                writer_tid: 7,
                tgid: 6,
                window: 1,
                cache: 0xdead_beef,
                open_ns: 10,
                close_ns: 20,
                gil_switches: 3,
                reach_ns: 900,
                reach_pairs: 2,
                _pad: 0,
                writer_comm: *b"refresher\0\0\0\0\0\0\0",
            };
            assert_eq!(Event::decode(as_bytes(&w)), Ok(Event::WindowClose(w)));
            let l = LookupEvent {
                kind: EventKind::Lookup as u32,
                reader_tid: 8,
                tgid: 6,
                window: 1,
                cache: 1,
                lookup_ns: 15,
                window_open_ns: 10,
                writer_tid: 7,
                has_ret: 1,
                ret: -1,
                reader_comm: [b'r'; COMM_LEN],
            };
            assert_eq!(Event::decode(as_bytes(&l)), Ok(Event::Lookup(l)));
            let k = KeyErrorEvent {
                kind: EventKind::KeyError as u32,
                reader_tid: 9,
                tgid: 6,
                window: 1,
                dict: 2,
                raised_ns: 3,
                window_open_ns: 1,
                writer_tid: 4,
                form: FORM_GET,
                key: 5,
                hash: -7,
                reader_comm: [0; COMM_LEN],
                key_type: *b"str\0\0\0\0\0\0\0\0\0\0\0\0\0",
                key_obj: [7; KEY_OBJ_LEN],
            };
            assert_eq!(Event::decode(as_bytes(&k)), Ok(Event::KeyError(k)));
            let v = KeyVerdict {
                kind: EventKind::KeyVerdict as u32,
                present: KEY_ABSENT,
                tgid: 6,
                window: 1,
                dict: 2,
                key: 5,
                hash: -7,
            };
            assert_eq!(Event::decode(as_bytes(&v)), Ok(Event::KeyVerdict(v)));
            let n = NearEvent {
                kind: EventKind::Near as u32,
                reader_tid: 8,
                tgid: 6,
                window: 1,
                cache: 1,
                prev_lookup_ns: 90,
                lookup_ns: 120,
                close_ns: 110,
            };
            assert_eq!(Event::decode(as_bytes(&n)), Ok(Event::Near(n)));
            let f = ProcessEvent {
                kind: EventKind::Fork as u32,
                tgid: 11,
                parent: 10,
                _pad: 0,
                ns: 5,
                comm: [b'w'; COMM_LEN],
            };
            assert_eq!(Event::decode(as_bytes(&f)), Ok(Event::Fork(f)));
            let x = ProcessEvent {
                kind: EventKind::Exit as u32,
                ..f
            };
            assert_eq!(Event::decode(as_bytes(&x)), Ok(Event::Exit(x)));
            let mut n = NativeStack {
                kind: EventKind::NativeStack as u32,
                tid: 3,
                tgid: 2,
                _pad: 0,
                ns: 4,
                rip: 5,
                rsp: 6,
                rbp: 7,
                len: STACK_CHUNK as u32,
                flags: STACK_AT_RETURN,
                stack: [0; STACK_BYTES],
            };
            n.stack[STACK_BYTES - 1] = 9;
            assert_eq!(
                Event::decode(as_bytes(&n)),
                Ok(Event::NativeStack(Box::new(n)))
            );
            let mut p = PyFrames {
                kind: EventKind::PyFrames as u32,
                tid: 3,
                tgid: 2,
                window: 1,
                ns: 4,
                depth: 1,
                truncated: 0,
                frames: [PyFrame::default(); PY_FRAMES_MAX],
            };
            p.frames[0] = PyFrame {
                code: 10,
                prev_instr: 11,
            };
            assert_eq!(
                Event::decode(as_bytes(&p)),
                Ok(Event::PyFrames(Box::new(p)))
            );
        }

        #[test]
        fn bad_input_is_a_typed_error() {
            assert_eq!(Event::decode(&[1, 0]), Err(DecodeError::TooShort(2)));
            assert_eq!(
                Event::decode(&[99, 0, 0, 0]),
                Err(DecodeError::UnknownKind(99))
            );
            let mut short = [0u8; 8];
            short[0] = EventKind::Lookup as u8;
            assert_eq!(
                Event::decode(&short),
                Err(DecodeError::WrongSize {
                    kind: EventKind::Lookup,
                    got: 8,
                    want: size_of::<LookupEvent>()
                })
            );
        }
    }
}

/// In-flight state kept between a lookup's entry and its return.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Inflight {
    pub obj: ObjKey,
    pub entry_ns: u64,
}
