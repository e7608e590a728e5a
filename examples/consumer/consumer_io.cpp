// Uses the installed io component: saves a model's projections to a file and loads them back, exiting
// non-zero unless they come back identical.
#include <kqsvd/io/projection_file.hpp>
#include <kqsvd/kqsvd.hpp>

#include <cstdio>
#include <string>

int main() {
  const kqsvd::ModelShape shape{/*layers=*/2, /*query_heads=*/4, /*kv_heads=*/2, /*head_dim=*/16};
  kqsvd::ModelCalibration calibration(shape);
  for (Eigen::Index l = 0; l < shape.layers; ++l) {
    calibration.add(l, Eigen::MatrixXf::Random(64, shape.query_width()), Eigen::MatrixXf::Random(64, shape.kv_width()),
                    Eigen::MatrixXf::Random(64, shape.kv_width()));
  }
  const auto projections = kqsvd::ModelProjections<float>::fit(calibration, std::vector<Eigen::MatrixXf>{},
                                                               kqsvd::Method::k_svd, kqsvd::RankSelection::fixed(4),
                                                               kqsvd::RankSelection::fixed(8));
  kqsvd::io::ProjectionInfo info;
  info.model = "consumer";
  const std::string path = "consumer_projections.safetensors";
  kqsvd::io::ProjectionFile(projections, info).save(path, /*overwrite=*/true);
  const kqsvd::io::ProjectionFile loaded = kqsvd::io::ProjectionFile::load(path);
  const bool same = loaded.projections().keys(1, 1).encoder() == projections.keys(1, 1).encoder() &&
                    loaded.projections().ranks() == projections.ranks();
  std::printf("projection file round trip: %s\n", same ? "identical" : "DIFFERENT");
  std::remove(path.c_str());
  return same ? 0 : 1;
}
