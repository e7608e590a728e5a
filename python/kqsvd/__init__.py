"""kqsvd: KQ-SVD low-rank KV caches -- calibration Grams, the closed-form projection and its baselines,
quantized caches and the library's attention kernels, for numpy arrays and torch tensors (via .numpy()).

    import numpy as np, kqsvd
    keys, queries = kqsvd.GramAccumulator(64), kqsvd.GramAccumulator(64)
    keys.add(k)            # tokens x 64, float16/32/64, any strides (torch: k.numpy())
    queries.add(q)
    proj = kqsvd.fit_projection("kqsvd", keys, queries, rank=16)
    latents = proj.compress(k)                  # k A
    scores = proj.map_queries(q) @ latents.T    # (q B)(k A)^T ~ q k^T

Errors are kqsvd.Error and its subclasses, carrying the C++ message: InvalidArgument (also a ValueError),
FormatError, NumericalError, IoError (also an OSError).
"""


class Error(Exception):
    """Base class of every error kqsvd reports."""


class InvalidArgument(Error, ValueError):
    """An argument is out of range, of the wrong shape or dtype, or not finite; the message names it."""


class FormatError(Error):
    """A file is corrupt, truncated or of another kind; the message names the file and the entry."""


class NumericalError(Error):
    """Valid input whose result cannot be represented (a latent beyond a format's range, say)."""


class IoError(Error, OSError):
    """A file could not be opened, read or written."""


from ._core import (  # noqa: E402  (the exceptions above must exist before the module translates errors)
    ActivationFile,
    ActivationWriter,
    GramAccumulator,
    HeadCache,
    LossWeights,
    LowRankProjection,
    ModelCalibration,
    ModelProjections,
    ModelShape,
    StorageFormat,
    __version__,
    decode_attention,
    fit_projection,
    load_grams,
    load_projections,
    loss_aware_allocation,
    read_sensitivity,
    save_grams,
    save_projections,
    reference,
    write_sensitivity,
)

__all__ = [
    "Error", "InvalidArgument", "FormatError", "NumericalError", "IoError",
    "ActivationFile", "ActivationWriter", "GramAccumulator", "HeadCache", "LossWeights", "LowRankProjection", "ModelCalibration", "ModelProjections",
    "ModelShape", "StorageFormat", "decode_attention", "fit_projection", "load_grams", "load_projections", "save_grams",
    "loss_aware_allocation", "read_sensitivity", "reference", "save_projections", "write_sensitivity", "__version__",
]
