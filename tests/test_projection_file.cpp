// Tests for kqsvd/io/projection_file.hpp: an exact save/load round trip (per-head ranks, all methods,
// every metadata field), no silent overwrite, and corrupt or inconsistent files rejected with a
// FormatError that names the file and the entry at fault.
#include <gtest/gtest.h>

#include <kqsvd/io/projection_file.hpp>
#include <kqsvd/kqsvd.hpp>

#include <filesystem>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "file_test_support.hpp"

namespace kqsvd_test_projection_file {

namespace fs = std::filesystem;
using Eigen::Index;
using kqsvd::FormatError;
using kqsvd::ModelShape;
using kqsvd::RankSelection;
using kqsvd::io::DType;
using kqsvd::io::ProjectionFile;
using kqsvd::io::ProjectionInfo;
using kqsvd::io::SafetensorsFile;
using kqsvd::io::SafetensorsWriter;
using kqsvd::test::expect_error;
using kqsvd::test::scratch_directory;

const ModelShape shape{/*layers=*/2, /*query_heads=*/4, /*kv_heads=*/2, /*head_dim=*/8};

// Projections fitted on random data whose heads have different spectra, so that an error budget picks
// different ranks in different heads.
kqsvd::ModelProjections<float> fitted(kqsvd::Method method, const RankSelection& rank) {
  std::mt19937 engine(42);
  std::normal_distribution<double> normal;
  kqsvd::ModelCalibration calibration(shape);
  std::vector<Eigen::MatrixXd> weights;
  for (Index l = 0; l < shape.layers; ++l) {
    const auto random = [&](Index rows, Index cols) {
      Eigen::MatrixXd m(rows, cols);
      for (Index i = 0; i < m.size(); ++i) m.data()[i] = normal(engine);
      return m;
    };
    Eigen::MatrixXd keys = random(40, 16), queries = random(40, 32), values = random(40, 16);
    // Head 1 of each layer (its keys and its group's queries) is nearly rank 2, head 0 is full rank.
    keys.rightCols(8) = random(40, 2) * random(2, 8) + 0.01 * random(40, 8);
    queries.rightCols(16) = random(40, 2) * random(2, 16) + 0.01 * random(40, 16);
    calibration.add(l, queries, keys, values);
    weights.push_back(random(6, 32));
  }
  return kqsvd::ModelProjections<float>::fit(calibration, weights, method, rank, rank);
}

ProjectionInfo sample_info() {
  ProjectionInfo info;
  info.model = "tinyllama-h64";
  info.rope = kqsvd::RopeMode::pre_rope;
  info.rope_style = kqsvd::RopeStyle::rotate_half;
  info.rope_theta = 1e6;
  info.key_rank = RankSelection::error_budget(0.05);
  info.value_rank = RankSelection::fixed(3);
  info.calibration_tokens = 12345;
  info.producer = "kqsvd test";
  return info;
}

TEST(ProjectionFile, RoundTripIsExact) {
  const fs::path directory = scratch_directory();
  for (const kqsvd::Method method : kqsvd::all_methods) {
    const auto projections = fitted(method, RankSelection::error_budget(0.05));
    ASSERT_NE(projections.keys(0, 0).rank(), projections.keys(0, 1).rank()) << "the test needs per-head ranks";
    const std::string path = (directory / (std::string(kqsvd::to_string(method)) + ".safetensors")).string();
    ProjectionFile(projections, sample_info()).save(path);

    const ProjectionFile loaded = ProjectionFile::load(path);
    EXPECT_EQ(loaded.method(), method);
    EXPECT_EQ(loaded.shape(), shape);
    for (Index l = 0; l < shape.layers; ++l) {
      for (Index h = 0; h < shape.kv_heads; ++h) {
        for (const bool key : {true, false}) {
          const auto& original = key ? projections.keys(l, h) : projections.values(l, h);
          const auto& back = key ? loaded.projections().keys(l, h) : loaded.projections().values(l, h);
          EXPECT_EQ(back.method(), original.method());
          EXPECT_EQ(back.encoder(), original.encoder());
          EXPECT_EQ(back.decoder(), original.decoder());
          EXPECT_EQ(back.singular_values(), original.singular_values());  // doubles, bit for bit
        }
      }
    }
    const ProjectionInfo& info = loaded.info();
    EXPECT_EQ(info.model, "tinyllama-h64");
    EXPECT_EQ(info.rope, kqsvd::RopeMode::pre_rope);
    EXPECT_EQ(info.rope_style, kqsvd::RopeStyle::rotate_half);
    EXPECT_EQ(info.rope_theta, 1e6);
    ASSERT_TRUE(info.key_rank && info.value_rank);
    EXPECT_FALSE(info.key_rank->is_fixed());
    EXPECT_EQ(info.key_rank->epsilon(), 0.05);
    EXPECT_EQ(info.value_rank->rank(), 3);
    EXPECT_EQ(info.calibration_tokens, 12345);
    EXPECT_EQ(info.producer, "kqsvd test");
  }
}

// A rotated file loads rotated, so that nothing truncates its mixed coordinates by mistake.
TEST(ProjectionFile, KeepsWhetherTheLatentsAreRotated) {
  const std::string path = (scratch_directory() / "rotated.safetensors").string();
  const auto projections = kqsvd::hadamard_rotated(fitted(kqsvd::Method::kq_svd, RankSelection::fixed(4)));
  ProjectionFile(projections, sample_info()).save(path);
  EXPECT_EQ(SafetensorsFile(path).metadata().at("latent_basis"), "rotated");
  const ProjectionFile loaded = ProjectionFile::load(path);
  EXPECT_EQ(loaded.basis(), kqsvd::LatentBasis::rotated);
  EXPECT_EQ(loaded.projections().values(1, 0).basis(), kqsvd::LatentBasis::rotated);
  EXPECT_EQ(loaded.projections().keys(1, 0).encoder(), projections.keys(1, 0).encoder());
  EXPECT_THROW(loaded.projections().truncated(kqsvd::RankAllocation::uniform(shape, 2, 2)), kqsvd::InvalidArgument);
  // Some heads rotated and others not is refused: the file has one basis.
  const auto plain = fitted(kqsvd::Method::kq_svd, RankSelection::fixed(4));
  std::vector<kqsvd::LowRankProjection<float>> keys, values;
  for (Index l = 0; l < shape.layers; ++l) {
    for (Index h = 0; h < shape.kv_heads; ++h) {
      keys.push_back(l == 0 ? projections.keys(l, h) : plain.keys(l, h));
      values.push_back(projections.values(l, h));
    }
  }
  expect_error<kqsvd::InvalidArgument>(
      [&] { ProjectionFile(kqsvd::ModelProjections<float>(shape, keys, values), sample_info()); },
      "mix rotated and unrotated heads (layer 1, KV head 0)");
}

TEST(ProjectionFile, TheLayoutIsTheDocumentedOne) {
  const std::string path = (scratch_directory() / "p.safetensors").string();
  const auto projections = fitted(kqsvd::Method::kq_svd, RankSelection::fixed(3));
  ProjectionFile(projections, sample_info()).save(path);
  const SafetensorsFile file(path);
  EXPECT_EQ(file.size(), 2u * 2u * 6u);
  EXPECT_EQ(file.info("layers.1.kv_heads.0.key.encoder").shape, (std::vector<std::int64_t>{8, 3}));
  EXPECT_EQ(file.info("layers.1.kv_heads.0.value.decoder").dtype, DType::f32);
  EXPECT_EQ(file.info("layers.0.kv_heads.1.key.singular_values").dtype, DType::f64);
  EXPECT_EQ(file.metadata().at("format"), "kqsvd.projections");
  EXPECT_EQ(file.metadata().at("format_version"), "1");
  EXPECT_EQ(file.metadata().at("method"), "kqsvd");
  EXPECT_EQ(file.metadata().at("head_dim"), "8");
  EXPECT_EQ(file.metadata().at("rope_theta"), "1000000");
  EXPECT_EQ(file.metadata().at("key_rank_selection"), "epsilon:0.05");
  EXPECT_EQ(file.metadata().at("value_rank_selection"), "rank:3");
  EXPECT_EQ(file.metadata().at("latent_basis"), "ordered_by_importance");
  // The encoder read back through the generic reader is A itself.
  EXPECT_EQ(file.read_matrix<float>("layers.1.kv_heads.1.key.encoder"), projections.keys(1, 1).encoder());
}

TEST(ProjectionFile, RefusesToReplaceAFileUnlessAsked) {
  const fs::path path = scratch_directory() / "p.safetensors";
  kqsvd::test::write_file(path, "keep me");
  const ProjectionFile file(fitted(kqsvd::Method::k_svd, RankSelection::fixed(2)), sample_info());
  EXPECT_THROW(file.save(path.string()), kqsvd::IoError);
  EXPECT_EQ(kqsvd::test::read_file(path), "keep me");
  file.save(path.string(), /*overwrite=*/true);
  EXPECT_EQ(ProjectionFile::load(path.string()).method(), kqsvd::Method::k_svd);
}

// A valid file's contents, editable, then written back.
struct Contents {
  std::map<std::string, std::string> metadata;
  std::map<std::string, std::pair<std::vector<std::int64_t>, std::vector<double>>> tensors;
};

Contents valid_contents() {
  const std::string path = (scratch_directory() / "valid.safetensors").string();
  ProjectionFile(fitted(kqsvd::Method::kq_svd, RankSelection::fixed(3)), sample_info()).save(path);
  const SafetensorsFile file(path);
  Contents contents;
  contents.metadata = file.metadata();
  for (const std::string& name : file.names()) contents.tensors[name] = {file.info(name).shape, file.read<double>(name)};
  return contents;
}

std::string write_contents(const Contents& contents) {
  SafetensorsWriter writer;
  for (const auto& [key, value] : contents.metadata) writer.set_metadata(key, value);
  for (const auto& [name, tensor] : contents.tensors) {
    writer.add(name, name.find("singular_values") != std::string::npos ? DType::f64 : DType::f32, tensor.first,
               tensor.second);
  }
  const std::string path = (scratch_directory() / "changed.safetensors").string();
  writer.write(path);
  return path;
}

void expect_rejected(const std::function<void(Contents&)>& change, const std::string& problem) {
  Contents contents = valid_contents();
  change(contents);
  const std::string path = write_contents(contents);
  expect_error<FormatError>([&] { ProjectionFile::load(path); }, problem, path);
}

TEST(ProjectionFile, AnUnchangedCopyLoads) {
  // The rejection tests below edit this copy; unchanged, it must load.
  const ProjectionFile copy = ProjectionFile::load(write_contents(valid_contents()));
  EXPECT_EQ(copy.projections().keys(1, 1).rank(), 3);
}

TEST(ProjectionFile, RejectsWrongOrMissingMetadata) {
  expect_rejected([](Contents& c) { c.metadata.erase("format"); }, "is not a kqsvd projection file");
  expect_rejected([](Contents& c) { c.metadata["format_version"] = "2"; }, "format_version '2'");
  expect_rejected([](Contents& c) { c.metadata["method"] = "pca"; }, "method = 'pca'");
  expect_rejected([](Contents& c) { c.metadata.erase("head_dim"); }, "no 'head_dim' entry");
  expect_rejected([](Contents& c) { c.metadata["layers"] = "two"; }, "layers = 'two'");
  expect_rejected([](Contents& c) { c.metadata["kv_heads"] = "3"; }, "3 KV heads, which do not divide");
  expect_rejected([](Contents& c) { c.metadata["rope"] = "sometimes"; }, "rope = 'sometimes'");
  expect_rejected([](Contents& c) { c.metadata["rope_theta"] = "nan"; }, "rope_theta = 'nan'");
  expect_rejected([](Contents& c) { c.metadata["key_rank_selection"] = "rank:0"; }, "key_rank_selection = 'rank:0'");
  expect_rejected([](Contents& c) { c.metadata["calibration_tokens"] = "-1"; }, "calibration_tokens = '-1'");
  expect_rejected([](Contents& c) { c.metadata["latent_basis"] = "sideways"; }, "latent_basis = 'sideways'");
}

TEST(ProjectionFile, RejectsMissingExtraOrMisshapenTensors) {
  expect_rejected([](Contents& c) { c.tensors.erase("layers.1.kv_heads.0.value.decoder"); },
                  "no tensor 'layers.1.kv_heads.0.value.decoder'");
  expect_rejected([](Contents& c) { c.tensors["layers.2.kv_heads.0.key.encoder"] = {{8, 3}, std::vector<double>(24)}; },
                  "has tensor 'layers.2.kv_heads.0.key.encoder', which is not part");
  expect_rejected([](Contents& c) { c.tensors["layers.0.kv_heads.1.key.encoder"] = {{8, 9}, std::vector<double>(72)}; },
                  "expected [8, r] with 1 <= r <= 8");
  expect_rejected([](Contents& c) { c.tensors["layers.0.kv_heads.1.key.encoder"] = {{8, 0}, {}}; },
                  "'layers.0.kv_heads.1.key.encoder' of shape [8, 0]");
  expect_rejected([](Contents& c) { c.tensors["layers.0.kv_heads.0.value.decoder"] = {{8, 2}, std::vector<double>(16)}; },
                  "not the encoder's [8, 3]");
  expect_rejected([](Contents& c) { c.tensors["layers.1.kv_heads.1.key.singular_values"] = {{7}, std::vector<double>(7)}; },
                  "'layers.1.kv_heads.1.key.singular_values' of shape [7], expected [8]");
  expect_rejected([](Contents& c) { c.tensors["layers.1.kv_heads.1.key.encoder"].first = {24}; }, "expected rank 2");
  expect_rejected([](Contents& c) { c.tensors["layers.0.kv_heads.0.key.singular_values"].second[5] = -1.0; },
                  "negative singular value at index 5");
  expect_rejected(
      [](Contents& c) { c.tensors["layers.0.kv_heads.0.key.encoder"].second[4] = std::numeric_limits<double>::infinity(); },
      "non-finite value");
}

TEST(ProjectionFile, RejectsActivationFilesAndTruncatedFiles) {
  const fs::path directory = scratch_directory();
  const std::string path = (directory / "p.safetensors").string();
  ProjectionFile(fitted(kqsvd::Method::kq_svd, RankSelection::fixed(3)), sample_info()).save(path);
  std::string bytes = kqsvd::test::read_file(path);
  bytes.resize(bytes.size() - 5);
  kqsvd::test::write_file(directory / "cut.safetensors", bytes);
  expect_error<FormatError>([&] { ProjectionFile::load((directory / "cut.safetensors").string()); }, "cut.safetensors");

  const std::string activations = std::string(KQSVD_DATA_DIR) + "/activations/stories260K/eval.safetensors";
  expect_error<FormatError>([&] { ProjectionFile::load(activations); }, "is it an activation file?", activations);
  EXPECT_THROW(ProjectionFile::load((directory / "missing.safetensors").string()), kqsvd::IoError);
}

}  // namespace kqsvd_test_projection_file
