"""The early-exit runtime against stage two's simulation, end to end on tiny random timm models: a class-folder tree
of PNGs -> extract.run -> heads.sweep.sweep (two lambdas) -> EarlyExitModel on the same test images. Its exits and
predictions must be those the sweep's evaluation computed from the cache, whatever the batch; `predict` prints
them for image files."""
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import extract  # noqa: F401  (before timm: see extract/_torchvision.py)
import timm
from cache.store import open_cache
from extract.datasets import DEFAULT_DATA_DIRS, DataSettings, load_splits
from extract.run import ExtractSettings, run_extraction
from heads.results import rundir
from heads.evaluation.evaluate import calibrate, predict_with_sets
from heads.model.exits import exit_decision, exit_distribution
from deploy.predict import predict_cmd
from deploy.runtime import (EarlyExitModel, RuntimeSettings, backbone_from_manifest, data_settings, image_batch,
                           select_trial, trial_heads, v2_outputs)
from heads.sweep.lambdas import SweepSettings
from heads.sweep.sweep import run_sweep
from heads.train.bilevel import TrainSettings

K = 3
PER_CLASS = 80        # imagefolder without val/: test 1/6, val 1/12 of the images (V2: 10 rows)
LAMBDAS = (0.02, 2.0)
THRESHOLDS = (0.5, 0.65, 0.8)   # the sweep records its selected models at the last two as well
ALPHA = 0.2                     # V2 has 10 rows: at alpha 0.05 every conformal set would be all classes
TRAIN = TrainSettings(max_epochs=5, warmup_epochs=1, batch_size=16, bi_switch=3, patience=3, device="cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """3 classes of 12x10 PNGs, each class a colour plus noise, so that some samples are easy (early exits)."""
    root = tmp_path_factory.mktemp("runtime")
    rng = np.random.default_rng(0)
    for c in range(K):
        folder = root / "data" / "train" / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(PER_CLASS):
            tint = np.zeros(3)
            tint[c] = rng.uniform(0, 120)
            pixels = np.clip(rng.normal(110, 50, (10, 12, 3)) + tint, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    torch.manual_seed(1)
    torch.save(timm.create_model("test_vit", num_classes=K, img_size=32).state_dict(), root / "vit.pth")
    return root


# test_vit with a K-class checkpoint: the backbone's head is the task's (cached logits, exit L = own head).
# test_efficientnet at random init: the head is not the task's (stage two trains a last IM); CNN feature maps.
BACKBONES = {"vit": ("test_vit", "vit.pth"), "effnet": ("test_efficientnet", None)}


@pytest.fixture(scope="module", params=sorted(BACKBONES))
def run(request, tree):
    name, weights = BACKBONES[request.param]
    cache = tree / f"{request.param}.zarr"
    run_extraction(ExtractSettings(backbone=name, dataset="imagefolder", data_dir=str(tree / "data"),
                                   weights=str(tree / weights) if weights else None, img_size=32, batch_size=8,
                                   chunk_rows=8, device="cpu", out=str(cache), progress=False))
    result = run_sweep(cache, SweepSettings(LAMBDAS, thresholds=THRESHOLDS[1:]), TRAIN, tree / f"run-{request.param}",
                       progress=False)
    return result.path, cache


def simulated(cache_path, heads, threshold):
    """What stage two computes for the test split (heads.sweep.session.Session.outputs + exit_decision): the exits and
    the exited logits, and the labels."""
    with open_cache(cache_path) as cache:
        test = cache.load_split("test")
    last = None if heads.trains_last else test.logits
    logits, g = heads.outputs(test.features, last)
    exits = exit_decision(exit_distribution(g), threshold)[0]
    return exits, logits[0][torch.arange(len(exits)), exits], test.labels


def assert_same_as_simulation(model, images, cache, heads, threshold):
    """Exits and predictions identical; probabilities and conformal sets those of the simulated exited logits."""
    sim_exit, sim_logits, labels = simulated(cache, heads, threshold)
    out = model(images)
    assert torch.equal(out.exit_index, sim_exit)
    assert torch.equal(out.prediction, sim_logits.argmax(-1))
    _, probs, sets = predict_with_sets(sim_logits.numpy(), sim_exit.numpy(), model.calibration)
    assert torch.equal(out.sets, torch.from_numpy(sets))
    assert torch.allclose(out.probs, torch.from_numpy(probs))
    return out, labels


@pytest.fixture(scope="module")
def models(run, tree):
    """{gate threshold: EarlyExitModel for each lambda} and the test split's images exactly as the extraction
    fed them to the backbone."""
    run_dir, _ = run
    first = EarlyExitModel.from_run(run_dir, LAMBDAS[0])     # rebuilds the backbone from the cache manifest
    out = {(lam, thr): EarlyExitModel.from_run(run_dir, lam, backbone=first.backbone,
                                               settings=RuntimeSettings(threshold=thr, alpha=ALPHA))
           for lam in LAMBDAS for thr in THRESHOLDS}
    manifest = first.manifest
    splits = load_splits(data_settings(manifest, tree / "data"))
    assert splits.describe()["split_hash"] == manifest["dataset"]["split_hash"]
    return out, torch.stack([splits.test[i][0] for i in range(len(splits.test))])


def test_trained_runs_equal_their_evaluation(run, models):
    """Every selected model of the run, at 0.5 and at the sweep's other gate thresholds: the runtime's exits and
    predictions are the simulation's, and reproduce the run's recorded exit histogram and accuracy."""
    run_dir, cache = run
    rows, _ = rundir.read_results(run_dir)
    by_setting, images = models
    for (lam, threshold), model in by_setting.items():
        assert model.run_row["lam"] == lam
        heads = trial_heads(run_dir, model.run_row["trial"])
        out, labels = assert_same_as_simulation(model, images, cache, heads, threshold)
        row = next(r for r in rows if r["split"] == "test" and r["trial"] == model.run_row["trial"]
                   and r["threshold"] == threshold)   # method "jei" at 0.5, "jei-threshold" otherwise
        assert np.bincount(out.exit_index.numpy(), minlength=model.num_exits).tolist() == row["exit_hist"]
        assert (out.prediction == labels).double().mean().item() == pytest.approx(row["accuracy"])
        assert model.calibration.temperature == pytest.approx(row["temperature"])


def test_spread_exits_equal_simulation(run, models):
    """Gates set by hand to split the samples over most exits (g^l = sigmoid(20 (max prob_l - its median))), so
    that samples leave the batch at several depths and the state is cut down several times."""
    run_dir, cache = run
    by_setting, images = models
    heads = trial_heads(run_dir, by_setting[LAMBDAS[0], 0.5].run_row["trial"])
    with open_cache(cache) as c:
        test = c.load_split("test")
        logits, _ = heads.outputs(test.features, None if heads.trains_last else test.logits)
        confidence = torch.softmax(logits[0, :, :-1], dim=-1).max(-1).values       # (N, L-1)
        heads.gate_weight.zero_()
        heads.gate_weight[0, :, 0] = 20.0                                          # statistic 0: max prob
        heads.gate_bias[0] = -20.0 * confidence.median(0).values
        calibration = calibrate(v2_outputs(c, heads), alpha=ALPHA)
    model = EarlyExitModel(by_setting[LAMBDAS[0], 0.5].backbone, heads, calibration)
    out, _ = assert_same_as_simulation(model, images, cache, heads, 0.5)
    assert len(set(out.exit_index.tolist())) >= 3, out.exit_index


def test_batch_composition_does_not_matter(models):
    """Batch 1, the whole split and a shuffled split give the same exits, predictions and sets. The float32
    backbone itself may differ in the last bit with the batch size (BLAS blocking), which can move a float16
    feature by one step: probabilities agree to ~1e-4, not bit for bit."""
    by_setting, x = models
    model = by_setting[LAMBDAS[0], 0.5]
    whole = model(x)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    shuffled = model(x[order])
    singles = [model(x[i:i + 1]) for i in range(len(x))]
    for field in ("exit_index", "prediction", "sets"):
        single = torch.cat([getattr(s, field) for s in singles])
        assert torch.equal(single, getattr(whole, field)), field
        assert torch.equal(getattr(shuffled, field), getattr(whole, field)[order]), field
    assert torch.allclose(torch.cat([s.probs for s in singles]), whole.probs, atol=1e-3)


def test_from_run_checks(run, models, tree):
    run_dir, cache = run
    rows, _ = rundir.read_results(run_dir)
    assert select_trial(rows, 1e-9)["lam"] == LAMBDAS[0] and select_trial(rows, 1e9)["lam"] == LAMBDAS[-1]
    with pytest.raises(ValueError, match="lambda must be"):
        select_trial(rows, 0.0)
    with pytest.raises(ValueError, match="not a finished run"):
        EarlyExitModel.from_run(tree, 1.0)
    with pytest.raises(ValueError, match="is not there"):
        EarlyExitModel.from_run(run_dir, 1.0, cache_path=tree / "nowhere.zarr")
    manifest = models[0][LAMBDAS[0], 0.5].manifest
    with pytest.raises(ValueError, match="sha256"):
        backbone_from_manifest(dict(manifest, weights=dict(manifest["weights"], sha256="0" * 64)))
    other = make_other_cache(tree, cache)
    with pytest.raises(ValueError, match="is not the cache"):
        EarlyExitModel.from_run(run_dir, 1.0, cache_path=other)


def make_other_cache(tree, cache):
    """A cache of another extraction (fewer images) to point a run at."""
    other = cache.with_name(cache.stem + "-other.zarr")
    with open_cache(cache) as c:
        m = c.manifest
    run_extraction(ExtractSettings(backbone=m["backbone"], dataset="imagefolder", data_dir=str(tree / "data"),
                                   weights=m["weights"]["path"], img_size=32, limit=24, batch_size=8, chunk_rows=8,
                                   device="cpu", out=str(other), progress=False))
    return other


def test_predict_cli(run, models, tree):
    """One tab-separated line per file: path, class name, exit l/L, calibrated max probability, conformal set."""
    run_dir, _ = run
    paths = sorted((tree / "data" / "train").glob("class*/0[0-3].png"))
    model = models[0][LAMBDAS[0], 0.5]                 # calibrated at alpha ALPHA
    expected = model(image_batch(paths, model.manifest))
    res = CliRunner().invoke(predict_cmd, ["--run", str(run_dir), "--lam", str(LAMBDAS[0]), "--alpha", str(ALPHA),
                                           "--batch-size", "5", *map(str, paths)])
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert len(lines) == len(paths)
    for i, (line, path) in enumerate(zip(lines, paths)):
        k = int(expected.prediction[i])
        members = ", ".join(f"class{j}" for j in expected.sets[i].nonzero().flatten().tolist())
        assert line.split("\t") == [str(path), f"class{k}", f"exit {int(expected.exit_index[i]) + 1}/{model.num_exits}",
                                    f"p={float(expected.probs[i, k]):.3f}", f"set={{{members}}}"]
    # stderr: the speed and the Mul-Adds of the exits taken, against the full network's
    costs = model.cumulative_macs
    mean = sum(costs[int(e)] for e in expected.exit_index) / len(paths)
    assert res.stderr.startswith(f"{len(paths)} images: ") and "images/s in the early-exit network" in res.stderr
    assert f"{mean / costs[-1]:.3f} of the full network's {costs[-1] / 1e6:.2f}M" in res.stderr
    bad = CliRunner().invoke(predict_cmd, ["--run", str(run_dir), "--lam", "-1", str(paths[0])])
    assert bad.exit_code != 0 and "lambda must be" in bad.output


def test_image_batch_matches_extraction(models, tree):
    """An image file through image_batch is the tensor the extraction computed for it."""
    by_setting, x = models
    manifest = by_setting[LAMBDAS[0], 0.5].manifest
    splits = load_splits(data_settings(manifest, tree / "data"))
    rows = [0, 3, len(x) - 1]
    files = [splits.test.source[splits.test.indices[r]] for r in rows]
    assert torch.equal(image_batch(files, manifest), x[rows])


@pytest.mark.skipif(not Path(DEFAULT_DATA_DIRS["fashion-mnist"]).is_dir(), reason="no Fashion-MNIST here")
def test_grayscale_file_matches_extraction(tmp_path):
    """A Fashion-MNIST image saved as a PNG goes through image_batch as the extraction fed its array (one gray
    channel copied to three, resized to the cache's size)."""
    settings = DataSettings("fashion-mnist", None, img_size=40, mean=(0.5,), std=(0.25,), limit=2)
    splits = load_splits(settings)
    manifest = {"dataset": splits.describe()}
    files = []
    for r in range(2):
        files.append(tmp_path / f"{r}.png")
        Image.fromarray(splits.test.source[splits.test.indices[r]]).convert("RGB").save(files[-1])
    assert torch.equal(image_batch(files, manifest), torch.stack([splits.test[r][0] for r in range(2)]))
