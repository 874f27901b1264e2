"""head4d's trainings: GenHead's GAN training (:mod:`head4d.train.genhead`) and the pieces
the trainings share (:mod:`head4d.train.common`: atomic checkpoints, EMA, lazy
regularization, torchrun process groups, progress logs) and the reconstructor's ArcFace identity
loss (:mod:`head4d.train.identity`)."""
from .common import (Distributed, ProgressLog, ema_beta, lazy_adam_settings, load_checkpoint, save_checkpoint,
                     update_ema)
from .genhead import GenHeadTrainer, GenHeadTrainingConfig, r1_penalty, train_genhead
from .identity import IdentityLoss

__all__ = ["Distributed", "GenHeadTrainer", "GenHeadTrainingConfig", "IdentityLoss", "ProgressLog", "ema_beta",
           "lazy_adam_settings", "load_checkpoint", "r1_penalty", "save_checkpoint", "train_genhead",
           "update_ema"]
