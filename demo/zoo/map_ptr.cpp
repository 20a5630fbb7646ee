// Shape: C++, a global object holding a std::map<long, long> behind a std::mutex taken with
// std::unique_lock (unlocked by hand before the return); the object is `this`, a constant the
// compiler may clone the methods for. The lookup returns `const long *`, nullptr when the key
// is not there.
//
//     map_ptr [SECONDS [READER_PAUSE_US [GAP_US [WORK_NS]]]]   probes: Prices::drop_all, Prices::load, Prices::find (--miss-ret 0)
//
// A refresher empties the map and loads it GAP_US (30) µs later, over and over; a reader looks up keys
// the load always brings back, so every miss is one that landed in the empty window.
// Each reader sleeps READER_PAUSE_US (10) µs, then works WORK_NS (0) ns, after each lookup.
// Ground truth on stderr at exit: cache_demo: lookups=N misses=M refreshes=R
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <thread>

struct Prices {
    std::mutex mu;
    std::map<long, long> by_id;

    __attribute__((noinline)) void drop_all() {
        std::unique_lock<std::mutex> lock(mu);
        by_id.clear();
    }
    __attribute__((noinline)) void load(long n) {
        std::unique_lock<std::mutex> lock(mu);
        for (long id = 0; id < n; id++) by_id.emplace(id, 1000 + id);
    }
    __attribute__((noinline)) const long *find(long id) {
        std::unique_lock<std::mutex> lock(mu);
        auto it = by_id.find(id);
        const long *price = it == by_id.end() ? nullptr : &it->second;
        lock.unlock();
        return price;
    }
};

static Prices prices;
constexpr long IDS = 32;
static std::atomic<bool> stop{false};

int main(int argc, char **argv) {
    using namespace std::chrono;
    double secs = argc > 1 ? std::atof(argv[1]) : 2;
    long pause = argc > 2 ? std::atol(argv[2]) : 10;
    long gap = argc > 3 ? std::atol(argv[3]) : 30;
    long work_ns = argc > 4 ? std::atol(argv[4]) : 0;
    // A reader's own work after each lookup, as a request handler has.
    auto work = [work_ns] {
        auto until = steady_clock::now() + nanoseconds(work_ns);
        while (work_ns > 0 && steady_clock::now() < until) {
        }
    };
    prices.load(IDS);
    long lookups = 0, misses = 0, refreshes = 0;
    std::thread reader([&] {
        for (long id = 0; !stop; id = (id + 5) % IDS, lookups++) {
            if (prices.find(id) == nullptr) misses++;
            if (pause > 0) std::this_thread::sleep_for(microseconds(pause));
            work();
        }
    });
    std::thread refresher([&] {
        for (; !stop; refreshes++) {
            prices.drop_all();
            if (gap > 0) std::this_thread::sleep_for(microseconds(gap));
            prices.load(IDS);
            std::this_thread::sleep_for(microseconds(400));
        }
    });
    std::this_thread::sleep_for(duration<double>(secs));
    stop = true;
    reader.join();
    refresher.join();
    std::fprintf(stderr, "cache_demo: lookups=%ld misses=%ld refreshes=%ld\n", lookups, misses,
                 refreshes);
}
