"""Training AdaLoRA: our own loop, and a ``transformers.Trainer`` integration that is real AdaLoRA.

Both drive one :class:`AdaLoraController`, which owns the two things AdaLoRA adds to a training step:

    loss_total = loss + γ · R(P, Q)                              controller.regularize(loss)
    loss_total.backward() -> optimizer.step()
    controller.after_optimizer_step(step, optimizer)             importance, budget, mask (+ compaction)
    optimizer.zero_grad()

``step`` counts optimizer steps (not micro-batches), 0-based. With ``Trainer`` the hook is
``on_optimizer_step`` (gradients still present); ``on_step_end`` would see zeroed gradients.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from adalora_deploy.adapters import (
    AdapterSet,
    find_adapters,
    inject_adapters,
    matches_target,
    resolve_target_modules,
)
from adalora_deploy.allocator import AllocationStep, RankAllocator
from adalora_deploy.architectures import CLASSIFICATION, check_model_folder, encoder_for
from adalora_deploy.artifacts import atomic_file, write_json
from adalora_deploy.checkpoint import load_training_checkpoint, save_training_checkpoint
from adalora_deploy.classification import (
    build_labelled_data,
    classifier_accuracy,
    encode_texts,
    torch_classifier_logits,
)
from adalora_deploy.compaction import compact_in_place
from adalora_deploy.config import AdaLoraConfig, ConfigError, RunConfig
from adalora_deploy.data import ExampleBatches, build_training_data
from adalora_deploy.distributed import process_group, refuse_sharding
from adalora_deploy.errors import TrainingError
from adalora_deploy.evaluation import evaluate_examples, torch_logits
from adalora_deploy.model_sources import materialize
from adalora_deploy.models import load_base_model, load_tokenizer, resolve_device
from adalora_deploy.peft_format import save_adapter
from adalora_deploy.regularizer import orthogonal_regularizer

__all__ = [
    "AdaLoraCallback",
    "AdaLoraController",
    "AdaLoraTrainer",
    "TrainResult",
    "TrainingError",
    "make_optimizer",
    "seed_everything",
    "train",
]

logger = logging.getLogger(__name__)


class AdaLoraController:
    """The AdaLoRA part of a training step, shared by our loop and the Trainer integration.

    Args:
        adapters: the adapted layers.
        config: the AdaLoRA config.
    """

    def __init__(self, adapters: AdapterSet, config: AdaLoraConfig):
        self.adapters = adapters
        self.config = config
        self.allocator = RankAllocator(adapters, config)
        self.regularized_micro_batches = 0
        self.last_regularizer = 0.0

    def regularizer(self) -> torch.Tensor:
        """γ · R(P, Q) with the configured form; counts its calls so a skipped regularizer is caught."""
        self.regularized_micro_batches += 1
        if self.config.orth_reg_weight == 0:
            return torch.zeros(())
        value = orthogonal_regularizer(self.adapters, self.config.regularizer)
        self.last_regularizer = float(value.detach())
        return self.config.orth_reg_weight * value

    def after_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> AllocationStep:
        """Allocator update for optimizer step ``step``; compacts at the final step if configured.

        Raises:
            TrainingError: γ > 0 but no loss was regularized since the previous step.
        """
        if self.config.orth_reg_weight > 0 and self.regularized_micro_batches == 0:
            raise TrainingError(
                f"step {step}: the orthogonal regularizer was not applied (orth_reg_weight = "
                f"{self.config.orth_reg_weight}); use AdaLoraTrainer or add controller.regularizer() to the loss")
        self.regularized_micro_batches = 0
        result = self.allocator.update_and_allocate(step)
        if result.final and self.config.compact_in_training:
            compact_in_place(self.adapters, optimizer)
            logger.info("step %d: adapters compacted to %d triplets", step, result.live)
        return result


def make_optimizer(adapters: AdapterSet, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW over the adapter parameters (one group per layer, so compaction can re-point them)."""
    groups = [{"params": [layer.lora_A, layer.lora_E, layer.lora_B]} for layer in adapters.values()]
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced."""

    output_dir: Path
    adapter_dir: Path
    base_model: str
    steps: int
    first_loss: float
    final_loss: float
    live_ranks: dict[str, int]
    resumed_from: int | None


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (a classifier's fresh head is drawn from torch's generator)."""
    _seed_everything(seed)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _progress(total: int, initial: int, enabled: bool | None):
    from tqdm.auto import tqdm

    disable = not sys.stderr.isatty() if enabled is None else not enabled
    return tqdm(total=total, initial=initial, disable=disable, unit="step", dynamic_ncols=True)


def train(run: RunConfig, output_dir: str | Path, *, resume: bool = False, progress: bool | None = None,
          on_step: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train an AdaLoRA adapter as ``run`` says; write ``adapter/``, ``checkpoint/``, ``metrics.jsonl``.

    Args:
        run: the validated run config.
        output_dir: where artifacts go.
        resume: continue from ``output_dir/checkpoint`` (the run config must be the same).
        progress: show a progress bar (None: only when stderr is a terminal).
        on_step: called with each step's metrics after the step is recorded.

    Raises:
        TrainingError: a non-finite loss, or an output folder holding another run.
    """
    output_dir = Path(output_dir)
    if run.task.kind == CLASSIFICATION:
        return _train_classifier(run, output_dir, resume=resume, progress=progress, on_step=on_step)
    checkpoint_dir = output_dir / "checkpoint"
    metrics_path = output_dir / "metrics.jsonl"
    if checkpoint_dir.exists() and not resume:
        raise TrainingError(f"{output_dir} already holds a training checkpoint; pass --resume to continue it "
                            "or choose another --output")
    if resume and not (checkpoint_dir / "state.json").is_file():
        raise TrainingError(f"--resume: no checkpoint in {checkpoint_dir}")
    t = run.train
    # before the process group exists: transformers' save_pretrained writes only on rank 0 once torch.distributed
    # is initialized, so a cached model built by another rank would miss its weights (every rank builds it under
    # the cache's lock; the first one writes it whole)
    model_path = materialize(run.model.path)
    group = process_group(resolve_device(run.model.device))
    if group.world > 1 and run.adapter.compact_in_training:
        raise ConfigError("adapter.compact_in_training replaces the adapter parameters mid-run, which DDP cannot "
                          "follow; train without it under torchrun and compact afterwards (adalora-deploy compact)")
    _seed_everything(t.seed)
    check_model_folder(model_path, run.task.kind)  # an architecture not supported for the task: before any work
    tokenizer = load_tokenizer(model_path)
    data = build_training_data(run.data, tokenizer, seq_len=t.seq_len, seed=t.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    packing = run.data.packing if run.data.packing is not None else data.format == "text"
    # each optimizer step draws one global batch of batch_size rows per process; this rank takes its share
    batches = ExampleBatches(data.train, t.batch_size * group.world, t.seed, seq_len=t.seq_len, pad_id=pad_id,
                             packing=packing)
    rows = slice(group.rank * t.batch_size, (group.rank + 1) * t.batch_size)
    model = load_base_model(dataclasses.replace(run.model, path=model_path))
    device = next(model.parameters()).device
    # the architecture's default when the config leaves target_modules out; recorded in run.json and the adapter
    adapter_config = dataclasses.replace(run.adapter, target_modules=resolve_target_modules(model, run.adapter))
    adapters = inject_adapters(model, adapter_config, seed=t.seed)
    controller = AdaLoraController(adapters, adapter_config)
    run_record = run.training_record()
    forward = model
    if group.world > 1:
        # gradients are averaged across ranks inside backward(); the allocator then sees the global gradient
        forward = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    def build_optimizer(adapter_set: AdapterSet) -> torch.optim.Optimizer:
        return make_optimizer(adapter_set, t.lr, t.weight_decay)

    start = 0
    if resume:
        start, optimizer, allocator_state, extra = load_training_checkpoint(
            checkpoint_dir, adapters=adapters, optimizer_factory=build_optimizer)
        saved = {k: v for k, v in extra.get("run", {}).items()}
        if _comparable(saved) != _comparable(run_record):
            raise TrainingError(f"{checkpoint_dir} was written by a different run config; resume with the same "
                                "config or choose another --output")
        controller.allocator.load_state_dict(allocator_state)
        logger.info("resumed from step %d", start)
    else:
        optimizer = build_optimizer(adapters)
    if group.main:  # every input was read and checked above: only now does the run folder appear
        output_dir.mkdir(parents=True, exist_ok=True)
        _rewrite_metrics(metrics_path, keep_before=start)
        write_json(output_dir / "run.json", run.to_dict() | {"model_folder": model_path,
                                                              "target_modules": adapter_config.target_modules})

    model.train()
    losses: list[float] = []
    bar = _progress(t.steps, start, progress if group.main else False)
    with bar, contextlib.ExitStack() as files:
        metrics_file = files.enter_context(open(metrics_path, "a", encoding="utf-8")) if group.main else None
        for step in range(start, t.steps):
            task_loss = 0.0
            for micro in range(t.grad_accum):
                global_batch = batches.batch(step * t.grad_accum + micro)
                batch = {k: v[rows].to(device) for k, v in global_batch.items()}
                loss = forward(**batch).loss
                if group.any(not bool(torch.isfinite(loss))):
                    value = f"not finite on some rank (this rank: {loss.item()})" if group.world > 1 else loss.item()
                    raise TrainingError(f"step {step}: the loss is {value}; lower train.lr or check the data (last "
                                        f"checkpoint in {checkpoint_dir} is intact)")
                total = (loss + controller.regularizer().to(loss.device)) / t.grad_accum
                total.backward()
                task_loss += loss.item() / t.grad_accum
            task_loss = group.mean(task_loss)
            allocation, record = _optimizer_step(step, task_loss, controller, optimizer, adapters.parameters(),
                                                  t.max_grad_norm)
            done = step + 1
            if group.main and data.eval and (done == t.steps or (t.eval_every and done % t.eval_every == 0)):
                held_out = evaluate_examples(torch_logits(model), data.eval[: t.eval_examples], pad_id=pad_id,
                                             batch_size=t.batch_size)
                record["eval_loss"] = held_out.loss
            losses.append(task_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{task_loss:.4f}", budget=allocation.budget)
            if group.main:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                if done == t.steps or (t.checkpoint_every and done % t.checkpoint_every == 0):
                    save_training_checkpoint(checkpoint_dir, step=done, adapters=adapters, optimizer=optimizer,
                                             allocator_state=controller.allocator.state_dict(),
                                             extra={"run": run_record})
            if on_step is not None:
                on_step(record)
    adapter_dir = output_dir / "adapter"
    if group.main:
        save_adapter(adapters, adapter_config, adapter_dir, base_model_name_or_path=model_path)
    group.barrier()
    return TrainResult(output_dir=output_dir, adapter_dir=adapter_dir, base_model=model_path, steps=t.steps,
                       first_loss=losses[0] if losses else math.nan, final_loss=losses[-1] if losses else math.nan,
                       live_ranks=adapters.live_ranks(), resumed_from=start if resume else None)


def _optimizer_step(step: int, task_loss: float, controller: AdaLoraController, optimizer: torch.optim.Optimizer,
                    parameters: list[torch.Tensor], max_grad_norm: float | None) -> tuple[AllocationStep, dict]:
    """One step in AdaLoRA's call order (ALGORITHM.md): clip, ``optimizer.step()``, the allocator's
    ``update_and_allocate`` (importance from the gradients still in place), then ``zero_grad``; returns the
    allocation and the step's metrics record."""
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    optimizer.step()
    allocation = controller.after_optimizer_step(step, optimizer)
    optimizer.zero_grad(set_to_none=True)
    record = {"step": step, "loss": task_loss, "orth_reg": controller.last_regularizer,
              "budget": allocation.budget, "live_ranks": allocation.live, "masked": allocation.masked,
              "lr": optimizer.param_groups[0]["lr"], "skipped_importance": allocation.skipped_update}
    return allocation, record


def _train_classifier(run: RunConfig, output_dir: Path, *, resume: bool, progress: bool | None,
                      on_step: Callable[[dict[str, Any]], None] | None) -> TrainResult:
    """``task: classification``: AdaLoRA on an encoder's linears, its head trained in full (PEFT's
    ``modules_to_save``), cross-entropy on the label; writes ``adapter/`` (head and labels included),
    ``run.json`` and ``metrics.jsonl``. One process; no intermediate checkpoints (a run is minutes)."""
    t = run.train
    if resume:
        raise TrainingError("--resume: classification runs write no checkpoint; train again")
    if (output_dir / "adapter").exists() or (output_dir / "checkpoint").exists():
        raise TrainingError(f"{output_dir} already holds a training run; choose another --output")
    model_path = materialize(run.model.path)
    check_model_folder(model_path, CLASSIFICATION)  # refused before anything is read or written
    if process_group(resolve_device(run.model.device)).world > 1:
        raise ConfigError("task: classification trains in one process; run it without torchrun")
    _seed_everything(t.seed)
    tokenizer = load_tokenizer(model_path)
    data = build_labelled_data(run.data, run.task.label, t.seed)
    _seed_everything(t.seed)  # the head's initialisation: the same in every stage that loads the base
    model = load_base_model(dataclasses.replace(run.model, path=model_path), labels=data.labels)
    device = next(model.parameters()).device
    encoder = encoder_for(model.config.model_type)
    adapter_config = dataclasses.replace(run.adapter, target_modules=resolve_target_modules(model, run.adapter))
    in_head = [name for name, _ in model.named_modules() if matches_target(name, adapter_config.target_modules)
               and any(name == m or name.startswith(m + ".") for m in encoder.modules_to_save)]
    if in_head:
        raise ConfigError(f"adapter.target_modules = {adapter_config.target_modules!r} matches {in_head[0]}, in the "
                          f"head ({', '.join(encoder.modules_to_save)}), which is trained in full; name the encoder's "
                          "modules only (e.g. attention.output.dense, intermediate.dense, output.dense)")
    logger.info("adapting %s; training %s in full (modules_to_save)", adapter_config.target_modules,
                list(encoder.modules_to_save))
    adapters = inject_adapters(model, adapter_config, seed=t.seed)
    head = [p for module in encoder.modules_to_save for p in model.get_submodule(module).parameters()]
    for parameter in head:
        parameter.requires_grad_(True)
    controller = AdaLoraController(adapters, adapter_config)
    optimizer = make_optimizer(adapters, t.lr, t.weight_decay)
    optimizer.add_param_group({"params": head})
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(output_dir / "run.json", run.to_dict() | {"model_folder": model_path, "labels": list(data.labels),
                                                          "target_modules": adapter_config.target_modules,
                                                          "modules_to_save": list(encoder.modules_to_save)})
    order: list[int] = []
    shuffler = random.Random(t.seed)
    losses: list[float] = []
    model.train()
    with _progress(t.steps, 0, progress) as bar, open(output_dir / "metrics.jsonl", "w", encoding="utf-8") as metrics:
        for step in range(t.steps):
            task_loss = 0.0
            for _ in range(t.grad_accum):
                while len(order) < t.batch_size:
                    epoch = list(range(len(data.train_texts)))
                    shuffler.shuffle(epoch)
                    order += epoch
                rows, order = order[:t.batch_size], order[t.batch_size:]
                ids, mask = encode_texts(tokenizer, [data.train_texts[i] for i in rows], t.seq_len)
                labels = torch.tensor([data.train_labels[i] for i in rows], device=device)
                logits = model(input_ids=torch.from_numpy(ids).to(device),
                               attention_mask=torch.from_numpy(mask).to(device)).logits
                loss = nn.functional.cross_entropy(logits.float(), labels)
                if not bool(torch.isfinite(loss)):
                    raise TrainingError(f"step {step}: the loss is {loss.item()}; lower train.lr or check the data")
                ((loss + controller.regularizer().to(loss.device)) / t.grad_accum).backward()
                task_loss += loss.item() / t.grad_accum
            allocation, record = _optimizer_step(step, task_loss, controller, optimizer, adapters.parameters() + head,
                                                  t.max_grad_norm)
            done = step + 1
            if data.eval_texts and (done == t.steps or (t.eval_every and done % t.eval_every == 0)):
                held_out = classifier_accuracy(torch_classifier_logits(model), tokenizer,
                                               data.eval_texts[:t.eval_examples], data.eval_labels[:t.eval_examples],
                                               max_length=t.seq_len, batch_size=t.batch_size)
                record.update(eval_loss=held_out["loss"], eval_accuracy=held_out["accuracy"])
            losses.append(task_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{task_loss:.4f}", budget=allocation.budget)
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            if on_step is not None:
                on_step(record)
    model.eval()
    adapter_dir = output_dir / "adapter"
    save_adapter(adapters, adapter_config, adapter_dir, base_model_name_or_path=model_path, model=model,
                 modules_to_save=encoder.modules_to_save, labels=data.labels)
    return TrainResult(output_dir=output_dir, adapter_dir=adapter_dir, base_model=model_path, steps=t.steps,
                       first_loss=losses[0] if losses else math.nan, final_loss=losses[-1] if losses else math.nan,
                       live_ranks=adapters.live_ranks(), resumed_from=None)


def _comparable(record: dict[str, Any]) -> dict[str, Any]:
    record = json.loads(json.dumps(record))
    record.get("train", {}).pop("checkpoint_every", None)
    return record


def _rewrite_metrics(path: Path, keep_before: int) -> None:
    """Keep the records of the steps before ``keep_before`` (a resumed run appends the rest again).

    A process killed while appending leaves a partial last line; it is dropped with the later steps.
    """
    lines = []
    if keep_before and path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("step", keep_before) < keep_before:
                lines.append(line)
    with atomic_file(path) as temp:
        temp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


# --- transformers.Trainer ---------------------------------------------------------------------------

class AdaLoraCallback(TrainerCallback):
    """Runs the rank allocator on every optimizer step of a ``transformers.Trainer``.

    Uses ``on_optimizer_step`` (gradients present, before ``zero_grad``) with ``state.global_step`` as the
    0-based optimizer step. Checks at train start that the Trainer runs exactly ``total_step`` steps.
    """

    def __init__(self, controller: AdaLoraController):
        self.controller = controller
        self.history: list[AllocationStep] = []

    def on_train_begin(self, args, state, control, **kwargs):
        refuse_sharding(args)
        if state.max_steps and state.max_steps != self.controller.config.total_step:
            raise ConfigError(f"adapter.total_step = {self.controller.config.total_step} but the Trainer runs "
                              f"{state.max_steps} optimizer steps; set TrainingArguments(max_steps=total_step)")

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        inner = getattr(optimizer, "optimizer", optimizer)
        self.history.append(self.controller.after_optimizer_step(state.global_step, inner))


class AdaLoraTrainer(Trainer):
    """``transformers.Trainer`` that adds γ·R(P, Q) to every training loss and runs the rank allocator.

    Args:
        model: a model with AdaLoRA adapters (from :func:`inject_adapters`).
        adalora_config: the AdaLoRA config the adapters were injected with.
        **kwargs: forwarded to ``Trainer``.
    """

    def __init__(self, model: nn.Module, adalora_config: AdaLoraConfig, **kwargs):
        adapters = find_adapters(model)
        if not adapters:
            raise ValueError("AdaLoraTrainer needs a model with AdaLoRA adapters; call inject_adapters first")
        self.adalora = AdaLoraController(adapters, adalora_config)
        self.adalora_callback = AdaLoraCallback(self.adalora)
        callbacks = list(kwargs.pop("callbacks", None) or []) + [self.adalora_callback]
        super().__init__(model=model, callbacks=callbacks, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        regularizer = self.adalora.regularizer().to(loss.device)
        # When the loss is already normalized over the accumulation window, Trainer does not divide it by
        # the accumulation steps; divide the regularizer ourselves so each optimizer step adds γ·R once.
        scaled_for_accumulation = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
            self.compute_loss_func is not None)
        if scaled_for_accumulation:
            regularizer = regularizer / self.current_gradient_accumulation_steps
        loss = loss + regularizer
        return (loss, outputs) if return_outputs else loss
