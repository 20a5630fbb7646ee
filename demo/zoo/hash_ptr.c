/* Shape: C, an open-addressing hash table (linear probing) allocated on the heap, its slots in
 * a second allocation, behind a pthread mutex; the table is the lookup's first argument. The
 * lookup returns a pointer to the entry, NULL when the key is not there.
 *
 *     hash_ptr [SECONDS [READER_PAUSE_US [GAP_US [WORK_NS]]]]  probes: map_flush, map_rebuild, map_find (--miss-ret 0)
 *
 * A refresher empties the table and rebuilds it GAP_US (30) µs later, over and over; a reader looks up
 * keys the rebuild always brings back, so every miss is one that landed in the empty window.
 * Each reader sleeps READER_PAUSE_US (20) µs, then works WORK_NS (0) ns, after each lookup.
 * Ground truth on stderr at exit: cache_demo: lookups=N misses=M refreshes=R
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define KEYS 48

struct entry { unsigned key; int live; double value; };
struct map { pthread_mutex_t mu; unsigned mask; struct entry *slots; };

__attribute__((noinline)) void map_flush(struct map *m) {
    pthread_mutex_lock(&m->mu);
    memset(m->slots, 0, (m->mask + 1) * sizeof *m->slots);
    pthread_mutex_unlock(&m->mu);
}

__attribute__((noinline)) void map_rebuild(struct map *m) {
    pthread_mutex_lock(&m->mu);
    for (unsigned k = 1; k <= KEYS; k++) {
        unsigned i = (k * 2654435761u) & m->mask;
        while (m->slots[i].live) i = (i + 1) & m->mask;
        m->slots[i] = (struct entry){ k, 1, k / 2.0 };
    }
    pthread_mutex_unlock(&m->mu);
}

__attribute__((noinline)) const struct entry *map_find(struct map *m, unsigned key) {
    const struct entry *hit = NULL;
    pthread_mutex_lock(&m->mu);
    for (unsigned i = (key * 2654435761u) & m->mask; m->slots[i].live; i = (i + 1) & m->mask)
        if (m->slots[i].key == key) {
            hit = &m->slots[i];
            break;
        }
    pthread_mutex_unlock(&m->mu);
    return hit;
}

static volatile int stop;
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

static void *reader(void *m) {
    for (unsigned k = 1; !stop; k = k % KEYS + 1, lookups++) {
        if (!map_find(m, k)) misses++;
        pause_us(reader_pause_us);
        work(work_ns);
    }
    return 0;
}

static void *refresher(void *m) {
    for (; !stop; refreshes++) {
        map_flush(m);
        pause_us(gap_us);
        map_rebuild(m);
        pause_us(400);
    }
    return 0;
}

int main(int argc, char **argv) {
    double secs = argc > 1 ? atof(argv[1]) : 2;
    if (argc > 2) reader_pause_us = atol(argv[2]);
    if (argc > 3) gap_us = atol(argv[3]);
    if (argc > 4) work_ns = atol(argv[4]);
    struct map *m = malloc(sizeof *m);
    pthread_mutex_init(&m->mu, 0);
    m->mask = 127;
    m->slots = calloc(m->mask + 1, sizeof *m->slots);
    map_rebuild(m);
    pthread_t r, w;
    pthread_create(&r, 0, reader, m);
    pthread_create(&w, 0, refresher, m);
    struct timespec run = {(time_t)secs, (long)((secs - (time_t)secs) * 1e9)};
    nanosleep(&run, 0);
    stop = 1;
    pthread_join(r, 0);
    pthread_join(w, 0);
    fprintf(stderr, "cache_demo: lookups=%ld misses=%ld refreshes=%ld\n", lookups, misses, refreshes);
    return 0;
}
