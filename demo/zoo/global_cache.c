/* A lock-guarded cache as C code often has one: a global, emptied and refilled by a refresher
 * thread while a reader looks keys up. Built with gcc -O3, the compiler clones cache_clear and
 * cache_fill for their constant argument (cache_clear.constprop.0, ...) and the threads call the
 * clones: a probe on cache_clear alone sees nothing, and racewatch must say so.
 *
 *     global_cache [SECONDS]
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
static volatile int stop; static long misses, lookups, refreshes;
static void *reader(void *a) { long i = 0; while (!stop) { if (cache_lookup(&global, i++ % N) < 0) misses++; lookups++; } return 0; }
static void *refresher(void *a) { while (!stop) { cache_clear(&global); struct timespec ts = {0, 20000}; nanosleep(&ts, 0); cache_fill(&global, N); refreshes++; ts.tv_nsec = 200000; nanosleep(&ts, 0); } return 0; }
int main(int argc, char **argv) { double secs = argc > 1 ? atof(argv[1]) : 1; cache_fill(&global, N); pthread_t r, w; pthread_create(&r, 0, reader, 0); pthread_create(&w, 0, refresher, 0); struct timespec ts = {(long)secs, (long)((secs - (long)secs) * 1e9)}; nanosleep(&ts, 0); stop = 1; pthread_join(r, 0); pthread_join(w, 0); fprintf(stderr, "cache_demo: lookups=%ld misses=%ld refreshes=%ld\n", lookups, misses, refreshes); return 0; }
