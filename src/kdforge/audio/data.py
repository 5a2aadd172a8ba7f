"""Audio data sets for the engine: precomputed or on-the-fly log-mel crops, EPIC-SOUNDS, spoken words.

Training items are ``(x [1, T, F], y)``: one crop (random start, SpecAugment). Evaluation items are
``(x [V, 1, T, F], y)``: the ``V`` = 5 test views at ``linspace(0, len - clip, 5)``; a model's score for a
segment is the sum of the views' softmax probabilities.
"""

from __future__ import annotations

import csv
import json
import random
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from kdforge.audio.frontend import FrontEnd, LogMel, crop_starts, pad_frames, random_start, segment_logmel
from kdforge.audio.specaug import SpecAugment
from kdforge.errors import KdforgeError

BACKGROUND_ID = 13  # EPIC-SOUNDS "background", redacted from the challenge's test set
NUM_CLASSES = 44


def _rng() -> random.Random:
    """A Python RNG drawn from torch's global generator (which the engine seeds per epoch)."""
    return random.Random(int(torch.randint(0, 2**62, (1,))))


class SpectrogramSet(Dataset):
    """Full-segment log-mels ``[T_i, F]`` (precomputed once) served as crops of ``num_frames`` frames.

    A crop in frames stands in for the baseline's crop in samples (the same up to the border frames).
    ``train``: one random crop + SpecAugment; else ``views`` crops at linspace starts.
    """

    def __init__(self, specs: Sequence[Tensor], labels: Sequence[int], num_frames: int, train: bool,
                 views: int = 5, specaug: SpecAugment | None = None, pad_mode: str = "edge",
                 split: str = "") -> None:
        self.specs, self.labels = list(specs), [int(v) for v in labels]
        self.num_frames, self.train, self.views = num_frames, train, views
        self.specaug, self.pad_mode, self.split = specaug, pad_mode, split

    def __len__(self) -> int:
        return len(self.specs)

    def _crop(self, spec: Tensor, start: int) -> Tensor:
        return pad_frames(spec[start: start + self.num_frames], self.num_frames, self.pad_mode)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        spec, y = self.specs[i], self.labels[i]
        if self.train:
            rng = _rng()
            x = self._crop(spec, random_start(len(spec), self.num_frames, rng))[None]
            if self.specaug is not None:
                x = self.specaug(x, rng)
            return x, y
        views = [self._crop(spec, s) for s in crop_starts(len(spec), self.num_frames, self.views)]
        return torch.stack(views)[:, None], y


def precompute(waves: Sequence[np.ndarray | Tensor], fe: FrontEnd, batch: int = 1) -> list[Tensor]:
    """Whole-segment log-mels ``[T_i, F]`` of waveforms at ``fe.sample_rate`` (float32)."""
    lm = LogMel(fe)
    with torch.no_grad():
        return [lm(torch.as_tensor(np.asarray(w), dtype=torch.float32)).contiguous() for w in waves]


# -- EPIC-SOUNDS ----------------------------------------------------------------------------------------


@dataclass
class EpicRecord:
    """One annotation row: which video, which samples, which class (-1 in the unlabelled test split)."""

    annotation_id: str
    video_id: str
    start: int
    stop: int
    label: int
    class_name: str = ""


def read_annotations(path: str | Path) -> list[EpicRecord]:
    """EPIC-SOUNDS annotation CSV: annotation_id, video_id, start_sample, stop_sample[, class, class_id]."""
    p = Path(path)
    if not p.is_file():
        raise KdforgeError(f"EPIC-SOUNDS annotation file not found: {str(p)!r} (give the path of e.g. "
                           "EPIC_Sounds_train.csv from github.com/epic-kitchens/epic-sounds-annotations)")
    with p.open(newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"annotation_id", "video_id", "start_sample", "stop_sample"}
    if not rows or not need <= set(rows[0]):
        have = sorted(rows[0]) if rows else []
        raise KdforgeError(f"{str(p)!r} is not an EPIC-SOUNDS annotation CSV: it needs columns {sorted(need)} "
                           f"(found {have})")
    return [EpicRecord(r["annotation_id"], r["video_id"], int(r["start_sample"]), int(r["stop_sample"]),
                       int(r["class_id"]) if r.get("class_id", "") != "" else -1, r.get("class", ""))
            for r in rows]


class EpicSounds(Dataset):
    """EPIC-SOUNDS segments from the untrimmed per-video HDF5 waveforms, featurised like the baseline.

    Training: a random crop of ``clip - 1`` samples (segments shorter than the clip whole), log-mel, edge
    padding, SpecAugment. Evaluation: the 5 views. Items are ``(x, y)``; ``y`` is -1 for the test split.
    """

    def __init__(self, hdf5: str | Path, annotations: str | Path, fe: FrontEnd | None = None, train: bool = False,
                 views: int = 5, specaug: SpecAugment | None = None, split: str = "") -> None:
        try:
            import h5py  # noqa: F401
        except ImportError:
            raise KdforgeError("EPIC-SOUNDS needs h5py: pip install 'kdforge[audio]'") from None
        self.hdf5 = Path(hdf5)
        if not self.hdf5.is_file():
            raise KdforgeError(f"EPIC-SOUNDS audio not found: {str(self.hdf5)!r} (give the path of EPIC_audio.hdf5, "
                               "the untrimmed 24 kHz waveforms, made with the annotations repository's script)")
        self.records = read_annotations(annotations)
        self.fe = fe or FrontEnd()
        self.train, self.views, self.specaug, self.split = train, views, specaug, split
        self._file: Any = None
        self._logmel = LogMel(self.fe)

    def __len__(self) -> int:
        return len(self.records)

    def _audio(self, r: EpicRecord) -> Tensor:
        if self._file is None:
            import h5py

            self._file = h5py.File(self.hdf5, "r")
        if r.video_id not in self._file:
            raise KdforgeError(f"video {r.video_id!r} of annotation {r.annotation_id!r} is not in {str(self.hdf5)!r}")
        return torch.from_numpy(np.asarray(self._file[r.video_id][r.start: r.stop], dtype=np.float32))

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        r = self.records[i]
        wave = self._audio(r)
        clip = self.fe.clip_samples
        with torch.no_grad():
            if self.train:
                rng = _rng()
                x = segment_logmel(wave, self.fe, random_start(len(wave), clip, rng), self._logmel)
                if self.specaug is not None:
                    x = self.specaug(x, rng)
                return x, r.label
            views = [segment_logmel(wave, self.fe, s, self._logmel) for s in crop_starts(len(wave), clip, self.views)]
        return torch.stack(views), r.label

    def class_names(self) -> list[str]:
        """Class names by id from the CSV (``class_<id>`` where the CSV has none)."""
        names = {r.label: r.class_name for r in self.records if r.label >= 0 and r.class_name}
        return [names.get(i, f"class_{i}") for i in range(NUM_CLASSES)]


def write_submission(path: str | Path, scores: np.ndarray, annotation_ids: Sequence[str], version: str = "0.1",
                     sls_pt: int = 2, sls_tl: int = 3, sls_td: int = 3, t_mod: int = 0) -> Path:
    """The challenge's submission: a zip holding ``test.json`` with one 44-score dict per annotation id."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] != NUM_CLASSES or len(s) != len(annotation_ids):
        raise KdforgeError(f"a submission needs scores [N, {NUM_CLASSES}] for N annotation ids (got {s.shape} for "
                           f"{len(annotation_ids)} ids)")
    sub = {"version": version, "challenge": "audio_based_interaction_recognition", "sls_pt": sls_pt,
           "sls_tl": sls_tl, "sls_td": sls_td, "t_mod": t_mod,
           "results": {str(a): {"interaction": {str(k): float(v) for k, v in enumerate(row)}}
                       for a, row in zip(annotation_ids, s, strict=True)}}
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(p, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("test.json", json.dumps(sub))
    return p


# -- spoken words (optional, GPL espeak-ng through the espeakng-loader wheel) ------------------------------

WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
VOICES = ("en", "en-us", "en+f2", "en+m3", "en-gb-x-rp", "en+f4", "en+m7", "en-us+f3")


class Espeak:
    """Speech from the espeak-ng shared library in the ``espeakng-loader`` wheel (22.05 kHz)."""

    def __init__(self) -> None:
        try:
            import espeakng_loader as loader
        except ImportError:
            raise KdforgeError("spoken words need the optional espeakng-loader package (GPL-3.0, not bundled): "
                               "pip install 'kdforge[speech]'") from None
        import ctypes
        import os

        self._ct = ctypes
        self.lib = ctypes.CDLL(loader.get_library_path())
        self._chunks: list[np.ndarray] = []
        cb_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

        def collect(wav: Any, n: int, _events: Any) -> int:
            if n > 0:
                self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
            return 0

        self._cb = cb_type(collect)  # kept alive on the instance
        data = os.path.dirname(loader.get_data_path()).encode()
        self.sample_rate = int(self.lib.espeak_Initialize(2, 0, data, 0))  # 2: synchronous, to the callback
        if self.sample_rate <= 0:
            raise KdforgeError("espeak-ng failed to initialise from the espeakng-loader wheel")
        self.lib.espeak_SetSynthCallback(self._cb)

    def say(self, text: str, voice: str = "en", rate: int = 175, pitch: int = 50) -> np.ndarray:
        """The waveform (float32, [-1, 1]) of ``text`` in ``voice`` at ``rate`` words/min and ``pitch`` 0-99."""
        self._chunks.clear()
        self.lib.espeak_SetVoiceByName(voice.encode())
        self.lib.espeak_SetParameter(1, int(rate), 0)
        self.lib.espeak_SetParameter(3, int(pitch), 0)
        t = text.encode()
        self.lib.espeak_Synth(t, len(t) + 1, 0, 1, 0, 1, None, None)
        self.lib.espeak_Synchronize()
        if not self._chunks:
            return np.zeros(1, np.float32)
        return (np.concatenate(self._chunks).astype(np.float32) / 32768.0)


def spoken_words(words: Sequence[str] = WORDS, voices: Sequence[str] = VOICES, rates: Sequence[int] = (140, 175, 210),
                 pitches: Sequence[int] = (35, 50, 65), sample_rate: int = 16000, snr_db: tuple[float, float] = (0, 15),
                 seed: int = 0) -> list[tuple[np.ndarray, int, str]]:
    """(waveform at ``sample_rate``, word id, voice) for every word x voice x rate x pitch, in pink noise."""
    from kdforge.audio.frontend import resample
    from kdforge.audio.synthetic import pink

    tts = Espeak()
    rng = np.random.default_rng(seed)
    out = []
    for wi, w in enumerate(words):
        for v in voices:
            for r in rates:
                for p in pitches:
                    a = tts.say(w, v, r, p)
                    a = resample(torch.from_numpy(a), tts.sample_rate, sample_rate).numpy()
                    a = a / (np.sqrt(np.mean(a**2)) + 1e-9)
                    noise = pink(rng, len(a))
                    a = a + noise / (np.sqrt(np.mean(noise**2)) + 1e-9) * 10 ** (-rng.uniform(*snr_db) / 20)
                    out.append(((a / max(1.0, float(np.abs(a).max()))).astype(np.float32), wi, v))
    return out
