"""Online 4D data synthesis: Portrait4D's (source, driver, target) training triplets for
the reconstructor, drawn from a frozen GenHead on its device, never through disk.

>>> sampler = TripletSampler(genhead, generator=torch.Generator(device).manual_seed(0))  # doctest: +SKIP
>>> batch = sampler.sample(8)                     # a TripletBatch              # doctest: +SKIP
>>> batch.image[:, 2], batch.motions[:, 1], batch.motion_scale                  # doctest: +SKIP

:mod:`~head4d.synthesis.sampler` says what is drawn, :mod:`~head4d.synthesis.cameras` the
camera convention and distribution, :mod:`~head4d.synthesis.motions` the motion vector and
its sources, :mod:`~head4d.synthesis.writer` the files of ``head4d synthesize``.
"""
from .cameras import look_at_angles, look_at_cameras, sample_look_at_cameras, sample_look_at_parameters
from .motions import MOTION_SIZE, MotionSource, perturb_jaw
from .sampler import TRIPLANE_POINTS, VIEWS, TripletBatch, TripletSampler
from .writer import read_labels, write_triplets

__all__ = ["MOTION_SIZE", "MotionSource", "TRIPLANE_POINTS", "TripletBatch", "TripletSampler", "VIEWS",
           "look_at_angles", "look_at_cameras", "perturb_jaw", "read_labels", "sample_look_at_cameras",
           "sample_look_at_parameters", "write_triplets"]
