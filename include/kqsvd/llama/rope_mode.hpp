// kqsvd/llama/rope_mode.hpp -- on which side of the rotary embedding a compressed KV cache works.
//
//   RopeMode::post_rope  -- the paper's setting: projections are calibrated on ROTATED queries and keys;
//                           the cache rotates each key, stores k A, and scores (q B)(k A)^T. Nothing
//                           is reconstructed at attention time.
//   RopeMode::pre_rope   -- Palu / Eigen Attention / xKV: projections are calibrated on UN-rotated
//                           queries and keys; the cache stores latents of the un-rotated key, and at
//                           attention time reconstructs (k A) B^T, rotates it by its position and scores
//                           it with the rotated query.
// The same mode must be used to calibrate (CalibrationObserver) and to run (CompressedKvCache).
//
//   kqsvd::llama::RopeMode mode = kqsvd::llama::parse_rope_mode("pre");   // also "post"
//   std::cout << kqsvd::llama::to_string(mode);                           // "pre"
#pragma once

#include <array>
#include <string>

#include "kqsvd/error.hpp"

namespace kqsvd::llama {

enum class RopeMode { post_rope, pre_rope };

inline constexpr std::array<RopeMode, 2> all_rope_modes = {RopeMode::post_rope, RopeMode::pre_rope};

inline const char* to_string(RopeMode mode) { return mode == RopeMode::post_rope ? "post" : "pre"; }

// Accepts "post", "post_rope", "post-rope" and the same for "pre".
inline RopeMode parse_rope_mode(const std::string& name) {
  if (name == "post" || name == "post_rope" || name == "post-rope") return RopeMode::post_rope;
  if (name == "pre" || name == "pre_rope" || name == "pre-rope") return RopeMode::pre_rope;
  throw InvalidArgument("kqsvd::llama::parse_rope_mode: unknown RoPE mode '" + name + "' (expected 'post' or 'pre')");
}

}  // namespace kqsvd::llama
