//! Renders the key of a failed `d[k]` from the bytes the kernel copied out of the key object
//! (at the build's [`ObjectLayout`]), the way Python's repr() would for str and int keys.
use detector_common::{KEY_OBJ_LEN, KeyErrorEvent};

use crate::text::comm_str;

use super::layout::ObjectLayout;

// PyASCIIObject: length at 16, state at 32 (the data's start differs between versions).
pub(super) const STR_LENGTH: usize = 16;
pub(super) const STR_STATE: usize = 32;
// PyLongObject: the digit count at 16 (`ob_size` or `lv_tag`), 30-bit digits in u32s from 24.
const LONG_SIZE: usize = 16;
const LONG_DIGITS: usize = 24;

fn i64_at(b: &[u8], at: usize) -> i64 {
    i64::from_ne_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().unwrap_or([0; 4]))
}

/// Where a compact str's characters start and how many bytes each takes, from its `state` word;
/// `None` for a legacy (non-compact) string or an unknown kind.
pub(super) fn str_data(state: u32, objects: &ObjectLayout) -> Option<(usize, usize)> {
    let (kind, compact, ascii) = (
        (state >> 2) & 7,
        state & (1 << 5) != 0,
        state & (1 << 6) != 0,
    );
    if !compact {
        return None;
    }
    let (start, width) = if ascii {
        (objects.ascii_data, 1)
    } else {
        (objects.compact_data, kind as usize)
    };
    matches!(width, 1 | 2 | 4).then_some((start, width))
}

/// The characters of a str's data, `width` bytes each.
pub(super) fn chars(data: &[u8], width: usize) -> impl Iterator<Item = char> + '_ {
    data.chunks_exact(width).map(move |c| {
        let code = match width {
            1 => u32::from(c[0]),
            2 => u32::from(u16::from_ne_bytes([c[0], c[1]])),
            _ => u32::from_ne_bytes([c[0], c[1], c[2], c[3]]),
        };
        char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER)
    })
}

fn render_str(b: &[u8; KEY_OBJ_LEN], objects: &ObjectLayout) -> Option<String> {
    let len = usize::try_from(i64_at(b, STR_LENGTH)).ok()?;
    let (start, width) = str_data(u32_at(b, STR_STATE), objects)?;
    let avail = (KEY_OBJ_LEN - start) / width;
    let chars = chars(&b[start..start + len.min(avail) * width], width);
    let mut out = String::from("'");
    for c in chars {
        match c {
            '\'' => out.push_str("\\'"),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.extend(c.escape_default()),
            c => out.push(c),
        }
    }
    out.push('\'');
    if len > avail {
        out.push_str(&format!("… ({len} chars)"));
    }
    Some(out)
}

fn render_int(b: &[u8; KEY_OBJ_LEN], objects: &ObjectLayout) -> Option<String> {
    let size = i64_at(b, LONG_SIZE);
    let (ndigits, negative) = if objects.long_tagged {
        ((size as u64) >> 3, size & 3 == 2)
    } else {
        (size.unsigned_abs(), size < 0)
    };
    let ndigits = usize::try_from(ndigits).ok()?;
    // Up to four 30-bit digits fit in a u128; longer ints are named by size.
    if ndigits > 4 {
        return Some(format!("<int of {ndigits} digits>"));
    }
    let value = (0..ndigits).rev().fold(0u128, |acc, i| {
        (acc << 30) | u128::from(u32_at(b, LONG_DIGITS + 4 * i))
    });
    Some(if negative {
        format!("-{value}")
    } else {
        value.to_string()
    })
}

/// The key as Python would print it, or `<TYPE object at 0x…>` for other types.
pub fn render(e: &KeyErrorEvent, objects: &ObjectLayout) -> Option<String> {
    if e.key == 0 {
        return None;
    }
    let type_name = comm_str(&e.key_type);
    let rendered = match type_name.as_str() {
        "str" => render_str(&e.key_obj, objects),
        "int" => render_int(&e.key_obj, objects),
        _ => None,
    };
    Some(rendered.unwrap_or_else(|| format!("<{type_name} object at {:#x}>", e.key)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use detector_common::{COMM_LEN, EventKind, TYPE_NAME_LEN};

    fn event(type_name: &str, obj: [u8; KEY_OBJ_LEN]) -> KeyErrorEvent {
        let mut key_type = [0; TYPE_NAME_LEN];
        key_type[..type_name.len()].copy_from_slice(type_name.as_bytes());
        KeyErrorEvent {
            kind: EventKind::KeyError as u32,
            reader_tid: 1,
            tgid: 100,
            window: 0,
            dict: 2,
            raised_ns: 3,
            window_open_ns: 1,
            writer_tid: 4,
            form: 0,
            key: 0x1000,
            hash: 0,
            reader_comm: [0; COMM_LEN],
            key_type,
            key_obj: obj,
        }
    }

    const V3_11: ObjectLayout = ObjectLayout {
        ascii_data: 48,
        compact_data: 72,
        long_tagged: false,
        tuple_items: 24,
    };
    const V3_12: ObjectLayout = ObjectLayout {
        ascii_data: 40,
        compact_data: 56,
        long_tagged: true,
        tuple_items: 24,
    };

    fn ascii(s: &str, l: &ObjectLayout) -> [u8; KEY_OBJ_LEN] {
        let mut b = [0; KEY_OBJ_LEN];
        b[STR_LENGTH..STR_LENGTH + 8].copy_from_slice(&(s.len() as i64).to_ne_bytes());
        let state: u32 = (1 << 2) | (1 << 5) | (1 << 6) | (1 << 7); // 1-byte kind, compact, ascii, ready
        b[STR_STATE..STR_STATE + 4].copy_from_slice(&state.to_ne_bytes());
        let n = s.len().min(KEY_OBJ_LEN - l.ascii_data);
        b[l.ascii_data..l.ascii_data + n].copy_from_slice(&s.as_bytes()[..n]);
        b
    }

    /// An int of `size` digits (negative: a negative int) in `l`'s layout.
    fn long(size: i64, digits: &[u32], l: &ObjectLayout) -> [u8; KEY_OBJ_LEN] {
        let mut b = [0; KEY_OBJ_LEN];
        let count = if l.long_tagged {
            let sign = match size {
                0 => 1,
                s if s < 0 => 2,
                _ => 0,
            };
            (size.unsigned_abs() << 3) as i64 | sign
        } else {
            size
        };
        b[LONG_SIZE..LONG_SIZE + 8].copy_from_slice(&count.to_ne_bytes());
        for (i, d) in digits.iter().enumerate() {
            b[LONG_DIGITS + 4 * i..LONG_DIGITS + 4 * i + 4].copy_from_slice(&d.to_ne_bytes());
        }
        b
    }

    #[test]
    fn str_keys_render_like_repr() {
        for l in [V3_11, V3_12] {
            let r = |s: &str| render(&event("str", ascii(s, &l)), &l);
            assert_eq!(r("k123").as_deref(), Some("'k123'"));
            assert_eq!(r("it's\n").as_deref(), Some("'it\\'s\\n'"));
            let shown = r(&"x".repeat(100)).unwrap();
            assert!(shown.ends_with("… (100 chars)"), "{shown}");
        }
    }

    #[test]
    fn int_keys_render_their_value() {
        for l in [V3_11, V3_12] {
            let r = |size: i64, digits: &[u32]| render(&event("int", long(size, digits, &l)), &l);
            assert_eq!(r(1, &[42]).as_deref(), Some("42"));
            assert_eq!(r(0, &[]).as_deref(), Some("0"));
            assert_eq!(
                r(-2, &[1, 1]).as_deref(),
                Some(&*format!("-{}", (1u64 << 30) + 1))
            );
            assert_eq!(r(9, &[1; 9]).as_deref(), Some("<int of 9 digits>"));
        }
    }

    #[test]
    fn other_types_are_named() {
        assert_eq!(
            render(&event("tuple", [0; KEY_OBJ_LEN]), &V3_11).as_deref(),
            Some("<tuple object at 0x1000>")
        );
    }
}
