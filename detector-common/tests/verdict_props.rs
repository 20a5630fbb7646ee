//! Properties of how a key is named for its verdict. A miss in a window is judged at the close by
//! looking its key's hash up in the refilled dict: the kernel names the key by `key_hash` (the
//! hash CPython cached in the str, or a small int's value) or, for a str CPython has not hashed
//! yet, by `str_hash`; the dict's entries carry CPython's own hash. A name that differs from
//! CPython's, or depends on anything but the key, turns a miss the refill brought back into an
//! "absent" one (or the reverse), so each naming is checked against CPython's hash, written out
//! here from its definition.
use detector_common::{HASHED_STR_MAX, KEY_HEADER_LEN, UNKNOWN_HASH, key_hash, str_hash};
use proptest::prelude::*;

/// SipHash-1-3 of `msg`, the byte stream read straight through (no fixed buffer, no masks).
fn siphash13(k0: u64, k1: u64, msg: &[u8]) -> u64 {
    let mut v = [
        k0 ^ 0x736f_6d65_7073_6575,
        k1 ^ 0x646f_7261_6e64_6f6d,
        k0 ^ 0x6c79_6765_6e65_7261,
        k1 ^ 0x7465_6462_7974_6573,
    ];
    let round = |v: &mut [u64; 4]| {
        v[0] = v[0].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(13) ^ v[0];
        v[0] = v[0].rotate_left(32);
        v[2] = v[2].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(16) ^ v[2];
        v[0] = v[0].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(21) ^ v[0];
        v[2] = v[2].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(17) ^ v[2];
        v[2] = v[2].rotate_left(32);
    };
    let mut words = msg.chunks_exact(8);
    for w in &mut words {
        let m = u64::from_le_bytes(w.try_into().unwrap());
        v[3] ^= m;
        round(&mut v);
        v[0] ^= m;
    }
    let mut last = [0u8; 8];
    last[..words.remainder().len()].copy_from_slice(words.remainder());
    last[7] = msg.len() as u8;
    let b = u64::from_le_bytes(last);
    v[3] ^= b;
    round(&mut v);
    v[0] ^= b;
    v[2] ^= 0xff;
    for _ in 0..3 {
        round(&mut v);
    }
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

/// CPython's `hash()` of a str whose data is `bytes` (3.11+: SipHash-1-3, 0 for the empty str,
/// -1 kept for errors).
fn cpython_str_hash(secret: (u64, u64), bytes: &[u8]) -> i64 {
    if bytes.is_empty() {
        return 0;
    }
    match siphash13(secret.0, secret.1, bytes) as i64 {
        -1 => -2,
        h => h,
    }
}

/// CPython's `hash()` of an int below 2^61 - 1 in magnitude: its value, -1 kept for errors.
fn cpython_int_hash(v: i64) -> i64 {
    if v == -1 { -2 } else { v }
}

fn type_name(name: &str) -> [u8; 16] {
    let mut t = [0; 16];
    t[..name.len()].copy_from_slice(name.as_bytes());
    t
}

/// A live str's header as the kernel copies it: refcount, length, and the hash CPython cached
/// (-1: none yet).
fn str_header(len: usize, cached: i64) -> [u8; KEY_HEADER_LEN] {
    let mut h = [0; KEY_HEADER_LEN];
    h[..8].copy_from_slice(&1i64.to_ne_bytes());
    h[16..24].copy_from_slice(&(len as i64).to_ne_bytes());
    h[24..32].copy_from_slice(&cached.to_ne_bytes());
    h
}

/// A live int's header with its 30-bit digits, its size as 3.11 (`ob_size`, signed digit count)
/// or 3.12+ (`lv_tag`: digits from bit 3, sign in the low two bits) keeps it.
fn int_header(v: i64, long_tagged: bool) -> [u8; KEY_HEADER_LEN] {
    let m = v.unsigned_abs();
    let digits = [m & ((1 << 30) - 1), (m >> 30) & ((1 << 30) - 1)];
    let n: i64 = match m {
        0 => 0,
        m if m < 1 << 30 => 1,
        m if m < 1 << 60 => 2,
        _ => 3,
    };
    let size = if long_tagged {
        let sign = match v.signum() {
            0 => 1,
            -1 => 2,
            _ => 0,
        };
        n << 3 | sign
    } else {
        n * v.signum()
    };
    let mut h = [0; KEY_HEADER_LEN];
    h[..8].copy_from_slice(&1i64.to_ne_bytes());
    h[16..24].copy_from_slice(&size.to_ne_bytes());
    h[24..28].copy_from_slice(&(digits[0] as u32).to_ne_bytes());
    h[28..32].copy_from_slice(&(digits[1] as u32).to_ne_bytes());
    h
}

/// The reference itself is CPython's: values `hash()` gave in CPython 3.11 (pykey's tests).
#[test]
fn the_reference_hash_is_cpython_s() {
    assert_eq!(cpython_str_hash((0, 0), b"a"), 4644417185603328019);
    assert_eq!(cpython_str_hash((0, 0), b"exactly8"), -7020876967557843569);
    let seed42 = (0xdc504fd368cd90af, 0xb920bb9ffe99e9c1);
    assert_eq!(cpython_str_hash(seed42, b"k1"), 994116093276727647);
    assert_eq!(cpython_str_hash(seed42, &[b'a'; 40]), -6547373411814126374);
}

proptest! {
    /// A quiet lookup's str that CPython has not hashed yet is hashed by the kernel from its
    /// bytes alone: what lies in the buffer past them (the rest of a reused per-CPU buffer) must
    /// not change its name, or the same key gets two verdicts.
    #[test]
    fn a_fresh_str_is_named_by_cpython_s_hash_of_its_bytes_alone(
        secret in any::<(u64, u64)>(),
        bytes in prop::collection::vec(any::<u8>(), 0..=HASHED_STR_MAX),
        past in any::<[u8; HASHED_STR_MAX]>(),
    ) {
        let mut zeroed = [0; HASHED_STR_MAX];
        zeroed[..bytes.len()].copy_from_slice(&bytes);
        let mut dirty = past;
        dirty[..bytes.len()].copy_from_slice(&bytes);
        let want = cpython_str_hash(secret, &bytes);
        prop_assert_eq!(str_hash(secret.0, secret.1, &zeroed, bytes.len()), want);
        prop_assert_eq!(str_hash(secret.0, secret.1, &dirty, bytes.len()), want);
    }

    /// A `d[k]`'s KeyError copies the key after CPython hashed it: the str's cached hash is its
    /// name, the same the kernel computes for the same str still unhashed, so a key missed by
    /// `d[k]` and by `d.get(k)` is judged alike.
    #[test]
    fn a_str_is_named_alike_hashed_by_cpython_or_by_the_kernel(
        secret in any::<(u64, u64)>(),
        bytes in prop::collection::vec(any::<u8>(), 1..=HASHED_STR_MAX),
    ) {
        let mut data = [0; HASHED_STR_MAX];
        data[..bytes.len()].copy_from_slice(&bytes);
        let cached = cpython_str_hash(secret, &bytes);
        let header = str_header(bytes.len(), cached);
        prop_assert_eq!(key_hash(&type_name("str"), &header, false), cached);
        prop_assert_eq!(str_hash(secret.0, secret.1, &data, bytes.len()), cached);
        // Not hashed yet: no name from the header, the kernel hashes the bytes instead.
        let unhashed = str_header(bytes.len(), UNKNOWN_HASH);
        prop_assert_eq!(key_hash(&type_name("str"), &unhashed, false), UNKNOWN_HASH);
    }

    /// An int of one or two digits is named by its value as CPython hashes it (-1 as -2), in
    /// either layout of its size; a larger one, whose hash the kernel does not compute, is never
    /// given a wrong name.
    #[test]
    fn an_int_key_is_named_by_cpython_s_hash_in_either_layout(
        v in prop_oneof![-70i64..70, -(1i64 << 60) + 1..1 << 60, any::<i64>()],
        long_tagged in any::<bool>(),
    ) {
        let got = key_hash(&type_name("int"), &int_header(v, long_tagged), long_tagged);
        let want = if v.unsigned_abs() < 1 << 60 { cpython_int_hash(v) } else { UNKNOWN_HASH };
        prop_assert_eq!(got, want);
    }

    /// A key of another type, or whose copy failed (no references: zeros), has no name: its
    /// miss is judged unknown, never present or absent by a hash that is not its own.
    #[test]
    fn a_key_without_a_known_hash_is_never_named(
        name in prop::sample::select(vec!["tuple", "bytes", "float", "frozenset", "st", "in", ""]),
        header in any::<[u8; KEY_HEADER_LEN]>(),
        copied in any::<bool>(),
    ) {
        let mut header = header;
        if !copied {
            header[..8].fill(0);
            prop_assert_eq!(key_hash(&type_name("str"), &header, false), UNKNOWN_HASH);
            prop_assert_eq!(key_hash(&type_name("int"), &header, true), UNKNOWN_HASH);
        }
        prop_assert_eq!(key_hash(&type_name(name), &header, false), UNKNOWN_HASH);
    }
}
