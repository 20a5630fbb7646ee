// racewatch's native demo: the seed's bug in C++. Every cache operation takes the cache's lock,
// so there is no data race; but the refresh empties the cache, then refills it, in two steps, and
// a reader that runs in between misses keys that always exist.
//
//   cache_demo [--fixed] [--seconds S] [--readers N] [--keys K] [--refresh-us U] [--gap-us G]
//              [--pause-us P] [--bug-on-signal] [--reader-name NAME]
//
// --pause-us P     each reader sleeps P µs between lookups: with a long --refresh-us and few --keys
//                  the race becomes rare (the seed's "once an hour").
// --fixed          refresh by build-then-swap: no empty window, no miss.
// --bug-on-signal  run --fixed until SIGUSR1, then clear-then-refill for --seconds: lets a tracer
//                  attach to a running process before the bug starts.
// --reader-name    name the reader threads NAME (at most 15 bytes, any bytes): lets a test give
//                  racewatch a hostile thread name.
// Ground truth, printed to stderr at exit: "cache_demo: lookups=N misses=M refreshes=R".
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include <fcntl.h>
#include <pthread.h>
#include <unistd.h>

class Cache {
  public:
    // The three functions racewatch probes. noinline keeps them real functions at -O2.
    __attribute__((noinline)) void clear() {
        std::lock_guard<std::mutex> g(mu_);
        map_.clear();
    }
    __attribute__((noinline)) void update(const std::vector<std::pair<long, long>> &fresh) {
        std::lock_guard<std::mutex> g(mu_);
        for (const auto &kv : fresh) map_[kv.first] = kv.second;
    }
    // The value, or -1 when the key is missing.
    __attribute__((noinline)) long lookup(long key) {
        std::lock_guard<std::mutex> g(mu_);
        auto it = map_.find(key);
        return it == map_.end() ? -1 : it->second;
    }

  private:
    std::mutex mu_;
    std::unordered_map<long, long> map_;
};

static long value_of(long key) { return key * 2 + 1; }

static std::atomic<bool> g_stop{false};
static std::atomic<bool> g_racy{true};
static std::atomic<bool> g_signalled{false};

static void on_usr1(int) { g_signalled = true; }
static void on_stop(int) { g_stop = true; }

int main(int argc, char **argv) {
    bool fixed = false, bug_on_signal = false;
    double seconds = 3;
    int readers = 1;
    long keys = 2000, refresh_us = 1000, gap_us = 0, pause_us = 0;
    const char *reader_name = nullptr;
    for (int i = 1; i < argc; i++) {
        std::string a = argv[i];
        auto next = [&]() -> const char * {
            if (i + 1 >= argc) {
                fprintf(stderr, "cache_demo: %s needs a value\n", a.c_str());
                exit(2);
            }
            return argv[++i];
        };
        if (a == "--fixed") fixed = true;
        else if (a == "--bug-on-signal") bug_on_signal = true;
        else if (a == "--seconds") seconds = atof(next());
        else if (a == "--readers") readers = atoi(next());
        else if (a == "--keys") keys = atol(next());
        else if (a == "--refresh-us") refresh_us = atol(next());
        else if (a == "--gap-us") gap_us = atol(next());
        else if (a == "--reader-name") reader_name = next();
        else if (a == "--pause-us") pause_us = atol(next());
        else {
            fprintf(stderr, "cache_demo: unknown option %s\n", a.c_str());
            return 2;
        }
    }
    signal(SIGUSR1, on_usr1);
    signal(SIGTERM, on_stop);
    signal(SIGINT, on_stop);
    g_racy = !fixed && !bug_on_signal;

    std::vector<std::pair<long, long>> fresh;
    for (long k = 0; k < keys; k++) fresh.emplace_back(k, value_of(k));

    // The fixed mode's readers go through this pointer, swapped whole under its own lock.
    std::mutex current_mu;
    auto current = std::make_shared<Cache>();
    current->update(fresh);
    auto get_current = [&] {
        std::lock_guard<std::mutex> g(current_mu);
        return current;
    };

    int devnull = open("/dev/null", O_WRONLY);
    std::atomic<long> lookups{0}, misses{0}, refreshes{0};
    std::vector<std::thread> threads;
    for (int r = 0; r < readers; r++) {
        threads.emplace_back([&, r] {
            std::string name = reader_name ? reader_name : "reader-" + std::to_string(r);
            if (pthread_setname_np(pthread_self(), name.c_str()) != 0)
                fprintf(stderr, "cache_demo: cannot name a thread %s\n", name.c_str());
            std::mt19937_64 rng(r + 1);
            long n = 0, m = 0;
            while (!g_stop.load(std::memory_order_relaxed)) {
                long k = rng() % keys;
                if (get_current()->lookup(k) != value_of(k)) m++;
                n++;
                // The seed's reader did a little I/O per lookup.
                if (write(devnull, "x", 1) < 0) perror("write");
                if (pause_us) std::this_thread::sleep_for(std::chrono::microseconds(pause_us));
            }
            lookups += n;
            misses += m;
        });
    }
    std::thread refresher([&] {
        pthread_setname_np(pthread_self(), "refresher");
        while (!g_stop.load(std::memory_order_relaxed)) {
            if (g_racy) {
                auto c = get_current();
                c->clear();  // the window opens: the cache is empty until update() returns
                if (gap_us) std::this_thread::sleep_for(std::chrono::microseconds(gap_us));
                c->update(fresh);
            } else {
                auto next = std::make_shared<Cache>();
                next->update(fresh);
                std::lock_guard<std::mutex> g(current_mu);
                current = next;
            }
            refreshes++;
            std::this_thread::sleep_for(std::chrono::microseconds(refresh_us));
        }
    });

    if (bug_on_signal) {
        while (!g_signalled && !g_stop) std::this_thread::sleep_for(std::chrono::milliseconds(1));
        g_racy = !fixed;
    }
    auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
    while (!g_stop && std::chrono::steady_clock::now() < deadline)
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    g_stop = true;
    refresher.join();
    for (auto &t : threads) t.join();
    fprintf(stderr, "cache_demo: lookups=%ld misses=%ld refreshes=%ld\n", lookups.load(),
            misses.load(), refreshes.load());
    return 0;
}
