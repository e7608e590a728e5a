// What kqsvd::DecodeArithmetic::int8_dot_products costs in accuracy, on captured activations: every
// query of every head decoded against the cache of its sequence so far, stored in a 4- or 2-bit format
// (full rows, and KQ-SVD latents of rank 32 fitted on the calibration file), once with float arithmetic
// and once with integer dot products. Prints, per format, the relative error of the attention outputs
// against attention on the exact rows, sqrt(sum |out - exact|^2 / sum |exact|^2), for both arithmetics,
// and the relative difference between the two.
//
//   build/examples/decode_arithmetic data/activations/tinyllama-h64/calib.safetensors
//       data/activations/tinyllama-h64/eval.safetensors   (one command line)
#include <kqsvd/io/activation_file.hpp>
#include <kqsvd/kqsvd.hpp>

#include <cmath>
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

namespace {

using Eigen::Index;
using kqsvd::RowMatrix;

struct Errors {
  double exact = 0, float_error = 0, integer_error = 0, difference = 0;
  void add(const Eigen::RowVectorXf& reference, const Eigen::RowVectorXf& with_float,
           const Eigen::RowVectorXf& with_integer) {
    exact += reference.squaredNorm();
    float_error += (with_float - reference).squaredNorm();
    integer_error += (with_integer - reference).squaredNorm();
    difference += (with_integer - with_float).squaredNorm();
  }
};

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: decode_arithmetic CALIB.safetensors EVAL.safetensors\n");
    return 2;
  }
  try {
    const kqsvd::io::ActivationFile calibration(argv[1]), evaluation(argv[2]);
    const kqsvd::ModelShape& shape = evaluation.shape();
    const Index d = shape.head_dim, group = shape.group_size(), rank = d / 2;
    const std::vector<std::string> formats = {"q4_0", "int4", "int2"};
    std::vector<Errors> full(formats.size()), latent(formats.size());
    for (Index layer = 0; layer < shape.layers; ++layer) {
      for (Index h = 0; h < shape.kv_heads; ++h) {
        kqsvd::GramAccumulator key_gram(d), query_gram(d), value_gram(d);
        for (Index b = 0; b < calibration.batch(); ++b) {
          key_gram.add(calibration.keys(layer, b, h));
          query_gram.add(calibration.group_queries(layer, b, h));
          value_gram.add(calibration.values(layer, b, h));
        }
        const auto key_projection =
            kqsvd::fit_projection<float>(kqsvd::Method::kq_svd, key_gram, query_gram, kqsvd::RankSelection::fixed(rank));
        const auto value_projection =
            kqsvd::fit_projection<float>(kqsvd::Method::k_svd, value_gram, value_gram, kqsvd::RankSelection::fixed(rank));
        for (Index b = 0; b < evaluation.batch(); ++b) {
          const RowMatrix<float> keys = evaluation.keys(layer, b, h).cast<float>();
          const RowMatrix<float> values = evaluation.values(layer, b, h).cast<float>();
          const RowMatrix<float> queries = evaluation.group_queries(layer, b, h).cast<float>();  // g * T rows
          const Index tokens = keys.rows();
          for (std::size_t f = 0; f < formats.size(); ++f) {
            const kqsvd::StorageFormat format = kqsvd::StorageFormat::parse(formats[f]);
            kqsvd::HeadCache rows(d, d, format), latents(key_projection, value_projection, format);
            rows.append(keys, values);
            latents.append(key_projection, value_projection, keys, values);
            for (Index j = 0; j < group; ++j) {
              for (Index p = 0; p < tokens; ++p) {
                const RowMatrix<float> query = queries.row(j * tokens + p) / std::sqrt(static_cast<float>(d));
                const kqsvd::VisibleRows seen(kqsvd::VisibleRows::Indices::Zero(1), kqsvd::VisibleRows::Indices::Constant(1, p + 1));
                const Eigen::RowVectorXf exact =
                    kqsvd::partial_attention(query, seen, keys.topRows(p + 1), values.topRows(p + 1)).result();
                const auto decode = [&](kqsvd::DecodeArithmetic arithmetic) -> Eigen::RowVectorXf {
                  return kqsvd::partial_attention(query, seen, rows, arithmetic).result();
                };
                full[f].add(exact, decode(kqsvd::DecodeArithmetic::float32),
                            decode(kqsvd::DecodeArithmetic::int8_dot_products));
                const RowMatrix<float> mapped = query * key_projection.decoder();
                const auto decode_latents = [&](kqsvd::DecodeArithmetic arithmetic) -> Eigen::RowVectorXf {
                  return kqsvd::partial_attention(mapped, seen, latents, arithmetic).decompressed(value_projection).result();
                };
                latent[f].add(exact, decode_latents(kqsvd::DecodeArithmetic::float32),
                              decode_latents(kqsvd::DecodeArithmetic::int8_dot_products));
              }
            }
          }
        }
      }
    }
    std::printf("| cache | format | error, float32 arithmetic | error, int8 dot products | int8 vs float32 |\n");
    std::printf("|---|---|---|---|---|\n");
    for (int kind = 0; kind < 2; ++kind) {
      for (std::size_t f = 0; f < formats.size(); ++f) {
        const Errors& e = kind == 0 ? full[f] : latent[f];
        std::printf("| %s | %s | %.4f | %.4f | %.4f |\n",
                    kind == 0 ? "full rows" : ("KQ-SVD latents, r = " + std::to_string(rank)).c_str(), formats[f].c_str(),
                    std::sqrt(e.float_error / e.exact), std::sqrt(e.integer_error / e.exact), std::sqrt(e.difference / e.exact));
      }
    }
    return 0;
  } catch (const std::exception& error) {
    std::fprintf(stderr, "decode_arithmetic: %s\n", error.what());
    return 1;
  }
}
