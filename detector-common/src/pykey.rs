//! The hash CPython's dict lookup used for a KeyError's key, computed from the bytes the
//! kernel copied into the [`KeyErrorEvent`](crate::KeyErrorEvent): the kernel and userspace apply
//! the same function to the same bytes, so they name a pending key alike.
/// Not a hash: CPython reserves -1 for "not computed" and errors.
pub const UNKNOWN_HASH: i64 = -1;
/// Bytes of a key object that hold what its hash needs (a str's hash at +24, an int's digits
/// from +24).
pub const KEY_HEADER_LEN: usize = 32;

fn word(obj: &[u8], at: usize) -> Option<i64> {
    Some(i64::from_ne_bytes(obj.get(at..at + 8)?.try_into().ok()?))
}

fn digit(obj: &[u8], at: usize) -> Option<i64> {
    Some(i64::from(u32::from_ne_bytes(
        obj.get(at..at + 4)?.try_into().ok()?,
    )))
}

/// A str's cached hash (`PyASCIIObject.hash` at +24) or a small int's value, which is its hash
/// (30-bit digits from +24; their count at +16: `ob_size` with the sign until 3.11, `lv_tag`'s
/// bits from 3 up with the sign in its low two bits, 2 for negative, from 3.12 when
/// `long_tagged`); [`UNKNOWN_HASH`] for other keys. `type_name` needs its first 4 bytes and
/// `obj` its first [`KEY_HEADER_LEN`].
pub fn key_hash(type_name: &[u8], obj: &[u8], long_tagged: bool) -> i64 {
    let hash = || -> Option<i64> {
        // A live object has references: zero means its copy failed.
        if word(obj, 0)? == 0 {
            return None;
        }
        match type_name.get(..4)? {
            b"str\0" => word(obj, 24),
            // hash(-1) is -2: -1 is the error return.
            b"int\0" => small_int(obj, long_tagged).map(|v| if v == -1 { -2 } else { v }),
            _ => None,
        }
    };
    hash().unwrap_or(UNKNOWN_HASH)
}

/// The value of an int of at most two 30-bit digits from its header (its first
/// [`KEY_HEADER_LEN`] bytes: the digit count at +16, `ob_size` with the sign until 3.11, `lv_tag`
/// from 3.12 when `long_tagged`; the digits from +24); `None` for a larger one.
pub fn small_int(obj: &[u8], long_tagged: bool) -> Option<i64> {
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
    Some(if negative { -v } else { v })
}

/// Longest str data, in bytes, whose hash the kernel computes itself (a str whose hash CPython
/// has not cached yet: one just built, as `d.get(f"k{i}")` builds it).
pub const HASHED_STR_MAX: usize = 64;

/// CPython's hash of a str whose data (`len` bytes of `data`, each character in its kind's
/// width) it has not hashed yet: SipHash-1-3 keyed with `_Py_HashSecret`'s `k0` and `k1`, as
/// `_Py_HashBytes` computes it (the default algorithm since 3.11, with no small-string cutoff).
/// [`UNKNOWN_HASH`] past [`HASHED_STR_MAX`] bytes. Bounded loops, for the verifier.
pub fn str_hash(k0: u64, k1: u64, data: &[u8; HASHED_STR_MAX], len: usize) -> i64 {
    if len == 0 {
        return 0;
    }
    if len > HASHED_STR_MAX {
        return UNKNOWN_HASH;
    }
    let mut v = [
        k0 ^ 0x736f_6d65_7073_6575,
        k1 ^ 0x646f_7261_6e64_6f6d,
        k0 ^ 0x6c79_6765_6e65_7261,
        k1 ^ 0x7465_6462_7974_6573,
    ];
    let blocks = len / 8;
    for (i, c) in data.chunks_exact(8).enumerate() {
        if i >= blocks {
            break;
        }
        let m = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        v[3] ^= m;
        sip_round(&mut v);
        v[0] ^= m;
    }
    let mut b = (len as u64) << 56;
    for j in 0..7 {
        let at = 8 * blocks + j;
        if at < len {
            b |= u64::from(data[verifier_bound(at)]) << (8 * j);
        }
    }
    v[3] ^= b;
    sip_round(&mut v);
    v[0] ^= b;
    v[2] ^= 0xff;
    for _ in 0..3 {
        sip_round(&mut v);
    }
    match ((v[0] ^ v[1]) ^ (v[2] ^ v[3])) as i64 {
        -1 => -2,
        h => h,
    }
}

/// `i` (below [`HASHED_STR_MAX`] already) masked where LLVM cannot see it is a no-op: the
/// kernel's verifier knows the index is in the buffer only from the mask.
fn verifier_bound(i: usize) -> usize {
    // SAFETY: a read of a local.
    unsafe { core::ptr::read_volatile(&i) & (HASHED_STR_MAX - 1) }
}

fn sip_round(v: &mut [u64; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[2] = v[2].wrapping_add(v[3]);
    v[1] = v[1].rotate_left(13) ^ v[0];
    v[3] = v[3].rotate_left(16) ^ v[2];
    v[0] = v[0].rotate_left(32);
    v[2] = v[2].wrapping_add(v[1]);
    v[0] = v[0].wrapping_add(v[3]);
    v[1] = v[1].rotate_left(17) ^ v[2];
    v[3] = v[3].rotate_left(21) ^ v[0];
    v[2] = v[2].rotate_left(32);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{KEY_OBJ_LEN, TYPE_NAME_LEN};

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

    fn hashed(k: (u64, u64), bytes: &[u8]) -> i64 {
        let mut data = [0xaa; HASHED_STR_MAX];
        data[..bytes.len()].copy_from_slice(bytes);
        str_hash(k.0, k.1, &data, bytes.len())
    }

    /// Each str's `hash()` in CPython 3.11 under PYTHONHASHSEED=0 (a zero secret) and 42 (the
    /// secret read from `_Py_HashSecret`), its data in its kind's width: latin-1, UTF-16.
    #[test]
    fn str_hash_is_cpython_s() {
        // "é-non-ascii" in latin-1, "日本" in UTF-16.
        let latin1 = b"\xe9-non-ascii";
        let wide = [0xe5, 0x65, 0x2c, 0x67];
        let cases: [(&[u8], i64, i64); 9] = [
            (b"a", 4644417185603328019, -123207753977932514),
            (b"k1", 5694439087064056704, 994116093276727647),
            (b"absent-17", 2016151931126899725, 152616919742922398),
            (b"k19999", 4157667587800922176, 6448132926277561998),
            (b"exactly8", -7020876967557843569, 5167394326330128376),
            (b"sixteen-chars-ab", 894512054207387698, 6025933530421777657),
            (latin1, -3165500192021935701, 5748263746656713203),
            (&wide, 6243316497235261705, -7192152084576530731),
            (&[b'a'; 40], 2012732711654038980, -6547373411814126374),
        ];
        let seed42 = (0xdc504fd368cd90af, 0xb920bb9ffe99e9c1);
        for (bytes, zero, forty_two) in cases {
            assert_eq!(hashed((0, 0), bytes), zero, "{bytes:?}");
            assert_eq!(hashed(seed42, bytes), forty_two, "{bytes:?}");
        }
        assert_eq!(hashed(seed42, b""), 0);
        assert_eq!(
            str_hash(0, 0, &[0; HASHED_STR_MAX], HASHED_STR_MAX + 1),
            UNKNOWN_HASH
        );
    }
}
