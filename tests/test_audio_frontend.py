"""Audio front end: exact framing and mel filters (librosa parity), crops, SpecAugment, resampling, WAV files."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from kdforge.audio.frontend import (
    FrontEnd,
    LogMel,
    crop_starts,
    hz_to_mel,
    mel_filters,
    pack_pathways,
    random_start,
    read_audio,
    resample,
    segment_logmel,
    slow_indices,
    write_wav,
)
from kdforge.audio.specaug import SpecAugment
from kdforge.errors import KdforgeError

FE = FrontEnd()


@pytest.fixture(scope="module")
def logmel64() -> LogMel:
    return LogMel(FE, dtype=torch.float64)


def test_official_framing_numbers() -> None:
    assert (FE.win_length, FE.hop_length, FE.clip_samples, FE.num_frames) == (240, 120, 47976, 400)


def test_full_crop_is_exactly_400_by_128(logmel64: LogMel) -> None:
    wave = torch.randn(47976, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.1
    assert segment_logmel(wave, FE, 0, logmel64).shape == (1, 400, 128)
    assert logmel64(wave).shape == (1 + 47976 // 120, 128)  # the raw transform: 400 centred frames too


def test_mel_filters_follow_the_htk_formula() -> None:
    m = mel_filters(24000, 2048, 128)
    assert m.shape == (128, 1025)
    mel = 2595 * np.log10(1 + np.linspace(0, 12000, 130) / 700)
    assert np.allclose(hz_to_mel(torch.tensor([0.0, 700.0, 12000.0])).numpy(), [0.0, 2595 * math.log10(2), mel[-1]])
    centres = 700 * (10 ** (np.linspace(0, mel[-1], 130) / 2595) - 1)  # band k peaks at centre k + 1
    fft = np.linspace(0, 12000, 1025)
    for k in (0, 40, 127):
        j = int(np.argmax(m[k].numpy()))
        assert abs(fft[j] - centres[k + 1]) <= fft[1]  # within one FFT bin of its HTK centre
        assert float(m[k].max()) <= 1.0 + 1e-12  # no area normalisation: peaks at most 1
    assert float(m.min()) == 0.0


def test_librosa_parity(logmel64: LogMel) -> None:
    librosa = pytest.importorskip("librosa")
    ref_mel = librosa.filters.mel(sr=24000, n_fft=2048, n_mels=128, htk=True, norm=None)
    assert np.abs(mel_filters(24000, 2048, 128).numpy() - ref_mel).max() < 1e-6  # librosa keeps float32
    wave = np.random.default_rng(1).standard_normal(30000) * 0.05
    for length in (47976, 10000):  # a full segment (cropped to clip - 1) and a short one (edge-padded)
        w = wave[:length] if length < 47976 else np.concatenate([wave, wave])[:47976]
        ours = segment_logmel(torch.from_numpy(w), FE, 0, logmel64)[0].numpy()
        x = w[:47975] if length >= 47976 else w
        spec = librosa.stft(x, n_fft=2048, window="hann", hop_length=120, win_length=240, pad_mode="constant")
        ref = np.log(ref_mel.astype(np.float64) @ np.abs(spec) + 1e-6).T
        ref = np.pad(ref, ((0, 400 - ref.shape[0]), (0, 0)), "edge")
        assert np.abs(ours - ref).max() < 1e-5


def test_log_offset_and_edge_padding(logmel64: LogMel) -> None:
    silent = segment_logmel(torch.zeros(6000, dtype=torch.float64), FE, None, logmel64)[0]
    assert torch.allclose(silent, torch.full_like(silent, math.log(1e-6)))
    wave = torch.randn(6000, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = segment_logmel(wave, FE, None, logmel64)[0]
    natural = 1 + 6000 // 120
    assert out.shape == (400, 128)
    assert torch.equal(out[natural:], out[natural - 1].expand(400 - natural, 128))  # the last frame repeated
    assert not torch.equal(out[natural - 1], out[natural - 2])


def test_slow_pathway_frames() -> None:
    idx = slow_indices(400, 4)
    assert idx.tolist() == torch.linspace(0, 399, 100).long().tolist() and len(idx) == 100
    assert idx[0] == 0 and idx[-1] == 399
    x = torch.arange(400.0)[:, None].expand(400, 128)
    slow, fast = pack_pathways(x[None], 4)
    assert slow.shape == (1, 100, 128) and fast.shape == (1, 400, 128)
    assert slow[0, :, 0].tolist() == idx.float().tolist()


def test_crops() -> None:
    assert crop_starts(100_000, 47976, 5) == [int(s) for s in np.linspace(0, 100_000 - 47976, 5)]
    assert crop_starts(30_000, 47976, 5) == [0] * 5  # short segments: 5 identical views
    rng = random.Random(0)
    starts = [random_start(60_000, 47976, rng) for _ in range(200)]
    assert min(starts) >= 0 and max(starts) <= 60_000 - 47976 and len(set(starts)) > 100
    assert random_start(1000, 47976, rng) == 0


def test_bad_front_end_is_one_line() -> None:
    with pytest.raises(KdforgeError, match="longer than n_fft"):
        FrontEnd(win_ms=100, n_fft=512)


def _spec() -> torch.Tensor:
    return torch.randn(1, 400, 128, generator=torch.Generator().manual_seed(3))


def test_specaugment_masks_are_the_mean_within_limits() -> None:
    x = _spec()
    freq = SpecAugment(warp=0, freq_masks=1, time_masks=0, faithful=False)
    time = SpecAugment(warp=0, freq_masks=0, time_masks=1, faithful=False)
    widths = []
    for seed in range(20):
        y = freq(x, random.Random(seed))
        cols = (y != x).any(dim=1)[0]  # changed mel bands [F]
        assert y.shape == x.shape and int(cols.sum()) < 27
        assert torch.all(y[0][:, cols] == x.mean())
        y = time(x, random.Random(seed))
        rows = (y != x).any(dim=2)[0]  # changed frames [T]
        assert int(rows.sum()) < 25
        assert torch.all(y[0][rows] == x.mean())
        widths.append(int(rows.sum()))
    assert max(widths) > 0


def test_specaugment_faithful_quirks_and_determinism() -> None:
    x = _spec()
    aug = SpecAugment()  # the baseline: warp 5, 2 + 2 masks, faithful
    a, b = aug(x, random.Random(7)), aug(x, random.Random(7))
    assert torch.equal(a, b) and a.shape == x.shape and not torch.equal(a, x)
    assert not torch.equal(aug(x, random.Random(8)), a)
    # a zero-width draw ends masking in the faithful variant; the corrected one goes on
    rng_draws = [0, 10]  # randrange(0, 27) -> 0 (width), randrange(0, 128) -> 10 (start)

    class Fixed(random.Random):
        def randrange(self, *a: int) -> int:  # type: ignore[override]
            return rng_draws.pop(0) if rng_draws else a[0]

    y = SpecAugment(warp=0, freq_masks=2, time_masks=0)(x, Fixed())
    assert torch.equal(y, x)


def test_resample_is_band_limited_and_sized() -> None:
    sr, n = 44100, 44100
    t = np.arange(n) / sr
    x = torch.from_numpy(np.sin(2 * np.pi * 1000 * t))
    y = resample(x, sr, 16000).numpy()
    assert len(y) == math.ceil(n * 16000 / sr)
    ty = np.arange(len(y)) / 16000
    assert np.abs(y[300:-300] - np.sin(2 * np.pi * 1000 * ty[300:-300])).max() < 1e-3
    hi = torch.from_numpy(np.sin(2 * np.pi * 12000 * t))  # above the new Nyquist: removed, not aliased
    assert float(resample(hi, sr, 16000)[300:-300].abs().max()) < 0.02
    assert resample(x, sr, sr) is x


def test_wav_round_trip_any_rate(tmp_path, monkeypatch) -> None:
    t = np.arange(22050) / 22050
    wave = 0.5 * np.sin(2 * np.pi * 440 * t)
    path = tmp_path / "a.wav"
    write_wav(path, wave, 22050)
    monkeypatch.setitem(__import__("sys").modules, "soundfile", None)  # the stdlib path
    got, sr = read_audio(path)
    assert sr == 22050 and np.abs(got.numpy() - wave).max() < 1e-4
    with pytest.raises(KdforgeError, match="not found"):
        read_audio(tmp_path / "missing.wav")
    (tmp_path / "bad.wav").write_bytes(b"not a wav")
    with pytest.raises(KdforgeError, match="PCM WAV"):
        read_audio(tmp_path / "bad.wav")


def test_float32_log_mel_is_as_precise_as_the_official_float32_librosa_path() -> None:
    librosa = pytest.importorskip("librosa")
    # a loud tone over quiet noise: torch's float32 FFT was ~3e-3 off in the low-energy bins after the log
    t = np.arange(47975) / 24000
    w = (0.5 * np.sin(2 * np.pi * 440 * t) + 1e-4 * np.random.default_rng(3).standard_normal(47975)).astype(np.float32)
    truth = LogMel(FE, torch.float64)(torch.from_numpy(w.astype(np.float64))).numpy()
    ours = LogMel(FE, torch.float32)(torch.from_numpy(w))
    assert ours.dtype == torch.float32
    mel = librosa.filters.mel(sr=24000, n_fft=2048, n_mels=128, htk=True, norm=None)
    spec = np.abs(librosa.stft(w, n_fft=2048, window="hann", hop_length=120, win_length=240, pad_mode="constant"))
    official = np.log(mel @ spec + 1e-6).T  # the baseline's float32 path
    err_ours = np.abs(ours.numpy().astype(np.float64) - truth).max()
    err_official = np.abs(official.astype(np.float64) - truth).max()
    assert err_ours <= 1.5 * err_official and err_ours < 1e-6, (err_ours, err_official)
