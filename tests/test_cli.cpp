// Tests of the kqsvd command-line tool: the built binary is run on the shipped stories260K capture
// (data/activations/stories260K) and its JSON is checked against the same quantities computed
// here through the library API; plus exit codes, --help, overwrite protection and atomic output.
#include <gtest/gtest.h>

#include <kqsvd/io/activation_evaluation.hpp>
#include <kqsvd/io/activation_writer.hpp>
#include <kqsvd/io/gram_file.hpp>
#include <kqsvd/io/projection_file.hpp>
#include <kqsvd/io/sensitivity_file.hpp>
#include <kqsvd/kqsvd.hpp>

#include <nlohmann/json.hpp>

#include <Eigen/Eigenvalues>

#include <sys/wait.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "file_test_support.hpp"

namespace kqsvd_test_cli {

namespace fs = std::filesystem;
using Eigen::Index;
using Eigen::MatrixXd;
using Eigen::VectorXd;
using kqsvd::FidelityTotals;
using kqsvd::io::ActivationFile;
using kqsvd::test::scratch_directory;
using nlohmann::json;

const std::string binary = std::string(KQSVD_BINARY_DIR) + "/tools/kqsvd/kqsvd";
const std::string data_dir = std::string(KQSVD_DATA_DIR) + "/activations/stories260K";
const std::string calib = data_dir + "/calib.safetensors";
const std::string held_out = data_dir + "/eval.safetensors";

using Result = kqsvd::test::CommandResult;
using kqsvd::test::shell_quote;

// Runs the tool with `arguments`; stdout and stderr go through files in the test's scratch directory.
Result run(const fs::path& directory, const std::vector<std::string>& arguments) {
  // One thread per tool process: ctest runs tests side by side, and OpenMP threads spinning on shared
  // cores would make each run many times slower.
  std::string command = "OMP_NUM_THREADS=1 " + shell_quote(binary);
  for (const std::string& argument : arguments) command += " " + shell_quote(argument);
  return kqsvd::test::run_command(command, directory);
}

class Cli : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!fs::exists(binary)) GTEST_SKIP() << binary << " was not built (KQSVD_BUILD_EXAMPLES=OFF?)";
    directory_ = scratch_directory();
  }
  Result kqsvd(const std::vector<std::string>& arguments) const { return run(directory_, arguments); }
  std::string path(const std::string& name) const { return (directory_ / name).string(); }

  fs::path directory_;
};

// ---------------------------------------------------------------------------------------------------
// The library's answers, computed here

kqsvd::ModelCalibration calibrated(const std::string& file_path) {
  const ActivationFile file(file_path);
  kqsvd::ModelCalibration calibration(file.shape());
  kqsvd::io::calibrate(calibration, file);
  return calibration;
}

kqsvd::ModelProjections<float> library_fit(kqsvd::Method method, const kqsvd::RankSelection& keys,
                                           const kqsvd::RankSelection& values) {
  return kqsvd::ModelProjections<float>::fit(calibrated(calib), ActivationFile(calib).output_weights(), method, keys,
                                             values);
}

std::vector<FidelityTotals> library_measure(const kqsvd::ModelProjections<float>& projections,
                                            const std::optional<kqsvd::StorageFormat>& latent_format = std::nullopt) {
  const ActivationFile file(held_out);
  return kqsvd::io::measure(projections, file, file.output_weights(), latent_format);
}

void expect_close(double actual, double expected, const std::string& what) {
  EXPECT_NEAR(actual, expected, 1e-6 * std::max(1.0, std::abs(expected))) << what;
}

const char* const error_keys[] = {"err_k", "err_q", "err_v", "err_qk", "err_vo", "err_softmax", "err_out"};

// Every number of one method's JSON object against the library's.
void expect_report_matches(const json& report, const kqsvd::ModelProjections<float>& projections,
                           const std::optional<kqsvd::StorageFormat>& latent_format = std::nullopt) {
  const std::vector<FidelityTotals> per_layer = library_measure(projections, latent_format);
  ASSERT_EQ(report.at("layers").size(), per_layer.size());
  FidelityTotals overall;
  const kqsvd::ModelShape& shape = projections.shape();
  for (std::size_t l = 0; l < per_layer.size(); ++l) {
    const json& layer = report.at("layers")[l];
    EXPECT_EQ(layer.at("layer").get<std::size_t>(), l);
    long kept = 0;
    for (Index h = 0; h < shape.kv_heads; ++h) {
      EXPECT_EQ(layer.at("key_ranks")[h].get<long>(), projections.keys(static_cast<Index>(l), h).rank());
      EXPECT_EQ(layer.at("value_ranks")[h].get<long>(), projections.values(static_cast<Index>(l), h).rank());
      kept += projections.keys(static_cast<Index>(l), h).rank() + projections.values(static_cast<Index>(l), h).rank();
    }
    for (std::size_t m = 0; m < kqsvd::all_fidelity_metrics.size(); ++m) {
      expect_close(layer.at(error_keys[m]).get<double>(), per_layer[l].relative_error(kqsvd::all_fidelity_metrics[m]),
                   std::string(error_keys[m]) + " of layer " + std::to_string(l));
    }
    expect_close(layer.at("compression").get<double>(),
                 static_cast<double>(kept) / static_cast<double>(2 * shape.kv_heads * shape.head_dim), "compression");
    overall += per_layer[l];
  }
  for (std::size_t m = 0; m < kqsvd::all_fidelity_metrics.size(); ++m) {
    expect_close(report.at("overall").at(error_keys[m]).get<double>(),
                 overall.relative_error(kqsvd::all_fidelity_metrics[m]), std::string("overall ") + error_keys[m]);
  }
  expect_close(report.at("overall").at("compression").get<double>(), projections.ranks().compression_ratio(), "overall compression");
  EXPECT_EQ(report.at("tokens").get<long>(), 4 * 64);
}

// ---------------------------------------------------------------------------------------------------
// fit, eval, compare, analyze

TEST_F(Cli, FitThenEvalJsonEqualsTheLibrary) {
  const std::string proj = path("proj.safetensors");
  const Result fit = kqsvd({"fit", "--calib", calib, "--method", "kqsvd", "--rank", "4", "--out", proj});
  ASSERT_EQ(fit.exit_code, 0) << fit.err;
  EXPECT_NE(fit.out.find("wrote " + proj), std::string::npos) << fit.out;

  // The file holds what the library fits from the same data.
  const auto expected = library_fit(kqsvd::Method::kq_svd, kqsvd::RankSelection::fixed(4), kqsvd::RankSelection::fixed(4));
  const kqsvd::io::ProjectionFile file = kqsvd::io::ProjectionFile::load(proj);
  EXPECT_EQ(file.info().model, "stories260K");
  EXPECT_EQ(file.info().calibration_tokens, 8 * 64);
  EXPECT_TRUE(file.projections().keys(3, 2).encoder().isApprox(expected.keys(3, 2).encoder(), 1e-5));
  EXPECT_TRUE(file.projections().values(0, 1).decoder().isApprox(expected.values(0, 1).decoder(), 1e-5));

  const Result eval = kqsvd({"eval", "--proj", proj, "--data", held_out, "--json"});
  ASSERT_EQ(eval.exit_code, 0) << eval.err;
  const json report = json::parse(eval.out);
  EXPECT_EQ(report.at("method"), "kqsvd");
  EXPECT_EQ(report.at("rank").get<long>(), 4);
  EXPECT_EQ(report.at("value_rank").get<long>(), 4);
  expect_report_matches(report, expected);

  const Result table = kqsvd({"eval", "--proj", proj, "--data", held_out});
  ASSERT_EQ(table.exit_code, 0) << table.err;
  EXPECT_NE(table.out.find("err_softmax"), std::string::npos);
  EXPECT_NE(table.out.find("\nall "), std::string::npos) << table.out;
}

// Gram files: kqsvd gram then fit --grams is the fit from the activations, bit for bit; Gram files of
// shards merge to the fit of all the files (to rounding); mismatched, corrupt or wrong files are named.
TEST_F(Cli, GramFilesFitExactlyAsTheActivationsAndMerge) {
  const std::string grams = path("calib.grams.safetensors"), held_grams = path("eval.grams.safetensors");
  const Result gram = kqsvd({"gram", "--calib", calib, "--out", grams});
  ASSERT_EQ(gram.exit_code, 0) << gram.err;
  EXPECT_NE(gram.out.find("over 512 tokens"), std::string::npos) << gram.out;
  const kqsvd::io::GramFile file = kqsvd::io::GramFile::load(grams);
  EXPECT_EQ(file.info().model, "stories260K");
  EXPECT_EQ(file.output_weights().size(), 5u);
  // Independent: the keys of layer 2, KV head 1 read from the activation file, multiplied out.
  const ActivationFile activations(calib);
  MatrixXd keys_gram = MatrixXd::Zero(8, 8);
  for (Index b = 0; b < activations.batch(); ++b) {
    const MatrixXd k = activations.keys(2, b, 1).cast<double>();
    keys_gram += k.transpose() * k;
  }
  EXPECT_TRUE(file.calibration().keys(2, 1).gram().isApprox(keys_gram, 1e-12));
  EXPECT_EQ(file.calibration().token_count(), 512);

  const std::string from_activations = path("a.safetensors"), from_grams = path("g.safetensors");
  ASSERT_EQ(kqsvd({"fit", "--calib", calib, "--method", "kqsvd", "--rank", "4", "--out", from_activations}).exit_code, 0);
  const Result fit = kqsvd({"fit", "--grams", grams, "--method", "kqsvd", "--rank", "4", "--out", from_grams});
  ASSERT_EQ(fit.exit_code, 0) << fit.err;
  EXPECT_NE(fit.out.find("from 1 Gram file"), std::string::npos) << fit.out;
  const auto a = kqsvd::io::ProjectionFile::load(from_activations), g = kqsvd::io::ProjectionFile::load(from_grams);
  for (Index l = 0; l < 5; ++l) {
    for (Index h = 0; h < 4; ++h) {
      EXPECT_TRUE(a.projections().keys(l, h).encoder() == g.projections().keys(l, h).encoder()) << l << " " << h;
      EXPECT_TRUE(a.projections().values(l, h).singular_values() == g.projections().values(l, h).singular_values());
    }
  }
  EXPECT_EQ(g.info().calibration_tokens, 512);

  // Two shards: the held-out file's Grams merged with the calibration's equal the fit of both files.
  ASSERT_EQ(kqsvd({"gram", "--calib", held_out, "--out", held_grams}).exit_code, 0);
  const std::string both_activations = path("both_a.safetensors"), both_grams = path("both_g.safetensors");
  ASSERT_EQ(kqsvd({"fit", "--calib", calib, held_out, "--method", "ksvd", "--rank", "4", "--out", both_activations}).exit_code, 0);
  ASSERT_EQ(kqsvd({"fit", "--grams", grams, held_grams, "--method", "ksvd", "--rank", "4", "--out", both_grams}).exit_code, 0);
  const auto both_a = kqsvd::io::ProjectionFile::load(both_activations), both_g = kqsvd::io::ProjectionFile::load(both_grams);
  EXPECT_TRUE(both_a.projections().keys(4, 3).singular_values().isApprox(both_g.projections().keys(4, 3).singular_values(), 1e-12));
  EXPECT_EQ(both_g.info().calibration_tokens, both_a.info().calibration_tokens);

  // Bad input, each named.
  const auto data_error = [&](const Result& result, const std::string& problem) {
    EXPECT_EQ(result.exit_code, 1) << result.err;
    EXPECT_NE(result.err.find(problem), std::string::npos) << result.err;
  };
  const std::string other = path("other.grams.safetensors");
  kqsvd::io::GramFileInfo info = file.info();
  info.model = "another-model";
  kqsvd::io::GramFile(file.calibration(), info).save(other);
  data_error(kqsvd({"fit", "--grams", grams, other, "--method", "ksvd", "--rank", "4", "--out", path("x.safetensors")}),
             "'" + other + "' holds Grams of model 'another-model'");
  info = file.info();
  info.rope = kqsvd::RopeMode::pre_rope;
  kqsvd::io::GramFile(file.calibration(), info).save(other, /*overwrite=*/true);
  data_error(kqsvd({"fit", "--grams", grams, other, "--method", "ksvd", "--rank", "4", "--out", path("x.safetensors")}),
             "RoPE mode none");
  kqsvd::io::GramFile(kqsvd::ModelCalibration(kqsvd::ModelShape{5, 8, 8, 8}), file.info()).save(other, /*overwrite=*/true);
  data_error(kqsvd({"fit", "--grams", grams, other, "--method", "ksvd", "--rank", "4", "--out", path("x.safetensors")}),
             "a model of shape");
  data_error(kqsvd({"fit", "--grams", calib, "--method", "ksvd", "--rank", "4", "--out", path("x.safetensors")}),
             "is not a kqsvd Gram file");
  fs::resize_file(other, 100);
  data_error(kqsvd({"fit", "--grams", other, "--method", "ksvd", "--rank", "4", "--out", path("x.safetensors")}), other);
  // The checks before the fit read the first file's metadata only (GramFile::read_header); a tensor
  // spoilt behind intact metadata is still found when the Grams are read, and named.
  const kqsvd::io::GramFile::Header header = kqsvd::io::GramFile::read_header(grams);
  EXPECT_EQ(header.shape, file.shape());
  EXPECT_EQ(header.info.model, file.info().model);
  EXPECT_EQ(header.info.rope, file.info().rope);
  EXPECT_EQ(header.info.rope_theta, file.info().rope_theta);
  EXPECT_EQ(header.info.producer, file.info().producer);
  std::string spoilt = kqsvd::test::read_file(grams);
  std::fill(spoilt.end() - 8, spoilt.end(), '\xff');  // the last tensor's last element: NaN
  kqsvd::test::write_file(other, spoilt);
  EXPECT_EQ(kqsvd::io::GramFile::read_header(other).shape, file.shape());
  data_error(kqsvd({"fit", "--grams", other, "--method", "ksvd", "--rank", "4", "--out", path("x.safetensors")}), other);
  const Result too_high = kqsvd({"fit", "--grams", grams, "--method", "ksvd", "--rank", "9", "--out", path("x.safetensors")});
  EXPECT_EQ(too_high.exit_code, 2) << too_high.err;
  EXPECT_NE(too_high.err.find("--rank 9 is more than head_dim 8"), std::string::npos) << too_high.err;
  // KQ-SVD values need o_proj: a Gram file without it says so.
  kqsvd::io::GramFile(file.calibration(), file.info()).save(other, /*overwrite=*/true);
  data_error(kqsvd({"fit", "--grams", other, "--method", "kqsvd", "--rank", "4", "--out", path("x.safetensors")}),
             "Gram files hold no layers.{l}.o_proj");
  const Result both = kqsvd({"fit", "--grams", grams, "--calib", calib, "--method", "ksvd", "--rank", "4", "--out", path("x.safetensors")});
  EXPECT_EQ(both.exit_code, 2) << both.err;
  EXPECT_NE(both.err.find("exactly one of --calib and --grams"), std::string::npos) << both.err;
  EXPECT_FALSE(fs::exists(path("x.safetensors")));
  EXPECT_EQ(kqsvd({"gram", "--calib", calib, "--out", grams}).exit_code, 1);  // exists, no --force
}

TEST_F(Cli, FitWithAnErrorBudgetChoosesEachHeadsRank) {
  const std::string proj = path("proj.safetensors");
  const Result fit = kqsvd({"fit", "--calib", calib, "--method", "ksvd", "--eps", "0.3", "--value-rank", "2", "--out", proj});
  ASSERT_EQ(fit.exit_code, 0) << fit.err;
  const Result eval = kqsvd({"eval", "--proj", proj, "--data", held_out, "--json"});
  ASSERT_EQ(eval.exit_code, 0) << eval.err;
  const json report = json::parse(eval.out);
  EXPECT_EQ(report.at("method"), "ksvd");
  EXPECT_EQ(report.at("epsilon").get<double>(), 0.3);
  EXPECT_EQ(report.at("value_rank").get<long>(), 2);
  expect_report_matches(report, library_fit(kqsvd::Method::k_svd, kqsvd::RankSelection::error_budget(0.3),
                                            kqsvd::RankSelection::fixed(2)));
}

TEST_F(Cli, CompareJsonHasThreeMethodsAtIdenticalRanks) {
  const Result compare = kqsvd({"compare", "--calib", calib, "--data", held_out, "--rank", "3", "--json"});
  ASSERT_EQ(compare.exit_code, 0) << compare.err;
  const json reports = json::parse(compare.out);
  ASSERT_TRUE(reports.is_array());
  ASSERT_EQ(reports.size(), 3u);
  std::map<std::string, double> score_error;
  for (std::size_t i = 0; i < 3; ++i) {
    const kqsvd::Method method = kqsvd::all_methods[i];
    const json& report = reports[i];
    EXPECT_EQ(report.at("method"), kqsvd::to_string(method));
    EXPECT_EQ(report.at("rank").get<long>(), 3);
    EXPECT_EQ(report.at("value_rank").get<long>(), 3);
    for (std::size_t l = 0; l < report.at("layers").size(); ++l) {
      EXPECT_EQ(report.at("layers")[l].at("key_ranks"), reports[0].at("layers")[l].at("key_ranks"));
      EXPECT_EQ(report.at("layers")[l].at("value_ranks"), reports[0].at("layers")[l].at("value_ranks"));
    }
    expect_report_matches(report, library_fit(method, kqsvd::RankSelection::fixed(3), kqsvd::RankSelection::fixed(3)));
    score_error[report.at("method")] = report.at("overall").at("err_qk").get<double>();
  }
  EXPECT_LE(score_error["kqsvd"], score_error["ksvd"]);
  EXPECT_LE(score_error["kqsvd"], score_error["eigen"]);
}

TEST_F(Cli, CompareWithAnErrorBudgetGivesTheBaselinesKqSvdsRanks) {
  const Result compare = kqsvd({"compare", "--calib", calib, "--data", held_out, "--eps", "0.2", "--json"});
  ASSERT_EQ(compare.exit_code, 0) << compare.err;
  const json reports = json::parse(compare.out);
  ASSERT_EQ(reports.size(), 3u);
  const auto kq = library_fit(kqsvd::Method::kq_svd, kqsvd::RankSelection::error_budget(0.2),
                              kqsvd::RankSelection::error_budget(0.2));
  bool ranks_differ = false;
  for (const json& report : reports) {
    EXPECT_EQ(report.at("epsilon").get<double>(), 0.2);
    for (Index l = 0; l < kq.shape().layers; ++l) {
      for (Index h = 0; h < kq.shape().kv_heads; ++h) {
        EXPECT_EQ(report.at("layers")[l].at("key_ranks")[h].get<long>(), kq.keys(l, h).rank());
        EXPECT_EQ(report.at("layers")[l].at("value_ranks")[h].get<long>(), kq.values(l, h).rank());
        ranks_differ = ranks_differ || kq.keys(l, h).rank() != kq.keys(0, 0).rank();
      }
    }
  }
  EXPECT_TRUE(ranks_differ) << "the budget should give different heads different ranks";
}

TEST_F(Cli, ComparePrintsATableAndDrawsThePlot) {
  const std::string plot = path("compare.svg");
  const Result compare = kqsvd({"compare", "--calib", calib, "--data", held_out, "--rank", "4", "--plot", plot});
  ASSERT_EQ(compare.exit_code, 0) << compare.err;
  for (const char* expected : {"kqsvd ", "ksvd ", "eigen ", "err_qk", "0.500 (2.0x)"}) {
    EXPECT_NE(compare.out.find(expected), std::string::npos) << expected << " in\n" << compare.out;
  }
  const std::string svg = kqsvd::test::read_file(plot);
  EXPECT_EQ(svg.rfind("<?xml", 0), 0u);
  EXPECT_NE(svg.find("</svg>"), std::string::npos);
  for (const char* expected : {"KQ-SVD", "K-SVD", "Eigen Attention", "Attention logits Q K^T", "<polyline"}) {
    EXPECT_NE(svg.find(expected), std::string::npos) << expected;
  }
  // One line per method per panel (each with a marker per swept rank: 1, 2, 3, 4, 6, 8 for head_dim 8).
  std::size_t polylines = 0;
  for (std::size_t at = svg.find("<polyline"); at != std::string::npos; at = svg.find("<polyline", at + 1)) ++polylines;
  EXPECT_EQ(polylines, 6u);
}

// Singular values of Y X^T from the Grams, sqrt(eig(G_Y G_X)): the eigenvalues of a product of
// positive semidefinite matrices are those squared singular values.
VectorXd product_singular_values(const MatrixXd& gram_y, const MatrixXd& gram_x) {
  Eigen::EigenSolver<MatrixXd> solver(gram_y * gram_x, false);
  VectorXd values = solver.eigenvalues().real().cwiseMax(0.0).cwiseSqrt();
  std::sort(values.data(), values.data() + values.size(), std::greater<double>());
  return values;
}

TEST_F(Cli, AnalyzeJsonMatchesDirectSpectra) {
  const Result analyze = kqsvd({"analyze", "--data", held_out, "--eps", "0.25", "--json"});
  ASSERT_EQ(analyze.exit_code, 0) << analyze.err;
  const json report = json::parse(analyze.out);
  EXPECT_EQ(report.at("tokens").get<long>(), 256);
  ASSERT_EQ(report.at("layers").size(), 5u);

  // Layer 2, KV head 1, from the raw activations.
  const ActivationFile file(held_out);
  MatrixXd keys(0, 8), queries(0, 8);
  for (Index b = 0; b < file.batch(); ++b) {
    const MatrixXd k = file.keys(2, b, 1).cast<double>(), q = file.group_queries(2, b, 1).cast<double>();
    keys.conservativeResize(keys.rows() + k.rows(), 8);
    keys.bottomRows(k.rows()) = k;
    queries.conservativeResize(queries.rows() + q.rows(), 8);
    queries.bottomRows(q.rows()) = q;
  }
  const MatrixXd gram_k = keys.transpose() * keys, gram_q = queries.transpose() * queries;
  const json& head = report.at("layers")[2].at("kv_heads")[1];
  const VectorXd scores = product_singular_values(gram_q, gram_k);
  const VectorXd key_values = product_singular_values(MatrixXd::Identity(8, 8), gram_k);
  expect_close(head.at("qk").at("stable_rank").get<double>(), scores.squaredNorm() / (scores(0) * scores(0)), "qk stable rank");
  expect_close(head.at("k").at("stable_rank").get<double>(), key_values.squaredNorm() / (key_values(0) * key_values(0)),
               "k stable rank");
  const auto energy_rank = [](const VectorXd& s, double fraction) {
    double kept = 0.0;
    for (Index r = 0; r < s.size(); ++r) {
      kept += s(r) * s(r);
      if (kept >= fraction * s.squaredNorm()) return r + 1;
    }
    return s.size();
  };
  EXPECT_EQ(head.at("qk").at("energy_rank_90").get<Index>(), energy_rank(scores, 0.90));
  EXPECT_EQ(head.at("k").at("energy_rank_99").get<Index>(), energy_rank(key_values, 0.99));
  // KQ-SVD's rank for eps: the Eckart-Young tail of the spectrum of Q K^T.
  EXPECT_EQ(head.at("rank_for_epsilon").at("qk").at("kqsvd").get<Index>(), energy_rank(scores, 1.0 - 0.25 * 0.25));
  // K-SVD's: the smallest r whose top-r key directions P give ||Q K^T - Q P P^T K^T|| <= eps ||Q K^T||.
  Eigen::SelfAdjointEigenSolver<MatrixXd> principal(gram_k);
  const MatrixXd exact = queries * keys.transpose();
  Index ksvd_rank = 8;
  for (Index r = 1; r < 8; ++r) {
    const MatrixXd p = principal.eigenvectors().rightCols(r);
    if ((exact - queries * p * p.transpose() * keys.transpose()).norm() <= 0.25 * exact.norm()) {
      ksvd_rank = r;
      break;
    }
  }
  EXPECT_EQ(head.at("rank_for_epsilon").at("qk").at("ksvd").get<Index>(), ksvd_rank);
  EXPECT_TRUE(head.at("vo").is_object());
  EXPECT_GE(head.at("rank_for_epsilon").at("qk").at("ksvd").get<Index>(),
            head.at("rank_for_epsilon").at("qk").at("kqsvd").get<Index>());

  const Result table = kqsvd({"analyze", "--data", held_out});
  ASSERT_EQ(table.exit_code, 0) << table.err;
  EXPECT_NE(table.out.find("Q K^T: rank for eps"), std::string::npos) << table.out;
}

// ---------------------------------------------------------------------------------------------------
// Help, exit codes and file safety

TEST_F(Cli, HelpExitsZeroForEveryCommand) {
  const Result top = kqsvd({"--help"});
  EXPECT_EQ(top.exit_code, 0);
  EXPECT_NE(top.out.find("usage: kqsvd <command>"), std::string::npos);
  for (const char* command : {"fit", "eval", "compare", "analyze"}) {
    const Result help = kqsvd({command, "--help"});
    EXPECT_EQ(help.exit_code, 0) << command;
    EXPECT_NE(help.out.find(std::string("usage: kqsvd ") + command), std::string::npos) << help.out;
    EXPECT_TRUE(help.err.empty()) << help.err;
  }
  const Result version = kqsvd({"--version"});
  EXPECT_EQ(version.exit_code, 0);
  EXPECT_EQ(version.out.rfind("kqsvd ", 0), 0u);
}

// A usage error exits 2 with one line on stderr starting "kqsvd: ".
void expect_usage_error(const Result& result, const std::string& problem) {
  EXPECT_EQ(result.exit_code, 2) << result.err;
  EXPECT_EQ(result.err.rfind("kqsvd: ", 0), 0u) << result.err;
  EXPECT_EQ(std::count(result.err.begin(), result.err.end(), '\n'), 1) << result.err;
  EXPECT_NE(result.err.find(problem), std::string::npos) << result.err;
  EXPECT_TRUE(result.out.empty()) << result.out;
}

TEST_F(Cli, UsageErrorsExitTwo) {
  const std::string out = path("p.safetensors");
  EXPECT_EQ(kqsvd({}).exit_code, 2);
  expect_usage_error(kqsvd({"compress"}), "unknown command 'compress'");
  expect_usage_error(kqsvd({"fit", "--method", "kqsvd", "--rank", "2", "--out", out}), "give exactly one of --calib and --grams");
  expect_usage_error(kqsvd({"fit", "--calib", calib, "--method", "pca", "--rank", "2", "--out", out}), "--method must be");
  expect_usage_error(kqsvd({"fit", "--calib", calib, "--method", "kqsvd", "--out", out}), "exactly one of --rank, --eps and --budget");
  expect_usage_error(kqsvd({"fit", "--calib", calib, "--method", "kqsvd", "--rank", "2", "--eps", "0.1", "--out", out}),
                     "exactly one of --rank, --eps and --budget");
  expect_usage_error(kqsvd({"fit", "--calib", calib, "--method", "kqsvd", "--rank", "0", "--out", out}),
                     "--rank must be a positive integer");
  expect_usage_error(kqsvd({"fit", "--calib", calib, "--method", "kqsvd", "--eps", "1.5", "--out", out}),
                     "--eps must be a number strictly between 0 and 1");
  expect_usage_error(kqsvd({"fit", "--calib", calib, "--method", "kqsvd", "--rank", "9", "--out", out}),
                     "--rank 9 is more than head_dim 8");
  expect_usage_error(kqsvd({"eval", "--proj", out, "--data", held_out, "--colour"}), "unknown option --colour");
  expect_usage_error(kqsvd({"compare", "--calib", calib, "--data", "--rank", "2"}), "--data needs at least one file");
  expect_usage_error(kqsvd({"analyze", "extra", "--data", held_out}), "unexpected argument 'extra'");
  EXPECT_FALSE(fs::exists(out));
}

// --budget: uniform ranks without a sensitivity file, the library's loss-aware allocation with one; the
// file records which, and eval reports it. stories260K: 5 layers x 4 KV heads x head_dim 8.
TEST_F(Cli, FitWithABudgetSpendsItUniformlyOrWhereTheLossNeedsIt) {
  const std::string uniform = path("uniform.safetensors");
  const Result fit = kqsvd({"fit", "--calib", calib, "--method", "kqsvd", "--budget", "0.5", "--out", uniform});
  ASSERT_EQ(fit.exit_code, 0) << fit.err;
  const kqsvd::io::ProjectionFile uniform_file = kqsvd::io::ProjectionFile::load(uniform);
  EXPECT_EQ(uniform_file.projections().ranks(), kqsvd::RankAllocation::uniform(uniform_file.shape(), 4, 4));
  EXPECT_EQ(uniform_file.info().rank_allocation, "uniform, 0.5 of the full cache in f32");

  // Weights that make layer 3's keys and layer 0's values matter most.
  const kqsvd::ModelShape shape = uniform_file.shape();
  kqsvd::io::Sensitivity sensitivity{kqsvd::Method::kq_svd, kqsvd::RopeMode::post_rope, "stories260K", "test",
                                     kqsvd::LossWeights(shape, 0.1)};
  sensitivity.weights.set_layer(3, 5.0, 0.1);
  sensitivity.weights.set_layer(0, 0.1, 2.0);
  const std::string weights = path("sensitivity.json");
  kqsvd::io::write_sensitivity_file(weights, sensitivity);
  const std::string aware = path("aware.safetensors");
  const Result fit_aware = kqsvd({"fit", "--calib", calib, "--method", "kqsvd", "--budget", "0.5", "--sensitivity", weights,
                                  "--latents", "int8", "--out", aware});
  ASSERT_EQ(fit_aware.exit_code, 0) << fit_aware.err;
  const auto full = library_fit(kqsvd::Method::kq_svd, kqsvd::RankSelection::fixed(8), kqsvd::RankSelection::fixed(8));
  kqsvd::LossAwareOptions options;
  options.format = kqsvd::StorageFormat::parse("int8");
  const kqsvd::LossAwareAllocation expected =
      kqsvd::loss_aware_allocation(full, sensitivity.weights, kqsvd::MemoryBudget::fraction_of_full_cache(0.5), options);
  const kqsvd::io::ProjectionFile aware_file = kqsvd::io::ProjectionFile::load(aware);
  EXPECT_EQ(aware_file.projections().ranks(), expected.ranks);
  EXPECT_GT(aware_file.projections().keys(3, 0).rank(), aware_file.projections().keys(1, 0).rank());
  // int8 rows cost r + 2 bytes; half of the full cache is 40 x 10 / 2 = 200 bytes per token.
  EXPECT_LE(kqsvd::latent_cache_footprint(expected.ranks, options.format).bytes_per_token, 200);
  EXPECT_GE(kqsvd::latent_cache_footprint(expected.ranks, options.format).bytes_per_token, 199);
  EXPECT_NE(aware_file.info().rank_allocation.find("loss-aware, 0.5 of the full cache in int8, joint budget"), std::string::npos)
      << aware_file.info().rank_allocation;
  const Result eval = kqsvd({"eval", "--proj", aware, "--data", held_out, "--json"});
  ASSERT_EQ(eval.exit_code, 0) << eval.err;
  const json report = json::parse(eval.out);
  EXPECT_EQ(report.at("rank_allocation").get<std::string>(), aware_file.info().rank_allocation);
  expect_report_matches(report, full.truncated(expected.ranks));

  // Bad budgets exit 2, unusable sensitivity files exit 1; nothing is written either way.
  const std::string out = path("never.safetensors");
  const auto fit_with = [&](std::vector<std::string> extra) {
    std::vector<std::string> words = {"fit", "--calib", calib, "--method", "kqsvd", "--out", out};
    words.insert(words.end(), extra.begin(), extra.end());
    return kqsvd(words);
  };
  expect_usage_error(fit_with({"--budget", "0"}), "--budget must be a number in (0, 1]");
  expect_usage_error(fit_with({"--budget", "1.5"}), "--budget must be a number in (0, 1]");
  expect_usage_error(fit_with({"--budget", "half"}), "--budget must be a number in (0, 1]");
  expect_usage_error(fit_with({"--budget", "0.1"}), "--budget 0.1 is less than rank 1 in every key and value projection");
  expect_usage_error(fit_with({"--budget", "0.5", "--value-rank", "2"}), "--value-rank goes with --rank or --eps");
  expect_usage_error(fit_with({"--rank", "2", "--sensitivity", weights}), "--sensitivity needs --budget");
  expect_usage_error(fit_with({"--budget", "0.5", "--budget-sharing", "both"}), "--budget-sharing must be joint or separate");
  expect_usage_error(fit_with({"--budget", "0.5", "--budget-sharing", "separate"}), "--budget-sharing needs --sensitivity");
  expect_usage_error(fit_with({"--budget", "0.5", "--latents", "q4_0"}), "do not divide head_dim 8");
  const auto expect_data_error = [](const Result& result, const std::string& problem) {
    EXPECT_EQ(result.exit_code, 1) << result.err;
    EXPECT_NE(result.err.find(problem), std::string::npos) << result.err;
  };
  expect_data_error(kqsvd({"fit", "--calib", calib, "--method", "ksvd", "--out", out, "--budget", "0.5", "--sensitivity", weights}),
                    "was measured for method kqsvd, but --method is ksvd");
  sensitivity.model = "tinyllama-h64";
  kqsvd::io::write_sensitivity_file(weights, sensitivity, /*overwrite=*/true);
  expect_data_error(fit_with({"--budget", "0.5", "--sensitivity", weights}), "was measured for model 'tinyllama-h64'");
  kqsvd::test::write_file(weights, R"({"format": "kqsvd.sensitivity", "method": "kqsvd", "layers": [{"key": 1, "value": 1}]})");
  expect_data_error(fit_with({"--budget", "0.5", "--sensitivity", weights}), "has 1 layers; the model has 5");
  kqsvd::test::write_file(weights, R"({"format": "kqsvd.sensitivity", "method": "kqsvd", "layers": [)");
  expect_data_error(fit_with({"--budget", "0.5", "--sensitivity", weights}), "is not valid JSON");
  expect_data_error(fit_with({"--budget", "0.5", "--sensitivity", path("missing.json")}), "cannot open");
  EXPECT_FALSE(fs::exists(out));
}

// A kqsvd-llama subcommand on the shipped stories260K checkpoint, its tokenizer and the sample text, on
// one thread, as a shell command to append options to.
std::string stories260k_command(const std::string& subcommand) {
  const std::string llama = std::string(KQSVD_BINARY_DIR) + "/tools/kqsvd_llama/kqsvd-llama";
  const std::string model_dir = std::string(KQSVD_DATA_DIR) + "/models/stories260K";
  return "OMP_NUM_THREADS=1 " + shell_quote(llama) + " " + subcommand + " --model " + shell_quote(model_dir + "/stories260K.bin") +
         " --tokenizer " + shell_quote(model_dir + "/tok512.bin") + " --text " +
         shell_quote(std::string(KQSVD_DATA_DIR) + "/text/tinystories/tinystories_sample.txt");
}

// kqsvd-llama probe on the shipped stories260K checkpoint: a sensitivity file of the model's shape, with
// the model's name, that kqsvd fit accepts for activations of the same model.
TEST_F(Cli, ProbeWritesASensitivityFileThatFitAccepts) {
  const std::string weights = path("probe.json");
  std::string command = stories260k_command("probe") +
                        " --calib-stories 0:6 --probe-stories 6:9 --max-tokens 48 --method kqsvd --ratio 0.5 --out " +
                        shell_quote(weights) + " > " + shell_quote(path("probe.txt")) + " 2>&1";
  ASSERT_EQ(std::system(command.c_str()), 0) << kqsvd::test::read_file(path("probe.txt"));
  const kqsvd::ModelShape shape{5, 8, 4, 8};
  const kqsvd::io::Sensitivity sensitivity = kqsvd::io::read_sensitivity_file(weights, shape);
  EXPECT_EQ(sensitivity.model, "stories260K");
  EXPECT_EQ(sensitivity.method, kqsvd::Method::kq_svd);
  EXPECT_NE(sensitivity.probe.find("rank 4 of 8"), std::string::npos) << sensitivity.probe;
  double largest = 0.0;
  for (Index l = 0; l < 5; ++l) largest = std::max({largest, sensitivity.weights.key(l, 0), sensitivity.weights.value(l, 0)});
  EXPECT_GT(largest, 0.0);  // compressing some layer to half its dimensions costs the model something
  const Result fit = kqsvd({"fit", "--calib", calib, "--method", "kqsvd", "--budget", "0.5", "--sensitivity", weights,
                            "--out", path("proj.safetensors")});
  EXPECT_EQ(fit.exit_code, 0) << fit.err;
}

// kqsvd-llama frontier on stories260K (head_dim 8), a small sweep: every configuration measured once, the
// JSON's bits from the caches' bytes (the full f16 cache exactly 16), the Pareto flags consistent with
// the numbers, the recommendation the best within the budget; bad budgets refused before any work.
TEST_F(Cli, FrontierMeasuresEveryCacheAndRecommendsWithinABudget) {
  const std::string common = stories260k_command("frontier") +
                             " --calib-stories 0:6 --eval-stories 6:9 --max-tokens 48 --ratios 0.5 --methods kqsvd" +
                             " --latent-formats f16,int4/4 --full-formats f16,int8 --decode-tokens 4";
  const std::string report = path("frontier.json"), out = path("best.safetensors");
  const std::string command = common + " --h2o 0.25 --budget-bits 9 --decode-arithmetic float32,int8_dot_products --out " +
                              shell_quote(out) + " --json " + shell_quote(report) + " > " +
                              shell_quote(path("frontier.txt")) + " 2>&1";
  ASSERT_EQ(std::system(command.c_str()), 0) << kqsvd::test::read_file(path("frontier.txt"));
  const json frontier = json::parse(kqsvd::test::read_file(report));
  EXPECT_EQ(frontier.at("model"), "stories260K");
  EXPECT_EQ(frontier.at("eval_stories"), "6:9");
  EXPECT_EQ(frontier.at("max_tokens"), 48);
  std::map<std::string, json> configs;
  for (const json& c : frontier.at("configs")) configs[c.at("config").get<std::string>()] = c;
  for (const char* name : {"full-f16", "full-int8", "h2o-25%-f16", "kqsvd-uniform-50%-f16", "kqsvd-uniform-50%-int4/4",
                           "kqsvd-uniform-50%-f16+w32", "h2o-25%+kqsvd-uniform-50%-f16", "online-svd-50%-f16"}) {
    ASSERT_TRUE(configs.count(name)) << name;
    EXPECT_GT(configs[name].at("tokens_per_s").get<double>(), 0.0) << name;
  }
  // int8 dot products: a second configuration for the 4-bit latents only (not for f16 or int8 caches,
  // nor for H2O), the same bytes, decoded with the other arithmetic.
  ASSERT_TRUE(configs.count("kqsvd-uniform-50%-int4/4+int8"));
  const json& fast = configs["kqsvd-uniform-50%-int4/4+int8"];
  EXPECT_EQ(fast.at("decode_arithmetic"), "int8_dot_products");
  EXPECT_EQ(configs["kqsvd-uniform-50%-int4/4"].at("decode_arithmetic"), "float32");
  EXPECT_DOUBLE_EQ(fast.at("bits_per_element").get<double>(), configs["kqsvd-uniform-50%-int4/4"].at("bits_per_element").get<double>());
  EXPECT_NE(fast.at("kl").get<double>(), configs["kqsvd-uniform-50%-int4/4"].at("kl").get<double>());
  for (const char* name : {"full-f16+int8", "full-int8+int8", "kqsvd-uniform-50%-f16+int8", "h2o-25%-f16+int8"}) {
    EXPECT_FALSE(configs.count(name)) << name;
  }
  EXPECT_DOUBLE_EQ(configs["full-f16"].at("bits_per_element").get<double>(), 16.0);
  EXPECT_DOUBLE_EQ(configs["full-int8"].at("bits_per_element").get<double>(), 8.0 + 16.0 / 8.0);  // a scale per row
  EXPECT_LT(configs["full-f16"].at("kl").get<double>(), 1e-4);
  // Latents of rank 4 in f16: 4 x 16 bits per 8 elements.
  EXPECT_DOUBLE_EQ(configs["kqsvd-uniform-50%-f16"].at("bits_per_element").get<double>(), 8.0);
  // Pareto: a configuration is flagged exactly when none has at most its bits and KL, one strictly.
  for (const auto& [name, c] : configs) {
    bool dominated = false;
    for (const auto& [other_name, o] : configs) {
      const double b = c.at("bits_per_element"), k = c.at("kl"), ob = o.at("bits_per_element"), ok = o.at("kl");
      dominated = dominated || (ob <= b && ok <= k && (ob < b || ok < k));
    }
    EXPECT_EQ(c.at("pareto").get<bool>(), !dominated) << name;
  }
  // The recommendation: the least KL within 9 bits.
  std::string best;
  for (const auto& [name, c] : configs) {
    if (c.at("bits_per_element").get<double>() <= 9.0 && (best.empty() || c.at("kl") < configs[best].at("kl"))) best = name;
  }
  const std::string text = kqsvd::test::read_file(path("frontier.txt"));
  EXPECT_NE(text.find("recommended within 9.00 bits per element: " + best), std::string::npos) << text;
  EXPECT_EQ(fs::exists(out), configs[best].contains("ranks")) << best;

  const auto refused = [&](const std::string& options, const std::string& problem) {
    const std::string failing = common + " " + options + " > " + shell_quote(path("refused.txt")) + " 2>&1";
    const int status = std::system(failing.c_str());
    EXPECT_EQ(WEXITSTATUS(status), 2) << options;
    EXPECT_NE(kqsvd::test::read_file(path("refused.txt")).find(problem), std::string::npos)
        << kqsvd::test::read_file(path("refused.txt"));
  };
  refused("--budget-bits 0.5", "--budget-bits 0.50 is below every configuration");
  refused("--out " + shell_quote(path("x.safetensors")), "--out needs --budget-bits");
  refused("--h2o 1", "nothing would be evicted");
  refused("--h2o 0", "--h2o");
  refused("--decode-arithmetic int4", "--decode-arithmetic must be float32 or int8_dot_products, got 'int4'");
}

// kqsvd-llama quality --decode-arithmetic int8_dot_products: the post-RoPE rows of 4-bit latents decoded
// with integer dot products (token by token), the pre-RoPE rows in float (their keys are reconstructed);
// refused for a format it does not apply to.
TEST_F(Cli, QualityWithIntegerDotProductsDecodesPostRopeLatents) {
  const std::string common = stories260k_command("quality") +
                             " --calib-stories 0:6 --eval-stories 6:9 --max-tokens 48 --ratios 0.5 --methods kqsvd" +
                             " --allocations uniform --window 0 --decode-tokens 4";
  const auto run = [&](const std::string& options, const std::string& report) {
    const std::string command = common + " " + options + " --json " + shell_quote(report) + " > " + shell_quote(path("quality.txt")) + " 2>&1";
    return std::system(command.c_str());
  };
  ASSERT_EQ(run("--format int4/4 --decode-arithmetic int8_dot_products", path("int8.json")), 0)
      << kqsvd::test::read_file(path("quality.txt"));
  ASSERT_EQ(run("--format int4/4 --rope post", path("float.json")), 0) << kqsvd::test::read_file(path("quality.txt"));
  std::map<std::string, json> fast, exact;
  const json fast_report = json::parse(kqsvd::test::read_file(path("int8.json")));
  const json float_report = json::parse(kqsvd::test::read_file(path("float.json")));
  for (const json& row : fast_report.at("rows")) fast[row.at("rope").get<std::string>()] = row;
  for (const json& row : float_report.at("rows")) exact[row.at("rope").get<std::string>()] = row;
  ASSERT_TRUE(fast.count("post") && fast.count("pre") && exact.count("post"));
  EXPECT_EQ(fast["post"].at("decode_arithmetic"), "int8_dot_products");
  EXPECT_EQ(fast["pre"].at("decode_arithmetic"), "float32");
  EXPECT_EQ(exact["post"].at("decode_arithmetic"), "float32");
  EXPECT_EQ(fast["post"].at("bytes_per_token_per_layer"), exact["post"].at("bytes_per_token_per_layer"));
  const double fast_kl = fast["post"].at("kl"), float_kl = exact["post"].at("kl");
  EXPECT_NE(fast_kl, float_kl);
  EXPECT_GT(fast_kl, 0.0);

  EXPECT_EQ(WEXITSTATUS(run("--format f16 --decode-arithmetic int8_dot_products", path("refused.json"))), 2);
  EXPECT_NE(kqsvd::test::read_file(path("quality.txt")).find("applies to q4_0, int4 and int2 latents, not --format f16"),
            std::string::npos)
      << kqsvd::test::read_file(path("quality.txt"));
  EXPECT_FALSE(fs::exists(path("refused.json")));
}

// --latents int8: the errors of the latents as an int8 cache holds them, and its bits: rank 4 of 8, each
// latent row 4 codes and a float16 scale (6 bytes), keys and values, over 2 x 8 full elements.
TEST_F(Cli, EvalWithQuantizedLatentsMeasuresTheStoredLatents) {
  const std::string proj = path("proj.safetensors");
  ASSERT_EQ(kqsvd({"fit", "--calib", calib, "--method", "kqsvd", "--rank", "4", "--out", proj}).exit_code, 0);
  const auto expected = library_fit(kqsvd::Method::kq_svd, kqsvd::RankSelection::fixed(4), kqsvd::RankSelection::fixed(4));

  const Result exact = kqsvd({"eval", "--proj", proj, "--data", held_out, "--json"});
  const Result int8 = kqsvd({"eval", "--proj", proj, "--data", held_out, "--latents", "int8", "--json"});
  const Result int2 = kqsvd({"eval", "--proj", proj, "--data", held_out, "--latents", "int2/4", "--json"});
  ASSERT_EQ(int8.exit_code, 0) << int8.err;
  ASSERT_EQ(int2.exit_code, 0) << int2.err;
  const json exact_report = json::parse(exact.out), int8_report = json::parse(int8.out), int2_report = json::parse(int2.out);
  EXPECT_EQ(int8_report.at("latents"), "int8");
  EXPECT_EQ(exact_report.at("latents"), "f32");
  expect_report_matches(int8_report, expected, kqsvd::StorageFormat::parse("int8"));
  EXPECT_DOUBLE_EQ(int8_report.at("overall").at("bits_per_element").get<double>(), 2 * 6 * 8 / 16.0);
  EXPECT_DOUBLE_EQ(exact_report.at("overall").at("bits_per_element").get<double>(), 2 * 4 * 32 / 16.0);
  // int2 in blocks of 4: 1 byte of codes, a float16 scale and minimum, 5 bytes a row.
  EXPECT_DOUBLE_EQ(int2_report.at("layers")[0].at("bits_per_element").get<double>(), 2 * 5 * 8 / 16.0);
  // Rounding costs something, and 2 bits cost more than 8; err_q never sees the cache.
  const double exact_scores = exact_report.at("overall").at("err_qk").get<double>();
  EXPECT_GT(int8_report.at("overall").at("err_qk").get<double>(), exact_scores);
  EXPECT_GT(int2_report.at("overall").at("err_qk").get<double>(), int8_report.at("overall").at("err_qk").get<double>());
  EXPECT_DOUBLE_EQ(int2_report.at("overall").at("err_q").get<double>(), exact_report.at("overall").at("err_q").get<double>());

  // --rotate hadamard: the same exact errors (a rotation changes no score), a rotated file.
  const std::string rotated = path("rotated.safetensors");
  const Result fit_rotated =
      kqsvd({"fit", "--calib", calib, "--method", "kqsvd", "--rank", "4", "--rotate", "hadamard", "--out", rotated});
  ASSERT_EQ(fit_rotated.exit_code, 0) << fit_rotated.err;
  EXPECT_EQ(kqsvd::io::ProjectionFile::load(rotated).basis(), kqsvd::LatentBasis::rotated);
  const json rotated_report = json::parse(kqsvd({"eval", "--proj", rotated, "--data", held_out, "--json"}).out);
  for (const char* key : error_keys) {
    expect_close(rotated_report.at("overall").at(key).get<double>(), exact_report.at("overall").at(key).get<double>(), key);
  }
  expect_usage_error(kqsvd({"fit", "--calib", calib, "--method", "kqsvd", "--rank", "4", "--rotate", "random", "--out",
                            path("x.safetensors")}),
                     "--rotate must be hadamard, got 'random'");

  expect_usage_error(kqsvd({"eval", "--proj", proj, "--data", held_out, "--latents", "q4_0"}),
                     "--latents q4_0 stores blocks of 32 elements, but the key rank of layer 0, KV head 0 is 4");
  expect_usage_error(kqsvd({"eval", "--proj", proj, "--data", held_out, "--latents", "int3"}),
                     "unknown storage format 'int3'");
  expect_usage_error(kqsvd({"compare", "--calib", calib, "--data", held_out, "--rank", "3", "--latents", "int4"}),
                     "--latents int4 stores blocks of 32 elements");
}

TEST_F(Cli, DataErrorsExitOne) {
  const std::string garbage = path("garbage.safetensors");
  kqsvd::test::write_file(garbage, "this is not a safetensors file");
  const auto expect_data_error = [](const Result& result, const std::string& problem) {
    EXPECT_EQ(result.exit_code, 1) << result.err;
    EXPECT_EQ(result.err.rfind("kqsvd: ", 0), 0u) << result.err;
    EXPECT_EQ(std::count(result.err.begin(), result.err.end(), '\n'), 1) << result.err;
    EXPECT_NE(result.err.find(problem), std::string::npos) << result.err;
  };
  expect_data_error(kqsvd({"analyze", "--data", path("missing.safetensors")}), "cannot open");
  expect_data_error(kqsvd({"analyze", "--data", garbage}), "garbage.safetensors");
  expect_data_error(kqsvd({"eval", "--proj", calib, "--data", held_out}), "is not a kqsvd projection file");

  // Activations without output weights cannot give err_vo / err_out unless --weights is given.
  const kqsvd::ModelShape shape{5, 8, 4, 8};
  kqsvd::io::ActivationWriter writer(shape, 3, ActivationFile(held_out).metadata());
  for (Index l = 0; l < 5; ++l) {
    writer.add(l, Eigen::MatrixXf::Ones(3, 64), Eigen::MatrixXf::Ones(3, 32), Eigen::MatrixXf::Ones(3, 32));
  }
  const std::string unweighted = path("unweighted.safetensors");
  writer.write(unweighted);
  const std::string proj = path("proj.safetensors");
  ASSERT_EQ(kqsvd({"fit", "--calib", calib, "--method", "eigen", "--rank", "2", "--out", proj}).exit_code, 0);
  expect_data_error(kqsvd({"eval", "--proj", proj, "--data", unweighted}), "give --weights FILE");
  EXPECT_EQ(kqsvd({"eval", "--proj", proj, "--data", unweighted, "--weights", calib}).exit_code, 0);
  expect_data_error(kqsvd({"fit", "--calib", unweighted, "--method", "kqsvd", "--rank", "2", "--out", path("x")}),
                    "give --weights FILE");
  // A held-out file that cannot be read.
  expect_data_error(kqsvd({"compare", "--calib", calib, "--data", garbage, "--rank", "2"}), "garbage.safetensors");
}

TEST_F(Cli, PreRopeProjectionsNeedPreRopeData) {
  // The shipped held-out activations relabelled as un-rotated (rope = none): a pre-RoPE data set.
  const ActivationFile post(held_out);
  kqsvd::io::ActivationMetadata metadata = post.metadata();
  metadata.rope = kqsvd::RopeMode::pre_rope;
  kqsvd::io::ActivationWriter writer(post.shape(), post.tokens(), metadata);
  for (Index b = 0; b < post.batch(); ++b) {
    for (Index l = 0; l < post.shape().layers; ++l) {
      Eigen::MatrixXf q(post.tokens(), 64), k(post.tokens(), 32), v(post.tokens(), 32);
      for (Index h = 0; h < 8; ++h) q.middleCols(h * 8, 8) = post.queries(l, b, h);
      for (Index h = 0; h < 4; ++h) k.middleCols(h * 8, 8) = post.keys(l, b, h);
      for (Index h = 0; h < 4; ++h) v.middleCols(h * 8, 8) = post.values(l, b, h);
      writer.add(l, q, k, v);
    }
  }
  for (Index l = 0; l < post.shape().layers; ++l) writer.set_output_weight(l, post.output_weight(l));
  const std::string pre = path("pre.safetensors"), proj = path("proj.safetensors");
  writer.write(pre);

  ASSERT_EQ(kqsvd({"fit", "--calib", pre, "--method", "kqsvd", "--rank", "4", "--out", proj}).exit_code, 0);
  EXPECT_EQ(kqsvd::io::ProjectionFile::load(proj).info().rope, kqsvd::RopeMode::pre_rope);
  const Result eval = kqsvd({"eval", "--proj", proj, "--data", pre, "--json"});
  ASSERT_EQ(eval.exit_code, 0) << eval.err;
  // Scored the pre-RoPE way: the library's measure() on the same file, which rotates with its RoPE.
  const auto projections = kqsvd::io::ProjectionFile::load(proj).projections();
  const ActivationFile pre_file(pre);
  FidelityTotals overall;
  for (const FidelityTotals& layer : kqsvd::io::measure(projections, pre_file, pre_file.output_weights())) overall += layer;
  expect_close(json::parse(eval.out).at("overall").at("err_qk").get<double>(),
               overall.relative_error(kqsvd::FidelityMetric::scores), "pre-RoPE err_qk");

  const Result mixed = kqsvd({"eval", "--proj", proj, "--data", held_out});
  EXPECT_EQ(mixed.exit_code, 1);
  EXPECT_NE(mixed.err.find("has rope = applied but"), std::string::npos) << mixed.err;
}

TEST_F(Cli, FitRefusesToOverwriteWithoutForce) {
  const std::string proj = path("proj.safetensors");
  kqsvd::test::write_file(proj, "an earlier result");
  const Result refused = kqsvd({"fit", "--calib", calib, "--method", "kqsvd", "--rank", "2", "--out", proj});
  EXPECT_EQ(refused.exit_code, 1);
  EXPECT_NE(refused.err.find("already exists; pass --force"), std::string::npos) << refused.err;
  EXPECT_EQ(kqsvd::test::read_file(proj), "an earlier result");

  const Result forced = kqsvd({"fit", "--calib", calib, "--method", "kqsvd", "--rank", "2", "--out", proj, "--force"});
  ASSERT_EQ(forced.exit_code, 0) << forced.err;
  EXPECT_EQ(kqsvd::io::ProjectionFile::load(proj).projections().keys(0, 0).rank(), 2);
}

TEST_F(Cli, AFailedFitLeavesNoFileBehind) {
  const std::string proj = path("proj.safetensors");
  const std::string garbage = path("garbage.safetensors");
  kqsvd::test::write_file(garbage, "not safetensors");
  // The second calibration file is unreadable: nothing is written.
  EXPECT_EQ(kqsvd({"fit", "--calib", calib, garbage, "--method", "kqsvd", "--rank", "2", "--out", proj}).exit_code, 1);
  // The output cannot be created (its directory is a file): the error is reported, nothing is left.
  const Result unwritable = kqsvd({"fit", "--calib", calib, "--method", "kqsvd", "--rank", "2", "--out", garbage + "/p"});
  EXPECT_EQ(unwritable.exit_code, 1);
  EXPECT_NE(unwritable.err.find("kqsvd: "), std::string::npos);
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(directory_)) names.push_back(entry.path().filename().string());
  EXPECT_EQ(names, std::vector<std::string>{"garbage.safetensors"});
}

}  // namespace kqsvd_test_cli
