"""The engine's own description of a training run: plain values and resolved paths.

The app's types (`TrainSpec`, `DataPaths`) stop at boundary.py, which builds one `EngineConfig`
per job; every other module of the engine reads only this, so the engine can be driven (by a
benchmark, a test, a later co-trained pack) without the dispatcher's job model.

`Levers` names the interchangeable parts of a run (see the package docstring): which loss,
which batcher, which model-preparation hooks. They are names, not objects, so a config stays
plain data and the dispatcher's memory estimate (dispatcher/schedule/estimate.py) can follow
the same choice without importing the engine; levers.py turns the names into the parts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

# Precisions that load the base model quantised; a copy of dispatcher/jobs/precisions.py's,
# as the engine imports nothing of the job model but in boundary.py.
QUANTISED = ("4bit", "8bit")


class Folders(Protocol):
    """The data folder's places the evaluation and generation jobs read (the app's DataPaths
    has them)."""

    home: Path
    models: Path
    loras: Path
    datasets: Path


DEFAULT_LOSS = "fp32_logits"
DEFAULT_BATCHING = "pad"


@dataclass(frozen=True)
class Levers:
    """The run's interchangeable parts, by name (levers.py holds what each name means)."""

    loss: str = DEFAULT_LOSS
    batching: str = DEFAULT_BATCHING
    # Model-preparation hooks, run in this order after the LoRA layers are on the model.
    prepare: tuple[str, ...] = ()
    # Quantised models: cast the weights that are not quantised to fp32 (peft's preparation),
    # so the hidden states between layers are fp32; False keeps them in the compute dtype.
    upcast: bool = True
    # Gradient checkpointing (quantised models): how many decoder layers recompute their
    # activations in backward, from the first; None: all of them. The others keep theirs.
    checkpoint_layers: int | None = None
    # Or fit the checkpointing to a memory budget ("budget"; bytes, None: the card's memory
    # free at the start): see levers.CheckpointBudget. Ignored where nothing is checkpointed.
    checkpoint_budget: bool = False
    memory_budget_bytes: int | None = None
    # Compiling and packing pay on a GPU only: on the CPU a small job's layers take longer to
    # compile than to train, and attention over a packed row's mask costs more than the padding
    # it saves. True uses them on the CPU too (the exactness tests).
    gpu_levers_on_cpu: bool = False
    # torch.compile's mode for the layers ("default"; "reduce-overhead" replays CUDA graphs).
    compile_mode: str = "default"
    # Compiled layers move on to CUDA graphs once the run allows them (loop.GraphSwitch):
    # every micro-batch of one shape, no layer recomputing its activations, one trial.
    cuda_graphs: bool = False


@dataclass(frozen=True)
class EngineConfig:
    """One LoRA training run. Field names are the spec's (text-generation-webui's) where the
    meaning is the same; paths are already resolved by the boundary, but not yet checked (the
    engine's check phase refuses what is missing, in its own order)."""

    lora_name: str
    base_model: str
    model_dir: Path           # models/<base_model>
    loras_dir: Path           # loras/: the LoRA folder must stay inside it
    datasets_dir: Path        # datasets/: data files must stay inside it
    home: Path                # the data folder, cut from error messages
    # Data, by the names the user gave (messages, training_prompt.json) ...
    dataset: str
    format: str
    raw_text_file: str
    eval_dataset: str
    # ... and the format file the one data-name resolver found (None: not found).
    format_file: Path | None
    cutoff_len: int
    overlap_len: int
    newline_favor_len: int
    hard_cut_string: str
    min_chars: int
    add_eos_token: bool
    train_only_after: str
    # Model and LoRA.
    precision: str
    target_modules: list[str]
    lora_rank: int
    lora_alpha: int
    lora_dropout: float
    # Optimizer and schedule (learning_rate as typed: the check phase parses it).
    optimizer: str
    learning_rate: str
    lr_scheduler_type: str
    warmup_steps: int
    # Steps and what happens around them.
    micro_batch_size: int
    batch_size: int
    epochs: float
    seed: int
    save_steps: int
    eval_steps: int
    stop_at_loss: float
    always_override: bool
    # What the LoRA folder records: training_parameters.json as written, and the settings a
    # resume compares (resume.RUN_SETTINGS, normalised).
    training_parameters: dict[str, Any] = field(default_factory=dict)
    run_settings: dict[str, Any] = field(default_factory=dict)
    levers: Levers = field(default_factory=Levers)
    # The job this run is ("" outside a fleet): written into the LoRA folder's lock, so a run
    # that finds the lock held by an earlier run of its own job (a process of a worker's
    # earlier life, fenced out) waits for it to stop instead of failing.
    job_id: str = ""

    @property
    def lora_dir(self) -> Path:
        return self.loras_dir / self.lora_name
