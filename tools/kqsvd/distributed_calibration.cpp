#include "distributed_calibration.hpp"

#include <exception>
#include <utility>

namespace kqsvd::cli {

namespace {

std::string describe_layout(const io::ActivationLayout& layout) {
  return "model '" + layout.metadata.model + "' (" + to_string(layout.shape) + ", rope " +
         io::rope_spelling(layout.metadata.rope) + ")";
}

// A share of Gram files merged (they checked each other) must also be of the first file's model.
void require_layout(const io::ActivationLayout& found, const io::ActivationLayout& expected) {
  const io::ActivationMetadata &a = found.metadata, &b = expected.metadata;
  if (found.shape != expected.shape || a.model != b.model || a.rope != b.rope || a.rope_style != b.rope_style ||
      a.rope_theta != b.rope_theta) {
    throw DataError("'" + found.source + "' holds Grams of " + describe_layout(found) + ", '" + expected.source +
                    "' of " + describe_layout(expected) + " (calibrations of one model, one RoPE mode merge)");
  }
}

// One accumulator as [tokens, largest magnitudes (d), lower triangle of the Gram by columns].
void pack(const GramAccumulator& accumulator, std::vector<double>& out) {
  const Eigen::Index d = accumulator.dimension();
  const Eigen::MatrixXd gram = accumulator.gram();
  out.push_back(static_cast<double>(accumulator.token_count()));
  for (Eigen::Index i = 0; i < d; ++i) out.push_back(accumulator.largest_magnitudes()(i));
  for (Eigen::Index j = 0; j < d; ++j) {
    for (Eigen::Index i = j; i < d; ++i) out.push_back(gram(i, j));
  }
}

GramAccumulator unpack(const std::vector<double>& in, std::size_t& position, Eigen::Index d) {
  const auto tokens = static_cast<std::int64_t>(in.at(position++));
  Eigen::ArrayXd largest(d);
  for (Eigen::Index i = 0; i < d; ++i) largest(i) = in.at(position++);
  Eigen::MatrixXd gram(d, d);
  for (Eigen::Index j = 0; j < d; ++j) {
    for (Eigen::Index i = j; i < d; ++i) gram(i, j) = gram(j, i) = in.at(position++);
  }
  return GramAccumulator::restored(gram, tokens, largest);
}

// Every accumulator of a model's calibration in one fixed order: keys and values of each (layer, KV
// head), then each (layer, query head)'s queries.
std::vector<double> pack(const ModelCalibration& calibration) {
  const ModelShape& shape = calibration.shape();
  std::vector<double> out;
  for (Eigen::Index layer = 0; layer < shape.layers; ++layer) {
    for (Eigen::Index head = 0; head < shape.kv_heads; ++head) {
      pack(calibration.keys(layer, head), out);
      pack(calibration.values(layer, head), out);
    }
    for (Eigen::Index head = 0; head < shape.query_heads; ++head) pack(calibration.query_head(layer, head), out);
  }
  return out;
}

void merge_packed(ModelCalibration& calibration, const std::vector<double>& in) {
  const ModelShape& shape = calibration.shape();
  std::size_t position = 0;
  for (Eigen::Index layer = 0; layer < shape.layers; ++layer) {
    for (Eigen::Index head = 0; head < shape.kv_heads; ++head) {
      calibration.merge_keys(layer, head, unpack(in, position, shape.head_dim));
      calibration.merge_values(layer, head, unpack(in, position, shape.head_dim));
    }
    for (Eigen::Index head = 0; head < shape.query_heads; ++head) {
      calibration.merge_queries(layer, head, unpack(in, position, shape.head_dim));
    }
  }
  if (position != in.size()) throw DataError("a rank sent a calibration of another size (a different model?)");
}

std::vector<double> pack(const std::vector<WeightMatrix>& weights) {
  std::vector<double> out;
  for (const WeightMatrix& w : weights) {
    out.push_back(static_cast<double>(w.rows()));
    out.push_back(static_cast<double>(w.cols()));
    out.insert(out.end(), w.data(), w.data() + w.size());
  }
  return out;
}

std::vector<WeightMatrix> unpack_weights(const std::vector<double>& in) {
  std::vector<WeightMatrix> weights;
  for (std::size_t position = 0; position < in.size();) {
    const auto rows = static_cast<Eigen::Index>(in.at(position)), cols = static_cast<Eigen::Index>(in.at(position + 1));
    position += 2;
    WeightMatrix w(rows, cols);
    for (Eigen::Index i = 0; i < w.size(); ++i) w.data()[i] = static_cast<float>(in.at(position++));
    weights.push_back(std::move(w));
  }
  return weights;
}

Calibration calibrate_share(const std::vector<std::string>& share, CalibrationFiles kind, const io::ActivationLayout& expected) {
  if (share.empty()) return Calibration{ModelCalibration(expected.shape), expected, 0, {}};
  if (kind == CalibrationFiles::activations) return calibrate_files(share, expected);
  Calibration merged = merge_gram_files(share);
  require_layout(merged.layout, expected);
  merged.layout = expected;
  return merged;
}

}  // namespace

io::ActivationLayout first_layout(const std::vector<std::string>& paths, CalibrationFiles kind) {
  if (paths.empty()) throw UsageError(kind == CalibrationFiles::grams ? "no Gram files" : "no calibration files");
  if (kind == CalibrationFiles::activations) return read_layout(paths.front());
  // The metadata only: the file is read whole once, in its rank's share.
  const io::GramFile::Header header = io::GramFile::read_header(paths.front());
  return gram_layout(header.shape, header.info, paths.front());
}

Calibration calibrate_together(const ProcessGroup& group, const std::vector<std::string>& paths, CalibrationFiles kind,
                               const io::ActivationLayout& expected) {
  std::optional<Calibration> calibration;
  group.together([&] { calibration = calibrate_share(group.share(paths), kind, expected); });
  if (group.size() == 1) return std::move(*calibration);

  // Binomial tree: at step s, every rank r with r mod 2^(s+1) == 2^s sends its sum to r - 2^s and is done.
  // A rank whose packing or merging fails still sends and receives every message it is due (an empty
  // one in place of a sum), so no rank blocks on it; the failure is agreed on afterwards.
  const int rank = group.rank();
  std::exception_ptr failure;
  for (int step = 1; step < group.size(); step *= 2) {
    if (rank % (2 * step) == step) {
      std::vector<double> sum;
      try {
        if (!failure) sum = pack(calibration->statistics);
      } catch (...) {
        failure = std::current_exception();
      }
      group.send(sum, rank - step);
      break;
    }
    if (rank + step >= group.size()) continue;
    const std::vector<double> received = group.receive(rank + step);
    if (failure) continue;
    try {
      if (received.empty()) {
        throw DataError("rank " + std::to_string(rank + step) + " could not send its calibration sum");
      }
      merge_packed(calibration->statistics, received);
    } catch (...) {
      failure = std::current_exception();
    }
  }
  group.together([&] {
    if (failure) std::rethrow_exception(failure);
  });
  calibration->tokens = calibration->statistics.token_count();

  // The first file with output weights is in the share of the lowest rank that has any.
  const int holder = group.smallest(calibration->output_weights.empty() ? group.size() : rank);
  if (holder > 0 && holder < group.size()) {
    if (rank == holder) group.send(pack(calibration->output_weights), 0);
    if (rank == 0) calibration->output_weights = unpack_weights(group.receive(holder));
  }
  return std::move(*calibration);
}

}  // namespace kqsvd::cli
