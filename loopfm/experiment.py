"""The experiment: one LoopFM run's config, composed from the sections each component owns.

``loopfm.config`` is the generic loader (dataclasses, YAML, overrides, typo errors) and imports no
model code; this module sits above the stages and ties their sections into one tree. Stage code
takes only its own sections, so the VM path never imports the FM (and so never TorchRec).
"""
from __future__ import annotations

import dataclasses

from loopfm.data.sources import DataConfig
from loopfm.fm import FMConfig
from loopfm.report.results import ReportConfig
from loopfm.stages.compress import CompressConfig
from loopfm.stages.extract import ExtractConfig
from loopfm.stages.sequences import SequencesConfig
from loopfm.stages.train_vm import VMStageConfig
from loopfm.stages.tune_kd import KDSearchConfig

__all__ = ["LoopFMConfig"]

@dataclasses.dataclass(kw_only=True)
class LoopFMConfig:
    """One experiment: what data, and (as the pipeline grows) how each stage runs."""
    seed: int = dataclasses.field(default=0, metadata={"help": "drives data generation, init, shuffling"})
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    fm: FMConfig = dataclasses.field(default_factory=FMConfig)
    extract: ExtractConfig = dataclasses.field(default_factory=ExtractConfig)
    compress: CompressConfig = dataclasses.field(default_factory=CompressConfig)
    sequences: SequencesConfig = dataclasses.field(default_factory=SequencesConfig)
    vm: VMStageConfig = dataclasses.field(default_factory=VMStageConfig)
    tune_kd: KDSearchConfig = dataclasses.field(default_factory=KDSearchConfig)
    report: ReportConfig = dataclasses.field(default_factory=ReportConfig)
