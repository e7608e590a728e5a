// kqsvd/io/detail/number_text.hpp -- numbers as the file formats' metadata writes them: locale-free,
// whole-string parsing and the shortest text that reads back as the same value.
#pragma once

#include <cctype>
#include <cmath>
#include <cstdint>
#include <locale>
#include <optional>
#include <sstream>
#include <string>

namespace kqsvd::detail {

// The whole string as a finite double, or nullopt. Always with a '.' decimal point, whatever the
// program's locale: metadata is written and read on different machines.
inline std::optional<double> parse_number(const std::string& text) {
  if (text.empty() || std::isspace(static_cast<unsigned char>(text.front())) != 0) return std::nullopt;
  std::istringstream in(text);
  in.imbue(std::locale::classic());
  double value = 0.0;
  in >> value;
  if (in.fail() || !in.eof() || !std::isfinite(value)) return std::nullopt;
  return value;
}

// Shortest text that reads back as the same double ("10000", "500000", "0.05").
inline std::string format_number(double value) {
  if (std::isfinite(value) && value == std::floor(value) && std::fabs(value) < 1e15) {
    return std::to_string(static_cast<std::int64_t>(value));
  }
  std::string text;
  for (int precision = 1; precision <= 17; ++precision) {
    std::ostringstream out;
    out.imbue(std::locale::classic());
    out.precision(precision);
    out << value;
    text = out.str();
    if (parse_number(text) == value) break;
  }
  return text;
}

// The whole string as a non-negative integer, or nullopt.
inline std::optional<std::int64_t> parse_count(const std::string& text) {
  if (text.empty() || text.size() > 18) return std::nullopt;
  std::int64_t value = 0;
  for (const char c : text) {
    if (c < '0' || c > '9') return std::nullopt;
    value = value * 10 + (c - '0');
  }
  return value;
}

}  // namespace kqsvd::detail
