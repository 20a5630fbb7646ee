// Shape: C++, a class on the heap holding a std::unordered_map<long, long> behind a
// std::shared_mutex: readers take std::shared_lock, the writer std::unique_lock; the object is
// `this`. The lookup returns std::optional<long>, std::nullopt when the key is not there (the
// optional comes back in rax:rdx, its "engaged" flag in dl).
//
//     shared_optional [SECONDS [READER_PAUSE_US [GAP_US [WORK_NS]]]]   probes: Config::wipe, Config::refresh, Config::get (--miss-ret 0)
//
// A refresher empties the map and refreshes it GAP_US (30) µs later, over and over; two readers look up
// keys the refresh always brings back, so every miss is one that landed in the empty window.
// Each reader sleeps READER_PAUSE_US (20) µs, then works WORK_NS (0) ns, after each lookup.
// Ground truth on stderr at exit: cache_demo: lookups=N misses=M refreshes=R
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <thread>
#include <unordered_map>
#include <vector>

class Config {
  public:
    __attribute__((noinline)) void wipe() {
        std::unique_lock<std::shared_mutex> lock(mu_);
        values_.clear();
    }
    __attribute__((noinline)) void refresh(long keys) {
        std::unique_lock<std::shared_mutex> lock(mu_);
        for (long k = 0; k < keys; k++) values_.insert_or_assign(k, -k);
    }
    __attribute__((noinline)) std::optional<long> get(long key) const {
        std::shared_lock<std::shared_mutex> lock(mu_);
        if (auto it = values_.find(key); it != values_.end()) return it->second;
        return std::nullopt;
    }

  private:
    mutable std::shared_mutex mu_;
    std::unordered_map<long, long> values_;
};

constexpr long KEYS = 50;
std::atomic<bool> stop{false};
std::atomic<long> lookups{0}, misses{0};

int main(int argc, char **argv) {
    using namespace std::chrono;
    double secs = argc > 1 ? std::atof(argv[1]) : 2;
    long pause = argc > 2 ? std::atol(argv[2]) : 20;
    long gap = argc > 3 ? std::atol(argv[3]) : 30;
    long work_ns = argc > 4 ? std::atol(argv[4]) : 0;
    // A reader's own work after each lookup, as a request handler has.
    auto work = [work_ns] {
        auto until = steady_clock::now() + nanoseconds(work_ns);
        while (work_ns > 0 && steady_clock::now() < until) {
        }
    };
    auto config = std::make_unique<Config>();
    config->refresh(KEYS);
    long refreshes = 0;
    std::vector<std::thread> threads;
    for (int r = 0; r < 2; r++)
        threads.emplace_back([&config, r, pause, work] {
            for (long k = r; !stop; k = (k + 3) % KEYS, lookups++) {
                if (!config->get(k)) misses++;
                if (pause > 0) std::this_thread::sleep_for(microseconds(pause));
                work();
            }
        });
    threads.emplace_back([&] {
        for (; !stop; refreshes++) {
            config->wipe();
            if (gap > 0) std::this_thread::sleep_for(microseconds(gap));
            config->refresh(KEYS);
            std::this_thread::sleep_for(microseconds(500));
        }
    });
    std::this_thread::sleep_for(duration<double>(secs));
    stop = true;
    for (auto &t : threads) t.join();
    std::fprintf(stderr, "cache_demo: lookups=%ld misses=%ld refreshes=%ld\n", lookups.load(),
                 misses.load(), refreshes);
}
