"""head4d's trainings: GenHead's GAN training (:mod:`head4d.train.genhead`), the
reconstructor's training on online synthetic triplets (:mod:`head4d.train.reconstructor`,
LPIPS from :mod:`head4d.train.perceptual`, the ArcFace identity loss from
:mod:`head4d.train.identity`) and the pieces the trainings share (:mod:`head4d.train.common`:
atomic checkpoints, EMA, lazy regularization, torchrun process groups, progress logs and
image grids, mixed precision, gradient accumulation, the data stream)."""
from .common import (BatchStream, Distributed, InfiniteSampler, MixedPrecision, ProgressLog, accumulate_gradients,
                     ema_beta, lazy_adam_settings, load_checkpoint, save_checkpoint, split_microbatches, update_ema)
from .genhead import GenHeadTrainer, GenHeadTrainingConfig, r1_penalty, train_genhead
from .identity import IdentityLoss
from .reconstructor import ReconstructorTrainer, ReconstructorTrainingConfig, train_reconstructor

__all__ = ["BatchStream", "Distributed", "GenHeadTrainer", "GenHeadTrainingConfig", "IdentityLoss", "InfiniteSampler",
           "MixedPrecision", "ProgressLog", "ReconstructorTrainer", "ReconstructorTrainingConfig",
           "accumulate_gradients", "ema_beta", "lazy_adam_settings", "load_checkpoint", "r1_penalty",
           "save_checkpoint", "split_microbatches", "train_genhead", "train_reconstructor", "update_ema"]
