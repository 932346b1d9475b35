"""GPU check: a ResNet-50 student at 224 px, global batch 256, bf16, cached IKL-KD (quantised
tail, dequantised on the GPU) vs plain CE, fed by the GPU decode path.

    python benchmarks/gpu_check.py                # on a CUDA machine: ~5 min (estimated)
    python benchmarks/gpu_check.py --rounds 1     # one round per configuration: ~1.5 min less
    python benchmarks/gpu_check.py --smoke        # tiny CPU run of every code path (1-2 min)
    python benchmarks/gpu_check.py --teacher-weights resnet50.pth   # a real teacher for 4.

One command prints every figure beside its goal, in four parts, then the goals' verdicts
together; each timed configuration runs in a fresh subprocess (common.run_child), and a part
whose child fails is reported and skipped. Nothing is downloaded.

Data (cached in --work, default $TMPDIR/gpu_check, reused by later runs): 1000 classes x 13
photo-like JPEGs (common.photo_like: 300-500 px sides, quality 90, ~100 KB, as ImageNet's),
written by all CPUs, each class from its own generator default_rng([0, label]); prepared into
shards of 256 by pipeline.data.shards.prepare_shards (11 train rows per class: 11,000 rows, 42 steps
of 256; 1 val and 1 test image per class). C = 1000 is ImageNet's, so the loss and the store's
tail cost what they would there. Teacher: an untrained ResNet-50 with calibrated BatchNorm
(common.write_teacher_checkpoint); its store: pipeline.store.dump.dump_logits with student.decode: gpu,
1 view, top-5, logits.tail: quantized (wall time printed).

1. The step alone: pipeline.train.loop.fit on in-memory batches (random uint8 images, labels and the
   store's fields of random teacher logits, encoded by the store's own encoder), --warmup steps
   then --steps timed steps, CUDA-synchronised at both ends, CE and IKL alternating over
   --rounds rounds; figures are medians. Then the loss alone on the student's (B, C) logits
   (CachedTeacher's copies and dequantisation + IKL-KD + CE, forward and backward) as a share
   of the IKL step. Goals: IKL / CE throughput >= 0.95; loss + dequantisation < 2 % of the step.
2. Fed training: pipeline.train.runs.train_student as a stage runs it (resnet50, 224 px, batch 256,
   bf16, decode gpu, 4 DataLoader workers; IKL replays the store), 2 epochs; epoch 1 warms up,
   epoch 2 is timed by wrapping its train loader (common.time_train_loaders and
   gpu_check_timing.EpochPhases) from its creation to its exhaustion. An epoch's wall time
   splits into start-up (workers start, shuffle buffers fill, up to the first batch), the first
   step, the steady state (the second batch's request to the end of the last step,
   CUDA-synchronised at both ends) and shut-down (the exhausted loader stopping its workers).
   Start-up and shut-down are per-epoch constants, under a second against an ImageNet epoch's
   5000 steps, so the goals are judged on the steady state; whole-epoch figures are printed
   beside them. Peak GPU memory: torch.cuda.max_memory_allocated from the start of the timed
   epoch to the end of the run; the train loss (at a learning rate too low to diverge, a NaN
   would point to corrupted batches: see 4.).
   Goals: steady IKL / CE throughput >= 0.95. "Not waiting on the loader": the steady state
   spends < 2 % of its time in the loader's next(), and its step (with the GPU decode and crop,
   which the in-memory step has not) is <= 1.05x the in-memory step of the same loss.
3. The loader alone: the training loader of the IKL student (shards + store, 4 workers), its
   first --loader-batches batches, each through pipeline.stream.device_decode.batch_pixels on the GPU
   and synchronised, no model; steady crops/s (the first batch left out). Goal: the GPU path
   >= 2500 crops/s. The CPU path (decode: cpu, 4 workers) beside it for comparison.
4. Decoder difference: on --check-images train JPEGs, nvJPEG (decode_on_device on CUDA) vs
   Pillow (SourceImage.full, the CPU path's decode; torchvision's CPU decode gives the same
   bits, tests/test_device_decode.py): max and mean |difference| and the share of differing
   values, on the full images and on the stored 224 px views (cut on the CPU from both
   decodes: the decoder alone; and cut on the GPU from nvJPEG's, as the device path trains,
   against the CPU path's: the GPU resizes in float, the CPU in uint8). Then
   the teacher's fp32 eval-mode logits on both sets of views against the store's quantisation
   error on the same logits (encode_logits with a tail basis fitted on them, decode_logits).
   Verdict: the decoder's row-centred rms |delta logit| (what softmax and IKL's pairwise
   differences see) below the store's. The untrained teacher's logit scale is arbitrary, so
   its fc layer is rescaled to a per-row logit std of 3; --teacher-weights loads a real one.
   Also printed: TF32 convolutions (cuDNN's default; the dump turns it off) against fp32, and
   whether decode_on_device overwrites memory that kernels queued on the caller's stream
   have still to read (`decode_overwrites`).

--smoke runs the same code on the CPU (resnet18, 32 px crops of 48-80 px photos, 6 classes,
batch 8, 1 worker, a few steps; nvJPEG's place is taken by torchvision's CPU decode). Its
numbers say nothing about the goals. Never imported by the tests.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import alternate, load_line, median, run_child  # noqa: E402
from common import verdict as goal_verdict  # noqa: E402
from gpu_check_data import HELD_OUT, prepare_child  # noqa: E402
from gpu_check_decoder import HAZARD_TRIALS, decoder_child  # noqa: E402
from gpu_check_timing import fed_child, loader_child, step_child  # noqa: E402

JUDGE_GOALS = True  # main sets it False on --smoke: CPU timings say nothing about GPU goals


def verdict(met: bool) -> str:
    """common.verdict, or "n/a (smoke)" on a --smoke run."""
    return goal_verdict(met) if JUDGE_GOALS else "n/a (smoke)"


THROUGHPUT_GOAL, LOSS_SHARE_GOAL = 0.95, 0.02
WAIT_SHARE_GOAL, FED_STEP_GOAL = 0.02, 1.05  # "not waiting on the loader"
LOADER_GOAL = 2500  # crops/s of the GPU path alone
FULL = dict(arch="resnet50", teacher_arch="resnet50", image_size=224, batch_size=256,
            classes=1000, per_class=11, min_side=300, max_side=500, shard_size=256, workers=4,
            views=1, topk=5, steps=60, warmup=15, rounds=2, loss_repeats=100,
            loader_batches=20, check_images=256)
SMOKE = dict(arch="resnet18", teacher_arch="resnet18", image_size=32, batch_size=8,
             classes=6, per_class=6, min_side=48, max_side=80, shard_size=16, workers=1,
             views=1, topk=5, steps=4, warmup=2, rounds=1, loss_repeats=5,
             loader_batches=4, check_images=8)


# ---------------------------------------------------------------------------------------------
# Parent: run the children, print every figure beside its goal


def data_section(settings: dict, command: list[str]) -> dict:
    """Make (or find cached) the images, shards, teacher and store; print what they are."""
    info = run_child(__file__, ["--child", "prepare", "-", *command])
    seconds = info["seconds"]

    def took(step: str) -> str:
        return f"{seconds[step]:.1f} s" if step in seconds else "cached"

    print(f"\ndata ({info['folder']}): {info['classes']} classes x {settings['per_class']} "
          f"train + {HELD_OUT} held-out photo-like JPEGs of {settings['min_side']}.."
          f"{settings['max_side']} px, quality 90, mean {info['jpeg_bytes'] / 1e3:.0f} KB; "
          f"{info['rows']} train rows in {info['shards']} shards")
    print(f"  generated {took('generate')} (processes: {info['processes']}), prepared "
          f"{took('prepare')}, teacher {settings['teacher_arch']} checkpoint {took('teacher')}; "
          f"dump_logits on {info['device']} (decode gpu, {settings['views']} view, "
          f"top-{settings['topk']}, quantized tail): {took('dump')}")
    return info


def step_section(settings: dict, command: list[str], memory: str) -> dict:
    print(f"\n1. the step alone: pipeline.train.loop.fit on in-memory batches, {settings['steps']} "
          f"timed steps after {settings['warmup']} warm-up steps, median over "
          f"{settings['rounds']} round(s) (CE and IKL alternating, fresh processes)")
    runs = alternate(settings["rounds"], ("ce", "ikl"), lambda loss: run_child(
        __file__, ["--child", "step", loss, *command]))
    for loss, label in (("ce", "plain CE"), ("ikl", "cached IKL-KD")):
        print(f"  {label:<14} {median(r['samples_per_s'] for r in runs[loss]):9.1f} samples/s"
              f"   step {1e3 * median(r['step'] for r in runs[loss]):8.2f} ms   {memory} "
              f"{median(r['peak_bytes'] for r in runs[loss]) / 2**30:6.2f} GiB   loss alone "
              f"{1e3 * median(r['loss'] for r in runs[loss]):7.3f} ms")
    throughput = median(i["samples_per_s"] / c["samples_per_s"]
                        for i, c in zip(runs["ikl"], runs["ce"]))
    share = median(r["loss"] / r["step"] for r in runs["ikl"])
    marginal = median((i["step"] - c["step"]) / i["step"] for i, c in zip(runs["ikl"], runs["ce"]))
    print(f"  throughput cached IKL-KD / plain CE: {throughput:.3f}x (goal >= "
          f"{THROUGHPUT_GOAL}: {verdict(throughput >= THROUGHPUT_GOAL)})")
    print(f"  loss + dequantisation (copies, teacher_logits_from_fields, IKL-KD + CE, forward + "
          f"backward) share of the IKL step: {100 * share:.2f}% (goal < "
          f"{100 * LOSS_SHARE_GOAL:g}%: {verdict(share < LOSS_SHARE_GOAL)}); marginal "
          f"(IKL step - CE step) / IKL step: {100 * marginal:.2f}%")
    return {"step": {loss: median(r["step"] for r in runs[loss]) for loss in runs},
            "goals": [("step alone: IKL / CE throughput", f"{throughput:.3f}x",
                       throughput >= THROUGHPUT_GOAL),
                      ("loss + dequantisation share of the step", f"{100 * share:.2f}%",
                       share < LOSS_SHARE_GOAL)]}


def fed_section(settings: dict, command: list[str], memory: str, alone: dict | None) -> list:
    print(f"\n2. fed training: pipeline.train.runs.train_student, decode gpu, "
          f"DataLoader workers {settings['workers']}, 2 epochs, epoch 2 timed; median over "
          f"{settings['rounds']} round(s)")
    runs = alternate(settings["rounds"], ("ce", "ikl"), lambda loss: run_child(
        __file__, ["--child", "fed", loss, *command]))
    figures = {loss: fed_figures(records) for loss, records in runs.items()}
    for loss, label in (("ce", "plain CE"), ("ikl", "cached IKL-KD")):
        f = figures[loss]
        print(f"  {label:<14} steady state: {f['rate']:8.1f} samples/s, step "
              f"{1e3 * f['step']:7.2f} ms, {100 * f['wait']:5.2f}% of it in the loader; "
              f"{memory} {f['peak'] / 2**30:.2f} GiB")
        print(f"  {'':<14} whole epoch:  {f['epoch_rate']:8.1f} samples/s, "
              f"{100 * f['epoch_wait']:5.2f}% in the loader (start-up {f['startup']:.2f} s, "
              f"shut-down {f['shutdown']:.2f} s); train loss {f['train_loss']:.4g}")
    throughput = median(fed_figures([i])["rate"] / fed_figures([c])["rate"]
                        for i, c in zip(runs["ikl"], runs["ce"]))
    epoch_throughput = median(fed_figures([i])["epoch_rate"] / fed_figures([c])["epoch_rate"]
                              for i, c in zip(runs["ikl"], runs["ce"]))
    print(f"  throughput cached IKL-KD / plain CE, steady: {throughput:.3f}x (goal >= "
          f"{THROUGHPUT_GOAL}: {verdict(throughput >= THROUGHPUT_GOAL)}); whole epoch: "
          f"{epoch_throughput:.3f}x")
    wait = max(f["wait"] for f in figures.values())
    goals = [("fed: IKL / CE throughput (steady)", f"{throughput:.3f}x",
              throughput >= THROUGHPUT_GOAL),
             ("fed: loader wait, steady", f"{100 * wait:.2f}%", wait < WAIT_SHARE_GOAL)]
    line = (f"  not waiting on the loader: steady loader wait, the larger of the two "
            f"{100 * wait:.2f}% (goal < {100 * WAIT_SHARE_GOAL:g}%: "
            f"{verdict(wait < WAIT_SHARE_GOAL)})")
    if alone:
        ratios = {loss: figures[loss]["step"] / alone["step"][loss] for loss in figures}
        worst = max(ratios.values())
        line += (f"; fed step / in-memory step: CE {ratios['ce']:.3f}x, IKL "
                 f"{ratios['ikl']:.3f}x (goal <= {FED_STEP_GOAL}: "
                 f"{verdict(worst <= FED_STEP_GOAL)})")
        goals.append(("fed step / in-memory step", f"{worst:.3f}x", worst <= FED_STEP_GOAL))
    print(line)
    return goals


def fed_figures(records: list[dict]) -> dict:
    """Medians over rounds of a fed configuration's figures."""
    def figure(value):
        return median(value(r) for r in records)

    return {"rate": figure(lambda r: r["steady_samples"] / r["steady"]),
            "step": figure(lambda r: r["steady"] / r["steady_steps"]),
            "wait": figure(lambda r: r["steady_wait"] / r["steady"]),
            "epoch_rate": figure(lambda r: r["samples"] / r["wall"]),
            "epoch_wait": figure(lambda r: r["wait"] / r["wall"]),
            "startup": figure(lambda r: r["startup"]),
            "shutdown": figure(lambda r: r["shutdown"]),
            "peak": figure(lambda r: r["peak_bytes"]),
            "train_loss": worst_loss(r["train_loss"] for r in records)}


def worst_loss(losses) -> float:
    """A NaN or infinite loss if there is one, else the largest."""
    losses = list(losses)
    return next((loss for loss in losses if not math.isfinite(loss)), max(losses))


def loader_section(settings: dict, command: list[str], device: str,
                   alone: dict | None) -> list:
    print(f"\n3. the loader alone: the IKL student's train_loader (shards + store, "
          f"workers {settings['workers']}), its first {settings['loader_batches'] or 'all'} "
          f"batches of {settings['batch_size']}, each through batch_pixels on {device} and "
          "synchronised, no model; steady state (the first batch left out)")
    goals = []
    for decode, label in (("gpu", "GPU path (decode gpu)"), ("cpu", "CPU path (decode cpu)")):
        phases = run_child(__file__, ["--child", "loader", decode, *command])
        rate = phases["steady_samples"] / phases["steady"]
        batch_ms = 1e3 * phases["steady"] / phases["steady_steps"]
        line = (f"  {label:<22} {rate:8.1f} crops/s ({batch_ms:.1f} ms a batch, "
                f"{100 * phases['steady_wait'] / phases['steady']:.1f}% of it waiting for "
                f"the workers; start-up {phases['startup']:.2f} s)")
        if decode == "gpu":
            line += f" (goal >= {LOADER_GOAL}: {verdict(rate >= LOADER_GOAL)})"
            if alone:
                share = batch_ms / 1e3 / alone["step"]["ce"]
                line += f"; a batch of it takes {share:.2f}x the in-memory CE step"
            goals.append(("loader alone, GPU path", f"{rate:.0f} crops/s", rate >= LOADER_GOAL))
        else:
            line += " (for comparison)"
        print(line)
    return goals


def decoder_section(settings: dict, command: list[str], smoke: bool) -> list:
    result = run_child(__file__, ["--child", "decoder", "-", *command])
    where = ("nvJPEG on " + result["device"] if not smoke else
             "torchvision's CPU decode (smoke: no nvJPEG, the same code on the CPU)")
    print(f"\n4. decoder difference: {result['images']} train JPEGs "
          f"({result['megapixels']:.3g} Mpx each on average), {where} vs Pillow (the CPU "
          "path's decode)")
    for key, label in (("full", "full images"),
                       ("decoder", f"{settings['image_size']} px views, decoder alone (both cut "
                                   "on the CPU)"),
                       ("trained", f"{settings['image_size']} px views as trained (decoded and "
                                   f"cut on {result['device']} vs the CPU path)")):
        p = result["pixels"][key]
        print(f"  pixels, {label}: max |diff| {p['max']} levels, mean {p['mean']:.4f}, "
              f"{100 * p['differing']:.2f}% of values differ")
    print(f"  teacher: {result['teacher']}; fp32 (TF32 off), eval mode; logits spread "
          f"{result['logit_std']:.2f} per row")
    logits = result["logits"]
    for key, label in (("decoder", "decoder alone"), ("trained", "views as trained"),
                       ("store", f"store quantisation (top-{settings['topk']} float16 + "
                                 "quantised tail)"),
                       ("tf32", "TF32 convolutions (cuDNN's default; off in the dump) vs fp32")):
        d = logits[key]
        print(f"  |delta logit|, {label}: max {d['max']:.2e}, mean {d['mean']:.2e}, "
              f"row-centred rms {d['centred_rms']:.2e}")
    overwrites = result["overwrites"]
    print("  decode_on_device with reads of freed memory still queued on the caller's stream: "
          + ("not applicable on the CPU" if overwrites is None else
             f"{overwrites} of {HAZARD_TRIALS} trials overwrote them "
             f"({'safe' if overwrites == 0 else 'UNSAFE: training can read corrupted memory'})"))
    below = logits["trained"]["centred_rms"] < logits["store"]["centred_rms"]
    print(f"  decoder difference below the store's quantisation error: "
          f"{'yes' if below else 'no'} (row-centred rms, views as trained: "
          f"{logits['trained']['centred_rms']:.2e} vs {logits['store']['centred_rms']:.2e}; "
          f"max {logits['trained']['max']:.2e} vs {logits['store']['max']:.2e})")
    return [("decoder difference below the store's quantisation error",
             f"{logits['trained']['centred_rms']:.2e} vs {logits['store']['centred_rms']:.2e}",
             below)]


def guarded(title: str, section, *args):
    """section(*args), or None after printing why a child failed (the other parts still run:
    one device session should not be lost to one failure)."""
    start = time.perf_counter()
    try:
        result = section(*args)
    except RuntimeError as error:
        print(f"\n{title}: FAILED, not measured\n  " + str(error)[-3000:].replace("\n", "\n  "))
        return None
    print(f"  ({title}: {time.perf_counter() - start:.0f} s)")
    return result


def child_main(args, settings: dict) -> None:
    mode, what = args.child
    work = Path(args.work)
    if mode == "prepare":
        result = prepare_child(settings, work, args.smoke)
    elif mode == "step":
        result = step_child(what, settings)
    elif mode == "fed":
        result = fed_child(what, settings, work)
    elif mode == "loader":
        result = loader_child(what, settings, work)
    elif mode == "decoder":
        result = decoder_child(settings, work, args.teacher_weights)
    else:
        raise ValueError(f"unknown child mode {mode!r}")
    print(json.dumps(result))


def parse_arguments():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny CPU run of every code path (resnet18, 32 px, a few steps)")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "gpu_check"),
                        help="data, teacher and store are kept here and reused")
    parser.add_argument("--teacher-weights",
                        help="a torchvision resnet50 state_dict (ImageNet head) for part 4")
    for key, value in FULL.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None,
                            help=f"default {value} ({SMOKE[key]} with --smoke)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    defaults = SMOKE if args.smoke else FULL
    settings = {key: getattr(args, key) if getattr(args, key) is not None else value
                for key, value in defaults.items()}
    return args, settings


def main() -> None:
    global JUDGE_GOALS
    args, settings = parse_arguments()
    if args.smoke:
        JUDGE_GOALS = False
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before CUDA starts: every part on the CPU
        # One thread: with other processes on the CPUs, OpenMP spin-waits inflate steps 100-fold.
        torch.set_num_threads(1)
    if args.child:
        torch.manual_seed(0)
        child_main(args, settings)
        return
    if not torch.cuda.is_available() and not args.smoke:
        sys.exit("gpu_check: no CUDA device here. This check measures ResNet-50 training steps "
                 "on a GPU; run it on a CUDA machine, or pass --smoke for a tiny CPU run of the "
                 "same code path (its numbers say nothing about the goals).")
    started = time.perf_counter()
    import torchvision

    device = (torch.cuda.get_device_name() if not args.smoke
              else "CPU (smoke: the numbers say nothing about the goals)")
    print(f"GPU check on {device}, torch {torch.__version__}, torchvision "
          f"{torchvision.__version__}, {load_line()}")
    print(f"student {settings['arch']} at {settings['image_size']} px, batch "
          f"{settings['batch_size']}, {'CPU fp32' if args.smoke else 'bf16, channels_last'}"
          f"; teacher {settings['teacher_arch']}; C = {settings['classes']}, "
          f"top-{settings['topk']} + quantised tail")
    command = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    command += [f"--work={Path(args.work).resolve()}"] + (["--smoke"] if args.smoke else [])
    if args.teacher_weights:
        command.append(f"--teacher-weights={Path(args.teacher_weights).resolve()}")
    memory = "peak GPU memory" if not args.smoke else "peak host RSS"
    info = guarded("data", data_section, settings, command)
    goals = []
    alone = guarded("1. the step alone", step_section, settings, command, memory)
    if alone:
        goals += alone["goals"]
    if info:
        goals += guarded("2. fed training", fed_section, settings, command, memory, alone) or []
        goals += guarded("3. the loader alone", loader_section, settings, command,
                         "the CPU" if args.smoke else "the GPU", alone) or []
        goals += guarded("4. decoder difference", decoder_section, settings, command,
                         args.smoke) or []
    print("\ngoals:")
    for name, figure, met in goals:
        print(f"  {name}: {figure}: {verdict(met)}")
    print(f"total {time.perf_counter() - started:.0f} s; {load_line()} (at the end)")


if __name__ == "__main__":
    main()
