/* Shape: C, an open-addressing hash table (linear probing) held in a global behind a pthread
 * mutex, passed by address to every call (at -O2 and above the compiler may clone the functions
 * for that constant: .constprop). The lookup returns a stdbool `bool` and the value through an
 * out-parameter; false when the key is not there.
 *
 *     hash_bool [SECONDS [READER_PAUSE_US [GAP_US [WORK_NS]]]]  probes: table_clear, table_refill, table_get (--miss-ret 0)
 *
 * A refresher empties the table and refills it GAP_US (30) µs later, over and over; a reader looks up
 * keys the refill always brings back, so every miss is one that landed in the empty window.
 * Each reader sleeps READER_PAUSE_US (20) µs, then works WORK_NS (0) ns, after each lookup.
 * Ground truth on stderr at exit: cache_demo: lookups=N misses=M refreshes=R
 */
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CAPACITY 256 /* a power of two */
#define KEYS 100

struct slot { unsigned long key; long value; bool used; };
struct table { pthread_mutex_t mu; struct slot slots[CAPACITY]; };

static struct table cache = { PTHREAD_MUTEX_INITIALIZER };

static unsigned long hash(unsigned long key) { return (key * 0x9e3779b97f4a7c15ul) >> 56; }

__attribute__((noinline)) void table_clear(struct table *t) {
    pthread_mutex_lock(&t->mu);
    memset(t->slots, 0, sizeof t->slots);
    pthread_mutex_unlock(&t->mu);
}

__attribute__((noinline)) void table_refill(struct table *t, int keys) {
    pthread_mutex_lock(&t->mu);
    for (unsigned long k = 0; k < (unsigned long)keys; k++) {
        unsigned long i = hash(k);
        while (t->slots[i].used && t->slots[i].key != k) i = (i + 1) % CAPACITY;
        t->slots[i] = (struct slot){ k, (long)k * 3, true };
    }
    pthread_mutex_unlock(&t->mu);
}

__attribute__((noinline)) bool table_get(struct table *t, unsigned long key, long *out) {
    bool found = false;
    pthread_mutex_lock(&t->mu);
    for (unsigned long i = hash(key); t->slots[i].used; i = (i + 1) % CAPACITY)
        if (t->slots[i].key == key) {
            *out = t->slots[i].value;
            found = true;
            break;
        }
    pthread_mutex_unlock(&t->mu);
    return found;
}

static volatile bool stop;
static long lookups, misses, refreshes;

static long reader_pause_us = 20, gap_us = 30, work_ns;

static void pause_us(long us) {
    if (us <= 0) return;
    struct timespec ts = {0, us * 1000};
    nanosleep(&ts, 0);
}

/* A reader's own work after each lookup, as a request handler has: WORK_NS of computing. */
static void work(long ns) {
    struct timespec a, b;
    if (ns <= 0) return;
    clock_gettime(CLOCK_MONOTONIC, &a);
    do clock_gettime(CLOCK_MONOTONIC, &b);
    while ((b.tv_sec - a.tv_sec) * 1000000000L + (b.tv_nsec - a.tv_nsec) < ns);
}

static void *reader(void *arg) {
    long value;
    for (unsigned long k = 0; !stop; k = (k + 7) % KEYS, lookups++) {
        if (!table_get(&cache, k, &value)) misses++;
        pause_us(reader_pause_us);
        work(work_ns);
    }
    return arg;
}

static void *refresher(void *arg) {
    for (; !stop; refreshes++) {
        table_clear(&cache);
        pause_us(gap_us);
        table_refill(&cache, KEYS);
        pause_us(400);
    }
    return arg;
}

int main(int argc, char **argv) {
    double secs = argc > 1 ? atof(argv[1]) : 2;
    if (argc > 2) reader_pause_us = atol(argv[2]);
    if (argc > 3) gap_us = atol(argv[3]);
    if (argc > 4) work_ns = atol(argv[4]);
    table_refill(&cache, KEYS);
    pthread_t r, w;
    pthread_create(&r, 0, reader, 0);
    pthread_create(&w, 0, refresher, 0);
    struct timespec run = {(time_t)secs, (long)((secs - (time_t)secs) * 1e9)};
    nanosleep(&run, 0);
    stop = true;
    pthread_join(r, 0);
    pthread_join(w, 0);
    fprintf(stderr, "cache_demo: lookups=%ld misses=%ld refreshes=%ld\n", lookups, misses, refreshes);
    return 0;
}
