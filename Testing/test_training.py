"""Training from a config (real + synthetic sources), resume, layouts users have, and evaluation metrics."""

import csv
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from AttentionUNetSegLib.engine import normalise_hu
from AttentionUNetSegLib.errors import UserError
from AttentionUNetSegLib.finetune_data import sample_patch
from AttentionUNetSegLib.locations import REPOSITORY
from AttentionUNetSegLib.network import AttentionUNet3D, NetworkConfig
from AttentionUNetSegLib.weights import ModelSpec, bundled_model_path, load_model, save_model
from AttentionUNetSegTools.metrics import NEGATIVE_MARGIN_MM
from AttentionUNetSegTools.synthesis.catalog import labelmap_catalog
from AttentionUNetSegTools.training import loop
from AttentionUNetSegTools.training.config import DataSource, TrainingConfig
from AttentionUNetSegTools.training.data import PancreasFreeCrops, RealCases, SyntheticCases, source_pairs
from AttentionUNetSegTools.training.loop import (
    TrainingClock,
    _learning_rate_factor,
    _loss,
    _update,
    recalibrate_batchnorm,
    train,
)
from AttentionUNetSegTools.training.widen import widen

BUNDLED_CONFIG = REPOSITORY / "AttentionUNetSeg" / "Resources" / "Models" / "pancreas_attention_unet.train.yaml"
GPU_CONFIG = REPOSITORY / "Resources" / "Training" / "gpu.train.yaml"


def tiny_config(data_dir, labelmaps_dir, out, steps):
    return TrainingConfig.from_dict({
        "network": {"feature_scale": 16},
        "patch_size": [32, 32, 32],
        "spacing_mm": [4.0, 4.0, 4.0],
        "batch_size": 1,
        "steps": steps,
        "validate_every": 2,
        "checkpoint_every": 2,
        "warmup_steps": 1,
        "synthetic_pool": 2,
        "negative_fraction": 0.5,
        "batch_dice": True,
        "validation_synthetic": 1,
        "validation_negatives": 1,
        "sources": [
            {"kind": "synthetic", "weight": 0.4, "path": str(labelmaps_dir)},
            {"kind": "pairs", "weight": 0.4,
             "pairs": [[str(data_dir / "ts-abdomen-3mm-crop/ct.nii.gz"),
                        str(data_dir / "ts-abdomen-3mm-crop/pancreas.nii.gz")]]},
            {"kind": "crops", "weight": 0.2,
             "pairs": [[str(data_dir / "ts-abdomen-3mm/ct.nii.gz"), str(data_dir / "ts-abdomen-3mm/pancreas.nii.gz")]]},
        ],
        "validation_pairs": [[str(data_dir / "ts-venous-dicom/dicom"),
                              str(data_dir / "ts-venous-dicom/pancreas.nii.gz")]],
        "output_dir": str(out),
    })


def test_bundled_config_loads_and_unknown_settings_are_refused():
    config = TrainingConfig.load(BUNDLED_CONFIG)
    assert config.network.feature_scale == 8 and {"synthetic", "pairs"} <= {s.kind for s in config.sources}
    gpu = TrainingConfig.load(GPU_CONFIG)  # the one-command GPU recipe: the same data and network
    assert gpu.device == "cuda" and gpu.data_workers > 0 and gpu.network == config.network
    assert [s.kind for s in gpu.sources] == ["synthetic", "pairs", "crops"] and gpu.negative_fraction > 0
    with pytest.raises(UserError, match="unknown training settings"):
        TrainingConfig.from_dict({"learning_rat": 1})


def test_a_short_run_trains_validates_checkpoints_and_resumes(data_dir, labelmaps_dir, tmp_path):
    config = tiny_config(data_dir, labelmaps_dir, tmp_path / "run", steps=2)
    first = load_model(train(config, show_progress=False))
    assert first.spec.training["steps"] == 2 and first.spec.training["real_cases"] == ["ts-abdomen-3mm", "ts-abdomen-3mm-crop"]
    with (tmp_path / "run" / "log.csv").open("a") as log:  # as a run killed after logging step 3 leaves it
        log.write("3,0.5,0.001,99.0,\n")
    config.steps = 4
    train(config, resume=True, show_progress=False)
    rows = list(csv.DictReader((tmp_path / "run" / "log.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]  # resumed at step 3, not from scratch, step 3 once
    assert rows[2]["seconds"] != "99.0"
    losses = [float(r["loss"]) for r in rows]
    assert all(np.isfinite(losses))
    validation = json.loads(rows[-1]["validation"])
    assert {"real:ts-venous-dicom", "mean", "mean_dice"} <= set(validation)
    assert any(k.startswith("synthetic") for k in validation) and any(k.startswith("negative:") for k in validation)
    assert all(0.0 <= v <= 1.0 for v in validation.values())
    for name in ("last.safetensors", "best.safetensors", "curves.png", "config.json", "last.optimizer.pt"):
        assert (tmp_path / "run" / name).is_file()


def test_a_weight_average_is_what_is_saved_and_it_carries_over_a_resume(data_dir, labelmaps_dir, tmp_path,
                                                                         monkeypatch):
    # In fp32: under bf16 autocast (CPUs with AVX-512 BF16) the tiny network's 2^3-voxel bottleneck now and then
    # gets a non-finite weight gradient (2 of 200 batches here; one such batch again: 0 of 100), and one skipped
    # update of the two would leave the average equal to the latest weights.
    monkeypatch.setattr(loop, "autocast_dtype", lambda device: None)
    config = tiny_config(data_dir, labelmaps_dir, tmp_path / "run", steps=2)
    config.weight_average_decay, config.keep_checkpoints = 0.9, True
    assert train(config, show_progress=False) == tmp_path / "run" / "last.average.safetensors"  # what it ends with
    average_before = parameters(tmp_path / "run" / "last.average.safetensors")
    assert any(not torch.equal(average_before[k], v) for k, v in parameters(tmp_path / "run" / "last.safetensors").items())
    config.steps = 3
    train(config, resume=True, show_progress=False)
    latest, average = (parameters(tmp_path / "run" / f) for f in ("last.safetensors", "last.average.safetensors"))
    # One more update blended into the resumed average (or none, if that step's loss was not finite and the
    # update skipped), never an average started afresh from the latest weights.
    blended = all(torch.allclose(v, 0.9 * average_before[k] + 0.1 * latest[k], atol=1e-6) for k, v in average.items())
    kept = all(torch.equal(v, average_before[k]) for k, v in average.items())
    assert blended or kept
    assert any(not torch.equal(v, latest[k]) for k, v in average.items())
    shipped = parameters(tmp_path / "run" / "step-3.safetensors")
    assert all(torch.equal(shipped[k], v) for k, v in average.items())


def test_a_wider_network_starts_with_the_narrow_ones_outputs(abdomen_ct):
    """Widening must not cost what the narrow weights learnt: the same logits and attention on real CT."""
    bundled = load_model(bundled_model_path())
    wide = widen(bundled.network, NetworkConfig(**{**bundled.spec.network.to_dict(), "deep_width": 2}))
    assert wide.config.filters == [8, 16, 64, 128, 256]
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(abdomen_ct)))[40:104, 20:84, 20:84]  # z, y, x around the gland
    x = torch.from_numpy(normalise_hu(ct, bundled.spec.hu_range))[None, None]
    for mode in ("eval", "train"):  # running statistics, then the batch's own
        with torch.no_grad():
            narrow_logits, narrow_alphas = getattr(bundled.network, mode)()(x, return_attention=True)
            wide_logits, wide_alphas = getattr(wide, mode)()(x, return_attention=True)
        # Equal up to float summation order (wider convolutions may pick other kernels).
        torch.testing.assert_close(wide_logits, narrow_logits, atol=1e-4, rtol=1e-5)
        for level, alpha in narrow_alphas.items():
            torch.testing.assert_close(wide_alphas[level], alpha, atol=1e-5, rtol=1e-5)
    assert (narrow_logits.argmax(1) == 1).any()  # a patch where the network sees pancreas


def test_training_widens_its_initial_weights_and_the_new_channels_learn(data_dir, labelmaps_dir, tmp_path):
    narrow_spec = ModelSpec(network=NetworkConfig(feature_scale=16), spacing_mm=(4.0, 4.0, 4.0))
    torch.manual_seed(0)
    save_model(AttentionUNet3D(narrow_spec.network), narrow_spec, tmp_path / "narrow.safetensors")
    config = tiny_config(data_dir, labelmaps_dir, tmp_path / "run", steps=2)
    config.network = NetworkConfig(feature_scale=16, deep_width=2)
    config.init_weights = str(tmp_path / "narrow.safetensors")
    trained = load_model(train(config, show_progress=False)).network.state_dict()
    # decoders[2] reads level 3's skip (16 old channels, then 16 new ones) and level 4: the old outputs'
    # weights on the new channels started at zero and have moved.
    reading_new = trained["decoders.2.conv.0.0.weight"][:16, 16:32]
    assert reading_new.abs().max() > 0
    config.network, config.output_dir = NetworkConfig(feature_scale=32), str(tmp_path / "narrower")
    with pytest.raises(UserError, match="not a narrower one"):
        train(config, show_progress=False)
    assert not (tmp_path / "narrower").exists()  # refused before anything was written


def parameters(path) -> dict[str, torch.Tensor]:
    network = load_model(path).network
    return {name: value.detach() for name, value in network.named_parameters()}


def test_without_the_background_dice_the_pancreas_error_weighs_twice():
    """The background's Dice is about 1 on any CT patch, so with it the Dice term is half the pancreas's error."""
    labels = torch.zeros(1, 1, 16, 16, 16)
    labels[..., 4:12, 4:12, 4:8] = 1  # the gland; the prediction finds half of it
    logits = torch.full((1, 2, 16, 16, 16), -20.0)
    logits[:, 0] = 20.0
    logits[:, 1, 4:12, 4:12, 4:6], logits[:, 0, 4:12, 4:12, 4:6] = 20.0, -20.0
    cross_entropy = torch.nn.functional.cross_entropy(logits, labels[:, 0].long())
    with_background = _loss(batch_dice=True)(logits, labels) - cross_entropy
    pancreas_only = _loss(batch_dice=True, dice_background=False)(logits, labels) - cross_entropy
    assert pancreas_only.item() == pytest.approx(1 - 2 / 3, abs=1e-3)  # Dice of half the gland: 2/3
    assert 0.45 < with_background.item() / pancreas_only.item() < 0.55


def test_a_non_finite_loss_leaves_the_weights_as_they_were():
    """The guard of every training step: a NaN loss (or an inf gradient) must not turn the weights into NaN."""
    torch.manual_seed(0)
    network = AttentionUNet3D(NetworkConfig(feature_scale=16))
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    patch = torch.randn(1, 1, 32, 32, 32)
    before = [p.detach().clone() for p in network.parameters()]

    assert not _update(network, optimizer, scaler, network(patch).mean() * float("nan"))
    assert all(torch.equal(b, p) for b, p in zip(before, network.parameters()))

    assert _update(network, optimizer, scaler, network(patch).mean())
    changed = [not torch.equal(b, p) for b, p in zip(before, network.parameters())]
    assert any(changed) and all(torch.isfinite(p).all() for p in network.parameters())


def test_decathlon_and_nih_layouts(data_dir, tmp_path):
    """A user with MSD Task07 or NIH Pancreas-CT retrains with one command: the layouts are found as they are."""
    ct, label = data_dir / "ts-abdomen-3mm-crop/ct.nii.gz", data_dir / "ts-abdomen-3mm-crop/pancreas.nii.gz"
    msd = tmp_path / "Task07_Pancreas"
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (msd / folder).mkdir(parents=True)
    os.symlink(ct, msd / "imagesTr" / "pancreas_001.nii.gz")
    tumour = sitk.ReadImage(str(label)) * 2  # MSD: 2 = tumour, inside the pancreas
    sitk.WriteImage(tumour, str(msd / "labelsTr" / "pancreas_001.nii.gz"))
    (msd / "imagesTr" / "._pancreas_001.nii.gz").write_bytes(b"macOS resource fork")
    pairs = source_pairs(DataSource(kind="msd", path=str(msd)))
    assert [p[0].name for p in pairs] == ["pancreas_001.nii.gz"]
    cases = RealCases(DataSource(kind="msd", path=str(msd)), (3.0, 3.0, 3.0)).cases
    assert cases[0].pancreas.sum() > 0  # the tumour label counts as pancreas

    nih = tmp_path / "nih"
    (nih / "images").mkdir(parents=True)
    (nih / "labels").mkdir()
    os.symlink(ct, nih / "images" / "PANCREAS_0001.nii.gz")
    os.symlink(label, nih / "labels" / "label0001.nii.gz")
    pairs = source_pairs(DataSource(kind="nih", images=str(nih / "images"), labels=str(nih / "labels")))
    assert [(i.name, lbl.name) for i, lbl in pairs] == [("PANCREAS_0001.nii.gz", "label0001.nii.gz")]
    with pytest.raises(UserError, match="not found"):
        source_pairs(DataSource(kind="msd", path=str(tmp_path / "missing")))


def test_patches_centre_on_the_pancreas_when_asked(data_dir):
    case = RealCases(DataSource(kind="pairs", pairs=[[str(data_dir / "ts-abdomen-3mm/ct.nii.gz"),
                                                       str(data_dir / "ts-abdomen-3mm/pancreas.nii.gz")]]),
                     (3.0, 3.0, 3.0)).cases[0]
    rng = np.random.default_rng(0)
    hits = [sample_patch(case, (32, 32, 32), rng, 1.0)[1].any() for _ in range(10)]
    ct, label = sample_patch(case, (200, 32, 32), rng, 0.0)  # larger than the case: padded with air
    assert all(hits) and ct.shape == label.shape == (200, 32, 32) and (ct[-50:] == -1024).all()


def test_real_negative_crops_hold_no_pancreas_and_lie_below_it(data_dir):
    pair = [str(data_dir / "ts-abdomen-3mm/ct.nii.gz"), str(data_dir / "ts-abdomen-3mm/pancreas.nii.gz")]
    whole = RealCases(DataSource(kind="pairs", pairs=[pair]), (3.0, 3.0, 3.0)).cases[0]
    crops = PancreasFreeCrops(DataSource(kind="crops", pairs=[pair]), (3.0, 3.0, 3.0)).cases
    assert [c.name for c in crops] == ["ct.nii.gz-low"]  # only below the gland is there room (canonical grid: z up)
    crop = crops[0]
    first_gland_row = np.nonzero(whole.pancreas.any(axis=(1, 2)))[0].min()
    rows = crop.ct.shape[0]
    assert not crop.pancreas.any() and np.array_equal(crop.ct, whole.ct[:rows])
    assert not whole.pancreas[:rows].any() and (first_gland_row - rows) * 3.0 >= NEGATIVE_MARGIN_MM


def test_synthetic_cases_from_worker_processes(labelmaps_dir):
    """The GPU path: cases made in worker processes arrive, negatives among them, and the workers stop."""
    entries = [e for e in labelmap_catalog(labelmaps_dir) if e.path.name in ("label0001.nii.gz", "word_0014.nii.gz")]
    pool = SyntheticCases(entries, (4.0, 4.0, 4.0), pool_size=3, seed=0, options={"negative_probability": 0.5},
                          patches_per_case=1, workers=1)
    try:
        rng = np.random.default_rng(0)
        cases = [pool.draw(rng) for _ in range(6)]
        assert all(c.ct.dtype == np.float32 and c.ct.shape == c.pancreas.shape for c in cases)
        assert {c.name for c in pool.pool} <= {"synthetic-abdomen", "synthetic-above-pancreas",
                                                "synthetic-below-pancreas"}
        assert all(c.pancreas.any() == (c.name == "synthetic-abdomen") for c in pool.pool)
    finally:
        pool.close()
    assert not any(p.is_alive() for p in pool.producers)


def test_a_time_limit_cools_the_learning_rate_down_however_fast_the_machine():
    config = TrainingConfig.from_dict({"steps": 1000, "warmup_steps": 10})
    assert _learning_rate_factor(config, 100) > 0.9  # by steps: early
    assert _learning_rate_factor(config, 100, time_fraction=1.0) == pytest.approx(0.02)  # by time: the end
    clock = TrainingClock(limit_seconds=60, spent=30)
    assert 0.49 < clock.fraction() < 0.6 and not clock.expired()
    assert TrainingClock(limit_seconds=60, spent=61).expired() and not TrainingClock(0, 1e9).expired()


def test_batchnorm_recalibration_makes_eval_mode_match_the_batches_seen():
    """Stale running statistics (as after fast training) make eval mode differ; recalibration repairs it."""
    import torch

    torch.manual_seed(0)
    network = AttentionUNet3D(NetworkConfig(feature_scale=16))
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.fill_(3.0)
            module.running_var.fill_(0.01)
    x = torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        in_training_mode = network.train()(x)
        stale = network.eval()(x)
        recalibrate_batchnorm(network, [x])
        recalibrated = network.eval()(x)
    # Left over: only the unbiased variance estimate on the few voxels of the deepest level.
    assert (recalibrated - in_training_mode).abs().max() < 0.05 * (stale - in_training_mode).abs().max()
    assert all(m.momentum == 0.1 for m in network.modules() if isinstance(m, torch.nn.BatchNorm3d))
