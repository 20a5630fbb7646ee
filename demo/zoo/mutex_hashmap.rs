//! Shape: Rust, a `Cache` on the heap (in an `Arc`) holding a `Mutex<HashMap<u64, u64>>`; the
//! object is `&self`. The lookup returns `Option<u64>`, `None` when the key is not there (the
//! option comes back in rax:rdx, its discriminant in rax: 0 is `None`).
//!
//!     mutex_hashmap [SECONDS [READER_PAUSE_US [GAP_US [WORK_NS]]]]   probes: Cache::clear, Cache::refill, Cache::lookup (--miss-ret 0)
//!
//! A refresher empties the map and refills it GAP_US (30) µs later, over and over; two readers
//! look up keys the refill always brings back, so every miss is one that landed in the empty
//! window. Each reader sleeps READER_PAUSE_US (20) µs, then works WORK_NS (0) ns, after each
//! lookup.
//! Ground truth on stderr at exit: cache_demo: lookups=N misses=M refreshes=R
use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    thread,
    time::Duration,
};

const KEYS: u64 = 64;

struct Cache {
    map: Mutex<HashMap<u64, u64>>,
}

impl Cache {
    #[inline(never)]
    fn clear(&self) {
        self.map.lock().unwrap().clear();
    }

    #[inline(never)]
    fn refill(&self, keys: u64) {
        let mut map = self.map.lock().unwrap();
        map.extend((0..keys).map(|k| (k, k + 7)));
    }

    #[inline(never)]
    fn lookup(&self, key: u64) -> Option<u64> {
        self.map.lock().unwrap().get(&key).copied()
    }
}

/// A reader's own work after each lookup, as a request handler has: `ns` of computing.
fn work(ns: u64) {
    let start = std::time::Instant::now();
    while start.elapsed().as_nanos() < u128::from(ns) {}
}

fn main() {
    let secs: f64 = std::env::args().nth(1).map_or(2.0, |s| s.parse().expect("SECONDS"));
    let pause: u64 = std::env::args()
        .nth(2)
        .map_or(20, |s| s.parse().expect("READER_PAUSE_US"));
    let gap: u64 = std::env::args()
        .nth(3)
        .map_or(30, |s| s.parse().expect("GAP_US"));
    let work_ns: u64 = std::env::args()
        .nth(4)
        .map_or(0, |s| s.parse().expect("WORK_NS"));
    let cache = Arc::new(Cache { map: Mutex::new(HashMap::new()) });
    cache.refill(KEYS);
    let stop = Arc::new(AtomicBool::new(false));
    let (lookups, misses) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let readers: Vec<_> = (0..2)
        .map(|r| {
            let (cache, stop, lookups, misses) =
                (cache.clone(), stop.clone(), lookups.clone(), misses.clone());
            thread::spawn(move || {
                let mut key = r;
                while !stop.load(Relaxed) {
                    if cache.lookup(key).is_none() {
                        misses.fetch_add(1, Relaxed);
                    }
                    lookups.fetch_add(1, Relaxed);
                    key = (key + 1) % KEYS;
                    if pause > 0 {
                        thread::sleep(Duration::from_micros(pause));
                    }
                    work(work_ns);
                }
            })
        })
        .collect();
    let refresher = {
        let (cache, stop) = (cache.clone(), stop.clone());
        thread::spawn(move || {
            let mut refreshes = 0u64;
            while !stop.load(Relaxed) {
                cache.clear();
                if gap > 0 {
                    thread::sleep(Duration::from_micros(gap));
                }
                cache.refill(KEYS);
                refreshes += 1;
                thread::sleep(Duration::from_micros(500));
            }
            refreshes
        })
    };
    thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Relaxed);
    readers.into_iter().for_each(|r| r.join().unwrap());
    let refreshes = refresher.join().unwrap();
    eprintln!(
        "cache_demo: lookups={} misses={} refreshes={refreshes}",
        lookups.load(Relaxed),
        misses.load(Relaxed)
    );
}
