"""racewatch's Python demo: the seed's worker.

A refresher thread rebuilds a dict cache with clear() then update(); a reader thread looks keys up
(keys that always exist) and writes a byte per lookup. Between clear() and update() the cache is
empty, and a lookup that lands there raises KeyError.

    worker.py [--fixed] [--seconds S] [--keys N] [--refresh-ms MS] [--switch-interval S]
              [--gap-ms MS] [--pause-ms MS] [--absent-every N] [--other-dict] [--scratch-dicts]
              [--subclass] [--bug-on-signal] [--workers N [--spawn]]

--fixed            refresh by build-then-swap: no empty window, no KeyError.
--gap-ms MS        sleep between clear() and update(), as the seed's repro did: every refresh
                   then lets the reader in.
--pause-ms MS      the reader sleeps MS between lookups: with few --keys and a long --refresh-ms
                   the race becomes rare (the seed's "once an hour").
--absent-every N   every N lookups, also look up a key that never exists (a KeyError no window
                   causes).
--other-dict       a second reader raises KeyErrors on another dict, all the time.
--scratch-dicts    a thread empties throwaway dicts and drops them (windows no refill closes),
                   while another raises KeyErrors on fresh dicts, which CPython gives the dropped
                   dicts' addresses.
--subclass         the cache is an instance of a subclass of dict.
--bug-on-signal    refresh build-then-swap until SIGUSR1, then clear-then-update for --seconds:
                   lets a tracer attach to a running worker before the bug starts.
--workers N        a pre-fork pool, as gunicorn, uwsgi or celery run one: the process builds
                   the cache, forks N workers that each run the worker above, and waits for them.
--spawn            with --workers: each worker is a fresh interpreter (fork then exec, as
                   multiprocessing's spawn does) instead of a fork.

Ground truth, printed to stderr at exit by each worker:
    worker: pid=P lookups=N keyerrors=M absent_keyerrors=A other_keyerrors=B
            scratch_keyerrors=C refreshes=R
where keyerrors counts only misses of keys that always exist.
"""
import argparse
import os
import signal
import sys
import threading
import time


class CacheDict(dict):
    """--subclass: a dict with a name of its own, as applications subclass it."""


class Cache:
    def __init__(self, data, kind=dict):
        self._cache = kind(data)

    def get(self, key):
        return self._cache[key]

    def refresh(self, data, racy, gap):
        if racy:
            self._cache.clear()  # the window opens: the cache is empty until update() returns
            if gap:
                time.sleep(gap)  # the seed's repro: widen the window on purpose
            self._cache.update(data)
        else:
            new = dict(data)
            self._cache = new  # atomic rebind: no empty window


def parse():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixed", action="store_true")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--keys", type=int, default=20000)
    ap.add_argument("--refresh-ms", type=float, default=5.0)
    ap.add_argument("--switch-interval", type=float, default=1e-4)
    ap.add_argument("--gap-ms", type=float, default=0.0)
    ap.add_argument("--pause-ms", type=float, default=0.0)
    ap.add_argument("--absent-every", type=int, default=0)
    ap.add_argument("--other-dict", action="store_true")
    ap.add_argument("--scratch-dicts", action="store_true")
    ap.add_argument("--subclass", action="store_true")
    ap.add_argument("--bug-on-signal", action="store_true")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--spawn", action="store_true")
    return ap.parse_args()


def pool(args):
    """Runs --workers copies of the worker, forked (or spawned) from this process."""
    # Built before the fork, as a pre-fork server loads its data: every forked worker's cache
    # then sits at the same address, in its own copy of the memory.
    data = {f"k{i}": i for i in range(args.keys)}
    cache = Cache(data, CacheDict if args.subclass else dict)
    children = []
    for _ in range(args.workers):
        if args.spawn:
            argv = [a for a in sys.argv[1:] if a != "--spawn"]
            i = argv.index("--workers")
            del argv[i : i + 2]
            children.append(os.spawnv(os.P_NOWAIT, sys.executable, [sys.executable, __file__] + argv))
            continue
        pid = os.fork()
        if pid == 0:
            try:
                run(args, data, cache)
            finally:
                sys.stderr.flush()
                os._exit(0)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)


def main():
    args = parse()
    if args.workers:
        pool(args)
    else:
        run(args)


def run(args, data=None, cache=None):
    sys.setswitchinterval(args.switch_interval)

    if data is None:
        data = {f"k{i}": i for i in range(args.keys)}
        cache = Cache(data, CacheDict if args.subclass else dict)
    keys = list(data)
    stop = threading.Event()
    racy = threading.Event()
    if not args.fixed and not args.bug_on_signal:
        racy.set()
    counts = {
        "lookups": 0,
        "keyerrors": 0,
        "absent_keyerrors": 0,
        "other_keyerrors": 0,
        "scratch_keyerrors": 0,
        "refreshes": 0,
    }

    def reader():
        out = os.open(os.devnull, os.O_WRONLY)
        n = len(keys)
        i = lookups = keyerrors = absent = 0
        every = args.absent_every
        pause = args.pause_ms / 1000
        while not stop.is_set():
            try:
                cache.get(keys[i % n])
            except KeyError:
                keyerrors += 1
            if every and i % every == 0:
                try:
                    cache.get(f"absent-{i}")
                except KeyError:
                    absent += 1
            os.write(out, b"x")  # the seed's reader did a little I/O per lookup
            if pause:
                time.sleep(pause)
            i += 1
            lookups += 1
        counts["lookups"], counts["keyerrors"], counts["absent_keyerrors"] = lookups, keyerrors, absent

    def other_reader():
        other = {"a": 1}
        misses = 0
        while not stop.is_set():
            try:
                other["missing"]
            except KeyError:
                misses += 1
            time.sleep(0.0005)
        counts["other_keyerrors"] = misses

    def scratch_clearer():
        while not stop.is_set():
            tmp = {"a": 1}
            tmp.clear()
            del tmp
            time.sleep(0.0002)

    def scratch_reader():
        misses = 0
        while not stop.is_set():
            fresh = {}
            for _ in range(10):
                try:
                    fresh["missing"]
                except KeyError:
                    misses += 1
            del fresh
            time.sleep(0.0001)
        counts["scratch_keyerrors"] = misses

    def refresher():
        while not stop.is_set():
            cache.refresh(data, racy.is_set(), args.gap_ms / 1000)
            counts["refreshes"] += 1
            time.sleep(args.refresh_ms / 1000)

    threads = [threading.Thread(target=reader, name="reader"), threading.Thread(target=refresher, name="refresher")]
    if args.other_dict:
        threads.append(threading.Thread(target=other_reader, name="other-reader"))
    if args.scratch_dicts:
        threads.append(threading.Thread(target=scratch_clearer, name="scratch-clearer"))
        threads.append(threading.Thread(target=scratch_reader, name="scratch-reader"))
    for t in threads:
        t.start()
    if args.bug_on_signal:
        signal.signal(signal.SIGUSR1, lambda *_: racy.set())
        while not racy.wait(0.01):
            pass
    time.sleep(args.seconds)
    stop.set()
    for t in threads:
        t.join()
    line = f"worker: pid={os.getpid()} " + " ".join(f"{k}={v}" for k, v in counts.items())
    # One write: a pool's workers print at once, and print() may split a line in two writes.
    os.write(2, (line + "\n").encode())


if __name__ == "__main__":
    main()
