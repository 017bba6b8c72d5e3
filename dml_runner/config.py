"""Structured configs (validated schemas) and the location of the config tree.

Only this module, :mod:`dml_runner.cli` and :mod:`dml_runner.callbacks` know about Hydra.
The `trainer` and `eval` groups are validated against the dataclasses below: a typo (``trainer.epoch=3``) or a
wrong type (``trainer.epochs=ten``) is refused by Hydra with a message naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class TrainerConfig:
    epochs: int = 30
    batch_size: int = 64
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    amp: bool = True                 # bf16 autocast, CUDA only (ignored on the CPU)
    channels_last: bool = True       # CUDA only
    seed: int = 0
    deterministic: bool = False      # torch.use_deterministic_algorithms (slower on CUDA)
    eval_every: int = 5              # evaluate every N epochs (and always after the last one)
    eval_before_training: bool = True  # report the untrained network (epoch 0) so the gain is visible
    select_on: str = "auto"          # split that chooses best.pt: auto (val if present, else test) | val | test
    select_metric: str = "recall@1"
    num_workers: int = 0
    num_threads: Optional[int] = None  # torch intra-op CPU threads (null: torch's default); 1 suits tiny models
    pin_memory: bool = True          # used on CUDA
    persistent_workers: bool = True  # used when num_workers > 0
    eval_batch_size: int = 256
    head_lr_mult: float = 1.0        # learning-rate multiplier of the embedding head (Song 2016 uses 10)
    loss_lr_mult: float = 1.0        # learning-rate multiplier of learnable loss parameters
    grad_clip: Optional[float] = None
    max_steps_per_epoch: Optional[int] = None  # cap batches per epoch (smoke tests, quick looks)
    save_checkpoints: bool = True
    save_embeddings: bool = True
    progress: bool = True            # tqdm bars
    cache_features: bool = False     # frozen trunk: compute pooled features once per image and view, train from them
    cache_views: int = 1             # augmented views cached per image when cache_features=true
    resume: Optional[str] = None     # null | auto (the run dir's last.pt) | /path/to/last.pt


@dataclass
class EvalConfig:
    recall_at: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    use_dataset_recall_at: bool = True  # a dataset's customary K list (SOP 1..1000, In-shop 1..50) wins
    metrics: list[str] = field(default_factory=lambda: ["recall", "nmi", "f1", "map_at_r", "r_precision"])
    device: str = "auto"
    backend: str = "torch"           # retrieval: torch (auto) | torch_screened | torch_fp32 | faiss (docs/EVALUATION.md)
    chunk_size: int = 4096
    kmeans_iters: int = 50
    seed: Optional[int] = None       # k-means seed; null uses trainer.seed


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(group="trainer", name="schema", node=TrainerConfig)
    cs.store(group="eval", name="schema", node=EvalConfig)


def conf_dir() -> Path:
    """The config tree: shipped inside the package (wheel installs) or the repository's top-level conf/."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"dml-runner's conf/ tree was not found next to {here}; reinstall the package")


def to_container(cfg: Any) -> Any:
    """Plain Python containers for JSON output (interpolations resolved)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
