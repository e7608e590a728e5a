#!/usr/bin/env python3
"""Writes the corpus of malformed safetensors and .npy files that tests/test_safetensors.cpp and
tests/test_npy.cpp feed to the readers, each expecting a FormatError with a specific message.

Plain Python 3, no NumPy: every byte is spelled out here, so the files stay deterministic and each one
breaks exactly one rule. Run it from anywhere; it writes next to itself and deletes the st_*/npy_* files
it no longer makes:

    python3 tests/data/malformed/make_corpus.py

Adding a file here without adding its expectation to the tests makes the tests fail (they check that
every file in this directory is covered).
"""

import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


# --- safetensors: u64 little-endian header length, JSON header, data buffer --------------------------

def safetensors(header, data=b"", length=None):
    """header: bytes (written as is) or an object (dumped as compact JSON)."""
    if not isinstance(header, bytes):
        header = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(header) if length is None else length) + header + data


def f32_tensor(shape, begin, end, dtype="F32"):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def deeply_nested(depth):
    return b'{"a":' + b"[" * depth + b"]" * depth + b"}"


SAFETENSORS = {
    "st_empty.safetensors": b"",
    "st_truncated_length.safetensors": b"\x10\x00\x00\x00\x00",
    "st_header_too_large.safetensors": safetensors(b"{}", length=1 << 40),
    "st_header_past_eof.safetensors": safetensors({"a": f32_tensor([1], 0, 4)}, length=1000),
    "st_header_length_zero.safetensors": safetensors(b"", data=b"\0" * 8),
    "st_header_not_json.safetensors": safetensors(b"{not json}"),
    "st_header_not_object.safetensors": safetensors(b"[1,2,3]"),
    "st_header_invalid_utf8.safetensors": safetensors(b'{"\xff\xfe":{}}'),
    "st_duplicate_tensor.safetensors": safetensors(
        b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
        b'"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', b"\0" * 8),
    "st_entry_not_object.safetensors": safetensors({"a": 5}),
    "st_missing_dtype.safetensors": safetensors({"a": {"shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
    "st_missing_offsets.safetensors": safetensors({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4),
    "st_dtype_not_string.safetensors": safetensors({"a": f32_tensor([1], 0, 4, dtype=32)}, b"\0" * 4),
    "st_unknown_dtype.safetensors": safetensors({"a": f32_tensor([1], 0, 4, dtype="F17")}, b"\0" * 4),
    "st_unsupported_dtype.safetensors": safetensors({"a": f32_tensor([1], 0, 8, dtype="I64")}, b"\0" * 8),
    "st_shape_not_array.safetensors": safetensors({"a": {"dtype": "F32", "shape": 4, "data_offsets": [0, 16]}},
                                                  b"\0" * 16),
    "st_negative_shape.safetensors": safetensors({"a": f32_tensor([-1, 2], 0, 8)}, b"\0" * 8),
    "st_fractional_shape.safetensors": safetensors({"a": f32_tensor([2.5], 0, 8)}, b"\0" * 8),
    "st_shape_overflow.safetensors": safetensors({"a": f32_tensor([1 << 32, 1 << 32, 16], 0, 8)}, b"\0" * 8),
    "st_offsets_wrong_length.safetensors": safetensors(
        {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, b"\0" * 4),
    "st_offsets_negative.safetensors": safetensors({"a": f32_tensor([1], -4, 0)}, b"\0" * 4),
    "st_offsets_reversed.safetensors": safetensors({"a": f32_tensor([1], 8, 4)}, b"\0" * 8),
    "st_offsets_past_buffer.safetensors": safetensors({"a": f32_tensor([4], 0, 16)}, b"\0" * 8),
    "st_byte_count_mismatch.safetensors": safetensors({"a": f32_tensor([2, 2], 0, 12)}, b"\0" * 12),
    "st_overlapping.safetensors": safetensors({"a": f32_tensor([4], 0, 16), "b": f32_tensor([4], 8, 24)},
                                              b"\0" * 24),
    "st_gap.safetensors": safetensors({"a": f32_tensor([2], 0, 8), "b": f32_tensor([1], 12, 16)}, b"\0" * 16),
    "st_trailing_bytes.safetensors": safetensors({"a": f32_tensor([2], 0, 8)}, b"\0" * 12),
    "st_metadata_not_object.safetensors": safetensors({"__metadata__": ["x"]}),
    "st_metadata_not_string.safetensors": safetensors({"__metadata__": {"k": 1}}),
    "st_deeply_nested.safetensors": safetensors(deeply_nested(100000)),
}


# --- .npy: magic, version, header length (u16 in 1.0, u32 after), Python-dict header, data ----------

def npy(header, data=b"", version=(1, 0), length=None):
    encoded = header.encode("latin1")
    size = len(encoded) if length is None else length
    return b"\x93NUMPY" + bytes(version) + struct.pack("<H" if version[0] == 1 else "<I", size) + encoded + data


def npy_dict(descr="'<f4'", fortran_order="False", shape="(2,)"):
    return "{'descr': %s, 'fortran_order': %s, 'shape': %s, }\n" % (descr, fortran_order, shape)


EIGHT_BYTES = b"\0" * 8

NPY = {
    "npy_empty.npy": b"",
    "npy_truncated_magic.npy": b"\x93NUM",
    "npy_bad_magic.npy": b"\x93NUMPZ" + npy(npy_dict(), EIGHT_BYTES)[6:],
    "npy_bad_version.npy": npy(npy_dict(), EIGHT_BYTES, version=(4, 0)),
    "npy_v2_truncated_length.npy": b"\x93NUMPY\x02\x00\x10\x00",
    "npy_header_past_eof.npy": npy(npy_dict(), EIGHT_BYTES, length=1000),
    "npy_header_not_dict.npy": npy("[1, 2]\n"),
    "npy_header_unparsable.npy": npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2, }\n"),
    "npy_unterminated_string.npy": npy("{'descr': '<f4"),
    "npy_trailing_text.npy": npy(npy_dict().rstrip("\n") + " junk\n", EIGHT_BYTES),
    "npy_missing_shape.npy": npy("{'descr': '<f4', 'fortran_order': False, }\n"),
    "npy_extra_key.npy": npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'extra': 1, }\n", EIGHT_BYTES),
    "npy_duplicate_key.npy": npy("{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (2,), }\n",
                                 EIGHT_BYTES),
    "npy_fortran_order_not_bool.npy": npy(npy_dict(fortran_order="0"), EIGHT_BYTES),
    "npy_big_endian.npy": npy(npy_dict(descr="'>f4'"), EIGHT_BYTES),
    "npy_int_dtype.npy": npy(npy_dict(descr="'<i4'"), EIGHT_BYTES),
    "npy_object_dtype.npy": npy(npy_dict(descr="'|O'"), EIGHT_BYTES),
    "npy_structured_dtype.npy": npy(npy_dict(descr="[('a', '<f4')]"), EIGHT_BYTES),
    "npy_negative_dimension.npy": npy(npy_dict(shape="(-1, 2)"), EIGHT_BYTES),
    "npy_shape_not_tuple.npy": npy(npy_dict(shape="(2)"), EIGHT_BYTES),
    "npy_dimension_too_large.npy": npy(npy_dict(shape="(99999999999999999999,)"), EIGHT_BYTES),
    "npy_shape_overflow.npy": npy(npy_dict(shape="(4294967296, 4294967296, 16)"), EIGHT_BYTES),
    "npy_data_truncated.npy": npy(npy_dict(shape="(3, 4)"), b"\0" * 40),
    "npy_data_too_long.npy": npy(npy_dict(descr="'<f8'", shape="(2,)"), b"\0" * 24),
}


def main():
    corpus = {**SAFETENSORS, **NPY}
    for name in os.listdir(HERE):
        if (name.startswith("st_") or name.startswith("npy_")) and name not in corpus:
            os.remove(os.path.join(HERE, name))
    for name, content in sorted(corpus.items()):
        with open(os.path.join(HERE, name), "wb") as out:
            out.write(content)
    print("wrote %d files to %s" % (len(corpus), HERE))


if __name__ == "__main__":
    main()
