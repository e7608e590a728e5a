"""The PyTorch example (examples/python/llama2c_torch.py) against the C++ reference model and the
checkpoint's own reference numbers, and the gloo example against one process: the calibration of two
processes, all-reduced, equals the calibration of all the stories in one."""
import argparse
import json
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="Debian's python3-torch (tools/test_python.sh installs it)")

import kqsvd  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "examples", "python"))
import distributed_calibration  # noqa: E402
import llama2c_torch  # noqa: E402

MODEL = os.path.join(ROOT, "data", "models", "stories260K", "stories260K.bin")
TOKENIZER = os.path.join(ROOT, "data", "models", "stories260K", "tok512.bin")
TEXT = os.path.join(ROOT, "data", "text", "tinystories", "tinystories_sample.txt")


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return llama2c_torch.Llama2c(MODEL)


@pytest.fixture(scope="module")
def tokenizer():
    return llama2c_torch.Tokenizer(TOKENIZER, 512)


def test_tokenizer_matches_the_readme_and_the_cpp_tokenizer(tokenizer):
    # data/models/stories260K/README.md: encode("Once upon a time, there was a little girl named Lily.")
    expected = [1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426]
    assert tokenizer.encode("Once upon a time, there was a little girl named Lily.") == expected
    with open(TEXT, encoding="utf-8") as f:
        stories = [s.strip() for s in f.read().split("<|endoftext|>") if s.strip()][:5]
    for story in stories:
        assert tokenizer.encode(story) == kqsvd.reference.encode(TOKENIZER, 512, story)


def test_logits_match_the_cpp_reference_model_and_greedy_decoding_the_readme(model, tokenizer):
    tokens = llama2c_torch.stories_of(TEXT, 0, 1, tokenizer, 128)[0]
    ours = model(tokens).numpy()
    reference = kqsvd.reference.logits(MODEL, tokens)
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() < 1e-4 * max(1.0, np.abs(reference).max())
    # README: the first greedy ids after BOS.
    greedy = [1]
    for _ in range(8):
        greedy.append(int(model(greedy)[-1].argmax()))
    assert greedy[1:] == [403, 407, 261, 378, 432, 383, 286, 261]


def test_hooks_calibrate_and_the_compressed_forward_is_exact_at_full_rank(model, tokenizer):
    stories = llama2c_torch.stories_of(TEXT, 10, 13, tokenizer, 64)
    calibration = llama2c_torch.calibrate(model, stories)
    assert calibration.tokens == sum(len(s) for s in stories)
    # Independent: layer 2's rotated keys of the stories, captured by a separate hook, multiplied out.
    captured = []
    handle = model.taps[2].register_forward_hook(lambda tap, i, o: captured.append(o[1][:, 8:16].double()))
    for s in stories:
        model(s)
    handle.remove()
    k = torch.cat(captured)
    np.testing.assert_allclose(calibration.keys(2, 1).gram, (k.T @ k).numpy(), rtol=1e-10, atol=1e-10)
    full_rank = llama2c_torch.fit(model, calibration, 8)
    held_out = llama2c_torch.stories_of(TEXT, 0, 2, tokenizer, 48)
    assert llama2c_torch.mean_kl(model, held_out, full_rank) < 1e-6
    assert llama2c_torch.mean_kl(model, held_out, full_rank.truncated(4, 4)) > 1e-3


def test_probe_writes_a_sensitivity_file_the_allocator_reads(model, tokenizer, tmp_path):
    stories = llama2c_torch.stories_of(TEXT, 10, 12, tokenizer, 48)
    full_rank = llama2c_torch.fit(model, llama2c_torch.calibrate(model, stories), 8)
    weights = llama2c_torch.probe(model, llama2c_torch.stories_of(TEXT, 20, 21, tokenizer, 48), full_rank, 4)
    path = str(tmp_path / "sensitivity.json")
    kqsvd.write_sensitivity(path, weights, method="kqsvd", model="stories260K")
    with open(path) as f:
        assert json.load(f)["format"] == "kqsvd.sensitivity"
    read = kqsvd.read_sensitivity(path, model.shape)
    assert max(read.key(l, 0) for l in range(5)) > 0.0
    allocation = kqsvd.loss_aware_allocation(full_rank, read, 0.5)
    assert allocation["bytes_per_token"] <= allocation["budget_bytes_per_token"]


def test_two_gloo_processes_reduce_to_the_calibration_of_all_stories(model, tokenizer, tmp_path):
    args = distributed_calibration.parser().parse_args(
        ["--world-size", "2", "--model", MODEL, "--tokenizer", TOKENIZER, "--text", TEXT, "--calib-stories", "0:6",
         "--max-tokens", "48", "--rank", "4", "--init-file", str(tmp_path / "rendezvous")])
    summary = distributed_calibration.run(args)
    one = llama2c_torch.calibrate(model, llama2c_torch.stories_of(TEXT, 0, 6, tokenizer, 48))
    assert summary["tokens"] == one.tokens
    assert summary["local_tokens"] < one.tokens
    np.testing.assert_allclose(summary["keys_gram"], one.keys(1, 0).gram, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(summary["queries_gram"], one.queries(1, 0).gram, rtol=1e-12, atol=1e-9)
    fitted = llama2c_torch.fit(model, one, 4)
    np.testing.assert_allclose(summary["key_spectrum"], fitted.keys(0, 0).singular_values, rtol=1e-9)
