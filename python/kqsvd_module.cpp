// python/kqsvd_module.cpp -- the Python module kqsvd (its compiled part, kqsvd._core): the library's API
// for numpy arrays and, through .numpy(), torch tensors. Names and semantics mirror C++; rows are tokens.
//
// Arrays in: any 2-D array numpy accepts, float16, float32 or float64, any strides. float32 and float64
// are read in place (an Eigen map over numpy's strides: no copy); float16 is converted in a copy; other
// dtypes (integers, complex, objects) are refused by name. Arrays out: fresh numpy arrays.
// Errors: every kqsvd::Error arrives as the Python exception of the same name (kqsvd.InvalidArgument,
// also a ValueError; kqsvd.IoError, also an OSError; kqsvd.FormatError; kqsvd.NumericalError), carrying
// the C++ message.
#include <pybind11/eigen.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <kqsvd/kqsvd.hpp>
#include <kqsvd/io/activation_evaluation.hpp>
#include <kqsvd/io/activation_file.hpp>
#include <kqsvd/io/activation_writer.hpp>
#include <kqsvd/io/gram_file.hpp>
#include <kqsvd/io/projection_file.hpp>
#include <kqsvd/io/sensitivity_file.hpp>
#include <kqsvd/llama/full_kv_cache.hpp>
#include <kqsvd/llama/tokenizer.hpp>
#include <kqsvd/llama/transformer.hpp>

#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

using Index = Eigen::Index;
using Strides = Eigen::Stride<Eigen::Dynamic, Eigen::Dynamic>;
template <typename Scalar>
using RowsMap = Eigen::Map<const kqsvd::RowMatrix<Scalar>, 0, Strides>;

[[noreturn]] void invalid(const std::string& function, const std::string& argument, const std::string& problem) {
  throw kqsvd::InvalidArgument("kqsvd." + function + ": argument '" + argument + "' " + problem);
}

// Calls f(map) with a read-only Eigen map of `object` as rows: float32 / float64 in place, float16 via a
// float32 copy. `width` (when >= 0) is the required number of columns.
template <typename F>
decltype(auto) with_rows(const std::string& function, const std::string& argument, const py::handle& object, Index width,
                         F&& f) {
  py::array array = py::array::ensure(object);
  if (!array) invalid(function, argument, "is not an array numpy can read");
  const py::dtype dtype = array.dtype();
  const char kind = dtype.kind();
  if (kind != 'f') {
    invalid(function, argument,
            "has dtype " + dtype.attr("name").cast<std::string>() + "; expected float16, float32 or float64 (convert with .astype)");
  }
  if (array.ndim() != 2) {
    invalid(function, argument, "has " + std::to_string(array.ndim()) + " dimensions; expected 2 (tokens x features)");
  }
  if (width >= 0 && array.shape(1) != width) {
    invalid(function, argument, "has " + std::to_string(array.shape(1)) + " columns, expected " + std::to_string(width));
  }
  if (dtype.itemsize() == 2) {
    array = py::array::ensure(array.attr("astype")("float32"));
  } else if (dtype.itemsize() != 4 && dtype.itemsize() != 8) {
    invalid(function, argument, "has dtype " + dtype.attr("name").cast<std::string>() + "; expected float16, float32 or float64");
  }
  const auto itemsize = static_cast<Index>(array.itemsize());
  const Index rows = array.shape(0), cols = array.shape(1);
  Index outer = array.strides(0), inner = array.strides(1);
  if (outer < 0 || inner < 0 || outer % itemsize != 0 || inner % itemsize != 0) {
    array = py::array::ensure(py::module_::import("numpy").attr("ascontiguousarray")(array));
    outer = array.strides(0);
    inner = array.strides(1);
  }
  const Strides strides(outer / itemsize, inner / itemsize);
  if (itemsize == 4) return f(RowsMap<float>(static_cast<const float*>(array.data()), rows, cols, strides));
  return f(RowsMap<double>(static_cast<const double*>(array.data()), rows, cols, strides));
}

template <typename Scalar>
kqsvd::RowMatrix<Scalar> rows_of(const std::string& function, const std::string& argument, const py::handle& object,
                                 Index width = -1) {
  return with_rows(function, argument, object, width, [](const auto& map) { return map.template cast<Scalar>().eval(); });
}

// A Gram: a GramAccumulator (its mean Gram) or a square array.
Eigen::MatrixXd gram_of(const std::string& function, const std::string& argument, const py::handle& object) {
  if (py::isinstance<kqsvd::GramAccumulator>(object)) {
    const auto& accumulator = object.cast<const kqsvd::GramAccumulator&>();
    if (accumulator.token_count() == 0) invalid(function, argument, "holds no tokens");
    return accumulator.mean_gram();
  }
  Eigen::MatrixXd gram = rows_of<double>(function, argument, object);
  if (gram.rows() != gram.cols()) {
    invalid(function, argument, "is " + std::to_string(gram.rows()) + " x " + std::to_string(gram.cols()) + ", expected square");
  }
  return gram;
}

kqsvd::RankSelection rank_selection(const std::string& function, std::optional<Index> rank, std::optional<double> eps) {
  if (rank.has_value() == eps.has_value()) invalid(function, "rank", "or 'eps': give exactly one of them");
  return rank ? kqsvd::RankSelection::fixed(*rank) : kqsvd::RankSelection::error_budget(*eps);
}

kqsvd::Method method_of(const std::string& name) { return kqsvd::parse_method(name); }

py::object exception(const char* name) { return py::module_::import("kqsvd").attr(name); }

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "kqsvd: KQ-SVD low-rank KV caches (the compiled part; import kqsvd)";
  m.attr("__version__") = kqsvd::version_string;

  py::register_exception_translator([](std::exception_ptr pointer) {
    try {
      if (pointer) std::rethrow_exception(pointer);
    } catch (const kqsvd::InvalidArgument& error) {
      PyErr_SetString(exception("InvalidArgument").ptr(), error.what());
    } catch (const kqsvd::FormatError& error) {
      PyErr_SetString(exception("FormatError").ptr(), error.what());
    } catch (const kqsvd::NumericalError& error) {
      PyErr_SetString(exception("NumericalError").ptr(), error.what());
    } catch (const kqsvd::IoError& error) {
      PyErr_SetString(exception("IoError").ptr(), error.what());
    } catch (const kqsvd::Error& error) {
      PyErr_SetString(exception("Error").ptr(), error.what());
    }
  });

  py::class_<kqsvd::ModelShape>(m, "ModelShape", "layers, query heads, KV heads (GQA when fewer) and head dimension")
      .def(py::init([](Index layers, Index query_heads, Index kv_heads, Index head_dim) {
             kqsvd::ModelShape shape{layers, query_heads, kv_heads, head_dim};
             shape.validate();
             return shape;
           }),
           py::arg("layers"), py::arg("query_heads"), py::arg("kv_heads"), py::arg("head_dim"))
      .def_readonly("layers", &kqsvd::ModelShape::layers)
      .def_readonly("query_heads", &kqsvd::ModelShape::query_heads)
      .def_readonly("kv_heads", &kqsvd::ModelShape::kv_heads)
      .def_readonly("head_dim", &kqsvd::ModelShape::head_dim)
      .def("__eq__", [](const kqsvd::ModelShape& a, const kqsvd::ModelShape& b) { return a == b; })
      .def("__repr__", [](const kqsvd::ModelShape& s) { return "kqsvd.ModelShape(" + kqsvd::to_string(s) + ")"; });

  py::class_<kqsvd::GramAccumulator>(m, "GramAccumulator",
                                     "Streams rows (tokens x d) into their d x d Gram X^T X, accumulated in float64.")
      .def(py::init<Index>(), py::arg("dimension"))
      .def(
          "add",
          [](kqsvd::GramAccumulator& self, const py::handle& rows) -> kqsvd::GramAccumulator& {
            with_rows("GramAccumulator.add", "rows", rows, self.dimension(), [&](const auto& map) {
              py::gil_scoped_release release;
              self.add(map);
              return 0;
            });
            return self;
          },
          py::arg("rows"), py::return_value_policy::reference_internal,
          "Adds rows (tokens x dimension; float16/32/64, any strides; float32/64 read without a copy).")
      .def("merge", &kqsvd::GramAccumulator::merge, py::arg("other"), py::return_value_policy::reference_internal,
           "Adds another accumulator's Gram and tokens (a shard of the same data): exact.")
      .def_property_readonly("gram", &kqsvd::GramAccumulator::gram, "X^T X over every row added (d x d float64)")
      .def_property_readonly("mean_gram", &kqsvd::GramAccumulator::mean_gram, "gram / tokens")
      .def_property_readonly("tokens", &kqsvd::GramAccumulator::token_count)
      .def_property_readonly("dimension", &kqsvd::GramAccumulator::dimension)
      .def_property_readonly("largest_magnitudes", &kqsvd::GramAccumulator::largest_magnitudes,
                             "per column, the largest |x| added (with gram and tokens: what restored() takes back)")
      .def_static(
          "restored",
          [](const py::handle& gram, std::int64_t tokens, const Eigen::ArrayXd& largest) {
            return kqsvd::GramAccumulator::restored(rows_of<double>("GramAccumulator.restored", "gram", gram), tokens, largest);
          },
          py::arg("gram"), py::arg("tokens"), py::arg("largest"),
          "An accumulator holding a Gram summed elsewhere (another process: all-reduced gram and tokens, max-reduced\n"
          "largest magnitudes)")
      .def("reset", &kqsvd::GramAccumulator::reset);

  using Projection = kqsvd::LowRankProjection<float>;
  py::class_<Projection>(m, "LowRankProjection",
                         "A fitted projection: keys compress to k A (rank r), queries map to q B, scores (q B)(k A)^T.")
      .def_property_readonly("encoder", &Projection::encoder, "A (d x r)")
      .def_property_readonly("decoder", &Projection::decoder, "B (d x r)")
      .def_property_readonly("singular_values", &Projection::singular_values, "the objective's full spectrum (float64)")
      .def_property_readonly("rank", &Projection::rank)
      .def_property_readonly("dimension", &Projection::dimension)
      .def_property_readonly("method", [](const Projection& p) { return std::string(kqsvd::to_string(p.method())); })
      .def(
          "compress",
          [](const Projection& p, const py::handle& x) {
            return p.compress(rows_of<float>("LowRankProjection.compress", "x", x, p.dimension()));
          },
          py::arg("x"), "x A: rows (n x d) to latents (n x r)")
      .def(
          "map_queries",
          [](const Projection& p, const py::handle& q) {
            return p.map_queries(rows_of<float>("LowRankProjection.map_queries", "q", q, p.dimension()));
          },
          py::arg("q"), "q B: queries (n x d) to the latent space (n x r)")
      .def(
          "decompress",
          [](const Projection& p, const py::handle& z) {
            return p.decompress(rows_of<float>("LowRankProjection.decompress", "z", z, p.rank()));
          },
          py::arg("z"), "z B^T: latents (n x r) back to rows (n x d)")
      .def(
          "predicted_relative_error",
          [](const Projection& p, std::optional<Index> rank) {
            return rank ? p.predicted_relative_error(*rank) : p.predicted_relative_error();
          },
          py::arg("rank") = py::none(), "the objective's relative Frobenius error at `rank` (default: this rank)")
      .def("truncated", &Projection::truncated, py::arg("rank"), "the same projection at a smaller rank")
      .def("__repr__", [](const Projection& p) {
        return "kqsvd.LowRankProjection(method='" + std::string(kqsvd::to_string(p.method())) +
               "', dimension=" + std::to_string(p.dimension()) + ", rank=" + std::to_string(p.rank()) + ")";
      });

  m.def(
      "fit_projection",
      [](const std::string& method, const py::handle& key_gram, const py::handle& query_gram, std::optional<Index> rank,
         std::optional<double> eps, double balance) {
        const kqsvd::Method parsed = method_of(method);
        const Eigen::MatrixXd keys = gram_of("fit_projection", "key_gram", key_gram);
        const Eigen::MatrixXd queries = query_gram.is_none() && parsed == kqsvd::Method::k_svd
                                            ? Eigen::MatrixXd::Identity(keys.rows(), keys.cols())
                                            : gram_of("fit_projection", "query_gram", query_gram);
        const kqsvd::RankSelection selection = rank_selection("fit_projection", rank, eps);
        kqsvd::FitOptions options;
        options.balance = balance;
        py::gil_scoped_release release;
        return kqsvd::fit_projection<float>(parsed, keys, queries, selection, options);
      },
      py::arg("method"), py::arg("key_gram"), py::arg("query_gram") = py::none(), py::kw_only(),
      py::arg("rank") = py::none(), py::arg("eps") = py::none(), py::arg("balance") = 1.0,
      "Fits a projection from Grams (GramAccumulators, whose mean Grams are used, or d x d arrays).\n"
      "method: 'kqsvd' (the closed form for Q K^T), 'ksvd' (K-only SVD; query_gram may be None) or 'eigen'\n"
      "(Eigen Attention); exactly one of rank (1..d) and eps (the predicted relative error budget).");

  py::class_<kqsvd::ModelCalibration>(m, "ModelCalibration", "Every head's Grams of a whole model")
      .def(py::init<const kqsvd::ModelShape&>(), py::arg("shape"))
      .def_property_readonly("shape", &kqsvd::ModelCalibration::shape)
      .def_property_readonly("tokens", &kqsvd::ModelCalibration::token_count)
      .def(
          "add_keys",
          [](kqsvd::ModelCalibration& self, Index layer, Index kv_head, const py::handle& rows) {
            with_rows("ModelCalibration.add_keys", "rows", rows, self.shape().head_dim, [&](const auto& map) {
              self.add_keys(layer, kv_head, map);
              return 0;
            });
          },
          py::arg("layer"), py::arg("kv_head"), py::arg("rows"))
      .def(
          "add_values",
          [](kqsvd::ModelCalibration& self, Index layer, Index kv_head, const py::handle& rows) {
            with_rows("ModelCalibration.add_values", "rows", rows, self.shape().head_dim, [&](const auto& map) {
              self.add_values(layer, kv_head, map);
              return 0;
            });
          },
          py::arg("layer"), py::arg("kv_head"), py::arg("rows"))
      .def(
          "add_queries",
          [](kqsvd::ModelCalibration& self, Index layer, Index query_head, const py::handle& rows) {
            with_rows("ModelCalibration.add_queries", "rows", rows, self.shape().head_dim, [&](const auto& map) {
              self.add_queries(layer, query_head, map);
              return 0;
            });
          },
          py::arg("layer"), py::arg("query_head"), py::arg("rows"))
      .def("query_head", &kqsvd::ModelCalibration::query_head, py::arg("layer"), py::arg("query_head"),
           "one query head's own accumulator (queries() stacks those of a KV head's group)")
      .def("merge_keys", &kqsvd::ModelCalibration::merge_keys, py::arg("layer"), py::arg("kv_head"), py::arg("other"))
      .def("merge_values", &kqsvd::ModelCalibration::merge_values, py::arg("layer"), py::arg("kv_head"), py::arg("other"))
      .def("merge_queries", &kqsvd::ModelCalibration::merge_queries, py::arg("layer"), py::arg("query_head"), py::arg("other"))
      .def("keys", &kqsvd::ModelCalibration::keys, py::arg("layer"), py::arg("kv_head"))
      .def("values", &kqsvd::ModelCalibration::values, py::arg("layer"), py::arg("kv_head"))
      .def("queries", &kqsvd::ModelCalibration::queries, py::arg("layer"), py::arg("kv_head"),
           "the stacked Gram of the KV head's query heads")
      .def("merge", &kqsvd::ModelCalibration::merge, py::arg("other"), py::return_value_policy::reference_internal);

  using Projections = kqsvd::ModelProjections<float>;
  py::class_<Projections>(m, "ModelProjections", "A model's key and value projections, per layer and KV head")
      .def_static(
          "fit",
          [](const kqsvd::ModelCalibration& calibration, const std::string& method, std::optional<Index> key_rank,
             std::optional<double> key_eps, std::optional<Index> value_rank, std::optional<double> value_eps,
             const std::vector<py::object>& output_weights) {
            std::vector<Eigen::MatrixXd> weights;
            for (const py::object& w : output_weights) weights.push_back(rows_of<double>("ModelProjections.fit", "output_weights", w));
            const kqsvd::RankSelection keys = rank_selection("ModelProjections.fit", key_rank, key_eps);
            const kqsvd::RankSelection values =
                value_rank || value_eps ? rank_selection("ModelProjections.fit", value_rank, value_eps) : keys;
            py::gil_scoped_release release;
            return Projections::fit(calibration, weights, method_of(method), keys, values);
          },
          py::arg("calibration"), py::arg("method"), py::kw_only(), py::arg("key_rank") = py::none(),
          py::arg("key_eps") = py::none(), py::arg("value_rank") = py::none(), py::arg("value_eps") = py::none(),
          py::arg("output_weights") = std::vector<py::object>(),
          "Fits every head. output_weights: per layer o_proj.weight (hidden x query_heads*head_dim), needed by\n"
          "KQ-SVD for values; value ranks default to the key ranks.")
      .def_property_readonly("shape", &Projections::shape)
      .def_property_readonly("method", [](const Projections& p) { return std::string(kqsvd::to_string(p.method())); })
      .def("keys", &Projections::keys, py::arg("layer"), py::arg("kv_head"), py::return_value_policy::reference_internal)
      .def("values", &Projections::values, py::arg("layer"), py::arg("kv_head"), py::return_value_policy::reference_internal)
      .def(
          "truncated",
          [](const Projections& p, Index key_rank, Index value_rank) {
            return p.truncated(kqsvd::RankAllocation::uniform(p.shape(), key_rank, value_rank));
          },
          py::arg("key_rank"), py::arg("value_rank"), "every head at these ranks");

  m.def(
      "save_projections",
      [](const std::string& path, const Projections& projections, const std::string& model, const std::string& rope,
         bool overwrite) {
        kqsvd::io::ProjectionInfo info;
        info.model = model;
        info.rope = kqsvd::parse_rope_mode(rope);
        info.producer = std::string("kqsvd python ") + kqsvd::version_string;
        kqsvd::io::ProjectionFile(projections, info).save(path, overwrite);
      },
      py::arg("path"), py::arg("projections"), py::kw_only(), py::arg("model") = "", py::arg("rope") = "post",
      py::arg("overwrite") = false, "Writes a projection file (safetensors, atomically) that kqsvd and C++ read.");
  m.def(
      "load_projections", [](const std::string& path) { return kqsvd::io::ProjectionFile::load(path).projections(); },
      py::arg("path"), "Reads a projection file written by kqsvd fit, save_projections or C++.");

  m.def(
      "save_grams",
      [](const std::string& path, const kqsvd::ModelCalibration& calibration, const std::string& model,
         const std::string& rope, const std::vector<py::object>& output_weights, double rope_theta, const std::string& rope_style,
         bool overwrite) {
        std::vector<kqsvd::RowMatrix<float>> weights;
        for (const py::object& w : output_weights) weights.push_back(rows_of<float>("save_grams", "output_weights", w));
        kqsvd::io::GramFileInfo info;
        info.model = model;
        info.rope = kqsvd::parse_rope_mode(rope);
        info.rope_theta = rope_theta;
        info.rope_style = kqsvd::parse_rope_style(rope_style);
        info.producer = std::string("kqsvd python ") + kqsvd::version_string;
        kqsvd::io::GramFile(calibration, info, std::move(weights)).save(path, overwrite);
      },
      py::arg("path"), py::arg("calibration"), py::kw_only(), py::arg("model") = "", py::arg("rope") = "post",
      py::arg("output_weights") = std::vector<py::object>(), py::arg("rope_theta") = 10000.0,
      py::arg("rope_style") = "adjacent", py::arg("overwrite") = false,
      "Writes a Gram file (the calibration's d x d Grams per head, token counts, model and RoPE mode, and\n"
      "per layer o_proj.weight when given) that kqsvd fit --grams merges with any number of others.");
  m.def(
      "load_grams",
      [](const std::string& path) {
        kqsvd::io::GramFile file = kqsvd::io::GramFile::load(path);
        py::dict info;
        info["model"] = file.info().model;
        info["rope"] = std::string(kqsvd::to_string(file.info().rope));
        info["rope_theta"] = file.info().rope_theta;
        info["producer"] = file.info().producer;
        py::list weights;
        for (const kqsvd::RowMatrix<float>& w : file.output_weights()) weights.append(py::cast(w));
        info["output_weights"] = weights;
        return py::make_tuple(file.calibration(), info);
      },
      py::arg("path"), "Reads a Gram file: (ModelCalibration, {'model', 'rope', 'rope_theta', 'producer', 'output_weights'})");

  // Activation files (docs/activations.md): what kqsvd fit --calib and kqsvd gram read.
  py::class_<kqsvd::io::ActivationFile>(m, "ActivationFile",
                                        "A saved activation file (safetensors, docs/activations.md), validated and mapped")
      .def(py::init<std::string>(), py::arg("path"))
      .def_property_readonly("path", &kqsvd::io::ActivationFile::path)
      .def_property_readonly("shape", &kqsvd::io::ActivationFile::shape)
      .def_property_readonly("sequences", &kqsvd::io::ActivationFile::batch, "sequences in the file")
      .def_property_readonly("tokens", &kqsvd::io::ActivationFile::tokens, "tokens per sequence")
      .def_property_readonly("token_count", &kqsvd::io::ActivationFile::token_count, "sequences x tokens")
      .def_property_readonly("model", [](const kqsvd::io::ActivationFile& f) { return f.metadata().model; })
      .def_property_readonly("rope", [](const kqsvd::io::ActivationFile& f) { return std::string(kqsvd::to_string(f.metadata().rope)); },
                             "'post' (queries and keys saved after RoPE) or 'pre'")
      .def_property_readonly("rope_style",
                             [](const kqsvd::io::ActivationFile& f) { return std::string(kqsvd::to_string(f.metadata().rope_style)); })
      .def_property_readonly("rope_theta", [](const kqsvd::io::ActivationFile& f) { return f.metadata().rope_theta; })
      .def_property_readonly("has_output_weights", &kqsvd::io::ActivationFile::has_output_weights)
      .def("queries", &kqsvd::io::ActivationFile::queries, py::arg("layer"), py::arg("sequence"), py::arg("query_head"),
           "tokens x head_dim float32: one query head of one sequence")
      .def("keys", &kqsvd::io::ActivationFile::keys, py::arg("layer"), py::arg("sequence"), py::arg("kv_head"))
      .def("values", &kqsvd::io::ActivationFile::values, py::arg("layer"), py::arg("sequence"), py::arg("kv_head"))
      .def("output_weight", &kqsvd::io::ActivationFile::output_weight, py::arg("layer"),
           "layers.{layer}.o_proj: hidden x (query_heads * head_dim) float32, PyTorch's layout")
      .def("output_weights", &kqsvd::io::ActivationFile::output_weights, "every layer's output_weight(), or [] without them")
      .def(
          "calibrate",
          [](const kqsvd::io::ActivationFile& self, kqsvd::ModelCalibration& calibration) {
            py::gil_scoped_release release;
            kqsvd::io::calibrate(calibration, self);
          },
          py::arg("calibration"), "adds every sequence of the file to `calibration` (of the file's shape)")
      .def("__repr__", [](const kqsvd::io::ActivationFile& f) {
        return "kqsvd.ActivationFile('" + f.path() + "': " + kqsvd::to_string(f.shape()) + ", " + std::to_string(f.batch()) +
               " x " + std::to_string(f.tokens()) + " tokens)";
      });

  py::class_<kqsvd::io::ActivationWriter>(m, "ActivationWriter",
                                          "Writes an activation file: add() each layer of each sequence, then write()")
      .def(py::init([](const kqsvd::ModelShape& shape, Index tokens, const std::string& model, const std::string& rope,
                       const std::string& rope_style, double rope_theta, const std::string& dtype) {
             const std::optional<kqsvd::io::DType> storage = kqsvd::io::parse_dtype(dtype);
             if (!storage || *storage == kqsvd::io::DType::f64) {
               invalid("ActivationWriter", "dtype", "is '" + dtype + "'; expected f32, f16 or bf16");
             }
             kqsvd::io::ActivationMetadata metadata{model, kqsvd::parse_rope_mode(rope), kqsvd::parse_rope_style(rope_style),
                                                    rope_theta};
             return kqsvd::io::ActivationWriter(shape, tokens, std::move(metadata), *storage);
           }),
           py::arg("shape"), py::arg("tokens"), py::kw_only(), py::arg("model"), py::arg("rope") = "post",
           py::arg("rope_style") = "adjacent", py::arg("rope_theta") = 10000.0, py::arg("dtype") = "f32",
           "tokens: per sequence; rope: 'post' (queries and keys after RoPE) or 'pre'; dtype: f32, f16 or bf16")
      .def_property_readonly("shape", &kqsvd::io::ActivationWriter::shape)
      .def_property_readonly("tokens", &kqsvd::io::ActivationWriter::tokens)
      .def_property_readonly("sequences", &kqsvd::io::ActivationWriter::sequences, "sequences complete in every layer")
      .def(
          "add",
          [](kqsvd::io::ActivationWriter& self, Index layer, const py::handle& queries, const py::handle& keys,
             const py::handle& values) {
            const kqsvd::ModelShape& s = self.shape();
            self.add(layer, rows_of<float>("ActivationWriter.add", "queries", queries, s.query_heads * s.head_dim),
                     rows_of<float>("ActivationWriter.add", "keys", keys, s.kv_heads * s.head_dim),
                     rows_of<float>("ActivationWriter.add", "values", values, s.kv_heads * s.head_dim));
          },
          py::arg("layer"), py::arg("queries"), py::arg("keys"), py::arg("values"),
          "one sequence of one layer: tokens x (heads * head_dim) each, heads side by side")
      .def(
          "set_output_weight",
          [](kqsvd::io::ActivationWriter& self, Index layer, const py::handle& weight) {
            self.set_output_weight(layer, rows_of<float>("ActivationWriter.set_output_weight", "weight", weight));
          },
          py::arg("layer"), py::arg("weight"), "o_proj.weight: hidden x (query_heads * head_dim)")
      .def("set_metadata", &kqsvd::io::ActivationWriter::set_metadata, py::arg("key"), py::arg("value"))
      .def("write", &kqsvd::io::ActivationWriter::write, py::arg("path"), py::arg("overwrite") = false,
           "writes the file atomically; refuses to replace one unless overwrite");

  py::class_<kqsvd::StorageFormat>(m, "StorageFormat", "How cached rows are stored: f32, f16, bf16, fp8_e4m3, ...")
      .def(py::init([](const std::string& name) { return kqsvd::StorageFormat::parse(name); }), py::arg("name"))
      .def_property_readonly("name", &kqsvd::StorageFormat::name)
      .def("bytes_per_row", &kqsvd::StorageFormat::bytes_per_row, py::arg("width"))
      .def("bits_per_element", &kqsvd::StorageFormat::bits_per_element, py::arg("width"))
      .def("__repr__", [](const kqsvd::StorageFormat& f) { return "kqsvd.StorageFormat('" + f.name() + "')"; });

  py::class_<kqsvd::HeadCache>(m, "HeadCache", "One head's cache of rows or latents, in a StorageFormat")
      .def(py::init([](Index key_width, Index value_width, const std::string& format) {
             return kqsvd::HeadCache(key_width, value_width, kqsvd::StorageFormat::parse(format));
           }),
           py::arg("key_width"), py::arg("value_width"), py::arg("format") = "f32")
      .def(
          "append",
          [](kqsvd::HeadCache& self, const py::handle& keys, const py::handle& values) {
            self.append(rows_of<float>("HeadCache.append", "keys", keys, self.key_width()),
                        rows_of<float>("HeadCache.append", "values", values, self.value_width()));
          },
          py::arg("keys"), py::arg("values"), "appends rows as they are to be stored (latents or full rows)")
      .def(
          "append_compressed",
          [](kqsvd::HeadCache& self, const Projection& key_projection, const Projection& value_projection,
             const py::handle& keys, const py::handle& values) {
            self.append(key_projection, value_projection,
                        rows_of<float>("HeadCache.append_compressed", "keys", keys, key_projection.dimension()),
                        rows_of<float>("HeadCache.append_compressed", "values", values, value_projection.dimension()));
          },
          py::arg("key_projection"), py::arg("value_projection"), py::arg("keys"), py::arg("values"),
          "compresses full rows (n x d) with the projections and appends their latents")
      .def_property_readonly("size", &kqsvd::HeadCache::size)
      .def_property_readonly("bytes", &kqsvd::HeadCache::bytes)
      .def_property_readonly("key_width", &kqsvd::HeadCache::key_width)
      .def_property_readonly("value_width", &kqsvd::HeadCache::value_width)
      .def("keys", &kqsvd::HeadCache::keys, "the stored keys decoded to float32")
      .def("values", &kqsvd::HeadCache::values, "the stored values decoded to float32");

  m.def(
      "decode_attention",
      [](const py::handle& query, const kqsvd::HeadCache& cache, const std::string& arithmetic) {
        const kqsvd::DecodeArithmetic parsed = kqsvd::parse_decode_arithmetic(arithmetic);
        const kqsvd::RowMatrix<float> q = rows_of<float>("decode_attention", "query", query, cache.key_width());
        py::gil_scoped_release release;
        return kqsvd::decode_attention(q, cache, parsed);
      },
      py::arg("query"), py::arg("cache"), py::arg("arithmetic") = "float32",
      "softmax(q K^T / sqrt(d)) V over a full-row cache (query: 1 x d); arithmetic='int8_dot_products' "
      "multiplies 4- and 2-bit codes in integers with an int8-quantized query and weights");
  m.def(
      "decode_attention",
      [](const Projection& key_projection, const Projection& value_projection, const py::handle& query,
         const kqsvd::HeadCache& cache, const std::string& arithmetic) {
        const kqsvd::DecodeArithmetic parsed = kqsvd::parse_decode_arithmetic(arithmetic);
        const kqsvd::RowMatrix<float> q = rows_of<float>("decode_attention", "query", query, key_projection.dimension());
        py::gil_scoped_release release;
        return kqsvd::decode_attention(key_projection, value_projection, q, cache, parsed);
      },
      py::arg("key_projection"), py::arg("value_projection"), py::arg("query"), py::arg("cache"),
      py::arg("arithmetic") = "float32",
      "attention of one query (1 x d) over a latent cache: scores (q B)(k A)^T / sqrt(d), output decompressed; "
      "arithmetic as for full rows");

  py::class_<kqsvd::LossWeights>(m, "LossWeights", "Per layer and KV head, how much each projection's error costs")
      .def(py::init<const kqsvd::ModelShape&, double>(), py::arg("shape"), py::arg("weight") = 1.0)
      .def("key", &kqsvd::LossWeights::key, py::arg("layer"), py::arg("kv_head"))
      .def("value", &kqsvd::LossWeights::value, py::arg("layer"), py::arg("kv_head"))
      .def("set_key", &kqsvd::LossWeights::set_key, py::arg("layer"), py::arg("kv_head"), py::arg("weight"))
      .def("set_value", &kqsvd::LossWeights::set_value, py::arg("layer"), py::arg("kv_head"), py::arg("weight"));
  m.def(
      "read_sensitivity", [](const std::string& path, const kqsvd::ModelShape& shape) {
        return kqsvd::io::read_sensitivity_file(path, shape).weights;
      },
      py::arg("path"), py::arg("shape"), "The loss weights of a sensitivity file (docs/sensitivity.md)");
  m.def(
      "write_sensitivity",
      [](const std::string& path, const kqsvd::LossWeights& weights, const std::string& method, const std::string& rope,
         const std::string& model, const std::string& probe, bool overwrite) {
        kqsvd::io::write_sensitivity_file(path, {method_of(method), kqsvd::parse_rope_mode(rope), model, probe, weights}, overwrite);
      },
      py::arg("path"), py::arg("weights"), py::kw_only(), py::arg("method") = "kqsvd", py::arg("rope") = "post",
      py::arg("model") = "", py::arg("probe") = "", py::arg("overwrite") = false,
      "Writes a sensitivity file for kqsvd fit --budget --sensitivity");
  m.def(
      "loss_aware_allocation",
      [](const Projections& full_rank, const kqsvd::LossWeights& weights, double fraction, const std::string& format,
         const std::string& sharing) {
        kqsvd::LossAwareOptions options;
        options.format = kqsvd::StorageFormat::parse(format);
        if (sharing != "joint" && sharing != "separate") invalid("loss_aware_allocation", "sharing", "must be 'joint' or 'separate', got '" + sharing + "'");
        options.sharing = sharing == "joint" ? kqsvd::BudgetSharing::joint : kqsvd::BudgetSharing::separate;
        const kqsvd::LossAwareAllocation allocation =
            kqsvd::loss_aware_allocation(full_rank, weights, kqsvd::MemoryBudget::fraction_of_full_cache(fraction), options);
        const kqsvd::ModelShape& s = full_rank.shape();
        Eigen::Matrix<Index, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> keys(s.layers, s.kv_heads), values(s.layers, s.kv_heads);
        for (Index l = 0; l < s.layers; ++l) {
          for (Index h = 0; h < s.kv_heads; ++h) {
            keys(l, h) = allocation.ranks.key(l, h);
            values(l, h) = allocation.ranks.value(l, h);
          }
        }
        py::dict result;
        result["key_ranks"] = keys;
        result["value_ranks"] = values;
        result["projections"] = full_rank.truncated(allocation.ranks);
        result["bytes_per_token"] = allocation.bytes_per_token;
        result["budget_bytes_per_token"] = allocation.budget_bytes_per_token;
        result["predicted_loss"] = allocation.predicted_loss;
        return result;
      },
      py::arg("full_rank"), py::arg("weights"), py::arg("fraction"), py::kw_only(), py::arg("format") = "f32",
      py::arg("sharing") = "joint",
      "Per-head ranks minimising sum w * err^2 within `fraction` of the full cache's bytes in `format`:\n"
      "{'key_ranks', 'value_ranks' (layers x kv_heads), 'projections' (truncated), 'bytes_per_token', ...}");

  py::module_ reference = m.def_submodule(
      "reference", "The library's C++ reference model (kqsvd::llama, llama2.c checkpoints): what ports are checked against");
  reference.def(
      "logits",
      [](const std::string& model, const std::vector<int>& tokens) {
        const kqsvd::llama::Transformer transformer(kqsvd::llama::Checkpoint::load(model));
        kqsvd::llama::FullKvCache cache(transformer.shape(), transformer.rotary_embedding());
        py::gil_scoped_release release;
        return transformer.forward(tokens, cache);
      },
      py::arg("model"), py::arg("tokens"),
      "Logits (tokens x vocab, float32) of a llama2.c checkpoint on `tokens` (one prefill, full float32 cache).");
  reference.def(
      "encode",
      [](const std::string& tokenizer, Index vocab_size, const std::string& text) {
        return kqsvd::llama::Tokenizer::load(tokenizer, vocab_size).encode(text, /*add_bos=*/true, /*add_eos=*/false);
      },
      py::arg("tokenizer"), py::arg("vocab_size"), py::arg("text"), "BOS + llama2.c's encoding of `text`.");
}
