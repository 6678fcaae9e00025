"""The foundation model (FM) on TorchRec: model, Matryoshka autoencoder, sharded trainer.

Modules: ``config`` (FMConfig and its sections; no torch import, so loading a config stays
cheap), ``features`` (which columns the FM reads, and where each is looked up), ``batch``
(vectorised Arrow -> KeyedJaggedTensor batches, sharded by rank), ``model`` (the FM for one
device: EBC + EC + DMIN/DeepFM + taps), ``autoencoder``, ``parallelize`` (planner + DMP + fused
sparse optimizer), ``checkpoint``, ``train`` (`train_fm`), ``weights`` (`load_trained_fm`: a trained
FM for inference, without the trainer), ``plan`` (`loopfm plan`: the planner alone, no training).
"""
from loopfm.fm.config import (AutoencoderConfig, FMConfig, ModelConfig, OptimizerConfig, ParallelConfig,
                              TrainConfig)

__all__ = ["FMConfig", "ModelConfig", "AutoencoderConfig", "OptimizerConfig", "ParallelConfig",
           "TrainConfig", "load_trained_fm"]


def __getattr__(name: str):
    if name == "load_trained_fm":  # imported on use: torchrec is slow to import
        from loopfm.fm.weights import load_trained_fm
        return load_trained_fm
    raise AttributeError(name)
