"""The on-disk rules shared by every saved artifact (gradient indexes, EK-FAC factors, retraining
caches, search logs, run folders and checkpoints):

- atomic writes (`atomic_write_bytes/text/json/npy/npz`): a file is absent or whole, never a prefix;
- strict JSON (`dumps`, `loads`, `read_json`, `atomic_write_json`): NaN / Infinity never written as
  bare tokens (an error, or null plus a `nonfinite_fields` flag) and rejected on read;
- fingerprints (`digest`, `write_fingerprint`, `check_fingerprint`, `check_fields`, `tree_digest`,
  `array_digest`): what made an artifact is stored beside it and checked on every reuse, a mismatch
  raising `FingerprintMismatchError` naming the differing fields;
- checksums (`file_sha256`, `verify_file`) verified on read, naming a corrupt or empty file;
- `confined_path` for paths read from manifests; `exclusive_lock` for one writer per folder.

This package imports nothing else from the repository, so every other package can use it.
"""
from artifacts.atomic import (TMP_PREFIX, atomic_write_bytes, atomic_write_npy, atomic_write_npz, atomic_write_text,
                              npy_bytes, npz_bytes, remove_temporaries)
from artifacts.fingerprint import (ABSENT, FINGERPRINT_FILE, FingerprintMismatchError, array_digest, check_fields,
                                   check_fingerprint, diff_fields, digest, normalise, read_fingerprint,
                                   subfolder_for, tree_digest, write_fingerprint)
from artifacts.integrity import CorruptArtifactError, UnsafePathError, confined_path, file_sha256, verify_file
from artifacts.jsonio import NONFINITE_KEY, CorruptJSONError, atomic_write_json, dumps, loads, read_json, to_jsonable
from artifacts.lock import LockedError, exclusive_lock

__all__ = [
    "TMP_PREFIX", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_write_npy",
    "atomic_write_npz", "npy_bytes", "npz_bytes", "remove_temporaries",
    "NONFINITE_KEY", "CorruptJSONError", "to_jsonable", "dumps", "loads", "read_json",
    "FINGERPRINT_FILE", "ABSENT", "FingerprintMismatchError", "normalise", "digest", "diff_fields",
    "write_fingerprint", "read_fingerprint", "check_fingerprint", "check_fields", "tree_digest", "array_digest",
    "subfolder_for",
    "CorruptArtifactError", "UnsafePathError", "file_sha256", "verify_file", "confined_path",
    "LockedError", "exclusive_lock",
]
