// kqsvd/solvers/method.hpp -- the compression methods, by name.
//
//   Method::kq_svd          KQ-SVD (Lesens et al., 2026): optimal rank-r approximation of Q K^T
//                           (keys) or V W_O^T (values), in closed form from two Grams.
//   Method::k_svd           K-SVD: keep the top-r principal directions of the keys (V-SVD for values).
//   Method::eigen_attention Eigen Attention (Saxena et al., 2024): principal directions of keys and
//                           queries stacked, with balance factor a; values as V-SVD.
//
//   kqsvd::Method m = kqsvd::parse_method("kqsvd");   // also "ksvd", "eigen"
//   std::cout << kqsvd::to_string(m);                  // "kqsvd"
#pragma once

#include <array>
#include <string>

#include "kqsvd/core/error.hpp"

namespace kqsvd {

enum class Method { kq_svd, k_svd, eigen_attention };

inline constexpr std::array<Method, 3> all_methods = {Method::kq_svd, Method::k_svd, Method::eigen_attention};

inline const char* to_string(Method method) {
  switch (method) {
    case Method::kq_svd: return "kqsvd";
    case Method::k_svd: return "ksvd";
    case Method::eigen_attention: return "eigen";
  }
  return "unknown";
}

// "KQ-SVD", "K-SVD", "Eigen Attention": the names the papers use, for tables and plots.
inline std::string display_name(Method method) {
  switch (method) {
    case Method::kq_svd: return "KQ-SVD";
    case Method::k_svd: return "K-SVD";
    case Method::eigen_attention: return "Eigen Attention";
  }
  return to_string(method);
}

// Accepts the names to_string() gives, and a few spellings users type: "kq-svd", "k-svd", "eigen-attention".
inline Method parse_method(const std::string& name) {
  if (name == "kqsvd" || name == "kq-svd" || name == "kq_svd") return Method::kq_svd;
  if (name == "ksvd" || name == "k-svd" || name == "k_svd") return Method::k_svd;
  if (name == "eigen" || name == "eigen-attention" || name == "eigen_attention") return Method::eigen_attention;
  throw InvalidArgument("kqsvd::parse_method: unknown method '" + name + "' (expected kqsvd, ksvd or eigen)");
}

}  // namespace kqsvd
