// tools/kqsvd/report.hpp -- the results of evaluating one method, as a text table or as JSON.
//
// The JSON object (key names are a stable interface; `compare` prints a list of them):
//   {"method": "kqsvd", "rank": 16, "value_rank": 16, "tokens": 512,
//    "layers": [{"layer": 0, "err_k": ..., "err_q": ..., "err_v": ..., "err_qk": ..., "err_vo": ...,
//                "err_softmax": ..., "err_out": ..., "compression": ..., "bits_per_element": ...,
//                "key_ranks": [...], "value_ranks": [...]}, ...],
//    "overall": {"err_k": ..., ..., "compression": ..., "bits_per_element": ...}, "latents": "f32"}
// "rank" / "value_rank" are integers when every head has the same rank, else the mean over heads;
// "epsilon" is present when ranks were chosen by an error budget. "compression" is the compressed
// cache's size over the full cache's (0.25: four times smaller) in elements; "bits_per_element" what the
// latents cost in "latents" format (scales and minimums counted) per element of the full cache.
#pragma once

#include <nlohmann/json.hpp>

#include <array>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

namespace kqsvd::cli {

// The seven relative errors in the order of kqsvd::all_fidelity_metrics, and the compression achieved.
struct FidelityRow {
  std::array<double, 7> errors{};
  double compression = 0.0;
  double bits_per_element = 0.0;
};

struct MethodReport {
  std::string method;                         // "kqsvd", "ksvd", "eigen"
  std::vector<std::vector<long>> key_ranks;   // [layer][kv_head]
  std::vector<std::vector<long>> value_ranks;
  std::string key_description, value_description;  // RankAllocation::describe_keys() / describe_values()
  std::optional<double> epsilon;              // when ranks came from an error budget
  std::string rank_allocation;                // how ranks were spent on a memory budget (fit --budget); or empty
  std::string latent_format;                  // StorageFormat::name() of the latents
  long tokens = 0;                            // evaluation tokens (per head)
  std::vector<FidelityRow> layers;
  FidelityRow overall;
};

// The JSON key of each error: "err_k", "err_q", ..., in all_fidelity_metrics order.
const std::array<std::string, 7>& error_keys();

nlohmann::ordered_json to_json(const MethodReport& report);

// One table, a row per layer then "all" (eval).
void print_layer_table(std::ostream& out, const MethodReport& report);

// One table, a row per method, overall numbers (compare).
void print_method_table(std::ostream& out, const std::vector<MethodReport>& reports);

}  // namespace kqsvd::cli
