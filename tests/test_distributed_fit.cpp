// Tests of kqsvd fit and kqsvd gram under MPI (mpirun -np N, Open MPI's --oversubscribe on this
// 2-core machine): the calibration files shared among ranks give the one-process fit computed here
// through the library, to rounding; the same bytes on every run with N ranks; a failing rank stops all
// of them with non-zero exit codes and no output file. Skipped when the tool was built without MPI.
#include <gtest/gtest.h>

#include <kqsvd/io/gram_file.hpp>
#include <kqsvd/io/projection_file.hpp>
#include <kqsvd/kqsvd.hpp>

#include <filesystem>
#include <string>
#include <vector>

#include "file_test_support.hpp"

namespace kqsvd_test_distributed_fit {

namespace fs = std::filesystem;
using Eigen::Index;
using kqsvd::io::ActivationFile;
using kqsvd::test::CommandResult;
using kqsvd::test::shell_quote;

const std::string binary = std::string(KQSVD_BINARY_DIR) + "/tools/kqsvd/kqsvd";
const std::string mpiexec = KQSVD_MPIEXEC;
const std::string data_dir = std::string(KQSVD_DATA_DIR) + "/activations/stories260K";
const std::string calib = data_dir + "/calib.safetensors";
const std::string held_out = data_dir + "/eval.safetensors";

class DistributedFit : public ::testing::Test {
 protected:
  void SetUp() override {
    if (mpiexec.empty()) GTEST_SKIP() << "the kqsvd tool was built without MPI (CMake found none, or KQSVD_MPI=OFF)";
    directory_ = kqsvd::test::scratch_directory();
  }
  std::string path(const std::string& name) const { return (directory_ / name).string(); }

  // mpirun -np `ranks` kqsvd `arguments`. Open MPI refuses root unless told (CI runs as root) and
  // more ranks than cores unless oversubscribed; one OpenMP thread per rank.
  CommandResult mpirun(int ranks, const std::vector<std::string>& arguments) const {
    std::string command = "OMP_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 " +
                          shell_quote(mpiexec) + " " + KQSVD_MPIEXEC_FLAGS + " -np " + std::to_string(ranks) + " " +
                          shell_quote(binary);
    for (const std::string& argument : arguments) command += " " + shell_quote(argument);
    return kqsvd::test::run_command(command, directory_);
  }

  fs::path directory_;
};

// The one-process calibration of `paths`, in order, through the library.
kqsvd::ModelCalibration library_calibration(const std::vector<std::string>& paths) {
  kqsvd::ModelCalibration calibration(ActivationFile(paths.front()).shape());
  for (const std::string& path : paths) kqsvd::io::calibrate(calibration, ActivationFile(path));
  return calibration;
}

// Every head's key and value spectra equal the expected ones to rounding (relative to the largest).
void expect_same_spectra(const kqsvd::ModelProjections<float>& actual, const kqsvd::ModelProjections<float>& expected) {
  const kqsvd::ModelShape& shape = expected.shape();
  ASSERT_EQ(actual.shape(), shape);
  for (Index l = 0; l < shape.layers; ++l) {
    for (Index h = 0; h < shape.kv_heads; ++h) {
      for (const bool keys : {true, false}) {
        const Eigen::VectorXd a = keys ? actual.keys(l, h).singular_values() : actual.values(l, h).singular_values();
        const Eigen::VectorXd e = keys ? expected.keys(l, h).singular_values() : expected.values(l, h).singular_values();
        ASSERT_EQ(a.size(), e.size());
        EXPECT_LE((a - e).cwiseAbs().maxCoeff(), 1e-9 * e.maxCoeff())
            << (keys ? "keys" : "values") << " of layer " << l << " head " << h;
        EXPECT_EQ(actual.keys(l, h).rank(), expected.keys(l, h).rank());
        EXPECT_EQ(actual.values(l, h).rank(), expected.values(l, h).rank());
      }
    }
  }
}

// Three ranks, five files (shares of 1, 2 and 2): the one-process fit of the five; twice the same bytes.
TEST_F(DistributedFit, SharedFilesFitAsOneProcessAndTheSameBytesEveryRun) {
  const std::vector<std::string> files = {calib, held_out, calib, held_out, calib};
  const auto fit = [&](const std::string& out) {
    std::vector<std::string> arguments = {"fit", "--calib"};
    arguments.insert(arguments.end(), files.begin(), files.end());
    for (const char* word : {"--method", "kqsvd", "--eps", "0.05", "--out"}) arguments.emplace_back(word);
    arguments.push_back(out);
    return mpirun(3, arguments);
  };
  const std::string first = path("first.safetensors"), second = path("second.safetensors");
  const CommandResult run = fit(first);
  ASSERT_EQ(run.exit_code, 0) << run.err;
  EXPECT_NE(run.out.find("wrote " + first), std::string::npos) << run.out;
  EXPECT_EQ(run.out.find("wrote", run.out.find("wrote") + 1), std::string::npos) << "only rank 0 writes: " << run.out;
  ASSERT_EQ(fit(second).exit_code, 0);
  EXPECT_EQ(kqsvd::test::read_file(first), kqsvd::test::read_file(second));

  const kqsvd::io::ProjectionFile file = kqsvd::io::ProjectionFile::load(first);
  EXPECT_EQ(file.info().calibration_tokens, 3 * 8 * 64 + 2 * 4 * 64);
  const auto expected = kqsvd::ModelProjections<float>::fit(library_calibration(files), ActivationFile(calib).output_weights(),
                                                            kqsvd::Method::kq_svd, kqsvd::RankSelection::error_budget(0.05),
                                                            kqsvd::RankSelection::error_budget(0.05));
  expect_same_spectra(file.projections(), expected);
  EXPECT_TRUE(file.projections().keys(2, 1).encoder().isApprox(expected.keys(2, 1).encoder(), 1e-4));
}

// kqsvd gram over 3 ranks: the one-process Grams; fit --grams over 4 ranks and 2 Gram files (ranks 0
// and 2 have nothing to read), the output weights only in the second file: rank 3 sends them to rank 0.
TEST_F(DistributedFit, GramFilesAcrossRanksIncludingEmptyShares) {
  const std::string grams = path("grams.safetensors");
  const CommandResult gram = mpirun(3, {"gram", "--calib", calib, held_out, calib, "--out", grams});
  ASSERT_EQ(gram.exit_code, 0) << gram.err;
  const kqsvd::io::GramFile file = kqsvd::io::GramFile::load(grams);
  const kqsvd::ModelCalibration expected = library_calibration({calib, held_out, calib});
  EXPECT_EQ(file.calibration().token_count(), expected.token_count());
  for (Index l = 0; l < 5; ++l) {
    for (Index h = 0; h < 4; ++h) {
      const Eigen::MatrixXd k = expected.keys(l, h).gram(), q = expected.queries(l, h).gram();
      EXPECT_LE((file.calibration().keys(l, h).gram() - k).norm(), 1e-12 * k.norm()) << l << " " << h;
      EXPECT_LE((file.calibration().queries(l, h).gram() - q).norm(), 1e-12 * q.norm()) << l << " " << h;
    }
  }
  ASSERT_EQ(file.output_weights().size(), 5u);

  const std::string without_weights = path("no_weights.safetensors");
  kqsvd::io::GramFile(file.calibration(), file.info()).save(without_weights);
  const std::string out = path("proj.safetensors");
  const CommandResult fit =
      mpirun(4, {"fit", "--grams", without_weights, grams, "--method", "kqsvd", "--rank", "4", "--out", out});
  ASSERT_EQ(fit.exit_code, 0) << fit.err;
  kqsvd::ModelCalibration both = file.calibration();
  both.merge(file.calibration());
  const auto library = kqsvd::ModelProjections<float>::fit(both, file.output_weights(), kqsvd::Method::kq_svd,
                                                           kqsvd::RankSelection::fixed(4), kqsvd::RankSelection::fixed(4));
  expect_same_spectra(kqsvd::io::ProjectionFile::load(out).projections(), library);
}

// A file that rank 1 cannot read: every rank says so and fails, mpirun fails, and there is no output.
TEST_F(DistributedFit, AFailingRankStopsEveryRankAndWritesNothing) {
  const std::string truncated = path("truncated.safetensors");
  kqsvd::test::write_file(truncated, kqsvd::test::read_file(held_out).substr(0, 5000));
  const std::string out = path("proj.safetensors");
  const CommandResult run = mpirun(3, {"fit", "--calib", calib, truncated, calib, "--method", "ksvd", "--rank", "4", "--out", out});
  EXPECT_EQ(run.exit_code, 1) << run.err;
  EXPECT_FALSE(fs::exists(out));
  EXPECT_NE(run.err.find("kqsvd (rank 1 of 3): kqsvd::io::SafetensorsFile: '" + truncated + "'"), std::string::npos) << run.err;
  for (const char* rank : {"kqsvd (rank 0 of 3): stopped: rank 1 of 3 failed", "kqsvd (rank 2 of 3): stopped: rank 1 of 3 failed"}) {
    EXPECT_NE(run.err.find(rank), std::string::npos) << run.err;
  }

  // A mistake on the command line: exit 2, from every rank.
  const CommandResult usage = mpirun(3, {"fit", "--calib", calib, "--method", "kqsvd", "--rank", "40", "--out", out});
  EXPECT_EQ(usage.exit_code, 2) << usage.err;
  for (const char* rank : {"kqsvd (rank 0 of 3): --rank 40 is more than head_dim 8", "kqsvd (rank 1 of 3): --rank 40",
                           "kqsvd (rank 2 of 3): --rank 40"}) {
    EXPECT_NE(usage.err.find(rank), std::string::npos) << usage.err;
  }
  // Commands that do not share work refuse to run several times over.
  const CommandResult eval = mpirun(2, {"analyze", "--data", calib});
  EXPECT_EQ(eval.exit_code, 2);
  EXPECT_NE(eval.err.find("kqsvd analyze runs in one process; under mpirun only fit and gram share work"), std::string::npos)
      << eval.err;
  EXPECT_FALSE(fs::exists(out));
}

}  // namespace kqsvd_test_distributed_fit
