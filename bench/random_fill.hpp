// bench/random_fill.hpp -- fast, reproducible pseudo-random data for large benchmark inputs.
//
// Filling gigabytes with std::mt19937 would dominate the run; a splitmix64 stream per 64 Ki-element
// chunk is fast, parallel and gives the same values on any thread count.
#pragma once

#include <Eigen/Core>

#include <cstdint>

namespace kqsvd_bench {

inline std::uint64_t splitmix64(std::uint64_t& state) {
  std::uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// data[i] = uniform in [-1, 1) * scale, converted to T, for i < count.
template <typename T>
void random_fill(T* data, Eigen::Index count, std::uint64_t seed, float scale = 1.0f) {
  constexpr Eigen::Index chunk = Eigen::Index{1} << 16;
#ifdef _OPENMP
#pragma omp parallel for schedule(static)
#endif
  for (Eigen::Index first = 0; first < count; first += chunk) {
    std::uint64_t state = seed * 0x100000001b3ull + static_cast<std::uint64_t>(first);
    const Eigen::Index last = first + chunk < count ? first + chunk : count;
    for (Eigen::Index i = first; i < last; ++i) {
      const float unit = static_cast<float>(splitmix64(state) >> 40) * (1.0f / 16777216.0f);  // [0, 1)
      data[i] = T((2.0f * unit - 1.0f) * scale);
    }
  }
}

}  // namespace kqsvd_bench
