//! The hash CPython's dict lookup used for a KeyError's key, computed from the bytes the
//! kernel copied into the [`KeyErrorEvent`](crate::KeyErrorEvent): the kernel and userspace apply
//! the same function to the same bytes, so they name a pending key alike.
use crate::{KEY_OBJ_LEN, TYPE_NAME_LEN};

/// Not a hash: CPython reserves -1 for "not computed" and errors.
pub const UNKNOWN_HASH: i64 = -1;

fn word(obj: &[u8; KEY_OBJ_LEN], at: usize) -> Option<i64> {
    Some(i64::from_ne_bytes(obj.get(at..at + 8)?.try_into().ok()?))
}

fn digit(obj: &[u8; KEY_OBJ_LEN], at: usize) -> Option<i64> {
    Some(i64::from(u32::from_ne_bytes(
        obj.get(at..at + 4)?.try_into().ok()?,
    )))
}

/// A str's cached hash (`PyASCIIObject.hash` at +24) or a small int's value, which is its hash
/// (30-bit digits from +24; their count at +16: `ob_size` with the sign until 3.11, `lv_tag`'s
/// bits from 3 up with the sign in its low two bits, 2 for negative, from 3.12 when
/// `long_tagged`); [`UNKNOWN_HASH`] for other keys.
pub fn key_hash(
    type_name: &[u8; TYPE_NAME_LEN],
    obj: &[u8; KEY_OBJ_LEN],
    long_tagged: bool,
) -> i64 {
    let hash = || -> Option<i64> {
        // A live object has references: zero means its copy failed.
        if word(obj, 0)? == 0 {
            return None;
        }
        match type_name.get(..4)? {
            b"str\0" => word(obj, 24),
            b"int\0" => {
                let size = word(obj, 16)?;
                let (digits, negative) = if long_tagged {
                    ((size as u64) >> 3, size & 3 == 2)
                } else {
                    (size.unsigned_abs(), size < 0)
                };
                let v = match digits {
                    0 => 0,
                    1 => digit(obj, 24)?,
                    2 => digit(obj, 24)? | digit(obj, 28)? << 30,
                    _ => return None,
                };
                let v = if negative { -v } else { v };
                // hash(-1) is -2: -1 is the error return.
                Some(if v == -1 { -2 } else { v })
            }
            _ => None,
        }
    };
    hash().unwrap_or(UNKNOWN_HASH)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(type_name: &str, fields: &[(usize, &[u8])]) -> ([u8; TYPE_NAME_LEN], [u8; KEY_OBJ_LEN]) {
        let mut t = [0; TYPE_NAME_LEN];
        t[..type_name.len()].copy_from_slice(type_name.as_bytes());
        let mut o = [0; KEY_OBJ_LEN];
        o[..8].copy_from_slice(&1i64.to_ne_bytes());
        for (at, bytes) in fields {
            o[*at..*at + bytes.len()].copy_from_slice(bytes);
        }
        (t, o)
    }

    fn int(size: i64, digits: &[u32]) -> i64 {
        let mut d = [0u8; 12];
        for (chunk, digit) in d.chunks_mut(4).zip(digits) {
            chunk.copy_from_slice(&digit.to_ne_bytes());
        }
        let (t, o) = obj("int", &[(16, &size.to_ne_bytes()), (24, &d)]);
        let tagged = (size.unsigned_abs() << 3) as i64
            | match size {
                0 => 1,
                s if s < 0 => 2,
                _ => 0,
            };
        let (_, tagged_obj) = obj("int", &[(16, &tagged.to_ne_bytes()), (24, &d)]);
        let hash = key_hash(&t, &o, false);
        assert_eq!(
            key_hash(&t, &tagged_obj, true),
            hash,
            "3.12's lv_tag for {size}"
        );
        hash
    }

    #[test]
    fn str_uses_its_cached_hash() {
        let (t, o) = obj("str", &[(24, &1234i64.to_ne_bytes())]);
        assert_eq!(key_hash(&t, &o, false), 1234);
        let (t, o) = obj("str", &[(24, &(-1i64).to_ne_bytes())]);
        assert_eq!(key_hash(&t, &o, false), UNKNOWN_HASH, "not computed yet");
    }

    #[test]
    fn small_ints_hash_to_their_value() {
        assert_eq!(int(0, &[]), 0);
        assert_eq!(int(1, &[7]), 7);
        assert_eq!(int(-1, &[7]), -7);
        assert_eq!(int(-1, &[1]), -2);
        assert_eq!(int(2, &[5, 3]), 5 | 3 << 30);
        assert_eq!(int(-2, &[5, 3]), -(5 | 3 << 30));
        assert_eq!(int(3, &[1, 1, 1]), UNKNOWN_HASH);
    }

    #[test]
    fn other_keys_and_failed_copies_are_unknown() {
        let (t, o) = obj("tuple", &[(24, &5i64.to_ne_bytes())]);
        assert_eq!(key_hash(&t, &o, false), UNKNOWN_HASH);
        let (t, _) = obj("str", &[]);
        assert_eq!(key_hash(&t, &[0; KEY_OBJ_LEN], false), UNKNOWN_HASH);
    }
}
