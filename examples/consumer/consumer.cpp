// Uses the installed package: fits one head with every method and checks the identities that hold
// whatever the data, and decodes a q4_0 cache with both arithmetics, exiting non-zero if the installed
// headers misbehave.
#include <kqsvd/kqsvd.hpp>

#include <cstdio>

int main() {
  const Eigen::Index d = 32, n = 500;
  Eigen::MatrixXd keys = Eigen::MatrixXd::Random(n, d) * Eigen::MatrixXd::Random(d, d);
  Eigen::MatrixXd queries = Eigen::MatrixXd::Random(n, d);
  kqsvd::GramAccumulator key_gram(d), query_gram(d);
  key_gram.add(keys);
  query_gram.add(queries);
  int failures = 0;
  for (kqsvd::Method method : kqsvd::all_methods) {
    const auto proj = kqsvd::fit_projection<double>(method, key_gram, query_gram, kqsvd::RankSelection::fixed(8));
    const double identity_error = (proj.encoder().transpose() * proj.decoder() - Eigen::MatrixXd::Identity(8, 8)).norm();
    std::printf("%-6s rank %ld  predicted error %.4f  |A^T B - I| = %.1e\n", kqsvd::to_string(method),
                static_cast<long>(proj.rank()), proj.predicted_relative_error(), identity_error);
    if (identity_error > 1e-9) ++failures;
  }
  // A llama.cpp q4_0 cache of full rows, decoded in float and with integer dot products: the two
  // results differ by the int8 rounding of the operands, a few percent at most.
  kqsvd::HeadCache cache(d, d, kqsvd::StorageFormat::parse("q4_0"));
  cache.append(Eigen::MatrixXf::Random(300, d), Eigen::MatrixXf::Random(300, d));
  const Eigen::RowVectorXf query = Eigen::RowVectorXf::Random(d);
  const Eigen::RowVectorXf exact = kqsvd::decode_attention(query, cache);
  const Eigen::RowVectorXf fast = kqsvd::decode_attention(query, cache, kqsvd::DecodeArithmetic::int8_dot_products);
  const float arithmetic_error = (fast - exact).norm() / exact.norm();
  std::printf("q4_0 decode: int8 dot products within %.1e of float\n", static_cast<double>(arithmetic_error));
  if (!(arithmetic_error < 0.05f)) ++failures;
  return failures == 0 ? 0 : 1;
}
