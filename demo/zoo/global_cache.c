/* A lock-guarded cache as C code often has one: a global, emptied and refilled by a refresher
 * thread while a reader looks keys up. Built with gcc -O3, the compiler clones cache_clear and
 * cache_fill for their constant argument (cache_clear.constprop.0, ...) and the threads call the
 * clones: a probe on cache_clear alone sees nothing, and racewatch must say so.
 *
 *     global_cache [SECONDS [READER_PAUSE_US [GAP_US [WORK_NS]]]]
 *
 * The refresher empties the cache and refills it GAP_US (20) µs later, every 200 µs; the reader
 * sleeps READER_PAUSE_US (0) µs, then works WORK_NS (0) ns, after each lookup.
 *
 * Ground truth on stderr at exit: cache_demo: lookups=N misses=M refreshes=R
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#define N 64
struct cache { pthread_mutex_t mu; long keys[N]; long vals[N]; int n; };
static struct cache global = { PTHREAD_MUTEX_INITIALIZER };
__attribute__((noinline)) void cache_clear(struct cache *c) { pthread_mutex_lock(&c->mu); c->n = 0; pthread_mutex_unlock(&c->mu); }
__attribute__((noinline)) void cache_fill(struct cache *c, int n) { pthread_mutex_lock(&c->mu); for (int i = 0; i < n; i++) { c->keys[i] = i; c->vals[i] = i * 2; } c->n = n; pthread_mutex_unlock(&c->mu); }
__attribute__((noinline)) long cache_lookup(struct cache *c, long key) { long v = -1; pthread_mutex_lock(&c->mu); for (int i = 0; i < c->n; i++) if (c->keys[i] == key) { v = c->vals[i]; break; } pthread_mutex_unlock(&c->mu); return v; }
static volatile int stop; static long misses, lookups, refreshes, pause_us, gap_us = 20, work_ns;
static void nap(long us) { struct timespec ts = {0, us * 1000}; if (us > 0) nanosleep(&ts, 0); }
static void work(long ns) { struct timespec a, b; if (ns <= 0) return; clock_gettime(CLOCK_MONOTONIC, &a); do clock_gettime(CLOCK_MONOTONIC, &b); while ((b.tv_sec - a.tv_sec) * 1000000000L + (b.tv_nsec - a.tv_nsec) < ns); }
static void *reader(void *a) { long i = 0; while (!stop) { if (cache_lookup(&global, i++ % N) < 0) misses++; lookups++; nap(pause_us); work(work_ns); } return 0; }
static void *refresher(void *a) { while (!stop) { cache_clear(&global); nap(gap_us); cache_fill(&global, N); refreshes++; nap(200); } return 0; }
int main(int argc, char **argv) { double secs = argc > 1 ? atof(argv[1]) : 1; if (argc > 2) pause_us = atol(argv[2]); if (argc > 3) gap_us = atol(argv[3]); if (argc > 4) work_ns = atol(argv[4]); cache_fill(&global, N); pthread_t r, w; pthread_create(&r, 0, reader, 0); pthread_create(&w, 0, refresher, 0); struct timespec ts = {(long)secs, (long)((secs - (long)secs) * 1e9)}; nanosleep(&ts, 0); stop = 1; pthread_join(r, 0); pthread_join(w, 0); fprintf(stderr, "cache_demo: lookups=%ld misses=%ld refreshes=%ld\n", lookups, misses, refreshes); return 0; }
