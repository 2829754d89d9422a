// Runs the bodies of csrc/kernels/kron_vector_block.h on a team of T threads with the CUDA team's rules (index i
// owned by worker i mod T, sync() a barrier, all_reduce every worker's value combined) and compares each result
// with a one-worker run of the same inputs. Built with -fsanitize=thread by test_ops_kron.py, it checks on a CPU
// what the CUDA kernels rely on: every cross-worker read is ordered by a barrier, whatever the team size.
// Usage: kron_vector_team_check SEED; exit status 0 when every team agrees with one worker.
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "kernels/kron_vector_block.h"

namespace {

constexpr int kSlotBytes = 64;

struct ThreadTeam {
  int worker, size;
  std::barrier<>* barrier;
  unsigned char* slots;  // one per worker, for all_reduce

  template <typename F>
  void for_range(int lo, int hi, const F& f) const {
    for (int i = lo + (worker - lo % size + size) % size; i < hi; i += size) f(i);
  }
  void sync() const { barrier->arrive_and_wait(); }
  template <typename T, typename Op>
  T all_reduce(const T& value, const Op& op) const {
    static_assert(sizeof(T) <= kSlotBytes);
    std::memcpy(slots + worker * kSlotBytes, &value, sizeof(T));
    sync();
    T total;
    std::memcpy(&total, slots, sizeof(T));
    for (int w = 1; w < size; ++w) {
      T other;
      std::memcpy(&other, slots + w * kSlotBytes, sizeof(T));
      total = op(total, other);
    }
    sync();
    return total;
  }
};

// One team works the blocks in turn, sharing one scratch (as a CUDA block would if it looped over blocks).
template <typename Body>
void run(const Body& body, int blocks, int scratch_floats, int workers) {
  std::vector<float> scratch(scratch_floats);
  std::vector<unsigned char> slots(kSlotBytes * workers);
  std::barrier<> barrier(workers);
  std::vector<std::thread> threads;
  for (int w = 0; w < workers; ++w) {
    threads.emplace_back([&, w] {
      const ThreadTeam team{w, workers, &barrier, slots.data()};
      for (int block = 0; block < blocks; ++block) {
        body(team, block, scratch.data());
        team.sync();  // the next block overwrites the scratch
      }
    });
  }
  for (std::thread& t : threads) t.join();
}

double max_difference(const std::vector<float>& x, const std::vector<float>& y) {
  double worst = 0.0;
  for (size_t i = 0; i < x.size(); ++i) worst = std::max(worst, std::fabs(double(x[i]) - double(y[i])));
  return worst;
}

}  // namespace

int main(int argc, char** argv) {
  using fastoptim::kron_vector::TriangularVectorPrecondition;
  using fastoptim::kron_vector::TriangularVectorUpdate;
  std::mt19937 gen(argc > 1 ? std::strtoul(argv[1], nullptr, 10) : 0);
  std::normal_distribution<float> normal;
  std::uniform_real_distribution<float> diagonal(0.5f, 1.5f);
  bool ok = true;
  for (int b : {1, 7, 33, 130}) {
    for (int workers : {2, 3, 32}) {
      const int blocks = 3;
      std::vector<float> g(blocks * b), v(blocks * b), damping(blocks, 1e-3f), q(blocks * b * b, 0.0f);
      for (float& x : g) x = normal(gen);
      for (float& x : v) x = normal(gen);
      for (int k = 0; k < blocks; ++k) {
        for (int i = 0; i < b; ++i) {
          for (int j = i; j < b; ++j) q[(k * b + i) * b + j] = i == j ? diagonal(gen) : 0.3f * normal(gen) / std::sqrt(b);
        }
      }
      std::vector<float> out_one(blocks * b), out_team(blocks * b), q_one = q, q_team = q;
      run(TriangularVectorPrecondition{q.data(), g.data(), out_one.data(), b}, blocks, 2 * b, 1);
      run(TriangularVectorPrecondition{q.data(), g.data(), out_team.data(), b}, blocks, 2 * b, workers);
      run(TriangularVectorUpdate{q_one.data(), g.data(), v.data(), damping.data(), 0.2f, b}, blocks, 5 * b, 1);
      run(TriangularVectorUpdate{q_team.data(), g.data(), v.data(), damping.data(), 0.2f, b}, blocks, 5 * b, workers);
      // the team's sums are combined in another order: float rounding apart, the results are the same
      const double precondition = max_difference(out_one, out_team), update = max_difference(q_one, q_team);
      const double change = max_difference(q_one, q);
      std::printf("b=%d workers=%d: precondition differs by %.2e, update by %.2e (the update moves Q by %.2e)\n", b,
                  workers, precondition, update, change);
      ok = ok && precondition <= 1e-6 && update <= 1e-6 && change > 1e-3;
    }
  }
  return ok ? 0 : 1;
}
