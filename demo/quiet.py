"""racewatch's Python demo of the quiet misses: lookups that find a dict empty and say nothing.

A refresher thread rebuilds a dict cache with clear() then update(), as the seed's worker did.
Its readers never raise: one asks `cache.get(key)` and takes the None it gets in the window for a
default, another asks `key in cache` and takes the False for "no such key". Both serve a wrong
answer and log nothing. A third reads `cache[key]`: on a `Counter` or a `defaultdict(int)`
(`--kind`) the window answers 0 without a KeyError; on a dict it raises one. The same refresh
empties a list of the values with clear() and refills it with extend(), and a set of the keys
with clear() and update(); a fourth reader's `values[i]` raises IndexError in that window, and a
fifth reader's `key in ids` says no. Two more dicts are refreshed the same way, each read by one
reader of its own: `d.pop(key, None)` (the value put back after) and `d.setdefault(key, 0)`
take their defaults in the window.

    quiet.py [--fixed] [--racy OBJ,...] [--kind dict|counter|defaultdict] [--ordered]
             [--seconds S] [--keys N] [--refresh-ms MS] [--switch-interval S] [--gap-ms MS]
             [--absent-every N]

--fixed            refresh by build-then-swap: no empty window, no quiet miss.
--kind K           the cache's type: dict (default), collections.Counter, or
                   collections.defaultdict(int), whose `__missing__` answers 0 (and, for the
                   defaultdict, inserts it).
--gap-ms MS        sleep between clear() and update(), as the seed's repro did: every refresh
                   then lets the readers in.
--ordered          the dicts read by .pop and .setdefault are OrderedDicts, whose own
                   methods those are, called with their arguments by position and by keyword.
--racy OBJ,...     refresh only these by clear() then refill, the rest build-then-swap:
                   cache (the dict), values (the list), ids (the set), popped, defaults
                   (default: all of them).
--absent-every N   every N lookups, each reader also asks for a key that never exists (a miss no
                   window causes).

Ground truth, printed to stderr at exit:
    worker: pid=P get_lookups=N get_misses=M contains_lookups=N contains_misses=M
            subscript_lookups=N subscript_misses=M index_lookups=N index_misses=M
            member_lookups=N member_misses=M pop_lookups=N pop_misses=M
            setdefault_lookups=N setdefault_misses=M absent_lookups=A refreshes=R
where the misses count only keys that always exist (every one of them landed in a window).
"""
import argparse
import collections
import os
import sys
import threading
import time


# The refreshed objects: the dict cache (read by .get, `in` and d[k]), the list of its values
# (values[i]), the set of its keys (`in`), and the dicts read by .pop and by .setdefault.
OBJECTS = ("cache", "values", "ids", "popped", "defaults")

KINDS = {
    "dict": dict,
    "counter": collections.Counter,
    "defaultdict": lambda data: collections.defaultdict(int, data),
}


class Cache:
    def __init__(self, data, kind, own):
        self._kind = kind
        self._own = own
        self._cache = kind(data)
        self._values = list(data.values())
        self._ids = set(data)
        self._popped = own(data)
        self._defaults = own(data)

    def refresh(self, data, racy, gap):
        """Refreshes the objects named in `racy` by clear() then refill, the others by
        build-then-swap."""
        if "cache" in racy:
            self._cache.clear()  # the window opens: the cache is empty until update() returns
        if "values" in racy:
            self._values.clear()
        if "ids" in racy:
            self._ids.clear()
        if "popped" in racy:
            self._popped.clear()
        if "defaults" in racy:
            self._defaults.clear()
        if gap and racy:
            time.sleep(gap)  # the seed's repro: widen the window on purpose
        if "cache" in racy:
            self._cache.update(data)
        else:
            self._cache = self._kind(data)  # build, then swap: no empty window
        if "values" in racy:
            self._values.extend(data.values())
        else:
            self._values = list(data.values())
        if "ids" in racy:
            self._ids.update(data)
        else:
            self._ids = set(data)
        if "popped" in racy:
            self._popped.update(data)
        else:
            self._popped = self._own(data)
        if "defaults" in racy:
            self._defaults.update(data)
        else:
            self._defaults = self._own(data)


def parse():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixed", action="store_true")
    ap.add_argument("--racy", default=",".join(OBJECTS))
    ap.add_argument("--ordered", action="store_true")
    ap.add_argument("--kind", choices=sorted(KINDS), default="dict")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--keys", type=int, default=20000)
    ap.add_argument("--refresh-ms", type=float, default=5.0)
    ap.add_argument("--switch-interval", type=float, default=1e-4)
    ap.add_argument("--gap-ms", type=float, default=0.0)
    ap.add_argument("--absent-every", type=int, default=0)
    return ap.parse_args()


def main():
    args = parse()
    sys.setswitchinterval(args.switch_interval)
    # Values from 1: a 0 from a Counter or a defaultdict is its `__missing__`'s answer.
    data = {f"k{i}": i + 1 for i in range(args.keys)}
    keys = list(data)
    cache = Cache(data, KINDS[args.kind], collections.OrderedDict if args.ordered else dict)
    racy = set() if args.fixed else set(args.racy.split(","))
    if racy - set(OBJECTS):
        sys.exit(f"quiet.py: --racy names {', '.join(OBJECTS)}, not {args.racy}")
    stop = threading.Event()
    counts = {
        "get_lookups": 0,
        "get_misses": 0,
        "contains_lookups": 0,
        "contains_misses": 0,
        "subscript_lookups": 0,
        "subscript_misses": 0,
        "index_lookups": 0,
        "index_misses": 0,
        "member_lookups": 0,
        "member_misses": 0,
        "pop_lookups": 0,
        "pop_misses": 0,
        "setdefault_lookups": 0,
        "setdefault_misses": 0,
        "absent_lookups": 0,
        "refreshes": 0,
    }
    lock = threading.Lock()

    def reader(form):
        out = os.open(os.devnull, os.O_WRONLY)
        n = len(keys)
        i = lookups = misses = absent = 0
        every = args.absent_every
        while not stop.is_set():
            # Every other key is built afresh, as code that formats its keys does: a str whose
            # hash CPython has yet to compute when the lookup begins.
            key = keys[i % n] if i % 2 else f"k{i % n}"
            if form == "get":
                if cache._cache.get(key) is None:
                    misses += 1
            elif form == "contains":
                if key not in cache._cache:
                    misses += 1
            elif form == "member":
                if key not in cache._ids:
                    misses += 1
            elif form == "pop":
                # Its own dict, so no other reader sees the key gone before it is put back.
                popped = cache._popped
                if not args.ordered or i % 3 == 0:
                    value = popped.pop(key, None)
                elif i % 3 == 1:
                    # An OrderedDict's own pop takes its arguments by keyword too.
                    value = popped.pop(key, default=None)
                else:
                    value = popped.pop(key=key, default=None)
                if value is None:
                    misses += 1
                else:
                    popped[key] = value
            elif form == "setdefault":
                defaults = cache._defaults
                if not args.ordered or i % 3 == 0:
                    value = defaults.setdefault(key, 0)
                elif i % 3 == 1:
                    value = defaults.setdefault(key, default=0)
                else:
                    value = defaults.setdefault(default=0, key=key)
                if value == 0:
                    misses += 1
            elif form == "index":
                try:
                    cache._values[i % n]
                except IndexError:
                    misses += 1
            else:
                try:
                    if cache._cache[key] == 0:
                        misses += 1
                except KeyError:
                    misses += 1
            if every and i % every == 0 and form in ("get", "contains", "member"):
                # Never there: these miss in and out of windows alike, and are no window's doing.
                if form == "get":
                    cache._cache.get(f"absent-{i}")
                elif form == "contains":
                    f"absent-{i}" in cache._cache
                else:
                    f"absent-{i}" in cache._ids
                absent += 1
            os.write(out, b"x")
            i += 1
            lookups += 1
        with lock:
            counts[f"{form}_lookups"] = lookups
            counts[f"{form}_misses"] = misses
            counts["absent_lookups"] += absent

    def refresher():
        while not stop.is_set():
            cache.refresh(data, racy, args.gap_ms / 1000)
            counts["refreshes"] += 1
            time.sleep(args.refresh_ms / 1000)

    threads = [
        threading.Thread(target=reader, args=("get",), name="get-reader"),
        threading.Thread(target=reader, args=("contains",), name="in-reader"),
        threading.Thread(target=reader, args=("subscript",), name="subscript-reader"),
        threading.Thread(target=reader, args=("index",), name="index-reader"),
        threading.Thread(target=reader, args=("member",), name="member-reader"),
        threading.Thread(target=reader, args=("pop",), name="pop-reader"),
        threading.Thread(target=reader, args=("setdefault",), name="setdefault-reader"),
        threading.Thread(target=refresher, name="refresher"),
    ]
    for t in threads:
        t.start()
    time.sleep(args.seconds)
    stop.set()
    for t in threads:
        t.join()
    line = f"worker: pid={os.getpid()} " + " ".join(f"{k}={v}" for k, v in counts.items())
    os.write(2, (line + "\n").encode())


if __name__ == "__main__":
    main()
