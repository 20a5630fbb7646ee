//! Shape: Rust, a `Cache` in a `static` holding a `RwLock<BTreeMap<u64, u64>>` (readers take the
//! read lock, the refresher the write lock); the object is `&self`, a constant address. The
//! lookup returns `bool` and the value through a `&mut u64`; false when the key is not there.
//!
//!     rwlock_btree [SECONDS [READER_PAUSE_US [GAP_US [WORK_NS]]]]   probes: Cache::invalidate, Cache::repopulate, Cache::get (--miss-ret 0)
//!
//! A refresher empties the map and repopulates it GAP_US (30) µs later, over and over; a reader
//! looks up keys the repopulation always brings back, so every miss is one that landed in the
//! empty window. The reader sleeps READER_PAUSE_US (10) µs, then works WORK_NS (0) ns, after
//! each lookup. Ground truth on stderr at exit: cache_demo: lookups=N misses=M refreshes=R
use std::{
    collections::BTreeMap,
    sync::{
        RwLock,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    thread,
    time::Duration,
};

const KEYS: u64 = 40;

struct Cache {
    map: RwLock<BTreeMap<u64, u64>>,
}

impl Cache {
    #[inline(never)]
    fn invalidate(&self) {
        self.map.write().unwrap().clear();
    }

    #[inline(never)]
    fn repopulate(&self, keys: u64) {
        let mut map = self.map.write().unwrap();
        for k in 0..keys {
            map.insert(k, k * 11);
        }
    }

    #[inline(never)]
    fn get(&self, key: u64, out: &mut u64) -> bool {
        match self.map.read().unwrap().get(&key) {
            Some(&v) => {
                *out = v;
                true
            }
            None => false,
        }
    }
}

static CACHE: Cache = Cache { map: RwLock::new(BTreeMap::new()) };
static STOP: AtomicBool = AtomicBool::new(false);

/// A reader's own work after each lookup, as a request handler has: `ns` of computing.
fn work(ns: u64) {
    let start = std::time::Instant::now();
    while start.elapsed().as_nanos() < u128::from(ns) {}
}

fn main() {
    let secs: f64 = std::env::args().nth(1).map_or(2.0, |s| s.parse().expect("SECONDS"));
    let pause: u64 = std::env::args()
        .nth(2)
        .map_or(10, |s| s.parse().expect("READER_PAUSE_US"));
    let gap: u64 = std::env::args()
        .nth(3)
        .map_or(30, |s| s.parse().expect("GAP_US"));
    let work_ns: u64 = std::env::args()
        .nth(4)
        .map_or(0, |s| s.parse().expect("WORK_NS"));
    CACHE.repopulate(KEYS);
    let reader = thread::spawn(move || {
        let (mut lookups, mut misses, mut value) = (0u64, 0u64, 0u64);
        let mut key = 0;
        while !STOP.load(Relaxed) {
            if !CACHE.get(key, &mut value) {
                misses += 1;
            }
            lookups += 1;
            key = (key + 3) % KEYS;
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
            CACHE.invalidate();
            if gap > 0 {
                thread::sleep(Duration::from_micros(gap));
            }
            CACHE.repopulate(KEYS);
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
