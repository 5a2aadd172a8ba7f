"""Offline synthetic "kitchen sounds": numpy waveforms in EPIC-SOUNDS-like families, long-tailed counts.

Ten target classes (metal and ceramic collisions, cut/chop, rustle, water, footstep, beep, scrub, pour,
background) and a disjoint set of ten pre-training families (the role VGG-Sound plays for the real
recipe). Durations follow EPIC-SOUNDS (median 1 s, ~70 % under 2 s, a few up to 8 s); every clip gets a
random gain and pink background noise at a random SNR. Training counts are Zipf-like (e.g. 400 down to 8
per class) so top-1 and mean class accuracy disagree; validation and test are balanced.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Gen = Callable[[np.random.Generator, int, int], np.ndarray]


def _t(n: int, sr: int) -> np.ndarray:
    return np.arange(n) / sr


def _bandnoise(rng: np.random.Generator, n: int, sr: int, lo: float, hi: float) -> np.ndarray:
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / sr)
    spec[(f < lo) | (f > hi)] = 0
    x = np.fft.irfft(spec, n)
    return x / (np.abs(x).max() + 1e-9)


def pink(rng: np.random.Generator, n: int) -> np.ndarray:
    """Pink (1/f) noise, unit peak."""
    spec = np.fft.rfft(rng.standard_normal(n))
    spec /= np.sqrt(np.arange(len(spec)) + 1.0)
    x = np.fft.irfft(spec, n)
    return x / (np.abs(x).max() + 1e-9)


def _impacts(rng: np.random.Generator, n: int, sr: int, fmin: float, fmax: float, decay: tuple[float, float],
             partials: int, count: int, inharmonic: bool = True) -> np.ndarray:
    out = np.zeros(n)
    t = _t(n, sr)
    for _ in range(count):
        start = int(rng.uniform(0, max(1, n - sr * 0.05)))
        f0 = rng.uniform(fmin, fmax)
        tau = rng.uniform(*decay)
        tt = t[: n - start]
        hit = np.zeros_like(tt)
        for k in range(partials):
            ratio = (1 + k * rng.uniform(1.3, 2.7)) if inharmonic else (k + 1)
            f = min(f0 * ratio, sr * 0.45)
            hit += rng.uniform(0.3, 1.0) / (k + 1) * np.sin(2 * np.pi * f * tt + rng.uniform(0, 6.3)) * np.exp(
                -tt / (tau / (1 + 0.3 * k)))
        out[start:] += hit
    return out


def metal(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """Inharmonic exponentially damped partials, 2-8 kHz, decay 50-300 ms."""
    return _impacts(rng, n, sr, 2000, min(8000, sr * 0.4) / 2.7, (0.05, 0.3), 5, int(rng.integers(1, 4)))


def ceramic(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """Higher, longer-ringing partials."""
    return _impacts(rng, n, sr, 3000, min(9000, sr * 0.45) / 1.6, (0.3, 0.8), 3, int(rng.integers(1, 3)))


def chop(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """Broadband clicks repeating at 2-5 Hz."""
    out = np.zeros(n)
    period = int(sr / rng.uniform(2, 5))
    click = rng.standard_normal(int(0.012 * sr)) * np.exp(-np.arange(int(0.012 * sr)) / (0.003 * sr))
    for s in range(int(rng.uniform(0, period)), n - len(click), period):
        j = s + int(rng.normal(0, 0.01 * sr))
        if 0 <= j < n - len(click):
            out[j: j + len(click)] += click * rng.uniform(0.6, 1.0)
    return out


def rustle(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """Band-passed noise bursts."""
    lo = rng.uniform(1500, 3000)
    x = _bandnoise(rng, n, sr, lo, lo * rng.uniform(1.5, 2.5))
    env = np.zeros(n)
    for _ in range(int(rng.integers(3, 9))):
        c, w = rng.uniform(0, n), rng.uniform(0.02, 0.08) * sr
        env += np.exp(-0.5 * ((np.arange(n) - c) / w) ** 2)
    return x * env


def water(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """Filtered noise plus random rising chirps ("bubbles")."""
    x = 0.4 * _bandnoise(rng, n, sr, 300, 3000)
    for _ in range(int(rng.integers(4, 12)) * max(1, n // sr)):
        dur = int(rng.uniform(0.01, 0.04) * sr)
        s = int(rng.uniform(0, max(1, n - dur)))
        tt = np.arange(dur) / sr
        f0 = rng.uniform(400, 1500)
        x[s: s + dur] += np.sin(2 * np.pi * (f0 * tt + 0.5 * f0 * 20 * tt**2)) * np.hanning(dur)
    return x


def footstep(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """Low-passed thumps at about 2 Hz."""
    out = np.zeros(n)
    period = int(sr / rng.uniform(1.5, 2.5))
    m = int(0.08 * sr)
    tt = np.arange(m) / sr
    for s in range(int(rng.uniform(0, period)), n - m, period):
        out[s: s + m] += np.sin(2 * np.pi * rng.uniform(60, 120) * tt) * np.exp(-tt / 0.02)
    return out + 0.05 * _bandnoise(rng, n, sr, 20, 300)


def beep(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """A steady 1-3 kHz tone, possibly pulsed."""
    t = _t(n, sr)
    x = np.sin(2 * np.pi * rng.uniform(1000, 3000) * t)
    if rng.random() < 0.5:
        x *= (np.sin(2 * np.pi * rng.uniform(2, 6) * t) > 0)
    return x


def scrub(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """Amplitude-modulated broadband noise (4-10 Hz strokes)."""
    t = _t(n, sr)
    return _bandnoise(rng, n, sr, 800, 6000) * (0.55 + 0.45 * np.sin(2 * np.pi * rng.uniform(4, 10) * t))


def pour(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """Noise through a slowly rising resonant band."""
    x = rng.standard_normal(n)
    spec = np.fft.rfft(x)
    f = np.fft.rfftfreq(n, 1 / sr)
    centre = rng.uniform(400, 900)
    # a stationary approximation in frequency, then a time-varying emphasis from a chirp carrier
    spec *= np.exp(-0.5 * ((f - centre * 1.8) / (centre * 0.9)) ** 2)
    noise = np.fft.irfft(spec, n)
    t = _t(n, sr)
    rise = centre * (1 + 1.5 * t / max(t[-1], 1e-3))
    return noise / (np.abs(noise).max() + 1e-9) * (0.6 + 0.4 * np.sin(2 * np.pi * np.cumsum(rise) / sr))


def background(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """Low-level pink noise only."""
    return 0.15 * pink(rng, n)


TARGET: dict[str, Gen] = {"metal-only collision": metal, "ceramic collision": ceramic, "cut / chop": chop,
                          "rustle": rustle, "water": water, "footstep": footstep, "beep": beep,
                          "scrub / wipe": scrub, "pour": pour, "background": background}


def _chirpy(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:  # bird song
    t = _t(n, sr)
    out = np.zeros(n)
    for _ in range(int(rng.integers(2, 6))):
        s, d = int(rng.uniform(0, n * 0.8)), int(rng.uniform(0.05, 0.2) * sr)
        tt = t[: min(d, n - s)]
        f = rng.uniform(2500, 5000) + rng.uniform(-1500, 1500) * tt / max(tt[-1], 1e-3) if len(tt) else 0
        out[s: s + len(tt)] += np.sin(2 * np.pi * np.cumsum(f) / sr) * np.hanning(len(tt))
    return out


def _engine(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    t = _t(n, sr)
    f0 = rng.uniform(30, 70)
    return sum(np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6)) / k for k in range(1, 12))


def _siren(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    t = _t(n, sr)
    f = rng.uniform(600, 900) + rng.uniform(200, 400) * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t)
    return np.sin(2 * np.pi * np.cumsum(f) / sr)


def _rain(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    out = 0.2 * _bandnoise(rng, n, sr, 2000, 7000)
    idx = rng.integers(0, n, size=int(rng.uniform(80, 200) * n / sr))
    out[idx] += rng.uniform(0.5, 1.0, len(idx))
    return out


def _drum(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    return _impacts(rng, n, sr, 80, 200, (0.1, 0.3), 2, int(rng.integers(2, 5)), inharmonic=False)


def _vowel(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    t = _t(n, sr)
    f0 = rng.uniform(100, 220)
    x = sum(np.sin(2 * np.pi * f0 * k * t) * np.exp(-0.5 * ((f0 * k - rng.uniform(500, 900)) / 200) ** 2)
            for k in range(1, 25))
    return x * (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(3, 6) * t))


def _whistle(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    t = _t(n, sr)
    f = np.linspace(rng.uniform(800, 1500), rng.uniform(1500, 2500), n)
    return np.sin(2 * np.pi * np.cumsum(f) / sr) * (1 + 0 * t)


def _knock(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    return _impacts(rng, n, sr, 200, 500, (0.01, 0.04), 3, int(rng.integers(2, 6)))


def _wind(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    t = _t(n, sr)
    return _bandnoise(rng, n, sr, 50, 600) * (0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(0.2, 1) * t))


def _bell(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    return _impacts(rng, n, sr, 400, 900, (0.8, 1.5), 4, 1, inharmonic=False)


PRETRAIN: dict[str, Gen] = {"bird": _chirpy, "engine": _engine, "siren": _siren, "rain": _rain, "drum": _drum,
                            "vowel": _vowel, "whistle": _whistle, "knock": _knock, "wind": _wind, "bell": _bell}


def durations(rng: np.random.Generator, n: int, median: float = 1.0, sigma: float = 1.32, lo: float = 0.25,
              hi: float = 8.0) -> np.ndarray:
    """Segment lengths (s): lognormal with median 1 s; sigma 1.32 puts 70 % under 2 s; clipped to [lo, hi]."""
    return np.clip(np.exp(np.log(median) + sigma * rng.standard_normal(n)), lo, hi)


def zipf_counts(classes: int, most: int = 400, least: int = 8) -> list[int]:
    """Per-class counts falling as a power law from ``most`` (class 0) to ``least`` (the last class)."""
    if classes == 1:
        return [most]
    s = np.log(most / least) / np.log(classes)
    return [round(most * (k + 1) ** -s) for k in range(classes)]


@dataclass
class Clip:
    """One synthetic segment: waveform, label, sample rate."""

    wave: np.ndarray
    label: int
    sample_rate: int


def make_clip(gen: Gen, rng: np.random.Generator, seconds: float, sr: int, snr_db: tuple[float, float] = (0, 20),
              bg_class: bool = False) -> np.ndarray:
    """A clip of ``gen`` with random gain and pink background at a random SNR (float32, peak <= 1)."""
    n = max(int(seconds * sr), 16)
    x = gen(rng, n, sr).astype(np.float64)
    x = x / (np.sqrt(np.mean(x**2)) + 1e-9)
    if not bg_class:
        noise = pink(rng, n)
        noise = noise / (np.sqrt(np.mean(noise**2)) + 1e-9)
        x = x + noise * 10 ** (-rng.uniform(*snr_db) / 20)
    x = x * 10 ** (rng.uniform(-20, 0) / 20)
    return (x / max(1.0, float(np.abs(x).max()))).astype(np.float32)


def make_split(gens: dict[str, Gen], counts: list[int], seed: int, sr: int = 16000) -> list[Clip]:
    """Clips of every class with the given counts, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    out = []
    for label, ((name, gen), count) in enumerate(zip(gens.items(), counts, strict=True)):
        for sec in durations(rng, count):
            out.append(Clip(make_clip(gen, rng, float(sec), sr, bg_class=name == "background"), label, sr))
    return out


def kitchen_sounds(seed: int = 0, sr: int = 16000, most: int = 400, least: int = 8, val_per_class: int = 30,
                   test_most: int = 200, test_least: int = 20, pretrain_per_class: int = 100,
                   pretrain_val_per_class: int = 10) -> dict[str, list[Clip]]:
    """The synthetic set: long-tailed ``train`` (``most`` .. ``least``) and ``test`` (``test_most`` ..
    ``test_least``, the same class order, as EPIC-SOUNDS' validation split is), a balanced ``val`` for
    choosing fusion weights, and a disjoint ``pretrain`` (+ ``pretrain_val``) set of other sound families.
    Splits use separate seeds derived from ``seed``."""
    k = len(TARGET)
    return {"train": make_split(TARGET, zipf_counts(k, most, least), seed * 10 + 1, sr),
            "val": make_split(TARGET, [val_per_class] * k, seed * 10 + 2, sr),
            "test": make_split(TARGET, zipf_counts(k, test_most, test_least), seed * 10 + 3, sr),
            "pretrain": make_split(PRETRAIN, [pretrain_per_class] * len(PRETRAIN), seed * 10 + 4, sr),
            "pretrain_val": make_split(PRETRAIN, [pretrain_val_per_class] * len(PRETRAIN), seed * 10 + 5, sr)}
