// The llama2.c forward pass: file validation, tokenizer, KV-cache interface, and end-to-end agreement with
// the reference numbers in data/models/*/README.md (from an independent numpy port of run.c).
// The forward pass is also checked against a plain-loop port of run.c written here, so that a
// synthetic model exercises what the real ones do not (separate classifier, no legacy RoPE table).
#include <gtest/gtest.h>

#include <kqsvd/kernels/reference_attention.hpp>

#include <kqsvd/llama/generation.hpp>
#include <kqsvd/llama/likelihood.hpp>
#include <kqsvd/llama/tokenizer.hpp>
#include <kqsvd/llama/transformer.hpp>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>
#include "test_support.hpp"

namespace kqsvd_test_llama {

using kqsvd::test::repository_data;

namespace fs = std::filesystem;
using Eigen::Index;
using kqsvd::llama::ActivationRecorder;
using kqsvd::llama::Checkpoint;
using kqsvd::llama::Config;
using kqsvd::llama::FullKvCache;
using kqsvd::llama::LayerWeights;
using kqsvd::llama::NegativeLogLikelihood;
using RowMatrix = kqsvd::RowMatrix<float>;
using kqsvd::ModelShape;
using kqsvd::llama::Tokenizer;
using kqsvd::llama::Transformer;

// ------------------------------------------------------------------------------------------------
// Data and files

std::string test_data(const std::string& relative) { return std::string(KQSVD_TEST_DATA_DIR) + "/" + relative; }
// Models that are not shipped with the repository (no licence to redistribute them) are read from the
// folder KQSVD_MODELS_DIR names, when set; their tests skip otherwise.
std::string extra_models(const std::string& relative) {
  const char* folder = std::getenv("KQSVD_MODELS_DIR");
  return folder == nullptr ? std::string() : std::string(folder) + "/" + relative;
}
std::string stories260k_model() { return repository_data("models/stories260K/stories260K.bin"); }
std::string stories260k_tokenizer() { return repository_data("models/stories260K/tok512.bin"); }

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << "cannot write " << path;
}

// Stories as the READMEs define them: split on <|endoftext|>, surrounding whitespace stripped.
std::vector<std::string> split_stories(const std::string& text) {
  const std::string separator = "<|endoftext|>";
  const char* whitespace = " \t\n\r\f\v";
  std::vector<std::string> stories;
  std::size_t start = 0;
  while (true) {
    const std::size_t end = text.find(separator, start);
    const std::string part = text.substr(start, end == std::string::npos ? std::string::npos : end - start);
    const std::size_t first = part.find_first_not_of(whitespace);
    stories.push_back(first == std::string::npos ? ""
                                                 : part.substr(first, part.find_last_not_of(whitespace) - first + 1));
    if (end == std::string::npos) return stories;
    start = end + separator.size();
  }
}

std::vector<int> parse_ids(const std::string& text) {
  std::istringstream in(text);
  std::vector<int> ids;
  for (int id = 0; in >> id;) ids.push_back(id);
  return ids;
}

// A fresh directory per test, removed afterwards.
class LlamaFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() /
           ("kqsvd_llama_" + std::string(info->name()) + "_" + std::to_string(std::random_device{}()));
    fs::create_directories(dir_);
  }
  void TearDown() override {
    std::error_code ignored;
    fs::remove_all(dir_, ignored);
  }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  fs::path dir_;
};

// The message of the FormatError `action` throws, or a note that it threw none.
std::string format_error_of(const std::function<void()>& action) {
  try {
    action();
  } catch (const kqsvd::FormatError& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("(not a FormatError) ") + e.what();
  }
  return "(nothing thrown)";
}

::testing::AssertionResult contains(const std::string& text, const std::string& part) {
  if (text.find(part) != std::string::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "'" << text << "' does not contain '" << part << "'";
}

// ------------------------------------------------------------------------------------------------
// Synthetic checkpoints and an independent llama2.c writer

RowMatrix uniform(Index rows, Index cols, float low, float high, std::mt19937& engine) {
  std::uniform_real_distribution<float> distribution(low, high);
  RowMatrix m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = distribution(engine);
  return m;
}

Checkpoint random_checkpoint(const Config& config, unsigned seed) {
  std::mt19937 engine(seed);
  const float a = 1.0f / std::sqrt(static_cast<float>(config.dim));
  const auto gains = [&](Index n) -> Eigen::VectorXf { return uniform(n, 1, 0.5f, 1.5f, engine); };
  std::vector<LayerWeights> layers(static_cast<std::size_t>(config.n_layers));
  for (auto& layer : layers) {
    layer.attention_norm = gains(config.dim);
    layer.wq = uniform(config.dim, config.dim, -2 * a, 2 * a, engine);
    layer.wk = uniform(config.kv_dim(), config.dim, -2 * a, 2 * a, engine);
    layer.wv = uniform(config.kv_dim(), config.dim, -a, a, engine);
    layer.wo = uniform(config.dim, config.dim, -a, a, engine);
    layer.ffn_norm = gains(config.dim);
    layer.w1 = uniform(config.hidden_dim, config.dim, -a, a, engine);
    layer.w2 = uniform(config.dim, config.hidden_dim, -a, a, engine);
    layer.w3 = uniform(config.hidden_dim, config.dim, -a, a, engine);
  }
  RowMatrix embedding = uniform(config.vocab_size, config.dim, -1.0f, 1.0f, engine);
  Eigen::VectorXf final_norm = gains(config.dim);
  RowMatrix classifier;
  if (!config.shared_classifier) classifier = uniform(config.vocab_size, config.dim, -a, a, engine);
  return Checkpoint(config, std::move(embedding), std::move(layers), std::move(final_norm), std::move(classifier));
}

Config small_gqa_config(bool shared_classifier) {
  Config config;
  config.dim = 32;
  config.hidden_dim = 48;
  config.n_layers = 2;
  config.n_heads = 4;
  config.n_kv_heads = 2;
  config.vocab_size = 300;
  config.seq_len = 16;
  config.shared_classifier = shared_classifier;
  return config;
}

// Writes `c` in llama2.c's legacy v0 layout, following the README's description (little-endian host).
std::string llama2c_bytes(const Checkpoint& c, bool with_rope_table) {
  std::string bytes;
  const auto put_int = [&](std::int32_t v) { bytes.append(reinterpret_cast<const char*>(&v), 4); };
  const auto put = [&](const auto& m) {
    for (Index i = 0; i < m.rows(); ++i)
      for (Index j = 0; j < m.cols(); ++j) {
        const float v = m(i, j);
        bytes.append(reinterpret_cast<const char*>(&v), 4);
      }
  };
  const Config& k = c.config();
  for (const Index field : {k.dim, k.hidden_dim, k.n_layers, k.n_heads, k.n_kv_heads})
    put_int(static_cast<std::int32_t>(field));
  put_int(static_cast<std::int32_t>(k.shared_classifier ? k.vocab_size : -k.vocab_size));
  put_int(static_cast<std::int32_t>(k.seq_len));
  put(c.token_embedding());
  for (const auto& l : c.layers()) put(l.attention_norm);
  for (const auto& l : c.layers()) put(l.wq);
  for (const auto& l : c.layers()) put(l.wk);
  for (const auto& l : c.layers()) put(l.wv);
  for (const auto& l : c.layers()) put(l.wo);
  for (const auto& l : c.layers()) put(l.ffn_norm);
  for (const auto& l : c.layers()) put(l.w1);
  for (const auto& l : c.layers()) put(l.w2);
  for (const auto& l : c.layers()) put(l.w3);
  put(c.final_norm());
  if (with_rope_table) put(Eigen::VectorXf::Constant(k.seq_len * k.head_dim(), 0.25f));
  if (!k.shared_classifier) put(c.classifier());
  return bytes;
}

std::string with_int32(std::string bytes, std::size_t word, std::int32_t value) {
  std::memcpy(&bytes[4 * word], &value, 4);
  return bytes;
}

std::string with_float(std::string bytes, std::size_t float_index, float value) {
  std::memcpy(&bytes[28 + 4 * float_index], &value, 4);
  return bytes;
}

// ------------------------------------------------------------------------------------------------
// Independent references

// llama2.c run.c's forward(), one token at a time with plain loops and its own float RoPE.
class RunCPort {
 public:
  explicit RunCPort(const Checkpoint& weights) : w_(weights), c_(weights.config()) {
    key_cache_.assign(static_cast<std::size_t>(c_.n_layers), {});
    value_cache_.assign(static_cast<std::size_t>(c_.n_layers), {});
  }

  std::vector<float> forward(int token, int pos) {
    const int dim = static_cast<int>(c_.dim), kv_dim = static_cast<int>(c_.kv_dim());
    const int hs = static_cast<int>(c_.head_dim()), hidden = static_cast<int>(c_.hidden_dim);
    const int kv_mul = static_cast<int>(c_.n_heads / c_.n_kv_heads);
    std::vector<float> x(dim), xb(dim), xb2(dim), q(dim), k(kv_dim), v(kv_dim), hb(hidden), hb2(hidden);
    for (int i = 0; i < dim; ++i) x[i] = w_.token_embedding()(token, i);
    for (int l = 0; l < c_.n_layers; ++l) {
      const LayerWeights& L = w_.layer(l);
      rmsnorm(xb, x, L.attention_norm);
      matmul(q, xb, L.wq);
      matmul(k, xb, L.wk);
      matmul(v, xb, L.wv);
      for (int i = 0; i < dim; i += 2) {
        const int head_dim = i % hs;
        const float freq = 1.0f / std::pow(10000.0f, head_dim / static_cast<float>(hs));
        const float val = static_cast<float>(pos) * freq;
        const float fcr = std::cos(val), fci = std::sin(val);
        const int rotn = i < kv_dim ? 2 : 1;
        for (int r = 0; r < rotn; ++r) {
          std::vector<float>& vec = r == 0 ? q : k;
          const float v0 = vec[i], v1 = vec[i + 1];
          vec[i] = v0 * fcr - v1 * fci;
          vec[i + 1] = v0 * fci + v1 * fcr;
        }
      }
      key_cache_[l].push_back(k);
      value_cache_[l].push_back(v);
      for (int h = 0; h < c_.n_heads; ++h) {
        std::vector<float> att(pos + 1);
        for (int t = 0; t <= pos; ++t) {
          float score = 0;
          for (int i = 0; i < hs; ++i) score += q[h * hs + i] * key_cache_[l][t][(h / kv_mul) * hs + i];
          att[t] = score / std::sqrt(static_cast<float>(hs));
        }
        float max_val = att[0];
        for (float a : att) max_val = std::max(max_val, a);
        float sum = 0;
        for (float& a : att) sum += (a = std::exp(a - max_val));
        for (float& a : att) a /= sum;
        for (int i = 0; i < hs; ++i) {
          xb[h * hs + i] = 0;
          for (int t = 0; t <= pos; ++t) xb[h * hs + i] += att[t] * value_cache_[l][t][(h / kv_mul) * hs + i];
        }
      }
      matmul(xb2, xb, L.wo);
      for (int i = 0; i < dim; ++i) x[i] += xb2[i];
      rmsnorm(xb, x, L.ffn_norm);
      matmul(hb, xb, L.w1);
      matmul(hb2, xb, L.w3);
      for (int i = 0; i < hidden; ++i) hb[i] = hb[i] * (1.0f / (1.0f + std::exp(-hb[i]))) * hb2[i];
      matmul(xb, hb, L.w2);
      for (int i = 0; i < dim; ++i) x[i] += xb[i];
    }
    rmsnorm(x, std::vector<float>(x), w_.final_norm());
    std::vector<float> logits(static_cast<std::size_t>(c_.vocab_size));
    matmul(logits, x, w_.classifier());
    return logits;
  }

 private:
  static void rmsnorm(std::vector<float>& out, const std::vector<float>& x, const Eigen::VectorXf& weight) {
    float ss = 0;
    for (float v : x) ss += v * v;
    ss = 1.0f / std::sqrt(ss / static_cast<float>(x.size()) + 1e-5f);
    for (std::size_t j = 0; j < x.size(); ++j) out[j] = weight(static_cast<Index>(j)) * (ss * x[j]);
  }
  static void matmul(std::vector<float>& out, const std::vector<float>& x, const RowMatrix& w) {
    for (Index i = 0; i < w.rows(); ++i) {
      float val = 0;
      for (Index j = 0; j < w.cols(); ++j) val += w(i, j) * x[static_cast<std::size_t>(j)];
      out[static_cast<std::size_t>(i)] = val;
    }
  }

  const Checkpoint& w_;
  Config c_;
  std::vector<std::vector<std::vector<float>>> key_cache_, value_cache_;  // [layer][pos][kv_dim]
};

// run.c's encode() for BOS + text, verbatim in its structure: code points by lead byte, then rescan
// every adjacent pair after each merge.
std::vector<int> run_c_encode(const Tokenizer& tokenizer, const std::string& text) {
  std::vector<int> tokens = {Tokenizer::bos_id};
  if (!text.empty()) tokens.push_back(tokenizer.find(" "));
  std::string buffer;
  for (std::size_t c = 0; c < text.size(); ++c) {
    if ((static_cast<unsigned char>(text[c]) & 0xC0) != 0x80) buffer.clear();
    buffer += text[c];
    if (c + 1 < text.size() && (static_cast<unsigned char>(text[c + 1]) & 0xC0) == 0x80 && buffer.size() < 4) continue;
    const int id = tokenizer.find(buffer);
    if (id != -1) {
      tokens.push_back(id);
    } else {
      for (const unsigned char byte : buffer) tokens.push_back(byte + 3);
    }
    buffer.clear();
  }
  while (true) {
    float best_score = -1e10f;
    int best_id = -1;
    std::size_t best_idx = 0;
    for (std::size_t i = 0; i + 1 < tokens.size(); ++i) {
      const int id = tokenizer.find(tokenizer.piece(tokens[i]) + tokenizer.piece(tokens[i + 1]));
      if (id != -1 && tokenizer.score(id) > best_score) {
        best_score = tokenizer.score(id);
        best_id = id;
        best_idx = i;
      }
    }
    if (best_id == -1) return tokens;
    tokens[best_idx] = best_id;
    tokens.erase(tokens.begin() + static_cast<std::ptrdiff_t>(best_idx) + 1);
  }
}

// Adjacent-pair RoPE in double, as the READMEs state it.
Eigen::MatrixXd rotate_reference(Eigen::MatrixXd rows, Index head_dim, Index first_position) {
  for (Index i = 0; i < rows.rows(); ++i)
    for (Index c = 0; c < rows.cols(); c += 2) {
      const double angle = static_cast<double>(first_position + i) *
                           std::pow(10000.0, -static_cast<double>(c % head_dim) / static_cast<double>(head_dim));
      const double x0 = rows(i, c), x1 = rows(i, c + 1);
      rows(i, c) = x0 * std::cos(angle) - x1 * std::sin(angle);
      rows(i, c + 1) = x0 * std::sin(angle) + x1 * std::cos(angle);
    }
  return rows;
}

double max_abs_difference(const RowMatrix& a, const RowMatrix& b) { return (a - b).cwiseAbs().maxCoeff(); }

// A cache that keeps keys un-rotated and rotates them at attention time: the pre-RoPE path of a
// compressed cache, with the identity as its compression.
class PreRopeKvCache : public kqsvd::llama::KvCache {
 public:
  PreRopeKvCache(const ModelShape& shape, const kqsvd::RotaryEmbedding& rope)
      : KvCache(shape, rope),
        keys_(static_cast<std::size_t>(shape.layers)),
        values_(static_cast<std::size_t>(shape.layers)) {}
  std::size_t bytes() const override {
    std::size_t total = 0;
    for (std::size_t l = 0; l < keys_.size(); ++l)
      total += sizeof(float) * static_cast<std::size_t>(keys_[l].size() + values_[l].size());
    return total;
  }

 protected:
  void do_append(Index layer, const Eigen::Ref<const RowMatrix>& keys, const Eigen::Ref<const RowMatrix>& values,
                 Index) override {
    append_rows(keys_[static_cast<std::size_t>(layer)], keys);
    append_rows(values_[static_cast<std::size_t>(layer)], values);
  }
  RowMatrix do_attend(Index layer, const Eigen::Ref<const RowMatrix>& queries, Index first_position) override {
    const auto l = static_cast<std::size_t>(layer);
    RowMatrix rotated = keys_[l];
    const Index d = shape().head_dim;
    for (Index h = 0; h < shape().kv_heads; ++h) rotary_embedding().rotate(rotated.middleCols(h * d, d), 0);
    // The reference attention, one query head at a time.
    RowMatrix output(queries.rows(), shape().query_width());
    for (Index h = 0; h < shape().query_heads; ++h) {
      const Index g = shape().kv_head_of(h);
      output.middleCols(h * d, d) =
          kqsvd::causal_attention(queries.middleCols(h * d, d), rotated.middleCols(g * d, d),
                                  values_[l].middleCols(g * d, d), first_position, 1.0 / std::sqrt(double(d)));
    }
    return output;
  }
  void do_reset() override {
    for (auto& k : keys_) k.resize(0, shape().kv_width());
    for (auto& v : values_) v.resize(0, shape().kv_width());
  }

 private:
  static void append_rows(RowMatrix& stored, const Eigen::Ref<const RowMatrix>& rows) {
    const Index n = stored.rows();
    stored.conservativeResize(n + rows.rows(), rows.cols());
    stored.bottomRows(rows.rows()) = rows;
  }
  std::vector<RowMatrix> keys_, values_;
};

// ------------------------------------------------------------------------------------------------
// Checkpoint

TEST(LlamaCheckpoint, LoadsStories260KWithTheReadmeArchitectureAndLayout) {
  const Checkpoint checkpoint = Checkpoint::load(stories260k_model());
  const Config& c = checkpoint.config();
  EXPECT_EQ(c.dim, 64);
  EXPECT_EQ(c.hidden_dim, 172);
  EXPECT_EQ(c.n_layers, 5);
  EXPECT_EQ(c.n_heads, 8);
  EXPECT_EQ(c.n_kv_heads, 4);
  EXPECT_EQ(c.vocab_size, 512);
  EXPECT_EQ(c.seq_len, 512);
  EXPECT_TRUE(c.shared_classifier);
  EXPECT_EQ(c.head_dim(), 8);
  EXPECT_EQ(c.kv_dim(), 32);
  EXPECT_EQ(checkpoint.layer(4).wo.rows(), 64);
  EXPECT_EQ(checkpoint.layer(4).wo.cols(), 64);
  EXPECT_EQ(checkpoint.layer(0).wk.rows(), 32);
  EXPECT_EQ(&checkpoint.classifier(), &checkpoint.token_embedding());

  // Spot-check tensors against the raw file at the offsets the README's layout gives.
  const std::string bytes = read_file(stories260k_model());
  const auto raw = [&](std::size_t float_index) {
    float v;
    std::memcpy(&v, bytes.data() + 28 + 4 * float_index, 4);
    return v;
  };
  const std::size_t embedding = 512 * 64, rms = 5 * 64, wq = 5 * 64 * 64, wkv = 5 * 32 * 64;
  EXPECT_EQ(checkpoint.token_embedding()(3, 7), raw(3 * 64 + 7));
  EXPECT_EQ(checkpoint.layer(2).wq(5, 9), raw(embedding + rms + 2 * 64 * 64 + 5 * 64 + 9));
  EXPECT_EQ(checkpoint.layer(3).wv(31, 63), raw(embedding + rms + wq + wkv + 3 * 32 * 64 + 31 * 64 + 63));
  const std::size_t w2 = embedding + 2 * rms + 2 * wq + 2 * wkv + 5 * 172 * 64;
  EXPECT_EQ(checkpoint.layer(1).w2(10, 171), raw(w2 + 1 * 64 * 172 + 10 * 172 + 171));
  EXPECT_EQ(checkpoint.final_norm()(63), raw(w2 + 2 * 5 * 172 * 64 + 63));
}

TEST_F(LlamaFiles, CheckpointRoundTripsWithAndWithoutLegacyTableAndSeparateClassifier) {
  for (const bool shared : {true, false}) {
    const Checkpoint original = random_checkpoint(small_gqa_config(shared), 7);
    for (const bool table : {true, false}) {
      write_file(path("model.bin"), llama2c_bytes(original, table));
      const Checkpoint loaded = Checkpoint::load(path("model.bin"));
      EXPECT_EQ(loaded.config(), original.config());
      EXPECT_EQ(loaded.token_embedding(), original.token_embedding());
      EXPECT_EQ(loaded.classifier(), original.classifier());
      EXPECT_EQ(loaded.final_norm(), original.final_norm());
      for (Index l = 0; l < 2; ++l) {
        EXPECT_EQ(loaded.layer(l).wq, original.layer(l).wq);
        EXPECT_EQ(loaded.layer(l).wk, original.layer(l).wk);
        EXPECT_EQ(loaded.layer(l).wv, original.layer(l).wv);
        EXPECT_EQ(loaded.layer(l).wo, original.layer(l).wo);
        EXPECT_EQ(loaded.layer(l).w1, original.layer(l).w1);
        EXPECT_EQ(loaded.layer(l).w2, original.layer(l).w2);
        EXPECT_EQ(loaded.layer(l).w3, original.layer(l).w3);
        EXPECT_EQ(loaded.layer(l).attention_norm, original.layer(l).attention_norm);
        EXPECT_EQ(loaded.layer(l).ffn_norm, original.layer(l).ffn_norm);
      }
      if (!shared) {
        EXPECT_NE(loaded.classifier(), loaded.token_embedding());
      }
    }
  }
}

TEST_F(LlamaFiles, CheckpointRejectsMalformedFilesWithFormatErrorNamingFileAndProblem) {
  const Checkpoint model = random_checkpoint(small_gqa_config(false), 3);
  const std::string good = llama2c_bytes(model, true);
  // Floats in the file (README layout): 300*32 embedding, per layer 2*32 norms, 2*32*32 wq/wo,
  // 2*16*32 wk/wv, 3*48*32 FFN; 32 final norm; 300*32 classifier; 16*8 legacy RoPE table.
  const std::size_t weights = 300 * 32 + 2 * (2 * 32 + 2 * 32 * 32 + 2 * 16 * 32 + 3 * 48 * 32) + 32 + 300 * 32;
  const std::size_t with_table = 28 + 4 * (weights + 16 * 8), without_table = 28 + 4 * weights;
  ASSERT_EQ(good.size(), with_table);

  struct Case {
    const char* name;
    std::string bytes;
    std::string expected;
  };
  const std::size_t layer1_wk = 300 * 32 + 2 * 32 + 2 * 32 * 32 + 16 * 32;
  const std::vector<Case> cases = {
      {"empty", "", "is too short for the llama2.c header: 0 bytes, expected at least 28"},
      {"short header", good.substr(0, 20), "is too short for the llama2.c header: 20 bytes"},
      {"zero dim", with_int32(good, 0, 0), "has an invalid header: dim = 0 is outside [1, 65536]"},
      {"absurd dim", with_int32(good, 0, 1 << 30), "dim = 1073741824 is outside [1, 65536]"},
      {"negative hidden", with_int32(good, 1, -5), "hidden_dim = -5 is outside"},
      {"absurd layers", with_int32(good, 2, 1 << 20), "n_layers = 1048576 is outside [1, 1024]"},
      {"zero heads", with_int32(good, 3, 0), "n_heads = 0 is outside [1, 32]"},
      {"more kv heads than heads", with_int32(good, 4, 8), "n_kv_heads = 8 is outside [1, 4]"},
      {"zero vocab", with_int32(good, 5, 0), "vocab_size = 0 is outside [1, 2097152]"},
      {"most negative vocab", with_int32(good, 5, std::numeric_limits<std::int32_t>::min()),
       "vocab_size = 2147483648 is outside"},
      {"absurd seq_len", with_int32(good, 6, std::numeric_limits<std::int32_t>::max()),
       "seq_len = 2147483647 is outside"},
      {"dim not divisible by heads", with_int32(good, 3, 3), "dim = 32 is not divisible by n_heads = 3"},
      {"heads not divisible by kv heads", with_int32(with_int32(good, 3, 8), 4, 3),
       "n_heads = 8 is not divisible by n_kv_heads = 3"},
      {"odd head_dim", with_int32(with_int32(good, 3, 32), 4, 2), "head_dim = dim / n_heads = 1 is odd"},
      {"one byte short", good.substr(0, good.size() - 1),
       "has " + std::to_string(with_table - 1) +
           " bytes, but its header (dim=32 hidden_dim=48 n_layers=2 n_heads=4 "
           "n_kv_heads=2 vocab_size=300 seq_len=16 (separate classifier)) implies " +
           std::to_string(with_table) + " bytes with the legacy freq_cis block or " + std::to_string(without_table) +
           " without it"},
      {"one byte long", good + "x", "has " + std::to_string(with_table + 1) + " bytes, but its header"},
      // A large header on a small file must fail on size, before anything is allocated.
      {"huge claimed size", with_int32(with_int32(good, 0, 65536), 1, 262144), "bytes, but its header (dim=65536"},
      {"NaN weight", with_float(good, layer1_wk + 2 * 32 + 3, std::numeric_limits<float>::quiet_NaN()),
       "has a non-finite weight (nan) in tensor 'layers.1.wk' at [2][3]"},
      {"Inf final norm", with_float(good, weights - 300 * 32 - 32 + 5, std::numeric_limits<float>::infinity()),
       "has a non-finite weight (inf) in tensor 'rms_final_weight' at [5]"},
      {"Inf classifier", with_float(good, weights + 16 * 8 - 1, -std::numeric_limits<float>::infinity()),
       "in tensor 'wcls' at [299][31]"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const std::string file = path("bad.bin");
    write_file(file, c.bytes);
    const std::string message = format_error_of([&] { Checkpoint::load(file); });
    EXPECT_TRUE(contains(message, "kqsvd::llama::Checkpoint::load: file '" + file + "' "));
    EXPECT_TRUE(contains(message, c.expected));
  }
  EXPECT_THROW(Checkpoint::load(path("does_not_exist.bin")), kqsvd::IoError);
}

TEST(LlamaCheckpoint, InMemoryConstructorRejectsWrongShapes) {
  const Checkpoint model = random_checkpoint(small_gqa_config(true), 5);
  std::vector<LayerWeights> layers = model.layers();
  layers[1].wk = RowMatrix::Zero(16, 31);
  EXPECT_THROW(Checkpoint(model.config(), model.token_embedding(), layers, model.final_norm()), kqsvd::InvalidArgument);
  layers = model.layers();
  layers[0].w2(1, 1) = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THROW(Checkpoint(model.config(), model.token_embedding(), layers, model.final_norm()), kqsvd::InvalidArgument);
  EXPECT_THROW(
      Checkpoint(model.config(), model.token_embedding(), model.layers(), model.final_norm(), RowMatrix::Zero(300, 32)),
      kqsvd::InvalidArgument);  // a classifier although the config shares it
}

// ------------------------------------------------------------------------------------------------
// Tokenizer

TEST(LlamaTokenizer, EncodesTheReadmeSentence) {
  const Tokenizer tokenizer = Tokenizer::load(stories260k_tokenizer(), 512);
  EXPECT_EQ(tokenizer.vocab_size(), 512);
  EXPECT_EQ(tokenizer.max_token_length(), 7);
  const std::string sentence = "Once upon a time, there was a little girl named Lily.";
  EXPECT_EQ(tokenizer.encode(sentence, true, false),
            parse_ids("1 403 407 261 378 432 383 286 261 376 298 315 421 395 317 426"));
  std::vector<int> with_eos = parse_ids("403 407 261 378 432 383 286 261 376 298 315 421 395 317 426 2");
  EXPECT_EQ(tokenizer.encode(sentence, false, true), with_eos);
  EXPECT_EQ(tokenizer.encode("", true, true), (std::vector<int>{1, 2}));  // no dummy prefix for empty text
}

TEST(LlamaTokenizer, DecodesAsRunC) {
  const Tokenizer tokenizer = Tokenizer::load(stories260k_tokenizer());  // count read from the file
  EXPECT_EQ(tokenizer.vocab_size(), 512);
  const int space_t = tokenizer.find(" t");
  ASSERT_GE(space_t, 0);
  EXPECT_EQ(tokenizer.decode(Tokenizer::bos_id, space_t), "t");  // leading space dropped after BOS only
  EXPECT_EQ(tokenizer.decode(space_t, space_t), " t");
  EXPECT_EQ(tokenizer.decode(space_t, Tokenizer::first_byte_id + 0x41), "A");
  EXPECT_EQ(tokenizer.decode(space_t, Tokenizer::first_byte_id + 0x0A), "\n");
  EXPECT_THROW(tokenizer.decode(1, 512), kqsvd::InvalidArgument);
}

TEST(LlamaTokenizer, FallsBackToBytesForUnknownCodePoints) {
  const Tokenizer tokenizer = Tokenizer::load(stories260k_tokenizer(), 512);
  const std::string unknown = "\xe4\xb8\xad\xf0\x9f\x98\x80";  // U+4E2D and U+1F600: not pieces here
  const std::string known = "\xc3\xa9";                        // U+00E9: a piece
  ASSERT_EQ(tokenizer.find("\xe4\xb8\xad"), -1);
  ASSERT_EQ(tokenizer.find("\xf0\x9f\x98\x80"), -1);
  ASSERT_GE(tokenizer.find(known), 0);
  const std::vector<int> ids = tokenizer.encode(unknown + known, false, false);
  std::vector<int> expected = {tokenizer.find(" ")};
  for (const unsigned char byte : unknown) expected.push_back(Tokenizer::first_byte_id + byte);
  expected.push_back(tokenizer.find(known));
  EXPECT_EQ(ids, expected);
  EXPECT_EQ(tokenizer.decode(ids), unknown + known);
}

// The incremental merge must pick the same pairs as run.c's rescan-everything loop, and decoding
// must give the text back.
TEST(LlamaTokenizer, MatchesRunCEncodeAndRoundTripsTwentyStories) {
  const Tokenizer tokenizer = Tokenizer::load(stories260k_tokenizer(), 512);
  const std::vector<std::string> stories = split_stories(read_file(test_data("tinystories_first20.txt")));
  ASSERT_EQ(stories.size(), 20u);
  for (const std::string& story : stories) {
    const std::vector<int> ids = tokenizer.encode(story, true, false);
    EXPECT_EQ(ids, run_c_encode(tokenizer, story));
    EXPECT_EQ(tokenizer.decode(std::vector<int>(ids.begin() + 1, ids.end())), story);
  }
  const std::string mixed = "Caf\xc3\xa9 \xf0\x9f\x98\x80 \xe2\x80\x8a!";
  EXPECT_EQ(tokenizer.encode(mixed, true, false), run_c_encode(tokenizer, mixed));
}

TEST_F(LlamaFiles, TokenizerRejectsMalformedFilesWithFormatErrorNamingFileAndProblem) {
  const std::string good = read_file(stories260k_tokenizer());
  const auto entry_offset = [&](int id) {  // byte offset of token id's score
    std::size_t offset = 4;
    for (int i = 0; i < id; ++i) {
      std::int32_t length;
      std::memcpy(&length, good.data() + offset + 4, 4);
      offset += 8 + static_cast<std::size_t>(length);
    }
    return offset;
  };
  const auto patched = [&](std::size_t offset, const std::string& replacement) {
    std::string bytes = good;
    bytes.replace(offset, replacement.size(), replacement);
    return bytes;
  };
  const auto int_bytes = [](std::int32_t v) { return std::string(reinterpret_cast<const char*>(&v), 4); };
  const auto float_bytes = [](float v) { return std::string(reinterpret_cast<const char*>(&v), 4); };

  struct Case {
    const char* name;
    std::string bytes;
    Index vocab_size;  // -1: read until the end of the file
    std::string expected;
  };
  const std::size_t token_10 = entry_offset(10), token_200 = entry_offset(200), token_300 = entry_offset(300);
  const std::vector<Case> cases = {
      {"empty", "", 512, "is too short for the tokenizer header: 0 bytes, expected at least 4"},
      {"zero max length", patched(0, int_bytes(0)), 512, "max_token_length = 0 is outside [1, 65536]"},
      {"absurd max length", patched(0, int_bytes(1 << 30)), 512, "max_token_length = 1073741824 is outside"},
      {"truncated entry", good.substr(0, token_300 + 6), 512, "is truncated: token 300 (length) needs 4 bytes"},
      {"truncated bytes", good.substr(0, token_300 + 9), -1, "is truncated: token 300 (bytes)"},
      {"missing tokens", good.substr(0, token_300), 512, "is truncated: token 300 (score) needs 4 bytes"},
      {"trailing bytes", good + "abc", 512, "has 3 bytes after the 512 tokens of the vocabulary"},
      {"NaN score", patched(token_300, float_bytes(std::numeric_limits<float>::quiet_NaN())), 512,
       "has a non-finite score (nan) for token 300"},
      {"zero length", patched(token_300 + 4, int_bytes(0)), 512, "has an invalid length 0 for token 300"},
      {"length above max", patched(token_300 + 4, int_bytes(8)), 512,
       "has an invalid length 8 for token 300, expected [1, 7] (max_token_length)"},
      {"huge length", patched(token_300 + 4, int_bytes(std::numeric_limits<std::int32_t>::max())), 512,
       "has an invalid length 2147483647 for token 300"},
      {"too few tokens", good.substr(0, token_200), -1, "has 200 tokens, expected at least 259"},
      {"wrong byte piece", patched(token_10 + 8, "<0x99>"), 512,
       "has token 10 = '<0x99>', expected the byte-fallback piece for byte 7"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const std::string file = path("bad_tok.bin");
    write_file(file, c.bytes);
    const std::string message = format_error_of([&] {
      if (c.vocab_size < 0) {
        Tokenizer::load(file);
      } else {
        Tokenizer::load(file, c.vocab_size);
      }
    });
    EXPECT_TRUE(contains(message, "kqsvd::llama::Tokenizer::load: file '" + file + "' "));
    EXPECT_TRUE(contains(message, c.expected));
  }
  EXPECT_THROW(Tokenizer::load(path("missing.bin")), kqsvd::IoError);
  EXPECT_THROW(Tokenizer::load(stories260k_tokenizer(), 100), kqsvd::InvalidArgument);
}

// ------------------------------------------------------------------------------------------------
// KV cache

TEST(LlamaKvCache, FullCacheAttentionMatchesDirectSoftmaxWithRopeAndGqa) {
  const ModelShape shape{1, 4, 2, 8};
  std::mt19937 engine(11);
  const RowMatrix keys = uniform(7, 16, -1, 1, engine), values = uniform(7, 16, -1, 1, engine);
  const RowMatrix queries = uniform(3, 32, -2, 2, engine);
  FullKvCache cache(shape, kqsvd::RotaryEmbedding(8));
  cache.append(0, keys.topRows(4), values.topRows(4), 0);  // two blocks: the cache must join them
  cache.append(0, keys.bottomRows(3), values.bottomRows(3), 4);
  const RowMatrix output = cache.attend(0, queries, 4);  // positions 4, 5, 6

  const Eigen::MatrixXd rotated = rotate_reference(keys.cast<double>(), 8, 0);
  for (Index g = 0; g < 2; ++g) {
    EXPECT_LT((cache.head(0, g).keys().cast<double>() - rotated.middleCols(g * 8, 8)).cwiseAbs().maxCoeff(), 1e-5);
    EXPECT_EQ(cache.head(0, g).values(), values.middleCols(g * 8, 8));
  }
  for (Index i = 0; i < 3; ++i)
    for (Index h = 0; h < 4; ++h) {
      const Index g = h / 2, visible = 4 + i + 1;
      Eigen::VectorXd scores =
          rotated.block(0, g * 8, visible, 8) * queries.row(i).segment(h * 8, 8).transpose().cast<double>();
      scores = (scores.array() / std::sqrt(8.0)).exp().matrix();
      scores /= scores.sum();
      const Eigen::RowVectorXd expected = scores.transpose() * values.block(0, g * 8, visible, 8).cast<double>();
      EXPECT_LT((output.row(i).segment(h * 8, 8).cast<double>() - expected).cwiseAbs().maxCoeff(), 1e-5)
          << "query " << i << " head " << h;
    }
}

TEST(LlamaKvCache, FullCacheBytesEqualTheFormulaAndResetEmptiesIt) {
  const Transformer model(Checkpoint::load(stories260k_model()));
  FullKvCache cache(model.shape(), model.rotary_embedding());
  EXPECT_EQ(cache.bytes(), 0u);
  model.forward({1, 403, 407, 261, 378}, cache);
  model.forward({432}, cache);
  // 2 (keys, values) x 5 layers x 6 tokens x 4 KV heads x head_dim 8 x 4 bytes.
  EXPECT_EQ(cache.bytes(), 2u * 5 * 6 * 4 * 8 * sizeof(float));
  EXPECT_EQ(cache.head(4, 3).size(), 6);
  EXPECT_EQ(cache.next_position(0), 6);
  cache.reserve(512);  // capacity is not payload
  EXPECT_EQ(cache.bytes(), 2u * 5 * 6 * 4 * 8 * sizeof(float));
  cache.reset();
  EXPECT_EQ(cache.bytes(), 0u);
  EXPECT_EQ(cache.next_position(3), 0);
}

TEST(LlamaKvCache, RejectsInconsistentCalls) {
  const ModelShape shape{2, 4, 2, 8};
  FullKvCache cache(shape, kqsvd::RotaryEmbedding(8));
  const RowMatrix kv = RowMatrix::Ones(3, 16);
  EXPECT_THROW(cache.append(2, kv, kv, 0), kqsvd::InvalidArgument);                      // no such layer
  EXPECT_THROW(cache.append(0, RowMatrix::Ones(3, 15), kv, 0), kqsvd::InvalidArgument);  // width
  EXPECT_THROW(cache.append(0, kv, RowMatrix::Ones(2, 16), 0), kqsvd::InvalidArgument);  // row counts
  EXPECT_THROW(cache.append(0, kv, kv, 1), kqsvd::InvalidArgument);                      // gap
  cache.append(0, kv, kv, 0);
  EXPECT_THROW(cache.append(0, kv, kv, 0), kqsvd::InvalidArgument);                  // overlap
  EXPECT_THROW(cache.attend(0, RowMatrix::Ones(2, 32), 2), kqsvd::InvalidArgument);  // position 3 not cached
  EXPECT_THROW(cache.attend(1, RowMatrix::Ones(1, 32), 0), kqsvd::InvalidArgument);  // layer 1 empty
  EXPECT_THROW(cache.attend(0, RowMatrix::Ones(1, 16), 0), kqsvd::InvalidArgument);  // width
  EXPECT_THROW(FullKvCache(ModelShape{2, 4, 3, 8}, kqsvd::RotaryEmbedding(8)), kqsvd::InvalidArgument);
  EXPECT_THROW(FullKvCache(ModelShape{2, 4, 2, 8}, kqsvd::RotaryEmbedding(16)), kqsvd::InvalidArgument);

  const Transformer model(random_checkpoint(small_gqa_config(true), 1));
  EXPECT_THROW(model.forward({1}, cache), kqsvd::InvalidArgument);  // built for another shape
}

// The interface carries what a pre-RoPE cache needs: un-rotated keys, their positions, and the rotation.
TEST(LlamaKvCache, PreRopeCacheImplementationGivesTheSameLogits) {
  const Transformer model(Checkpoint::load(stories260k_model()));
  const std::vector<int> tokens = parse_ids("1 403 407 261 378 432 383 286 261 376 298 315 421 395 317 426");
  FullKvCache full(model.shape(), model.rotary_embedding());
  PreRopeKvCache pre_rope(model.shape(), model.rotary_embedding());
  const RowMatrix expected = model.forward(tokens, full);
  RowMatrix logits(tokens.size(), 512);
  logits.topRows(10) = model.forward(std::vector<int>(tokens.begin(), tokens.begin() + 10), pre_rope);
  for (Index i = 10; i < 16; ++i) logits.row(i) = model.forward({tokens[static_cast<std::size_t>(i)]}, pre_rope);
  EXPECT_LT(max_abs_difference(logits, expected), 1e-4);
  EXPECT_EQ(pre_rope.bytes(), full.bytes());
}

// ------------------------------------------------------------------------------------------------
// Transformer

TEST(LlamaTransformer, MatchesAPlainRunCPortOnASyntheticGqaModelWithSeparateClassifier) {
  const Checkpoint weights = random_checkpoint(small_gqa_config(false), 17);
  const Transformer model{Checkpoint(weights)};
  const std::vector<int> tokens = {1, 17, 299, 42, 42, 0, 5, 250, 3, 88, 123, 7};
  FullKvCache cache(model.shape(), model.rotary_embedding());
  const RowMatrix logits = model.forward(tokens, cache);
  RunCPort reference(weights);
  for (std::size_t pos = 0; pos < tokens.size(); ++pos) {
    const std::vector<float> expected = reference.forward(tokens[pos], static_cast<int>(pos));
    const Eigen::Map<const Eigen::RowVectorXf> row(expected.data(), static_cast<Index>(expected.size()));
    EXPECT_LT((logits.row(static_cast<Index>(pos)) - row).cwiseAbs().maxCoeff(),
              1e-4 * std::max(1.0f, row.cwiseAbs().maxCoeff()))
        << "position " << pos;
  }
}

TEST(LlamaTransformer, PrefillEqualsTokenByTokenDecodeAndBlockwiseNllAgrees) {
  const Transformer model(Checkpoint::load(stories260k_model()));
  const Tokenizer tokenizer = Tokenizer::load(stories260k_tokenizer(), 512);
  std::vector<int> tokens =
      tokenizer.encode(split_stories(read_file(test_data("tinystories_first20.txt")))[0], true, false);
  tokens.resize(160);
  FullKvCache cache(model.shape(), model.rotary_embedding());
  const RowMatrix prefill = model.forward(tokens, cache);
  cache.reset();
  RowMatrix decode(prefill.rows(), prefill.cols());
  for (std::size_t i = 0; i < tokens.size(); ++i) decode.row(static_cast<Index>(i)) = model.forward({tokens[i]}, cache);
  EXPECT_LT(max_abs_difference(prefill, decode), 1e-4 * std::max(1.0f, prefill.cwiseAbs().maxCoeff()));

  const NegativeLogLikelihood whole = kqsvd::llama::negative_log_likelihood(model, tokens, cache);
  EXPECT_EQ(whole.tokens, 159);
  for (const Index block : {1, 7, 64, 159, 1000}) {
    const NegativeLogLikelihood blocks = kqsvd::llama::negative_log_likelihood(model, tokens, cache, block);
    EXPECT_EQ(blocks.tokens, 159) << "block " << block;
    EXPECT_NEAR(blocks.mean(), whole.mean(), 1e-5) << "block " << block;
  }
}

TEST(LlamaTransformer, ActivationRecorderCapturesEachLayersQueriesKeysAndValues) {
  const Transformer model(Checkpoint::load(stories260k_model()));
  const Config& c = model.config();
  const std::vector<int> tokens = parse_ids("1 403 407 261 378 432 383 286 261 376 298 315");
  FullKvCache cache(model.shape(), model.rotary_embedding());
  ActivationRecorder whole;
  model.forward(tokens, cache, &whole);
  cache.reset();
  ActivationRecorder split;
  model.forward(std::vector<int>(tokens.begin(), tokens.begin() + 5), cache, &split);
  model.forward(std::vector<int>(tokens.begin() + 5, tokens.end()), cache, &split);

  ASSERT_EQ(whole.layers(), c.n_layers);
  for (Index l = 0; l < c.n_layers; ++l) {
    ASSERT_EQ(whole.blocks(l).size(), 1u);
    ASSERT_EQ(split.blocks(l).size(), 2u);
    const auto& a = whole.blocks(l)[0];
    EXPECT_EQ(a.layer, l);
    EXPECT_EQ(a.queries.rows(), 12);
    EXPECT_EQ(a.queries.cols(), c.n_heads * c.head_dim());
    EXPECT_EQ(a.keys.cols(), c.kv_dim());
    EXPECT_EQ(a.values.cols(), c.kv_dim());
    EXPECT_EQ(a.attention_output.cols(), c.dim);
    // Post-RoPE = rotate(pre-RoPE), head by head, from each block's first position.
    const Eigen::MatrixXd q = rotate_reference(a.queries_pre_rope.cast<double>(), c.head_dim(), 0);
    const Eigen::MatrixXd k = rotate_reference(a.keys_pre_rope.cast<double>(), c.head_dim(), 0);
    EXPECT_LT((a.queries.cast<double>() - q).cwiseAbs().maxCoeff(), 1e-5);
    EXPECT_LT((a.keys.cast<double>() - k).cwiseAbs().maxCoeff(), 1e-5);
    // Recording in two blocks gives the same rows as in one.
    const auto& second = split.blocks(l)[1];
    EXPECT_EQ(second.first_position, 5);
    EXPECT_LT(max_abs_difference(second.keys, a.keys.bottomRows(7)), 1e-5);
    EXPECT_LT(max_abs_difference(second.queries_pre_rope, a.queries_pre_rope.bottomRows(7)), 1e-5);
    EXPECT_LT(max_abs_difference(second.values, a.values.bottomRows(7)), 1e-5);
    EXPECT_LT(max_abs_difference(second.attention_output, a.attention_output.bottomRows(7)), 1e-5);
  }
  // Layer 0's inputs are the token embeddings, so its keys can be computed directly.
  const auto& w = model.checkpoint().layer(0);
  for (Index i = 0; i < 12; ++i) {
    const Eigen::RowVectorXf x = model.checkpoint().token_embedding().row(tokens[static_cast<std::size_t>(i)]);
    const Eigen::RowVectorXf normed =
        (x / std::sqrt(x.squaredNorm() / 64.0f + 1e-5f)).cwiseProduct(w.attention_norm.transpose());
    EXPECT_LT((whole.blocks(0)[0].keys_pre_rope.row(i) - normed * w.wk.transpose()).cwiseAbs().maxCoeff(), 1e-5);
    EXPECT_LT((whole.blocks(0)[0].values.row(i) - normed * w.wv.transpose()).cwiseAbs().maxCoeff(), 1e-5);
  }
}

TEST(LlamaTransformer, RejectsBadTokens) {
  const Transformer model(random_checkpoint(small_gqa_config(true), 2));
  FullKvCache cache(model.shape(), model.rotary_embedding());
  EXPECT_THROW(model.forward({}, cache), kqsvd::InvalidArgument);
  EXPECT_THROW(model.forward({1, 300}, cache), kqsvd::InvalidArgument);
  EXPECT_THROW(model.forward({-1}, cache), kqsvd::InvalidArgument);
  EXPECT_THROW(kqsvd::llama::generate_greedy(model, {}, 4, cache), kqsvd::InvalidArgument);
}

// ------------------------------------------------------------------------------------------------
// Real checkpoints against their READMEs

// Built with optimisation (-O1 and up: the test builds, sanitized or not): the held-out NLL of 20
// stories takes a few seconds; at -O0 a few minutes.
#ifdef __OPTIMIZE__
constexpr bool optimized_build = true;
#else
constexpr bool optimized_build = false;
#endif

struct ModelFiles {
  std::string model, tokenizer;
};

bool available(const ModelFiles& files) { return fs::exists(files.model) && fs::exists(files.tokenizer); }

std::vector<int> greedy_after_bos(const ModelFiles& files, Index steps) {
  const Transformer model(Checkpoint::load(files.model));
  FullKvCache cache(model.shape(), model.rotary_embedding());
  return kqsvd::llama::generate_greedy(model, {Tokenizer::bos_id}, steps, cache);
}

// The READMEs' protocol: each story = BOS + encode(story), truncated to `max_tokens`; mean over all
// predicted tokens of all stories.
NegativeLogLikelihood story_nll(const ModelFiles& files, const std::vector<std::string>& stories,
                                std::size_t max_tokens) {
  const Transformer model(Checkpoint::load(files.model));
  const Tokenizer tokenizer = Tokenizer::load(files.tokenizer, model.config().vocab_size);
  FullKvCache cache(model.shape(), model.rotary_embedding());
  NegativeLogLikelihood total;
  for (const std::string& story : stories) {
    std::vector<int> tokens = tokenizer.encode(story, true, false);
    if (tokens.size() > max_tokens) tokens.resize(max_tokens);
    total += kqsvd::llama::negative_log_likelihood(model, tokens, cache);
  }
  return total;
}

std::vector<std::string> first_twenty_stories() {
  return split_stories(read_file(test_data("tinystories_first20.txt")));
}

const ModelFiles stories260k{stories260k_model(), stories260k_tokenizer()};
const ModelFiles llama2xs{extra_models("llama2xs-tinystories-260K/model.bin"),
                          extra_models("llama2xs-tinystories-260K/tok512.bin")};
const ModelFiles aidreams{extra_models("aidreams260K/aidreams260K.bin"), extra_models("aidreams260K/tok512.bin")};
const ModelFiles tinyllama{repository_data("models/tinyllama-h64/model.bin"),
                           repository_data("models/tinyllama-h64/tok512.bin")};

// The READMEs' first 32 greedy ids after BOS and their greedy text.
TEST(LlamaModels, Stories260KGreedyMatchesReadme) {
  const std::vector<int> ids = greedy_after_bos(stories260k, 32);
  EXPECT_EQ(ids, parse_ids("403 407 261 378 432 383 286 261 376 298 315 421 395 317 426 338 401 396 267 337 410 408 "
                           "419 292 411 322 265 282 295 433 426 385"));
  const Tokenizer tokenizer = Tokenizer::load(stories260k.tokenizer, 512);
  EXPECT_EQ(tokenizer.decode(ids),
            "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One");
}

TEST(LlamaModels, Stories260KNllMatchesReadme) {
  const NegativeLogLikelihood nll = story_nll(stories260k, first_twenty_stories(), 512);
  EXPECT_EQ(nll.tokens, 6405);
  EXPECT_NEAR(nll.mean(), 1.2729, 1e-3);
}

TEST(LlamaModels, Llama2xsGreedyAndNllMatchReadme) {
  if (!available(llama2xs)) GTEST_SKIP() << "not shipped: set KQSVD_MODELS_DIR to a folder holding llama2xs-tinystories-260K/";
  EXPECT_EQ(greedy_after_bos(llama2xs, 32),
            parse_ids("403 407 261 378 432 383 286 261 376 298 315 421 395 317 426 338 401 396 267 337 410 408 419 "
                      "292 411 269 280 314 411 267 337 335"));
  const NegativeLogLikelihood nll = story_nll(llama2xs, first_twenty_stories(), 256);
  EXPECT_EQ(nll.tokens, 4934);
  EXPECT_NEAR(nll.mean(), 1.9495, 1e-3);
}

// MHA (no GQA), head_dim 16, its own vocabulary. The README gives its TinyStories NLL to 2 decimals.
TEST(LlamaModels, AiDreamsGreedyAndNllMatchReadme) {
  if (!available(aidreams)) GTEST_SKIP() << "not shipped: set KQSVD_MODELS_DIR to a folder holding aidreams260K/";
  EXPECT_EQ(greedy_after_bos(aidreams, 32),
            parse_ids("319 459 355 260 275 429 339 315 374 327 446 262 421 392 275 280 269 440 270 283 446 299 303 "
                      "266 358 430 312 379 441 260 446 262"));
  EXPECT_NEAR(story_nll(aidreams, first_twenty_stories(), 128).mean(), 5.48, 5e-3);
}

TEST(LlamaModels, TinyllamaH64GreedyMatchesReadme) {
  EXPECT_EQ(greedy_after_bos(tinyllama, 32),
            parse_ids("403 407 261 378 432 383 286 261 376 298 315 421 395 317 426 338 401 396 267 337 335 311 267 "
                      "422 419 269 344 294 280 347 433 417"));
}

TEST(LlamaModels, TinyllamaH64NllOnTrainingStoriesMatchesReadme) {
  const NegativeLogLikelihood nll = story_nll(tinyllama, first_twenty_stories(), 256);
  EXPECT_EQ(nll.tokens, 4934);
  EXPECT_NEAR(nll.mean(), 0.9310, 1e-3);
}

// Unoptimised (Debug, sanitizer) builds take tens of seconds here, so they run it only on request.
TEST(LlamaModels, TinyllamaH64NllOnHeldOutStoriesMatchesReadme) {
  if (!optimized_build && std::getenv("KQSVD_SLOW_TESTS") == nullptr) {
    GTEST_SKIP() << "slow without optimisation; set KQSVD_SLOW_TESTS=1 to run it";
  }
  const std::string text_path = repository_data("text/tinystories/tinystories_sample.txt");
  const std::vector<std::string> all = split_stories(read_file(text_path));
  ASSERT_GE(all.size(), 2120u);
  const NegativeLogLikelihood nll =
      story_nll(tinyllama, std::vector<std::string>(all.begin() + 2100, all.begin() + 2120), 256);
  EXPECT_EQ(nll.tokens, 5076);
  EXPECT_NEAR(nll.mean(), 1.6496, 1e-3);
}

}  // namespace kqsvd_test_llama
