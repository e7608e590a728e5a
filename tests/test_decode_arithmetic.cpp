// DecodeArithmetic::int8_dot_products (kernels/decode_arithmetic.hpp): the integer decode path of 4- and
// 2-bit caches.
//  - The kernels compute exactly what the header says: scores of the int8-quantized query against the
//    stored codes, and value sums of int8-quantized weights, checked against sums written here from the
//    format's canonical bytes (encode_row, ggml's block layout for q4_0) in double precision.
//  - Through the public API, attention with integer dot products stays within the bound that the int8
//    quantization of query and weights implies, from attention on the stored rows in double precision.
// Random and real (tinyllama-h64) activations, full caches and latents.
#include <gtest/gtest.h>

#include <kqsvd/io/activation_file.hpp>
#include <kqsvd/kqsvd.hpp>

#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "test_support.hpp"

namespace kqsvd_test_decode_arithmetic {

using Eigen::Index;
using Eigen::MatrixXd;
using kqsvd::RowMatrix;
using kqsvd::StorageFormat;
using kqsvd::StorageKind;
using kqsvd::test::gaussian;

const char* const packed_formats[] = {"q4_0", "int4", "int4/64", "int4/8", "int4/12", "int2", "int2/16", "int2/4"};

// The packed formats whose groups divide `width`.
std::vector<StorageFormat> formats_for(Index width) {
  std::vector<StorageFormat> out;
  for (const char* name : packed_formats) {
    const StorageFormat format = StorageFormat::parse(name);
    if (width % format.group_size(width) == 0) out.push_back(format);
  }
  return out;
}

// A row as its format stores it, read from the canonical bytes: per element its code, per element the
// scale and offset of its group (x = scale * code + offset).
struct StoredRow {
  std::vector<int> codes;
  std::vector<double> scale, offset;
};

double half_to_double(const std::uint8_t* bytes) {
  std::uint16_t bits = 0;
  std::memcpy(&bits, bytes, 2);
  return static_cast<double>(static_cast<float>(Eigen::numext::bit_cast<Eigen::half>(bits)));
}

StoredRow stored_row(const StorageFormat& format, const Eigen::RowVectorXf& row) {
  const std::vector<std::uint8_t> bytes = kqsvd::encode_row(format, row);
  const Index width = row.size(), group = format.group_size(width);
  const int bits = format.code_bits();
  const Index per_byte = 8 / bits, stride = group / per_byte;
  StoredRow out{std::vector<int>(static_cast<std::size_t>(width)), std::vector<double>(static_cast<std::size_t>(width)),
                std::vector<double>(static_cast<std::size_t>(width))};
  const std::uint8_t* in = bytes.data();
  for (Index first = 0; first < width; first += group) {
    const double scale = half_to_double(in);
    in += 2;
    double offset = -8.0 * scale;  // q4_0: x = d (c - 8)
    if (format.has_minimum()) {
      offset = half_to_double(in);
      in += 2;
    }
    for (Index k = 0; k < stride; ++k, ++in) {
      for (Index p = 0; p < per_byte; ++p) {
        const auto j = static_cast<std::size_t>(first + k + p * stride);
        out.codes[j] = (*in >> (p * bits)) & ((1 << bits) - 1);
        out.scale[j] = scale;
        out.offset[j] = offset;
      }
    }
  }
  return out;
}

// The header's int8 quantization of an operand group, in the same float operations: codes and step d.
struct Int8Group {
  std::vector<int> codes;
  double step = 0.0;
};

Int8Group quantize(const std::vector<float>& x) {
  float largest = 0.0f;
  for (float v : x) largest = std::max(largest, std::abs(v));
  Int8Group out{std::vector<int>(x.size(), 0), 0.0};
  if (largest == 0.0f) return out;
  const float inverse = 127.0f / largest;
  for (std::size_t i = 0; i < x.size(); ++i) out.codes[i] = static_cast<int>(std::nearbyint(x[i] * inverse));
  out.step = static_cast<double>(largest / 127.0f);
  return out;
}

// ---- the kernels against sums of the stored codes -------------------------------------------------

template <StorageKind Kind>
void check_integer_kernels(const StorageFormat& format, const RowMatrix<float>& rows, const RowMatrix<float>& queries,
                           unsigned seed) {
  const Index n = rows.rows(), width = rows.cols(), m = queries.rows(), group = format.group_size(width);
  constexpr Index tokens = kqsvd::detail::cache_block_tokens;
  kqsvd::HeadCache cache(width, width, format);
  cache.append(rows, rows);
  std::vector<StoredRow> stored;
  for (Index i = 0; i < n; ++i) stored.push_back(stored_row(format, rows.row(i)));

  const kqsvd::detail::BlockedKeys<Kind> keys{cache.key_side(), true};
  const kqsvd::detail::BlockedValues<Kind> values{cache.value_side(), true};
  auto scratch = std::make_unique<kqsvd::detail::BlockScratch>();
  keys.prepare(queries, *scratch);  // the queries quantized once per call
  // Softmax-like weights in [0, 1], some exactly 0, none on the lanes past the last token.
  const MatrixXd weight_draws = gaussian(m, (n + tokens - 1) / tokens * tokens, seed).array().abs();
  Index checked = 0;
  for (Index first = 0; first < n; first += tokens) {
    const Index count = std::min(tokens, n - first);
    // Scores: block_rows per query.
    std::vector<float> scores(static_cast<std::size_t>(tokens * m));
    keys.score(first, count, queries, scores.data(), *scratch);
    for (Index q = 0; q < m; ++q) {
      std::vector<double> expected(static_cast<std::size_t>(count), 0.0), magnitude(static_cast<std::size_t>(count), 0.0);
      for (Index g = 0; g < width / group; ++g) {
        const std::vector<float> part(&queries(q, g * group), &queries(q, g * group) + group);
        const Int8Group q8 = quantize(part);
        long code_sum = 0;
        for (int c : q8.codes) code_sum += c;
        for (Index t = 0; t < count; ++t) {
          const StoredRow& row = stored[static_cast<std::size_t>(first + t)];
          long dot = 0, absolute = 0;
          for (Index e = 0; e < group; ++e) {
            const auto j = static_cast<std::size_t>(g * group + e);
            dot += q8.codes[static_cast<std::size_t>(e)] * row.codes[j];
            absolute += std::abs(q8.codes[static_cast<std::size_t>(e)] * row.codes[j]);
          }
          const auto j = static_cast<std::size_t>(g * group);
          expected[static_cast<std::size_t>(t)] += row.scale[j] * q8.step * dot + row.offset[j] * q8.step * code_sum;
          magnitude[static_cast<std::size_t>(t)] +=
              std::abs(row.scale[j] * q8.step) * absolute + std::abs(row.offset[j] * q8.step * code_sum);
        }
      }
      for (Index t = 0; t < count; ++t) {
        const double got = scores[static_cast<std::size_t>(q * tokens + t)];
        ASSERT_NEAR(got, expected[static_cast<std::size_t>(t)], 1e-6 * magnitude[static_cast<std::size_t>(t)] + 1e-30)
            << "score, query " << q << ", token " << first + t;
        ++checked;
      }
    }

    // Values: weights of query q on the block's lanes.
    std::vector<float> weights(static_cast<std::size_t>(tokens * m), 0.0f);
    for (Index q = 0; q < m; ++q) {
      for (Index t = 0; t < count; ++t) {
        const double draw = weight_draws(q, first + t);
        weights[static_cast<std::size_t>(q * tokens + t)] = draw < 0.3 ? 0.0f : static_cast<float>(std::exp(-draw));
      }
    }
    RowMatrix<float> acc = RowMatrix<float>::Zero(m, width);
    values.accumulate(first, count, weights.data(), acc, *scratch);
    for (Index q = 0; q < m; ++q) {
      for (Index g = 0; g < width / group; ++g) {
        std::vector<float> scaled(static_cast<std::size_t>(tokens), 0.0f);
        for (Index t = 0; t < count; ++t) {
          scaled[static_cast<std::size_t>(t)] =
              weights[static_cast<std::size_t>(q * tokens + t)] *
              static_cast<float>(stored[static_cast<std::size_t>(first + t)].scale[static_cast<std::size_t>(g * group)]);
        }
        const Int8Group w8 = quantize(scaled);
        for (Index e = 0; e < group; ++e) {
          const auto j = static_cast<std::size_t>(g * group + e);
          double expected = 0.0, magnitude = 0.0;
          for (Index t = 0; t < count; ++t) {
            const StoredRow& row = stored[static_cast<std::size_t>(first + t)];
            const double p = weights[static_cast<std::size_t>(q * tokens + t)];
            expected += w8.step * w8.codes[static_cast<std::size_t>(t)] * row.codes[j] + p * row.offset[j];
            magnitude += std::abs(w8.step * w8.codes[static_cast<std::size_t>(t)] * row.codes[j]) + std::abs(p * row.offset[j]);
          }
          ASSERT_NEAR(acc(q, static_cast<Index>(j)), expected, 1e-6 * magnitude + 1e-30)
              << "value sum, query " << q << ", element " << j << ", block at " << first;
          ++checked;
        }
      }
    }
  }
  EXPECT_GT(checked, 0);
}

void check_integer_kernels(const StorageFormat& format, const RowMatrix<float>& rows, const RowMatrix<float>& queries,
                           unsigned seed) {
  switch (format.kind()) {
    case StorageKind::q4_0: return check_integer_kernels<StorageKind::q4_0>(format, rows, queries, seed);
    case StorageKind::int4: return check_integer_kernels<StorageKind::int4>(format, rows, queries, seed);
    case StorageKind::int2: return check_integer_kernels<StorageKind::int2>(format, rows, queries, seed);
    default: FAIL() << format.name() << " has no integer path";
  }
}

TEST(IntegerDotProducts, KernelsEqualSumsOfTheStoredCodesOnRandomRows) {
  for (Index width : {32, 64, 96}) {
    // 1 token, a full block, a partial second block.
    for (Index n : {1, 128, 200}) {
      const RowMatrix<float> rows = (gaussian(n, width, 3 + static_cast<unsigned>(n)) * 2.0).cast<float>();
      RowMatrix<float> queries = gaussian(3, width, 5).cast<float>();
      queries.row(1).head(8).setZero();  // a group with zeros
      queries.row(2).head(width / 2).setZero();  // whole groups of zeros for the groups that divide width / 2
      queries(0, 1) = 40.0f;  // an outlier: the other elements of its group get few levels
      for (const StorageFormat& format : formats_for(width)) {
        SCOPED_TRACE(format.name() + ", width " + std::to_string(width) + ", n = " + std::to_string(n));
        check_integer_kernels(format, rows, queries, 7);
      }
    }
  }
}

const std::string activations = std::string(KQSVD_DATA_DIR) + "/activations/tinyllama-h64/calib.safetensors";

using RealHead = kqsvd::test::StackedHead<RowMatrix<float>>;

RealHead real_head(Index layer, Index kv_head) {
  return kqsvd::test::stacked_head<RowMatrix<float>>(kqsvd::io::ActivationFile(activations), layer, kv_head);
}

TEST(IntegerDotProducts, KernelsEqualSumsOfTheStoredCodesOnRealKeysAndValues) {
  const RealHead head = real_head(3, 1);
  const RowMatrix<float> queries = head.queries.middleRows(100, 2) / 8.0f;  // scaled by 1 / sqrt(64)
  for (const StorageFormat& format : formats_for(head.keys.cols())) {
    SCOPED_TRACE(format.name());
    check_integer_kernels(format, head.keys, queries, 11);
    check_integer_kernels(format, head.values, queries, 13);
  }
}

#ifdef KQSVD_TEST_EXPECTS_AVX512_KERNELS
// tests/CMakeLists.txt builds this file a second time with AVX-512 VNNI: its kernels must be the ones run.
TEST(IntegerDotProducts, TheAvx512KernelsAreTheOnesTested) { EXPECT_TRUE(kqsvd::detail::integer_kernels_avx512); }
#endif

// ---- through the public API: within the bound of the int8 quantization ----------------------------

// For one query (scaled, 1 x k) against a cache's stored keys (n x k) and values (n x c): the bound on
// |out_int8 - out| per output element that the int8 quantization implies, out being attention on the
// stored rows. Keys: each query element is off by at most 1/254 of its group's largest magnitude, so
// score t is off by B_t <= sum_g max|q_g| / 254 * sum_{e in g} |k_e(t)|, and the normalised weights by
// a factor within exp(+-2 B). Values: weight p_t scale_t is off by at most 1/254 of its block and
// group's largest, times codes of at most 2^bits - 1.
Eigen::VectorXd int8_bound(const StorageFormat& format, const Eigen::RowVectorXd& query, const MatrixXd& keys,
                           const MatrixXd& values, const Eigen::RowVectorXf& out) {
  const Index n = keys.rows(), k = keys.cols(), c = values.cols();
  const Index key_group = format.group_size(k), value_group = format.group_size(c);
  double largest_score_error = 0.0;
  for (Index t = 0; t < n; ++t) {
    double b = 0.0;
    for (Index g = 0; g < k / key_group; ++g) {
      b += query.segment(g * key_group, key_group).cwiseAbs().maxCoeff() / 254.0 *
           keys.row(t).segment(g * key_group, key_group).cwiseAbs().sum();
    }
    largest_score_error = std::max(largest_score_error, b);
  }
  const Eigen::VectorXd scores = keys * query.transpose();
  Eigen::VectorXd p = (scores.array() - scores.maxCoeff()).exp();
  p /= p.sum();
  const double drift = std::exp(2.0 * largest_score_error);
  const double largest_code = (1 << format.code_bits()) - 1;
  constexpr Index tokens = kqsvd::detail::cache_block_tokens;
  Eigen::VectorXd bound(c);
  for (Index e = 0; e < c; ++e) {
    double spread = 0.0;
    for (Index t = 0; t < n; ++t) spread = std::max(spread, std::abs(values(t, e) - out(e)));
    double value_part = 0.0;
    for (Index first = 0; first < n; first += tokens) {
      double largest = 0.0;
      for (Index t = first; t < std::min(n, first + tokens); ++t) {
        const Eigen::RowVectorXf row = values.row(t).cast<float>();
        const StoredRow stored = stored_row(format, row);
        largest = std::max(largest, p(t) * std::abs(stored.scale[static_cast<std::size_t>(e / value_group * value_group)]));
      }
      value_part += drift * largest / 254.0 * tokens * largest_code;
    }
    bound(e) = (drift - 1.0) * spread + value_part;
  }
  return bound;
}

void check_public_api(const StorageFormat& format, const RowMatrix<float>& keys, const RowMatrix<float>& values,
                      const Eigen::RowVectorXf& query, const std::string& what) {
  SCOPED_TRACE(format.name() + ", " + what);
  const Index d = keys.cols();
  kqsvd::HeadCache cache(d, values.cols(), format);
  cache.append(keys, values);
  const MatrixXd stored_keys = cache.keys().cast<double>(), stored_values = cache.values().cast<double>();
  const Eigen::RowVectorXd scaled = query.cast<double>() / std::sqrt(static_cast<double>(d));
  const MatrixXd on_stored = kqsvd::causal_attention(query.cast<double>(), stored_keys, stored_values);
  const Eigen::RowVectorXf integer = kqsvd::decode_attention(query, cache, kqsvd::DecodeArithmetic::int8_dot_products);
  const Eigen::RowVectorXf exact = kqsvd::decode_attention(query, cache);
  const Eigen::VectorXd bound = int8_bound(format, scaled, stored_keys, stored_values, integer);
  for (Index e = 0; e < values.cols(); ++e) {
    EXPECT_LE(std::abs(integer(e) - on_stored(0, e)), bound(e) + 1e-5 * std::abs(on_stored(0, e))) << "element " << e;
  }
  // The option reaches the kernels: the integer path rounds differently from the float one (a single
  // token may come out the same: its weight is 1).
  if (keys.rows() > 1) {
    EXPECT_NE((integer - exact).cwiseAbs().maxCoeff(), 0.0f);
  }
  EXPECT_LT((exact.cast<double>() - on_stored.row(0)).norm(), 2e-5 * on_stored.norm());
}

TEST(IntegerDotProducts, FullCacheAttentionWithinTheQuantizationBound) {
  // Scores of spread ~3: attention neither flat nor one-hot, so the weights matter.
  for (Index n : {1, 130, 2048 + 300}) {
    const RowMatrix<float> keys = gaussian(n, 64, 21).cast<float>(), values = gaussian(n, 64, 22).cast<float>();
    const Eigen::RowVectorXf query = (gaussian(1, 64, 23) * 3.0).cast<float>();
    for (const StorageFormat& format : formats_for(64)) check_public_api(format, keys, values, query, "n = " + std::to_string(n));
  }
  const RealHead head = real_head(2, 0);
  for (Index at : {127, 383}) {
    const Eigen::RowVectorXf query = head.queries.row(at);
    for (const StorageFormat& format : formats_for(64)) {
      check_public_api(format, head.keys.topRows(at % 128 + 1 + 256 * (at / 256)),
                       head.values.topRows(at % 128 + 1 + 256 * (at / 256)), query, "real, query " + std::to_string(at));
    }
  }
}

TEST(IntegerDotProducts, LatentAttentionWithinTheQuantizationBoundAndPrefillUnchanged) {
  const RealHead head = real_head(4, 1);
  kqsvd::GramAccumulator key_gram(64), query_gram(64), value_gram(64);
  key_gram.add(head.keys.cast<double>());
  query_gram.add(head.queries.cast<double>());
  value_gram.add(head.values.cast<double>());
  const auto key_projection = kqsvd::fit_projection<float>(kqsvd::Method::kq_svd, key_gram, query_gram,
                                                           kqsvd::RankSelection::fixed(32));
  const auto value_projection = kqsvd::fit_projection<float>(kqsvd::Method::k_svd, value_gram, value_gram,
                                                             kqsvd::RankSelection::fixed(32));
  const RowMatrix<float> key_latents = key_projection.compress(head.keys);
  const RowMatrix<float> value_latents = value_projection.compress(head.values);
  const Eigen::RowVectorXf query = head.queries.row(300);
  for (const StorageFormat& format : formats_for(32)) {
    SCOPED_TRACE(format.name());
    kqsvd::HeadCache cache(key_projection, value_projection, format);
    cache.append(key_projection, value_projection, head.keys, head.values);
    // Latent attention is full-row attention of the mapped query q B over the latents, times B_v^T.
    const Eigen::RowVectorXf mapped = query * key_projection.decoder();
    const Eigen::RowVectorXf integer =
        kqsvd::decode_attention(key_projection, value_projection, query, cache, kqsvd::DecodeArithmetic::int8_dot_products);
    const MatrixXd stored_keys = cache.keys().cast<double>(), stored_values = cache.values().cast<double>();
    const Eigen::RowVectorXd scaled = mapped.cast<double>() / 8.0;
    Eigen::VectorXd scores = stored_keys * scaled.transpose();
    Eigen::VectorXd p = (scores.array() - scores.maxCoeff()).exp();
    const Eigen::RowVectorXd latent_out = (p.transpose() * stored_values) / p.sum();
    const Eigen::RowVectorXf integer_latent =
        kqsvd::partial_attention(scaled.cast<float>(), kqsvd::VisibleRows::all(1, cache.size()), cache,
                                 kqsvd::DecodeArithmetic::int8_dot_products)
            .result();
    const Eigen::VectorXd bound = int8_bound(format, scaled, stored_keys, stored_values, integer_latent);
    for (Index e = 0; e < 32; ++e) {
      EXPECT_LE(std::abs(integer_latent(e) - latent_out(e)), bound(e) + 1e-5 * std::abs(latent_out(e))) << "latent " << e;
    }
    // decode_attention is that state decompressed.
    const Eigen::RowVectorXf decompressed = integer_latent * value_projection.decoder().transpose();
    EXPECT_LT((integer - decompressed).norm(), 1e-5f * decompressed.norm());
    // Prefill (many queries, the tile strategy) computes in float whatever the option says.
    const RowMatrix<float> many = head.queries.topRows(40) * key_projection.decoder() / 8.0f;
    const auto visible = kqsvd::VisibleRows::causal(40, 0);
    EXPECT_EQ(kqsvd::partial_attention(many, visible, cache, kqsvd::DecodeArithmetic::int8_dot_products).result(),
              kqsvd::partial_attention(many, visible, cache).result());
  }
}

// int8_dot_products_apply says which formats the option reaches, checked against what the kernels do:
// where it applies, a decode step over many tokens rounds differently from float arithmetic; where it
// does not, the result is bit-identical.
TEST(IntegerDotProducts, ApplyTellsWhichFormatsTheKernelsDecodeInIntegers) {
  const RowMatrix<float> keys = gaussian(300, 64, 31).cast<float>(), values = gaussian(300, 64, 32).cast<float>();
  const Eigen::RowVectorXf query = (gaussian(1, 64, 33) * 3.0).cast<float>();
  int applied = 0;
  for (const char* name : {"f32", "f16", "bf16", "fp8_e4m3", "fp8_e5m2", "int8", "q8_0", "q4_0", "int4", "int2",
                           "int4/16", "int2/16"}) {
    SCOPED_TRACE(name);
    const StorageFormat format = StorageFormat::parse(name);
    kqsvd::HeadCache cache(64, 64, format);
    cache.append(keys, values);
    const Eigen::RowVectorXf integer = kqsvd::decode_attention(query, cache, kqsvd::DecodeArithmetic::int8_dot_products);
    const Eigen::RowVectorXf exact = kqsvd::decode_attention(query, cache);
    EXPECT_EQ(kqsvd::int8_dot_products_apply(format), (integer - exact).cwiseAbs().maxCoeff() != 0.0f);
    EXPECT_EQ(kqsvd::int8_dot_products_apply(format), kqsvd::int8_dot_products_apply(format.kind()));
    applied += kqsvd::int8_dot_products_apply(format) ? 1 : 0;
  }
  EXPECT_EQ(applied, 5);  // q4_0, int4, int2, int4/16, int2/16
}

TEST(IntegerDotProducts, ArithmeticNamesRoundTripAndUnknownNamesAreRefused) {
  for (const auto arithmetic : {kqsvd::DecodeArithmetic::float32, kqsvd::DecodeArithmetic::int8_dot_products}) {
    EXPECT_EQ(kqsvd::parse_decode_arithmetic(kqsvd::to_string(arithmetic)), arithmetic);
  }
  kqsvd::test::expect_invalid([] { kqsvd::parse_decode_arithmetic("int8"); }, "unknown decode arithmetic 'int8'");
  kqsvd::test::expect_invalid([] { kqsvd::parse_decode_arithmetic(""); }, "expected float32 or int8_dot_products");
}

}  // namespace kqsvd_test_decode_arithmetic
