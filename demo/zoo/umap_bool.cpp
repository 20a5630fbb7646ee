// Shape: C++, a class on the heap holding a std::unordered_map<long, long> behind a std::mutex
// taken with std::lock_guard; the object is `this`. The lookup returns bool and the value
// through an out-parameter; false when the key is not there.
//
//     umap_bool [SECONDS [READER_PAUSE_US [GAP_US [WORK_NS]]]]   probes: Sessions::reset, Sessions::reload, Sessions::get (--miss-ret 0)
//
// A refresher empties the map and reloads it GAP_US (30) µs later, over and over; two readers look up
// keys the reload always brings back, so every miss is one that landed in the empty window.
// Each reader sleeps READER_PAUSE_US (20) µs, then works WORK_NS (0) ns, after each lookup.
// Ground truth on stderr at exit: cache_demo: lookups=N misses=M refreshes=R
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

class Sessions {
  public:
    __attribute__((noinline)) void reset() {
        std::lock_guard<std::mutex> lock(mu_);
        map_.clear();
    }
    __attribute__((noinline)) void reload(long keys) {
        std::lock_guard<std::mutex> lock(mu_);
        for (long k = 0; k < keys; k++) map_[k] = k * k;
    }
    __attribute__((noinline)) bool get(long key, long &out) {
        std::lock_guard<std::mutex> lock(mu_);
        auto it = map_.find(key);
        if (it == map_.end()) return false;
        out = it->second;
        return true;
    }

  private:
    std::mutex mu_;
    std::unordered_map<long, long> map_;
};

constexpr long KEYS = 40;
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
    auto *sessions = new Sessions;
    sessions->reload(KEYS);
    long refreshes = 0;
    std::vector<std::thread> threads;
    for (int r = 0; r < 2; r++)
        threads.emplace_back([=] {
            long value;
            for (long k = r; !stop; k = (k + 1) % KEYS, lookups++) {
                if (!sessions->get(k, value)) misses++;
                if (pause > 0) std::this_thread::sleep_for(microseconds(pause));
                work();
            }
        });
    threads.emplace_back([&] {
        for (; !stop; refreshes++) {
            sessions->reset();
            if (gap > 0) std::this_thread::sleep_for(microseconds(gap));
            sessions->reload(KEYS);
            std::this_thread::sleep_for(microseconds(500));
        }
    });
    std::this_thread::sleep_for(duration<double>(secs));
    stop = true;
    for (auto &t : threads) t.join();
    std::fprintf(stderr, "cache_demo: lookups=%ld misses=%ld refreshes=%ld\n", lookups.load(),
                 misses.load(), refreshes);
}
