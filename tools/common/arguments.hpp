// tools/common/arguments.hpp -- the command line of one kqsvd subcommand, parsed against its options.
//
//   const Arguments args(argv_tail, {{"--calib", OptionKind::list}, {"--rank", OptionKind::value},
//                                    {"--force", OptionKind::flag}});
//   std::vector<std::string> files = args.required_list("--calib");
//   std::optional<long> rank = args.positive_integer("--rank");
//
// Options are "--name value" or "--name=value"; a list option takes every following word up to the next
// one starting with "--", and may be repeated. Anything else is a UsageError (exit code 2).
#pragma once

#include <map>
#include <optional>
#include <utility>
#include <string>
#include <vector>

#include "errors.hpp"

namespace kqsvd::cli {

enum class OptionKind { flag, value, list };

struct OptionSpec {
  std::string name;  // with the leading "--"
  OptionKind kind;
};

class Arguments {
 public:
  // Parses `words` (the words after the subcommand). "--help" / "-h" anywhere sets help() and stops.
  Arguments(const std::vector<std::string>& words, std::vector<OptionSpec> options);

  bool help() const { return help_; }
  bool flag(const std::string& name) const;
  std::optional<std::string> value(const std::string& name) const;
  std::string required_value(const std::string& name) const;
  std::vector<std::string> list(const std::string& name) const;  // empty when not given
  std::vector<std::string> required_list(const std::string& name) const;

  // A value parsed as an integer >= 1, or as a number in the open interval (0, 1).
  std::optional<long> positive_integer(const std::string& name) const;
  std::optional<double> fraction(const std::string& name) const;
  // A value parsed as an integer in [low, high], or as a number in (low, high] (the whole word, or a
  // UsageError naming the option and the range).
  std::optional<long> integer(const std::string& name, long low, long high) const;
  std::optional<double> number_above(const std::string& name, double low, double high) const;
  // A comma-separated value ("0.25,0.5"), each item non-empty; empty when the option is not given.
  std::vector<std::string> items(const std::string& name) const;
  // "A:B" with 0 <= A < B: a half-open range of story indices.
  std::optional<std::pair<long, long>> range(const std::string& name) const;

  // Exactly one of the two options must be given (e.g. --rank / --eps).
  void require_one_of(const std::string& first, const std::string& second) const;

 private:
  const OptionSpec& spec(const std::string& name) const;

  std::vector<OptionSpec> options_;
  std::map<std::string, std::vector<std::string>> values_;
  bool help_ = false;
};

}  // namespace kqsvd::cli
