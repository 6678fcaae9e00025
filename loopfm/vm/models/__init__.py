"""The vertical-model zoo: one short file per model, built from `loopfm.vm.layers`."""
from loopfm.vm.models.deepfm import DeepFM
from loopfm.vm.models.dien import DIEN
from loopfm.vm.models.din import DIN
from loopfm.vm.models.dmin import DMIN
from loopfm.vm.models.dmr import DMR
from loopfm.vm.models.fm import FM
from loopfm.vm.models.fmfm import FmFM

MODEL_CLASSES = {"fm": FM, "fmfm": FmFM, "deepfm": DeepFM, "din": DIN, "dien": DIEN, "dmr": DMR, "dmin": DMIN}

__all__ = ["FM", "FmFM", "DeepFM", "DIN", "DIEN", "DMR", "DMIN", "MODEL_CLASSES"]
