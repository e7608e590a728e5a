// kqsvd analyze: how low-rank is this model's attention? Spectra of K, Q, V, Q K^T and V W^T per layer
// and KV head, and the rank each method needs to reach a given error -- all from the d x d Grams of the
// data, so it runs in one streaming pass.
#include <kqsvd/calibration/output_projection.hpp>
#include <kqsvd/solvers/fit.hpp>
#include <kqsvd/solvers/spectrum.hpp>

#include <Eigen/Eigenvalues>

#include <cstdio>
#include <iomanip>
#include <iostream>

#include "arguments.hpp"
#include "commands.hpp"
#include "data_set.hpp"
#include "errors.hpp"

namespace kqsvd::cli {

namespace {

constexpr const char* analyze_usage = R"(usage: kqsvd analyze --data FILES... [--eps E] [--weights FILE] [--json]

How low-rank is this model's attention? For every layer and KV head, the singular-value spectra of
K, Q (the group's query heads stacked), V, Q K^T and V W^T (W: the group's slices of o_proj), each
summarised by its effective rank at 90 % and 99 % energy (the smallest r keeping that fraction of
the sum of squared singular values) and its stable rank ||X||_F^2 / ||X||_2^2; and the rank each
method needs for a relative error <= E in Q K^T (keys) and in V W^T (values). Everything is
measured on the --data files themselves (in-sample): fit on them and evaluated on them.

  --data FILES     activation files of one model (docs/activations.md)
  --eps E          the error target, 0 < E < 1 (default 0.1)
  --weights FILE   output-projection weights (default: those in the files); without any, the V W^T
                   columns are left out
  --json           one JSON object instead of the table

Exit codes: 0 success, 1 unusable data or files, 2 bad command line.
)";

struct SpectrumSummary {
  long energy_rank_90 = 0;
  long energy_rank_99 = 0;
  double stable_rank = 0.0;
};

// The smallest r whose first r squared singular values hold `fraction` of the total (0 for a zero spectrum).
long energy_rank(const Eigen::VectorXd& singular_values, double fraction) {
  const double total = singular_values.squaredNorm();
  if (total == 0.0) return 0;
  double kept = 0.0;
  for (Eigen::Index r = 0; r < singular_values.size(); ++r) {
    kept += singular_values(r) * singular_values(r);
    if (kept >= fraction * total * (1.0 - 1e-12)) return static_cast<long>(r + 1);
  }
  return static_cast<long>(singular_values.size());
}

SpectrumSummary summarize(const Eigen::VectorXd& singular_values) {
  SpectrumSummary summary;
  summary.energy_rank_90 = energy_rank(singular_values, 0.90);
  summary.energy_rank_99 = energy_rank(singular_values, 0.99);
  const double largest = singular_values.size() > 0 ? singular_values.maxCoeff() : 0.0;
  summary.stable_rank = largest > 0.0 ? singular_values.squaredNorm() / (largest * largest) : 0.0;
  return summary;
}

// Singular values of X from its Gram X^T X, descending.
Eigen::VectorXd gram_singular_values(const Eigen::MatrixXd& gram) {
  Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> solver(gram, Eigen::EigenvaluesOnly);
  return solver.eigenvalues().reverse().cwiseMax(0.0).cwiseSqrt();
}

// || Y X^T - Y B A^T X^T ||_F / || Y X^T ||_F from the Grams G_X = X^T X and G_Y = Y^T Y:
// with M = I - B A^T, the numerator squared is trace(M^T G_Y M G_X).
double gram_relative_error(const LowRankProjection<double>& projection, Eigen::Index rank, const Eigen::MatrixXd& cached_gram,
                           const Eigen::MatrixXd& other_gram) {
  const Eigen::Index d = cached_gram.rows();
  const Eigen::MatrixXd residual = Eigen::MatrixXd::Identity(d, d) -
                                   projection.decoder().leftCols(rank) * projection.encoder().leftCols(rank).transpose();
  const double reference = (other_gram * cached_gram).trace();
  if (reference <= 0.0) return 0.0;
  const double error = (residual.transpose() * other_gram * residual * cached_gram).trace();
  return std::sqrt(std::max(0.0, error) / reference);
}

// The smallest rank at which the projection's error (gram_relative_error) is <= epsilon.
long rank_for_error(const LowRankProjection<double>& projection, const Eigen::MatrixXd& cached_gram,
                    const Eigen::MatrixXd& other_gram, double epsilon) {
  for (Eigen::Index r = 1; r < projection.rank(); ++r) {
    if (gram_relative_error(projection, r, cached_gram, other_gram) <= epsilon) return static_cast<long>(r);
  }
  return static_cast<long>(projection.rank());
}

struct HeadAnalysis {
  SpectrumSummary keys, queries, values, scores;
  std::optional<SpectrumSummary> value_output;
  std::array<long, 3> score_ranks{};                  // per method, in all_methods order
  std::optional<std::array<long, 3>> value_output_ranks;
};

HeadAnalysis analyze_head(const Calibration& calibration, const std::vector<WeightMatrix>& weights, Eigen::Index layer,
                          Eigen::Index kv_head, double epsilon) {
  const ModelShape& shape = calibration.layout.shape;
  const ModelCalibration& statistics = calibration.statistics;
  const GramAccumulator key_gram = statistics.keys(layer, kv_head);
  const GramAccumulator query_gram = statistics.queries(layer, kv_head);
  const Eigen::MatrixXd keys = key_gram.mean_gram();
  const Eigen::MatrixXd queries = query_gram.mean_gram();
  const Eigen::MatrixXd values = statistics.values(layer, kv_head).mean_gram();
  const RankSelection full = RankSelection::fixed(shape.head_dim);

  HeadAnalysis analysis;
  analysis.keys = summarize(gram_singular_values(keys));
  analysis.queries = summarize(gram_singular_values(queries));
  analysis.values = summarize(gram_singular_values(values));
  for (std::size_t m = 0; m < all_methods.size(); ++m) {
    const auto projection = fit_projection<double>(all_methods[m], key_gram, query_gram, full);
    if (all_methods[m] == Method::kq_svd) analysis.scores = summarize(projection.singular_values());
    analysis.score_ranks[m] = rank_for_error(projection, keys, queries, epsilon);
  }
  if (!weights.empty()) {
    const Eigen::MatrixXd output_gram = output_projection_gram(weights[static_cast<std::size_t>(layer)], shape.head_dim,
                                                               shape.first_query_head_of(kv_head), shape.group_size());
    analysis.value_output_ranks.emplace();
    for (std::size_t m = 0; m < all_methods.size(); ++m) {
      const auto projection =
          fit_value_projection<double>(all_methods[m], statistics.values(layer, kv_head), output_gram, full);
      if (all_methods[m] == Method::kq_svd) analysis.value_output = summarize(projection.singular_values());
      (*analysis.value_output_ranks)[m] = rank_for_error(projection, values, output_gram, epsilon);
    }
  }
  return analysis;
}

nlohmann::ordered_json summary_json(const std::optional<SpectrumSummary>& summary) {
  if (!summary) return nullptr;
  return {{"energy_rank_90", summary->energy_rank_90},
          {"energy_rank_99", summary->energy_rank_99},
          {"stable_rank", summary->stable_rank}};
}

nlohmann::ordered_json ranks_json(const std::optional<std::array<long, 3>>& ranks) {
  if (!ranks) return nullptr;
  nlohmann::ordered_json object = nlohmann::ordered_json::object();
  for (std::size_t m = 0; m < all_methods.size(); ++m) object[to_string(all_methods[m])] = (*ranks)[m];
  return object;
}

// Table cells, 19 characters each: a spectrum's "r90 r99 stable", or a rank per method.
constexpr int cell_width = 19;

std::string summary_cells(const std::optional<SpectrumSummary>& summary) {
  if (!summary) return "    -     -      - ";
  char text[64];
  std::snprintf(text, sizeof text, "%5ld %5ld %6.2f ", summary->energy_rank_90, summary->energy_rank_99,
                summary->stable_rank);
  return text;
}

std::string rank_cells(const std::optional<std::array<long, 3>>& ranks) {
  if (!ranks) return "    -     -     -  ";
  char text[64];
  std::snprintf(text, sizeof text, "%5ld %5ld %5ld  ", (*ranks)[0], (*ranks)[1], (*ranks)[2]);
  return text;
}

std::string centered(const std::string& text) {
  const std::size_t left = (cell_width - text.size()) / 2;
  return std::string(left, ' ') + text + std::string(cell_width - text.size() - left, ' ');
}

}  // namespace

int analyze_command(const std::vector<std::string>& words) {
  const Arguments args(words, {{"--data", OptionKind::list},
                               {"--eps", OptionKind::value},
                               {"--weights", OptionKind::value},
                               {"--json", OptionKind::flag}});
  if (args.help()) {
    std::cout << analyze_usage;
    return exit_success;
  }
  const std::vector<std::string> paths = args.required_list("--data");
  const double epsilon = args.fraction("--eps").value_or(0.1);

  const Calibration calibration = calibrate_files(paths);
  const ModelShape& shape = calibration.layout.shape;
  const std::vector<WeightMatrix> weights =
      choose_output_weights(args.value("--weights"), {calibration.output_weights}, shape);

  std::vector<std::vector<HeadAnalysis>> heads(static_cast<std::size_t>(shape.layers));
  for (Eigen::Index l = 0; l < shape.layers; ++l) {
    for (Eigen::Index h = 0; h < shape.kv_heads; ++h) {
      heads[static_cast<std::size_t>(l)].push_back(analyze_head(calibration, weights, l, h, epsilon));
    }
  }

  if (args.flag("--json")) {
    nlohmann::ordered_json report = nlohmann::ordered_json::object();
    report["model"] = calibration.layout.metadata.model;
    report["rope"] = io::rope_spelling(calibration.layout.metadata.rope);
    report["head_dim"] = shape.head_dim;
    report["tokens"] = calibration.tokens;
    report["epsilon"] = epsilon;
    nlohmann::ordered_json layers = nlohmann::ordered_json::array();
    for (std::size_t l = 0; l < heads.size(); ++l) {
      nlohmann::ordered_json layer_heads = nlohmann::ordered_json::array();
      for (std::size_t h = 0; h < heads[l].size(); ++h) {
        const HeadAnalysis& head = heads[l][h];
        layer_heads.push_back({{"kv_head", h},
                               {"k", summary_json(head.keys)},
                               {"q", summary_json(head.queries)},
                               {"v", summary_json(head.values)},
                               {"qk", summary_json(head.scores)},
                               {"vo", summary_json(head.value_output)},
                               {"rank_for_epsilon", {{"qk", ranks_json(head.score_ranks)},
                                                     {"vo", ranks_json(head.value_output_ranks)}}}});
      }
      layers.push_back({{"layer", l}, {"kv_heads", std::move(layer_heads)}});
    }
    report["layers"] = std::move(layers);
    std::cout << report.dump(2) << "\n";
    return exit_success;
  }

  std::cout << "Attention spectra of " << calibration.layout.metadata.model << " (" << shape.layers << " layers, "
            << shape.query_heads << " query / " << shape.kv_heads << " KV heads, head_dim " << shape.head_dim
            << ", rope " << io::rope_spelling(calibration.layout.metadata.rope) << ") on " << calibration.tokens
            << " tokens\n"
            << "per spectrum: r90 / r99 = effective rank at 90 % / 99 % energy, stable = ||X||_F^2 / ||X||_2^2\n"
            << "rank for eps = " << epsilon << ": smallest rank with relative error <= eps, per method (kqsvd ksvd eigen)"
            << (weights.empty() ? "\n(no output-projection weights: V W^T left out)\n" : "\n") << "\n";
  std::cout << "layer head |";
  for (const char* title : {"K", "Q", "V", "Q K^T", "V W^T", "Q K^T: rank for eps", "V W^T: rank for eps"}) {
    std::cout << centered(title) << "|";
  }
  std::cout << "\n           |";
  for (int spectrum = 0; spectrum < 5; ++spectrum) std::cout << "  r90   r99 stable |";
  std::cout << "kqsvd  ksvd eigen  |kqsvd  ksvd eigen  |\n";
  for (std::size_t l = 0; l < heads.size(); ++l) {
    for (std::size_t h = 0; h < heads[l].size(); ++h) {
      const HeadAnalysis& head = heads[l][h];
      std::cout << std::setw(5) << l << std::setw(5) << h << " |" << summary_cells(head.keys) << "|"
                << summary_cells(head.queries) << "|" << summary_cells(head.values) << "|" << summary_cells(head.scores)
                << "|" << summary_cells(head.value_output) << "|" << rank_cells(head.score_ranks) << "|"
                << rank_cells(head.value_output_ranks) << "|\n";
    }
  }
  return exit_success;
}

}  // namespace kqsvd::cli
