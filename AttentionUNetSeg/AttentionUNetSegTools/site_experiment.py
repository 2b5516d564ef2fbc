"""The model card's site experiment: fine-tune the bundled model on 1, 3 and 5 patients of one synthetic
scanner and protocol, and measure what it gains there and what it forgets elsewhere.

The site (``synthesis/site.py``, :data:`SITE`): one fixed random contrast, 5 mm slices stored as they are, one
kernel, noise level and field of view. Patients: only those the bundled model's split held out (never one it
was trained on). The whole-abdomen ones are shuffled with :data:`EXPERIMENT_SEED`: the first 5 are the fine-tune
patients, the others the site's test patients, each with its own gland; more test scans, up to ``--test``,
swap a held-out pancreas-only patient's gland into one of those test abdomens (the generator's swap), so that
every test scan has a gland of its own and no test abdomen is a fine-tune one.

Stages, each kept in RUN_DIR (a rerun skips what is done and resumes a stopped fine-tune):

1. the site's scans (NIfTI, CASE/ct.nii.gz + CASE/label.nii.gz), and the standard evaluation set (``evaluate
   --synthetic 15 --negatives 6``: the real cases, their crops without a pancreas, held-out synthetic scans of
   every phase and synthetic negatives) cached once;
2. ``attention-unet-seg finetune`` (the command, synthetic anti-forgetting patches included, as a user gets it)
   from the bundled weights on the first 1, 3 and 5 fine-tune patients, each with the same ``--minutes``; with
   ``--real`` also on the one real trained-on patient (``ts-abdomen-3mm``);
3. every model scored by the engine as users run it (TTA, the default) on the site's test scans and on the
   standard set (``evaluation.evaluate``: tables per model and set);
4. the table (``site_experiment.md``, ``results.json``).

``--probe SEED...`` instead scores the bundled model on 4 of the fine-tune patients at each contrast seed (how
the site was chosen: where the bundled model is weak; the test patients play no part in the choice).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from AttentionUNetSegLib.errors import UserError

from .synthesis.site import SiteProtocol

# Chosen by ``--probe 3 5 6 7 8 9 10 12 13`` (the bundled model, TTA, on 4 fine-tune patients; mean Dice 0.01,
# 0.65, 0.24, 0.63, 0.00, 0.58, 0.30, 0.63, 0.00): seed 10 is weak (0.30) while the gland stays brighter than
# the fat around it, as in real CT; seeds 3, 8 and 13 (bright fat or a gland darker than everything but fat)
# fail outright on contrasts no CT has.
SITE = SiteProtocol("5mm-random-contrast", contrast_seed=10)
EXPERIMENT_SEED = 21
FINETUNE_PATIENTS = 5
SIZES = (1, 3, 5)
REAL_CASE = "ts-abdomen-3mm"  # the one real patient with a whole gland (the bundled model trained on it too)
BUNDLED = "bundled"
SITE_SET, STANDARD_SET = "site", "standard"
DEFAULT_RUN_DIR = Path.home() / ".cache" / "attention-unet-seg" / "site-experiment"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR,
                        help="where the scans, fine-tuned weights, scores and table go (default: %(default)s)")
    parser.add_argument("--minutes", type=float, default=6.0, help="each fine-tune's budget (default: 6)")
    parser.add_argument("--test", type=int, default=12, help="the site's test scans (default: 12)")
    parser.add_argument("--synthetic", type=int, default=15, help="standard set: held-out synthetic scans (15)")
    parser.add_argument("--negatives", type=int, default=6, help="standard set: synthetic negatives (6)")
    parser.add_argument("--real", action=argparse.BooleanOptionalAction, default=True,
                        help=f"also fine-tune on the real {REAL_CASE} and score it (default: on)")
    parser.add_argument("--probe", type=int, nargs="+", metavar="SEED",
                        help="only score the bundled model at these contrast seeds on 4 fine-tune patients")


def run(args: argparse.Namespace) -> int:
    run_dir = args.run_dir.expanduser()
    if args.probe:
        return probe(args.probe, run_dir / "probe")
    plan = make_plan(args.test)
    check_plan(run_dir, plan, args)
    began = time.monotonic()
    say(SITE.describe())
    site_cases = write_site_scans(plan, run_dir / "scans")
    standard = cache_standard_set(run_dir / "standard", args.synthetic, args.negatives)
    models = {BUNDLED: None}
    for size in SIZES:
        models[f"site-{size}"] = finetune_model(f"site-{size}", site_csv(run_dir, plan, size), run_dir, args.minutes)
    if args.real and real_case_csv(run_dir):
        models[f"real-{REAL_CASE}"] = finetune_model(f"real-{REAL_CASE}", real_case_csv(run_dir), run_dir,
                                                     args.minutes)
    for name, weights in models.items():
        sets = {STANDARD_SET: standard} if name.startswith("real-") else {SITE_SET: site_cases, STANDARD_SET: standard}
        for set_name, cases in sets.items():
            score(name, weights, set_name, cases, run_dir)
    text = report(run_dir, plan, models, args)
    (run_dir / "site_experiment.md").write_text(text)
    print(text, flush=True)
    say(f"done in {(time.monotonic() - began) / 60:.1f} min (this call); written: {run_dir / 'site_experiment.md'}")
    return 0


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


# --- the plan: which held-out patients, which glands -------------------------------------------------------


def make_plan(test_count: int) -> dict:
    """Fine-tune and test patients of the held-out split (seeded), and which gland each test scan has."""
    from .synthesis.catalog import held_out_label_maps

    held_out = held_out_label_maps()
    hosts = sorted((e for e in held_out if not e.pancreas_only), key=lambda e: e.patient)
    donors = sorted((e for e in held_out if e.pancreas_only), key=lambda e: e.patient)
    rng = np.random.default_rng(EXPERIMENT_SEED)
    hosts = [hosts[i] for i in rng.permutation(len(hosts))]
    shapes = SITE.generator(hosts + donors)  # the generator swaps in only glands it finds plausible
    donors = [d for d in (donors[i] for i in rng.permutation(len(donors))) if shapes.donor_pancreas(d) is not None]
    finetune, test_hosts = hosts[:FINETUNE_PATIENTS], hosts[FINETUNE_PATIENTS:]
    if len(test_hosts) < 1 or test_count > len(test_hosts) + len(donors):
        raise UserError(f"{test_count} test scans need more held-out patients", f"{len(test_hosts)} abdomens and "
                        f"{len(donors)} glands are left after the fine-tune patients", "ask for fewer --test")
    test = [{"host": h.patient, "gland": h.patient} for h in test_hosts[:test_count]]
    for index, donor in enumerate(donors[:max(test_count - len(test_hosts), 0)]):
        test.append({"host": test_hosts[index % len(test_hosts)].patient, "gland": donor.patient})
    return {"site": dataclasses.asdict(SITE), "seed": EXPERIMENT_SEED,
            "finetune": [{"host": e.patient, "gland": e.patient} for e in finetune], "test": test}


def check_plan(run_dir: Path, plan: dict, args: argparse.Namespace) -> None:
    """A run folder holds one plan: other patients, site or budget would mix results of two experiments."""
    saved = run_dir / "plan.json"
    recorded = {**plan, "minutes": args.minutes, "standard": [args.synthetic, args.negatives]}
    if saved.is_file() and json.loads(saved.read_text()) != json.loads(json.dumps(recorded)):
        raise UserError(f"{run_dir} holds a site experiment with another plan (site, patients or budget)",
                        "its fine-tunes and scores would be mixed with this one's",
                        "choose another --run-dir, or remove that one")
    run_dir.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(recorded, indent=1))


# --- scans -------------------------------------------------------------------------------------------------


def site_scan(site: SiteProtocol, host, gland, seed: list[int]):
    """One synthetic scan of ``site``: ``host``'s abdomen with its own gland (``gland`` None) or ``gland``'s
    swapped in; the whole gland in view. Deterministic in ``seed``."""
    entries = [host] if gland is None else [host, gland]
    generator = site.generator(entries, swap_probability=0.0 if gland is None else 1.0,
                               cut_pancreas_probability=0.0)
    for attempt in range(40):  # the swap draws its donor among the entries (the host too) and may not fit
        case = generator.sample_case(np.random.default_rng([*seed, attempt]), view="abdomen")
        if gland is None or case.pancreas_source.patient == gland.patient:
            return case
    raise RuntimeError(f"{gland.patient}'s gland did not fit {host.patient} in 40 tries")


def write_site_scans(plan: dict, folder: Path) -> list:
    """The site's fine-tune and test scans as case folders (the fine-tune naming rule); the test cases."""
    from .evaluation import Case
    from .synthesis.catalog import held_out_label_maps

    by_patient = {e.patient: e for e in held_out_label_maps()}
    test_cases = []
    for role in ("finetune", "test"):
        for index, item in enumerate(plan[role]):
            name = scan_name(role, index, item)
            case_dir = folder / role / name
            if not (case_dir / "label.nii.gz").is_file():
                own = item["gland"] == item["host"]
                scan = site_scan(SITE, by_patient[item["host"]], None if own else by_patient[item["gland"]],
                                 [EXPERIMENT_SEED, int(role == "test"), index])
                case_dir.mkdir(parents=True, exist_ok=True)
                _write(scan.image.round().astype(np.int16), SITE.spacing_mm, case_dir / "ct.nii.gz")
                _write(scan.pancreas, SITE.spacing_mm, case_dir / "label.nii.gz")
                say(f"wrote {role} scan {name}: {scan.pancreas.sum() * np.prod(SITE.spacing_mm) / 1000:.0f} mL gland, "
                    f"{scan.image.shape[::-1]} voxels")
            if role == "test":
                test_cases.append(Case(name, _file_loader(case_dir), "manual", "synthetic/site", SITE.name,
                                       "abdomen", item["host"]))
    return test_cases


def scan_name(role: str, index: int, item: dict) -> str:
    gland = "" if item["gland"] == item["host"] else f"-gland-{item['gland']}"
    return f"{role}-{index + 1}-{item['host']}{gland}"


def _write(array: np.ndarray, spacing, path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing))
    sitk.WriteImage(image, str(path), useCompression=True)


def _file_loader(case_dir: Path):
    def load():
        image = sitk.ReadImage(str(case_dir / "ct.nii.gz"))
        label = case_dir / "label.nii.gz"
        return image, (sitk.GetArrayFromImage(sitk.ReadImage(str(label))) > 0) if label.is_file() else None
    return load


def cache_standard_set(folder: Path, synthetic: int, negatives: int) -> list:
    """The model card's evaluation cases (``evaluation.evaluation_cases``), made once and kept as NIfTI."""
    from .evaluation import Case, evaluation_cases

    manifest_path = folder / "cases.json"
    if not manifest_path.is_file():
        from AttentionUNetSegLib.weights import bundled_model_path, read_spec

        spacing = read_spec(bundled_model_path()).spacing_mm
        manifest = []
        for index, case in enumerate(evaluation_cases(synthetic, negatives, spacing_mm=spacing)):
            image, reference = case.load()
            case_dir = folder / f"{index:02d}-{case.name}"
            case_dir.mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(image, str(case_dir / "ct.nii.gz"), useCompression=True)
            if reference is not None:
                label = sitk.GetImageFromArray(reference.astype(np.uint8))
                label.CopyInformation(image)
                sitk.WriteImage(label, str(case_dir / "label.nii.gz"), useCompression=True)
            manifest.append({**{k: getattr(case, k) for k in ("name", "labels", "source", "phase", "view",
                                                              "patient")}, "folder": case_dir.name})
        manifest_path.write_text(json.dumps(manifest, indent=1))
        say(f"standard set: {len(manifest)} cases cached in {folder}")
    manifest = json.loads(manifest_path.read_text())
    return [Case(m["name"], _file_loader(folder / m["folder"]), m["labels"], m["source"], m["phase"], m["view"],
                 m["patient"]) for m in manifest]


# --- fine-tunes ------------------------------------------------------------------------------------------


def site_csv(run_dir: Path, plan: dict, size: int) -> Path:
    """The first ``size`` fine-tune patients (finetune holds the last out from 3 cases on)."""
    rows = [scan_name("finetune", i, item) for i, item in enumerate(plan["finetune"][:size])]
    return _csv(run_dir / f"site-{size}.csv", [(name, Path("scans") / "finetune" / name) for name in rows])


def real_case_csv(run_dir: Path) -> Path | None:
    from AttentionUNetSegLib.locations import shared_data_dir

    folder = shared_data_dir() / REAL_CASE
    if not (folder / "ct.nii.gz").is_file():
        return None
    return _csv(run_dir / f"real-{REAL_CASE}.csv", [(REAL_CASE, folder)], label="pancreas.nii.gz")


def _csv(path: Path, cases: list[tuple[str, Path]], label: str = "label.nii.gz") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["case", "ct", "label"])
        for name, folder in cases:
            writer.writerow([name, folder / "ct.nii.gz", folder / label])
    return path


def finetune_model(name: str, cases_csv: Path, run_dir: Path, minutes: float) -> Path:
    """``attention-unet-seg finetune`` into RUN_DIR/models/NAME, unless it finished there already (a stopped
    one resumes: the command's own checkpoint)."""
    from AttentionUNetSegLib.finetune import CARD_FILE, MODEL_FILE

    output = run_dir / "models" / name
    card = output / CARD_FILE
    if card.is_file() and json.loads(card.read_text()).get("status") in ("done", "time"):
        return output / MODEL_FILE
    command = [sys.executable, "-m", "AttentionUNetSegTools.cli", "finetune", str(cases_csv), "--output-dir",
               str(output), "--minutes", f"{minutes:g}", "--progress", "lines"]
    say(f"fine-tuning {name}: {' '.join(command[2:])}")
    log = run_dir / "models" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as stream:
        code = subprocess.run(command, check=False, stdout=stream, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise UserError(f"fine-tune {name} failed (exit {code})", f"see {log}", "fix the cause and run again")
    say(f"fine-tuned {name}: " + log.read_text().strip().splitlines()[-1])
    return output / MODEL_FILE


# --- scores ----------------------------------------------------------------------------------------------


def score(name: str, weights: Path | None, set_name: str, cases: list, run_dir: Path) -> None:
    """``evaluation.evaluate`` of the weights on the set, TTA on (the default), unless done with these weights."""
    from AttentionUNetSegLib.engine import SegmentationOptions, Segmenter
    from AttentionUNetSegLib.weights import bundled_model_path

    from .evaluation import evaluate

    weights = weights or bundled_model_path()
    folder = run_dir / "scores" / name / set_name
    key = f"{_sha256(weights)} {[c.name for c in cases]}"
    marker = folder / "scored"
    if marker.is_file() and marker.read_text() == key:
        return
    clock = time.monotonic()
    evaluate(Segmenter(weights, SegmentationOptions()), cases, folder)
    marker.write_text(key)
    say(f"scored {name} on the {set_name} set ({len(cases)} cases) in {(time.monotonic() - clock) / 60:.1f} min")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_scores(run_dir: Path, name: str, set_name: str) -> list[dict]:
    path = run_dir / "scores" / name / set_name / "evaluation.csv"
    return [r for r in csv.DictReader(path.open()) if r["view"]] if path.is_file() else []  # not the mean row


# --- the table -------------------------------------------------------------------------------------------


def report(run_dir: Path, plan: dict, models: dict, args: argparse.Namespace) -> str:
    rows, results = [], {}
    for name, weights in models.items():
        result = summarise(run_dir, name, weights)
        results[name] = result
        rows.append(table_row(name, result))
    (run_dir / "results.json").write_text(json.dumps({"plan": plan, "models": results}, indent=1))
    header = ["model", "trained on", "site Dice mean (min)", "site verdicts ok/check/not found",
              "standard synthetic Dice (15)", "standard verdicts ok/check/not found", "real: unseen venous tail / trained-on 3 mm / its crop",
              "negatives: mL mean/max, not found", "fine-tune: min, steps kept/done (planned)"]
    lines = [f"# Site experiment ({SITE.describe()})", "",
             f"Fine-tune patients: {', '.join(p['host'] for p in plan['finetune'])}; site test scans "
             f"({len(plan['test'])}): " + ", ".join(p["host"] if p["host"] == p["gland"] else
                                                    f"{p['host']} with {p['gland']}'s gland" for p in plan["test"])
             + f"; each fine-tune --minutes {args.minutes:g}.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header), *rows, ""]
    return "\n".join(lines)


def summarise(run_dir: Path, name: str, weights: Path | None) -> dict:
    site, standard = read_scores(run_dir, name, SITE_SET), read_scores(run_dir, name, STANDARD_SET)
    result = {
        "site_dice": dices(site),
        "site_verdicts": _verdicts(site),
        "standard_synthetic_dice": dices([r for r in standard if r["source"] != "real"]),
        "standard_verdicts": _verdicts(standard),
        "real_dice": {r["case"]: float(r["dice"]) for r in standard if r["source"] == "real" and r["view"] == "abdomen"},
        "negatives_ml": [float(r["false_positive_ml"]) for r in standard if r["view"] != "abdomen"],
        "negatives_not_found": sum(r["qc"] == "not found" for r in standard if r["view"] != "abdomen"),
        "per_phase": {},
    }
    for row in standard:
        if row["source"] != "real" and row["view"] == "abdomen":
            result["per_phase"].setdefault(row["phase"], []).append(float(row["dice"]))
    if weights is not None:
        card = json.loads((weights.parent / "finetune.json").read_text())
        result["finetune"] = {k: card[k] for k in ("cases", "held_out", "dice_before", "dice_after", "steps",
                                                   "steps_done", "planned_steps", "steps_wanted", "minutes",
                                                   "status", "device", "runs")}
    return result


def dices(rows: list[dict]) -> list[float]:
    return [float(r["dice"]) for r in rows if r["view"] == "abdomen"]


def _verdicts(rows: list[dict]) -> dict[str, int]:
    counts = {"ok": 0, "check": 0, "not found": 0}
    for row in rows:
        counts["not found" if row["qc"] == "not found" else "ok" if row["qc"] == "ok" else "check"] += 1
    return counts


def table_row(name: str, result: dict) -> str:
    def mean(values):
        return f"{np.mean(values):.2f}" if values else "-"

    site = result["site_dice"]
    site_text = f"{mean(site)} ({min(site):.2f})" if site else "-"
    verdicts = "/".join(str(result["site_verdicts"][k]) for k in ("ok", "check", "not found")) if site else "-"
    real = result["real_dice"]
    real_text = " / ".join(f"{real[c]:.2f}" if c in real else "-"
                           for c in ("ts-venous-dicom", "ts-abdomen-3mm", "ts-abdomen-3mm-crop"))
    found = result["negatives_ml"]
    negatives = (f"{np.mean(found):.1f}/{max(found):.1f}, {result['negatives_not_found']} of {len(found)}"
                 if found else "-")
    tune = result.get("finetune")
    if tune:
        trained = (f"{len(tune['cases'])} case(s)" + (f" + {tune['held_out']} held out" if tune["held_out"] else ""))
        budget = f"{tune['minutes']:.1f}, {tune['steps']}/{tune['steps_done']} ({tune['planned_steps']})"
    else:
        trained, budget = "-", "-"
    standard = "/".join(str(result["standard_verdicts"][k]) for k in ("ok", "check", "not found"))
    return "| " + " | ".join([name, trained, site_text, verdicts, mean(result["standard_synthetic_dice"]), standard,
                              real_text, negatives, budget]) + " |"


# --- choosing the site -----------------------------------------------------------------------------------


def probe(seeds: list[int], folder: Path, patients: int = 4) -> int:
    """The bundled model (TTA) on ``patients`` fine-tune patients of the site at each contrast seed."""
    from AttentionUNetSegLib.engine import SegmentationOptions, Segmenter

    from .metrics import dice
    from .synthesis.catalog import held_out_label_maps

    by_patient = {e.patient: e for e in held_out_label_maps()}
    plan = make_plan(0)
    segmenter = Segmenter(None, SegmentationOptions())
    lines = []
    for seed in seeds:
        site = dataclasses.replace(SITE, contrast_seed=seed)
        scores = []
        for index, item in enumerate(plan["finetune"][:patients]):
            scan = site_scan(site, by_patient[item["host"]], None, [EXPERIMENT_SEED, 0, index])
            image = sitk.GetImageFromArray(scan.image)
            image.SetSpacing(site.spacing_mm)
            result = segmenter.segment(image, maps=())
            scores.append((round(dice(sitk.GetArrayViewFromImage(result.mask) > 0, scan.pancreas), 3),
                           result.verdict.qc))
        mean = float(np.mean([s[0] for s in scores]))
        lines.append(f"seed {seed}: mean Dice {mean:.3f} {scores}  ({site.describe()})")
        say(lines[-1])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "probe.txt").open("a").write("\n".join(lines) + "\n")
    return 0
