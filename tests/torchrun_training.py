"""Two steps of one training in a process group that ``torchrun`` set up (not a test file:
the training tests launch it, see ``run_under_torchrun``).

    python -m torch.distributed.run --standalone --nproc_per_node N tests/torchrun_training.py {genhead|reconstructor} OUT

Each training runs its tiny CPU configuration (``--small``'s) with one item per process,
GenHead on data that differs per rank. After the two steps every rank writes
``OUT/rank{R}.json``: the step, the images seen, the last losses and a SHA-256 digest of each
network's state dict (``G``, ``D``, ``G_ema``), so that a test compares the ranks' weights
bit for bit without writing them (the reconstructor's are 0.6 GB a copy); rank 0 also writes
the checkpoint, whose state dicts give the same digests.
"""
import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Mapping

import torch

HERE = Path(__file__).resolve().parent


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names, dtypes, shapes and bytes, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        value = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def run_under_torchrun(kind: str, out: Path, nproc: int = 2, timeout: float = 900) -> list:
    """Launch this script with ``torchrun --standalone --nproc_per_node nproc`` (one torch
    thread a process) and return the ranks' reports; a failed launch raises with the output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(HERE / "torchrun_training.py"), kind, str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"torchrun exited with {done.returncode}:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}")
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(nproc)]


def main(kind: str, out: str) -> None:
    rank = int(os.environ["RANK"])  # torchrun's; the training reads the rest of its environment itself
    out_dir = Path(out)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    if kind == "genhead":
        sys.path.insert(0, str(HERE))
        from genhead_testing import make_dataset
        from head4d.train.genhead import GenHeadTrainingConfig, train_genhead

        config = GenHeadTrainingConfig.small(out=str(out_dir), device="cpu", batch=1, log_every=1)
        trainer = train_genhead(config, make_dataset(4, seed=rank), max_steps=2)
    elif kind == "reconstructor":
        from head4d.train.reconstructor import ReconstructorTrainingConfig, train_reconstructor

        config = ReconstructorTrainingConfig.small(out=str(out_dir), device="cpu", batch=1, log_every=1,
                                                   lpips_backbone="random")
        trainer = train_reconstructor(config, max_steps=2)
    else:
        raise SystemExit(f"kind must be genhead or reconstructor, got {kind!r}")
    report = {"rank": rank, "world_size": int(os.environ["WORLD_SIZE"]), "step": trainer.step_index,
              "nimg": trainer.cur_nimg, "losses": trainer.last_losses,
              "digests": {name: state_digest(getattr(trainer, name).state_dict()) for name in ("G", "D", "G_ema")}}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:])
