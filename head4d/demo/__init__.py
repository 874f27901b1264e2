"""``head4d demo``: render an avatar turning and moving (:mod:`head4d.demo.run`), by default
the built-in procedural head fitted into a triplane (:mod:`head4d.demo.subject`)."""
from .subject import FitSettings, Subject, fit_subject, load_or_fit_subject, subject_model

__all__ = ["FitSettings", "Subject", "fit_subject", "load_or_fit_subject", "subject_model"]
