"""`finetune` on timm's tiny random `test_vit` (an "ImageNet" checkpoint with a 1000-class head) over a class-folder
tree of PNGs with a planted task (dark / bright / red images): the loss falls, the checkpoint loads through
load_backbone with the task's head and gives the fine-tuned model's logits, an interrupted run (between epochs
or mid-epoch) resumes to exactly the weights of an uninterrupted one, and bad input gives one-line errors."""
import logging

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import extract  # noqa: F401  (before timm: see extract/_torchvision.py)
import timm
from extract import finetune
from extract.backbones import load_backbone
from extract.finetune import (FinetuneSettings, make_augment, pad_crop_flip, read_finetune_checkpoint,
                              run_finetune)
from cli.finetune import finetune_cmd

K, PER_CLASS, BATCH, EPOCHS = 3, 20, 8, 2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """train/ (3 classes x 20 PNGs of 16 px: dark, bright, red, with noise), val/ (the test split, never read) and a
    test_vit checkpoint with a 1000-class head standing in for ImageNet weights."""
    root = tmp_path_factory.mktemp("finetune")
    rng = np.random.default_rng(0)
    centres = [(50, 50, 50), (200, 200, 200), (200, 40, 40)]
    for split, n in (("train", PER_CLASS), ("val", 3)):
        for c, centre in enumerate(centres):
            folder = root / "data" / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(rng.normal(centre, 40, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    torch.manual_seed(1)
    torch.save(timm.create_model("test_vit", num_classes=1000, img_size=32).state_dict(), root / "imagenet.pth")
    return root


def settings(toy, out, **kw):
    return FinetuneSettings(**{**dict(backbone="test_vit", weights=str(toy / "imagenet.pth"), dataset="imagefolder",
                                      data_dir=str(toy / "data"), img_size=32, out=str(out), epochs=EPOCHS,
                                      batch_size=BATCH, device="cpu", progress=False), **kw})


def cli_args(toy, out, *extra):
    return ["--backbone", "test_vit", "--weights", str(toy / "imagenet.pth"), "--dataset", "imagefolder",
            "--data-dir", str(toy / "data"), "--img-size", "32", "--out", str(out), "--epochs", str(EPOCHS),
            "--batch-size", str(BATCH), "--device", "cpu", "--no-progress", *extra]


@pytest.fixture(scope="module")
def reference(toy):
    """An uninterrupted 2-epoch run, spied on: every step's loss, the live model and the splits evaluated."""
    seen = {"losses": [], "evaluated": []}
    train_step, evaluate = finetune.train_step, finetune.evaluate

    def spy_step(*args):
        loss, correct = train_step(*args)
        seen["losses"].append(loss)
        return loss, correct

    def spy_evaluate(model, split, *args):
        seen["model"] = model
        seen["evaluated"].append(split.name)
        return evaluate(model, split, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(finetune, "train_step", spy_step)
        mp.setattr(finetune, "evaluate", spy_evaluate)
        seen["path"] = run_finetune(settings(toy, toy / "reference.pth"))
    seen["ckpt"] = read_finetune_checkpoint(seen["path"])
    return seen


def without_times(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def assert_same_run(a: dict, b: dict):
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(pa["momentum_buffer"], pb["momentum_buffer"])
    assert a["scheduler"] == b["scheduler"]
    assert without_times(a["history"]) == without_times(b["history"])
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (EPOCHS, 0)


def test_loss_falls_on_a_planted_task_and_only_val_is_evaluated(reference):
    losses = reference["losses"]
    # train/ has 60 images, val = 1/10 of them: 54 train images, 6 full batches of 8 per epoch
    assert len(losses) == EPOCHS * 6
    assert losses[0] > 0.7                              # about ln 3 from a fresh head
    assert np.mean(losses[-3:]) < 0.3 * losses[0]
    history = reference["ckpt"]["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_acc"] == 1.0
    assert reference["evaluated"] == ["val"] * EPOCHS   # the test split (val/ on disk) is never touched
    assert history[-1]["lr_backbone"] == pytest.approx(2e-4) == history[-1]["lr_head"]   # the schedule's end
    # halfway: min_lr + (base - min_lr) / 2, base 5e-4 for the backbone and 100x that for the new head
    assert (history[0]["lr_backbone"], history[0]["lr_head"]) == pytest.approx((3.5e-4, 0.0251))


def test_checkpoint_loads_in_extract_with_the_task_head(toy, reference):
    backbone = load_backbone("test_vit", weights=str(reference["path"]), num_classes=K, img_size=32)
    assert backbone.head_is_task_head
    model = reference["model"].eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        _, logits = backbone(x)
        torch.testing.assert_close(logits, model(x), rtol=0, atol=0)
    # fine-tuning moved the backbone, not only the new head
    pretrained = torch.load(toy / "imagenet.pth", weights_only=True)
    tuned = reference["ckpt"]["state_dict"]
    assert not torch.equal(pretrained["blocks.0.attn.qkv.weight"], tuned["blocks.0.attn.qkv.weight"])
    assert tuned["head.weight"].shape[0] == K
    # the ImageNet-sized load (1000 classes) drops the task head, as for any foreign head
    assert not load_backbone("test_vit", weights=str(reference["path"]), img_size=32).head_is_task_head


def test_run_stopped_between_epochs_resumes_to_the_same_weights(toy, reference, tmp_path, caplog):
    out = tmp_path / "ft.pth"
    first = CliRunner().invoke(finetune_cmd, cli_args(toy, out, "--until-epoch", "1"))
    assert first.exit_code == 0, first.output
    half = read_finetune_checkpoint(out)
    assert (half["epoch"], half["step"], len(half["history"])) == (1, 0, 1)
    second = CliRunner().invoke(finetune_cmd, cli_args(toy, out))
    assert second.exit_code == 0, second.output
    assert_same_run(read_finetune_checkpoint(out), reference["ckpt"])
    # a finished run is left as it is
    before = out.read_bytes()
    caplog.set_level(logging.INFO, logger="extract")
    again = CliRunner().invoke(finetune_cmd, cli_args(toy, out))
    assert again.exit_code == 0 and "already complete" in caplog.text
    assert out.read_bytes() == before


def test_run_killed_mid_epoch_resumes_to_the_same_weights(toy, reference, tmp_path, monkeypatch):
    out = tmp_path / "ft.pth"
    calls, train_step = [], finetune.train_step

    def dies_at_step_10(*args):
        calls.append(1)
        if len(calls) == 10:            # epoch 2, step 4: the last checkpoint is from step 2 (save_every=2)
            raise KeyboardInterrupt
        return train_step(*args)

    monkeypatch.setattr(finetune, "train_step", dies_at_step_10)
    with pytest.raises(KeyboardInterrupt):
        run_finetune(settings(toy, out, save_every=2))
    half = read_finetune_checkpoint(out)
    assert (half["epoch"], half["step"]) == (1, 2)
    assert not list(tmp_path.glob("*.tmp"))
    monkeypatch.setattr(finetune, "train_step", train_step)
    run_finetune(settings(toy, out, save_every=2))
    assert_same_run(read_finetune_checkpoint(out), reference["ckpt"])


def test_other_settings_or_a_foreign_file_at_out_are_refused(toy, reference, tmp_path):
    out = tmp_path / "ft.pth"
    out.write_bytes(reference["path"].read_bytes())
    res = CliRunner().invoke(finetune_cmd, cli_args(toy, out, "--lr", "0.001"))
    assert res.exit_code == 1
    assert "other settings (lr: 0.0005 -> 0.001)" in res.output and "--overwrite" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert out.read_bytes() == reference["path"].read_bytes()
    out.write_bytes(b"not a checkpoint")
    res = CliRunner().invoke(finetune_cmd, cli_args(toy, out))
    assert res.exit_code == 1 and "cannot be read" in res.output
    res = CliRunner().invoke(finetune_cmd, cli_args(toy, out, "--augment", "mixup"))
    assert res.exit_code == 2 and "mixup" in res.output
    res = CliRunner().invoke(finetune_cmd, cli_args(toy, out, "--until-epoch", "3"))
    assert res.exit_code == 2 and "until_epoch must be in 1..2" in res.output
    res = CliRunner().invoke(finetune_cmd, cli_args(toy, out, "--batch-size", "64", "--overwrite"))
    assert res.exit_code == 1 and "fewer than one batch" in res.output


def windows_of(image, padded, mirrors):
    """(dy, dx, mirrored) of every S x S window of `padded` (optionally mirrored) equal to `image`."""
    s = image.shape[-1]
    span = padded.shape[-1] - s + 1
    return [(dy, dx, m) for dy in range(span) for dx in range(span) for m in mirrors
            if torch.equal(image, padded[:, dy:dy + s, dx:dx + s].flip(-1) if m else padded[:, dy:dy + s, dx:dx + s])]


def test_pad_crop_flip_takes_a_window_of_the_padded_image():
    x = torch.randn(16, 3, 16, 16)
    black = torch.tensor([-1.0, -2.0, -3.0])
    padded = black.view(1, 3, 1, 1).repeat(16, 1, 20, 20)   # padding 16 // 8 = 2 on every side
    padded[:, :, 2:18, 2:18] = x
    torch.manual_seed(0)
    out = pad_crop_flip(x, black, flip=True)
    found = [windows_of(out[i], padded[i], (False, True)) for i in range(16)]
    assert all(found), "every image is a (mirrored) window of its padded copy"
    assert len({w[0] for w in found}) > 4                  # offsets and mirrors drawn per image
    assert {w[0][2] for w in found} == {False, True}
    torch.manual_seed(0)
    upright = pad_crop_flip(x, black, flip=False)
    assert all(windows_of(upright[i], padded[i], (False,)) for i in range(16))


def test_other_augmentations():
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(0)
    a = make_augment("rrc", [0.5] * 3, [0.5] * 3, True, "bicubic")(x)
    torch.manual_seed(0)
    b = make_augment("rrc", [0.5] * 3, [0.5] * 3, True, "bicubic")(x)
    assert a.shape == x.shape and torch.isfinite(a).all() and torch.equal(a, b) and not torch.equal(a, x)
    assert make_augment("none", [0.5] * 3, [0.5] * 3, True, "bicubic")(x) is x


def test_t2t_vit_keeps_its_fixed_parameters_and_loads_in_extract(toy, tmp_path):
    """The paper's family: its sinusoid pos_embed and performer projections are not trained, everything else is."""
    torch.manual_seed(0)
    torch.save(timm.create_model("t2t_vit_7", num_classes=1000, img_size=32).state_dict(), tmp_path / "t2t.pth")
    out = run_finetune(settings(toy, tmp_path / "ft.pth", backbone="t2t_vit_7", weights=str(tmp_path / "t2t.pth"),
                                epochs=1, limit=16))
    before, after = torch.load(tmp_path / "t2t.pth", weights_only=True), read_finetune_checkpoint(out)["state_dict"]
    fixed = ("pos_embed", "tokens_to_token.attention1.w", "tokens_to_token.attention2.w")
    assert all(torch.equal(before[k], after[k]) for k in fixed)
    assert not any(torch.equal(before[k], after[k]) for k in ("cls_token", "norm.weight", "blocks.6.mlp.fc2.weight"))
    assert load_backbone("t2t_vit_7", weights=str(out), num_classes=K, img_size=32).head_is_task_head
