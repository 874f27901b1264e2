"""``head4d reenact``: re-enact a source image with motion vectors through the reconstructor,
streaming frames, depth maps and the animation to disk (:mod:`head4d.reenact.run`); the
inputs and their checks (:mod:`head4d.reenact.inputs`); the canonical head's mesh
(:mod:`head4d.reenact.isosurface`)."""
from .inputs import (ReenactError, load_cameras, load_motion, load_neck_poses, load_reconstructor, load_source_image,
                     portrait_cameras)
from .isosurface import marching_tetrahedra, read_ply, write_ply
from .run import run_reenact, untrained_config

__all__ = ["ReenactError", "load_cameras", "load_motion", "load_neck_poses", "load_reconstructor", "load_source_image",
           "marching_tetrahedra", "portrait_cameras", "read_ply", "run_reenact", "untrained_config", "write_ply"]
