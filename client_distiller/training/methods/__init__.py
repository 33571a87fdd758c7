"""Training methods: one registry (:data:`METHODS`), one base class (:class:`Method`).

Importing this package registers the built-in methods; a new method is a module here that
subclasses :class:`Method`, decorates it with :func:`register`, and is imported below.
"""

from client_distiller.training.methods.base import (TEACHER_OUTPUTS, Batch, Hparam, HparamError, Method, MethodError,
                                                    MissingTeacherOutputError, Stage, UnknownMethodError)
from client_distiller.training.methods.registry import METHODS, get_method, parse_hparams, register
# Registration order is the order `compare` runs and tabulates them: baselines, then the papers' methods.
from client_distiller.training.methods import erm, kd, vl2v_adip, clip_kd, dime_fm, vl2v_sd  # noqa: E402,F401,I001  (registration)
from client_distiller.training.methods.vl2v_adip import adip_loss

__all__ = ["METHODS", "get_method", "parse_hparams", "register", "Method", "Stage", "Batch", "Hparam", "MethodError",
           "HparamError", "UnknownMethodError", "MissingTeacherOutputError", "TEACHER_OUTPUTS", "adip_loss"]
