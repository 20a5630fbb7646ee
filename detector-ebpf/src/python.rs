//! CPython's KeyError: the dict of a failed `d[k]`, its report, and the verdict at the window's
//! close on whether the key was in the refilled dict.

use aya_ebpf::{
    cty::c_void,
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user, bpf_probe_read_user_buf,
        bpf_probe_read_user_str_bytes, generated::bpf_for_each_map_elem,
    },
    macros::uprobe,
    programs::ProbeContext,
};
use detector_common::{
    EventKind, FORM_CONTAINS, FORM_GET, FORM_INDEX, FORM_POP, FORM_SETDEFAULT, FORM_SUBSCRIPT,
    GIL_SWITCH_NUMBER, HASHED_STR_MAX, KEY_ABSENT, KEY_HEADER_LEN, KEY_PRESENT, KEY_UNKNOWN,
    KeyErrorEvent, KeyVerdict, ObjKey, PendingKey, ProbeConfig, STACK_SLOTS, Stat, UNKNOWN_HASH,
    Window, key_hash, small_int, str_hash,
};

use crate::{
    maps::{EVENTS, PENDING, PENDING_DICTS, STR_DATA, SUBSCRIPT_MISSES, VALUE_STACK, WINDOWS},
    stacks::{Interp, py_current_frame, stack},
    util::{bump, caller, comm, config, read_user, send, wakeup_flags, window},
};

/// `tp_flags` in a type object (the same in CPython 3.11 to 3.14), and its bits that mark `dict`
/// and `list` and their subclasses (`Py_TPFLAGS_DICT_SUBCLASS`, `Py_TPFLAGS_LIST_SUBCLASS`).
const TP_FLAGS: u64 = 168;
/// `tp_base`, the type's base class.
const TP_BASE: u64 = 256;
const DICT_SUBCLASS: u64 = 1 << 29;
const LIST_SUBCLASS: u64 = 1 << 25;
/// A list's or a tuple's length (`ob_size`).
const OB_SIZE: u64 = 16;

/// Whether `obj` is a list or an instance of a subclass of list.
fn is_list(obj: u64) -> bool {
    read_user::<u64>(obj.wrapping_add(8))
        .and_then(|ty| read_user::<u64>(ty.wrapping_add(TP_FLAGS)))
        .is_some_and(|f| f & LIST_SUBCLASS != 0)
}

/// Whether index `i` (negative from the end) is in a list of `len` items.
fn in_range(i: i64, len: i64) -> bool {
    if i >= 0 { i < len } else { i >= -len }
}

/// A list index kept where a key's hash is ([`FORM_INDEX`]): negative ones one lower, so that
/// none is -1, which means "no hash".
fn index_as_hash(i: i64) -> i64 {
    if i < 0 { i - 1 } else { i }
}

fn hash_as_index(h: i64) -> i64 {
    if h < 0 { h + 1 } else { h }
}

/// Whether `obj` is a dict or an instance of a subclass of dict (a class deriving from `dict`,
/// `OrderedDict`): their `d[k]` is `dict_subscript`'s, which raises the KeyError.
fn is_dict(obj: u64, dict_type: u64) -> bool {
    let Some(ty) = read_user::<u64>(obj.wrapping_add(8)) else {
        return false;
    };
    ty == dict_type
        || read_user::<u64>(ty.wrapping_add(TP_FLAGS)).is_some_and(|f| f & DICT_SUBCLASS != 0)
}

/// The dict of a failed `d[k]`, from the value stack of the thread's innermost Python frame:
/// `d[k]` (specialised or not, and `del d[k]`, `d.pop(k)`) leaves the dict in the slot below the
/// key while it looks up. Slots above the stack's top may hold stale pairs, so every slot holding
/// the key is looked at, and the dict is taken only when every dict found below one is the same.
fn dict_on_value_stack(py: Interp, key: u64) -> Option<u64> {
    let l = py.layout;
    let frame = py_current_frame(py)?;
    let code = read_user::<u64>(frame.wrapping_add(l.f_code))? & !l.tag_bits;
    let locals = read_user::<i32>(code.wrapping_add(l.co_nlocalsplus))?;
    let depth = read_user::<i32>(code.wrapping_add(l.co_stacksize))?;
    // A deeper stack than the room searched could hide a pair above it: no answer then.
    if locals < 0 || !(2..STACK_SLOTS as i32).contains(&depth) {
        return None;
    }
    let base = frame
        .wrapping_add(l.localsplus)
        .wrapping_add(8 * locals as u64);
    let n = depth as usize;
    let slots = VALUE_STACK.get_ptr_mut(0)?;
    // Masked after a volatile read, so that LLVM keeps the mask the verifier needs to see the
    // length within the value (n < STACK_SLOTS already).
    let len = unsafe { core::ptr::read_volatile(&(n * 8)) } & (8 * STACK_SLOTS - 8);
    // SAFETY: the per-CPU value holds STACK_SLOTS u64s and len < 8 * STACK_SLOTS.
    let bytes = unsafe { core::slice::from_raw_parts_mut(slots as *mut u8, len) };
    unsafe { bpf_probe_read_user_buf(base as *const u8, bytes) }.ok()?;
    let dict_type = py.bias.wrapping_add(l.dict_type);
    let mut found = 0u64;
    for i in 1..STACK_SLOTS {
        if i >= n {
            break;
        }
        // SAFETY: i < STACK_SLOTS, within the per-CPU value.
        let (below, slot) = unsafe { ((*slots)[i - 1], (*slots)[i]) };
        if slot & !l.tag_bits != key {
            continue;
        }
        let below = below & !l.tag_bits;
        if !is_dict(below, dict_type) {
            continue;
        }
        if found != 0 && found != below {
            return None;
        }
        found = below;
    }
    (found != 0).then_some(found)
}

/// The callback's context for [`window_open_in`].
struct OpenIn {
    tgid: u32,
    tid: u32,
    open: u8,
}

extern "C" fn window_open_cb(
    _map: *mut c_void,
    obj: *const ObjKey,
    w: *const Window,
    ctx: *mut OpenIn,
) -> i64 {
    // SAFETY: the helper passes a live key and value, and `ctx` from window_open_in's stack.
    let (obj, w, ctx) = unsafe { (&*obj, &*w, &mut *ctx) };
    if obj.tgid == ctx.tgid && w.overlaps(ctx.tid, None) {
        ctx.open = 1;
        return 1;
    }
    0
}

/// Whether another thread of `tgid` has a window open now.
fn window_open_in(tgid: u32, tid: u32) -> bool {
    let mut ctx = OpenIn { tgid, tid, open: 0 };
    // SAFETY: as in judge_pending.
    unsafe {
        bpf_for_each_map_elem(
            &WINDOWS as *const _ as *mut c_void,
            window_open_cb as *mut c_void,
            &mut ctx as *mut OpenIn as *mut c_void,
            0,
        );
    }
    ctx.open != 0
}

/// Keeps `key` to be judged at the window's close; false when it cannot be.
fn add_pending(dict: ObjKey, key: u64, hash: i64) -> bool {
    if hash == UNKNOWN_HASH {
        return false;
    }
    if PENDING
        .insert(&PendingKey { dict, key, hash }, &0, 0)
        .is_err()
    {
        bump(Stat::PendingFull);
        return false;
    }
    let _ = PENDING_DICTS.insert(&dict, &0, 0);
    true
}

fn verdict(dict: &ObjKey, key: u64, hash: i64, present: u32) {
    if present == KEY_UNKNOWN {
        bump(Stat::UnjudgedKeys);
    }
    send(
        EventKind::KeyVerdict,
        KeyVerdict {
            kind: EventKind::KeyVerdict as u32,
            present,
            tgid: dict.tgid,
            window: dict.window,
            dict: dict.object,
            key,
            hash,
        },
    );
}

/// Probes per key before giving up. A refilled dict is at most 2/3 full, so most keys take 1-3,
/// but an absent key takes more than k with odds near (2/3)^k: at 16, one absent key in a few
/// thousand went unjudged (and so counted as a miss); at 64, none does.
const MAX_PROBES: usize = 64;

/// A `PyDictKeysObject` (the same in CPython 3.11 to 3.14's GIL builds), enough of it to look a
/// hash up.
struct DictKeys {
    /// The `PyDictKeysObject`: its index table at +32, the entries after it.
    keys: u64,
    log2_size: u8,
    log2_index_bytes: u8,
    /// `dk_kind` 0: entries carry their hash; 1 and 2 (str keys): the key object caches it.
    general: bool,
}

impl DictKeys {
    /// For a dict whose keys cannot be read: every read fails, so every key is judged unknown.
    const UNREADABLE: DictKeys = DictKeys {
        keys: 0,
        log2_size: 0,
        log2_index_bytes: 0,
        general: true,
    };

    /// `ma_keys` at +32 of the dict; `dk_log2_size`, `dk_log2_index_bytes`, `dk_kind` at +8.
    fn of(dict: u64) -> Option<DictKeys> {
        let keys = read_user::<u64>(dict + 32)?;
        let [log2_size, log2_index_bytes, kind] = read_user::<[u8; 3]>(keys + 8)?;
        // Tables of 2^32 slots and more (8-byte indices) are not judged.
        if log2_size >= 32 || log2_index_bytes >= 64 {
            return None;
        }
        Some(DictKeys {
            keys,
            log2_size,
            log2_index_bytes,
            general: kind == 0,
        })
    }

    /// Slot `i` of the index table: an entry number, -1 empty, -2 deleted.
    fn index(&self, i: u64) -> Option<i64> {
        let indices = self.keys + 32;
        match self.log2_size {
            0..8 => read_user::<i8>(indices + i).map(i64::from),
            8..16 => read_user::<i16>(indices + 2 * i).map(i64::from),
            _ => read_user::<i32>(indices + 4 * i).map(i64::from),
        }
    }

    fn entry_hash(&self, ix: u64) -> Option<i64> {
        let entries = self.keys + 32 + (1u64 << self.log2_index_bytes);
        if self.general {
            read_user(entries + 24 * ix)
        } else {
            read_user(read_user::<u64>(entries + 16 * ix)? + 24)
        }
    }

    /// CPython's open-addressing probe sequence; an entry with an equal hash counts as the key.
    fn lookup(&self, hash: i64) -> u32 {
        let mask = (1u64 << self.log2_size) - 1;
        let mut i = hash as u64 & mask;
        let mut perturb = hash as u64;
        for _ in 0..MAX_PROBES {
            match self.index(i) {
                None => return KEY_UNKNOWN,
                Some(-1) => return KEY_ABSENT,
                Some(ix) if ix >= 0 => match self.entry_hash(ix as u64) {
                    Some(h) if h == hash => return KEY_PRESENT,
                    None => return KEY_UNKNOWN,
                    _ => {}
                },
                _ => {}
            }
            perturb >>= 5;
            i = i.wrapping_mul(5).wrapping_add(perturb).wrapping_add(1) & mask;
        }
        KEY_UNKNOWN
    }
}

/// Rounds of a set's probe sequence before giving up: each looks at up to
/// [`SET_LINEAR_PROBES`] + 1 neighbouring entries, and a set is at most 3/5 full, so an absent
/// key stops at an empty one within the first round but for odds near (3/5)^10, and within 8
/// rounds but for odds below one in 10^14.
const SET_ROUNDS: usize = 3;
/// CPython's `LINEAR_PROBES` (the same in 3.11 to 3.14).
const SET_LINEAR_PROBES: u64 = 9;

/// A `PySetObject`'s table (the same in CPython 3.11 to 3.14's GIL builds): `mask` at +32, the
/// entries `{key, hash}` at `table`, +40.
#[derive(Clone, Copy)]
struct SetTable {
    mask: u64,
    table: u64,
}

impl SetTable {
    /// For a set whose table cannot be read: every read fails, so every key is judged unknown.
    const UNREADABLE: SetTable = SetTable { mask: 0, table: 1 };
    /// Not a set.
    const NONE: SetTable = SetTable { mask: 0, table: 0 };

    fn of(set: u64) -> Option<SetTable> {
        let [mask, table] = read_user::<[u64; 2]>(set.wrapping_add(32))?;
        Some(SetTable { mask, table })
    }

    /// CPython's `set_lookkey`: runs of neighbouring entries, then a jump as dicts make; an entry
    /// with an equal hash counts as the key, an empty one (`hash` 0, `key` NULL) ends the search.
    fn lookup(&self, hash: i64) -> u32 {
        let mut i = hash as u64 & self.mask;
        let mut perturb = hash as u64;
        for _ in 0..SET_ROUNDS {
            let run = if i + SET_LINEAR_PROBES <= self.mask {
                SET_LINEAR_PROBES
            } else {
                0
            };
            for j in 0..=SET_LINEAR_PROBES {
                if j > run {
                    break;
                }
                let at = self.table.wrapping_add(16 * (i + j));
                match read_user::<[i64; 2]>(at) {
                    None => return KEY_UNKNOWN,
                    Some([0, 0]) => return KEY_ABSENT,
                    Some([_, h]) if h == hash => return KEY_PRESENT,
                    _ => {}
                }
            }
            perturb >>= 5;
            i = i.wrapping_mul(5).wrapping_add(1).wrapping_add(perturb) & self.mask;
        }
        KEY_UNKNOWN
    }
}

/// Whether `obj` is a set, or an instance of a class deriving from `set` directly: its type's
/// name, or its base's, is `set` (no `tp_flags` bit marks sets).
fn is_set(obj: u64) -> bool {
    let named_set = |ty: u64| {
        let mut name = [0u8; 4];
        read_user::<u64>(ty.wrapping_add(24)).is_some_and(|at| {
            // SAFETY: reads at most 4 bytes into `name`.
            unsafe { bpf_probe_read_user_str_bytes(at as *const u8, &mut name) }.is_ok()
                && &name == b"set\0"
        })
    };
    read_user::<u64>(obj.wrapping_add(8)).is_some_and(|ty| {
        named_set(ty) || read_user::<u64>(ty.wrapping_add(TP_BASE)).is_some_and(named_set)
    })
}

/// Whether `hash` is in `object`'s table, a set's or a dict's.
fn present_in(object: u64, hash: i64, set: bool) -> u32 {
    if set {
        SetTable::of(object).map_or(KEY_UNKNOWN, |t| t.lookup(hash))
    } else {
        DictKeys::of(object).map_or(KEY_UNKNOWN, |k| k.lookup(hash))
    }
}

/// The callback's context. No `Option` in it: the verifier refuses the uninitialised payload
/// LLVM stores for `None`.
struct Judge {
    dict: ObjKey,
    keys: DictKeys,
    /// A list's length now (its misses are indexes, kept as their hash), or -1 for a dict or a
    /// set.
    list_len: i64,
    /// A set's table, or [`SetTable::NONE`] for a dict or a list.
    set: SetTable,
}

/// `bpf_for_each_map_elem` callback over `PENDING`: judges and drops the keys of one dict.
extern "C" fn judge_key(
    _map: *mut c_void,
    pending: *const PendingKey,
    _value: *const u8,
    judge: *const Judge,
) -> i64 {
    // SAFETY: the helper passes a live key, and `judge` from judge_pending's stack.
    let (p, judge) = unsafe { (*pending, &*judge) };
    if p.dict == judge.dict {
        let present = if judge.list_len >= 0 {
            if in_range(hash_as_index(p.hash), judge.list_len) {
                KEY_PRESENT
            } else {
                KEY_ABSENT
            }
        } else if judge.set.table != 0 {
            judge.set.lookup(p.hash)
        } else {
            judge.keys.lookup(p.hash)
        };
        verdict(&p.dict, p.key, p.hash, present);
        let _ = PENDING.remove(&p);
    }
    0
}

/// Whether the dict, list or set at `obj` is empty: a dict's `ma_used` and a list's `ob_size` at
/// +16, a set's `used` at +24. An object that cannot be read is not taken for empty.
pub(crate) fn holds_nothing(obj: u64) -> bool {
    let at = if is_set(obj) { SET_USED } else { OB_SIZE };
    read_user::<i64>(obj.wrapping_add(at)) == Some(0)
}

/// Where the main interpreter's GIL keeps its `switch_number` in the process `py` runs in
/// (`PyLayout::gil`), None when the layout does not say or a pointer on the way cannot be read.
pub(crate) fn gil_switch_at(py: Interp) -> Option<u64> {
    let l = py.layout;
    if l.gil[0] == 0 {
        return None;
    }
    let mut at = py.bias.wrapping_add(l.runtime).wrapping_add(l.gil[0]);
    for i in 0..2 {
        if i as u64 >= l.gil_hops {
            break;
        }
        at = read_user::<u64>(at)?.wrapping_add(l.gil[i + 1]);
    }
    Some(at.wrapping_add(GIL_SWITCH_NUMBER))
}

/// A set's count of live entries (`used`).
const SET_USED: u64 = 24;

/// At a window's close, tells userspace whether each key that raised KeyError inside it is in the
/// dict just refilled: a key absent even now was not the window's doing.
pub(crate) fn judge_pending(dict: ObjKey) {
    let list_len = if is_list(dict.object) {
        read_user::<i64>(dict.object.wrapping_add(OB_SIZE)).unwrap_or(-1)
    } else {
        -1
    };
    let set = if list_len < 0 && is_set(dict.object) {
        SetTable::of(dict.object).unwrap_or(SetTable::UNREADABLE)
    } else {
        SetTable::NONE
    };
    let judge = Judge {
        dict,
        keys: DictKeys::of(dict.object).unwrap_or(DictKeys::UNREADABLE),
        list_len,
        set,
    };
    // SAFETY: PENDING is #[repr(transparent)] over its map definition, which is what the helper
    // takes; the callback's signature is the one the helper calls.
    unsafe {
        bpf_for_each_map_elem(
            &PENDING as *const _ as *mut c_void,
            judge_key as *mut c_void,
            &judge as *const Judge as *mut c_void,
            0,
        );
    }
}

/// CPython's `void _PyErr_SetKeyError(PyObject *key)`, called when `d[k]` misses.
#[uprobe]
pub fn on_keyerror(ctx: ProbeContext) -> u32 {
    bump(Stat::HitsKeyError);
    if let Some(cfg) = config(&ctx) {
        keyerror(&ctx, &cfg, ctx.arg(0).unwrap_or(0));
    }
    0
}

/// Where code built with link-time optimisation raises `d[k]`'s KeyError itself (it loads
/// `PyExc_KeyError` for `_PyErr_SetObject`): at that load or the raising call after it, the tuple
/// `(key,)` just packed is in `rax`.
#[uprobe]
pub fn on_keyerror_inline(ctx: ProbeContext) -> u32 {
    bump(Stat::HitsKeyError);
    let Some(cfg) = config(&ctx) else {
        return 0;
    };
    // SAFETY: the context's registers are valid for the whole program.
    let regs = unsafe { &*ctx.regs };
    let Some(py) = Interp::at(regs, &cfg) else {
        return 0;
    };
    let tuple_type = py.bias.wrapping_add(py.layout.tuple_type);
    let tuple = regs.rax;
    // A one-item tuple, else this is not the raise racewatch placed the probe for.
    if read_user::<u64>(tuple.wrapping_add(8)) == Some(tuple_type)
        && read_user::<i64>(tuple.wrapping_add(16)) == Some(1)
        && let Some(key) = read_user::<u64>(tuple.wrapping_add(py.layout.tuple_items))
    {
        keyerror(&ctx, &cfg, key);
    }
    0
}

/// A failed `d[k]` for `key`: finds its dict on the Python frame's value stack and reports it.
fn keyerror(ctx: &ProbeContext, cfg: &ProbeConfig, key: u64) {
    let Some(who) = caller() else {
        return;
    };
    // SAFETY: the context's registers are valid for the whole program.
    let regs = unsafe { &*ctx.regs };
    let Some(py) = Interp::at(regs, cfg) else {
        return;
    };
    let Some(object) = dict_on_value_stack(py, key) else {
        // A KeyError racewatch cannot place, while a window is open: it may be the window's.
        if window_open_in(who.tgid, who.tid) {
            bump(Stat::UnplacedKeyErrors);
        }
        return;
    };
    let dict = ObjKey {
        object,
        tgid: who.tgid,
        window: cfg.window,
    };
    // Counted already at the subclass's `d[k]` entry (`--quiet-misses`).
    // SAFETY: copied out at once.
    if unsafe { SUBSCRIPT_MISSES.get(&who.tid) }.is_some_and(|m| *m == [object, key]) {
        let _ = SUBSCRIPT_MISSES.remove(&who.tid);
        return;
    }
    if let Some(w) = window(&dict).filter(|w| w.overlaps(who.tid, None)) {
        missed(
            regs,
            who.tid,
            cfg,
            py,
            &w,
            dict,
            key,
            UNKNOWN_HASH,
            FORM_SUBSCRIPT,
        );
    }
}

/// `d.get(k)`, `dict_get(self, args, nargs)` (METH_FASTCALL: the key is `args[0]`), at its entry
/// (`--quiet-misses`).
#[uprobe]
pub fn on_dict_get(ctx: ProbeContext) -> u32 {
    let key = fastcall_key(&ctx);
    quiet_lookup(&ctx, key, UNKNOWN_HASH, FORM_GET, false);
    0
}

/// `args[0]` of a METH_FASTCALL method `(self, args, nargs)`: the key of `.get`, `.pop` and
/// `.setdefault`.
fn fastcall_key(ctx: &ProbeContext) -> u64 {
    ctx.arg::<u64>(1)
        .and_then(read_user::<u64>)
        .unwrap_or_default()
}

/// `d.pop(k, default)`, `dict_pop(self, args, nargs)` (METH_FASTCALL), at its entry
/// (`--quiet-misses`): with a default, a miss returns it; without, it raises the KeyError that
/// counts it.
#[uprobe]
pub fn on_dict_pop(ctx: ProbeContext) -> u32 {
    if ctx.arg::<i64>(2).unwrap_or(0) < 2 {
        bump(Stat::HitsQuietLookup);
        return 0;
    }
    let key = fastcall_key(&ctx);
    quiet_lookup(&ctx, key, UNKNOWN_HASH, FORM_POP, false);
    0
}

/// `d.setdefault(k[, default])`, `dict_setdefault(self, args, nargs)` (METH_FASTCALL), at its
/// entry (`--quiet-misses`): a miss inserts the default and returns it.
#[uprobe]
pub fn on_dict_setdefault(ctx: ProbeContext) -> u32 {
    let key = fastcall_key(&ctx);
    quiet_lookup(&ctx, key, UNKNOWN_HASH, FORM_SETDEFAULT, false);
    0
}

/// An OrderedDict's own `od.pop(key, default)`, `OrderedDict_pop(self, args, nargs, kwnames)`
/// (METH_FASTCALL|METH_KEYWORDS), at its entry (`--quiet-misses`): with a default, by position
/// or keyword, a miss returns it; without, it raises the KeyError that counts it.
#[uprobe]
pub fn on_odict_pop(ctx: ProbeContext) -> u32 {
    match keywords_key(&ctx) {
        Some((key, given)) if given >= 2 => {
            quiet_lookup(&ctx, key, UNKNOWN_HASH, FORM_POP, false);
        }
        _ => bump(Stat::HitsQuietLookup),
    }
    0
}

/// An OrderedDict's own `od.setdefault(key, default=None)`, `OrderedDict_setdefault(self, args,
/// nargs, kwnames)` (METH_FASTCALL|METH_KEYWORDS), at its entry (`--quiet-misses`): a miss
/// inserts the default and returns it.
#[uprobe]
pub fn on_odict_setdefault(ctx: ProbeContext) -> u32 {
    match keywords_key(&ctx) {
        Some((key, given)) if given >= 1 => {
            quiet_lookup(&ctx, key, UNKNOWN_HASH, FORM_SETDEFAULT, false);
        }
        _ => bump(Stat::HitsQuietLookup),
    }
    0
}

/// The key of a METH_FASTCALL|METH_KEYWORDS method `(self, args, nargs, kwnames)` whose
/// parameters are `(key, default)`, and how many arguments were given: positional ones first in
/// `args`, then the values of the keywords `kwnames` names. `key` is `args[0]` unless no argument
/// is positional and the first keyword is not `key`.
fn keywords_key(ctx: &ProbeContext) -> Option<(u64, i64)> {
    let args = ctx.arg::<u64>(1)?;
    let nargs = ctx.arg::<i64>(2)?;
    let kwnames = ctx.arg::<u64>(3)?;
    let keywords = match kwnames {
        0 => 0,
        tuple => read_user::<i64>(tuple.wrapping_add(OB_SIZE))?,
    };
    let mut at = 0u64;
    if nargs == 0 && keywords > 0 {
        let cfg = config(ctx)?;
        // SAFETY: the context's registers are valid for the whole program.
        let py = Interp::at(unsafe { &*ctx.regs }, &cfg)?;
        let first = read_user::<u64>(kwnames.wrapping_add(py.layout.tuple_items))?;
        let name = read_user::<[u8; 4]>(first.wrapping_add(py.layout.ascii_data))?;
        if name != *b"key\0" {
            at = 1;
        }
    }
    let key = read_user::<u64>(args.wrapping_add(at * 8))?;
    Some((key, nargs.saturating_add(keywords)))
}

/// `d[k]` on an instance of a dict subclass, `dict_subscript(self, key)` (its `mp_subscript`,
/// which `d[k]` on an exact dict reaches only unspecialised, and then raises its KeyError), at
/// its entry (`--quiet-misses`): a `Counter`'s or a `defaultdict`'s `__missing__` answers the
/// miss without a KeyError.
#[uprobe]
pub fn on_dict_subscript(ctx: ProbeContext) -> u32 {
    let (Some(cfg), Some(dict)) = (config(&ctx), ctx.arg::<u64>(0)) else {
        return 0;
    };
    // SAFETY: the context's registers are valid for the whole program.
    let Some(py) = Interp::at(unsafe { &*ctx.regs }, &cfg) else {
        return 0;
    };
    if read_user::<u64>(dict.wrapping_add(8)) == Some(py.bias.wrapping_add(py.layout.dict_type)) {
        // An exact dict's: its KeyError counts it. The trap is counted all the same.
        bump(Stat::HitsQuietLookup);
        return 0;
    }
    let key = ctx.arg::<u64>(1).unwrap_or_default();
    let tid = bpf_get_current_pid_tgid() as u32;
    if quiet_lookup(&ctx, key, UNKNOWN_HASH, FORM_SUBSCRIPT, false) {
        let _ = SUBSCRIPT_MISSES.insert(&tid, &[dict, key], 0);
    } else {
        let _ = SUBSCRIPT_MISSES.remove(&tid);
    }
    0
}

/// `lst[i]`, the list type's `mp_subscript(self, item)` (which `lst[i]` reaches once the
/// specialised code found `i` out of range, to raise IndexError), at its entry
/// (`--quiet-misses`): an int index out of the list's range while another thread's window is
/// open on it is a miss, judged at the close by the list's length then.
#[uprobe]
pub fn on_list_subscript(ctx: ProbeContext) -> u32 {
    bump(Stat::HitsQuietLookup);
    let (Some(cfg), Some(who), Some(list), Some(item)) =
        (config(&ctx), caller(), ctx.arg::<u64>(0), ctx.arg::<u64>(1))
    else {
        return 0;
    };
    let obj = ObjKey {
        object: list,
        tgid: who.tgid,
        window: cfg.window,
    };
    let Some(w) = window(&obj).filter(|w| w.overlaps(who.tid, None)) else {
        return 0;
    };
    // SAFETY: the context's registers are valid for the whole program.
    let regs = unsafe { &*ctx.regs };
    let Some(py) = Interp::at(regs, &cfg) else {
        return 0;
    };
    // A small int (a slice, or an int past two digits, is no index a list holds).
    let Some(([b'i', b'n', b't', 0], header)) = type_and_header(item) else {
        return 0;
    };
    let Some(index) = small_int(&header, py.layout.long_tagged != 0) else {
        return 0;
    };
    let Some(len) = read_user::<i64>(list.wrapping_add(OB_SIZE)) else {
        return 0;
    };
    if !in_range(index, len) {
        let hash = index_as_hash(index);
        missed(regs, who.tid, &cfg, py, &w, obj, item, hash, FORM_INDEX);
    }
    0
}

/// `k in d`, the dict type's `sq_contains(self, key)`, at its entry (`--quiet-misses`).
#[uprobe]
pub fn on_dict_contains(ctx: ProbeContext) -> u32 {
    let key = ctx.arg::<u64>(1).unwrap_or_default();
    quiet_lookup(&ctx, key, UNKNOWN_HASH, FORM_CONTAINS, false);
    0
}

/// `k in d` inlined into the eval loop, at its call to the dict lookup `(dict, key, hash, ...)`
/// (`--quiet-misses`).
#[uprobe]
pub fn on_dict_contains_call(ctx: ProbeContext) -> u32 {
    lookup_call(&ctx, FORM_CONTAINS, false);
    0
}

/// `d.get(k)` where profile-guided optimisation inlined a copy of `dict_get` behind a check of
/// the function pointer, at the copy's call to the dict lookup `(dict, key, hash, ...)`
/// (`--quiet-misses`).
#[uprobe]
pub fn on_dict_get_call(ctx: ProbeContext) -> u32 {
    lookup_call(&ctx, FORM_GET, false);
    0
}

/// `k in s`, the set type's `sq_contains(self, key)` (or the function it jumps to, which the
/// eval loop's specialised `in` calls too), at its entry (`--quiet-misses`).
#[uprobe]
pub fn on_set_contains(ctx: ProbeContext) -> u32 {
    let key = ctx.arg::<u64>(1).unwrap_or_default();
    quiet_lookup(&ctx, key, UNKNOWN_HASH, FORM_CONTAINS, true);
    0
}

/// `k in s` inlined into the eval loop, at its call to the set lookup `(set, key, hash)`
/// (`--quiet-misses`).
#[uprobe]
pub fn on_set_contains_call(ctx: ProbeContext) -> u32 {
    lookup_call(&ctx, FORM_CONTAINS, true);
    0
}

/// An inlined copy's call to the lookup of a dict (or, with `set`, a set) for a read of `form`:
/// the object, the key and its hash in the first three arguments.
fn lookup_call(ctx: &ProbeContext, form: u32, set: bool) {
    let key = ctx.arg::<u64>(1).unwrap_or_default();
    let hash = ctx.arg::<i64>(2).unwrap_or(UNKNOWN_HASH);
    quiet_lookup(ctx, key, hash, form, set);
}

/// A `.get`, `in` or subclass `d[k]` about to look `key` up in the dict (or, with `set`, the
/// set) of argument 0 (with `hash`, where the caller computed it already): when another thread's
/// window is open on it and the key is not in it, the lookup will miss (the GIL holds the object
/// still until it does), so it is reported as `d[k]`'s KeyError is. Whether it was.
fn quiet_lookup(ctx: &ProbeContext, key: u64, hash: i64, form: u32, set: bool) -> bool {
    bump(Stat::HitsQuietLookup);
    let (Some(cfg), Some(who), Some(object)) = (config(ctx), caller(), ctx.arg::<u64>(0)) else {
        return false;
    };
    let dict = ObjKey {
        object,
        tgid: who.tgid,
        window: cfg.window,
    };
    let Some(w) = window(&dict).filter(|w| w.overlaps(who.tid, None)) else {
        return false;
    };
    // SAFETY: the context's registers are valid for the whole program.
    let regs = unsafe { &*ctx.regs };
    let Some(py) = Interp::at(regs, &cfg) else {
        return false;
    };
    let hash = match hash {
        UNKNOWN_HASH => lookup_hash(key, py),
        known => known,
    };
    let present = match hash {
        UNKNOWN_HASH => KEY_UNKNOWN,
        hash => present_in(object, hash, set),
    };
    match present {
        KEY_ABSENT => {
            missed(regs, who.tid, &cfg, py, &w, dict, key, hash, form);
            return true;
        }
        KEY_UNKNOWN => bump(Stat::UnjudgedQuiet),
        _ => {}
    }
    false
}

/// The hash the lookup of `key` is about to use: [`key_hash`] from the key's type name and
/// header, or, for a str CPython has not hashed yet, its hash computed here. Not inlined: its
/// buffers would add to the stack of every frame below.
#[inline(never)]
fn lookup_hash(key: u64, py: Interp) -> i64 {
    let Some((name, header)) = type_and_header(key) else {
        return UNKNOWN_HASH;
    };
    match key_hash(&name, &header, py.layout.long_tagged != 0) {
        UNKNOWN_HASH if &name == b"str\0" => fresh_str_hash(key, &header, py),
        hash => hash,
    }
}

/// The first 4 bytes of `obj`'s type name (`ob_type` at +8, then `tp_name` at +24 in the type
/// object: enough to tell `str` and `int`) and the object's header ([`key_hash`]'s bytes).
#[inline(always)]
fn type_and_header(obj: u64) -> Option<([u8; 4], [u8; KEY_HEADER_LEN])> {
    let ty = read_user::<u64>(obj.wrapping_add(8))?;
    let header = read_user::<[u8; KEY_HEADER_LEN]>(obj)?;
    let name_at = read_user::<u64>(ty.wrapping_add(24))?;
    let mut name = [0u8; 4];
    // SAFETY: reads at most 4 bytes into `name`.
    unsafe { bpf_probe_read_user_str_bytes(name_at as *const u8, &mut name) }.ok()?;
    Some((name, header))
}

/// `PyASCIIObject`: the length at +16, the `state` bits at +32 (kind from bit 2, compact 5,
/// ascii 6).
const STR_LENGTH: usize = 16;
const STR_STATE: u64 = 32;

/// The hash of a compact str of at most [`HASHED_STR_MAX`] bytes that CPython has not hashed
/// yet ([`str_hash`], keyed with the interpreter's `_Py_HashSecret`).
fn fresh_str_hash(key: u64, header: &[u8; KEY_HEADER_LEN], py: Interp) -> i64 {
    let l = py.layout;
    let state = read_user::<u32>(key.wrapping_add(STR_STATE)).unwrap_or(0);
    let (kind, compact, ascii) = (
        (state >> 2) & 7,
        state & (1 << 5) != 0,
        state & (1 << 6) != 0,
    );
    let mut len = [0u8; 8];
    len.copy_from_slice(&header[STR_LENGTH..STR_LENGTH + 8]);
    let bytes = i64::from_ne_bytes(len).wrapping_mul(i64::from(kind));
    if l.hash_secret == 0 || !compact || !(0..=HASHED_STR_MAX as i64).contains(&bytes) {
        return UNKNOWN_HASH;
    }
    let Some([k0, k1]) = read_user::<[u64; 2]>(py.bias.wrapping_add(l.hash_secret)) else {
        return UNKNOWN_HASH;
    };
    let data = key.wrapping_add(if ascii { l.ascii_data } else { l.compact_data });
    let Some(buf) = STR_DATA.get_ptr_mut(0) else {
        return UNKNOWN_HASH;
    };
    // SAFETY: the per-CPU value is this program's alone while it runs.
    let buf = unsafe { &mut *buf };
    // The str's bytes alone (a read past them could cross into an unmapped page). Masked after a
    // volatile read, so that LLVM keeps the mask the verifier needs to see the length within the
    // buffer (`bytes` <= HASHED_STR_MAX already).
    let len = unsafe { core::ptr::read_volatile(&(bytes as usize)) } & (2 * HASHED_STR_MAX - 1);
    let Some(read) = buf.get_mut(..len) else {
        return UNKNOWN_HASH;
    };
    if unsafe { bpf_probe_read_user_buf(data as *const u8, read) }.is_err() {
        return UNKNOWN_HASH;
    }
    // SAFETY: the buffer holds 2 * HASHED_STR_MAX bytes; its first HASHED_STR_MAX are hashed.
    let hashed = unsafe { &*(buf.as_ptr() as *const [u8; HASHED_STR_MAX]) };
    str_hash(k0, k1, hashed, bytes as usize)
}

/// A lookup of `key` that missed on `dict` in window `w` (`form` says how): reports it with the
/// reader's frames and the key's bytes, and keeps the key to be judged at the window's close (or
/// sends an unknown verdict at once). `hash` is the key's, where the caller computed it, else
/// [`UNKNOWN_HASH`]: then [`key_hash`] of the bytes copied. Inlined: BPF calls take five
/// arguments at most.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn missed(
    regs: &aya_ebpf::bindings::pt_regs,
    tid: u32,
    cfg: &ProbeConfig,
    py: Interp,
    w: &Window,
    dict: ObjKey,
    key: u64,
    hash: i64,
    form: u32,
) {
    let raised_ns = unsafe { bpf_ktime_get_ns() };
    stack(regs, tid, raised_ns, cfg, w.open_ns);
    let Some(mut entry) = EVENTS.reserve::<KeyErrorEvent>(0) else {
        bump(Stat::LostKeyError);
        return;
    };
    let e = entry.as_mut_ptr();
    let mut hash = hash;
    // SAFETY: `e` points at reserved ring-buffer memory of the event's size; every field is set
    // (failed reads leave zeros) before submit.
    unsafe {
        (*e).kind = EventKind::KeyError as u32;
        (*e).reader_tid = tid;
        (*e).tgid = dict.tgid;
        (*e).window = cfg.window;
        (*e).dict = dict.object;
        (*e).raised_ns = raised_ns;
        (*e).window_open_ns = w.open_ns;
        (*e).writer_tid = w.writer_tid;
        (*e).form = form;
        (*e).key = key;
        (*e).reader_comm = comm();
        (*e).key_type = [0; detector_common::TYPE_NAME_LEN];
        (*e).key_obj = [0; detector_common::KEY_OBJ_LEN];
        // ob_type at +8, then tp_name at +24 in the type object.
        if let Ok(ty) = bpf_probe_read_user((key + 8) as *const u64)
            && let Ok(name) = bpf_probe_read_user((ty + 24) as *const u64)
        {
            let _ = bpf_probe_read_user_str_bytes(name as *const u8, &mut (*e).key_type);
        }
        // A key near the end of its mapping cannot be copied whole, and a failed read copies
        // nothing: then its header alone, which holds what the hash needs.
        if bpf_probe_read_user_buf(key as *const u8, &mut (*e).key_obj).is_err() {
            let header = &mut (&mut (*e).key_obj)[..KEY_HEADER_LEN];
            let _ = bpf_probe_read_user_buf(key as *const u8, header);
        }
        if hash == UNKNOWN_HASH {
            hash = key_hash(&(*e).key_type, &(*e).key_obj, py.layout.long_tagged != 0);
        }
        (*e).hash = hash;
    }
    entry.submit(wakeup_flags());
    // Reserved after the event, so userspace reads the verdict after it.
    if !add_pending(dict, key, hash) {
        verdict(&dict, key, hash, KEY_UNKNOWN);
    }
}
