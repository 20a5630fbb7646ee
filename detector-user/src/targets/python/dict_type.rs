//! The dict methods racewatch probes, found through the exported `PyDict_Type`: its method table
//! holds `clear` and `update`, its number slots `|=`. A stripped build keeps the type and the
//! tables it points at, so the static `dict_clear`, `dict_update` and `dict_ior` are found
//! exactly without a symbol table. `PyTypeObject`'s head is the same from CPython 3.11 to 3.14.
use crate::probe::symbols::Function;

use super::image::Image;

// PyTypeObject: tp_name, tp_as_number, tp_methods (PyVarObject head of 24 bytes first).
const TP_NAME: u64 = 24;
const TP_AS_NUMBER: u64 = 96;
const TP_AS_MAPPING: u64 = 112;
const TP_METHODS: u64 = 232;
/// PyNumberMethods' `nb_inplace_or`, PyMappingMethods' `mp_subscript`.
const NB_INPLACE_OR: u64 = 224;
const MP_SUBSCRIPT: u64 = 8;
/// PyMethodDef: name, function, flags, doc.
const METHOD_DEF: u64 = 32;
const METHOD_FN: u64 = 8;
/// More methods than any dict type has: the walk stops at the table's NULL name first.
const MAX_METHODS: u64 = 64;

/// The dict functions `d.clear()`, `d.update(...)`, `d |= x` and a `d[k]` not yet specialised
/// call.
#[derive(Debug)]
pub struct DictMethods {
    pub clear: Function,
    pub update: Function,
    pub ior: Function,
    pub subscript: Function,
}

#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub struct DictTypeError {
    what: String,
}

/// The dict methods of `image`, read from its `PyDict_Type`.
pub fn dict_methods(image: &Image) -> Result<DictMethods, DictTypeError> {
    let err = |what: String| DictTypeError {
        what: format!("{}: {what}", image.path.display()),
    };
    let (dict_type, _) = image
        .symbol("PyDict_Type")
        .ok_or_else(|| err("it exports no PyDict_Type: is it a CPython interpreter?".into()))?;
    let name = image
        .pointer_at(dict_type + TP_NAME)
        .and_then(|p| image.c_str_at(p));
    if name != Some("dict") {
        return Err(err(format!(
            "PyDict_Type's tp_name reads {name:?}, not \"dict\": its type layout is not CPython \
             3.11-3.14's"
        )));
    }
    let mut clear = None;
    let mut update = None;
    let methods = image
        .pointer_at(dict_type + TP_METHODS)
        .ok_or_else(|| err("PyDict_Type has no method table".into()))?;
    for i in 0..MAX_METHODS {
        let def = methods + i * METHOD_DEF;
        let Some(name_at) = image.pointer_at(def).filter(|&p| p != 0) else {
            break;
        };
        let slot = match image.c_str_at(name_at) {
            Some("clear") => &mut clear,
            Some("update") => &mut update,
            _ => continue,
        };
        *slot = image.pointer_at(def + METHOD_FN);
    }
    let slot = |table: u64, slot: u64| {
        image
            .pointer_at(dict_type + table)
            .and_then(|t| image.pointer_at(t + slot))
    };
    let function = |at: Option<u64>, method: &str, name: &str| {
        let at = at.ok_or_else(|| err(format!("PyDict_Type has no `{method}`")))?;
        image.function_at(at, name).ok_or_else(|| {
            err(format!(
                "PyDict_Type's `{method}` points outside its code, at {at:#x}"
            ))
        })
    };
    Ok(DictMethods {
        clear: function(clear, "clear", "dict_clear")?,
        update: function(update, "update", "dict_update")?,
        ior: function(slot(TP_AS_NUMBER, NB_INPLACE_OR), "|=", "dict_ior")?,
        subscript: function(slot(TP_AS_MAPPING, MP_SUBSCRIPT), "[]", "dict_subscript")?,
    })
}
