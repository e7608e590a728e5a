// kqsvd/version.hpp -- the library's version, for messages, files and compatibility checks.
//
//   static_assert(kqsvd::version_major == 0, "written for kqsvd 0.x");
//   std::cout << kqsvd::version_string;   // "0.2.0"
#pragma once

namespace kqsvd {

inline constexpr int version_major = 0;
inline constexpr int version_minor = 2;
inline constexpr int version_patch = 0;
inline constexpr const char* version_string = "0.2.0";

}  // namespace kqsvd
