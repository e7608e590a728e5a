"""The Python module against independent numpy computations: Grams as X^T X in float64, the KQ-SVD error
as the direct SVD of Q K^T, attention as a softmax written out; errors as the documented exceptions."""
import math

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


def test_torch_tensors_through_numpy():
    torch = pytest.importorskip("torch", reason="Debian's python3-torch (tools/test_python.sh installs it)")

    x = torch.randn(50, 8, dtype=torch.float32)
    acc = kqsvd.GramAccumulator(8)
    acc.add(x.numpy())
    np.testing.assert_allclose(acc.gram, (x.double().T @ x.double()).numpy(), rtol=1e-6)
