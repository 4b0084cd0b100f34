"""Saving a training run: train_state/ for an exact resume, then the Hugging Face checkpoint beside it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from leangpt import distributed, train_state
from leangpt.checkpoint import save_checkpoint
from leangpt.data.tokenizer import TextTokenizer
from leangpt.fsutil import atomic_dir
from leangpt.model import GPT


class Checkpointer:
    """Writes `out`: train_state/step-N/ (weights, optimizer, RNG states, state.json; the last keep_last kept),
    then config.json, model.safetensors, the tokenizer, leangpt.json and metrics.jsonl.

    Every rank calls save() (FSDP gathers the shards, every rank's RNG state is kept); rank 0 writes. The run's
    first save into a fresh `out` replaces it whole, so an overwritten directory never mixes two runs; later
    saves write train_state/ first and then the Hugging Face files one by one, each renamed into place, so a
    kill at any moment leaves a directory that resumes and loads.
    """

    def __init__(self, out: Path, tokenizer: TextTokenizer, keep_last: int, world: distributed.World,
                 sharded: bool, meta: dict[str, Any], run_state: dict[str, Any], resumed: bool) -> None:
        """meta: leangpt.json's provenance; run_state: what state.json records that stays fixed over the run."""
        self.out, self.tokenizer, self.keep_last, self.world = out, tokenizer, keep_last, world
        self.sharded, self.meta, self.run_state = sharded, meta, run_state
        self.out_is_ours = resumed  # out already holds this run: update it in place

    def save(self, holder: torch.nn.Module, optimizers: list[torch.optim.Optimizer], model: GPT, state: dict[str, Any],
             history: list[dict[str, Any]], metrics: dict[str, Any]) -> None:
        """holder: every trained module (the model under "model."); state: the step's counters (step, ...)."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        tensors, optim_state = get_state_dict(holder, optimizers, options=options)
        rngs = self._rng_states()
        if self.world.is_main:
            full_state = {**state, "rng": rngs, **self.run_state}
            step_meta = {**self.meta, "step": state["step"], "metrics": metrics}
            self._write(state["step"], tensors, optim_state, full_state, history, self._export(model, tensors), step_meta)
        distributed.barrier(self.world)

    def _rng_states(self) -> list[dict[str, Any]]:
        """Each rank's RNG states, in rank order (dropout differs across ranks)."""
        if not self.world.distributed:
            return [train_state.capture_rng()]
        rngs: list[Any] = [None] * self.world.size
        torch.distributed.all_gather_object(rngs, train_state.capture_rng())
        return rngs

    def _export(self, model: GPT, tensors: dict[str, torch.Tensor]) -> GPT:
        """The model to write as a Hugging Face checkpoint: sharded parameters are gathered into a plain copy."""
        if not self.sharded:
            return model
        export = GPT(model.config)
        export.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        return export

    def _write(self, step: int, tensors: dict[str, torch.Tensor], optim_state: dict[str, Any], state: dict[str, Any],
               history: list[dict[str, Any]], export: GPT, meta: dict[str, Any]) -> None:
        if not self.out_is_ours:
            with atomic_dir(self.out) as tmp:
                train_state.write(tmp, step, tensors, optim_state, state, history, self.keep_last)
                self._write_model(tmp, export, meta, history)
            self.out_is_ours = True
            return
        train_state.write(self.out, step, tensors, optim_state, state, history, self.keep_last)
        staging = self.out / ".export"
        with atomic_dir(staging) as tmp:
            self._write_model(tmp, export, meta, history)
        for f in staging.iterdir():  # file by file: train_state/ stays in place
            os.replace(f, self.out / f.name)
        staging.rmdir()

    def _write_model(self, directory: Path, export: GPT, meta: dict[str, Any], history: list[dict[str, Any]]) -> None:
        save_checkpoint(directory, export, self.tokenizer, meta)
        (directory / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
