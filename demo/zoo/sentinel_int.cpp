// Shape: C++, a global object holding a std::map<int, int> behind a std::mutex taken with
// std::lock_guard; the object is `this`, a constant the compiler may clone the methods for. The
// lookup returns an int, -1 when the key is not there.
//
//     sentinel_int [SECONDS [READER_PAUSE_US [GAP_US [WORK_NS]]]]   probes: Ranks::clear, Ranks::fill, Ranks::rank_of (--miss-ret -1)
//
// A refresher empties the map and fills it GAP_US (30) µs later, over and over; a reader looks up keys
// the fill always brings back, so every miss is one that landed in the empty window.
// Each reader sleeps READER_PAUSE_US (10) µs, then works WORK_NS (0) ns, after each lookup.
// Ground truth on stderr at exit: cache_demo: lookups=N misses=M refreshes=R
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <thread>

class Ranks {
  public:
    __attribute__((noinline)) void clear() {
        std::lock_guard<std::mutex> lock(mu_);
        ranks_.clear();
    }
    __attribute__((noinline)) void fill(int players) {
        std::lock_guard<std::mutex> lock(mu_);
        for (int p = 0; p < players; p++) ranks_[p] = players - p;
    }
    __attribute__((noinline)) int rank_of(int player) {
        std::lock_guard<std::mutex> lock(mu_);
        auto it = ranks_.find(player);
        return it == ranks_.end() ? -1 : it->second;
    }

  private:
    std::mutex mu_;
    std::map<int, int> ranks_;
};

static Ranks ranks;
constexpr int PLAYERS = 24;
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
    ranks.fill(PLAYERS);
    long lookups = 0, misses = 0, refreshes = 0;
    std::thread reader([&] {
        for (int p = 0; !stop; p = (p + 1) % PLAYERS, lookups++) {
            if (ranks.rank_of(p) == -1) misses++;
            if (pause > 0) std::this_thread::sleep_for(microseconds(pause));
            work();
        }
    });
    std::thread refresher([&] {
        for (; !stop; refreshes++) {
            ranks.clear();
            if (gap > 0) std::this_thread::sleep_for(microseconds(gap));
            ranks.fill(PLAYERS);
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
