//! What a function returns, from the file's DWARF: how wide its value is in `rax`, and for the
//! types whose "not found" is plain (`bool`, a pointer, Rust's `Option`, C++'s `std::optional`),
//! which value that is and in which register. A `std::optional` of a one-register value comes
//! back in two registers, its value in `rax` and whether it has one in `dl`; any other return
//! wider than `rax` cannot be read as one register value, and racewatch says so rather than
//! compare the wrong half.
use std::path::Path;

use gimli::{AttributeValue, UnitOffset, constants as dw};

use crate::probe::dwarf::{self, R};

/// A lookup's return type, as racewatch reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Returns {
    /// Not found is `false`, `NULL` or `None`: 0 in the low `bytes` of `rax`.
    NotFoundIsZero { kind: &'static str, bytes: u8 },
    /// An integer of this many bytes (its miss value is the user's to give).
    Integer { bytes: u8 },
    /// A C++ `std::optional` of a one-register value, returned in `rax` and `rdx`: empty is 0 in
    /// `dl` (the flag after the value).
    EmptyOptional,
    /// Any other value wider than `rax` (returned in `rax` and `rdx`, or in memory).
    Wide { name: String, bytes: u64 },
}

/// The return type of the function whose code begins at `address`; None when the file has no
/// DWARF for it.
pub fn of(binary: &Path, address: u64) -> Option<Returns> {
    dwarf::with_dwarf(binary, |d| {
        dwarf::at_function(d, address, |unit, die| {
            // The type is on the declaration the definition refers to, or its abstract origin.
            let mut at = die;
            for _ in 0..4 {
                let e = unit.entry(at)?;
                if let Some(AttributeValue::UnitRef(t)) = e.attr_value(dw::DW_AT_type) {
                    return classify(d, unit, t);
                }
                match e
                    .attr_value(dw::DW_AT_specification)
                    .or_else(|| e.attr_value(dw::DW_AT_abstract_origin))
                {
                    Some(AttributeValue::UnitRef(next)) => at = next,
                    _ => return Ok(None),
                }
            }
            Ok(None)
        })
    })
    .ok()
    .flatten()
}

fn classify(
    dwarf: &gimli::Dwarf<R>,
    unit: &gimli::Unit<R>,
    t: UnitOffset,
) -> gimli::Result<Option<Returns>> {
    let mut t = t;
    for _ in 0..16 {
        let e = unit.entry(t)?;
        let name = match e.attr_value(dw::DW_AT_name) {
            Some(v) => dwarf.attr_string(unit, v)?.to_string_lossy().into_owned(),
            None => String::new(),
        };
        let size = byte_size(&e);
        match e.tag() {
            dw::DW_TAG_typedef | dw::DW_TAG_const_type | dw::DW_TAG_volatile_type => {
                match e.attr_value(dw::DW_AT_type) {
                    Some(AttributeValue::UnitRef(next)) => t = next,
                    _ => return Ok(None),
                }
            }
            dw::DW_TAG_pointer_type | dw::DW_TAG_reference_type => {
                return Ok(Some(Returns::NotFoundIsZero {
                    kind: "a pointer, NULL",
                    bytes: 8,
                }));
            }
            dw::DW_TAG_base_type => {
                let bytes = size.unwrap_or(8).min(8) as u8;
                let boolean = e.attr_value(dw::DW_AT_encoding)
                    == Some(AttributeValue::Encoding(dw::DW_ATE_boolean));
                return Ok(Some(if boolean {
                    Returns::NotFoundIsZero {
                        kind: "a bool, false",
                        bytes,
                    }
                } else {
                    Returns::Integer { bytes }
                }));
            }
            dw::DW_TAG_structure_type | dw::DW_TAG_class_type | dw::DW_TAG_union_type => {
                let size = size.unwrap_or(0);
                if name.starts_with("optional<")
                    && size == 16
                    && in_registers(&e)
                    && template_value_bytes(unit, t)? == Some(8)
                {
                    return Ok(Some(Returns::EmptyOptional));
                }
                let option = name.starts_with("Option<");
                return Ok(Some(match (option, size) {
                    // A niche-optimized Option<&T>: None is the null pointer.
                    (true, 8) => Returns::NotFoundIsZero {
                        kind: "an Option, None",
                        bytes: 8,
                    },
                    // Option<u64> and the like: the discriminant in rax, None being 0.
                    (true, 9..=16) => Returns::NotFoundIsZero {
                        kind: "an Option, None",
                        bytes: discriminant_bytes(unit, t)?.unwrap_or(8),
                    },
                    (_, 1..=8) => Returns::Integer { bytes: size as u8 },
                    _ => Returns::Wide { name, bytes: size },
                }));
            }
            dw::DW_TAG_enumeration_type => {
                return Ok(Some(Returns::Integer {
                    bytes: size.unwrap_or(4).min(8) as u8,
                }));
            }
            _ => return Ok(None),
        }
    }
    Ok(None)
}

/// A type's `DW_AT_byte_size`, in whichever form the compiler wrote it.
fn byte_size(e: &gimli::DebuggingInformationEntry<R>) -> Option<u64> {
    match e.attr_value(dw::DW_AT_byte_size)? {
        AttributeValue::Udata(n) => Some(n),
        AttributeValue::Data1(n) => Some(u64::from(n)),
        AttributeValue::Data2(n) => Some(u64::from(n)),
        _ => None,
    }
}

/// Whether a class is returned in registers: not when its DWARF says it is passed by reference
/// (a non-trivial copy or destructor), which puts it in memory.
fn in_registers(e: &gimli::DebuggingInformationEntry<R>) -> bool {
    !matches!(
        e.attr_value(dw::DW_AT_calling_convention),
        Some(AttributeValue::CallingConvention(
            dw::DW_CC_pass_by_reference
        ))
    )
}

/// The size of a class template's first type argument (`T` of `optional<T>`).
fn template_value_bytes(unit: &gimli::Unit<R>, of: UnitOffset) -> gimli::Result<Option<u64>> {
    let mut tree = unit.entries_tree(Some(of))?;
    let mut children = tree.root()?.children();
    while let Some(child) = children.next()? {
        if child.entry().tag() != dw::DW_TAG_template_type_parameter {
            continue;
        }
        let Some(AttributeValue::UnitRef(mut t)) = child.entry().attr_value(dw::DW_AT_type) else {
            return Ok(None);
        };
        // Through typedefs and qualifiers to the sized type.
        for _ in 0..8 {
            let e = unit.entry(t)?;
            if let Some(n) = byte_size(&e) {
                return Ok(Some(n));
            }
            match e.attr_value(dw::DW_AT_type) {
                Some(AttributeValue::UnitRef(next)) => t = next,
                _ => return Ok(None),
            }
        }
        return Ok(None);
    }
    Ok(None)
}

/// The size of a Rust enum's discriminant when it sits at offset 0.
fn discriminant_bytes(unit: &gimli::Unit<R>, of: UnitOffset) -> gimli::Result<Option<u8>> {
    let mut tree = unit.entries_tree(Some(of))?;
    let mut children = tree.root()?.children();
    while let Some(child) = children.next()? {
        if child.entry().tag() != dw::DW_TAG_variant_part {
            continue;
        }
        let Some(AttributeValue::UnitRef(discr)) = child.entry().attr_value(dw::DW_AT_discr) else {
            return Ok(None);
        };
        let member = unit.entry(discr)?;
        if member.attr_value(dw::DW_AT_data_member_location) != Some(AttributeValue::Udata(0)) {
            return Ok(None);
        }
        let Some(AttributeValue::UnitRef(t)) = member.attr_value(dw::DW_AT_type) else {
            return Ok(None);
        };
        return Ok(byte_size(&unit.entry(t)?).map(|n| n.min(8) as u8));
    }
    Ok(None)
}
