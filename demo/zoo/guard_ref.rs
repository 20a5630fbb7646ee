//! Shape: Rust, a `static RwLock<HashMap<u64, u64>>` whose callers take the lock and hand the
//! map to small functions; the lookup returns `Option<&u64>`, `None` when the key is not there (a
//! reference's niche: `None` is the null pointer in rax). The object is the map inside the lock.
//!
//!     guard_ref [SECONDS [READER_PAUSE_US [GAP_US [WORK_NS]]]]   probes: guard_ref::clear, guard_ref::refill, guard_ref::find (--miss-ret 0)
//!
//! A refresher empties the map under the write lock and refills it under the write lock again,
//! GAP_US (30) µs later, over and over; a reader looks up keys the refill always brings back, so
//! every miss is one that landed in the empty window. The reader sleeps READER_PAUSE_US (10) µs,
//! then works WORK_NS (0) ns, after each lookup.
//! Ground truth on stderr at exit: cache_demo: lookups=N misses=M refreshes=R
use std::{
    collections::HashMap,
    sync::{
        LazyLock, RwLock,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    thread,
    time::Duration,
};

const KEYS: u64 = 40;

static MAP: LazyLock<RwLock<HashMap<u64, u64>>> = LazyLock::new(|| RwLock::new(HashMap::new()));
static STOP: AtomicBool = AtomicBool::new(false);

#[inline(never)]
pub fn clear(map: &mut HashMap<u64, u64>) {
    map.clear();
}

#[inline(never)]
pub fn refill(map: &mut HashMap<u64, u64>, keys: u64) {
    for k in 0..keys {
        map.insert(k, k * 3);
    }
}

#[inline(never)]
pub fn find(map: &HashMap<u64, u64>, key: u64) -> Option<&u64> {
    map.get(&key)
}

/// A reader's own work after each lookup, as a request handler has: `ns` of computing.
fn work(ns: u64) {
    let start = std::time::Instant::now();
    while start.elapsed().as_nanos() < u128::from(ns) {}
}

fn arg(n: usize, default: u64, what: &str) -> u64 {
    std::env::args()
        .nth(n)
        .map_or(default, |s| s.parse().expect(what))
}

fn main() {
    let secs: f64 = std::env::args()
        .nth(1)
        .map_or(2.0, |s| s.parse().expect("SECONDS"));
    let pause = arg(2, 10, "READER_PAUSE_US");
    let gap = arg(3, 30, "GAP_US");
    let work_ns = arg(4, 0, "WORK_NS");
    refill(&mut MAP.write().unwrap(), KEYS);
    let reader = thread::spawn(move || {
        let (mut lookups, mut misses) = (0u64, 0u64);
        let mut key = 0;
        while !STOP.load(Relaxed) {
            if find(&MAP.read().unwrap(), key).is_none() {
                misses += 1;
            }
            lookups += 1;
            key = (key + 7) % KEYS;
            if pause > 0 {
                thread::sleep(Duration::from_micros(pause));
            }
            work(work_ns);
        }
        (lookups, misses)
    });
    let refresher = thread::spawn(move || {
        let mut refreshes = 0u64;
        while !STOP.load(Relaxed) {
            clear(&mut MAP.write().unwrap());
            if gap > 0 {
                thread::sleep(Duration::from_micros(gap));
            }
            refill(&mut MAP.write().unwrap(), KEYS);
            refreshes += 1;
            thread::sleep(Duration::from_micros(400));
        }
        refreshes
    });
    thread::sleep(Duration::from_secs_f64(secs));
    STOP.store(true, Relaxed);
    let (lookups, misses) = reader.join().unwrap();
    let refreshes = refresher.join().unwrap();
    eprintln!("cache_demo: lookups={lookups} misses={misses} refreshes={refreshes}");
}
