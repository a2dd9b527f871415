"""The evaluation's PNG contact sheet: real | reconstruction at the first, middle and last frame
of each clip, pixels where they belong."""

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.inference.contact_sheet import GAP, LABEL_HEIGHT, sheet_frames, write_contact_sheet


def test_sheet_frames():
    assert sheet_frames(1) == [0]
    assert sheet_frames(2) == [0, 1]
    assert sheet_frames(17) == [0, 8, 16]


def test_the_sheet_holds_each_clips_frames_in_place(tmp_path):
    torch.manual_seed(0)
    clips = [(f"clip{i}", torch.rand(3, 9, 8, 8), torch.rand(3, 9, 8, 8)) for i in range(2)]
    path = write_contact_sheet(tmp_path / "sheet.png", clips, scale=2)
    sheet = torch.from_numpy(np.array(Image.open(path)))  # (H, W, 3)
    w = h = 16
    assert sheet.shape == (GAP + 2 * (LABEL_HEIGHT + h + GAP), 6 * w + 7 * GAP, 3)
    for row, (_, real, recon) in enumerate(clips):
        top = GAP + row * (LABEL_HEIGHT + h + GAP) + LABEL_HEIGHT
        for i, frame in enumerate(sheet_frames(9)):
            for j, video in enumerate((real, recon)):
                left = GAP + (2 * i + j) * (w + GAP)
                expected = video[:, frame].mul(255).round().to(torch.uint8).permute(1, 2, 0)
                expected = expected.repeat_interleave(2, 0).repeat_interleave(2, 1)
                assert torch.equal(sheet[top : top + h, left : left + w], expected), (row, i, j)


def test_small_frames_are_enlarged_and_mismatched_clips_refused(tmp_path):
    clips = [("a", torch.rand(3, 5, 32, 32), torch.rand(3, 5, 32, 32))]
    image = Image.open(write_contact_sheet(tmp_path / "s.png", clips))
    assert image.width == 6 * 96 + 7 * GAP  # 32 px frames shown at 3x
    with pytest.raises(ValueError, match="one shape"):
        other = ("b", torch.rand(3, 5, 16, 16), torch.rand(3, 5, 16, 16))
        write_contact_sheet(tmp_path / "t.png", [*clips, other])
