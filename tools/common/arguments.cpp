#include "arguments.hpp"

#include <algorithm>
#include <cmath>
#include <exception>
#include <sstream>

namespace kqsvd::cli {

namespace {

bool is_option(const std::string& word) { return word.size() > 2 && word.compare(0, 2, "--") == 0; }

}  // namespace

Arguments::Arguments(const std::vector<std::string>& words, std::vector<OptionSpec> options)
    : options_(std::move(options)) {
  for (std::size_t i = 0; i < words.size(); ++i) {
    std::string word = words[i];
    if (word == "--help" || word == "-h") {
      help_ = true;
      return;
    }
    if (!is_option(word)) throw UsageError("unexpected argument '" + word + "'");
    std::optional<std::string> inline_value;
    const std::size_t equals = word.find('=');
    if (equals != std::string::npos) {
      inline_value = word.substr(equals + 1);
      word.resize(equals);
    }
    const OptionSpec& option = spec(word);
    std::vector<std::string>& values = values_[word];
    switch (option.kind) {
      case OptionKind::flag:
        if (inline_value) throw UsageError(word + " takes no value");
        values.emplace_back();
        break;
      case OptionKind::value:
        if (!values.empty()) throw UsageError(word + " is given more than once");
        if (inline_value) {
          values.push_back(*inline_value);
        } else {
          if (i + 1 >= words.size() || is_option(words[i + 1])) throw UsageError(word + " needs a value");
          values.push_back(words[++i]);
        }
        break;
      case OptionKind::list: {
        const std::size_t before = values.size();
        if (inline_value) values.push_back(*inline_value);
        while (i + 1 < words.size() && !is_option(words[i + 1]) && words[i + 1] != "-h") values.push_back(words[++i]);
        if (values.size() == before) throw UsageError(word + " needs at least one file");
        break;
      }
    }
  }
}

const OptionSpec& Arguments::spec(const std::string& name) const {
  const auto found =
      std::find_if(options_.begin(), options_.end(), [&](const OptionSpec& option) { return option.name == name; });
  if (found == options_.end()) throw UsageError("unknown option " + name);
  return *found;
}

bool Arguments::flag(const std::string& name) const { return values_.count(name) != 0; }

std::optional<std::string> Arguments::value(const std::string& name) const {
  const auto found = values_.find(name);
  if (found == values_.end()) return std::nullopt;
  return found->second.front();
}

std::string Arguments::required_value(const std::string& name) const {
  const auto found = value(name);
  if (!found) throw UsageError(name + " is required");
  return *found;
}

std::vector<std::string> Arguments::list(const std::string& name) const {
  const auto found = values_.find(name);
  return found == values_.end() ? std::vector<std::string>{} : found->second;
}

std::vector<std::string> Arguments::required_list(const std::string& name) const {
  std::vector<std::string> files = list(name);
  if (files.empty()) throw UsageError(name + " is required");
  return files;
}

std::optional<long> Arguments::positive_integer(const std::string& name) const {
  const auto text = value(name);
  if (!text) return std::nullopt;
  const bool digits = !text->empty() && text->size() <= 9 &&
                      std::all_of(text->begin(), text->end(), [](char c) { return c >= '0' && c <= '9'; });
  if (!digits || std::stol(*text) < 1) throw UsageError(name + " must be a positive integer, got '" + *text + "'");
  return std::stol(*text);
}

std::optional<double> Arguments::fraction(const std::string& name) const {
  const auto text = value(name);
  if (!text) return std::nullopt;
  double parsed = 0.0;
  std::size_t used = 0;
  try {
    parsed = std::stod(*text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != text->size() || !(parsed > 0.0 && parsed < 1.0)) {
    throw UsageError(name + " must be a number strictly between 0 and 1, got '" + *text + "'");
  }
  return parsed;
}

namespace {

// The whole of `text` as a decimal integer of at most 12 digits (an optional leading '-'), or nothing.
std::optional<long> whole_integer(const std::string& text) {
  const std::size_t start = !text.empty() && text.front() == '-' ? 1 : 0;
  if (text.size() == start || text.size() - start > 12 ||
      !std::all_of(text.begin() + static_cast<long>(start), text.end(), [](char c) { return c >= '0' && c <= '9'; })) {
    return std::nullopt;
  }
  return std::stol(text);
}

// The whole of `text` as a finite decimal number, or nothing.
std::optional<double> whole_number(const std::string& text) {
  double parsed = 0.0;
  std::size_t used = 0;
  try {
    parsed = std::stod(text, &used);
  } catch (const std::exception&) {
    return std::nullopt;
  }
  if (used != text.size() || !std::isfinite(parsed)) return std::nullopt;
  return parsed;
}

}  // namespace

std::optional<long> Arguments::integer(const std::string& name, long low, long high) const {
  const auto text = value(name);
  if (!text) return std::nullopt;
  const auto parsed = whole_integer(*text);
  if (!parsed || *parsed < low || *parsed > high) {
    throw UsageError(name + " must be an integer in [" + std::to_string(low) + ", " + std::to_string(high) + "], got '" +
                     *text + "'");
  }
  return parsed;
}

std::optional<double> Arguments::number_above(const std::string& name, double low, double high) const {
  const auto text = value(name);
  if (!text) return std::nullopt;
  const auto parsed = whole_number(*text);
  if (!parsed || !(*parsed > low && *parsed <= high)) {
    std::ostringstream range;
    range << "(" << low << ", " << high << "]";
    throw UsageError(name + " must be a number in " + range.str() + ", got '" + *text + "'");
  }
  return parsed;
}

std::vector<std::string> Arguments::items(const std::string& name) const {
  const auto text = value(name);
  if (!text) return {};
  std::vector<std::string> result;
  std::istringstream in(*text);
  for (std::string item; std::getline(in, item, ',');) {
    if (item.empty()) throw UsageError(name + " has an empty item in '" + *text + "'");
    result.push_back(item);
  }
  if (result.empty() || text->back() == ',') throw UsageError(name + " has an empty item in '" + *text + "'");
  return result;
}

std::optional<std::pair<long, long>> Arguments::range(const std::string& name) const {
  const auto text = value(name);
  if (!text) return std::nullopt;
  const std::size_t colon = text->find(':');
  const auto first = colon == std::string::npos ? std::nullopt : whole_integer(text->substr(0, colon));
  const auto last = colon == std::string::npos ? std::nullopt : whole_integer(text->substr(colon + 1));
  if (!first || !last || *first < 0 || *last <= *first) {
    throw UsageError(name + " must be A:B with 0 <= A < B, got '" + *text + "'");
  }
  return std::make_pair(*first, *last);
}

void Arguments::require_one_of(const std::string& first, const std::string& second) const {
  const bool has_first = values_.count(first) != 0;
  const bool has_second = values_.count(second) != 0;
  if (has_first == has_second) throw UsageError("give exactly one of " + first + " and " + second);
}

}  // namespace kqsvd::cli
