"""conform: a variable-frame-rate source made constant-rate at its nominal rate; QC's timestamp check."""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from engine.media import VideoFrames, write_timed_video
from tasks.conform import conform_picture
from tasks.deliver import Expected, _picture_checks
from tasks.workspace import Workspace
from tests.footage_fixtures import moving_picture, psnr, write_moving_video

VFR_GAPS = [0.02, 0.05, 0.03, 0.07, 0.04]  # 23.8 fps on average, a 10 ms clock: r_frame_rate reads 100


def test_a_vfr_source_is_conformed_to_its_nominal_rate_nearest_frame_by_nearest_frame(tmp_path):
    times = np.cumsum([0] + VFR_GAPS * 8)[:40]
    source = VideoFrames(write_moving_video(tmp_path / "vfr.mp4", list(times)))
    assert not source.is_constant_rate and source.nominal_rate == Fraction(24000, 1001)  # nearest the average
    ws = Workspace(tmp_path / "ws")
    out = VideoFrames(ws.path(conform_picture(ws, ws.put_file(tmp_path / "vfr.mp4", move=False))))
    rate = 24000 / 1001
    assert out.is_constant_rate and out.count == round(source.duration * rate)
    np.testing.assert_allclose(out.times, np.arange(out.count) / rate, atol=1e-4)
    for k, frame in out.iter_frames():
        nearest = int(np.argmin(np.abs(times - k / rate)))  # the source frame shown at that instant
        assert psnr(frame, moving_picture(nearest, (128, 64))) > 35, k


def test_the_header_rate_is_the_nominal_rate_and_a_constant_source_is_left_alone(tmp_path):
    """A phone's VFR (header 30 fps, frames late and early) is conformed to 30; a 30 fps file in a
    millisecond clock (33/34 ms gaps) is already constant and is not re-encoded."""
    frames = [(round(t * 1000), moving_picture(i, (64, 32))) for i, t in enumerate(np.arange(30) / 30)]
    write_timed_video(tmp_path / "cfr.mp4", frames, Fraction(1, 1000), rate=30)
    ws = Workspace(tmp_path / "ws")
    blob = ws.put_file(tmp_path / "cfr.mp4", move=False)
    assert VideoFrames(tmp_path / "cfr.mp4").is_constant_rate and conform_picture(ws, blob) == blob
    jitter = [(t + (12 if i % 3 == 1 else 0), f) for i, (t, f) in enumerate(frames)]  # 30 fps, late frames
    write_timed_video(tmp_path / "phone.mp4", jitter, Fraction(1, 1000), rate=30)
    phone = VideoFrames(tmp_path / "phone.mp4")
    assert not phone.is_constant_rate and phone.nominal_rate == 30
    out = VideoFrames(ws.path(conform_picture(ws, ws.put_file(tmp_path / "phone.mp4", move=False))))
    assert out.is_constant_rate and out.count == 30


def test_qc_checks_constant_timestamps_unless_the_manifest_keeps_them():
    """The check on measure()'s frame_rate (through dubflow run: tests/test_footage.py)."""
    vfr = {"frame_rate": {"constant": False, "gap_ms": [20.0, 70.0]}}
    cfr = {"frame_rate": {"constant": True, "gap_ms": [40.0, 40.0]}}
    expected = Expected(10, -23.0, -1.0)
    assert not _picture_checks(vfr, expected)["constant_timestamps"]["pass"]
    assert _picture_checks(cfr, expected)["constant_timestamps"]["pass"]
    kept = Expected(10, -23.0, -1.0, constant_rate=False)
    assert "constant_timestamps" not in _picture_checks(vfr, kept)


def test_the_manifest_switch_defaults_to_constant(tmp_path):
    from tasks.manifest import Manifest

    m = Manifest.model_validate({"episode": "e", "source": "a.mp4", "speakers": [{"id": "a"}]})
    assert m.stitch.timestamps == "constant"
