// Tests for kqsvd/io/activation_file.hpp: the saved-activation layout (validation and its messages), the
// writer/reader round trip, 3-D tensors as one sequence, the calibrate/measure helpers against direct
// calls and independent computations, and the shipped stories260K capture against a fresh forward pass.
#include <gtest/gtest.h>

#include <kqsvd/io/activation_evaluation.hpp>
#include <kqsvd/io/activation_writer.hpp>
#include <kqsvd/kqsvd.hpp>
#include <kqsvd/llama/full_kv_cache.hpp>
#include <kqsvd/llama/story_text.hpp>
#include <kqsvd/llama/tokenizer.hpp>
#include <kqsvd/llama/transformer.hpp>

#include <Eigen/SVD>

#include <filesystem>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "file_test_support.hpp"
#include "test_support.hpp"

namespace kqsvd_test_activations {

using kqsvd::test::repository_data;

namespace fs = std::filesystem;
using Eigen::Index;
using Eigen::MatrixXd;
using kqsvd::FidelityMetric;
using kqsvd::FidelityTotals;
using kqsvd::FormatError;
using kqsvd::ModelShape;
using kqsvd::io::ActivationFile;
using kqsvd::io::ActivationMetadata;
using kqsvd::io::ActivationWriter;
using kqsvd::io::DType;
using kqsvd::RopeMode;
using kqsvd::io::SafetensorsWriter;
using kqsvd::test::expect_error;
using kqsvd::test::scratch_directory;
using Matrix = kqsvd::RowMatrix<float>;

// ------------------------------------------------------------------------------------------------
// Synthetic captures: what a forward pass hands over, per layer and sequence, heads side by side.

struct Capture {
  ModelShape shape;
  Index tokens = 0;
  Index batch = 0;
  std::vector<std::vector<Matrix>> queries, keys, values;  // [layer][sequence], T x heads*d
  std::vector<Matrix> output_weights;                      // [layer], hidden x query_heads*d
};

Matrix random_matrix(Index rows, Index cols, std::mt19937& engine, double scale = 1.0) {
  std::normal_distribution<float> normal(0.0f, static_cast<float>(scale));
  Matrix m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = normal(engine);
  return m;
}

// Keys and queries with a few dominant directions, so that low ranks are meaningful.
Capture random_capture(const ModelShape& shape, Index tokens, Index batch, Index hidden, unsigned seed) {
  std::mt19937 engine(seed);
  Capture capture{shape, tokens, batch, {}, {}, {}, {}};
  const Index d = shape.head_dim;
  const Matrix mixing = random_matrix(d, d, engine);
  for (Index l = 0; l < shape.layers; ++l) {
    capture.queries.emplace_back();
    capture.keys.emplace_back();
    capture.values.emplace_back();
    for (Index b = 0; b < batch; ++b) {
      const auto skewed = [&](Index heads) {
        Matrix m = random_matrix(tokens, heads * d, engine);
        for (Index h = 0; h < heads; ++h) m.middleCols(h * d, d) = (m.middleCols(h * d, d) * mixing).eval();
        return m;
      };
      capture.queries[l].push_back(skewed(shape.query_heads));
      capture.keys[l].push_back(skewed(shape.kv_heads));
      capture.values[l].push_back(random_matrix(tokens, shape.kv_heads * d, engine));
    }
    capture.output_weights.push_back(random_matrix(hidden, shape.query_heads * d, engine, 0.2));
  }
  return capture;
}

ActivationMetadata metadata(RopeMode rope = RopeMode::post_rope) {
  ActivationMetadata m;
  m.model = "synthetic";
  m.rope = rope;
  m.rope_style = kqsvd::RopeStyle::rotate_half;
  m.rope_theta = 500000.0;
  return m;
}

void write_capture(const Capture& capture, const fs::path& path, const ActivationMetadata& meta = metadata(),
                   DType storage = DType::f32, bool with_weights = true) {
  ActivationWriter writer(capture.shape, capture.tokens, meta, storage);
  for (Index b = 0; b < capture.batch; ++b) {
    for (Index l = 0; l < capture.shape.layers; ++l) {
      writer.add(l, capture.queries[l][b], capture.keys[l][b], capture.values[l][b]);
    }
  }
  if (with_weights) {
    for (Index l = 0; l < capture.shape.layers; ++l) writer.set_output_weight(l, capture.output_weights[l]);
  }
  writer.set_metadata("note", "test");
  writer.write(path.string());
}

const ModelShape small_shape{/*layers=*/2, /*query_heads=*/4, /*kv_heads=*/2, /*head_dim=*/8};

// ------------------------------------------------------------------------------------------------
// Round trip

TEST(ActivationFile, WriterReaderRoundTripIsExactInFloat32) {
  const fs::path path = scratch_directory() / "capture.safetensors";
  const Capture capture = random_capture(small_shape, /*tokens=*/5, /*batch=*/3, /*hidden=*/12, 1);
  write_capture(capture, path);

  const ActivationFile file(path.string());
  EXPECT_EQ(file.shape(), small_shape);
  EXPECT_EQ(file.batch(), 3);
  EXPECT_EQ(file.tokens(), 5);
  EXPECT_EQ(file.token_count(), 15);
  EXPECT_EQ(file.metadata().model, "synthetic");
  EXPECT_EQ(file.metadata().rope, RopeMode::post_rope);
  EXPECT_EQ(file.metadata().rope_style, kqsvd::RopeStyle::rotate_half);
  EXPECT_EQ(file.metadata().rope_theta, 500000.0);
  EXPECT_EQ(file.tensors().metadata().at("rope_theta"), "500000");
  EXPECT_EQ(file.tensors().metadata().at("note"), "test");
  EXPECT_EQ(file.tensors().info("layers.1.q").shape, (std::vector<std::int64_t>{3, 4, 5, 8}));
  ASSERT_TRUE(file.has_output_weights());
  EXPECT_EQ(file.hidden_size(), 12);

  const Index d = small_shape.head_dim;
  for (Index l = 0; l < small_shape.layers; ++l) {
    EXPECT_EQ(file.output_weight(l), capture.output_weights[l]);
    for (Index b = 0; b < 3; ++b) {
      for (Index h = 0; h < small_shape.query_heads; ++h) {
        EXPECT_EQ(file.queries(l, b, h), Matrix(capture.queries[l][b].middleCols(h * d, d)));
      }
      for (Index h = 0; h < small_shape.kv_heads; ++h) {
        EXPECT_EQ(file.keys(l, b, h), Matrix(capture.keys[l][b].middleCols(h * d, d)));
        EXPECT_EQ(file.values(l, b, h), Matrix(capture.values[l][b].middleCols(h * d, d)));
        // Query heads 2h and 2h+1 read KV head h: stacked in that order.
        const Matrix group = file.group_queries(l, b, h);
        ASSERT_EQ(group.rows(), 2 * 5);
        EXPECT_EQ(Matrix(group.topRows(5)), Matrix(capture.queries[l][b].middleCols(2 * h * d, d)));
        EXPECT_EQ(Matrix(group.bottomRows(5)), Matrix(capture.queries[l][b].middleCols((2 * h + 1) * d, d)));
      }
    }
  }
}

TEST(ActivationFile, HalfPrecisionStorageRoundsEachValueOnce) {
  const fs::path directory = scratch_directory();
  const Capture capture = random_capture(small_shape, 4, 2, 6, 2);
  write_capture(capture, directory / "f16.safetensors", metadata(), DType::f16);
  write_capture(capture, directory / "bf16.safetensors", metadata(), DType::bf16);
  const ActivationFile half((directory / "f16.safetensors").string());
  const ActivationFile brain((directory / "bf16.safetensors").string());
  EXPECT_EQ(half.tensors().info("layers.0.k").dtype, DType::f16);
  const Matrix original = capture.keys[1][1].middleCols(8, 8);
  const Matrix from_half = half.keys(1, 1, 1);
  const Matrix from_brain = brain.keys(1, 1, 1);
  for (Index i = 0; i < original.size(); ++i) {
    EXPECT_EQ(from_half.data()[i], static_cast<float>(Eigen::half(original.data()[i])));
    EXPECT_EQ(from_brain.data()[i], static_cast<float>(Eigen::bfloat16(original.data()[i])));
  }
}

TEST(ActivationFile, ThreeDimensionalTensorsAreOneSequence) {
  const fs::path path = scratch_directory() / "unbatched.safetensors";
  std::mt19937 engine(3);
  const Matrix q = random_matrix(4 * 6, 8, engine), k = random_matrix(2 * 6, 8, engine), v = random_matrix(2 * 6, 8, engine);
  SafetensorsWriter writer;
  writer.set_metadata("rope", "none");
  writer.set_metadata("rope_style", "adjacent");
  writer.set_metadata("rope_theta", "10000.0");
  writer.set_metadata("model", "hf-model");
  writer.add("layers.0.q", DType::f32, {4, 6, 8}, q);
  writer.add("layers.0.k", DType::f32, {2, 6, 8}, k);
  writer.add("layers.0.v", DType::f32, {2, 6, 8}, v);
  writer.add("input_ids_as_float", DType::f32, {1, 6}, Matrix::Zero(1, 6));  // not part of the layout: ignored
  writer.write(path.string());

  const ActivationFile file(path.string());
  EXPECT_EQ(file.batch(), 1);
  EXPECT_EQ(file.tokens(), 6);
  EXPECT_EQ(file.shape(), (ModelShape{1, 4, 2, 8}));
  EXPECT_EQ(file.metadata().rope, RopeMode::pre_rope);
  EXPECT_EQ(file.metadata().rope_theta, 10000.0);
  EXPECT_FALSE(file.has_output_weights());
  EXPECT_TRUE(file.output_weights().empty());
  // [heads, T, d] in C order: head h is rows h*T .. h*T+T-1 of the flattened matrix.
  EXPECT_EQ(file.queries(0, 0, 3), Matrix(q.middleRows(3 * 6, 6)));
  EXPECT_EQ(file.keys(0, 0, 1), Matrix(k.middleRows(6, 6)));
  EXPECT_EQ(file.values(0, 0, 0), Matrix(v.topRows(6)));
  EXPECT_THROW(file.keys(0, 1, 0), kqsvd::InvalidArgument);  // only sequence 0
  EXPECT_THROW(file.output_weight(0), kqsvd::InvalidArgument);
}

TEST(ActivationWriter, RejectsInconsistentInput) {
  ActivationWriter writer(small_shape, 5, metadata());
  std::mt19937 engine(4);
  const Matrix q = random_matrix(5, 32, engine), kv = random_matrix(5, 16, engine);
  EXPECT_THROW(writer.add(0, q, q, kv), kqsvd::InvalidArgument);                              // keys too wide
  EXPECT_THROW(writer.add(0, Matrix(q.topRows(4)), Matrix(kv.topRows(4)), Matrix(kv.topRows(4))), kqsvd::InvalidArgument);
  EXPECT_THROW(writer.add(2, q, kv, kv), kqsvd::InvalidArgument);                             // no layer 2
  EXPECT_THROW(writer.set_metadata("rope", "none"), kqsvd::InvalidArgument);
  EXPECT_THROW(writer.write((scratch_directory() / "empty.safetensors").string()), kqsvd::InvalidArgument);
  writer.add(0, q, kv, kv);
  EXPECT_EQ(writer.sequences(), 0);  // layer 1 has none yet
  EXPECT_THROW(writer.write((scratch_directory() / "half.safetensors").string()), kqsvd::InvalidArgument);
  writer.add(1, q, kv, kv);
  EXPECT_EQ(writer.sequences(), 1);
  Matrix bad = q;
  bad(2, 3) = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THROW(writer.add(1, bad, kv, kv), kqsvd::InvalidArgument);
  EXPECT_THROW(ActivationWriter(small_shape, 0, metadata()), kqsvd::InvalidArgument);
}

TEST(ActivationWriter, RefusesToReplaceAFileUnlessAsked) {
  const fs::path path = scratch_directory() / "out.safetensors";
  kqsvd::test::write_file(path, "precious");
  const Capture capture = random_capture(small_shape, 3, 1, 4, 5);
  EXPECT_THROW(write_capture(capture, path), kqsvd::IoError);
  EXPECT_EQ(kqsvd::test::read_file(path), "precious");
}

// ------------------------------------------------------------------------------------------------
// Layout validation: every malformed layout is a FormatError naming the file and what is wrong.

struct LayoutSpec {
  std::map<std::string, std::vector<std::int64_t>> tensors;
  std::map<std::string, std::string> metadata;
};

LayoutSpec valid_layout() {
  LayoutSpec spec;
  for (const char* layer : {"0", "1"}) {
    const std::string prefix = std::string("layers.") + layer + ".";
    spec.tensors[prefix + "q"] = {2, 4, 3, 8};
    spec.tensors[prefix + "k"] = {2, 2, 3, 8};
    spec.tensors[prefix + "v"] = {2, 2, 3, 8};
  }
  spec.metadata = {{"rope", "applied"}, {"rope_style", "half"}, {"rope_theta", "10000"}, {"model", "m"}};
  return spec;
}

std::string write_layout(const LayoutSpec& spec, const std::string& name) {
  const fs::path path = scratch_directory() / (name + ".safetensors");
  SafetensorsWriter writer;
  for (const auto& [key, value] : spec.metadata) writer.set_metadata(key, value);
  for (const auto& [tensor, shape] : spec.tensors) {
    std::int64_t count = 1;
    for (const std::int64_t dimension : shape) count *= dimension;
    writer.add(tensor, DType::f32, shape, std::vector<float>(static_cast<std::size_t>(count), 0.5f));
  }
  writer.write(path.string());
  return path.string();
}

void expect_layout_error(const std::function<void(LayoutSpec&)>& change, const std::string& problem) {
  LayoutSpec spec = valid_layout();
  change(spec);
  const std::string path = write_layout(spec, "layout");
  expect_error<FormatError>([&] { ActivationFile file(path); }, problem, path);
}

TEST(ActivationFile, TheValidLayoutOpens) {
  const ActivationFile file(write_layout(valid_layout(), "valid"));
  EXPECT_EQ(file.shape(), (ModelShape{2, 4, 2, 8}));
  EXPECT_EQ(file.batch(), 2);
}

TEST(ActivationFile, RejectsMissingOrInvalidMetadata) {
  expect_layout_error([](LayoutSpec& s) { s.metadata.erase("rope"); }, "no 'rope' entry");
  expect_layout_error([](LayoutSpec& s) { s.metadata["rope"] = "yes"; }, "rope = 'yes', expected 'applied' or 'none'");
  expect_layout_error([](LayoutSpec& s) { s.metadata.erase("rope_style"); }, "no 'rope_style' entry");
  expect_layout_error([](LayoutSpec& s) { s.metadata["rope_style"] = "diagonal"; }, "rope_style = 'diagonal'");
  expect_layout_error([](LayoutSpec& s) { s.metadata.erase("rope_theta"); }, "no 'rope_theta' entry");
  expect_layout_error([](LayoutSpec& s) { s.metadata["rope_theta"] = "ten thousand"; }, "rope_theta = 'ten thousand'");
  expect_layout_error([](LayoutSpec& s) { s.metadata["rope_theta"] = "0.5"; }, "expected a finite number > 1");
  expect_layout_error([](LayoutSpec& s) { s.metadata.erase("model"); }, "no 'model' entry");
  expect_layout_error([](LayoutSpec& s) { s.metadata["model"] = ""; }, "empty __metadata__ model");
}

TEST(ActivationFile, RejectsMissingAndUnexpectedTensors) {
  expect_layout_error([](LayoutSpec& s) { s.tensors.clear(); }, "holds no activations");
  expect_layout_error([](LayoutSpec& s) { s.tensors.erase("layers.1.v"); }, "no tensor 'layers.1.v'");
  expect_layout_error([](LayoutSpec& s) { s.tensors.erase("layers.0.q"); }, "no tensor 'layers.0.q'");
  expect_layout_error(
      [](LayoutSpec& s) {
        for (const char* part : {"q", "k", "v"}) {
          s.tensors[std::string("layers.2.") + part] = s.tensors[std::string("layers.1.") + part];
          s.tensors.erase(std::string("layers.1.") + part);
        }
      },
      "tensors of layer 2 but none of layer 1");
  expect_layout_error([](LayoutSpec& s) { s.tensors["layers.0.attn"] = {1}; }, "tensor 'layers.0.attn' is not part");
  expect_layout_error([](LayoutSpec& s) { s.tensors["layers.01.q"] = {2, 4, 3, 8}; }, "tensor 'layers.01.q' is not part");
}

TEST(ActivationFile, RejectsInconsistentShapes) {
  expect_layout_error([](LayoutSpec& s) { s.tensors["layers.0.q"] = {4, 24}; },
                      "tensor 'layers.0.q' has shape [4, 24], expected [batch, heads, tokens, head_dim]");
  expect_layout_error([](LayoutSpec& s) { s.tensors["layers.1.k"] = {2, 2, 4, 8}; },
                      "tensor 'layers.1.k' has shape [2, 2, 4, 8], expected [2, 2, 3, 8]");
  expect_layout_error([](LayoutSpec& s) { s.tensors["layers.1.q"] = {2, 4, 3, 16}; }, "tensor 'layers.1.q'");
  expect_layout_error([](LayoutSpec& s) { s.tensors["layers.0.v"] = {1, 2, 3, 8}; }, "tensor 'layers.0.v'");
  expect_layout_error([](LayoutSpec& s) { s.tensors["layers.1.v"] = {2, 3, 3, 8}; }, "tensor 'layers.1.v'");
  expect_layout_error([](LayoutSpec& s) { s.tensors["layers.0.k"] = {2, 3, 3, 8}; },
                      "the KV heads must divide the query heads");
  expect_layout_error([](LayoutSpec& s) { s.tensors["layers.0.q"] = {2, 4, 0, 8}; }, "tokens axis is empty");
  expect_layout_error([](LayoutSpec& s) { s.tensors["layers.0.o_proj"] = {16, 32}; },
                      "output-projection weights for some layers but no 'layers.1.o_proj'");
  expect_layout_error(
      [](LayoutSpec& s) {
        s.tensors["layers.0.o_proj"] = {16, 32};
        s.tensors["layers.1.o_proj"] = {16, 24};
      },
      "tensor 'layers.1.o_proj' has shape [16, 24], expected [hidden, 32]");
  expect_layout_error(
      [](LayoutSpec& s) {
        s.tensors["layers.0.o_proj"] = {16, 32};
        s.tensors["layers.1.o_proj"] = {12, 32};
      },
      "hidden = 16 as in layers.0.o_proj");
}

TEST(ActivationFile, RequireLayoutNamesBothFiles) {
  const Capture capture = random_capture(small_shape, 3, 1, 4, 6);
  const fs::path directory = scratch_directory();
  write_capture(capture, directory / "a.safetensors");
  ActivationMetadata other = metadata();
  other.model = "another";
  write_capture(capture, directory / "b.safetensors", other);
  write_capture(capture, directory / "c.safetensors", metadata(RopeMode::pre_rope));
  const ActivationFile a((directory / "a.safetensors").string());
  const ActivationFile b((directory / "b.safetensors").string());
  const ActivationFile c((directory / "c.safetensors").string());
  a.require_layout(a.layout());
  expect_error<FormatError>([&] { b.require_layout(a.layout()); }, "is of model 'another' but", a.path());
  expect_error<FormatError>([&] { c.require_layout(a.layout()); }, "has rope = none but", c.path());
  kqsvd::io::ActivationLayout wider = a.layout();
  wider.shape.layers = 3;
  expect_error<FormatError>([&] { a.require_layout(wider); }, "has 2 layers, 4 query heads");
}

TEST(ActivationFile, LoadsOutputWeightsFromEitherNaming) {
  const fs::path directory = scratch_directory();
  std::mt19937 engine(7);
  const Matrix w0 = random_matrix(6, 32, engine), w1 = random_matrix(6, 32, engine);
  SafetensorsWriter ours, hugging_face;
  ours.add("layers.0.o_proj", DType::f32, w0);
  ours.add("layers.1.o_proj", DType::f32, w1);
  hugging_face.add("model.layers.0.self_attn.o_proj.weight", DType::f32, w0);
  hugging_face.add("model.layers.1.self_attn.o_proj.weight", DType::f32, w1);
  hugging_face.add("model.embed_tokens.weight", DType::f32, Matrix::Ones(3, 3));
  ours.write((directory / "ours.safetensors").string());
  hugging_face.write((directory / "hf.safetensors").string());
  for (const char* name : {"ours.safetensors", "hf.safetensors"}) {
    const auto weights = kqsvd::io::load_output_weights((directory / name).string(), small_shape);
    ASSERT_EQ(weights.size(), 2u);
    EXPECT_EQ(weights[0], w0);
    EXPECT_EQ(weights[1], w1);
  }
  expect_error<FormatError>(
      [&] { kqsvd::io::load_output_weights((directory / "ours.safetensors").string(), ModelShape{3, 4, 2, 8}); },
      "neither 'layers.2.o_proj'");
  expect_error<FormatError>(
      [&] { kqsvd::io::load_output_weights((directory / "ours.safetensors").string(), ModelShape{2, 4, 2, 16}); },
      "expected [hidden, 64]");
}

// ------------------------------------------------------------------------------------------------
// calibrate() and measure()

TEST(Calibrate, EqualsAddingTheForwardPassBlocksDirectly) {
  const fs::path path = scratch_directory() / "calib.safetensors";
  const Capture capture = random_capture(small_shape, 7, 3, 10, 8);
  write_capture(capture, path);

  kqsvd::ModelCalibration from_file(small_shape), direct(small_shape);
  kqsvd::io::calibrate(from_file, ActivationFile(path.string()));
  for (Index b = 0; b < capture.batch; ++b) {
    for (Index l = 0; l < small_shape.layers; ++l) direct.add(l, capture.queries[l][b], capture.keys[l][b], capture.values[l][b]);
  }
  for (Index l = 0; l < small_shape.layers; ++l) {
    for (Index h = 0; h < small_shape.kv_heads; ++h) {
      EXPECT_EQ(from_file.keys(l, h).token_count(), 21);
      EXPECT_EQ(from_file.queries(l, h).token_count(), 42);  // two query heads per KV head
      EXPECT_TRUE(from_file.keys(l, h).gram().isApprox(direct.keys(l, h).gram(), 1e-12));
      EXPECT_TRUE(from_file.queries(l, h).gram().isApprox(direct.queries(l, h).gram(), 1e-12));
      EXPECT_TRUE(from_file.values(l, h).gram().isApprox(direct.values(l, h).gram(), 1e-12));
    }
  }
  kqsvd::ModelCalibration wrong(ModelShape{2, 4, 4, 8});
  EXPECT_THROW(kqsvd::io::calibrate(wrong, ActivationFile(path.string())), kqsvd::InvalidArgument);
}

kqsvd::ModelProjections<float> fit_on(const Capture& capture, kqsvd::Method method, Index rank) {
  kqsvd::ModelCalibration calibration(capture.shape);
  for (Index b = 0; b < capture.batch; ++b) {
    for (Index l = 0; l < capture.shape.layers; ++l) {
      calibration.add(l, capture.queries[l][b], capture.keys[l][b], capture.values[l][b]);
    }
  }
  return kqsvd::ModelProjections<float>::fit(calibration, capture.output_weights, method,
                                             kqsvd::RankSelection::fixed(rank), kqsvd::RankSelection::fixed(rank));
}

TEST(Measure, EqualsPerHeadFidelitySummedOverSequencesAndHeads) {
  const fs::path path = scratch_directory() / "eval.safetensors";
  const Capture calibration = random_capture(small_shape, 9, 4, 10, 9);
  const Capture held_out = random_capture(small_shape, 6, 2, 10, 10);
  write_capture(held_out, path);
  const auto projections = fit_on(calibration, kqsvd::Method::kq_svd, 3);

  const ActivationFile file(path.string());
  const std::vector<FidelityTotals> measured = kqsvd::io::measure(projections, file, held_out.output_weights);
  ASSERT_EQ(measured.size(), 2u);
  const Index d = small_shape.head_dim;
  for (Index l = 0; l < small_shape.layers; ++l) {
    FidelityTotals direct;
    double score_error = 0.0, score_reference = 0.0, key_error = 0.0, key_reference = 0.0;
    for (Index b = 0; b < held_out.batch; ++b) {
      for (Index h = 0; h < small_shape.kv_heads; ++h) {
        const Matrix keys = held_out.keys[l][b].middleCols(h * d, d);
        const Matrix values = held_out.values[l][b].middleCols(h * d, d);
        Matrix group(2 * held_out.tokens, d);
        group << held_out.queries[l][b].middleCols(2 * h * d, d), held_out.queries[l][b].middleCols((2 * h + 1) * d, d);
        direct += kqsvd::measure_head_fidelity(projections.keys(l, h), projections.values(l, h), keys, values, group,
                                               held_out.output_weights[l].middleCols(2 * h * d, 2 * d));
        // Independently: the all-pairs logits Q_j K^T of each query head and the keys K vs K A B^T.
        const MatrixXd a = projections.keys(l, h).encoder().cast<double>();
        const MatrixXd bb = projections.keys(l, h).decoder().cast<double>();
        const MatrixXd k = keys.cast<double>();
        key_error += (k - k * a * bb.transpose()).squaredNorm();
        key_reference += k.squaredNorm();
        for (Index j = 0; j < 2; ++j) {
          const MatrixXd q = group.middleRows(j * held_out.tokens, held_out.tokens).cast<double>();
          score_error += (q * k.transpose() - (q * bb) * (k * a).transpose()).squaredNorm();
          score_reference += (q * k.transpose()).squaredNorm();
        }
      }
    }
    for (const FidelityMetric metric : kqsvd::all_fidelity_metrics) {
      EXPECT_NEAR(measured[l].relative_error(metric), direct.relative_error(metric), 1e-12) << kqsvd::to_string(metric);
    }
    EXPECT_NEAR(measured[l].relative_error(FidelityMetric::scores), std::sqrt(score_error / score_reference), 1e-9);
    EXPECT_NEAR(measured[l].relative_error(FidelityMetric::keys), std::sqrt(key_error / key_reference), 1e-9);
  }
  EXPECT_THROW(kqsvd::io::measure(projections, file, std::vector<Matrix>(1)), kqsvd::InvalidArgument);
}

TEST(Measure, PreRopeFilesAreScoredWithTheFilesRotation) {
  const fs::path directory = scratch_directory();
  const Capture calibration = random_capture(small_shape, 9, 3, 10, 11);
  const Capture held_out = random_capture(small_shape, 6, 2, 10, 12);
  write_capture(held_out, directory / "pre.safetensors", metadata(RopeMode::pre_rope));
  write_capture(held_out, directory / "post.safetensors", metadata(RopeMode::post_rope));
  const auto projections = fit_on(calibration, kqsvd::Method::k_svd, 4);

  const ActivationFile pre((directory / "pre.safetensors").string());
  const auto measured = kqsvd::io::measure(projections, pre, held_out.output_weights);
  const kqsvd::RotaryEmbedding rope(8, 500000.0, kqsvd::RopeStyle::rotate_half);
  kqsvd::FidelityOptions options;
  options.pre_rope = &rope;
  FidelityTotals direct;
  for (Index b = 0; b < held_out.batch; ++b) {
    for (Index h = 0; h < 2; ++h) {
      direct += kqsvd::measure_head_fidelity(projections.keys(1, h), projections.values(1, h), pre.keys(1, b, h),
                                             pre.values(1, b, h), pre.group_queries(1, b, h),
                                             held_out.output_weights[1].middleCols(2 * h * 8, 16), options);
    }
  }
  EXPECT_NEAR(measured[1].relative_error(FidelityMetric::scores), direct.relative_error(FidelityMetric::scores), 1e-12);
  EXPECT_NEAR(measured[1].relative_error(FidelityMetric::output), direct.relative_error(FidelityMetric::output), 1e-12);
  // The same numbers read as post-RoPE give different logits errors: the rotation is really applied.
  const auto post = kqsvd::io::measure(projections, ActivationFile((directory / "post.safetensors").string()),
                                       held_out.output_weights);
  EXPECT_GT(std::abs(post[1].relative_error(FidelityMetric::scores) - measured[1].relative_error(FidelityMetric::scores)),
            1e-6);
}

// ------------------------------------------------------------------------------------------------
// The shipped real capture (data/activations/stories260K, see its README).

std::string test_data(const std::string& relative) { return std::string(KQSVD_TEST_DATA_DIR) + "/" + relative; }

TEST(ShippedActivations, Stories260KCaptureMatchesAFreshForwardPass) {
  const ActivationFile file(repository_data("activations/stories260K/eval.safetensors"));
  EXPECT_EQ(file.shape(), (ModelShape{5, 8, 4, 8}));
  EXPECT_EQ(file.metadata().model, "stories260K");
  EXPECT_EQ(file.metadata().rope, RopeMode::post_rope);
  EXPECT_EQ(file.metadata().rope_style, kqsvd::RopeStyle::adjacent_pairs);
  EXPECT_EQ(file.tokens(), 64);
  ASSERT_EQ(file.tensors().metadata().at("stories"), "0,1,2,3");

  using namespace kqsvd::llama;
  const Transformer model(Checkpoint::load(repository_data("models/stories260K/stories260K.bin")));
  const Tokenizer tokenizer = Tokenizer::load(repository_data("models/stories260K/tok512.bin"), model.config().vocab_size);
  const std::vector<std::string> stories = read_stories(test_data("tinystories_first20.txt"));
  std::vector<int> tokens = tokenizer.encode(stories[2], true, false);
  tokens.resize(64);
  ActivationRecorder recorder;
  FullKvCache cache(model.shape(), model.rotary_embedding());
  model.forward(tokens, cache, &recorder);
  for (Index l = 0; l < 5; ++l) {
    const AttentionActivations& layer = recorder.blocks(l).front();
    EXPECT_TRUE(file.keys(l, 2, 3).isApprox(Matrix(layer.keys.middleCols(3 * 8, 8)), 1e-6));
    EXPECT_TRUE(file.values(l, 2, 0).isApprox(Matrix(layer.values.leftCols(8)), 1e-6));
    EXPECT_TRUE(file.queries(l, 2, 5).isApprox(Matrix(layer.queries.middleCols(5 * 8, 8)), 1e-6));
    EXPECT_EQ(file.output_weight(l), model.checkpoint().layer(l).wo);
  }
}

TEST(ShippedActivations, KqSvdHasTheSmallestHeldOutLogitError) {
  const ActivationFile calib(repository_data("activations/stories260K/calib.safetensors"));
  const ActivationFile held_out(repository_data("activations/stories260K/eval.safetensors"));
  calib.require_layout(held_out.layout());
  kqsvd::ModelCalibration calibration(calib.shape());
  kqsvd::io::calibrate(calibration, calib);
  std::map<kqsvd::Method, double> score_error;
  for (const kqsvd::Method method : kqsvd::all_methods) {
    const auto projections = kqsvd::ModelProjections<float>::fit(calibration, calib.output_weights(), method,
                                                                 kqsvd::RankSelection::fixed(4), kqsvd::RankSelection::fixed(4));
    FidelityTotals total;
    for (const FidelityTotals& layer : kqsvd::io::measure(projections, held_out, calib.output_weights())) total += layer;
    score_error[method] = total.relative_error(FidelityMetric::scores);
  }
  EXPECT_LT(score_error[kqsvd::Method::kq_svd], score_error[kqsvd::Method::k_svd]);
  EXPECT_LT(score_error[kqsvd::Method::kq_svd], score_error[kqsvd::Method::eigen_attention]);
}

}  // namespace kqsvd_test_activations
