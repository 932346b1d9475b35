"""The CPU path's steps, each against what it replaced, in one process:

    python benchmarks/decode_steps.py --rounds 3

1. reading a tar shard into (name, bytes) members: webdataset's tarfile-based
   `tar_file_expander` vs pipeline.stream.tars.tar_members (whole shards from memory);
2. the whole JPEG to RGB pixels by each libjpeg-turbo binding PyPI offers (Pillow, simplejpeg,
   imagecodecs and PyTurboJPEG where installed), after checking each gives Pillow's pixels.
(One view's decode + crop with Pillow and with simplejpeg is benchmarks/loader.py's pair of
decode-only bounds.) Data: the photo-like shards of benchmarks/loader.py (made if missing).
Alternatives alternate over --rounds rounds (common.alternate), timed by this process's CPU
time, one torch thread: per-core costs that other jobs do not inflate.
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PHOTO_CACHE, alternate, load_line, median, parser, prepare  # noqa: E402


def tar_alternatives(blobs: list[bytes]) -> dict:
    from webdataset.tariterators import tar_file_expander

    from pipeline.stream.tars import tar_members

    def with_tarfile():
        return sum(1 for blob in blobs for member in tar_file_expander(
            [{"url": "memory", "stream": io.BytesIO(blob)}]) if member)

    def direct():
        return sum(1 for blob in blobs for _ in tar_members(io.BytesIO(blob)))

    return {"tarfile (webdataset)": with_tarfile, "pipeline.stream.tars": direct}


def decoder_alternatives(samples: list[dict]) -> dict:
    """The whole JPEG to an (H, W, 3) uint8 RGB array by each binding of libjpeg-turbo that
    PyPI offers (Pillow first: the one replaced); the optional ones when installed (imagecodecs;
    PyTurboJPEG, which needs a system libturbojpeg >= 3.0)."""
    from PIL import Image
    import simplejpeg

    blobs = [sample["jpg"] for sample in samples if "jpg" in sample]
    decoders = {"Pillow": lambda data: np.asarray(Image.open(io.BytesIO(data)).convert("RGB")),
                "simplejpeg": lambda data: simplejpeg.decode_jpeg(data, "RGB")}
    try:
        import imagecodecs
        decoders["imagecodecs"] = imagecodecs.jpeg8_decode
    except ImportError:
        print("  (imagecodecs not installed: left out)")
    try:
        from turbojpeg import TJPF_RGB, TurboJPEG
        turbo = TurboJPEG()
        decoders["PyTurboJPEG"] = lambda data: turbo.decode(data, TJPF_RGB)
    except (ImportError, RuntimeError, OSError) as error:
        print(f"  (PyTurboJPEG not usable here: {str(error)[:80]}: left out)")
    reference = [decoders["Pillow"](data) for data in blobs]
    for name, decoder in decoders.items():
        same = all(np.array_equal(decoder(data), pixels) for data, pixels in zip(blobs, reference))
        print(f"  {name}: {'the same pixels as Pillow' if same else 'OTHER PIXELS than Pillow'}"
              f" on all {len(blobs)} JPEGs")

    def timed(decoder):
        return lambda: sum(1 for data in blobs if decoder(data) is not None)

    return {name: timed(decoder) for name, decoder in decoders.items()}


def race(alternatives: dict, rounds: int) -> dict:
    """name -> per-round CPU microseconds per item (common.alternate's rotating order)."""
    def timed(name: str) -> float:
        start = time.process_time()  # CPU time: not inflated by other jobs' load
        count = alternatives[name]()
        return 1e6 * (time.process_time() - start) / count

    return alternate(rounds, alternatives, timed)


def report(times: dict, unit: str) -> None:
    names = list(times)
    for name in names:
        print(f"  {name:<42} {median(times[name]):9.1f} CPU us/{unit}   (rounds: "
              f"{', '.join(f'{v:.0f}' for v in times[name])})")
    for name in names[1:]:
        ratio = median(a / b for a, b in zip(times[names[0]], times[name]))
        print(f"  speed-up {name} vs {names[0]}: {ratio:.2f}x")


def main() -> None:
    p = parser(__doc__, rounds=5)
    p.add_argument("--max-side", type=int, default=0, help="the shards of this data.max_side")
    args = p.parse_args()
    torch.set_num_threads(1)
    from pipeline.data.manifest import load_manifest
    from pipeline.stream.loader import read_shard, split_shards

    _, _, shards_dir = prepare(Path(args.work or PHOTO_CACHE), "photo", 40, 25,
                               max_side=args.max_side)
    shards = split_shards(str(shards_dir), load_manifest(str(shards_dir)), "train")
    blobs = [Path(shard.url).read_bytes() for shard in shards]
    samples = [sample for shard in shards for sample in read_shard(shard)]
    print(f"decode steps on {len(samples)} train rows of {shards_dir} "
          f"({sum(map(len, blobs)) / 2**20:.1f} MiB in {len(blobs)} shards), {load_line()}")
    print("1. tar members (name, bytes) from whole shards in memory:")
    report(race(tar_alternatives(blobs), args.rounds), "member")
    print("2. the whole JPEG decoded to RGB pixels, per binding of libjpeg-turbo:")
    report(race(decoder_alternatives(samples), args.rounds), "image")
    print(load_line() + " (at the end)")


if __name__ == "__main__":
    main()
