"""pipeline.inference.frechet against scipy; rFVD and rFID through pipeline.inference.evaluate with
random-weight stand-ins for the I3D (a TorchScript file with its call signature and width) and
InceptionV3; 1 rank == 2 ranks; missing or wrong weights are reported, never downloaded."""

import importlib.util
import json
import sys

import numpy as np
import pytest
import torch
from export_helpers import NUM_FRAMES, SIZE, run_module, tiny_export_model
from torch import Tensor, nn

from pipeline.data.loader import DataConfig, ShardLoader
from pipeline.distributed.world import World
from pipeline.inference.evaluate import evaluate, main, parse_args
from pipeline.inference.frechet import FeatureMoments, frechet_distance, frechet_from_moments
from pipeline.inference.video_features import (
    I3D_MIN_FRAMES,
    default_weights_path,
    i3d_input,
    inception_features,
    load_i3d,
    load_inception,
)

from helpers import StandInI3D, save_i3d


def _scipy_frechet(a: np.ndarray, b: np.ndarray, bias: bool) -> float:
    linalg = pytest.importorskip("scipy.linalg", reason="scipy comes with scikit-image")
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False, bias=bias), np.cov(b, rowvar=False, bias=bias)
    root = linalg.sqrtm(sa @ sb)
    return float(np.real(np.square(mu_a - mu_b).sum() + np.trace(sa + sb - 2 * root)))


@pytest.mark.parametrize("unbiased", [True, False])
def test_frechet_distance_matches_scipy_sqrtm(unbiased):
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(16, 16))
    a = rng.normal(size=(200, 16)) @ mix
    b = rng.normal(size=(150, 16)) @ mix * 1.3 + 0.5
    result = frechet_distance(a, b, unbiased=unbiased)
    expected = _scipy_frechet(a, b, bias=not unbiased)
    assert result.value == pytest.approx(expected, rel=1e-6)
    assert (result.num_real, result.num_fake, result.warning) == (200, 150, "")
    real, fake = FeatureMoments(16), FeatureMoments(16)
    for chunk in (slice(0, 7), slice(7, 200)):  # as ranks and batches add them
        real.add(torch.from_numpy(a[chunk]))
    fake.add(torch.from_numpy(b))
    moments = frechet_from_moments(real, fake, unbiased=unbiased)
    assert moments.value == pytest.approx(expected, rel=1e-6) and moments.num_real == 200
    same = frechet_distance(a, a.copy(), unbiased=unbiased)
    assert abs(same.value) < 1e-8 * np.trace(np.cov(a, rowvar=False))


def test_fewer_samples_than_features_is_reported():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(10, 32)), rng.normal(size=(12, 32)) + 1
    result = frechet_distance(torch.from_numpy(a), torch.from_numpy(b))
    assert "singular" in result.warning and "10 samples for 32-d" in result.warning
    assert result.value == pytest.approx(_scipy_frechet(a, b, bias=False), rel=1e-6)
    assert result.value > 0


def _loader(clip_dataset, world=None):
    config = DataConfig(
        video_shards=(str(clip_dataset),),
        num_frames=NUM_FRAMES,
        time_compression=2,
        image_size=SIZE,
        micro_batch_size=3,
        num_workers=0,
        mode="eval",
        seed=0,
    )
    return ShardLoader(config, world or World())


def test_i3d_input_is_the_tf_reference_preprocessing():
    video = torch.rand(2, 3, 9, 32, 40)
    x = i3d_input(video)
    assert x.shape == (2, 3, 9, 224, 224) and x.min() >= -1 and x.max() <= 1
    frame = (video[1, :, 4] * 255).round()[None]  # uint8 values, then bilinear, then [-1, 1]
    resized = nn.functional.interpolate(frame, size=(224, 224), mode="bilinear")
    assert torch.allclose(x[1, :, 4], 2 * resized[0] / 255 - 1, atol=1e-5)


def test_fvd_through_evaluate_equals_the_frechet_distance_of_the_features(clip_dataset, tmp_path):
    status = load_i3d(torch.device("cpu"), save_i3d(tmp_path / "i3d.pt"))
    assert status.model is not None, status.note
    model = tiny_export_model()
    result = evaluate(
        model,
        _loader(clip_dataset),
        World(),
        torch.device("cpu"),
        fvd_model=status.model,
        fvd_note=status.note,
    )
    assert result.num_clips == 6 and result.fvd is not None and result.fvd > 0
    assert "on 6 clips" in result.fvd_note and "singular" in result.fvd_note  # 6 < 400
    assert result.scalars()["eval/rfvd"] == result.fvd
    assert result.summary()["fvd"] == result.fvd and result.fid is None
    real, recon = [], []
    with torch.no_grad():
        for batch in _loader(clip_dataset):
            clip = batch.pixels()
            out = model.decode_from_code_indices(model.tokenize(clip))
            for v, bucket in ((clip, real), (out, recon)):
                x = i3d_input(v.float().add(1).mul(0.5).clamp(0, 1))
                bucket.append(status.model(x, rescale=False, resize=False, return_features=True))
    direct = frechet_distance(torch.cat(real), torch.cat(recon), unbiased=False)
    assert result.fvd == pytest.approx(direct.value, rel=1e-4)


def test_missing_or_wrong_i3d_is_unavailable_with_the_reason(tmp_path):
    cpu = torch.device("cpu")
    missing = load_i3d(cpu, str(tmp_path / "nothing.pt"))
    assert missing.model is None and "--i3d-weights" in missing.note
    assert "nothing is downloaded" in missing.note
    assert default_weights_path("i3d_torchscript.pt").endswith("checkpoints/i3d_torchscript.pt")

    class Narrow(StandInI3D):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(32, 10)

    narrow = load_i3d(cpu, save_i3d(tmp_path / "narrow.pt", Narrow()))
    assert narrow.model is None and "not (1, 400)" in narrow.note

    class NoKeywords(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x.flatten(1)[:, :400]

    wrong = load_i3d(cpu, save_i3d(tmp_path / "wrong.pt", NoKeywords()))
    assert wrong.model is None and "fails on a (1, 3, 9, 224, 224) probe" in wrong.note
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    junk = load_i3d(cpu, str(tmp_path / "junk.pt"))
    assert junk.model is None and junk.note.startswith("unavailable")


def test_clips_shorter_than_the_i3d_needs_are_a_clear_reason(tmp_path):
    status = load_i3d(torch.device("cpu"), save_i3d(tmp_path / "i3d.pt"))
    frames = I3D_MIN_FRAMES - 4  # 5 = 1 + 2f frames

    class Batch:
        keys = ["a", "b"]

        def pixels(self, device):
            return torch.rand(2, 3, frames, SIZE, SIZE) * 2 - 1

    result = evaluate(
        tiny_export_model(), [Batch()], World(), torch.device("cpu"), fvd_model=status.model
    )
    assert result.num_clips == 2 and result.fvd is None
    assert f"clips of {frames} frame(s)" in result.fvd_note and "at least 9" in result.fvd_note
    assert "eval/rfvd" not in result.scalars()


def _cli_args(export_dir, clip_dataset, i3d):
    return [
        "--checkpoint",
        str(export_dir),
        "--shards",
        str(clip_dataset),
        "--num-frames",
        str(NUM_FRAMES),
        "--batch-size",
        "2",
        "--num-workers",
        "0",
        "--num-videos",
        "0",
        "--lpips",
        "off",
        "--fid",
        "off",
        "--i3d-weights",
        i3d,
    ]


@pytest.mark.distributed
def test_two_ranks_give_the_fvd_of_one_rank(clip_dataset, export_dir, tmp_path):
    args = _cli_args(export_dir, clip_dataset, save_i3d(tmp_path / "i3d.pt"))
    assert main(parse_args([*args, "--out", str(tmp_path / "one")])) == 0
    result = run_module("pipeline.evaluate", [*args, "--out", str(tmp_path / "two")], ranks=2)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert two["world_size"] == 2 and one["fvd"] is not None
    assert one["fvd"] == pytest.approx(two["fvd"], rel=1e-5)
    assert "on 6 clips" in one["fvd_note"] and "on 6 clips" in two["fvd_note"]
    assert one["fid"] is None and one["fid_note"] == "off (--fid off)"


def test_cli_without_weights_reports_unavailable_with_the_fix(
    clip_dataset, export_dir, tmp_path, capsys
):
    args = _cli_args(export_dir, clip_dataset, str(tmp_path / "no-i3d.pt"))
    args[args.index("--fid") + 1] = "auto"
    args += ["--inception-weights", str(tmp_path / "no-inception.pth"), "--max-batches", "1"]
    assert main(parse_args([*args, "--out", str(tmp_path / "eval")])) == 0
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["fvd"] is None and "pass --i3d-weights" in summary["fvd_note"]
    assert summary["fid"] is None and summary["fid_note"].startswith("unavailable")
    if importlib.util.find_spec("torch_fidelity") is not None:
        assert "--inception-weights" in summary["fid_note"]
    assert "rFVD: unavailable" in capsys.readouterr().out


def test_fid_without_torch_fidelity_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    status = load_inception(torch.device("cpu"))
    assert status.model is None and "pip install '.[fid]'" in status.note


@pytest.mark.slow  # InceptionV3 at 299 px on CPU: 10-35 s on 2 cores
def test_fid_through_evaluate_with_stand_in_inception_weights(clip_dataset, tmp_path):
    extractor = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    cls = extractor.FeatureExtractorInceptionV3
    path = tmp_path / "inception.pth"
    torch.save({}, path)
    original = cls.load_state_dict
    cls.load_state_dict = lambda self, state, *a, **k: None  # keep the random initialisation
    try:
        torch.manual_seed(0)
        weights = cls("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    finally:
        cls.load_state_dict = original
    torch.save(weights.state_dict(), path)
    status = load_inception(torch.device("cpu"), str(path))
    assert status.model is not None, status.note
    images = torch.rand(2, 3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))

    class Batch:  # InceptionV3 runs at 299 px: 2 one-frame clips keep the test short
        keys = ["a", "b"]

        def pixels(self, device):
            return images * 2 - 1

    model = tiny_export_model()
    result = evaluate(
        model, [Batch()], World(), torch.device("cpu"), fid_model=status.model, fid_note="x"
    )
    assert result.fid is not None and result.fid > 0 and result.fvd is None
    assert result.fid_note.startswith("x; on 2 frames; warning: 2 samples for 2048-d")
    assert result.scalars()["eval/rfid"] == result.fid
    with torch.no_grad():
        recon = model.reconstruct(images * 2 - 1).recon.float().add(1).mul(0.5).clamp(0, 1)
    direct = frechet_distance(
        inception_features(status.model, images), inception_features(status.model, recon)
    )
    assert result.fid == pytest.approx(direct.value, rel=1e-4)
    assert result.fvd_note == "not requested"
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(3)}, bad)
    assert load_inception(torch.device("cpu"), str(bad)).note.startswith("unavailable")
