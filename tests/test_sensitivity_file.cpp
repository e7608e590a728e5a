// Sensitivity files (io/sensitivity_file.hpp): what is written is read back, per-layer and per-head
// weights alike, and every malformed file is a FormatError naming the file and the entry.
#include <gtest/gtest.h>

#include <kqsvd/io/sensitivity_file.hpp>

#include <string>

#include "file_test_support.hpp"

namespace kqsvd_test_sensitivity_file {

using kqsvd::io::read_sensitivity_file;
using kqsvd::test::read_file;
using kqsvd::test::scratch_directory;
using kqsvd::test::write_file;

const kqsvd::ModelShape shape{/*layers=*/2, /*query_heads=*/4, /*kv_heads=*/2, /*head_dim=*/8};

TEST(SensitivityFile, ReadsBackWhatItWrote) {
  const auto path = scratch_directory() / "sensitivity.json";
  kqsvd::io::Sensitivity written{kqsvd::Method::k_svd, kqsvd::RopeMode::pre_rope, "toy", "probe text", kqsvd::LossWeights(shape)};
  written.weights.set_layer(0, 0.5, 2.0);
  written.weights.set_key(1, 0, 0.25);
  written.weights.set_key(1, 1, 4.0);
  written.weights.set_layer(1, 0.0, 1e-3);
  written.weights.set_key(1, 1, 4.0);
  kqsvd::io::write_sensitivity_file(path.string(), written);
  EXPECT_THROW(kqsvd::io::write_sensitivity_file(path.string(), written), kqsvd::IoError);  // no silent overwrite
  const std::string text = read_file(path);
  EXPECT_NE(text.find("\"format\": \"kqsvd.sensitivity\""), std::string::npos);
  EXPECT_NE(text.find("\"key\": [\n"), std::string::npos) << text;  // layer 1's keys differ per head
  const kqsvd::io::Sensitivity read = read_sensitivity_file(path.string(), shape);
  EXPECT_EQ(read.method, kqsvd::Method::k_svd);
  EXPECT_EQ(read.rope, kqsvd::RopeMode::pre_rope);
  EXPECT_EQ(read.model, "toy");
  EXPECT_EQ(read.probe, "probe text");
  for (Eigen::Index l = 0; l < 2; ++l) {
    for (Eigen::Index h = 0; h < 2; ++h) {
      EXPECT_EQ(read.weights.key(l, h), written.weights.key(l, h));
      EXPECT_EQ(read.weights.value(l, h), written.weights.value(l, h));
    }
  }
  EXPECT_EQ(read.weights.key(1, 1), 4.0);
  EXPECT_EQ(read.weights.key(1, 0), 0.0);
}

TEST(SensitivityFile, NamesWhatIsWrongWithAFile) {
  const auto path = scratch_directory() / "bad_sensitivity.json";
  const std::string good_layers = R"([{"key": 1, "value": 2}, {"key": [1, 2], "value": 0}])";
  const auto with = [&](const std::string& body) { return R"({"format": "kqsvd.sensitivity", "method": "kqsvd", )" + body + "}"; };
  write_file(path, with(R"("layers": )" + good_layers));
  EXPECT_NO_THROW(read_sensitivity_file(path.string(), shape));
  const std::pair<std::string, std::string> cases[] = {
      {"{\"format\": \"kqsvd.sensitivity\", ", "not valid JSON"},
      {"[1, 2]", "not a JSON object"},
      {R"({"format": "other", "method": "kqsvd", "layers": [] })", "expected \"kqsvd.sensitivity\""},
      {with(R"("version": 2, "layers": )" + good_layers), "version"},
      {R"({"format": "kqsvd.sensitivity", "layers": [] })", "\"method\""},
      {with(R"("rope": "sideways", "layers": )" + good_layers), "\"rope\""},
      {R"({"format": "kqsvd.sensitivity", "method": "svd", "layers": [] })", "expected kqsvd, ksvd or eigen"},
      {with(R"("layers": [{"key": 1, "value": 2}])"), "has 1 layers; the model has 2"},
      {with(R"("layers": [{"key": 1, "value": 2}, {"key": -1, "value": 0}])"), "layer 1 \"key\" is -1"},
      {with(R"("layers": [{"key": 1, "value": 2}, {"key": 1}])"), "layer 1 \"value\" is missing"},
      {with(R"("layers": [{"key": "1", "value": 2}, {"key": 1, "value": 1}])"), "layer 0 \"key\" is not a number"},
      {with(R"("layers": [{"key": [1, 2, 3], "value": 2}, {"key": 1, "value": 1}])"), "has 3 weights; the model has 2 KV heads"},
      {with(R"("layers": [{"key": [1, 1e999], "value": 2}, {"key": 1, "value": 1}])"), "bad_sensitivity.json"},
      {with(R"("layers": 7)"), "no \"layers\" array"},
  };
  for (const auto& [content, expected] : cases) {
    write_file(path, content);
    try {
      read_sensitivity_file(path.string(), shape);
      ADD_FAILURE() << "accepted: " << content;
    } catch (const kqsvd::FormatError& error) {
      const std::string message = error.what();
      EXPECT_NE(message.find(expected), std::string::npos) << message;
      EXPECT_NE(message.find(path.string()), std::string::npos) << message;
    }
  }
  EXPECT_THROW(read_sensitivity_file((scratch_directory() / "missing.json").string(), shape), kqsvd::IoError);
}

}  // namespace kqsvd_test_sensitivity_file
