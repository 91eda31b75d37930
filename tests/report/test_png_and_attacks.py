"""PNG pictures written in plain Python, and the report's section of attack results."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from potluck.report import write_report
from potluck.report.attacks import attack_section
from potluck.report.png import image_row, png_bytes


def test_png_pixels_read_back_exactly() -> None:
    image = pytest.importorskip("PIL.Image")  # a reader that is not ours
    import io

    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    rgb = np.stack([grey, 255 - grey, grey // 2], axis=2)
    for pixels, mode in ((grey, "L"), (rgb, "RGB")):
        decoded = image.open(io.BytesIO(png_bytes(pixels)))
        assert decoded.mode == mode and decoded.size == (4, 3)
        np.testing.assert_array_equal(np.asarray(decoded), pixels)


def test_png_refuses_what_it_cannot_encode() -> None:
    with pytest.raises(ValueError, match="uint8"):
        png_bytes(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="3 channels"):
        png_bytes(np.zeros((2, 2, 4), np.uint8))


def test_image_row_maps_the_box_to_grey_levels_and_upscales() -> None:
    images = np.array([[[[-1.0, 1.0]]], [[[0.0, 3.0]]]])  # two 1x2 images, box [-1, 1]
    row = image_row(images, (-1.0, 1.0), scale=2, gap=1)
    assert row.shape == (2, 9)
    assert row[0].tolist() == [0, 0, 255, 255, 255, 128, 128, 255, 255]  # 3.0 clipped to 1


def _results(run_dir: Path) -> None:
    folder = run_dir / "attacks"
    folder.mkdir(parents=True)
    (folder / "a-original.png").write_bytes(png_bytes(np.zeros((8, 8), np.uint8)))
    images = {"original": "a-original.png", "reconstruction": "gone.png"}
    inversion = {
        "attack": "inversion",
        "method": "ig",
        "round": 2,
        "client": 5,
        "protection": "none",
        "batch": 1,
        "psnr": 31.5,
        "ssim": 0.99,
        "label_accuracy": 1.0,
        "images": images,
    }
    loss = {"auc": 0.7, "advantage": 0.4, "tpr_at_1%_fpr": 0.1, "tpr_at_0.1%_fpr": 0.0}
    membership = {
        "attack": "membership",
        "members": 10,
        "nonmembers": 10,
        "shadows": 4,
        "methods": {"loss": loss},
        "roc": {"loss": {"fpr": [0.0, 0.5, 1.0], "tpr": [0.0, 0.9, 1.0]}},
        "target": {"member_loss": 0.2},
    }
    (folder / "inversion.json").write_text(json.dumps(inversion))
    (folder / "membership.json").write_text(json.dumps(membership))
    (folder / "notes.json").write_text('["not an attack"]')
    (folder / "broken.json").write_text("{")


def test_the_report_shows_attack_results_with_their_pictures(tmp_path: Path) -> None:
    assert attack_section(tmp_path) == ""
    _results(tmp_path)
    page = write_report(tmp_path, [], title="t", summary={})["html"].read_text()
    assert "<h2>Privacy attacks</h2>" in page and "<h3>Membership inference</h3>" in page
    assert page.count("data:image/png;base64,") == 1 and "(gone.png missing)" in page
    assert "<td>31.5</td>" in page and "<td>0.7</td>" in page and "ROC of the membership" in page
