"""Vertical models (VMs): the model zoo, LoopFM sequence encoders, KD heads and the VM trainer.

* `batch`: `VMBatch` and its builder from an event log (VM-visible columns only).
* `layers`: shared layers (embedding, MLP, FM / FmFM interactions, DIN / DIEN / DMR / DMIN units).
* `encoders`: LoopFM sequence encoders (mean, sum, din, dmin; INT4 through `kernels.int4_attend`).
* `kd`: `KDConfig`, the ExFM auxiliary-head scheme, plain soft-label KD, the four variants.
* `model`: `VMModelConfig`, `VerticalModel`, `build_model`; `models/`: FM, FmFM, DeepFM, DIN,
  DIEN, DMR, DMIN, one file each.
* `train`: `VMTrainConfig`, one-pass streaming training and day-8 evaluation (`run_vm`).
"""
from loopfm.vm.batch import VMBatch, iter_vm_batches, vm_batch_from_record_batch, vm_columns
from loopfm.vm.encoders import SequenceEncoder
from loopfm.vm.kd import KDConfig, aux_target, kd_for_variant, kd_loss, scale_grad, variant_flags
from loopfm.vm.model import MODELS, VerticalModel, VMModelConfig, build_model
from loopfm.vm.train import VMResult, VMTrainConfig, predict, run_vm, train_one_pass

__all__ = [
    "VMBatch", "iter_vm_batches", "vm_batch_from_record_batch", "vm_columns", "SequenceEncoder",
    "KDConfig", "aux_target", "kd_for_variant", "kd_loss", "scale_grad", "variant_flags",
    "MODELS", "VerticalModel", "VMModelConfig", "build_model",
    "VMResult", "VMTrainConfig", "predict", "run_vm", "train_one_pass",
]
