// The compressed KV cache (kqsvd/llama/compressed_kv_cache.hpp) and its calibration glue
// (calibration.hpp) and the core's rank allocation (solvers/budget_allocation.hpp). References are independent: a per-query double-precision
// attention written from the definitions (scores (q B)(k A)^T post-RoPE, q . rot((k A) B^T) pre-RoPE,
// exact rows inside the window), the exact FullKvCache for the cases that must be lossless, Grams
// multiplied out from recorded activations, and byte counts from the formula.
#include <gtest/gtest.h>

#include <kqsvd/llama/calibration.hpp>
#include <kqsvd/llama/compressed_kv_cache.hpp>
#include <kqsvd/llama/heavy_hitter_kv_cache.hpp>
#include <kqsvd/llama/online_svd_kv_cache.hpp>
#include <kqsvd/solvers/budget_allocation.hpp>
#include <kqsvd/llama/likelihood.hpp>
#include <kqsvd/llama/tokenizer.hpp>
#include <kqsvd/llama/transformer.hpp>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <functional>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <vector>
#include "test_support.hpp"

namespace kqsvd_test_compressed_kv_cache {

using kqsvd::test::repository_data;

using Eigen::Index;
using kqsvd::LowRankProjection;
using kqsvd::Method;
using kqsvd::ModelProjections;
using kqsvd::ModelShape;
using kqsvd::RankSelection;
using kqsvd::llama::Checkpoint;
using kqsvd::llama::CompressedKvCache;
using kqsvd::llama::FullKvCache;
using kqsvd::RopeMode;
using kqsvd::StorageFormat;
using RowMatrix = kqsvd::RowMatrix<float>;
using kqsvd::llama::Tokenizer;
using kqsvd::llama::Transformer;

// ------------------------------------------------------------------------------------------------
// Data

std::string test_data(const std::string& relative) { return std::string(KQSVD_TEST_DATA_DIR) + "/" + relative; }

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

std::vector<std::string> first_twenty_stories() {
  const std::string text = read_file(test_data("tinystories_first20.txt"));
  const std::string separator = "<|endoftext|>";
  std::vector<std::string> stories;
  for (std::size_t start = 0;;) {
    const std::size_t end = text.find(separator, start);
    std::string part = text.substr(start, end == std::string::npos ? std::string::npos : end - start);
    const std::size_t first = part.find_first_not_of(" \t\n\r");
    if (first != std::string::npos) stories.push_back(part.substr(first, part.find_last_not_of(" \t\n\r") - first + 1));
    if (end == std::string::npos) return stories;
    start = end + separator.size();
  }
}

// The shared stories260K model (head_dim 8, 5 layers, 8 query / 4 KV heads) and token sequences.
struct Stories260K {
  Transformer model{Checkpoint::load(repository_data("models/stories260K/stories260K.bin"))};
  Tokenizer tokenizer = Tokenizer::load(repository_data("models/stories260K/tok512.bin"), 512);

  std::vector<int> story(std::size_t index, std::size_t max_tokens) const {
    std::vector<int> tokens = tokenizer.encode(first_twenty_stories().at(index), true, false);
    if (tokens.size() > max_tokens) tokens.resize(max_tokens);
    return tokens;
  }
};

const Stories260K& stories260k() {
  static const Stories260K instance;
  return instance;
}

// Calibration on stories 10..12 (the tests evaluate on stories 0..1), one per RoPE mode.
const kqsvd::ModelCalibration& calibration(RopeMode mode) {
  static std::map<RopeMode, kqsvd::ModelCalibration> calibrations;  // nodes never move
  const auto found = calibrations.find(mode);
  if (found != calibrations.end()) return found->second;
  const Stories260K& s = stories260k();
  std::vector<std::vector<int>> sequences;
  for (std::size_t i = 10; i < 13; ++i) sequences.push_back(s.story(i, 96));
  return calibrations.emplace(mode, kqsvd::llama::calibrate(s.model, sequences, mode)).first->second;
}

// Projections fitted at full rank (8).
const ModelProjections<float>& full_rank_projections(Method method, RopeMode mode) {
  static std::map<std::pair<Method, RopeMode>, ModelProjections<float>> fitted;
  const auto found = fitted.find({method, mode});
  if (found != fitted.end()) return found->second;
  const Stories260K& s = stories260k();
  return fitted
      .emplace(std::make_pair(method, mode),
               ModelProjections<float>::fit(calibration(mode), kqsvd::llama::output_weights(s.model.checkpoint()),
                                            method, RankSelection::fixed(8), RankSelection::fixed(8)))
      .first->second;
}

double max_abs_difference(const RowMatrix& a, const RowMatrix& b) { return (a - b).cwiseAbs().maxCoeff(); }

// Logits of `tokens` run in blocks of `block` tokens (0: one block).
RowMatrix logits_in_blocks(const Transformer& model, const std::vector<int>& tokens, kqsvd::llama::KvCache& cache,
                           std::size_t block = 0) {
  cache.reset();
  RowMatrix logits(static_cast<Index>(tokens.size()), model.config().vocab_size);
  const std::size_t step = block == 0 ? tokens.size() : block;
  for (std::size_t start = 0; start < tokens.size(); start += step) {
    const std::size_t count = std::min(step, tokens.size() - start);
    logits.middleRows(static_cast<Index>(start), static_cast<Index>(count)) =
        model.forward(std::vector<int>(tokens.begin() + static_cast<long>(start),
                                       tokens.begin() + static_cast<long>(start + count)),
                      cache);
  }
  return logits;
}

// ------------------------------------------------------------------------------------------------
// An independent attention reference, in double

RowMatrix uniform(Index rows, Index cols, std::mt19937& engine, float low = -1.0f, float high = 1.0f) {
  std::uniform_real_distribution<float> dist(low, high);
  RowMatrix m(rows, cols);
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < cols; ++j) m(i, j) = dist(engine);
  return m;
}

// llama2.c's RoPE: pairs (2i, 2i+1) turned by position * theta^(-2i/d).
Eigen::RowVectorXd rotated(Eigen::RowVectorXd v, Index position, double theta = 10000.0) {
  const Index d = v.size();
  for (Index i = 0; i < d; i += 2) {
    const double angle = static_cast<double>(position) * std::pow(theta, -static_cast<double>(i) / static_cast<double>(d));
    const double x = v(i), y = v(i + 1);
    v(i) = x * std::cos(angle) - y * std::sin(angle);
    v(i + 1) = x * std::sin(angle) + y * std::cos(angle);
  }
  return v;
}

// Projections with random A, B (d x r) per head: the cache's arithmetic must not rely on any structure.
ModelProjections<float> random_projections(const ModelShape& shape, const std::vector<Index>& key_ranks,
                                           const std::vector<Index>& value_ranks, unsigned seed) {
  std::mt19937 engine(seed);
  std::vector<LowRankProjection<float>> keys, values;
  const Index d = shape.head_dim;
  for (std::size_t i = 0; i < key_ranks.size(); ++i) {
    const auto make = [&](Index r) {
      const RowMatrix a = uniform(d, r, engine), b = uniform(d, r, engine);
      return LowRankProjection<float>(Method::kq_svd, a, b, Eigen::VectorXd::Ones(d));
    };
    keys.push_back(make(key_ranks[i]));
    values.push_back(make(value_ranks[i]));
  }
  return ModelProjections<float>(shape, std::move(keys), std::move(values));
}

// Attention of layer 0 for queries (rotated) at positions first .. first + T - 1 over the un-rotated
// `keys` and `values` of positions 0 .. n-1, exactly as the cache's definition reads, one query and
// one key at a time.
Eigen::MatrixXd reference_attention(const ModelShape& shape, const ModelProjections<float>& projections,
                                    RopeMode mode, Index window, const RowMatrix& keys, const RowMatrix& values,
                                    const RowMatrix& queries, Index first) {
  const Index d = shape.head_dim;
  Eigen::MatrixXd output(queries.rows(), shape.query_width());
  for (Index i = 0; i < queries.rows(); ++i) {
    const Index p = first + i;
    for (Index h = 0; h < shape.query_heads; ++h) {
      const Index g = h / shape.group_size();
      const Eigen::MatrixXd a = projections.keys(0, g).encoder().cast<double>();
      const Eigen::MatrixXd b = projections.keys(0, g).decoder().cast<double>();
      const Eigen::MatrixXd av = projections.values(0, g).encoder().cast<double>();
      const Eigen::MatrixXd bv = projections.values(0, g).decoder().cast<double>();
      const Eigen::RowVectorXd q = queries.row(i).segment(h * d, d).cast<double>();
      Eigen::VectorXd scores(p + 1);
      Eigen::MatrixXd rows(p + 1, d);  // the value each key position contributes
      for (Index j = 0; j <= p; ++j) {
        const Eigen::RowVectorXd k = keys.row(j).segment(g * d, d).cast<double>();
        const Eigen::RowVectorXd v = values.row(j).segment(g * d, d).cast<double>();
        const bool exact = window > 0 && j > p - window;
        if (exact) {
          scores(j) = q.dot(rotated(k, j));
          rows.row(j) = v;
        } else {
          if (mode == RopeMode::post_rope) {
            scores(j) = (q * b).dot(rotated(k, j) * a);  // (q B)(k A)^T
          } else {
            scores(j) = q.dot(rotated(k * a * b.transpose(), j));  // q . rot((k A) B^T)
          }
          rows.row(j) = v * av * bv.transpose();
        }
      }
      scores /= std::sqrt(static_cast<double>(d));
      const Eigen::VectorXd weights = (scores.array() - scores.maxCoeff()).exp().matrix();
      output.row(i).segment(h * d, d) = weights.transpose() * rows / weights.sum();
    }
  }
  return output;
}

// One layer, 4 query heads on 2 KV heads (GQA), head_dim 8, llama2.c's RoPE.
const ModelShape synthetic_shape{1, 4, 2, 8};
const ModelShape& synthetic_model_shape = synthetic_shape;
const kqsvd::RotaryEmbedding adjacent_rope(8, 10000.0, kqsvd::RopeStyle::adjacent_pairs);

// ------------------------------------------------------------------------------------------------
// Attention arithmetic against the reference

TEST(CompressedKvCache, AttentionMatchesTheDefinitionForEveryModeWindowAndPerHeadRank) {
  std::mt19937 engine(5);
  const RowMatrix keys = uniform(9, 16, engine), values = uniform(9, 16, engine);
  const RowMatrix queries = uniform(9, 32, engine, -2.0f, 2.0f);
  // Ranks differ between the KV heads and between keys and values; one is full rank.
  const ModelProjections<float> projections = random_projections(synthetic_model_shape, {3, 8}, {2, 5}, 7);
  for (const RopeMode mode : kqsvd::all_rope_modes) {
    for (const Index window : {0, 1, 3, 100}) {
      CompressedKvCache cache(synthetic_shape, adjacent_rope, projections, mode, window);
      // Two blocks: each block's queries attend right after its keys are appended.
      cache.append(0, keys.topRows(5), values.topRows(5), 0);
      const RowMatrix first_block = cache.attend(0, queries.topRows(5), 0);
      cache.append(0, keys.bottomRows(4), values.bottomRows(4), 5);
      const RowMatrix second_block = cache.attend(0, queries.bottomRows(4), 5);
      const Eigen::MatrixXd expected_first =
          reference_attention(synthetic_shape, projections, mode, window, keys.topRows(5), values.topRows(5),
                              queries.topRows(5), 0);
      const Eigen::MatrixXd expected_second =
          reference_attention(synthetic_shape, projections, mode, window, keys, values, queries.bottomRows(4), 5);
      EXPECT_LT((first_block.cast<double>() - expected_first).cwiseAbs().maxCoeff(), 1e-5)
          << to_string(mode) << " window " << window;
      EXPECT_LT((second_block.cast<double>() - expected_second).cwiseAbs().maxCoeff(), 1e-5)
          << to_string(mode) << " window " << window;
    }
  }
}

// Post-RoPE at rank r scores (q B)(k A)^T with nothing reconstructed: a single key makes the softmax
// trivial, so with two keys the output weights expose the score difference directly.
TEST(CompressedKvCache, PostRopeScoresAreTheLatentProductsAtRankR) {
  std::mt19937 engine(8);
  const RowMatrix keys = uniform(2, 16, engine), values = uniform(2, 16, engine);
  const RowMatrix query = uniform(1, 32, engine, -3.0f, 3.0f);
  const ModelProjections<float> projections = random_projections(synthetic_model_shape, {2, 3}, {8, 8}, 9);
  // Identity value projections (rank 8, A = B = I): the output is w0 v0 + w1 v1 exactly.
  std::vector<LowRankProjection<float>> key_projections = {projections.keys(0, 0), projections.keys(0, 1)};
  std::vector<LowRankProjection<float>> identity(
      2, LowRankProjection<float>(Method::k_svd, Eigen::MatrixXf::Identity(8, 8), Eigen::MatrixXf::Identity(8, 8),
                                  Eigen::VectorXd::Ones(8)));
  const ModelProjections<float> model(synthetic_model_shape, key_projections, identity);
  CompressedKvCache cache(synthetic_shape, adjacent_rope, model, RopeMode::post_rope);
  cache.append(0, keys, values, 0);
  const RowMatrix output = cache.attend(0, query, 1);
  for (Index h = 0; h < 4; ++h) {
    const Index g = h / 2;
    const Eigen::MatrixXd a = model.keys(0, g).encoder().cast<double>(), b = model.keys(0, g).decoder().cast<double>();
    const Eigen::RowVectorXd q = query.row(0).segment(h * 8, 8).cast<double>();
    const double s0 = (q * b).dot(rotated(keys.row(0).segment(g * 8, 8).cast<double>(), 0) * a) / std::sqrt(8.0);
    const double s1 = (q * b).dot(rotated(keys.row(1).segment(g * 8, 8).cast<double>(), 1) * a) / std::sqrt(8.0);
    const double w1 = 1.0 / (1.0 + std::exp(s0 - s1));
    const Eigen::RowVectorXd expected =
        (1.0 - w1) * values.row(0).segment(g * 8, 8).cast<double>() + w1 * values.row(1).segment(g * 8, 8).cast<double>();
    EXPECT_LT((output.row(0).segment(h * 8, 8).cast<double>() - expected).cwiseAbs().maxCoeff(), 1e-6) << "head " << h;
  }
}

TEST(CompressedKvCache, HalfStorageStaysCloseToFloatStorage) {
  std::mt19937 engine(12);
  const RowMatrix keys = uniform(20, 16, engine), values = uniform(20, 16, engine);
  const RowMatrix queries = uniform(20, 32, engine);
  const ModelProjections<float> projections = random_projections(synthetic_model_shape, {4, 6}, {3, 8}, 13);
  for (const RopeMode mode : kqsvd::all_rope_modes) {
    CompressedKvCache exact(synthetic_shape, adjacent_rope, projections, mode, 2);
    CompressedKvCache half(synthetic_shape, adjacent_rope, projections, mode, 2, StorageFormat::parse("f16"));
    exact.append(0, keys, values, 0);
    half.append(0, keys, values, 0);
    const Eigen::MatrixXd expected =
        reference_attention(synthetic_shape, projections, mode, 2, keys, values, queries, 0);
    EXPECT_LT((exact.attend(0, queries, 0).cast<double>() - expected).cwiseAbs().maxCoeff(), 1e-5);
    // Latents of magnitude ~1-4 rounded to 11 significant bits.
    EXPECT_LT((half.attend(0, queries, 0).cast<double>() - expected).cwiseAbs().maxCoeff(), 2e-2);
  }
}

// ------------------------------------------------------------------------------------------------
// The real model

TEST(CompressedKvCache, FullRankReproducesTheFullCacheLogitsForEveryMethodAndRopeMode) {
  const Stories260K& s = stories260k();
  const std::vector<int> tokens = s.story(0, 80);
  FullKvCache full(s.model.shape(), s.model.rotary_embedding());
  const RowMatrix expected = logits_in_blocks(s.model, tokens, full);
  const float tolerance = 1e-3f * std::max(1.0f, expected.cwiseAbs().maxCoeff());
  for (const Method method : kqsvd::all_methods) {
    for (const RopeMode mode : kqsvd::all_rope_modes) {
      CompressedKvCache cache(s.model.shape(), s.model.rotary_embedding(), full_rank_projections(method, mode), mode);
      EXPECT_LT(max_abs_difference(logits_in_blocks(s.model, tokens, cache), expected), tolerance)
          << to_string(method) << " " << to_string(mode);
    }
  }
}

TEST(CompressedKvCache, WindowCoveringTheSequenceReproducesTheFullCacheAtAnyRank) {
  const Stories260K& s = stories260k();
  const std::vector<int> tokens = s.story(1, 48);
  FullKvCache full(s.model.shape(), s.model.rotary_embedding());
  const RowMatrix expected = logits_in_blocks(s.model, tokens, full);
  const float tolerance = 1e-4f * std::max(1.0f, expected.cwiseAbs().maxCoeff());
  for (const RopeMode mode : kqsvd::all_rope_modes) {
    const ModelProjections<float> rank2 =
        full_rank_projections(Method::kq_svd, mode).truncated(kqsvd::RankAllocation::uniform(s.model.shape(), 2, 2));
    for (const Index window : {48, 1000}) {
      CompressedKvCache cache(s.model.shape(), s.model.rotary_embedding(), rank2, mode, window);
      EXPECT_LT(max_abs_difference(logits_in_blocks(s.model, tokens, cache), expected), tolerance)
          << to_string(mode) << " window " << window;
    }
    // A window shorter than the sequence changes the logits: the comparison above has teeth.
    CompressedKvCache short_window(s.model.shape(), s.model.rotary_embedding(), rank2, mode, 8);
    EXPECT_GT(max_abs_difference(logits_in_blocks(s.model, tokens, short_window), expected), 100 * tolerance);
  }
}

void expect_prefill_equals_decode(const Stories260K& s, const std::vector<int>& tokens, RopeMode mode, Index window,
                                  const StorageFormat& format) {
  const ModelProjections<float> rank3 =
      full_rank_projections(Method::kq_svd, mode).truncated(kqsvd::RankAllocation::uniform(s.model.shape(), 3, 3));
  CompressedKvCache cache(s.model.shape(), s.model.rotary_embedding(), rank3, mode, window, format);
  const RowMatrix decode = logits_in_blocks(s.model, tokens, cache, 1);
  const std::size_t decode_bytes = cache.bytes();
  const float tolerance = 1e-4f * std::max(1.0f, decode.cwiseAbs().maxCoeff());
  for (const std::size_t block : {std::size_t(0), std::size_t(7), std::size_t(16)}) {
    EXPECT_LT(max_abs_difference(logits_in_blocks(s.model, tokens, cache, block), decode), tolerance)
        << to_string(mode) << " window " << window << " block " << block;
    EXPECT_EQ(cache.bytes(), decode_bytes);
  }
}

TEST(CompressedKvCache, BlockPrefillEqualsTokenByTokenDecodeWithAWindow) {
  const Stories260K& s = stories260k();
  const std::vector<int> tokens = s.story(0, 32);
  for (const RopeMode mode : kqsvd::all_rope_modes) {
    for (const Index window : {0, 1, 5}) {
      expect_prefill_equals_decode(s, tokens, mode, window, StorageFormat());
    }
    expect_prefill_equals_decode(s, tokens, mode, 5, StorageFormat::parse("f16"));
    expect_prefill_equals_decode(s, tokens, mode, 5, StorageFormat::parse("fp8_e4m3"));
  }
}

// DecodeArithmetic::int8_dot_products reaches the kernels from both caches: decode steps (one token
// at a time) change, by less than the 4- or 2-bit storage itself changes them (operands rounded to
// 1/127 of their group's largest magnitude, codes to 1/15 or 1/3; on one attention step of real
// activations the arithmetic adds a small fraction to the storage's error, examples/decode_arithmetic,
// but five layers of this small model amplify both), while a prefill block, which always computes in
// float, gives the float cache's bits.
TEST(CompressedKvCache, IntegerDotProductsChangeDecodeStepsOnlyAndLessThanTheStorage) {
  const Stories260K& s = stories260k();
  const std::vector<int> tokens = s.story(0, 40);
  const auto int8 = kqsvd::DecodeArithmetic::int8_dot_products;
  const ModelProjections<float> rank4 = full_rank_projections(Method::kq_svd, RopeMode::post_rope)
                                            .truncated(kqsvd::RankAllocation::uniform(s.model.shape(), 4, 4));
  const auto check = [&](kqsvd::llama::KvCache& exact, kqsvd::llama::KvCache& stored, kqsvd::llama::KvCache& fast,
                         const std::string& what) {
    const RowMatrix exact_decode = logits_in_blocks(s.model, tokens, exact, 1);
    const RowMatrix float_decode = logits_in_blocks(s.model, tokens, stored, 1);
    const RowMatrix int8_decode = logits_in_blocks(s.model, tokens, fast, 1);
    // Norms over every logit: the largest single difference, after five layers of a small model, is noisy.
    const double storage_change = (float_decode - exact_decode).norm();
    const double arithmetic_change = (int8_decode - float_decode).norm();
    EXPECT_GT(arithmetic_change, 0.0) << what << ": the int8 arithmetic was not used";
    EXPECT_LT(arithmetic_change, storage_change) << what;
    EXPECT_EQ(max_abs_difference(logits_in_blocks(s.model, tokens, fast), logits_in_blocks(s.model, tokens, stored)), 0.0)
        << what << ": a prefill block computes in float";
  };
  for (const char* name : {"int4/4", "int2/4"}) {
    const StorageFormat format = StorageFormat::parse(name);
    CompressedKvCache exact(s.model.shape(), s.model.rotary_embedding(), rank4, RopeMode::post_rope);
    CompressedKvCache stored(s.model.shape(), s.model.rotary_embedding(), rank4, RopeMode::post_rope, 0, format);
    CompressedKvCache fast(s.model.shape(), s.model.rotary_embedding(), rank4, RopeMode::post_rope, 0, format, int8);
    EXPECT_EQ(fast.decode_arithmetic(), int8);
    EXPECT_EQ(stored.decode_arithmetic(), kqsvd::DecodeArithmetic::float32);
    check(exact, stored, fast, std::string("latents ") + name);
  }
  for (const char* name : {"int4/8", "int2/8"}) {
    const StorageFormat format = StorageFormat::parse(name);
    FullKvCache exact(s.model.shape(), s.model.rotary_embedding());
    FullKvCache stored(s.model.shape(), s.model.rotary_embedding(), format);
    FullKvCache fast(s.model.shape(), s.model.rotary_embedding(), format, int8);
    EXPECT_EQ(fast.decode_arithmetic(), int8);
    check(exact, stored, fast, std::string("full rows ") + name);
  }
}

// Compression costs what it should: at rank 2 of 8 the model is measurably worse than at full rank,
// and a window of 32 recovers part of the loss (the first 32 tokens of every story become exact).
TEST(CompressedKvCache, LowRankCostsLikelihoodAndAWindowRecoversSome) {
  const Stories260K& s = stories260k();
  const std::vector<int> tokens = s.story(0, 128);
  FullKvCache full(s.model.shape(), s.model.rotary_embedding());
  const double exact = kqsvd::llama::negative_log_likelihood(s.model, tokens, full).mean();
  const ModelProjections<float> rank2 = full_rank_projections(Method::kq_svd, RopeMode::post_rope)
                                             .truncated(kqsvd::RankAllocation::uniform(s.model.shape(), 2, 2));
  CompressedKvCache no_window(s.model.shape(), s.model.rotary_embedding(), rank2, RopeMode::post_rope, 0);
  CompressedKvCache window(s.model.shape(), s.model.rotary_embedding(), rank2, RopeMode::post_rope, 32);
  const double compressed = kqsvd::llama::negative_log_likelihood(s.model, tokens, no_window).mean();
  const double windowed = kqsvd::llama::negative_log_likelihood(s.model, tokens, window).mean();
  EXPECT_GT(compressed, exact + 0.01);
  EXPECT_LT(windowed, compressed);
  EXPECT_GT(windowed, exact);
}

// ------------------------------------------------------------------------------------------------
// Bytes

void expect_bytes_follow_the_formula(Index window, const StorageFormat& format) {
  const ModelShape shape{2, 4, 2, 8};
  const ModelShape& model_shape = shape;
  const std::vector<Index> key_ranks = {1, 8, 3, 5}, value_ranks = {2, 4, 7, 6};  // [layer * 2 + kv_head]
  const ModelProjections<float> projections = random_projections(model_shape, key_ranks, value_ranks, 21);
  CompressedKvCache cache(shape, adjacent_rope, projections, RopeMode::post_rope, window, format);
  std::mt19937 engine(22);
  // Per token: each projection's row in the format (codes, and a float16 scale per row for int8).
  const auto row = [&](Index rank) { return format.bytes_per_row(rank); };
  const Index latent_per_token_layer0 = row(1) + row(2) + row(8) + row(4), latent_per_token_layer1 = row(3) + row(7) + row(5) + row(6);
  const auto expected_bytes = [&](Index tokens0, Index tokens1) {
    const auto window_rows = [&](Index n) { return std::min(n, window); };
    return static_cast<std::size_t>(tokens0 * latent_per_token_layer0 + tokens1 * latent_per_token_layer1 +
                                    (window_rows(tokens0) + window_rows(tokens1)) * 2 * 16 *
                                        static_cast<Index>(sizeof(float)));
  };
  EXPECT_EQ(cache.bytes(), 0u);
  EXPECT_DOUBLE_EQ(cache.latent_bytes_per_token_per_layer(),
                   static_cast<double>(latent_per_token_layer0 + latent_per_token_layer1) / 2.0);
  Index tokens0 = 0, tokens1 = 0;
  for (const Index block : {3, 1, 1, 9, 2}) {
    const RowMatrix kv = uniform(block, 16, engine);
    cache.append(0, kv, kv, tokens0);
    tokens0 += block;
    EXPECT_EQ(cache.bytes(), expected_bytes(tokens0, tokens1)) << "window " << window;
    cache.append(1, kv, kv, tokens1);
    tokens1 += block;
    EXPECT_EQ(cache.bytes(), expected_bytes(tokens0, tokens1)) << "window " << window;
    EXPECT_EQ(cache.latents(1, 0).size(), tokens1);
  }
  EXPECT_EQ(cache.latent_bytes() + cache.window_bytes(), cache.bytes());
  EXPECT_DOUBLE_EQ(cache.bytes_per_token_per_layer(),
                   static_cast<double>(expected_bytes(tokens0, tokens1)) / static_cast<double>(tokens0 + tokens1));
  cache.reset();
  EXPECT_EQ(cache.bytes(), 0u);
  EXPECT_EQ(cache.tokens(1), 0);
}

TEST(CompressedKvCache, BytesEqualTheFormulaForAnyPerHeadRanksAndStorageFormat) {
  for (const Index window : {0, 4, 100}) {
    for (const char* name : {"f32", "f16", "bf16", "fp8_e5m2", "int8"}) {
      SCOPED_TRACE(name);
      expect_bytes_follow_the_formula(window, StorageFormat::parse(name));
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Bad construction and use

std::string invalid_argument_of(const std::function<void()>& action) {
  try {
    action();
  } catch (const kqsvd::InvalidArgument& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("(not an InvalidArgument) ") + e.what();
  }
  return "(nothing thrown)";
}

TEST(CompressedKvCache, RejectsProjectionsOfAnotherShapeAndANegativeWindow) {
  const ModelProjections<float> good = random_projections(synthetic_model_shape, {2, 2}, {2, 2}, 1);
  const auto construct = [](const ModelShape& shape, const ModelProjections<float>& p, Index window) {
    return [shape, &p, window] { CompressedKvCache(shape, adjacent_rope, p, RopeMode::post_rope, window); };
  };
  EXPECT_EQ(invalid_argument_of(construct(synthetic_shape, good, 0)), "(nothing thrown)");
  // Another model: stories260K's projections (5 layers, 8/4 heads) for the synthetic shape.
  const std::string other_model = invalid_argument_of(
      construct(synthetic_shape, full_rank_projections(Method::k_svd, RopeMode::post_rope), 0));
  EXPECT_NE(other_model.find("kqsvd::llama::CompressedKvCache: argument 'projections'"), std::string::npos)
      << other_model;
  const ModelProjections<float> wide = random_projections(ModelShape{1, 4, 2, 16}, {2, 2}, {2, 2}, 2);
  EXPECT_NE(invalid_argument_of(construct(synthetic_shape, wide, 0)).find("'projections'"), std::string::npos);
  const ModelProjections<float> mha = random_projections(ModelShape{1, 4, 4, 8}, {2, 2, 2, 2}, {2, 2, 2, 2}, 3);
  EXPECT_NE(invalid_argument_of(construct(synthetic_shape, mha, 0)).find("'projections'"), std::string::npos);
  const std::string negative = invalid_argument_of(construct(synthetic_shape, good, -1));
  EXPECT_NE(negative.find("argument 'window'"), std::string::npos) << negative;

  // Queries of an earlier block whose window rows were released.
  CompressedKvCache cache(synthetic_shape, adjacent_rope, good, RopeMode::pre_rope, 2);
  const RowMatrix kv = RowMatrix::Ones(6, 16);
  cache.append(0, kv, kv, 0);
  cache.append(0, kv.topRows(3), kv.topRows(3), 6);
  EXPECT_NE(invalid_argument_of([&] { cache.attend(0, RowMatrix::Ones(2, 32), 2); }).find("'first_position'"),
            std::string::npos);
  EXPECT_NO_THROW(cache.attend(0, RowMatrix::Ones(3, 32), 6));
  EXPECT_THROW(kqsvd::parse_rope_mode("sideways"), kqsvd::InvalidArgument);
}

// ------------------------------------------------------------------------------------------------
// Calibration glue

TEST(CompressedKvCacheCalibration, ObserverAccumulatesTheGramsOfTheRecordedActivations) {
  const Stories260K& s = stories260k();
  const std::vector<std::vector<int>> sequences = {s.story(2, 30), s.story(3, 17)};
  kqsvd::llama::ActivationRecorder recorder;
  kqsvd::llama::observe_sequences(s.model, sequences, recorder);
  for (const RopeMode mode : kqsvd::all_rope_modes) {
    const kqsvd::ModelCalibration calibration = kqsvd::llama::calibrate(s.model, sequences, mode);
    for (Index l = 0; l < 5; ++l) {
      for (Index g = 0; g < 4; ++g) {
        Eigen::MatrixXd keys = Eigen::MatrixXd::Zero(8, 8), queries = Eigen::MatrixXd::Zero(8, 8);
        for (const auto& block : recorder.blocks(l)) {
          const RowMatrix& k = mode == RopeMode::post_rope ? block.keys : block.keys_pre_rope;
          const RowMatrix& q = mode == RopeMode::post_rope ? block.queries : block.queries_pre_rope;
          const Eigen::MatrixXd kg = k.middleCols(g * 8, 8).cast<double>();
          keys += kg.transpose() * kg;
          for (Index h = 2 * g; h < 2 * g + 2; ++h) {  // the group's query heads, stacked
            const Eigen::MatrixXd qh = q.middleCols(h * 8, 8).cast<double>();
            queries += qh.transpose() * qh;
          }
        }
        EXPECT_LT((calibration.keys(l, g).gram() - keys).cwiseAbs().maxCoeff(), 1e-3 * keys.cwiseAbs().maxCoeff());
        EXPECT_LT((calibration.queries(l, g).gram() - queries).cwiseAbs().maxCoeff(),
                  1e-3 * queries.cwiseAbs().maxCoeff());
        EXPECT_EQ(calibration.keys(l, g).token_count(), 47);
      }
    }
  }
  const std::vector<RowMatrix> wo = kqsvd::llama::output_weights(s.model.checkpoint());
  ASSERT_EQ(wo.size(), 5u);
  EXPECT_EQ(wo[3], s.model.checkpoint().layer(3).wo);
}

TEST(CompressedKvCacheCalibration, UniformRanksAndErrorBudgetsReachTheTargetRatio) {
  EXPECT_EQ(kqsvd::uniform_rank_for_ratio(64, 0.25), 16);
  EXPECT_EQ(kqsvd::uniform_rank_for_ratio(8, 0.75), 6);
  EXPECT_EQ(kqsvd::uniform_rank_for_ratio(8, 0.01), 1);
  EXPECT_THROW(kqsvd::uniform_rank_for_ratio(8, 0.0), kqsvd::InvalidArgument);
  for (const Method method : kqsvd::all_methods) {
    const ModelProjections<float>& full = full_rank_projections(method, RopeMode::post_rope);
    for (const double target : {0.25, 0.5, 0.75}) {
      const kqsvd::ErrorBudgetAllocation fit = kqsvd::error_budget_allocation(full, target);
      const ModelProjections<float> projections = full.truncated(fit.ranks);
      // 40 projections of dimension 8: one rank step moves the ratio by 1/320.
      EXPECT_NEAR(fit.ranks.compression_ratio(), target, 0.01) << to_string(method) << " " << target;
      Index latent = 0;
      for (Index l = 0; l < 5; ++l) {
        for (Index g = 0; g < 4; ++g) {
          for (const bool key : {true, false}) {
            const auto& f = key ? full.keys(l, g) : full.values(l, g);
            const auto& chosen = key ? projections.keys(l, g) : projections.values(l, g);
            // The smallest rank whose tail energy is within epsilon^2 of the total, counted here.
            const Eigen::VectorXd s2 = f.singular_values().array().square();
            Index expected = 8;
            for (Index r = 1; r < 8; ++r) {
              if (std::sqrt(s2.tail(8 - r).sum() / s2.sum()) <= fit.epsilon) {
                expected = r;
                break;
              }
            }
            EXPECT_EQ(chosen.rank(), expected);
            EXPECT_EQ(chosen.encoder(), f.encoder().leftCols(expected));
            latent += chosen.rank();
          }
        }
      }
      EXPECT_DOUBLE_EQ(fit.ranks.compression_ratio(), static_cast<double>(latent) / (5 * 4 * 2 * 8));
    }
  }
}


// ------------------------------------------------------------------------------------------------
// H2O and the online SVD baseline

template <typename Function>
void expect_invalid_argument(Function&& call, const std::string& fragment) {
  const std::string message = invalid_argument_of(std::forward<Function>(call));
  EXPECT_NE(message.find(fragment), std::string::npos) << message;
}

TEST(HeavyHitterKvCache, BudgetCoveringTheSequenceReproducesTheFullCache) {
  const Stories260K& s = stories260k();
  const std::vector<int> tokens = s.story(0, 40);
  FullKvCache full(s.model.shape(), s.model.rotary_embedding());
  const RowMatrix expected = logits_in_blocks(s.model, tokens, full);
  kqsvd::llama::HeavyHitterKvCache cache(s.model.shape(), s.model.rotary_embedding(), kqsvd::HeavyHitterBudget{20, 20});
  const float tolerance = 1e-4f * std::max(1.0f, expected.cwiseAbs().maxCoeff());
  EXPECT_LT(max_abs_difference(logits_in_blocks(s.model, tokens, cache), expected), tolerance);
  // A budget of 12 tokens evicts, and changes the logits: the comparison has teeth.
  kqsvd::llama::HeavyHitterKvCache small(s.model.shape(), s.model.rotary_embedding(), kqsvd::HeavyHitterBudget{6, 6});
  EXPECT_GT(max_abs_difference(logits_in_blocks(s.model, tokens, small), expected), 100 * tolerance);
  // Held: 12 tokens per head and layer, each its rows plus one float of accumulated attention.
  const ModelShape& shape = s.model.shape();
  EXPECT_EQ(small.bytes(), static_cast<std::size_t>(shape.layers * shape.kv_heads * 12 * (2 * shape.head_dim * 4 + 4)));
  EXPECT_EQ(small.head(2, 1).positions().back(), 39);
}

TEST(HeavyHitterKvCache, BlockPrefillEqualsTokenByTokenDecodeAloneAndOnLatents) {
  const Stories260K& s = stories260k();
  const std::vector<int> tokens = s.story(1, 36);
  const kqsvd::HeavyHitterBudget budget{5, 4};
  const ModelProjections<float> rank4 = full_rank_projections(Method::kq_svd, RopeMode::post_rope)
                                            .truncated(kqsvd::RankAllocation::uniform(s.model.shape(), 4, 4));
  // Rows and latents in float32: in float16, the last-bit differences between a block's and a token's
  // arithmetic can round a stored value the other way, and eviction, a discrete choice, amplifies that
  // (measured: 0.014 in the logits on latents, 0.0036 on full rows with the portable kernels, every
  // head's final set of tokens still the same).
  for (const bool low_rank : {false, true}) {
    SCOPED_TRACE(low_rank ? "on latents" : "alone");
    const auto make = [&] {
      return low_rank ? kqsvd::llama::HeavyHitterKvCache(s.model.shape(), s.model.rotary_embedding(), budget,
                                                         StorageFormat(), rank4)
                      : kqsvd::llama::HeavyHitterKvCache(s.model.shape(), s.model.rotary_embedding(), budget);
    };
    kqsvd::llama::HeavyHitterKvCache decode_cache = make(), block_cache = make();
    const RowMatrix decode = logits_in_blocks(s.model, tokens, decode_cache, 1);
    const float tolerance = 1e-4f * std::max(1.0f, decode.cwiseAbs().maxCoeff());
    for (const std::size_t block : {std::size_t(0), std::size_t(7)}) {
      EXPECT_LT(max_abs_difference(logits_in_blocks(s.model, tokens, block_cache, block), decode), tolerance) << block;
      EXPECT_EQ(block_cache.bytes(), decode_cache.bytes());
      for (Index l = 0; l < s.model.shape().layers; ++l) {
        for (Index h = 0; h < s.model.shape().kv_heads; ++h) {
          EXPECT_EQ(block_cache.head(l, h).positions(), decode_cache.head(l, h).positions()) << l << " " << h;
        }
      }
    }
  }
}

TEST(HeavyHitterKvCache, RefusesBadBudgetsProjectionsOfAnotherShapeAndOutOfOrderSteps) {
  const Stories260K& s = stories260k();
  expect_invalid_argument(
      [&] { kqsvd::llama::HeavyHitterKvCache(s.model.shape(), s.model.rotary_embedding(), kqsvd::HeavyHitterBudget{4, 0}); },
      "budget.recent");
  const ModelProjections<float> other = random_projections(synthetic_shape, {2, 2}, {2, 2}, 1);
  expect_invalid_argument(
      [&] {
        kqsvd::llama::HeavyHitterKvCache(s.model.shape(), s.model.rotary_embedding(), kqsvd::HeavyHitterBudget{4, 4},
                                         StorageFormat(), other);
      },
      "projections");
  kqsvd::llama::HeavyHitterKvCache cache(s.model.shape(), s.model.rotary_embedding(), kqsvd::HeavyHitterBudget{4, 4});
  const Index width = s.model.shape().kv_width();
  cache.append(0, RowMatrix::Ones(3, width), RowMatrix::Ones(3, width), 0);
  expect_invalid_argument([&] { cache.attend(0, RowMatrix::Ones(1, s.model.shape().query_width()), 1); },
                          "attends every position once, in order");
}

// The principal directions of rows, from their SVD in double: the projector onto the top r.
Eigen::MatrixXd svd_projector(const RowMatrix& rows, Index rank) {
  const Eigen::JacobiSVD<Eigen::MatrixXd> svd(rows.cast<double>(), Eigen::ComputeThinV);
  const Eigen::MatrixXd v = svd.matrixV().leftCols(rank);
  return v * v.transpose();
}

TEST(OnlineSvdKvCache, StoresEveryTokenOnThePromptsOwnPrincipalDirections) {
  const ModelShape& shape = synthetic_shape;
  const Index d = shape.head_dim, prompt = 24, later = 6, rank = 3;
  for (const RopeMode mode : kqsvd::all_rope_modes) {
    SCOPED_TRACE(to_string(mode));
    std::mt19937 engine(41);
    const RowMatrix keys = uniform(prompt + later, shape.kv_width(), engine);
    const RowMatrix values = uniform(prompt + later, shape.kv_width(), engine);
    kqsvd::llama::OnlineSvdKvCache cache(shape, adjacent_rope, rank, rank, StorageFormat(), mode);
    cache.append(0, keys.topRows(prompt), values.topRows(prompt), 0);
    EXPECT_TRUE(cache.fitted(0));
    cache.append(0, keys.bottomRows(later), values.bottomRows(later), prompt);
    // Independent: the bases from the SVD, in double, of the prompt's keys (rotated post-RoPE, as they are
    // pre-RoPE) and values; attention through the cache equals the definition's attention with them as
    // A = B, for the later tokens' queries.
    RowMatrix basis_keys = keys;
    if (mode == RopeMode::post_rope) {
      for (Index h = 0; h < shape.kv_heads; ++h) adjacent_rope.rotate(basis_keys.middleCols(h * d, d), 0);
    }
    const RowMatrix queries = uniform(later, shape.query_width(), engine);
    const RowMatrix output = cache.attend(0, queries, prompt);
    std::vector<LowRankProjection<float>> key_bases, value_bases;
    for (Index h = 0; h < shape.kv_heads; ++h) {
      const Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> key_eigen(svd_projector(basis_keys.block(0, h * d, prompt, d), rank));
      const Eigen::MatrixXd key_basis = key_eigen.eigenvectors().rightCols(rank);
      key_bases.emplace_back(Method::k_svd, key_basis.cast<float>(), key_basis.cast<float>(), Eigen::VectorXd::Ones(d));
      const Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> value_eigen(svd_projector(values.block(0, h * d, prompt, d), rank));
      const Eigen::MatrixXd value_basis = value_eigen.eigenvectors().rightCols(rank);
      value_bases.emplace_back(Method::k_svd, value_basis.cast<float>(), value_basis.cast<float>(), Eigen::VectorXd::Ones(d));
    }
    const ModelProjections<float> bases(shape, std::move(key_bases), std::move(value_bases));
    const Eigen::MatrixXd expected = reference_attention(shape, bases, mode, 0, keys, values, queries, prompt);
    EXPECT_LT((output.cast<double>() - expected).cwiseAbs().maxCoeff(), 1e-4);
    // Bytes: latents of every token, plus the bases (d x r floats for keys and for values per KV head).
    EXPECT_EQ(cache.bytes(), static_cast<std::size_t>(shape.kv_heads * ((prompt + later) * 2 * rank * 4 + 2 * d * rank * 4)));
  }
}

TEST(OnlineSvdKvCache, FullRankReproducesTheFullCacheAndRanksAreValidated) {
  const Stories260K& s = stories260k();
  const std::vector<int> tokens = s.story(0, 40);
  FullKvCache full(s.model.shape(), s.model.rotary_embedding());
  const RowMatrix expected = logits_in_blocks(s.model, tokens, full);
  const Index d = s.model.shape().head_dim;
  const float tolerance = 1e-3f * std::max(1.0f, expected.cwiseAbs().maxCoeff());
  for (const RopeMode mode : kqsvd::all_rope_modes) {
    kqsvd::llama::OnlineSvdKvCache cache(s.model.shape(), s.model.rotary_embedding(), d, d, StorageFormat(), mode);
    EXPECT_LT(max_abs_difference(logits_in_blocks(s.model, tokens, cache), expected), tolerance) << to_string(mode);
  }
  // Rank 2 of 8 on a 20-token prompt: the later tokens are off the prompt's basis, the logits move.
  kqsvd::llama::OnlineSvdKvCache low(s.model.shape(), s.model.rotary_embedding(), 2, 2);
  EXPECT_GT(max_abs_difference(logits_in_blocks(s.model, tokens, low, 20), expected), 100 * tolerance);
  expect_invalid_argument([&] { kqsvd::llama::OnlineSvdKvCache(s.model.shape(), s.model.rotary_embedding(), d + 1, 2); },
                          "key_rank");
  expect_invalid_argument([&] { kqsvd::llama::OnlineSvdKvCache(s.model.shape(), s.model.rotary_embedding(), 2, 0); },
                          "value_rank");
  expect_invalid_argument(
      [&] { kqsvd::llama::OnlineSvdKvCache(s.model.shape(), s.model.rotary_embedding(), 4, 4, StorageFormat::parse("q4_0")); },
      "key_rank");
}

}  // namespace kqsvd_test_compressed_kv_cache
