"""`python -m training.main` (also under torchrun / srun): distil a teacher CLIP into a student CLIP."""

from __future__ import annotations

import logging
import os
import sys

from . import distributed, parallel
from .errors import run_cli
from .logger import setup_logging
from .params import parse_config
from .trainer import Trainer


def run(argv=None) -> int:
    config = parse_config(argv)
    parallel.launch(config.parallel)  # --horovod: hvd.init() tells each process its rank
    runtime = config.runtime
    env = distributed.init_distributed(runtime.device, runtime.dist_backend, runtime.dist_url)
    config = config.with_run_name(distributed.gather_objects(config.default_run_name())[0])  # rank 0's timestamp
    run_dir = config.logging.run_dir
    setup_logging(os.path.join(run_dir, "out.log") if run_dir else None, env.is_master)
    logging.info("rank %d/%d on %s", env.rank, env.world_size, env.device)
    Trainer(config, env).train()
    distributed.cleanup()
    return 0


def main(argv=None) -> int:
    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
