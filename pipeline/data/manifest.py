"""The manifest a prepared shard folder carries, as every later stage reads it: `load_manifest`,
the URL of each shard (`shard_url`), file hashes and `verify_shards`. Reading only: writing
is `pipeline.data.shards`; kept apart so that stage two does not depend on the data sources."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import fsspec

from pipeline.errors import UserError
from pipeline.storage import storage_errors

MANIFEST = "manifest.json"


def file_sha256(path: str | Path) -> str:
    """sha256 of a file (shards, checkpoints; a local path or an fsspec URL), read in 1 MiB
    blocks."""
    digest = hashlib.sha256()
    with fsspec.open(str(path), "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(shards_dir: str | Path) -> dict:
    """The manifest of a prepared shard folder (a local path or an fsspec URL), with a clear
    error when it is missing, is not valid JSON or is not a manifest."""
    url = f"{str(shards_dir).rstrip('/')}/{MANIFEST}"
    try:
        with storage_errors(url), fsspec.open(url, "r", encoding="utf-8") as stream:
            manifest = json.load(stream)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: no manifest; run the prepare stage (dvc repro "
                                "prepare) to write the shards first") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{url}: not valid JSON ({error}); the manifest is damaged: rerun "
                        "prepare (dvc repro prepare)") from None
    missing = [key for key in MANIFEST_KEYS
               if not isinstance(manifest, dict) or key not in manifest]
    if missing:
        raise UserError(f"{url}: not a manifest prepare wrote (no {missing[0]!r}); rerun "
                        "prepare (dvc repro prepare)")
    return manifest


MANIFEST_KEYS = ("num_classes", "class_names", "train_counts", "splits", "fingerprint")


def shard_url(shards_dir: str | Path, name: object) -> str:
    """The URL of shard `name` (as a manifest records it) in `shards_dir`. Only a plain file
    name inside the folder is accepted: a damaged or hostile manifest must not make a stage
    read (or a verify vouch for) a file elsewhere, e.g. `../../outside/evil.tar`."""
    if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name
            or Path(name).is_absolute() or ":" in name):
        raise UserError(f"{str(shards_dir).rstrip('/')}/{MANIFEST}: shard name {name!r} is "
                        "not a file name inside the folder; the manifest is damaged or was "
                        "not written by prepare: rerun prepare")
    return f"{str(shards_dir).rstrip('/')}/{name}"


def verify_shards(shards_dir: str | Path, manifest: dict | None = None) -> list[str]:
    """Every shard of every split checked against the manifest (read from `shards_dir`
    unless given): its name stays inside the folder, the file exists, and its sha256 equals
    the recorded one. Returns one line per problem, naming the shard and what to do; an
    empty list means every shard is as prepare wrote it."""
    manifest = load_manifest(shards_dir) if manifest is None else manifest
    problems = []
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            try:
                url = shard_url(shards_dir, shard.get("file"))
                digest = file_sha256(url)
            except UserError as error:
                problems.append(str(error))
                continue
            except FileNotFoundError:
                problems.append(f"{url}: {split} shard missing; rerun prepare (dvc repro "
                                "prepare)")
                continue
            if digest != shard.get("sha256"):
                problems.append(f"{url}: {split} shard rows {shard.get('rows')} is corrupt "
                                f"(sha256 {digest[:12]}..., the manifest records "
                                f"{str(shard.get('sha256'))[:12]}...); rerun prepare (dvc "
                                "repro prepare)")
    return problems
