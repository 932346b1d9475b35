"""Teacher logit store: one sharded Zarr v3 group per teacher (docs/store-format.md).

Layout, with V views, N train rows, top-k, C classes and WebDataset shards of S = shard_rows rows
(encodings and why: pipeline/store/encoding.py):

    topk_codes    (V, N, k) uint16    top-k log-probabilities (logit - logsumexp), descending,
                                      float16 gap-coded
    topk_classes  (V, N, k) uint8/16/32  their class ids
    logsumexp     (V, N)    float32   over all C logits: the store is temperature-free
    tail_coefficients (V, N, r) int8  `tail: quantized` only: every class's log-probability as
    tail_residuals (V, N, C) uint16    a PCA approximation + a residual in 0.06-logit steps
    tail_mean, tail_basis, tail_scales (C,), (C, r), (r,) float32: the store's PCA basis
    boxes         (V, N, 4) uint16    crop box (top, left, height, width) / box_scale
    flips         (V, N)    bool      horizontal flip of the view
    labels        (N,)      uint      the row's label, so the student can check the pairing
    checksums     (num_shards, V, A) uint32  crc32 of each array's view chunk, per shard
    label_checksums (num_shards,) uint32
    shard_complete (num_shards,) bool  one object per shard, written after that shard's data
    class_prior/T=<t>  (C, C) float32  IKL's GI prior per temperature t: row c is the teacher's
                                       mean softmax(logits / t) over train rows labelled c

The (V, N, ...) arrays use Zarr's sharding codec: one shard object (V, S, ...) per WebDataset
shard holding all V views, made of V inner chunks (1, S, ...). Stage two reads one inner chunk
(one view of one tar shard) per array per tar shard per epoch; stage one writes whole shards, so
parallel dump ranks never touch the same object. Only codecs of the Zarr v3 specification
(bytes, blosc, zstd, crc32c, sharding_indexed): any Zarr v3 reader (zarr-python, tensorstore)
opens every array; the group attribute `encoding` says how to turn the integers into values.

Attributes: format version, teacher name, arch and checkpoint sha256, dataset fingerprint,
augmentation spec and seed, V, k, C, the tail encoding, and `complete`, set last. They are
validated against a schema and the arrays' shapes on open.

Modules: `encoding` (values <-> stored integers, codecs), `tail` (the quantised tail), `writing` (create, write a shard,
finalize), `reading` (open, read rows, teacher logits), `verification` (check every chunk),
`layout` (names, attribute schema, checksums, errors).
"""
from pipeline.store.encoding import (
    DEFAULT_MAX_IMAGE_SIDE, FORMAT_VERSION, LOGSUMEXP_KEEPBITS, MAX_SUPPORTED_IMAGE_SIDE,
    MIN_RESIDUAL_MASS, TAILS, array_codecs, box_scale, check_image_sides, class_id_dtype,
    encode_logits, exact_box_side, teacher_logits_from_fields)
from pipeline.store.layout import (
    CHECKSUMS, LABEL_CHECKSUMS, MARKERS, PRIOR_GROUP, ClassPriorNotFoundError, StoreCorruptError,
    StoreMismatchError, has_tail, prior_name, view_arrays)
from pipeline.store.reading import LOGIT_FIELDS, LogitStore, open_store
from pipeline.store.tail import TAIL_FIT_ROWS, TailBasis, fit_tail_basis
from pipeline.store.verification import verify_store
from pipeline.store.writing import (
    PARTIALS_GROUP, REQUIRED_ATTRIBUTES, completed_shards, create_prior_partials, create_store,
    drop_prior_partials, finalize_store, identity, open_existing, reduce_prior_partials,
    shard_bounds, store_identity, write_prior_partials, write_shard, write_tail_basis)

__all__ = [
    "DEFAULT_MAX_IMAGE_SIDE",
    "FORMAT_VERSION",
    "LOGSUMEXP_KEEPBITS",
    "MAX_SUPPORTED_IMAGE_SIDE",
    "MIN_RESIDUAL_MASS",
    "TAILS",
    "array_codecs",
    "box_scale",
    "check_image_sides",
    "class_id_dtype",
    "encode_logits",
    "exact_box_side",
    "teacher_logits_from_fields",
    "CHECKSUMS",
    "LABEL_CHECKSUMS",
    "MARKERS",
    "PRIOR_GROUP",
    "ClassPriorNotFoundError",
    "StoreCorruptError",
    "StoreMismatchError",
    "has_tail",
    "prior_name",
    "view_arrays",
    "LOGIT_FIELDS",
    "LogitStore",
    "open_store",
    "TAIL_FIT_ROWS",
    "TailBasis",
    "fit_tail_basis",
    "verify_store",
    "PARTIALS_GROUP",
    "REQUIRED_ATTRIBUTES",
    "completed_shards",
    "create_prior_partials",
    "create_store",
    "drop_prior_partials",
    "finalize_store",
    "identity",
    "open_existing",
    "reduce_prior_partials",
    "shard_bounds",
    "store_identity",
    "write_prior_partials",
    "write_shard",
    "write_tail_basis",
]
