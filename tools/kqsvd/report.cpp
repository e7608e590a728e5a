#include "report.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <iomanip>
#include <sstream>

namespace kqsvd::cli {

const std::array<std::string, 7>& error_keys() {
  static const std::array<std::string, 7> keys = {"err_k", "err_q", "err_v", "err_qk", "err_vo", "err_softmax", "err_out"};
  return keys;
}

namespace {

// Relative errors span 1e-7 (full rank) to 1: four decimals, or scientific below a thousandth.
std::string format_error(double value) {
  char text[32];
  if (!std::isfinite(value)) return "inf";
  if (value != 0.0 && value < 1e-3) {
    std::snprintf(text, sizeof text, "%.1e", value);
  } else {
    std::snprintf(text, sizeof text, "%.4f", value);
  }
  return text;
}

std::string format_compression(double ratio) {
  char text[32];
  std::snprintf(text, sizeof text, "%.3f (%.1fx)", ratio, ratio > 0.0 ? 1.0 / ratio : 0.0);
  return text;
}

// An integer when every head agrees, else the mean: the "rank" / "value_rank" JSON values.
nlohmann::ordered_json rank_value(const std::vector<std::vector<long>>& ranks) {
  long first = -1;
  bool uniform = true;
  double sum = 0.0;
  std::size_t count = 0;
  for (const auto& layer : ranks) {
    for (const long rank : layer) {
      if (first < 0) first = rank;
      uniform = uniform && rank == first;
      sum += static_cast<double>(rank);
      ++count;
    }
  }
  if (count == 0) return nullptr;
  if (uniform) return first;
  return sum / static_cast<double>(count);
}

nlohmann::ordered_json row_json(const FidelityRow& row) {
  nlohmann::ordered_json object = nlohmann::ordered_json::object();
  for (std::size_t i = 0; i < row.errors.size(); ++i) object[error_keys()[i]] = row.errors[i];
  object["compression"] = row.compression;
  object["bits_per_element"] = row.bits_per_element;
  return object;
}

int column_width(const std::string& title) { return std::max<int>(10, static_cast<int>(title.size()) + 2); }

void print_header(std::ostream& out, const std::string& first, int first_width) {
  out << std::left << std::setw(first_width) << first << std::right << std::setw(15) << "compression"
      << std::setw(11) << "bits/elem";
  for (const std::string& title : error_keys()) out << std::setw(column_width(title)) << title;
  out << '\n';
}

void print_row(std::ostream& out, const std::string& first, int first_width, const FidelityRow& row) {
  char bits[32];
  std::snprintf(bits, sizeof bits, "%.3g", row.bits_per_element);
  out << std::left << std::setw(first_width) << first << std::right << std::setw(15) << format_compression(row.compression)
      << std::setw(11) << bits;
  for (std::size_t i = 0; i < row.errors.size(); ++i) {
    out << std::setw(column_width(error_keys()[i])) << format_error(row.errors[i]);
  }
  out << '\n';
}

}  // namespace

nlohmann::ordered_json to_json(const MethodReport& report) {
  nlohmann::ordered_json object = nlohmann::ordered_json::object();
  object["method"] = report.method;
  object["rank"] = rank_value(report.key_ranks);
  object["value_rank"] = rank_value(report.value_ranks);
  if (report.epsilon) object["epsilon"] = *report.epsilon;
  if (!report.rank_allocation.empty()) object["rank_allocation"] = report.rank_allocation;
  object["tokens"] = report.tokens;
  nlohmann::ordered_json layers = nlohmann::ordered_json::array();
  for (std::size_t l = 0; l < report.layers.size(); ++l) {
    nlohmann::ordered_json layer = nlohmann::ordered_json::object();
    layer["layer"] = l;
    layer.update(row_json(report.layers[l]));
    layer["key_ranks"] = report.key_ranks[l];
    layer["value_ranks"] = report.value_ranks[l];
    layers.push_back(std::move(layer));
  }
  object["layers"] = std::move(layers);
  object["overall"] = row_json(report.overall);
  object["latents"] = report.latent_format;
  return object;
}

void print_layer_table(std::ostream& out, const MethodReport& report) {
  constexpr int width = 8;
  print_header(out, "layer", width);
  for (std::size_t l = 0; l < report.layers.size(); ++l) print_row(out, std::to_string(l), width, report.layers[l]);
  print_row(out, "all", width, report.overall);
}

void print_method_table(std::ostream& out, const std::vector<MethodReport>& reports) {
  constexpr int width = 8;
  print_header(out, "method", width);
  for (const MethodReport& report : reports) print_row(out, report.method, width, report.overall);
}

}  // namespace kqsvd::cli
