"""head4d's trainings: GenHead's GAN training (:mod:`head4d.train.genhead`), the
reconstructor's training on online synthetic triplets (:mod:`head4d.train.reconstructor`,
LPIPS from :mod:`head4d.train.perceptual`, the ArcFace identity loss from
:mod:`head4d.train.identity`) and the pieces the trainings share (:mod:`head4d.train.common`:
atomic checkpoints, EMA, lazy regularization, torchrun process groups, progress logs)."""
from .common import (Distributed, ProgressLog, ema_beta, lazy_adam_settings, load_checkpoint, save_checkpoint,
                     update_ema)
from .genhead import GenHeadTrainer, GenHeadTrainingConfig, r1_penalty, train_genhead
from .identity import IdentityLoss
from .reconstructor import ReconstructorTrainer, ReconstructorTrainingConfig, train_reconstructor

__all__ = ["Distributed", "GenHeadTrainer", "GenHeadTrainingConfig", "IdentityLoss", "ProgressLog",
           "ReconstructorTrainer", "ReconstructorTrainingConfig", "ema_beta", "lazy_adam_settings", "load_checkpoint",
           "r1_penalty", "save_checkpoint", "train_genhead", "train_reconstructor", "update_ema"]
