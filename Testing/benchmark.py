"""Benchmark (not a test): end-to-end time and peak memory for a 512x512x200 CT, and network throughput
against MONAI's AttentionUnet of equal width, measured in the same process on the same tiles.

    .venv/bin/python Testing/benchmark.py [--threads 2] [--weights FILE]
    .venv/bin/python Testing/benchmark.py --cohort N [--rounds 2]   # cases per hour: segment per CT vs batch
    .venv/bin/python Testing/benchmark.py --panel       # the Slicer panel's path beside the CLI, and a gate switch
    .venv/bin/python Testing/benchmark.py --memory-growth N   # RSS of one Segmenter over N differently sized CTs

The CT is the real 3 mm abdomen case of ../shared/data resampled onto a 512x512x200 grid (same extent),
so the work matches a clinical scan of that size. Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "AttentionUNetSeg"))


def make_clinical_size_ct(folder: Path) -> Path:
    import SimpleITK as sitk

    from AttentionUNetSegLib.locations import shared_data_dir

    source = sitk.ReadImage(str(shared_data_dir() / "ts-abdomen-3mm" / "ct.nii.gz"))
    size = (512, 512, 200)
    extent = [n * s for n, s in zip(source.GetSize(), source.GetSpacing())]
    spacing = [e / n for e, n in zip(extent, size)]
    origin = source.TransformContinuousIndexToPhysicalPoint([-0.5] * 3)
    origin = [o + s / 2 for o, s in zip(origin, spacing)]  # same outer faces as the source
    image = sitk.Resample(source, size, sitk.Transform(), sitk.sitkLinear, origin, spacing,
                          source.GetDirection(), -1024, sitk.sitkInt16)
    path = folder / "ct_512x512x200.nii.gz"
    sitk.WriteImage(image, str(path))
    return path


def benchmark_model(folder: Path, weights: str | None) -> Path:
    """The bundled model, else an untrained one of the bundled configuration (timing does not depend on values)."""
    from AttentionUNetSegLib.network import AttentionUNet3D
    from AttentionUNetSegLib.weights import ModelSpec, bundled_model_path, save_model
    from AttentionUNetSegTools.training.config import TrainingConfig

    if weights:
        return Path(weights)
    if bundled_model_path().is_file():
        return bundled_model_path()
    config = TrainingConfig.load(REPO / "AttentionUNetSeg/Resources/Models/pancreas_attention_unet.train.yaml")
    spec = ModelSpec(network=config.network, spacing_mm=config.spacing_mm, hu_range=config.hu_range,
                     roi_size=config.patch_size, version="benchmark")
    path = folder / "untrained.safetensors"
    save_model(AttentionUNet3D(spec.network), spec, path)
    return path


def end_to_end(ct: Path, model: Path, threads: int, device: str, folder: Path, tta: bool = True) -> dict:
    """The CLI in a fresh process, as a user runs it: read, segment, write segmentation, heatmap and report."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    command = [sys.executable, "-m", "AttentionUNetSegLib.cli", "segment", str(ct), "-o", str(folder / "seg.seg.nrrd"),
               "--attention", str(folder / "attention.nrrd"), "--report", str(folder / "report.json"),
               "--weights", str(model), "--device", device, "--progress", "none", *([] if tta else ["--no-tta"])]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO / "AttentionUNetSeg", check=False)
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if done.returncode:
        raise SystemExit(f"segment failed: {done.stderr.strip()}")
    return {"seconds": round(seconds, 2), "peak_rss_gib": round(max(peak_kib, before) / 2**20, 2),
            "summary": done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""}


def in_process_stages(ct: Path, model: Path, threads: int, device: str) -> dict:
    import torch

    from AttentionUNetSegLib.engine import SegmentationOptions, Segmenter
    from AttentionUNetSegLib.imageio import read_image

    torch.set_num_threads(threads)
    start = time.perf_counter()
    image = read_image(ct)
    read = time.perf_counter() - start
    result = Segmenter(model, SegmentationOptions(device=device, threads=threads)).segment(image)
    return {"read": round(read, 2), **{k: round(v, 2) for k, v in result.timings.items()}}


def throughput(threads: int, tile: int, tiles: int, device: str) -> dict:
    """Voxels per second of our network and MONAI's AttentionUnet (same widths, same tiles, same process)."""
    import torch
    from monai.networks.nets import AttentionUnet

    from AttentionUNetSegLib.engine import autocast_dtype
    from AttentionUNetSegLib.network import AttentionUNet3D
    from AttentionUNetSegTools.training.config import TrainingConfig

    torch.set_num_threads(threads)
    config = TrainingConfig.load(REPO / "AttentionUNetSeg/Resources/Models/pancreas_attention_unet.train.yaml")
    ours = AttentionUNet3D(config.network).eval()
    peer = AttentionUnet(3, 1, 2, channels=config.network.filters, strides=(2, 2, 2, 2)).eval()
    data = torch.rand(tiles, 1, tile, tile, tile, device=device)
    fast = autocast_dtype(torch.device(device))
    results = {}
    for mode, channels_last, dtype in (("fp32", False, None), ("engine mode", True, fast)):
        for name, network in (("ours", ours), ("monai", peer)):
            model = network.to(device).to(memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)
            x = data.to(memory_format=torch.channels_last_3d) if channels_last else data
            with torch.inference_mode(), torch.autocast(device, dtype=dtype, enabled=dtype is not None):
                model(x[:1])  # warm-up
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                for i in range(tiles):
                    model(x[i:i + 1])
                if device == "cuda":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - start
            results[f"{name} {mode} Mvoxel/s"] = round(tiles * tile**3 / seconds / 1e6, 2)
        results[f"ratio ours/monai {mode}"] = round(
            results[f"ours {mode} Mvoxel/s"] / results[f"monai {mode} Mvoxel/s"], 2)
    results["engine mode"] = f"channels-last, autocast {fast}" if fast else "channels-last, fp32"
    return results


PANEL_PARENT = """
import json, resource, sys, time
sys.path[:0] = [{lib!r}, {testing!r}]
import slicer_app
slicer = slicer_app.install()  # the application's namespace and scene
from AttentionUNetSegLib import runner
scene = slicer.mrmlScene
volume = slicer.vtkMRMLScalarVolumeNode()
volume.SetName("CT")
scene.AddNode(volume)
storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
scene.AddNode(storage)
storage.SetFileName({ct!r})
storage.ReadData(volume)  # as Slicer loads a CT: its own pixel type
start = time.perf_counter()
run = runner.SegmentationRun(scene, volume, device={device!r}, weights={model!r}, work_root={work!r})
run.start()
result = run.wait()
seconds = time.perf_counter() - start
parent_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # before the gates below add their nodes
kept = {{name: path.stat().st_size for name, path in result.maps_on_disk.items()}}
switches = {{}}
for name in kept:  # the user picks another gate: its import from the child's file
    start = time.perf_counter()
    result.attention_node(name)
    switches[name] = time.perf_counter() - start
result.discard_files()
print(json.dumps({{"seconds": seconds, "parent_kib": parent_kib,
                  "child_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                  "result": result.summary(), "kept_bytes": sum(kept.values()), "switch_seconds": switches}}))
"""


def panel_path(ct: Path, model: Path, threads: int, device: str, folder: Path) -> dict:
    """The Slicer panel's path outside Slicer, in a fresh process: a volume node in a real slicer-core scene ->
    the child process (all four attention maps) -> the segmentation and the map shown (combined, the panel's
    default) in the scene. Seconds from Apply to the result in the scene; peak RSS of that parent process and
    of its child; then a gate switch: the seconds to import each other map from the child's files, and the
    bytes those files keep on disk until the next run or scene close."""
    if importlib.util.find_spec("slicer_core") is None:  # a lent GPU machine has torch, not slicer-core
        return {"skipped": "slicer-core is not installed in this Python (pip install slicer-core)"}
    work = folder / "panel"
    work.mkdir()
    code = PANEL_PARENT.format(lib=str(REPO / "AttentionUNetSeg"), testing=str(REPO / "Testing"), ct=str(ct),
                               device=device, model=str(model), work=str(work))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"panel path failed: {done.stderr.strip()}")
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    parent, child = measured["parent_kib"] / 2**20, measured["child_kib"] / 2**20
    return {"seconds_four_maps_computed_one_imported": round(measured["seconds"], 2),
            "gate_switch_seconds": {name: round(value, 3) for name, value in measured["switch_seconds"].items()},
            "gate_switch_maps_kept_on_disk_bytes": measured["kept_bytes"],
            "peak_rss_parent_gib": round(parent, 2), "peak_rss_child_gib": round(child, 2),
            "peak_rss_parent_plus_child_gib": round(parent + child, 2), "result": measured["result"]}


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cohort_throughput(copies: int, model: Path, threads: int, folder: Path, rounds: int) -> dict:
    """Cases per hour for ``copies`` of the real 3 mm abdomen CT, each with its segmentation, attention map and
    report: one ``segment`` process per CT, ``batch --engine local`` and ``batch --engine ray``, as users run
    them (start-up included). The three take turns for ``rounds`` rounds, and each one's fastest round counts:
    on a shared machine the others' load only ever slows a round down. The load average is reported too."""
    from AttentionUNetSegLib.locations import shared_data_dir

    source = shared_data_dir() / "ts-abdomen-3mm" / "ct.nii.gz"
    cohort = folder / "cohort"
    for number in range(copies):
        (cohort / f"case{number:03d}").mkdir(parents=True)
        (cohort / f"case{number:03d}" / "ct.nii.gz").symlink_to(source)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    tools = [sys.executable, "-m", "AttentionUNetSegTools.cli"]
    common = ["--weights", str(model), "--device", "cpu", "--progress", "none"]

    def timed(commands: list[list[str]]) -> tuple[float, float]:
        """Wall seconds, and the CPU seconds of the processes run (Ray's daemons are not among them)."""
        start, cpu = time.perf_counter(), _children_cpu_seconds()
        for command in commands:
            done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO, check=False)
            if done.returncode:
                raise SystemExit(f"{command[3]} failed: {done.stderr.strip()}")
        return time.perf_counter() - start, _children_cpu_seconds() - cpu

    def per_ct(case: Path, out: Path) -> list[str]:
        out = out / case.parent.name
        out.mkdir(parents=True)
        return [*tools, "segment", str(case), "-o", str(out / "pancreas.seg.nrrd"), "--attention",
                str(out / "attention.nrrd"), "--report", str(out / "report.json"), *common]

    def batch(engine: str, out: Path) -> list[list[str]]:
        return [[*tools, "batch", str(cohort), "-o", str(out), "--engine", engine, *common]]

    modes = {"segment per CT": lambda out: [per_ct(c, out) for c in sorted(cohort.glob("*/ct.nii.gz"))],
             "batch --engine local": lambda out: batch("local", out),
             "batch --engine ray": lambda out: batch("ray", out)}
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in modes}
    loads = [os.getloadavg()[0]]
    for round_number in range(rounds):
        for index, (name, commands) in enumerate(modes.items()):
            samples[name].append(timed(commands(folder / f"round{round_number}" / str(index))))
            loads.append(os.getloadavg()[0])
    best = {name: min(values) for name, values in samples.items()}
    baseline = best["segment per CT"]
    return {
        "cases": copies,
        "ct": "ts-abdomen-3mm (122x101x112, 3 mm), real",
        **{name: {"seconds_per_round": [round(wall, 1) for wall, _ in samples[name]],
                  "cases_per_hour": round(copies * 3600 / wall),
                  "vs_segment_per_ct": round(baseline[0] / wall, 2),
                  **({"cpu_seconds_per_case": round(cpu / copies, 2)} if "ray" not in name else {})}
           for name, (wall, cpu) in best.items()},
        "load_average_1min_min_max": [round(min(loads), 2), round(max(loads), 2)],
        "cpu_cores": os.cpu_count(),
    }


def varied_ct(source, size: tuple[int, int, int]):
    """The real CT resampled onto ``size`` voxels over its whole extent and stored at the model's 3 mm: the
    model grid then has that size, anatomy stretched or squeezed (memory depends on the shape, not the values)."""
    import SimpleITK as sitk

    spacing = [e * s / n for e, s, n in zip(source.GetSize(), source.GetSpacing(), size)]
    image = sitk.Resample(source, size, sitk.Transform(), sitk.sitkLinear, source.GetOrigin(), spacing,
                          source.GetDirection(), -1024, sitk.sitkInt16)
    image.SetSpacing((3.0, 3.0, 3.0))
    return image


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def memory_growth(count: int, model: Path, threads: int, device: str) -> dict:
    """Resident memory of one long-lived ``Segmenter`` (as in ``batch`` and ``serve``) after each of ``count``
    CTs of different sizes (60-200 voxels per axis, seeded), with the result and the CT dropped: what the
    process keeps. A bounded process levels off; the growth from the 5th CT to the last says whether it does."""
    import numpy as np
    import SimpleITK as sitk

    from AttentionUNetSegLib.engine import SegmentationOptions, Segmenter
    from AttentionUNetSegLib.locations import shared_data_dir

    source = sitk.ReadImage(str(shared_data_dir() / "ts-abdomen-3mm" / "ct.nii.gz"))
    segmenter = Segmenter(model, SegmentationOptions(device=device, threads=threads))
    sizes = np.random.default_rng(0).integers(60, 201, size=(count, 3))
    curve = []
    start = time.perf_counter()
    for number, size in enumerate(sizes, 1):
        segmenter.segment(varied_ct(source, tuple(int(n) for n in size)))  # the result is dropped at once
        curve.append(round(_rss_mb()))
        print(f"CT {number}/{count} {'x'.join(map(str, size))}: RSS {curve[-1]} MB", file=sys.stderr, flush=True)
    return {"cts": count, "sizes": "60-200 voxels per axis at 3 mm (seed 0)", "threads": threads,
            "seconds": round(time.perf_counter() - start), "rss_mb": curve,
            "growth_mb_5th_to_last": curve[-1] - curve[min(4, count - 1)]}


def finetune_budget(cases: int, minutes: float, threads: int, device: str, folder: Path, weights: str | None) -> dict:
    """``attention-unet-seg finetune`` on ``cases`` labelled CTs of the 512x512x200 class (the real abdomen and
    its pancreas label resampled onto that grid, each case another range of its slices) within ``minutes``, as
    users run it: how far it got, and whether the whole process kept to the budget."""
    import SimpleITK as sitk

    from AttentionUNetSegLib.locations import shared_data_dir

    ct = sitk.ReadImage(str(make_clinical_size_ct(folder)))
    label = sitk.Resample(sitk.ReadImage(str(shared_data_dir() / "ts-abdomen-3mm" / "pancreas.nii.gz")), ct,
                          sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    slices = ct.GetSize()[2] - 2 * (cases - 1)
    for number in range(cases):
        case = folder / "cases" / f"case{number}"
        case.mkdir(parents=True)
        for image, name in ((ct, "ct.nii.gz"), (label, "label.nii.gz")):
            sitk.WriteImage(image[:, :, 2 * number: 2 * number + slices], str(case / name), True)
    command = [sys.executable, "-m", "AttentionUNetSegTools.cli", "finetune", str(folder / "cases"), "--output-dir",
               str(folder / "finetuned"), "--minutes", str(minutes), "--device", device, "--threads", str(threads),
               "--progress", "none", *(["--weights", weights] if weights else [])]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=False)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"finetune failed: {done.stderr.strip()}")
    card = json.loads((folder / "finetuned" / "finetune.json").read_text())
    return {"cases": cases, "ct": f"512x512x{slices} int16 (real abdomen resampled)", "threads": threads,
            "device": card["device"], "budget_minutes": minutes, "process_minutes": round(seconds / 60, 2),
            "within_budget": seconds <= minutes * 60, "steps_done": card["steps_done"],
            "planned_steps": card["planned_steps"], "steps_for_the_cases": card["steps_wanted"],
            "seconds_per_step_all_in": round(card["minutes"] * 60 / max(card["steps_done"], 1), 1),
            "held_out": card["held_out"], "dice_before": card["dice_before"], "dice_after": card["dice_after"],
            "load_average_1min_before_after": [round(load, 2), round(os.getloadavg()[0], 2)],
            "summary": done.stdout.strip().splitlines()[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--weights")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tile", type=int, default=96)
    parser.add_argument("--tiles", type=int, default=4)
    parser.add_argument("--cohort", type=int, metavar="N", help="only the cohort benchmark, on N copies of a CT")
    parser.add_argument("--rounds", type=int, default=2, help="cohort benchmark: rounds (the fastest counts)")
    parser.add_argument("--panel", action="store_true", help="only the Slicer panel's path, and the CLI beside it")
    parser.add_argument("--memory-growth", type=int, metavar="N", help="only RSS over N differently sized CTs")
    parser.add_argument("--finetune", type=int, metavar="N", help="only fine-tuning on N 512x512x200-class cases")
    parser.add_argument("--minutes", type=float, default=5.0, help="fine-tuning benchmark: the budget")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.cohort:
            model = benchmark_model(folder, args.weights)
            print(json.dumps(cohort_throughput(args.cohort, model, args.threads, folder, args.rounds), indent=2))
            return
        if args.finetune:
            print(json.dumps(finetune_budget(args.finetune, args.minutes, args.threads, args.device, folder,
                                             args.weights), indent=2))
            return
        if args.memory_growth:
            model = benchmark_model(folder, args.weights)
            print(json.dumps(memory_growth(args.memory_growth, model, args.threads, args.device), indent=2))
            return
        ct = make_clinical_size_ct(folder)
        model = benchmark_model(folder, args.weights)
        if args.panel:
            print(json.dumps({"input": "512x512x200 CT (real abdomen resampled)", "model": model.name,
                              "end_to_end_cli": end_to_end(ct, model, args.threads, args.device, folder),
                              "panel_path": panel_path(ct, model, args.threads, args.device, folder)}, indent=2))
            return
        report = {
            "input": "512x512x200 CT (real abdomen resampled)",
            "model": str(model.name),
            "threads": args.threads,
            "device": args.device,
            "end_to_end_cli": end_to_end(ct, model, args.threads, args.device, folder),
            "end_to_end_cli_no_tta": end_to_end(ct, model, args.threads, args.device, folder, tta=False),
            "panel_path": panel_path(ct, model, args.threads, args.device, folder),
            "stages_in_process_s": in_process_stages(ct, model, args.threads, args.device),
            f"network_throughput_{args.tile}^3": throughput(args.threads, args.tile, args.tiles, args.device),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
