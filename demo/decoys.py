"""racewatch's Python decoys: KeyErrors that look like the window's and are not, beside ones that are.

One writer empties three dicts at once, A, B and D (three windows open together; B is an instance
of a subclass of dict, as applications write them, D an OrderedDict, whose clear() and update()
are its own), looks a key up in A
itself while it is empty (the writer's own KeyError), lets the readers in, empties A once more,
then refills them with update(). Two readers
look up keys that always exist in A, in B (catching the KeyError and re-raising it, caught once
more outside), in D, and in C, another dict holding the same key objects for half of them.

    decoys.py [SECONDS]

Only the readers' KeyErrors on A, B and D are misses in a window: the writer's own, C's, and the
re-raise (one lookup, one KeyError) are not. Ground truth, printed to stderr at exit:
    worker: pid=P window_keyerrors=N writer_keyerrors=W other_keyerrors=C lookups=L refreshes=R
"""
import os
import sys
from collections import OrderedDict
import threading
import time

KEYS = [f"k{i}" for i in range(200)]


class Table(dict):
    """A dict subclass: its d[k] is dict's, and so is its KeyError."""


def main():
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 2.0
    a = dict.fromkeys(KEYS, 1)
    b = Table.fromkeys(KEYS, 2)
    c = dict.fromkeys(KEYS[:100], 3)
    d = OrderedDict.fromkeys(KEYS, 4)
    stop = threading.Event()
    lock = threading.Lock()
    counts = {"window_keyerrors": 0, "writer_keyerrors": 0, "other_keyerrors": 0, "lookups": 0, "refreshes": 0}

    def writer():
        while not stop.is_set():
            a.clear()
            b.clear()
            d.clear()
            try:
                a[KEYS[0]]
            except KeyError:
                counts["writer_keyerrors"] += 1
            time.sleep(0)  # lets the readers in
            # Emptied again while empty, as a writer that clears twice does: the readers' misses
            # so far are still this window's.
            a.clear()
            a.update(dict.fromkeys(KEYS, 1))
            b.update(dict.fromkeys(KEYS, 2))
            d.update(dict.fromkeys(KEYS, 4))
            counts["refreshes"] += 1
            time.sleep(0.0003)

    def reader(start):
        i = start
        mine = {"window_keyerrors": 0, "other_keyerrors": 0, "lookups": 0}
        while not stop.is_set():
            key = KEYS[i % len(KEYS)]
            i += 1
            mine["lookups"] += 1
            try:
                a[key]
            except KeyError:
                mine["window_keyerrors"] += 1
            try:
                try:
                    b[key]
                except KeyError:
                    raise
            except KeyError:
                mine["window_keyerrors"] += 1
            try:
                d[key]
            except KeyError:
                mine["window_keyerrors"] += 1
            try:
                c[key]
            except KeyError:
                mine["other_keyerrors"] += 1
        with lock:
            for k, v in mine.items():
                counts[k] += v

    sys.setswitchinterval(1e-5)
    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader, args=(s,)) for s in (0, 77)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    line = f"worker: pid={os.getpid()} " + " ".join(f"{k}={v}" for k, v in counts.items())
    os.write(2, (line + "\n").encode())


if __name__ == "__main__":
    main()
