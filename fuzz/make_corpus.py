#!/usr/bin/env python3
"""Writes the fuzzers' seed corpora, fuzz/corpus/<target>/: small valid files of every kind each reader
accepts (named valid_*), a few broken ones per rule (named bad_*), and the malformed-file corpus of
tests/data/malformed/ (files up to 64 KiB). Plain Python 3, no NumPy, deterministic; rerun it after
changing it or the malformed corpus:

    python3 fuzz/make_corpus.py

tests/test_fuzz_regressions.cpp replays every file here and checks that valid_* files are accepted.
The whole corpus stays well under 1 MB.
"""

import json
import math
import os
import shutil
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MALFORMED = os.path.join(ROOT, "tests", "data", "malformed")
TOKENIZER_512 = os.path.join(ROOT, "tests", "data", "models", "stories260K", "tok512.bin")
MAX_SEED_BYTES = 64 * 1024


# --- safetensors -----------------------------------------------------------------------------------

PACK = {"F16": "<e", "F32": "<f", "F64": "<d"}


def pack(dtype, values):
    if dtype == "BF16":  # the top half of the float32 bits (the values below are exact in bf16)
        return b"".join(struct.pack("<I", struct.unpack("<I", struct.pack("<f", v))[0])[2:] for v in values)
    return b"".join(struct.pack(PACK[dtype], v) for v in values)


def safetensors(tensors, metadata=None, align=True):
    """tensors: list of (name, dtype, shape, values). Data laid out in list order."""
    header, data = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape, values in tensors:
        raw = pack(dtype, values)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header, separators=(",", ":")).encode()
    if align:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def ramp(n, scale=0.25):
    return [scale * (i - n // 2) for i in range(n)]


SAFETENSORS = {
    "valid_f32_matrix.safetensors": safetensors([("keys", "F32", [3, 4], ramp(12))]),
    "valid_every_dtype.safetensors": safetensors(
        [("a", "F16", [2, 2, 2], ramp(8)), ("b", "BF16", [1, 4], ramp(4)), ("c", "F32", [2], [1.5, -2.0]),
         ("d", "F64", [2, 1, 3], ramp(6, 1e-3))], metadata={"model": "seed", "format": "pt"}),
    "valid_four_dimensional.safetensors": safetensors([("layers.0.k", "F16", [1, 2, 3, 4], ramp(24))]),
    "valid_scalar_and_empty.safetensors": safetensors(
        [("scalar", "F64", [], [math.pi]), ("empty", "F32", [0, 3], []), ("zero_lead", "F16", [0, 2, 2], [])]),
    "valid_non_finite.safetensors": safetensors(
        [("x", "F32", [2, 2], [1.0, float("nan"), float("inf"), -float("inf")]),
         ("big", "F64", [1, 2], [1e300, -1e-310])]),
    "valid_unaligned_header.safetensors": safetensors([("v", "F16", [5], ramp(5))], align=False),
    "valid_metadata_only.safetensors": safetensors([], metadata={"k": "v"}),
}


# --- .npy ------------------------------------------------------------------------------------------

def npy(descr, shape, values, fortran=False, version=1):
    shape_text = "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
    header = "{'descr': '%s', 'fortran_order': %s, 'shape': %s, }" % (descr, fortran, shape_text)
    length_bytes = 2 if version == 1 else 4
    unpadded = 6 + 2 + length_bytes + len(header) + 1
    header += " " * (-unpadded % 64) + "\n"
    length = struct.pack("<H" if version == 1 else "<I", len(header))
    code = {"<f2": "<e", "<f4": "<f", "<f8": "<d"}[descr]
    return b"\x93NUMPY" + bytes([version, 0]) + length + header.encode() + b"".join(struct.pack(code, v) for v in values)


NPY = {
    "valid_f2_fortran_3d.npy": npy("<f2", [2, 3, 2], ramp(12), fortran=True),
    "valid_f4_non_finite.npy": npy("<f4", [2, 2], [float("nan"), float("inf"), -0.0, 1e-45]),
    "valid_f8_beyond_float.npy": npy("<f8", [3], [1e300, -1e300, 5e-324]),
    "valid_f8_v2.npy": npy("<f8", [1, 2], [1.0, 2.0], version=2),
    "valid_f4_empty_fortran.npy": npy("<f4", [0, 5], [], fortran=True),
}


# --- llama2.c checkpoint ---------------------------------------------------------------------------

def checkpoint(dim=4, hidden=6, layers=1, heads=2, kv_heads=1, vocab=3, seq_len=2, shared=True, rope_table=False,
               poison=None):
    """A model whose weights are small distinct floats; poison=(index, value) overwrites one weight."""
    head_dim = dim // heads
    kv_dim = kv_heads * head_dim
    per_layer = 2 * dim + 2 * dim * dim + 2 * kv_dim * dim + 3 * hidden * dim
    count = vocab * dim + layers * per_layer + dim
    if rope_table:
        count += seq_len * head_dim
    if not shared:
        count += vocab * dim
    weights = [((i * 37) % 101 - 50) / 64.0 for i in range(count)]
    if poison is not None:
        weights[poison[0]] = poison[1]
    header = struct.pack("<7i", dim, hidden, layers, heads, kv_heads, vocab if shared else -vocab, seq_len)
    return header + struct.pack("<%df" % count, *weights)


CHECKPOINT = {
    "valid_shared_classifier.bin": checkpoint(),
    "valid_separate_classifier_rope_table.bin": checkpoint(layers=2, heads=2, kv_heads=2, shared=False, rope_table=True),
    "valid_gqa.bin": checkpoint(dim=8, hidden=4, heads=4, kv_heads=2, vocab=5, seq_len=3),
    "bad_truncated.bin": checkpoint()[:-4],
    "bad_trailing_bytes.bin": checkpoint() + b"\0\0\0\0",
    "bad_short_header.bin": checkpoint()[:20],
    "bad_odd_head_dim.bin": struct.pack("<7i", 6, 4, 1, 2, 1, 3, 2) + b"\0" * 4 * 200,
    "bad_heads_not_divisible.bin": struct.pack("<7i", 8, 4, 1, 4, 3, 3, 2),
    "bad_nan_weight.bin": checkpoint(poison=(7, float("nan"))),
    "bad_negative_dims.bin": struct.pack("<7i", -4, 6, 1, 2, 1, -2147483648, 2),
    "bad_huge_dims.bin": struct.pack("<7i", 65536, 262144, 1024, 1, 1, 2097152, 16777216),
}


# --- llama2.c tokenizer ----------------------------------------------------------------------------

def tokenizer(pieces, max_length=None, scores=None):
    encoded = [p.encode() if isinstance(p, str) else p for p in pieces]
    max_length = max(len(p) for p in encoded) if max_length is None else max_length
    out = struct.pack("<i", max_length)
    for i, p in enumerate(encoded):
        score = scores[i] if scores is not None else -float(i)
        out += struct.pack("<fi", score, len(p)) + p
    return out


BASE_PIECES = ["<unk>", "\n<s>\n", "\n</s>\n"] + ["<0x%02X>" % b for b in range(256)]
SMALL_VOCAB = BASE_PIECES + [" ", "a", "b", "ab", " a", " ab", "\u00f6", "time", "ti", "me"]

TOKENIZER = {
    "valid_small.bin": tokenizer(SMALL_VOCAB, scores=[0.0] * 259 + [1, 2, 3, 4, 5, 6, 7, -1, 2, 2]),
    "valid_duplicate_pieces.bin": tokenizer(BASE_PIECES + [" ", "a", "a", " a"]),
    "bad_no_space_piece.bin": tokenizer(BASE_PIECES + ["a"]),
    "bad_byte_piece_wrong.bin": tokenizer(BASE_PIECES[:10] + ["<0xZZ>"] + BASE_PIECES[11:] + [" "]),
    "bad_too_few_tokens.bin": tokenizer(BASE_PIECES[:100]),
    "bad_length_too_long.bin": tokenizer(BASE_PIECES + [" "], max_length=3),
    "bad_nan_score.bin": tokenizer(BASE_PIECES + [" "], scores=[0.0] * 259 + [float("nan")]),
    "bad_truncated.bin": tokenizer(BASE_PIECES + [" "])[:-1],
    "bad_max_length_zero.bin": struct.pack("<i", 0),
}


def write_corpus(target, files, extra=()):
    directory = os.path.join(HERE, "corpus", target)
    os.makedirs(directory, exist_ok=True)
    for old in os.listdir(directory):
        os.remove(os.path.join(directory, old))
    for name, data in files.items():
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)
    for source in extra:
        if os.path.getsize(source) <= MAX_SEED_BYTES:
            shutil.copyfile(source, os.path.join(directory, os.path.basename(source)))


def main():
    malformed = sorted(os.listdir(MALFORMED))
    write_corpus("safetensors", SAFETENSORS,
                 [os.path.join(MALFORMED, f) for f in malformed if f.startswith("st_")])
    npy_fixtures = os.path.join(ROOT, "tests", "data", "npy")
    numpy_files = {"valid_numpy_" + f: open(os.path.join(npy_fixtures, f), "rb").read()
                   for f in sorted(os.listdir(npy_fixtures)) if f.endswith(".npy")}
    write_corpus("npy", {**NPY, **numpy_files},
                 [os.path.join(MALFORMED, f) for f in malformed if f.startswith("npy_")])
    write_corpus("llama_checkpoint", CHECKPOINT)
    with open(TOKENIZER_512, "rb") as f:
        write_corpus("llama_tokenizer", {**TOKENIZER, "valid_tok512.bin": f.read()})


if __name__ == "__main__":
    main()
