// kqsvd/core/rope.hpp -- rotary position embeddings (RoPE) in both conventions in use.
//
// Rotary embeddings rotate pairs of coordinates of each query and key by an angle proportional to the
// token's position, pair p turning at frequency theta^(-2p/d). Models disagree on which coordinates form
// a pair:
//   RopeStyle::adjacent_pairs -- (2p, 2p+1), Meta's original code and llama2.c;
//   RopeStyle::rotate_half    -- (p, p + d/2), Hugging Face transformers.
// Projections fitted on un-rotated keys (the pre-RoPE path) reconstruct keys and rotate them here.
//
// RopeMode says which side of the rotation a projection works on:
//   RopeMode::post_rope -- the paper's setting: calibrated on ROTATED queries and keys; the cache stores
//                          latents of rotated keys and scores (q B)(k A)^T directly;
//   RopeMode::pre_rope  -- Palu / Eigen Attention / xKV: calibrated on UN-rotated queries and keys; the
//                          cache stores latents of un-rotated keys and reconstructs (k A) B^T, rotates it
//                          by its position and scores it with the rotated query.
// The same mode must be used to calibrate and to run.
//
//   kqsvd::RotaryEmbedding rope(64, 10000.0, kqsvd::RopeStyle::adjacent_pairs);
//   Eigen::MatrixXf keys = ...;           // tokens x 64, rows at positions 100, 101, ...
//   rope.rotate(keys, 100);               // in place
//   rope.rotate_back(keys, 100);          // undoes it
#pragma once

#include <Eigen/Core>

#include <array>
#include <cmath>
#include <string>

#include "kqsvd/core/detail/validation.hpp"
#include "kqsvd/core/error.hpp"

namespace kqsvd {

enum class RopeStyle { adjacent_pairs, rotate_half };

inline const char* to_string(RopeStyle style) {
  return style == RopeStyle::adjacent_pairs ? "adjacent" : "half";
}

// Accepts "adjacent" (also "adjacent_pairs", "interleaved") and "half" (also "rotate_half", "neox").
inline RopeStyle parse_rope_style(const std::string& name) {
  if (name == "adjacent" || name == "adjacent_pairs" || name == "interleaved") return RopeStyle::adjacent_pairs;
  if (name == "half" || name == "rotate_half" || name == "neox") return RopeStyle::rotate_half;
  throw InvalidArgument("kqsvd::parse_rope_style: unknown RoPE style '" + name +
                        "' (expected 'adjacent' or 'half')");
}

enum class RopeMode { post_rope, pre_rope };

inline constexpr std::array<RopeMode, 2> all_rope_modes = {RopeMode::post_rope, RopeMode::pre_rope};

inline const char* to_string(RopeMode mode) { return mode == RopeMode::post_rope ? "post" : "pre"; }

// Accepts "post", "post_rope", "post-rope" and the same for "pre".
inline RopeMode parse_rope_mode(const std::string& name) {
  if (name == "post" || name == "post_rope" || name == "post-rope") return RopeMode::post_rope;
  if (name == "pre" || name == "pre_rope" || name == "pre-rope") return RopeMode::pre_rope;
  throw InvalidArgument("kqsvd::parse_rope_mode: unknown RoPE mode '" + name + "' (expected 'post' or 'pre')");
}

class RotaryEmbedding {
 public:
  using Index = Eigen::Index;

  explicit RotaryEmbedding(Index head_dim, double theta = 10000.0, RopeStyle style = RopeStyle::adjacent_pairs)
      : head_dim_(head_dim), theta_(theta), style_(style) {
    if (head_dim <= 0 || head_dim % 2 != 0) {
      detail::throw_invalid("kqsvd::RotaryEmbedding", "head_dim",
                            "must be a positive even number, got " + std::to_string(head_dim));
    }
    if (!(theta > 1.0) || !std::isfinite(theta)) {
      detail::throw_invalid("kqsvd::RotaryEmbedding", "theta", "must be finite and > 1, got " + std::to_string(theta));
    }
  }

  Index head_dim() const { return head_dim_; }
  double theta() const { return theta_; }
  RopeStyle style() const { return style_; }

  // Angular frequency of pair p, in radians per position.
  double frequency(Index pair) const {
    return std::pow(theta_, -2.0 * static_cast<double>(pair) / static_cast<double>(head_dim_));
  }

  // Rotates row i of `rows` (a token) by position first_position + i, in place. `rows` may be any
  // writable Eigen expression: a matrix, a block, a Map.
  template <typename Derived>
  void rotate(const Eigen::MatrixBase<Derived>& rows, Index first_position) const {
    apply(rows, first_position, 1.0);
  }

  // The inverse of rotate().
  template <typename Derived>
  void rotate_back(const Eigen::MatrixBase<Derived>& rows, Index first_position) const {
    apply(rows, first_position, -1.0);
  }

 private:
  template <typename Derived>
  void apply(const Eigen::MatrixBase<Derived>& const_rows, Index first_position, double direction) const {
    // Eigen's documented idiom for writable expression arguments (blocks, maps) passed as temporaries.
    auto& rows = const_cast<Eigen::MatrixBase<Derived>&>(const_rows);
    using Scalar = typename Derived::Scalar;
    detail::require_columns("kqsvd::RotaryEmbedding::rotate", "rows", rows.cols(), head_dim_);
    detail::require_finite("kqsvd::RotaryEmbedding::rotate", "rows", rows);
    if (first_position < 0) {
      detail::throw_invalid("kqsvd::RotaryEmbedding::rotate", "first_position",
                            "must be >= 0, got " + std::to_string(first_position));
    }
    const Index pairs = head_dim_ / 2;
    for (Index p = 0; p < pairs; ++p) {
      const Index first = style_ == RopeStyle::adjacent_pairs ? 2 * p : p;
      const Index second = style_ == RopeStyle::adjacent_pairs ? 2 * p + 1 : p + pairs;
      const double omega = frequency(p);
      for (Index i = 0; i < rows.rows(); ++i) {
        // Angles in double: position * frequency reaches 1e5 rad at long context, where float
        // arguments would lose the fractional part that sets the rotation.
        const double angle = direction * static_cast<double>(first_position + i) * omega;
        const auto c = static_cast<Scalar>(std::cos(angle));
        const auto s = static_cast<Scalar>(std::sin(angle));
        const Scalar x0 = rows(i, first);
        const Scalar x1 = rows(i, second);
        rows(i, first) = x0 * c - x1 * s;
        rows(i, second) = x0 * s + x1 * c;
      }
    }
  }

  Index head_dim_;
  double theta_;
  RopeStyle style_;
};

}  // namespace kqsvd
