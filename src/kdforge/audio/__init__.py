"""Audio interaction recognition (EPIC-SOUNDS, Team AcieLee's recipe): front end, backbone, stages, fusion.

- :mod:`~kdforge.audio.frontend`: the official baseline's log-mel framing in torch; resampling; WAV reading.
- :mod:`~kdforge.audio.specaug`: SpecAugment (faithful to the baseline's quirks, or corrected).
- :mod:`~kdforge.audio.models`: Auditory SlowFast (paper size and lite), backbone freezing, the BN policy.
- :mod:`~kdforge.audio.losses`: label smoothing + focal ("MyLoss") and standard focal loss.
- :mod:`~kdforge.audio.method`: one recipe stage as an engine Method (multi-view evaluation, precise BN).
- :mod:`~kdforge.audio.recipe`: the staged recipe, late fusion with validation-searched weights, prediction.
- :mod:`~kdforge.audio.data` / :mod:`~kdforge.audio.synthetic`: EPIC-SOUNDS, synthetic kitchen sounds,
  espeak-ng spoken words (optional), the challenge submission file.
"""

from kdforge.audio.frontend import FrontEnd, LogMel, mel_filters, pack_pathways, resample, segment_logmel
from kdforge.audio.fusion import fuse, search_weights
from kdforge.audio.losses import focal_loss, ls_focal_loss
from kdforge.audio.method import AudioStage
from kdforge.audio.metrics import all_metrics
from kdforge.audio.models import AudioSlowFast, freeze_backbone
from kdforge.audio.specaug import SpecAugment

__all__ = ["AudioSlowFast", "AudioStage", "FrontEnd", "LogMel", "SpecAugment", "all_metrics", "focal_loss",
           "freeze_backbone", "fuse", "ls_focal_loss", "mel_filters", "pack_pathways", "resample", "search_weights",
           "segment_logmel"]
