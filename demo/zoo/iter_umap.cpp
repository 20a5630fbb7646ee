// Shape: C++, a class on the heap holding a std::unordered_map<long, long> behind a std::mutex
// taken with std::unique_lock; the object is `this`. The lookup returns the map's const_iterator
// (a node pointer): end(), a null node, when the key is not there.
//
//     iter_umap [SECONDS [READER_PAUSE_US [GAP_US [WORK_NS]]]]   probes: Index::clear, Index::load, Index::find (--miss-ret 0)
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

class Index {
  public:
    using const_iterator = std::unordered_map<long, long>::const_iterator;
    __attribute__((noinline)) void clear() {
        std::unique_lock<std::mutex> lock(mu_);
        map_.clear();
    }
    __attribute__((noinline)) void load(long keys) {
        std::unique_lock<std::mutex> lock(mu_);
        for (long k = 0; k < keys; k++) map_[k] = k * k;
    }
    __attribute__((noinline)) const_iterator find(long key) const {
        std::unique_lock<std::mutex> lock(mu_);
        return map_.find(key);
    }
    const_iterator end() const { return map_.end(); }

  private:
    mutable std::mutex mu_;
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
    auto *index = new Index;
    index->load(KEYS);
    long refreshes = 0;
    std::vector<std::thread> threads;
    for (int r = 0; r < 2; r++)
        threads.emplace_back([=] {
            for (long k = r; !stop; k = (k + 1) % KEYS, lookups++) {
                if (index->find(k) == index->end()) misses++;
                if (pause > 0) std::this_thread::sleep_for(microseconds(pause));
                work();
            }
        });
    threads.emplace_back([&] {
        for (; !stop; refreshes++) {
            index->clear();
            if (gap > 0) std::this_thread::sleep_for(microseconds(gap));
            index->load(KEYS);
            std::this_thread::sleep_for(microseconds(500));
        }
    });
    std::this_thread::sleep_for(duration<double>(secs));
    stop = true;
    for (auto &t : threads) t.join();
    std::fprintf(stderr, "cache_demo: lookups=%ld misses=%ld refreshes=%ld\n", lookups.load(),
                 misses.load(), refreshes);
}
