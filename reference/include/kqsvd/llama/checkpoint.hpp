// kqsvd/llama/checkpoint.hpp -- the weights of a Llama-architecture model in llama2.c's .bin format.
//
// llama2.c's legacy ("v0") export is a 7 x int32 header
//   dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
// followed by float32 tensors in PyTorch [out][in] layout, each tensor for all layers at once:
//   token_embedding [vocab][dim], rms_att [L][dim], wq [L][dim][dim], wk [L][kv_dim][dim],
//   wv [L][kv_dim][dim], wo [L][dim][dim], rms_ffn [L][dim], w1 [L][hidden][dim], w2 [L][dim][hidden],
//   w3 [L][hidden][dim], rms_final [dim], an optional legacy RoPE table (seq_len * head_dim floats,
//   unused), and the classifier [vocab][dim] only when vocab_size is negative (a positive vocab_size
//   means the classifier is the token embedding).
// Weights keep that [out][in] layout as row-major matrices, so a layer's output is `x * w.transpose()`
// for a row of tokens x, and wo is the output projection W (dim x n_heads*head_dim) of the KQ-SVD notes.
//
//   auto checkpoint = kqsvd::llama::Checkpoint::load("stories260K.bin");
//   const auto& config = checkpoint.config();          // dim 64, 5 layers, 8 heads, 4 KV heads
//   const kqsvd::RowMatrix<float>& wo = checkpoint.layer(2).wo;   // 64 x 64
//
// load() throws kqsvd::FormatError, naming the file and the problem, for any malformed file (short,
// inconsistent header, size other than the header implies, non-finite weights) and kqsvd::IoError
// when the file cannot be opened. Sizes are validated before anything is allocated.
#pragma once

#include <Eigen/Core>

#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "kqsvd/core/detail/validation.hpp"
#include "kqsvd/core/error.hpp"
#include "kqsvd/llama/detail/binary_file.hpp"
#include "kqsvd/core/matrix.hpp"

namespace kqsvd::llama {

struct Config {
  using Index = Eigen::Index;

  Index dim = 0;         // width of the residual stream
  Index hidden_dim = 0;  // width of the SwiGLU feed-forward layer
  Index n_layers = 0;
  Index n_heads = 0;              // query heads
  Index n_kv_heads = 0;           // key/value heads; n_heads / n_kv_heads query heads share each (GQA)
  Index vocab_size = 0;           // always positive here; the file's sign is shared_classifier
  Index seq_len = 0;              // the context length the model was trained for
  bool shared_classifier = true;  // the output classifier is the token embedding

  Index head_dim() const { return dim / n_heads; }
  Index kv_dim() const { return n_kv_heads * head_dim(); }
  Index group_size() const { return n_heads / n_kv_heads; }

  // Upper bounds on the header fields: far above any llama2.c model, low enough that sizes derived from
  // them cannot overflow 64 bits.
  static constexpr Index max_dim = Index(1) << 16;
  static constexpr Index max_hidden_dim = Index(1) << 18;
  static constexpr Index max_layers = 1024;
  static constexpr Index max_vocab_size = Index(1) << 21;
  static constexpr Index max_seq_len = Index(1) << 24;
};

inline bool operator==(const Config& a, const Config& b) {
  return a.dim == b.dim && a.hidden_dim == b.hidden_dim && a.n_layers == b.n_layers && a.n_heads == b.n_heads &&
         a.n_kv_heads == b.n_kv_heads && a.vocab_size == b.vocab_size && a.seq_len == b.seq_len &&
         a.shared_classifier == b.shared_classifier;
}
inline bool operator!=(const Config& a, const Config& b) { return !(a == b); }

inline std::string to_string(const Config& config) {
  std::ostringstream out;
  out << "dim=" << config.dim << " hidden_dim=" << config.hidden_dim << " n_layers=" << config.n_layers
      << " n_heads=" << config.n_heads << " n_kv_heads=" << config.n_kv_heads << " vocab_size=" << config.vocab_size
      << " seq_len=" << config.seq_len
      << (config.shared_classifier ? " (shared classifier)" : " (separate classifier)");
  return out.str();
}

// One transformer block. Matrices are [out][in]; "x" below is a row of tokens.
struct LayerWeights {
  Eigen::VectorXf attention_norm;  // dim; RMSNorm gain before attention
  RowMatrix<float> wq;                    // n_heads*head_dim x dim;     queries = x wq^T
  RowMatrix<float> wk;                    // n_kv_heads*head_dim x dim;  keys    = x wk^T
  RowMatrix<float> wv;                    // n_kv_heads*head_dim x dim;  values  = x wv^T
  RowMatrix<float> wo;                    // dim x n_heads*head_dim;     output projection
  Eigen::VectorXf ffn_norm;        // dim; RMSNorm gain before the feed-forward layer
  RowMatrix<float> w1;                    // hidden_dim x dim; gate, through SiLU
  RowMatrix<float> w2;                    // dim x hidden_dim; down projection
  RowMatrix<float> w3;                    // hidden_dim x dim; up projection
};

}  // namespace kqsvd::llama

namespace kqsvd::detail {

// The first thing wrong with a configuration, or "" if it is consistent.
inline std::string config_problem(const llama::Config& config) {
  std::ostringstream out;
  const auto out_of_range = [&out](const char* field, llama::Config::Index value, llama::Config::Index low, llama::Config::Index high) {
    if (value >= low && value <= high) return false;
    out << field << " = " << value << " is outside [" << low << ", " << high << "]";
    return true;
  };
  if (out_of_range("dim", config.dim, 1, llama::Config::max_dim) ||
      out_of_range("hidden_dim", config.hidden_dim, 1, llama::Config::max_hidden_dim) ||
      out_of_range("n_layers", config.n_layers, 1, llama::Config::max_layers) ||
      out_of_range("n_heads", config.n_heads, 1, config.dim) ||
      out_of_range("n_kv_heads", config.n_kv_heads, 1, config.n_heads) ||
      out_of_range("vocab_size", config.vocab_size, 1, llama::Config::max_vocab_size) ||
      out_of_range("seq_len", config.seq_len, 1, llama::Config::max_seq_len)) {
    return out.str();
  }
  if (config.dim % config.n_heads != 0) {
    out << "dim = " << config.dim << " is not divisible by n_heads = " << config.n_heads;
  } else if (config.n_heads % config.n_kv_heads != 0) {
    out << "n_heads = " << config.n_heads << " is not divisible by n_kv_heads = " << config.n_kv_heads;
  } else if (config.head_dim() % 2 != 0) {
    out << "head_dim = dim / n_heads = " << config.head_dim() << " is odd (RoPE rotates pairs)";
  }
  return out.str();
}

// Number of float32 weights the file stores for `config`, excluding the legacy RoPE table. Fields are
// capped (llama::Config::max_*) so this cannot overflow.
inline std::uint64_t weight_count(const llama::Config& config) {
  const auto dim = static_cast<std::uint64_t>(config.dim);
  const auto hidden = static_cast<std::uint64_t>(config.hidden_dim);
  const auto layers = static_cast<std::uint64_t>(config.n_layers);
  const auto vocab = static_cast<std::uint64_t>(config.vocab_size);
  const auto kv_dim = static_cast<std::uint64_t>(config.kv_dim());
  const std::uint64_t per_layer = 2 * dim              // rms_att, rms_ffn
                                  + 2 * dim * dim      // wq, wo
                                  + 2 * kv_dim * dim   // wk, wv
                                  + 3 * hidden * dim;  // w1, w2, w3
  return vocab * dim + layers * per_layer + dim + (config.shared_classifier ? 0 : vocab * dim);
}

// Floats in the legacy freq_cis_real + freq_cis_imag block that older exports write after rms_final.
inline std::uint64_t legacy_rope_table_count(const llama::Config& config) {
  return static_cast<std::uint64_t>(config.seq_len) * static_cast<std::uint64_t>(config.head_dim());
}

constexpr std::uint64_t checkpoint_header_bytes = 7 * 4;

}  // namespace kqsvd::detail

namespace kqsvd::llama {

class Checkpoint {
 public:
  using Index = Eigen::Index;

  // Assembles a checkpoint from weights in memory (tests, synthetic models); throws
  // kqsvd::InvalidArgument on an inconsistent config, wrong shapes or non-finite weights. `classifier`
  // must be empty when config.shared_classifier, vocab_size x dim otherwise.
  Checkpoint(Config config, RowMatrix<float> token_embedding, std::vector<LayerWeights> layers, Eigen::VectorXf final_norm,
             RowMatrix<float> classifier = RowMatrix<float>())
      : config_(config),
        token_embedding_(std::move(token_embedding)),
        layers_(std::move(layers)),
        final_norm_(std::move(final_norm)),
        classifier_(std::move(classifier)) {
    validate_in_memory();
  }

  static Checkpoint load(const std::string& path) {
    detail::BinaryFile file(path, "kqsvd::llama::Checkpoint::load");
    Checkpoint checkpoint;
    checkpoint.config_ = read_config(file);
    const Config& config = checkpoint.config_;

    const std::uint64_t weights_bytes = detail::checkpoint_header_bytes + 4 * detail::weight_count(config);
    const std::uint64_t table_bytes = 4 * detail::legacy_rope_table_count(config);
    const bool has_rope_table = file.size() == weights_bytes + table_bytes;
    if (!has_rope_table && file.size() != weights_bytes) {
      file.fail("has " + std::to_string(file.size()) + " bytes, but its header (" + to_string(config) + ") implies " +
                std::to_string(weights_bytes + table_bytes) + " bytes with the legacy freq_cis block or " +
                std::to_string(weights_bytes) + " without it");
    }

    // From here every read is within the size just checked.
    const Index L = config.n_layers;
    const Index dim = config.dim;
    const Index kv_dim = config.kv_dim();
    const Index hidden = config.hidden_dim;
    checkpoint.token_embedding_ = read_matrix(file, config.vocab_size, dim, "token_embedding_table");
    checkpoint.layers_.resize(static_cast<std::size_t>(L));
    // The file stores each tensor for all layers before the next tensor.
    const auto read_all_layers = [&](auto LayerWeights::*member, Index rows, Index cols, const char* tensor) {
      for (Index l = 0; l < L; ++l) {
        const std::string name = "layers." + std::to_string(l) + "." + tensor;
        auto& destination = checkpoint.layers_[static_cast<std::size_t>(l)].*member;
        using Tensor = std::decay_t<decltype(destination)>;
        if constexpr (Tensor::IsVectorAtCompileTime) {
          destination = read_vector(file, rows, name);
        } else {
          destination = read_matrix(file, rows, cols, name);
        }
      }
    };
    read_all_layers(&LayerWeights::attention_norm, dim, 1, "rms_att_weight");
    read_all_layers(&LayerWeights::wq, dim, dim, "wq");
    read_all_layers(&LayerWeights::wk, kv_dim, dim, "wk");
    read_all_layers(&LayerWeights::wv, kv_dim, dim, "wv");
    read_all_layers(&LayerWeights::wo, dim, dim, "wo");
    read_all_layers(&LayerWeights::ffn_norm, dim, 1, "rms_ffn_weight");
    read_all_layers(&LayerWeights::w1, hidden, dim, "w1");
    read_all_layers(&LayerWeights::w2, dim, hidden, "w2");
    read_all_layers(&LayerWeights::w3, hidden, dim, "w3");
    checkpoint.final_norm_ = read_vector(file, dim, "rms_final_weight");
    if (has_rope_table) file.skip(table_bytes, "the legacy freq_cis block");
    if (!config.shared_classifier) checkpoint.classifier_ = read_matrix(file, config.vocab_size, dim, "wcls");
    return checkpoint;
  }

  const Config& config() const { return config_; }
  const RowMatrix<float>& token_embedding() const { return token_embedding_; }  // vocab_size x dim
  const std::vector<LayerWeights>& layers() const { return layers_; }
  const LayerWeights& layer(Index l) const {
    if (l < 0 || l >= config_.n_layers) {
      detail::throw_invalid(
          "kqsvd::llama::Checkpoint::layer", "l",
          "is " + std::to_string(l) + ", expected 0 <= l < " + std::to_string(config_.n_layers));
    }
    return layers_[static_cast<std::size_t>(l)];
  }
  const Eigen::VectorXf& final_norm() const { return final_norm_; }  // dim
  // vocab_size x dim; logits = normed_x * classifier()^T.
  const RowMatrix<float>& classifier() const { return config_.shared_classifier ? token_embedding_ : classifier_; }

 private:
  Checkpoint() = default;

  static Config read_config(detail::BinaryFile& file) {
    if (file.size() < detail::checkpoint_header_bytes) {
      file.fail("is too short for the llama2.c header: " + std::to_string(file.size()) + " bytes, expected at least " +
                std::to_string(detail::checkpoint_header_bytes));
    }
    std::int32_t header[7];
    file.read_words(header, 7, "the header");
    Config config;
    config.dim = header[0];
    config.hidden_dim = header[1];
    config.n_layers = header[2];
    config.n_heads = header[3];
    config.n_kv_heads = header[4];
    config.shared_classifier = header[5] > 0;
    // Negation in 64 bits: -INT32_MIN does not fit an int32.
    config.vocab_size = header[5] > 0 ? Index(header[5]) : -Index(header[5]);
    config.seq_len = header[6];
    const std::string problem = detail::config_problem(config);
    if (!problem.empty()) file.fail("has an invalid header: " + problem);
    return config;
  }

  static RowMatrix<float> read_matrix(detail::BinaryFile& file, Index rows, Index cols, const std::string& tensor) {
    RowMatrix<float> matrix(rows, cols);
    file.read_words(matrix.data(), static_cast<std::uint64_t>(matrix.size()), "tensor '" + tensor + "'");
    require_finite_weights(file, matrix, tensor);
    return matrix;
  }

  static Eigen::VectorXf read_vector(detail::BinaryFile& file, Index size, const std::string& tensor) {
    Eigen::VectorXf vector(size);
    file.read_words(vector.data(), static_cast<std::uint64_t>(size), "tensor '" + tensor + "'");
    require_finite_weights(file, vector, tensor);
    return vector;
  }

  template <typename Derived>
  static void require_finite_weights(const detail::BinaryFile& file, const Eigen::MatrixBase<Derived>& tensor,
                                     const std::string& name) {
    if (detail::all_finite(tensor)) return;
    for (Index i = 0; i < tensor.rows(); ++i) {
      for (Index j = 0; j < tensor.cols(); ++j) {
        if (!std::isfinite(tensor(i, j))) {
          std::ostringstream out;
          out << "has a non-finite weight (" << tensor(i, j) << ") in tensor '" << name << "' at [" << i;
          if (tensor.cols() > 1) out << "][" << j;
          out << "]";
          file.fail(out.str());
        }
      }
    }
  }

  void validate_in_memory() const {
    constexpr const char* where = "kqsvd::llama::Checkpoint";
    using detail::require_finite;
    using detail::shape_string;
    using detail::throw_invalid;
    const std::string problem = detail::config_problem(config_);
    if (!problem.empty()) throw_invalid(where, "config", problem);
    const auto require_shape = [&](const char* argument, Index rows, Index cols, Index expected_rows,
                                   Index expected_cols) {
      if (rows != expected_rows || cols != expected_cols) {
        throw_invalid(where, argument,
                      "is " + shape_string(rows, cols) + ", expected " + shape_string(expected_rows, expected_cols));
      }
    };
    const Config& c = config_;
    require_shape("token_embedding", token_embedding_.rows(), token_embedding_.cols(), c.vocab_size, c.dim);
    require_finite(where, "token_embedding", token_embedding_);
    if (static_cast<Index>(layers_.size()) != c.n_layers) {
      throw_invalid(where, "layers",
                    "has " + std::to_string(layers_.size()) + " layers, expected " + std::to_string(c.n_layers));
    }
    for (Index l = 0; l < c.n_layers; ++l) {
      const LayerWeights& layer = layers_[static_cast<std::size_t>(l)];
      const auto check = [&](const char* tensor, const auto& weights, Index expected_rows, Index expected_cols) {
        const std::string argument = "layers[" + std::to_string(l) + "]." + tensor;
        require_shape(argument.c_str(), weights.rows(), weights.cols(), expected_rows, expected_cols);
        require_finite(where, argument.c_str(), weights);
      };
      check("attention_norm", layer.attention_norm, c.dim, 1);
      check("wq", layer.wq, c.dim, c.dim);
      check("wk", layer.wk, c.kv_dim(), c.dim);
      check("wv", layer.wv, c.kv_dim(), c.dim);
      check("wo", layer.wo, c.dim, c.dim);
      check("ffn_norm", layer.ffn_norm, c.dim, 1);
      check("w1", layer.w1, c.hidden_dim, c.dim);
      check("w2", layer.w2, c.dim, c.hidden_dim);
      check("w3", layer.w3, c.hidden_dim, c.dim);
    }
    require_shape("final_norm", final_norm_.rows(), final_norm_.cols(), c.dim, 1);
    require_finite(where, "final_norm", final_norm_);
    if (c.shared_classifier) {
      if (classifier_.size() != 0) {
        throw_invalid(where, "classifier", "must be empty when config.shared_classifier is true");
      }
    } else {
      require_shape("classifier", classifier_.rows(), classifier_.cols(), c.vocab_size, c.dim);
      require_finite(where, "classifier", classifier_);
    }
  }

  Config config_;
  RowMatrix<float> token_embedding_;
  std::vector<LayerWeights> layers_;
  Eigen::VectorXf final_norm_;
  RowMatrix<float> classifier_;  // empty when the classifier is the token embedding
};

}  // namespace kqsvd::llama
