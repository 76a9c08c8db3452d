"""Training and evaluation of ChunkMemLM and its baselines (``python -m chunkmem.train``).

Modules, one idea each:

- :mod:`~chunkmem.training.config`: TrainConfig, the presets, the model they build
- :mod:`~chunkmem.training.data`: stdlib text and recall documents, row streams
- :mod:`~chunkmem.training.sharding`: which rows / evaluation documents each process takes
- :mod:`~chunkmem.training.distributed`: process group (torchrun), DDP / FSDP2 wrapping, collectives
- :mod:`~chunkmem.training.loop`: Trainer (one optimizer step, run state)
- :mod:`~chunkmem.training.evaluation`: bits per byte and recall accuracy, reduced over processes
- :mod:`~chunkmem.training.checkpoint`: atomic, weights-only checkpoints (file or sharded)
- :mod:`~chunkmem.training.run`: whole runs and the three-model comparison
- :mod:`~chunkmem.training.outputs`: CSV logs, loss plots, tables
- :mod:`~chunkmem.training.sample`: text from a checkpoint (ChunkMemLM.generate)
- :mod:`~chunkmem.training.cli`: the command line
"""
from chunkmem.training.checkpoint import CheckpointError
from chunkmem.training.config import MODELS, PRESETS, TrainConfig, build_model, make_config
from chunkmem.training.distributed import DistContext, init_distributed
from chunkmem.training.evaluation import evaluate_recall, evaluate_text, recall_eval_documents, run_segments
from chunkmem.training.loop import Trainer
from chunkmem.training.run import compare, final_eval, train_run

__all__ = ["TrainConfig", "PRESETS", "MODELS", "make_config", "build_model", "Trainer", "DistContext",
           "init_distributed", "CheckpointError", "evaluate_text", "evaluate_recall", "recall_eval_documents",
           "run_segments", "train_run", "final_eval", "compare"]
