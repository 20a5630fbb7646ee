//! The dict, list and set methods racewatch probes, found through the exported `PyDict_Type`
//! (and `PyList_Type` and `PySet_Type`, for `--quiet-misses`): its method table
//! holds `clear`, `update` and `get`, its number slots `|=`, its sequence slots `in`, its mapping
//! slots `d[k]`. A stripped build keeps the type and the
//! tables it points at, so the static `dict_clear`, `dict_update` and `dict_ior` are found
//! exactly without a symbol table; `OrderedDict`'s own, the same way through `PyODict_Type`.
//! `PyTypeObject`'s head is the same from CPython 3.11 to 3.14.
use crate::probe::symbols::Function;

use super::image::Image;

// PyTypeObject: tp_name, tp_as_number, tp_methods (PyVarObject head of 24 bytes first).
const TP_NAME: u64 = 24;
const TP_AS_NUMBER: u64 = 96;
const TP_AS_SEQUENCE: u64 = 104;
const TP_AS_MAPPING: u64 = 112;
const TP_METHODS: u64 = 232;
/// PyNumberMethods' `nb_inplace_or`, PySequenceMethods' `sq_contains` and `sq_inplace_concat`,
/// PyMappingMethods' `mp_subscript`.
const NB_INPLACE_OR: u64 = 224;
const SQ_CONTAINS: u64 = 56;
const SQ_INPLACE_CONCAT: u64 = 64;
const MP_SUBSCRIPT: u64 = 8;
/// PyMethodDef: name, function, flags, doc.
const METHOD_DEF: u64 = 32;
const METHOD_FN: u64 = 8;
/// More methods than any dict type has: the walk stops at the table's NULL name first.
const MAX_METHODS: u64 = 64;

/// The dict functions `d.clear()`, `d.update(...)`, `d |= x`, a `d[k]` not yet specialised,
/// `d.get(k)`, `d.pop(k, default)`, `d.setdefault(k, default)` and `k in d` call; `k in d` on a subclass defined in Python calls the method
/// `__contains__` (its type's `sq_contains` is the generic slot that looks the method up).
#[derive(Debug)]
pub struct DictMethods {
    pub clear: Function,
    pub update: Function,
    pub ior: Function,
    pub subscript: Function,
    pub get: Function,
    pub pop: Function,
    pub setdefault: Function,
    pub contains: Function,
    pub contains_method: Function,
}

#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub struct DictTypeError {
    what: String,
}

/// The dict methods of `image`, read from its `PyDict_Type`.
pub fn dict_methods(image: &Image) -> Result<DictMethods, DictTypeError> {
    let t = TypeObject::of(image, "PyDict_Type", "dict")?;
    let [clear, update, get, pop, setdefault, contains_method] = t.methods([
        "clear",
        "update",
        "get",
        "pop",
        "setdefault",
        "__contains__",
    ])?;
    Ok(DictMethods {
        clear: t.function(clear, "clear", "dict_clear")?,
        update: t.function(update, "update", "dict_update")?,
        ior: t.function(t.slot(TP_AS_NUMBER, NB_INPLACE_OR), "|=", "dict_ior")?,
        subscript: t.function(t.slot(TP_AS_MAPPING, MP_SUBSCRIPT), "[]", "dict_subscript")?,
        get: t.function(get, "get", "dict_get")?,
        pop: t.function(pop, "pop", "dict_pop")?,
        setdefault: t.function(setdefault, "setdefault", "dict_setdefault")?,
        contains: t.function(t.slot(TP_AS_SEQUENCE, SQ_CONTAINS), "in", "dict_contains")?,
        contains_method: t.function(contains_method, "__contains__", "dict___contains__")?,
    })
}

/// `collections.OrderedDict`'s own `clear()`, `update(...)` and `|=`, read from the exported
/// `PyODict_Type`: an OrderedDict is emptied and refilled by these, not by dict's (its `d[k]` is
/// dict's); and its own `pop` and `setdefault` (`--quiet-misses`).
#[derive(Debug)]
pub struct OrderedDictMethods {
    pub clear: Function,
    pub update: Function,
    pub ior: Function,
    pub pop: Function,
    pub setdefault: Function,
}

pub fn ordered_dict_methods(image: &Image) -> Result<OrderedDictMethods, DictTypeError> {
    let t = TypeObject::of(image, "PyODict_Type", "collections.OrderedDict")?;
    let [clear, update, pop, setdefault] = t.methods(["clear", "update", "pop", "setdefault"])?;
    Ok(OrderedDictMethods {
        clear: t.function(clear, "clear", "odict_clear")?,
        update: t.function(update, "update", "mutablemapping_update")?,
        pop: t.function(pop, "pop", "OrderedDict_pop")?,
        setdefault: t.function(setdefault, "setdefault", "OrderedDict_setdefault")?,
        ior: t.function(
            t.slot(TP_AS_NUMBER, NB_INPLACE_OR),
            "|=",
            "odict_inplace_or",
        )?,
    })
}

/// A list's `clear()`, `extend(...)`, `+=` and `lst[i]` (reached, once specialised code finds
/// the index out of range, to raise IndexError), read from the exported `PyList_Type`.
#[derive(Debug)]
pub struct ListMethods {
    pub clear: Function,
    pub extend: Function,
    pub inplace_concat: Function,
    pub subscript: Function,
}

pub fn list_methods(image: &Image) -> Result<ListMethods, DictTypeError> {
    let t = TypeObject::of(image, "PyList_Type", "list")?;
    let [clear, extend] = t.methods(["clear", "extend"])?;
    Ok(ListMethods {
        clear: t.function(clear, "clear", "list_clear")?,
        extend: t.function(extend, "extend", "list_extend")?,
        inplace_concat: t.function(
            t.slot(TP_AS_SEQUENCE, SQ_INPLACE_CONCAT),
            "+=",
            "list_inplace_concat",
        )?,
        subscript: t.function(t.slot(TP_AS_MAPPING, MP_SUBSCRIPT), "[]", "list_subscript")?,
    })
}

/// A set's `clear()`, `update(...)`, `|=` and `k in s` (its `sq_contains`), read from the
/// exported `PySet_Type`.
#[derive(Debug)]
pub struct SetMethods {
    pub clear: Function,
    pub update: Function,
    pub ior: Function,
    pub contains: Function,
}

pub fn set_methods(image: &Image) -> Result<SetMethods, DictTypeError> {
    let t = TypeObject::of(image, "PySet_Type", "set")?;
    let [clear, update] = t.methods(["clear", "update"])?;
    Ok(SetMethods {
        clear: t.function(clear, "clear", "set_clear")?,
        update: t.function(update, "update", "set_update")?,
        ior: t.function(t.slot(TP_AS_NUMBER, NB_INPLACE_OR), "|=", "set_ior")?,
        contains: t.function(t.slot(TP_AS_SEQUENCE, SQ_CONTAINS), "in", "set_contains")?,
    })
}

/// An exported type object of `image`, checked by its `tp_name`.
struct TypeObject<'a> {
    image: &'a Image,
    symbol: &'static str,
    at: u64,
}

impl<'a> TypeObject<'a> {
    fn of(
        image: &'a Image,
        symbol: &'static str,
        name: &str,
    ) -> Result<TypeObject<'a>, DictTypeError> {
        let t = TypeObject {
            image,
            symbol,
            at: 0,
        };
        let (at, _) = image.symbol(symbol).ok_or_else(|| {
            t.err(format!(
                "it exports no {symbol}: is it a CPython interpreter?"
            ))
        })?;
        let found = image
            .pointer_at(at + TP_NAME)
            .and_then(|p| image.c_str_at(p));
        if found != Some(name) {
            return Err(t.err(format!(
                "{symbol}'s tp_name reads {found:?}, not {name:?}: its type layout is not CPython \
                 3.11-3.14's"
            )));
        }
        Ok(TypeObject { at, ..t })
    }

    fn err(&self, what: String) -> DictTypeError {
        DictTypeError {
            what: format!("{}: {what}", self.image.path.display()),
        }
    }

    /// The functions of the method table's entries named `names`, where there are such entries.
    fn methods<const N: usize>(&self, names: [&str; N]) -> Result<[Option<u64>; N], DictTypeError> {
        let table = self
            .image
            .pointer_at(self.at + TP_METHODS)
            .ok_or_else(|| self.err(format!("{} has no method table", self.symbol)))?;
        let mut found = [None; N];
        for i in 0..MAX_METHODS {
            let def = table + i * METHOD_DEF;
            let Some(name_at) = self.image.pointer_at(def).filter(|&p| p != 0) else {
                break;
            };
            let name = self.image.c_str_at(name_at);
            if let Some(n) = names.iter().position(|&m| Some(m) == name) {
                found[n] = self.image.pointer_at(def + METHOD_FN);
            }
        }
        Ok(found)
    }

    /// Slot `slot` of the table at `table` in the type (`tp_as_number`, `tp_as_mapping`).
    fn slot(&self, table: u64, slot: u64) -> Option<u64> {
        self.image
            .pointer_at(self.at + table)
            .and_then(|t| self.image.pointer_at(t + slot))
    }

    fn function(
        &self,
        at: Option<u64>,
        method: &str,
        name: &str,
    ) -> Result<Function, DictTypeError> {
        let at = at.ok_or_else(|| self.err(format!("{} has no `{method}`", self.symbol)))?;
        self.image.function_at(at, name).ok_or_else(|| {
            self.err(format!(
                "{}'s `{method}` points outside its code, at {at:#x}",
                self.symbol
            ))
        })
    }
}
