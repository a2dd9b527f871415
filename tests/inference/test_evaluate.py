"""pipeline.inference.evaluate: metrics against reference implementations, the evaluate() pass
against a direct computation, 1 rank == 2 ranks, LPIPS only with local weights, clear errors."""

import csv
import io
import json
import tarfile

import av
import numpy as np
import pytest
import torch
import torchvision
from export_helpers import NUM_FRAMES, SIZE, run_module, tiny_export_model
from PIL import Image

from pipeline.data.loader import DataConfig, ShardLoader
from pipeline.distributed.world import World
from pipeline.inference.contact_sheet import GAP, LABEL_HEIGHT
from pipeline.inference.evaluate import SideBySideWriter, evaluate, main, parse_args
from pipeline.inference.quality import (
    CodeHistogram,
    load_lpips,
    psnr_frame_mean,
    psnr_per_clip,
    ssim_per_frame,
    to_unit_range,
)

from helpers import video


def test_ssim_and_psnr_match_scikit_image():
    metrics = pytest.importorskip("skimage.metrics", reason="scikit-image is in the test extra")
    generator = torch.Generator().manual_seed(0)
    real = torch.rand(3, 3, 24, 20, generator=generator)
    recon = (real + 0.1 * torch.randn(real.shape, generator=generator)).clamp(0, 1)
    ours = ssim_per_frame(real, recon)
    for i in range(3):
        a, b = real[i].permute(1, 2, 0).numpy(), recon[i].permute(1, 2, 0).numpy()
        expected = metrics.structural_similarity(
            a,
            b,
            data_range=1.0,
            channel_axis=-1,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        assert abs(float(ours[i]) - expected) < 1e-5
        psnr = metrics.peak_signal_noise_ratio(a, b, data_range=1.0)
        assert abs(float(psnr_per_clip(real[i : i + 1], recon[i : i + 1])) - psnr) < 1e-4
    assert torch.allclose(ssim_per_frame(real, real), torch.ones(3))
    assert float(psnr_per_clip(real[:1], real[:1])) == pytest.approx(100.0)


def test_frame_mean_psnr_is_the_mean_of_per_frame_psnr():
    """VidTok's convention: PSNR of each frame, then the mean over frames; differs from the
    clip's PSNR when the error varies over time (and is then higher)."""
    real = torch.rand(2, 3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    noise = torch.tensor([0.01, 0.02, 0.05, 0.1]).view(1, 1, 4, 1, 1)
    recon = real + noise * torch.randn(real.shape, generator=torch.Generator().manual_seed(2))
    per_frame = torch.stack(
        [
            torch.stack(
                [psnr_per_clip(real[b, :, t][None], recon[b, :, t][None])[0] for t in range(4)]
            )
            for b in range(2)
        ]
    )
    assert torch.allclose(psnr_frame_mean(real, recon), per_frame.mean(dim=1), atol=1e-5)
    assert (psnr_frame_mean(real, recon) > psnr_per_clip(real, recon) + 0.5).all()
    still = real + 0.03 * torch.randn(real.shape, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(psnr_frame_mean(real, still), psnr_per_clip(real, still), atol=0.1)


def test_codebook_usage_and_perplexity():
    histogram = CodeHistogram(codebook_size=16, num_codebooks=1, device=torch.device("cpu"))
    histogram.add(torch.tensor([[[[0, 1], [2, 3]]]]).repeat(2, 3, 1, 1))  # 4 codes, uniform
    assert histogram.usage() == 4 / 16
    assert histogram.perplexity() == pytest.approx(4.0)
    two = CodeHistogram(codebook_size=4, num_codebooks=2, device=torch.device("cpu"))
    two.add(torch.tensor([[0, 0], [0, 1]]).view(1, 2, 1, 1, 2))  # codebook 0: one code, 1: two
    assert two.usage() == pytest.approx((1 / 4 + 2 / 4) / 2)
    assert two.perplexity() == pytest.approx((1 + 2) / 2)


def _loader(clip_dataset, world=None, batch=3):
    config = DataConfig(
        video_shards=(str(clip_dataset),),
        num_frames=NUM_FRAMES,
        time_compression=2,
        image_size=SIZE,
        micro_batch_size=batch,
        num_workers=0,
        mode="eval",
        seed=0,
    )
    return ShardLoader(config, world or World())


def test_evaluate_scores_every_clip_as_a_direct_computation(clip_dataset, tmp_path):
    model = tiny_export_model().train()  # evaluate switches to eval mode and back
    writer = SideBySideWriter(tmp_path / "videos", max_videos=2)
    result = evaluate(
        model, _loader(clip_dataset), World(), torch.device("cpu"), video_writer=writer
    )
    assert model.training
    direct = {}
    model.eval()
    for batch in _loader(clip_dataset, batch=1):
        clip = batch.pixels()
        with torch.no_grad():
            recon = model.decode_from_code_indices(model.tokenize(clip))
        direct[batch.keys[0]] = float(psnr_per_clip(to_unit_range(clip), to_unit_range(recon)))
    assert [c.key for c in result.clips] == sorted(direct)
    for clip in result.clips:
        assert clip.psnr == pytest.approx(direct[clip.key], abs=1e-3)
        assert 0 < clip.ssim < 1 and clip.num_frames == NUM_FRAMES
    assert result.num_clips == len(direct) == 6  # 1 + 2 + 1 synthetic, 2 of carphone
    assert result.psnr == pytest.approx(np.mean(list(direct.values())), abs=1e-3)
    assert 0 < result.codebook_usage <= 1 and 1 <= result.perplexity <= model.codebook_size
    assert set(result.scalars()) == {
        "eval/psnr",
        "eval/psnr_frames",
        "eval/ssim",
        "eval/codebook_usage",
        "eval/perplexity",
        "eval/num_clips",
    }
    assert len(writer.written) == 2
    with av.open(str(writer.written[0])) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == NUM_FRAMES and frames[0].shape == (SIZE, 2 * SIZE, 3)
    sheet = Image.open(tmp_path / "contact_sheet.png")  # both clips, real | recon, 3 stills
    scale = 96 // SIZE
    assert sheet.size == (6 * SIZE * scale + 7 * GAP, GAP + 2 * (LABEL_HEIGHT + SIZE * scale + GAP))


@pytest.mark.distributed
def test_two_ranks_report_what_one_rank_reports(clip_dataset, export_dir, tmp_path):
    args = [
        "--checkpoint",
        str(export_dir),
        "--shards",
        str(clip_dataset),
        "--num-frames",
        str(NUM_FRAMES),
        "--batch-size",
        "2",
        "--num-workers",
        "1",
        "--num-videos",
        "1",
    ]
    assert main(parse_args([*args, "--out", str(tmp_path / "one")])) == 0
    result = run_module("pipeline.evaluate", [*args, "--out", str(tmp_path / "two")], ranks=2)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["precision"] == two["precision"] == "fp32"  # 'auto' on CPU
    assert one["num_clips"] == two["num_clips"] and one["skipped"] == two["skipped"] == {}
    for name in ("psnr", "psnr_frames", "ssim"):
        assert one[name] == pytest.approx(two[name], abs=1e-5)
    assert one["codebook_usage"] == two["codebook_usage"]
    assert one["perplexity"] == pytest.approx(two["perplexity"], rel=1e-9)
    rows = [list(csv.DictReader(open(tmp_path / d / "clips.csv"))) for d in ("one", "two")]
    assert [r["key"] for r in rows[0]] == [r["key"] for r in rows[1]]  # each clip once
    for a, b in zip(*rows, strict=True):
        assert float(a["psnr"]) == pytest.approx(float(b["psnr"]), abs=1e-4)
        assert float(a["psnr_frames"]) >= float(a["psnr"]) - 1e-4
    assert len(list((tmp_path / "two" / "videos").glob("*.mp4"))) == 1


def test_lpips_only_with_local_weights(clip_dataset, tmp_path):
    pytest.importorskip("lpips", reason="lpips is in the test extra")
    status = load_lpips(torch.device("cpu"), str(tmp_path / "missing.pth"))
    assert status.model is None and "nothing is downloaded" in status.note
    weights = tmp_path / "alexnet.pth"  # random weights stand in for the ImageNet ones
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), weights)
    status = load_lpips(torch.device("cpu"), str(weights))
    assert status.model is not None
    result = evaluate(
        tiny_export_model(),
        _loader(clip_dataset),
        World(),
        torch.device("cpu"),
        max_batches=1,
        lpips_model=status.model,
        lpips_note=status.note,
    )
    assert result.num_clips == 3 and result.lpips is not None and result.lpips > 0
    assert all(c.lpips is not None for c in result.clips)
    assert "eval/lpips" in result.scalars()


def test_checkpoint_of_another_config_is_a_clear_error(export_dir, clip_dataset, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.safetensors").write_bytes((export_dir / "model.safetensors").read_bytes())
    config = json.loads((export_dir / "config.json").read_text())
    config["tokenizer"]["init_dim"] = 16  # the weights are for init_dim 8
    (other / "config.json").write_text(json.dumps(config))
    args = ["--shards", str(clip_dataset), "--out", str(tmp_path / "eval")]
    assert main(parse_args(["--checkpoint", str(other), *args])) == 2
    err = capsys.readouterr().err
    assert "weights do not match the config" in err and "conv_in.conv.weight" in err
    assert main(parse_args(["--checkpoint", str(tmp_path), *args])) == 2
    assert "expected config.json and model.safetensors" in capsys.readouterr().err


def test_shards_without_the_expected_keys_are_a_clear_error(export_dir, tmp_path, capsys):
    bad = tmp_path / "clips-n0000-w000-000000.tar"
    with tarfile.open(bad, "w") as tar:
        for name in ("a.mp4", "b.txt"):
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    args = [
        "--checkpoint",
        str(export_dir),
        "--shards",
        str(bad),
        "--num-frames",
        "9",
        "--num-workers",
        "0",
        "--out",
        str(tmp_path / "eval"),
    ]
    assert main(parse_args(args)) == 2
    err = capsys.readouterr().err
    assert "no clip could be evaluated" in err and "'<key>.json'" in err


def test_frames_of_images_are_one_frame_clips():
    model = tiny_export_model()
    images = video(batch=2, frames=1, size=SIZE)[:, :, 0]

    class Batch:
        keys = ["a", "b"]

        def pixels(self, device):
            return images

    result = evaluate(model, [Batch()], World(), torch.device("cpu"))
    assert result.num_clips == 2 and all(c.num_frames == 1 for c in result.clips)
