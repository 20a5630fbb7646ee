//! CPython 3.11's location table (`co_linetable`, Objects/locations.md): which source line a
//! bytecode offset belongs to. Pure, so it is tested on tables CPython itself produced.

/// Reads a varint (6-bit chunks, bit 6 set when more follow) at `*at`.
fn varint(table: &[u8], at: &mut usize) -> Option<u32> {
    let mut byte = *table.get(*at)?;
    *at += 1;
    let mut value = u32::from(byte & 63);
    let mut shift = 0;
    while byte & 64 != 0 {
        byte = *table.get(*at)?;
        *at += 1;
        shift += 6;
        value |= u32::from(byte & 63).checked_shl(shift)?;
    }
    Some(value)
}

fn signed_varint(table: &[u8], at: &mut usize) -> Option<i64> {
    let v = varint(table, at)?;
    Some(if v & 1 != 0 {
        -i64::from(v >> 1)
    } else {
        i64::from(v >> 1)
    })
}

/// The line of the instruction at byte offset `addr` of a code object whose first line is
/// `first_line` (what `PyCode_Addr2Line` returns); `None` when the table gives it no line or
/// does not reach it.
pub fn line_at(table: &[u8], first_line: i64, addr: i64) -> Option<u32> {
    if addr < 0 {
        return u32::try_from(first_line).ok();
    }
    let (mut at, mut line, mut start) = (0usize, first_line, 0i64);
    while at < table.len() {
        let head = table[at];
        // Every entry starts with its high bit set.
        if head & 0x80 == 0 {
            return None;
        }
        let code = (head >> 3) & 15;
        let end = start + (i64::from(head & 7) + 1) * 2;
        let mut next = at + 1;
        let entry_line = match code {
            // No location.
            15 => None,
            // No columns, or the long form: a signed line delta, then (long form) more fields.
            13 | 14 => {
                line += signed_varint(table, &mut next)?;
                Some(line)
            }
            // One-line forms: the delta is in the code.
            10..=12 => {
                line += i64::from(code - 10);
                Some(line)
            }
            // Short forms: same line.
            _ => Some(line),
        };
        if (start..end).contains(&addr) {
            return entry_line.and_then(|l| u32::try_from(l).ok());
        }
        // Skip the entry's remaining bytes: the next entry is the next byte with its high bit set.
        next = next.max(at + 1);
        while next < table.len() && table[next] & 0x80 == 0 {
            next += 1;
        }
        at = next;
        start = end;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `f.__code__.co_linetable` of this function, compiled by CPython 3.11.7 from t.py:
    ///
    /// ```text
    /// 1 def f(a,
    /// 2       b):
    /// 3     x = a + 1
    /// 4
    /// 5     if x:
    /// 6         y = [i
    /// 7              for i in range(3)]
    /// 8         return (x +
    /// 9                 b)
    /// 10    return None
    /// ```
    const TABLE: [u8; 76] = [
        128, 0, 224, 8, 9, 136, 65, 137, 5, 128, 65, 224, 7, 8, 240, 0, 4, 5, 19, 240, 2, 1, 13,
        32, 240, 0, 1, 13, 32, 221, 22, 27, 152, 65, 145, 104, 148, 104, 240, 3, 1, 13, 32, 241, 0,
        1, 13, 32, 244, 0, 1, 13, 32, 136, 1, 224, 16, 17, 216, 16, 17, 241, 3, 1, 17, 18, 240, 0,
        1, 9, 19, 224, 11, 15, 136, 52,
    ];

    /// `list(f.__code__.co_lines())` for the same function: (start, end, line).
    const LINES: [(i64, i64, u32); 23] = [
        (0, 2, 1),
        (2, 4, 3),
        (4, 6, 3),
        (6, 10, 3),
        (10, 12, 3),
        (12, 14, 5),
        (14, 16, 5),
        (16, 18, 6),
        (18, 20, 6),
        (20, 32, 7),
        (32, 34, 7),
        (34, 38, 7),
        (38, 48, 7),
        (48, 50, 6),
        (50, 54, 6),
        (54, 64, 6),
        (64, 66, 6),
        (66, 68, 8),
        (68, 70, 9),
        (70, 74, 8),
        (74, 76, 8),
        (76, 78, 10),
        (78, 80, 10),
    ];

    #[test]
    fn every_instruction_gets_the_line_cpython_gives_it() {
        for (start, end, line) in LINES {
            for addr in (start..end).step_by(2) {
                assert_eq!(line_at(&TABLE, 1, addr), Some(line), "offset {addr}");
            }
        }
    }

    #[test]
    fn before_the_code_is_the_first_line_and_past_it_is_none() {
        assert_eq!(line_at(&TABLE, 1, -2), Some(1));
        assert_eq!(line_at(&TABLE, 1, 80), None);
    }

    #[test]
    fn entries_without_location_and_negative_deltas() {
        // Long form (14) +5, one-line form (11) +1, no-location (15), no-columns (13) -3.
        let table = [
            0x80 | (14 << 3),
            10,
            0,
            0,
            0, // +5, 1 unit
            0x80 | (11 << 3) | 1,
            0,
            0,                // +1, 2 units
            0x80 | (15 << 3), // no line, 1 unit
            0x80 | (13 << 3),
            7, // -3, 1 unit
        ];
        assert_eq!(line_at(&table, 100, 0), Some(105));
        assert_eq!(line_at(&table, 100, 2), Some(106));
        assert_eq!(line_at(&table, 100, 4), Some(106));
        assert_eq!(line_at(&table, 100, 6), None);
        assert_eq!(line_at(&table, 100, 8), Some(103));
    }

    #[test]
    fn truncated_or_garbage_tables_give_none() {
        assert_eq!(line_at(&[0x80 | (13 << 3), 0x40], 1, 0), None);
        assert_eq!(line_at(&[0x05], 1, 0), None);
        assert_eq!(line_at(&[], 1, 0), None);
        assert_eq!(
            line_at(
                &[0x80 | (13 << 3), 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
                1,
                0
            ),
            None
        );
    }
}
