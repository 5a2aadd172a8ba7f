"""The log-mel front end of the official EPIC-SOUNDS baseline, in torch (no audio library needed).

Framing (defaults = the baseline): 24 kHz audio, crops of 1.999 s, a Hann window of 10 ms (240 samples)
zero-padded to ``n_fft`` 2048, hop 5 ms (120 samples), centred frames with zero padding, magnitude STFT,
128 HTK mel bands without filter normalisation from 0 Hz to Nyquist, ``log(mel + 1e-6)``, layout
``[T, F]`` = ``[400, 128]``; shorter segments are taken whole and padded to 400 frames by repeating the
last frame. The slow pathway of Auditory SlowFast sees ``T // alpha`` frames at ``linspace(0, T-1)``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from kdforge.errors import KdforgeError


@dataclass(frozen=True)
class FrontEnd:
    """Log-mel parameters; the defaults reproduce the official EPIC-SOUNDS baseline."""

    sample_rate: int = 24000
    win_ms: float = 10.0
    hop_ms: float = 5.0
    n_fft: int = 2048
    n_mels: int = 128
    fmin: float = 0.0
    fmax: float | None = None
    log_offset: float = 1e-6
    clip_s: float = 1.999
    pad_mode: str = "edge"  # how short segments reach num_frames: "edge" (repeat the last frame) or "constant"
    alpha: int = 4  # slow pathway: every alpha-th frame (T // alpha frames)

    def __post_init__(self) -> None:
        if self.win_length > self.n_fft:
            raise KdforgeError(f"front end: the window ({self.win_length} samples) is longer than n_fft "
                               f"({self.n_fft}); raise n_fft or shorten win_ms")
        if self.hop_length < 1 or self.n_mels < 1 or self.clip_samples < 2:
            raise KdforgeError("front end: hop, n_mels and the clip must be positive (got hop "
                               f"{self.hop_length} samples, n_mels {self.n_mels}, clip {self.clip_samples} samples)")
        if self.pad_mode not in ("edge", "constant"):
            raise KdforgeError(f"front end: unknown pad_mode {self.pad_mode!r} (valid: edge, constant)")

    @property
    def win_length(self) -> int:
        """Window length in samples (``round(win_ms * sr / 1000)``, as the baseline)."""
        return round(self.win_ms * self.sample_rate / 1e3)

    @property
    def hop_length(self) -> int:
        """Hop length in samples."""
        return round(self.hop_ms * self.sample_rate / 1e3)

    @property
    def clip_samples(self) -> int:
        """Crop length in samples (47,976 at 24 kHz)."""
        return round(self.sample_rate * self.clip_s)

    @property
    def num_frames(self) -> int:
        """Frames of a full crop: the baseline crops ``clip - 1`` samples, centred frames give 1 + n // hop."""
        return 1 + (self.clip_samples - 1) // self.hop_length

    def to_dict(self) -> dict[str, object]:
        """The parameters as a plain dict."""
        return asdict(self)


def hz_to_mel(f: Tensor | float) -> Tensor:
    """HTK mel scale: 2595 log10(1 + f / 700)."""
    return 2595.0 * torch.log10(1.0 + torch.as_tensor(f, dtype=torch.float64) / 700.0)


def mel_to_hz(m: Tensor) -> Tensor:
    """Inverse of :func:`hz_to_mel`."""
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filters(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None,
                dtype: torch.dtype = torch.float64) -> Tensor:
    """HTK triangular mel filters ``[n_mels, 1 + n_fft // 2]``, no area normalisation (librosa htk=True, norm=None)."""
    fmax = sample_rate / 2 if fmax is None else fmax
    fft = torch.linspace(0, sample_rate / 2, 1 + n_fft // 2, dtype=torch.float64)
    hz = mel_to_hz(torch.linspace(float(hz_to_mel(fmin)), float(hz_to_mel(fmax)), n_mels + 2, dtype=torch.float64))
    fdiff = hz[1:] - hz[:-1]
    ramps = hz[:, None] - fft[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    return torch.clamp(torch.minimum(lower, upper), min=0.0).to(dtype)


class LogMel(torch.nn.Module):
    """Waveform ``[..., N]`` -> log-mel ``[..., T, F]`` with the baseline's framing (no edge padding here).

    ``dtype`` is the output's; the STFT and the mel projection always run in float64. torch's float32 FFT
    is ~1.7e-4 off in low-energy bins after the log, ~200x worse than the official float32 librosa path
    (whose FFT is more precise); float64 then rounding to float32 is at least as precise as that path.
    """

    def __init__(self, fe: FrontEnd | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.fe = fe or FrontEnd()
        self.out_dtype = dtype
        self.register_buffer("window", torch.hann_window(self.fe.win_length, periodic=True, dtype=torch.float64),
                             persistent=False)
        self.register_buffer("mel", mel_filters(self.fe.sample_rate, self.fe.n_fft, self.fe.n_mels, self.fe.fmin,
                                                self.fe.fmax, dtype=torch.float64), persistent=False)

    def forward(self, wave: Tensor) -> Tensor:
        fe = self.fe
        wave = wave.to(torch.float64)
        lead = wave.shape[:-1]
        flat = wave.reshape(-1, wave.shape[-1])
        spec = torch.stft(flat, fe.n_fft, hop_length=fe.hop_length, win_length=fe.win_length, window=self.window,
                          center=True, pad_mode="constant", return_complex=True).abs()
        mel = torch.matmul(self.mel, spec)  # [B, F, T]
        out = torch.log(mel + fe.log_offset).transpose(-1, -2).to(self.out_dtype)
        return out.reshape(*lead, *out.shape[-2:])


def pad_frames(spec: Tensor, num_frames: int, mode: str = "edge") -> Tensor:
    """Pad ``[..., T, F]`` along time to ``num_frames`` (``edge``: repeat the last frame); longer input is cut."""
    t = spec.shape[-2]
    if t >= num_frames:
        return spec[..., :num_frames, :]
    if mode == "edge":
        tail = spec[..., -1:, :].expand(*spec.shape[:-2], num_frames - t, spec.shape[-1])
    else:
        tail = spec.new_zeros(*spec.shape[:-2], num_frames - t, spec.shape[-1])
    return torch.cat([spec, tail], dim=-2)


def slow_indices(num_frames: int, alpha: int = 4) -> Tensor:
    """Frames the slow pathway sees: ``linspace(0, T - 1, T // alpha)`` truncated to integers."""
    return torch.linspace(0, num_frames - 1, max(1, num_frames // alpha)).long()


def pack_pathways(spec: Tensor, alpha: int = 4) -> list[Tensor]:
    """``[..., T, F]`` -> [slow ``[..., T // alpha, F]``, fast ``[..., T, F]``]."""
    idx = slow_indices(spec.shape[-2], alpha).to(spec.device)
    return [spec.index_select(-2, idx), spec]


def crop_starts(length: int, clip: int, views: int = 5) -> list[int]:
    """Test-time crop starts: ``linspace(0, max(length - clip, 0), views)`` as integers (identical for short input)."""
    delta = max(length - clip, 0)
    return [int(s) for s in np.linspace(0, delta, num=views)]


def random_start(length: int, clip: int, rng: random.Random | None = None) -> int:
    """A training crop start, uniform in ``[0, max(length - clip, 0)]``."""
    delta = max(length - clip, 0)
    u = rng.uniform(0, delta) if rng is not None else float(torch.rand(()) * delta)
    return int(u)


def segment_logmel(wave: Tensor, fe: FrontEnd, start: int | None = None, logmel: LogMel | None = None) -> Tensor:
    """The baseline's feature of one segment ``[1, num_frames, n_mels]``.

    A segment shorter than the clip is taken whole; a longer one is cropped at ``start`` to ``clip - 1``
    samples (as the baseline's end index is inclusive-minus-one); then edge-padded to ``num_frames``.
    """
    logmel = logmel or LogMel(fe)
    clip = fe.clip_samples
    if wave.shape[-1] >= clip:
        s = 0 if start is None else int(start)
        wave = wave[..., s: s + clip - 1]
    return pad_frames(logmel(wave), fe.num_frames, fe.pad_mode).unsqueeze(0)


# -- resampling and files ----------------------------------------------------------------------------


def resample(wave: Tensor, orig_sr: int, new_sr: int, zeros: int = 16, rolloff: float = 0.945) -> Tensor:
    """Band-limited resampling along the last axis: a Hann-windowed sinc, polyphase over the rates' gcd.

    The low-pass sits at ``rolloff`` x the lower Nyquist frequency; output length is ``ceil(N * new / orig)``.
    """
    if orig_sr <= 0 or new_sr <= 0:
        raise KdforgeError(f"sample rates must be positive (got {orig_sr} -> {new_sr})")
    if orig_sr == new_sr:
        return wave
    g = math.gcd(int(orig_sr), int(new_sr))
    up, down = int(orig_sr) // g, int(new_sr) // g  # input samples and output samples per block
    dtype = wave.dtype if wave.is_floating_point() else torch.float32
    c = rolloff * min(up, down) / up  # twice the cut-off, in cycles per input sample
    half = math.ceil(zeros / c)
    # output j of a block sits at input offset j * up / down; tap k reads input offset k - half
    d = torch.arange(-half, half + up, dtype=torch.float64)[None, :] - (
        torch.arange(down, dtype=torch.float64) * up / down)[:, None]
    x = math.pi * c * d
    sinc = torch.where(d == 0, torch.ones_like(d), torch.sin(x) / torch.where(d == 0, torch.ones_like(x), x))
    window = torch.where(d.abs() <= half, torch.cos(math.pi * d / (2 * half)) ** 2, torch.zeros_like(d))
    kernel = (c * sinc * window).to(dtype)[:, None, :]
    lead, n = wave.shape[:-1], wave.shape[-1]
    flat = torch.nn.functional.pad(wave.reshape(-1, 1, n).to(dtype), (half, half + up))
    y = torch.nn.functional.conv1d(flat, kernel, stride=up)  # [B, down, blocks]
    y = y.transpose(1, 2).reshape(flat.shape[0], -1)
    out_len = math.ceil(n * down / up)
    return y[:, :out_len].reshape(*lead, out_len)


def read_audio(path: str | Path) -> tuple[Tensor, int]:
    """A mono float waveform in [-1, 1] and its sample rate (soundfile if installed, else the stdlib ``wave``)."""
    p = Path(path)
    if not p.is_file():
        raise KdforgeError(f"audio file not found: {str(p)!r}")
    try:
        import soundfile as sf
    except (ImportError, OSError):
        sf = None
    if sf is not None:
        try:
            data, sr = sf.read(str(p), dtype="float32", always_2d=True)
            return torch.from_numpy(data.mean(axis=1)), int(sr)
        except Exception as e:
            if p.suffix.lower() != ".wav":
                raise KdforgeError(f"cannot read audio {str(p)!r}: {e}") from None
    return _read_wav(p)


def _read_wav(p: Path) -> tuple[Tensor, int]:
    import wave

    try:
        with wave.open(str(p), "rb") as w:
            ch, width, sr, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            raw = w.readframes(n)
    except (wave.Error, EOFError) as e:
        raise KdforgeError(f"cannot read {str(p)!r} as a PCM WAV file ({e}); install soundfile for other "
                           "formats: pip install soundfile") from None
    if width == 1:
        a = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    elif width == 2:
        a = np.frombuffer(raw, "<i2").astype(np.float32) / 32768
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        a = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / (1 << 23)
    elif width == 4:
        a = np.frombuffer(raw, "<i4").astype(np.float32) / 2**31
    else:
        raise KdforgeError(f"{str(p)!r}: unsupported WAV sample width {width} bytes (valid: 1, 2, 3, 4)")
    a = a.reshape(-1, ch).mean(axis=1)
    return torch.from_numpy(np.ascontiguousarray(a)), int(sr)


def write_wav(path: str | Path, wave: Tensor | np.ndarray, sample_rate: int) -> None:
    """Write a mono 16-bit PCM WAV (stdlib ``wave``)."""
    import wave as wavmod

    a = np.clip(np.asarray(wave, dtype=np.float64), -1.0, 1.0)
    with wavmod.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes((a * 32767).astype("<i2").tobytes())


def frames_of(fe: FrontEnd, views: Sequence[int]) -> list[int]:
    """Sample starts of crops given in frames (for precomputed spectrograms)."""
    return [v * fe.hop_length for v in views]
