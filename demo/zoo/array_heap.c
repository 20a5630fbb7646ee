/* Shape: C, a fixed array of key/value pairs on the heap behind a pthread mutex; the cache is
 * the lookup's first argument. The lookup returns a long, -1 when the key is not there.
 *
 *     array_heap [SECONDS [READER_PAUSE_US [GAP_US [WORK_NS]]]]  probes: cache_reset, cache_load, cache_get (--miss-ret -1)
 *
 * A refresher empties the cache and reloads it GAP_US (20) µs later, over and over; two readers look up
 * keys the reload always brings back, so every miss is one that landed in the empty window.
 * Each reader sleeps READER_PAUSE_US (20) µs, then works WORK_NS (0) ns, after each lookup.
 * Ground truth on stderr at exit: cache_demo: lookups=N misses=M refreshes=R
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define SLOTS 64

struct cache {
    pthread_mutex_t mu;
    long keys[SLOTS], vals[SLOTS];
    int used;
};

__attribute__((noinline)) void cache_reset(struct cache *c) {
    pthread_mutex_lock(&c->mu);
    c->used = 0;
    pthread_mutex_unlock(&c->mu);
}

__attribute__((noinline)) void cache_load(struct cache *c) {
    pthread_mutex_lock(&c->mu);
    for (int i = 0; i < SLOTS; i++) {
        c->keys[i] = i;
        c->vals[i] = 100 + i;
    }
    c->used = SLOTS;
    pthread_mutex_unlock(&c->mu);
}

__attribute__((noinline)) long cache_get(struct cache *c, long key) {
    long val = -1;
    pthread_mutex_lock(&c->mu);
    for (int i = 0; i < c->used; i++)
        if (c->keys[i] == key) {
            val = c->vals[i];
            break;
        }
    pthread_mutex_unlock(&c->mu);
    return val;
}

static volatile int stop;
static long refreshes;
struct counts { struct cache *c; long lookups, misses; };

static long reader_pause_us = 20, gap_us = 20, work_ns;

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
    struct counts *n = arg;
    for (long i = 0; !stop; i++, n->lookups++) {
        if (cache_get(n->c, i % SLOTS) == -1) n->misses++;
        pause_us(reader_pause_us);
        work(work_ns);
    }
    return 0;
}

static void *refresher(void *arg) {
    while (!stop) {
        cache_reset(arg);
        pause_us(gap_us);
        cache_load(arg);
        refreshes++;
        pause_us(500);
    }
    return 0;
}

int main(int argc, char **argv) {
    double secs = argc > 1 ? atof(argv[1]) : 2;
    if (argc > 2) reader_pause_us = atol(argv[2]);
    if (argc > 3) gap_us = atol(argv[3]);
    if (argc > 4) work_ns = atol(argv[4]);
    struct cache *c = calloc(1, sizeof *c);
    pthread_mutex_init(&c->mu, 0);
    cache_load(c);
    struct counts r[2] = {{c}, {c}};
    pthread_t t[3];
    for (int i = 0; i < 2; i++) pthread_create(&t[i], 0, reader, &r[i]);
    pthread_create(&t[2], 0, refresher, c);
    struct timespec run = {(time_t)secs, (long)((secs - (time_t)secs) * 1e9)};
    nanosleep(&run, 0);
    stop = 1;
    for (int i = 0; i < 3; i++) pthread_join(t[i], 0);
    fprintf(stderr, "cache_demo: lookups=%ld misses=%ld refreshes=%ld\n",
            r[0].lookups + r[1].lookups, r[0].misses + r[1].misses, refreshes);
    return 0;
}
