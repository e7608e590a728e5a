"""The Python module against independent numpy computations: Grams as X^T X in float64, the KQ-SVD error
as the direct SVD of Q K^T, attention as a softmax written out; errors as the documented exceptions."""
import json
import math
import os
import struct

import numpy as np
import pytest

import kqsvd


def rows(n, d, seed, scale=1.0):
    return np.random.default_rng(seed).standard_normal((n, d)) * scale


# ---- GramAccumulator ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_gram_equals_xtx_for_every_float_dtype_and_layout(dtype):
    x = rows(500, 16, 1).astype(dtype)
    expected = x.astype(np.float64).T @ x.astype(np.float64)
    for view in (x, np.asfortranarray(x), x[::2], x[:, ::-1][:, ::-1], x.T.copy().T):
        acc = kqsvd.GramAccumulator(16)
        acc.add(view)
        exact = view.astype(np.float64).T @ view.astype(np.float64)
        assert acc.tokens == view.shape[0]
        np.testing.assert_allclose(acc.gram, exact, rtol=1e-12, atol=1e-9)
    acc = kqsvd.GramAccumulator(16)
    acc.add(x)
    np.testing.assert_allclose(acc.gram, expected, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(acc.mean_gram, expected / 500, rtol=1e-12, atol=1e-12)


def test_strided_columns_are_read_in_place():
    wide = rows(300, 32, 2)
    view = wide[:, 8:24]  # a column block: outer stride 32
    acc = kqsvd.GramAccumulator(16)
    acc.add(view)
    np.testing.assert_allclose(acc.gram, view.T @ view, rtol=1e-12)


def test_merged_shards_equal_one_pass():
    x = rows(1000, 8, 3)
    whole, a, b = kqsvd.GramAccumulator(8), kqsvd.GramAccumulator(8), kqsvd.GramAccumulator(8)
    whole.add(x)
    a.add(x[:400])
    b.add(x[400:])
    a.merge(b)
    assert a.tokens == 1000
    np.testing.assert_allclose(a.gram, whole.gram, rtol=1e-12)


@pytest.mark.parametrize(
    "bad, fragment",
    [
        (np.ones((4, 8), dtype=np.int32), "dtype"),
        (np.ones((4, 8), dtype=np.complex128), "dtype"),
        (np.array([[object()] * 8] * 2, dtype=object), "dtype"),
        (np.ones((2, 4, 8)), "3 dimensions"),
        (np.ones((4, 7)), "7 columns, expected 8"),
    ],
)
def test_bad_rows_are_invalid_arguments_naming_the_input(bad, fragment):
    acc = kqsvd.GramAccumulator(8)
    with pytest.raises(kqsvd.InvalidArgument, match=fragment) as info:
        acc.add(bad)
    assert "rows" in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, kqsvd.Error)
    assert acc.tokens == 0


def test_non_finite_rows_are_refused_and_leave_the_accumulator_unchanged():
    acc = kqsvd.GramAccumulator(4)
    acc.add(np.ones((3, 4)))
    bad = np.ones((5, 4))
    bad[2, 1] = np.nan
    with pytest.raises(kqsvd.InvalidArgument):
        acc.add(bad)
    assert acc.tokens == 3
    np.testing.assert_array_equal(acc.gram, np.full((4, 4), 3.0))


# ---- fit_projection ----------------------------------------------------------------------------------


def direct_tail_error(m, r):
    s = np.linalg.svd(m, compute_uv=False)
    return math.sqrt((s[r:] ** 2).sum() / (s**2).sum())


def test_kqsvd_error_equals_the_direct_svd_of_qkt_and_beats_the_baselines():
    d, r = 24, 6
    rng = np.random.default_rng(4)
    k = rng.standard_normal((800, d)) @ rng.standard_normal((d, d))
    q = rng.standard_normal((600, d)) @ rng.standard_normal((d, d))
    keys, queries = kqsvd.GramAccumulator(d), kqsvd.GramAccumulator(d)
    keys.add(k)
    queries.add(q)
    errors = {}
    for method in ("kqsvd", "ksvd", "eigen"):
        p = kqsvd.fit_projection(method, keys, queries, rank=r)
        assert p.rank == r and p.dimension == d and p.encoder.shape == (d, r) and p.decoder.shape == (d, r)
        approx = p.map_queries(q).astype(np.float64) @ p.compress(k).astype(np.float64).T
        errors[method] = np.linalg.norm(q @ k.T - approx) / np.linalg.norm(q @ k.T)
    # Same-data calibration: the closed form attains the optimum, the direct SVD's tail.
    optimum = direct_tail_error(q @ k.T, r)
    assert errors["kqsvd"] == pytest.approx(optimum, rel=1e-3)
    p = kqsvd.fit_projection("kqsvd", keys, queries, rank=r)
    assert p.predicted_relative_error() == pytest.approx(optimum, rel=1e-6)
    assert errors["kqsvd"] < errors["ksvd"] and errors["kqsvd"] < errors["eigen"]
    # Arrays work as Grams too (the mean Grams), and eps picks the smallest rank within the budget.
    same = kqsvd.fit_projection("kqsvd", keys.mean_gram, queries.mean_gram, rank=r)
    np.testing.assert_allclose(same.singular_values, p.singular_values, rtol=1e-10)
    by_eps = kqsvd.fit_projection("kqsvd", keys, queries, eps=p.predicted_relative_error())
    assert by_eps.rank == r


def test_compress_and_decompress_are_the_products_with_a_and_b():
    d = 8
    acc = kqsvd.GramAccumulator(d)
    acc.add(rows(100, d, 5))
    p = kqsvd.fit_projection("ksvd", acc, rank=3)
    x = rows(5, d, 6).astype(np.float32)
    np.testing.assert_allclose(p.compress(x), x @ p.encoder, rtol=1e-5, atol=1e-6)
    z = rows(5, 3, 7).astype(np.float32)
    np.testing.assert_allclose(p.decompress(z), z @ p.decoder.T, rtol=1e-5, atol=1e-6)
    assert p.truncated(2).rank == 2
    assert p.method == "ksvd"


def test_fit_errors_name_the_argument():
    acc = kqsvd.GramAccumulator(4)
    acc.add(rows(10, 4, 8))
    with pytest.raises(kqsvd.InvalidArgument, match="rank"):
        kqsvd.fit_projection("kqsvd", acc, acc, rank=5)
    with pytest.raises(kqsvd.InvalidArgument, match="exactly one"):
        kqsvd.fit_projection("kqsvd", acc, acc, rank=2, eps=0.1)
    with pytest.raises(kqsvd.InvalidArgument, match="method"):
        kqsvd.fit_projection("svd", acc, acc, rank=2)
    with pytest.raises(kqsvd.InvalidArgument, match="holds no tokens"):
        kqsvd.fit_projection("kqsvd", kqsvd.GramAccumulator(4), acc, rank=2)
    with pytest.raises(kqsvd.InvalidArgument, match="square"):
        kqsvd.fit_projection("kqsvd", np.ones((4, 3)), acc, rank=2)


# ---- model level, files ------------------------------------------------------------------------------


def calibrated_model(shape, seed):
    calibration = kqsvd.ModelCalibration(shape)
    rng = np.random.default_rng(seed)
    for layer in range(shape.layers):
        for h in range(shape.kv_heads):
            calibration.add_keys(layer, h, rng.standard_normal((64, shape.head_dim)))
            calibration.add_values(layer, h, rng.standard_normal((64, shape.head_dim)))
        for h in range(shape.query_heads):
            calibration.add_queries(layer, h, rng.standard_normal((64, shape.head_dim)))
    return calibration


def test_model_projections_fit_save_and_load(tmp_path):
    shape = kqsvd.ModelShape(2, 4, 2, 8)
    calibration = calibrated_model(shape, 9)
    assert calibration.tokens == 64
    projections = kqsvd.ModelProjections.fit(calibration, "ksvd", key_rank=3)
    one = kqsvd.fit_projection("ksvd", calibration.keys(1, 0), rank=3)
    np.testing.assert_allclose(projections.keys(1, 0).singular_values, one.singular_values, rtol=1e-10)
    path = str(tmp_path / "p.safetensors")
    kqsvd.save_projections(path, projections, model="test")
    loaded = kqsvd.load_projections(path)
    assert loaded.shape == shape and loaded.method == "ksvd"
    np.testing.assert_array_equal(loaded.keys(1, 1).encoder, projections.keys(1, 1).encoder)
    with pytest.raises(kqsvd.IoError) as info:
        kqsvd.save_projections(path, projections)  # exists, no overwrite
    assert isinstance(info.value, OSError)
    with pytest.raises(kqsvd.IoError):
        kqsvd.load_projections(str(tmp_path / "missing.safetensors"))
    with open(path, "r+b") as f:
        f.truncate(40)
    with pytest.raises(kqsvd.FormatError, match="p.safetensors"):
        kqsvd.load_projections(path)


def test_gram_files_round_trip_and_fit_as_the_calibration(tmp_path):
    shape = kqsvd.ModelShape(2, 4, 2, 8)
    calibration = calibrated_model(shape, 12)
    weights = [np.random.default_rng(l).standard_normal((16, 32)).astype(np.float32) for l in range(2)]
    path = str(tmp_path / "g.safetensors")
    kqsvd.save_grams(path, calibration, model="toy", output_weights=weights)
    loaded, info = kqsvd.load_grams(path)
    assert info["model"] == "toy" and info["rope"] == "post" and len(info["output_weights"]) == 2
    np.testing.assert_array_equal(info["output_weights"][1], weights[1])
    assert loaded.tokens == calibration.tokens
    np.testing.assert_array_equal(loaded.keys(1, 1).gram, calibration.keys(1, 1).gram)
    np.testing.assert_array_equal(loaded.queries(0, 1).gram, calibration.queries(0, 1).gram)
    a = kqsvd.ModelProjections.fit(calibration, "kqsvd", key_rank=3, output_weights=weights)
    b = kqsvd.ModelProjections.fit(loaded, "kqsvd", key_rank=3, output_weights=info["output_weights"])
    np.testing.assert_array_equal(a.values(1, 0).encoder, b.values(1, 0).encoder)
    with open(path, "r+b") as f:
        f.truncate(64)
    with pytest.raises(kqsvd.FormatError, match="g.safetensors"):
        kqsvd.load_grams(path)


# ---- activation files ----------------------------------------------------------------------------

SHIPPED_ACTIVATIONS = os.path.join(os.path.dirname(__file__), "..", "..", "data", "activations", "stories260K",
                                   "calib.safetensors")


def read_safetensors(path):
    """An independent reader: the safetensors header (JSON) and raw little-endian tensors, in numpy."""
    with open(path, "rb") as f:
        blob = f.read()
    header_length = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + header_length])
    data = blob[8 + header_length:]
    dtypes = {"F32": "<f4", "F16": "<f2", "F64": "<f8"}
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        tensors[name] = np.frombuffer(data[begin:end], dtype=dtypes[entry["dtype"]]).reshape(entry["shape"])
    return tensors, header.get("__metadata__", {})


def test_activation_file_reads_what_the_file_holds_and_calibrates_as_xtx():
    tensors, metadata = read_safetensors(SHIPPED_ACTIVATIONS)
    f = kqsvd.ActivationFile(SHIPPED_ACTIVATIONS)
    batch, query_heads, tokens, d = tensors["layers.0.q"].shape
    assert (f.sequences, f.tokens, f.token_count) == (batch, tokens, batch * tokens)
    assert f.shape == kqsvd.ModelShape(5, query_heads, tensors["layers.0.k"].shape[1], d)
    assert f.model == metadata["model"] and f.rope == "post" and f.has_output_weights
    np.testing.assert_array_equal(f.queries(3, 1, 5), tensors["layers.3.q"][1, 5])
    np.testing.assert_array_equal(f.keys(4, 0, 2), tensors["layers.4.k"][0, 2])
    np.testing.assert_array_equal(f.values(0, batch - 1, 3), tensors["layers.0.v"][batch - 1, 3])
    np.testing.assert_array_equal(f.output_weight(2), tensors["layers.2.o_proj"])
    assert len(f.output_weights()) == 5

    calibration = kqsvd.ModelCalibration(f.shape)
    f.calibrate(calibration)
    keys = tensors["layers.1.k"][:, 3].reshape(-1, d).astype(np.float64)
    np.testing.assert_allclose(calibration.keys(1, 3).gram, keys.T @ keys, rtol=1e-12)
    # The queries of KV head 1 are those of query heads 2 and 3 (GQA groups of two), stacked.
    queries = tensors["layers.2.q"][:, 2:4].reshape(-1, d).astype(np.float64)
    np.testing.assert_allclose(calibration.queries(2, 1).gram, queries.T @ queries, rtol=1e-12)
    assert calibration.tokens == batch * tokens


@pytest.mark.parametrize("dtype,numpy_dtype", [("f32", np.float32), ("f16", np.float16)])
def test_activation_writer_round_trips_through_the_reader(tmp_path, dtype, numpy_dtype):
    shape = kqsvd.ModelShape(2, 4, 2, 8)
    rng = np.random.default_rng(5)
    writer = kqsvd.ActivationWriter(shape, 6, model="toy", rope="pre", rope_theta=500000.0, dtype=dtype)
    sequences = []
    for _ in range(3):
        layers = [(rng.standard_normal((6, 32)), rng.standard_normal((6, 16)), rng.standard_normal((6, 16)))
                  for _ in range(2)]
        for layer, (q, k, v) in enumerate(layers):
            writer.add(layer, q, k.astype(np.float32), v)
        sequences.append(layers)
    weights = [rng.standard_normal((12, 32)).astype(np.float32) for _ in range(2)]
    for layer, w in enumerate(weights):
        writer.set_output_weight(layer, w)
    writer.set_metadata("source", "unit test")
    assert writer.sequences == 3
    path = str(tmp_path / "a.safetensors")
    writer.write(path)

    f = kqsvd.ActivationFile(path)
    assert (f.shape, f.sequences, f.tokens, f.model, f.rope, f.rope_theta) == (shape, 3, 6, "toy", "pre", 500000.0)
    stored = lambda x: x.astype(numpy_dtype).astype(np.float32)  # noqa: E731  (the file's rounding)
    q, k, v = sequences[2][1]
    np.testing.assert_array_equal(f.queries(1, 2, 3), stored(q[:, 24:32]))
    np.testing.assert_array_equal(f.keys(1, 2, 1), stored(k[:, 8:16]))
    np.testing.assert_array_equal(f.values(1, 2, 0), stored(v[:, 0:8]))
    np.testing.assert_array_equal(f.output_weight(1), stored(weights[1]))
    _, metadata = read_safetensors(path)
    assert metadata["source"] == "unit test"

    with pytest.raises(kqsvd.IoError, match="a.safetensors"):
        writer.write(path)  # exists
    writer.write(path, overwrite=True)


def test_activation_file_errors_name_the_input(tmp_path):
    shape = kqsvd.ModelShape(2, 4, 2, 8)
    with pytest.raises(kqsvd.InvalidArgument, match="dtype"):
        kqsvd.ActivationWriter(shape, 6, model="toy", dtype="int8")
    with pytest.raises(kqsvd.InvalidArgument, match="model"):
        kqsvd.ActivationWriter(shape, 6, model="")
    writer = kqsvd.ActivationWriter(shape, 6, model="toy")
    good = np.zeros((6, 16))
    with pytest.raises(kqsvd.InvalidArgument, match="'queries' has 16 columns, expected 32"):
        writer.add(0, good, good, good)
    with pytest.raises(kqsvd.InvalidArgument, match="keys"):
        writer.add(0, np.zeros((6, 32)), np.full((6, 16), np.nan), good)
    with pytest.raises(kqsvd.InvalidArgument, match="rows"):
        writer.add(0, np.zeros((5, 32)), np.zeros((5, 16)), np.zeros((5, 16)))
    with pytest.raises(kqsvd.InvalidArgument, match="layer"):
        writer.add(2, np.zeros((6, 32)), good, good)
    with pytest.raises(kqsvd.InvalidArgument, match="no sequences"):
        writer.write(str(tmp_path / "empty.safetensors"))
    assert not os.path.exists(tmp_path / "empty.safetensors")
    with pytest.raises(kqsvd.IoError, match="missing.safetensors"):
        kqsvd.ActivationFile(str(tmp_path / "missing.safetensors"))
    truncated = tmp_path / "truncated.safetensors"
    with open(SHIPPED_ACTIVATIONS, "rb") as f:
        truncated.write_bytes(f.read(5000))
    with pytest.raises(kqsvd.FormatError, match="truncated.safetensors"):
        kqsvd.ActivationFile(str(truncated))
    f = kqsvd.ActivationFile(SHIPPED_ACTIVATIONS)
    with pytest.raises(kqsvd.InvalidArgument, match="kv_head"):
        f.keys(0, 0, 4)
    with pytest.raises(kqsvd.InvalidArgument, match="shape"):
        f.calibrate(kqsvd.ModelCalibration(kqsvd.ModelShape(2, 4, 2, 8)))


def test_loss_aware_allocation_spends_the_budget_where_the_weights_are(tmp_path):
    shape = kqsvd.ModelShape(2, 2, 2, 8)
    projections = kqsvd.ModelProjections.fit(calibrated_model(shape, 10), "ksvd", key_rank=8)
    weights = kqsvd.LossWeights(shape, 1.0)
    weights.set_key(0, 0, 100.0)
    path = str(tmp_path / "s.json")
    kqsvd.write_sensitivity(path, weights, method="ksvd")
    weights = kqsvd.read_sensitivity(path, shape)
    assert weights.key(0, 0) == 100.0
    result = kqsvd.loss_aware_allocation(projections, weights, 0.5)
    assert result["bytes_per_token"] <= result["budget_bytes_per_token"]
    assert result["key_ranks"].shape == (2, 2)
    assert result["key_ranks"][0, 0] == result["key_ranks"].max()
    assert result["projections"].keys(0, 0).rank == result["key_ranks"][0, 0]


# ---- caches and the decode kernel --------------------------------------------------------------------


def softmax_attention(q, k, v):
    s = (q @ k.T) / math.sqrt(k.shape[1])
    w = np.exp(s - s.max())
    return (w / w.sum()) @ v


def test_decode_attention_on_full_rows_and_latents_equals_numpy():
    d, n = 32, 300
    k, v, q = rows(n, d, 11), rows(n, d, 12), rows(1, d, 13, 0.5)
    cache = kqsvd.HeadCache(d, d, "f32")
    cache.append(k, v)
    assert cache.size == n and cache.bytes == n * 2 * d * 4
    out = kqsvd.decode_attention(q, cache)
    assert out.shape == (d,)  # one output row, as a vector
    np.testing.assert_allclose(out, softmax_attention(q, k, v)[0], rtol=1e-4, atol=1e-5)
    keys, queries = kqsvd.GramAccumulator(d), kqsvd.GramAccumulator(d)
    keys.add(k)
    queries.add(rows(400, d, 14))
    p = kqsvd.fit_projection("kqsvd", keys, queries, rank=8)
    latent = kqsvd.HeadCache(8, 8, "f16")
    latent.append_compressed(p, p, k, v)
    kl, vl = latent.keys().astype(np.float64), latent.values().astype(np.float64)
    scores = (q @ p.decoder.astype(np.float64)) @ kl.T / math.sqrt(d)
    w = np.exp(scores - scores.max())
    expected = (w / w.sum()) @ vl @ p.decoder.T.astype(np.float64)
    np.testing.assert_allclose(kqsvd.decode_attention(p, p, q, latent), expected[0], rtol=1e-4, atol=1e-5)
    assert kqsvd.StorageFormat("q4_0").bits_per_element(32) == 4.5
    with pytest.raises(kqsvd.InvalidArgument, match="unknown storage format"):
        kqsvd.HeadCache(8, 8, "q3")
    with pytest.raises(kqsvd.InvalidArgument, match="query"):
        kqsvd.decode_attention(rows(1, d + 1, 15), cache)


def test_decode_attention_with_int8_dot_products_stays_near_the_stored_rows():
    d, n = 64, 400
    k, v, q = rows(n, d, 21), rows(n, d, 22), rows(1, d, 23, 0.5)
    for name in ("q4_0", "int4", "int2"):
        cache = kqsvd.HeadCache(d, d, name)
        cache.append(k, v)
        on_stored = softmax_attention(q, cache.keys().astype(np.float64), cache.values().astype(np.float64))[0]
        exact = kqsvd.decode_attention(q, cache)
        fast = kqsvd.decode_attention(q, cache, arithmetic="int8_dot_products")
        np.testing.assert_allclose(exact, on_stored, rtol=1e-4, atol=1e-5)
        # int8 query and weights: each off by at most 1/254 of its group's largest magnitude.
        assert 0 < np.abs(fast - exact).max() < 0.02 * np.abs(on_stored).max()
    with pytest.raises(kqsvd.InvalidArgument, match="unknown decode arithmetic 'int4'"):
        kqsvd.decode_attention(q, cache, arithmetic="int4")


def test_torch_tensors_through_numpy():
    torch = pytest.importorskip("torch", reason="Debian's python3-torch (tools/test_python.sh installs it)")

    x = torch.randn(50, 8, dtype=torch.float32)
    acc = kqsvd.GramAccumulator(8)
    acc.add(x.numpy())
    np.testing.assert_allclose(acc.gram, (x.double().T @ x.double()).numpy(), rtol=1e-6)
