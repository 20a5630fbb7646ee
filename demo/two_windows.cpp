// racewatch's demo of two windows in one process (demo/two_windows.toml watches both):
//   prices  refreshed clear-then-fill: Prices::reset() empties the table, Prices::load() refills
//           it, and a reader in between misses keys that always exist;
//   rates   refreshed build-then-swap: Rates::rebuild() builds a new table aside, then
//           Rates::install() swaps it in under the lock; a reader never misses.
// Every operation takes its table's lock, so there is no data race in either.
//
//   two_windows [--seconds S] [--keys K] [--refresh-us U] [--gap-us G] [--pause-us P]
//
// --gap-us G    the prices refresher sleeps G µs between reset and load (a wider window).
// --pause-us P  each reader sleeps P µs between lookups (leaves a small machine's CPUs to the
//               tracer).
// Ground truth, printed to stderr at exit, a line per window:
//   "two_windows: window=NAME lookups=N misses=M refreshes=R"
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include <pthread.h>

using Table = std::unordered_map<long, long>;
using Fresh = std::vector<std::pair<long, long>>;

class Prices {
  public:
    // noinline keeps the probed functions real functions at -O2.
    __attribute__((noinline)) void reset() {
        std::lock_guard<std::mutex> g(mu_);
        table_.clear();
    }
    __attribute__((noinline)) void load(const Fresh &fresh) {
        std::lock_guard<std::mutex> g(mu_);
        for (const auto &kv : fresh) table_[kv.first] = kv.second;
    }
    // The price, or -1 when the key is missing.
    __attribute__((noinline)) long price(long key) {
        std::lock_guard<std::mutex> g(mu_);
        auto it = table_.find(key);
        return it == table_.end() ? -1 : it->second;
    }

  private:
    std::mutex mu_;
    Table table_;
};

class Rates {
  public:
    // Builds the new table without the lock; the old one serves readers meanwhile.
    __attribute__((noinline)) void rebuild(const Fresh &fresh) {
        Table next;
        for (const auto &kv : fresh) next[kv.first] = kv.second;
        install(next);
    }
    __attribute__((noinline)) void install(Table &next) {
        std::lock_guard<std::mutex> g(mu_);
        table_.swap(next);
    }
    // The rate, or -1 when the key is missing.
    __attribute__((noinline)) long rate(long key) {
        std::lock_guard<std::mutex> g(mu_);
        auto it = table_.find(key);
        return it == table_.end() ? -1 : it->second;
    }

  private:
    std::mutex mu_;
    Table table_;
};

static long value_of(long key) { return key * 2 + 1; }

static std::atomic<bool> g_stop{false};

struct Truth {
    std::atomic<long> lookups{0}, misses{0}, refreshes{0};
};

// Looks random keys up with `get` every `pause_us` until stopped, counting what it finds missing
// in `truth`.
template <class Get>
static void reader(const char *name, long keys, long pause_us, Truth &truth, Get get) {
    pthread_setname_np(pthread_self(), name);
    std::mt19937_64 rng(std::hash<std::string>{}(name));
    long n = 0, m = 0;
    while (!g_stop.load(std::memory_order_relaxed)) {
        long k = rng() % keys;
        if (get(k) != value_of(k)) m++;
        n++;
        if (pause_us) std::this_thread::sleep_for(std::chrono::microseconds(pause_us));
    }
    truth.lookups += n;
    truth.misses += m;
}

// Runs `refresh` every `refresh_us` until stopped, counting the refreshes in `truth`.
template <class Refresh>
static void refresher(const char *name, long refresh_us, Truth &truth, Refresh refresh) {
    pthread_setname_np(pthread_self(), name);
    while (!g_stop.load(std::memory_order_relaxed)) {
        refresh();
        truth.refreshes++;
        std::this_thread::sleep_for(std::chrono::microseconds(refresh_us));
    }
}

int main(int argc, char **argv) {
    double seconds = 2;
    long keys = 2000, refresh_us = 1000, gap_us = 0, pause_us = 0;
    for (int i = 1; i < argc; i++) {
        std::string a = argv[i];
        if (i + 1 >= argc) {
            fprintf(stderr, "two_windows: %s needs a value\n", a.c_str());
            return 2;
        }
        const char *v = argv[++i];
        if (a == "--seconds") seconds = atof(v);
        else if (a == "--keys") keys = atol(v);
        else if (a == "--refresh-us") refresh_us = atol(v);
        else if (a == "--gap-us") gap_us = atol(v);
        else if (a == "--pause-us") pause_us = atol(v);
        else {
            fprintf(stderr, "two_windows: unknown option %s\n", a.c_str());
            return 2;
        }
    }
    Fresh fresh;
    for (long k = 0; k < keys; k++) fresh.emplace_back(k, value_of(k));
    Prices prices;
    Rates rates;
    prices.load(fresh);
    rates.rebuild(fresh);
    Truth prices_truth, rates_truth;
    rates_truth.refreshes++;  // its first build is a window too
    std::vector<std::thread> threads;
    threads.emplace_back([&] {
        reader("prices-reader", keys, pause_us, prices_truth, [&](long k) { return prices.price(k); });
    });
    threads.emplace_back([&] {
        reader("rates-reader", keys, pause_us, rates_truth, [&](long k) { return rates.rate(k); });
    });
    threads.emplace_back([&] {
        refresher("prices-refresh", refresh_us, prices_truth, [&] {
            prices.reset();  // the window opens: the table is empty until load() returns
            if (gap_us) std::this_thread::sleep_for(std::chrono::microseconds(gap_us));
            prices.load(fresh);
        });
    });
    threads.emplace_back([&] {
        refresher("rates-refresh", refresh_us, rates_truth, [&] { rates.rebuild(fresh); });
    });
    std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
    g_stop = true;
    for (auto &t : threads) t.join();
    for (auto [name, t] : {std::pair<const char *, Truth *>{"prices", &prices_truth},
                           {"rates", &rates_truth}})
        fprintf(stderr, "two_windows: window=%s lookups=%ld misses=%ld refreshes=%ld\n", name,
                t->lookups.load(), t->misses.load(), t->refreshes.load());
    return 0;
}
