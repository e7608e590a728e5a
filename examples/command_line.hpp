// examples/command_line.hpp -- what the example programs share on the command line: whole-string
// integer, number and A:B range parsing, the exit codes, and main()'s handling of usage, --help and errors.
//
//   int main(int argc, char** argv) {
//     return example::run_command("generate", parse_arguments(argc, argv), print_usage,
//                                 [](const Arguments& arguments) { return generate(arguments); });
//   }
#pragma once

#include <kqsvd/error.hpp>

#include <cstddef>
#include <exception>
#include <iostream>
#include <optional>
#include <ostream>
#include <string>

namespace example {

// The exit codes of the kqsvd tool: 0 success, 1 bad data or a failed computation, 2 a bad command line.
inline constexpr int exit_data_error = 1;
inline constexpr int exit_usage = 2;

namespace detail {

// convert(text, &parsed) on the whole of `text`, or nothing if it throws or leaves characters over.
template <typename Value, typename Convert>
std::optional<Value> parse_whole(const std::string& text, Convert&& convert) {
  std::size_t parsed = 0;
  Value value{};
  try {
    value = convert(text, &parsed);
  } catch (const std::exception&) {
    return std::nullopt;
  }
  if (parsed != text.size()) return std::nullopt;
  return value;
}

}  // namespace detail

// The whole of `text` as a decimal integer, or nothing ("12x", "", out of range).
inline std::optional<long> parse_integer(const std::string& text) {
  return detail::parse_whole<long>(text, [](const std::string& t, std::size_t* parsed) { return std::stol(t, parsed); });
}

// The whole of `text` as a decimal number, or nothing.
inline std::optional<double> parse_number(const std::string& text) {
  return detail::parse_whole<double>(text, [](const std::string& t, std::size_t* parsed) { return std::stod(t, parsed); });
}

// Stories [first, last) of a text.
struct StoryRange {
  std::size_t first = 0, last = 0;
};

// "A:B" with 0 <= A < B, or nothing.
inline std::optional<StoryRange> parse_story_range(const std::string& text) {
  const std::size_t colon = text.find(':');
  if (colon == std::string::npos) return std::nullopt;
  const std::optional<long> first = parse_integer(text.substr(0, colon));
  const std::optional<long> last = parse_integer(text.substr(colon + 1));
  if (!first || !last || *first < 0 || *last <= *first) return std::nullopt;
  return StoryRange{static_cast<std::size_t>(*first), static_cast<std::size_t>(*last)};
}

// main() of an example: an unusable command line (arguments empty, the reason already printed) prints
// the usage to stderr and exits 2; --help prints it to stdout; otherwise runs `run`, mapping kqsvd's
// errors to exit codes with the program's name in front: InvalidArgument (a bad option value met
// late, e.g. a rank above head_dim) 2, any other kqsvd::Error 1.
template <typename Arguments, typename Usage, typename Run>
int run_command(const char* program, const std::optional<Arguments>& arguments, Usage&& print_usage, Run&& run) {
  if (!arguments) {
    print_usage(std::cerr);
    return exit_usage;
  }
  if (arguments->help) {
    print_usage(std::cout);
    return 0;
  }
  try {
    return run(*arguments);
  } catch (const kqsvd::InvalidArgument& e) {
    std::cerr << program << ": " << e.what() << '\n';
    return exit_usage;
  } catch (const kqsvd::Error& e) {
    std::cerr << program << ": " << e.what() << '\n';
    return exit_data_error;
  }
}

}  // namespace example
