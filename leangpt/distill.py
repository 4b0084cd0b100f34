"""`leangpt distill`: train a smaller student from a frozen teacher.

Distillation is a loss and a frozen teacher plugged into `leangpt.train.train`; there is no second
training loop. The loss, per target token (DistilGPT2's recipe, Hinton et al. 2015):

    alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y) [+ beta * hidden-state loss]

The T^2 factor keeps the soft-target gradients at the same scale as the hard-target ones when T changes.
Students start from a subset of the teacher's blocks (plus embeddings, final norm and head) when the
shapes allow, which is DistilGPT2's every-other-layer initialisation; otherwise from random weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from leangpt import cli, distributed, train_state
from leangpt.cli import setting
from leangpt.checkpoint import load_checkpoint, read_meta
from leangpt.config import ModelConfig
from leangpt.data.batches import IGNORE_INDEX
from leangpt.data.shards import Dataset
from leangpt.data.tokenizer import TextTokenizer
from leangpt.device import pick_device
from leangpt.errors import UserError
from leangpt.fsutil import check_output_dir
from leangpt.hf import config_from_hf, hf_model_type
from leangpt.model import GPT
from leangpt.train import TrainConfig, parse_training_command, train

HIDDEN_LOSSES = ("none", "cosine", "mse")
HIDDEN_LAYERS = ("final", "blocks")
STUDENT_INITS = ("auto", "teacher", "random")


@dataclass
class DistillConfig:
    temperature: float = setting(2.0, "softens both distributions; DistilGPT2 uses 2")
    alpha: float = setting(0.5, "weight of the soft-target (KL) term; 1 - alpha weighs the data's cross-entropy")
    reverse_kl: bool = setting(False, "KL(student || teacher): mode-seeking instead of mass-covering")
    hidden_loss: str = setting("none", "match hidden states as well", choices=HIDDEN_LOSSES)
    hidden_weight: float = setting(1.0, "weight of the hidden-state term")
    hidden_layers: str = setting("final", "final: final-norm outputs; blocks: each student block vs its teacher block",
                                 choices=HIDDEN_LAYERS)

    def validate(self) -> None:
        checks = [
            (self.temperature > 0, "distill.temperature must be > 0"),
            (0 <= self.alpha <= 1, "distill.alpha must be in [0, 1]"),
            (self.hidden_loss in HIDDEN_LOSSES, "distill.hidden_loss must be none, cosine or mse"),
            (self.hidden_weight >= 0, "distill.hidden_weight must be >= 0"),
            (self.hidden_layers in HIDDEN_LAYERS, "distill.hidden_layers must be final or blocks"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"bad setting: {message}")


@dataclass
class DistillTrainConfig(TrainConfig):
    """train's settings (max_steps, lr, ...) plus the distillation ones under `distill.`."""

    distill: DistillConfig = setting(DistillConfig(), "distillation settings (distill.temperature, distill.alpha, ...)")

    def validate(self) -> None:
        super().validate()
        self.distill.validate()


# ---------------------------------------------------------------- the loss

def soft_target_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                   reverse: bool = False) -> torch.Tensor:
    """Per-position KL between temperature-softened distributions, (..., V) -> (...), not yet scaled by T^2.

    Forward: KL(p_teacher || p_student). Reverse: KL(p_student || p_teacher).
    """
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if reverse:
        log_s, log_t = log_t, log_s
    return F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the target tokens (targets != IGNORE_INDEX). (B, T, V), (B, T)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                 temperature: float = 2.0, alpha: float = 0.5, reverse_kl: bool = False) -> torch.Tensor:
    """alpha * T^2 * KL + (1 - alpha) * CE, each a mean over the target tokens (targets != IGNORE_INDEX).

    student_logits, teacher_logits: (B, T, V); targets: (B, T).
    """
    ce = cross_entropy(student_logits, targets)
    if alpha == 0:
        return ce
    mask = targets != IGNORE_INDEX  # (B, T)
    kl = (soft_target_kl(student_logits, teacher_logits, temperature, reverse_kl) * mask).sum() / mask.sum().clamp(min=1)
    return alpha * temperature**2 * kl + (1 - alpha) * ce


def hidden_state_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str, targets: torch.Tensor) -> torch.Tensor:
    """Mean over target tokens of 1 - cos(s, t), or of the mean squared difference per dimension. (B, T, C) each."""
    mask = (targets != IGNORE_INDEX).float()  # (B, T)
    if kind == "cosine":
        per_token = 1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)
    else:
        per_token = (student.float() - teacher.float()).pow(2).mean(-1)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


@contextlib.contextmanager
def capture_outputs(modules: list[nn.Module]) -> Iterator[list[torch.Tensor]]:
    """Record each module's output during the forward passes inside the block (hooks: no change to model.py).

    Hooks sit on the inner modules, so calling a DDP-wrapped model still goes through its own forward.
    """
    outputs: list[torch.Tensor] = [torch.empty(0)] * len(modules)

    def hook(i: int):
        def record(_module, _inputs, output):
            outputs[i] = output
        return record

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


def hidden_modules(model: GPT, which: str, layers: list[int]) -> list[nn.Module]:
    """The modules whose outputs are the hidden states to match: the final norm, or the listed blocks."""
    return [model.norm_f] if which == "final" else [model.blocks[i] for i in layers]


def teacher_targets(n_teacher: int, n_student: int, layers: list[int] | None) -> list[int]:
    """For each student block, the teacher block whose output it should reproduce.

    Student block k copied from teacher block layers[k] stands in for teacher blocks layers[k] .. layers[k+1]-1,
    so it targets the last of them. Without a layer map the student's blocks spread evenly over the teacher's.
    """
    if layers is not None:
        return [nxt - 1 for nxt in layers[1:]] + [n_teacher - 1]
    return [round((k + 1) * n_teacher / n_student) - 1 for k in range(n_student)]


class DistillLoss:
    """loss_fn(model, x, y) for `train`: runs the frozen teacher on x and scores the student against it."""

    def __init__(self, teacher: GPT, cfg: DistillConfig, student_config: ModelConfig,
                 layers: list[int] | None = None) -> None:
        self.teacher = teacher.eval().requires_grad_(False)
        self.cfg = cfg
        n_student = student_config.n_layer
        self.student_layers = list(range(n_student))
        self.teacher_layers = teacher_targets(teacher.config.n_layer, n_student, layers)
        self.projection: nn.Linear | None = None
        if cfg.hidden_loss != "none" and student_config.n_embd != teacher.config.n_embd:
            # Learned map from the student's width to the teacher's; trained with the student, not saved with it.
            self.projection = nn.Linear(student_config.n_embd, teacher.config.n_embd, bias=False,
                                        device=teacher.lm_head.weight.device)

    @property
    def uses_hidden(self) -> bool:
        return self.cfg.hidden_loss != "none" and self.cfg.hidden_weight > 0

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        if c.alpha == 0 and not self.uses_hidden:
            return cross_entropy(model(x), y)  # plain training: the teacher is not needed
        inner: GPT = getattr(model, "module", model)  # DDP wraps the student
        t_mods = hidden_modules(self.teacher, c.hidden_layers, self.teacher_layers) if self.uses_hidden else []
        s_mods = hidden_modules(inner, c.hidden_layers, self.student_layers) if self.uses_hidden else []
        with torch.no_grad(), capture_outputs(t_mods) as t_hidden:
            t_logits = self.teacher(x)  # (B, T, V)
        with capture_outputs(s_mods) as s_hidden:
            s_logits = model(x)  # (B, T, V)
        loss = distill_loss(s_logits, t_logits, y, c.temperature, c.alpha, c.reverse_kl)
        if self.uses_hidden:
            proj = self.projection or nn.Identity()
            h = sum(hidden_state_loss(proj(s), t, c.hidden_loss, y) for s, t in zip(s_hidden, t_hidden))
            loss = loss + c.hidden_weight * h / len(s_hidden)
        return loss


# ---------------------------------------------------------------- the student

# Fields that must agree for a teacher block to be copied into a student block.
_BLOCK_FIELDS = ("n_embd", "n_head", "n_kv_head", "head_dim", "intermediate_size", "bias", "norm", "mlp", "pos",
                 "rope_theta", "norm_eps", "tie_embeddings", "vocab_size", "qk_norm", "norm_weight", "embed_norm")


def parse_layers(text: str, n_teacher: int) -> list[int]:
    try:
        layers = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--student-layers expects comma-separated block indices like 0,2,4, got {text!r}") from None
    if not layers:
        raise UserError("--student-layers is empty")
    if any(not 0 <= i < n_teacher for i in layers):
        raise UserError(f"--student-layers {text}: the teacher has blocks 0..{n_teacher - 1}")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise UserError(f"--student-layers {text}: indices must be strictly increasing")
    return layers


def every_other_layer(n_teacher: int, n_student: int) -> list[int]:
    """n_student teacher blocks spread evenly from block 0: DistilGPT2's 0,2,4,6,8,10 of 12."""
    return [k * n_teacher // n_student for k in range(n_student)]


def layer_subset_config(config: ModelConfig, layers: list[int]) -> ModelConfig:
    """The config of a model made of the listed blocks (per-layer widths of a structurally pruned model follow)."""
    def pick(sizes: list[int] | None) -> list[int] | None:
        return None if sizes is None else [sizes[i] for i in layers]
    return dataclasses.replace(config, n_layer=len(layers), layer_n_head=pick(config.layer_n_head),
                               layer_intermediate_size=pick(config.layer_intermediate_size))


def can_copy_layers(teacher: ModelConfig, student: ModelConfig, layers: list[int]) -> bool:
    """Whether student block k can be a copy of teacher block layers[k], and the embeddings copied too."""
    if len(layers) != student.n_layer or not 0 <= layers[0] <= layers[-1] < teacher.n_layer \
            or any(b <= a for a, b in zip(layers, layers[1:])):
        return False
    same_fields = all(getattr(teacher, f) == getattr(student, f) for f in _BLOCK_FIELDS)
    same_widths = all(teacher.layer_heads(i) == student.layer_heads(k) and
                      teacher.layer_mlp_width(i) == student.layer_mlp_width(k) for k, i in enumerate(layers))
    positions_fit = student.pos == "rope" or student.block_size <= teacher.block_size
    return same_fields and same_widths and positions_fit


def student_from_teacher(teacher: GPT, config: ModelConfig, layers: list[int]) -> GPT:
    """A student whose block k is a copy of teacher block layers[k]; embeddings, final norm and head copied too."""
    if not can_copy_layers(teacher.config, config, layers):
        raise ValueError("student config does not match the teacher's block shapes")
    student = GPT(config)
    source = teacher.state_dict()
    sd = {}
    for name, target in student.state_dict().items():
        if name.startswith("blocks."):
            _, k, rest = name.split(".", 2)
            sd[name] = source[f"blocks.{layers[int(k)]}.{rest}"]
        elif name == "pos_emb.weight":
            sd[name] = source[name][: target.size(0)]  # a shorter context keeps the first positions
        else:
            sd[name] = source[name]
    student.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=True)
    return student


def read_student_config(path: Path, teacher: ModelConfig) -> ModelConfig:
    """A YAML/JSON mapping of model fields over the teacher's config, or a Hugging Face config.json."""
    data = cli.read_mapping(path, "student config")
    if "model_type" in data:
        return config_from_hf(data)
    fields = teacher.to_dict()
    fields["layer_n_head"] = fields["layer_intermediate_size"] = None  # per-layer widths only when the file says
    # Values the teacher left at their derived defaults follow the student's own n_embd / n_head.
    if teacher.intermediate_size == 4 * teacher.n_embd:
        fields["intermediate_size"] = None
    if teacher.n_kv_head == teacher.n_head:
        fields["n_kv_head"] = None
    fields.update(data)
    return ModelConfig.from_dict(fields)


def build_student(teacher: GPT, layers: str | None = None, preset: str | None = None, config_file: Path | None = None,
                  init: str = "auto", dropout: float = 0.0) -> tuple[GPT, dict[str, Any]]:
    """The student model and a description of how it was made (for leangpt.json). Give at most one of layers,
    preset and config_file (DistillSettings.validate checks it); with none, every other teacher block."""
    tc = teacher.config
    chosen: list[int] | None = None
    if layers is not None:
        chosen = parse_layers(layers, tc.n_layer)
        if init == "random":
            raise UserError("--student-layers copies teacher blocks; use --student-preset/--student-config for random init")
        config = layer_subset_config(tc, chosen)
    elif preset is not None:
        config = ModelConfig.from_preset(preset, vocab_size=tc.vocab_size, eos_token_id=tc.eos_token_id,
                                         bos_token_id=tc.bos_token_id)
    elif config_file is not None:
        config = read_student_config(config_file, tc)
    else:  # default: half the teacher's depth, every other block
        config = layer_subset_config(tc, every_other_layer(tc.n_layer, max(1, tc.n_layer // 2)))
    config = dataclasses.replace(config, dropout=dropout)
    if config.vocab_size != tc.vocab_size:
        raise UserError(f"student vocab_size {config.vocab_size} differs from the teacher's {tc.vocab_size}: "
                        f"teacher and student must share the tokenizer")
    hf_model_type(config)  # fail now, not at the first save, if the options have no Hugging Face format
    chosen = chosen or every_other_layer(tc.n_layer, config.n_layer)
    copyable = can_copy_layers(tc, config, chosen)
    if init == "teacher" and not copyable:
        raise UserError("--student-init teacher: the student's block shapes differ from the teacher's "
                        f"(they must agree on {', '.join(_BLOCK_FIELDS)} and per-layer widths, with no more "
                        f"layers or positions)")
    if init != "random" and copyable:
        return student_from_teacher(teacher, config, chosen), {"init": "teacher_layers", "layers": chosen}
    return GPT(config), {"init": "random"}


# ---------------------------------------------------------------- the command

@dataclass
class _CommandFields:
    """The teacher, the data, the output and the student's shape (a base of DistillSettings: first in --help)."""

    teacher: Path | None = setting(None, "teacher checkpoint directory (frozen)", required=True)
    data: Path | None = setting(None, "dataset directory made with the teacher's tokenizer "
                                      "(`leangpt prepare --tokenizer TEACHER`)", required=True)
    out: Path | None = setting(None, "student checkpoint directory to write", required=True)
    student_layers: str | None = setting(None, "student = these teacher blocks (e.g. 0,2,4) plus the teacher's "
                                               "embeddings, final norm and head. Without any --student-*: every "
                                               "other teacher block", metavar="I,J,...")
    student_preset: str | None = setting(None, "student shape from a model preset (tiny, small-cpu, ...)",
                                         metavar="NAME")
    student_config: Path | None = setting(None, "YAML/JSON of model fields over the teacher's (e.g. n_layer: 3), "
                                                "or a Hugging Face config.json", metavar="FILE")
    student_init: str = setting("auto", "auto: copy evenly spaced teacher blocks when the shapes allow, else "
                                        "random; teacher: require the copy; random: fresh weights",
                                choices=STUDENT_INITS)
    resume: bool = setting(False, "continue the run saved in --out (its train_state/) with its settings; --set may "
                                  "change training settings such as max_steps, not the student or the data")
    overwrite: bool = setting(False, "replace an existing output directory")
    progress: bool = setting(True, "show a progress bar on stderr", cli=False)


@dataclass
class DistillSettings(DistillTrainConfig, _CommandFields):
    """`leangpt distill`: the teacher, the data, the student, and the training settings at top level
    (max_steps, lr, ...; the distillation ones under distill.)."""

    preset: str = setting(TrainConfig.preset, "not used: the student's shape comes from --student-*", cli=False)

    def validate(self) -> None:
        super().validate()
        shapes = {"--student-layers": self.student_layers, "--student-preset": self.student_preset,
                  "--student-config": self.student_config}
        given = [flag for flag, value in shapes.items() if value is not None]
        if self.resume and given:
            raise UserError("--resume continues the saved student; drop --student-*")
        if len(given) > 1:
            raise UserError(f"give at most one of {', '.join(shapes)} (got {' and '.join(given)})")
        if self.model or self.preset != TrainConfig.preset:
            raise UserError("the student's shape comes from --student-layers / --student-preset / --student-config; "
                            "drop preset / model.* settings")
        if self.compile and self.distill.hidden_loss != "none":
            raise UserError("distill.hidden_loss reads hidden states through forward hooks, which torch.compile "
                            "does not see once compiled; set compile=false")
        if self.student_preset is not None:
            ModelConfig.from_preset(self.student_preset)  # an unknown preset fails before any work


def _check_teacher(s: DistillSettings, teacher: GPT, tokenizer: TextTokenizer) -> None:
    """The data must have been tokenized with the teacher's tokenizer, which must fit the teacher's vocabulary."""
    if Dataset(s.data).manifest.get("tokenizer_sha256") != tokenizer.sha256():
        raise UserError(f"{s.data} was not tokenized with the teacher's tokenizer ({s.teacher}); "
                        f"run `leangpt prepare --tokenizer {s.teacher}`")
    if teacher.config.vocab_size < tokenizer.vocab_size:
        raise UserError(f"{s.teacher}: model vocab_size {teacher.config.vocab_size} is smaller than its "
                        f"tokenizer's {tokenizer.vocab_size}")


def _student(s: DistillSettings, teacher: GPT) -> tuple[GPT, dict[str, Any]]:
    """The student and how it was made; on resume its shape and layer map come from s.out (train restores
    the weights and checks the rest)."""
    if not s.resume:
        torch.manual_seed(s.seed)  # random students are reproducible
        return build_student(teacher, s.student_layers, s.student_preset, s.student_config, s.student_init, s.dropout)
    saved = train_state.read_state(train_state.latest(s.out))
    student = GPT(ModelConfig.from_dict(saved["model_config"]))
    if student.config.vocab_size != teacher.config.vocab_size:
        raise UserError(f"--resume: the saved student's vocab_size differs from {s.teacher}'s")
    how = {k: v for k, v in read_meta(s.out).get("student", {}).items() if k in ("init", "layers")}
    return student, how


def distill(s: DistillSettings) -> dict[str, Any]:
    """Distil s.teacher into a student checkpoint at s.out. Returns the checkpoint and teacher paths with
    train's final metrics (what `leangpt distill --json` prints)."""
    s.validate()
    if not s.resume:
        check_output_dir(s.out, s.overwrite)
    device = pick_device(s.device)
    device = distributed.local_device(device, distributed.init(device))  # under torchrun: this rank's GPU
    teacher, tokenizer, _ = load_checkpoint(s.teacher, device)
    _check_teacher(s, teacher, tokenizer)
    student, how = _student(s, teacher)
    block_size = s.block_size or student.config.block_size
    if block_size > teacher.config.block_size:
        raise UserError(f"block_size {block_size} exceeds the teacher's context {teacher.config.block_size}; "
                        f"set block_size <= {teacher.config.block_size}")
    loss_fn = DistillLoss(teacher, s.distill, student.config, how.get("layers"))
    meta = {"kind": "distill", "parent": str(s.teacher), "teacher": str(s.teacher),
            "student": {**how, "n_layer": student.config.n_layer, "n_embd": student.config.n_embd},
            "distill": dataclasses.asdict(s.distill)}
    final = train(DistillTrainConfig.from_settings(s), s.data, s.out, overwrite=s.overwrite, loss_fn=loss_fn,
                  extra_meta=meta, progress=s.progress, model=student, aux_module=loss_fn.projection,
                  resume=s.resume)
    return {"checkpoint": str(s.out), "teacher": str(s.teacher), **final}


def build_parser() -> cli.ArgumentParser:
    return cli.build_parser(DistillSettings, "distill",
                            "Train a smaller student from a teacher checkpoint: soft targets (KL at temperature T) "
                            "plus the data's cross-entropy, optionally hidden states. Training settings as for "
                            "`leangpt train` (--set max_steps=...), distillation ones under distill.* "
                            "(distill.temperature, distill.alpha, distill.reverse_kl, distill.hidden_loss, "
                            "distill.hidden_weight, distill.hidden_layers). Several processes: "
                            "torchrun --nproc-per-node=N -m leangpt distill ...")


def main(argv: list[str] | None = None) -> int:
    s, output = parse_training_command(build_parser(), argv)
    try:
        result = distill(s)
    finally:
        distributed.shutdown()
    if not distributed.is_main_process():
        return 0
    if output.json:
        cli.print_json(result)
    elif "interrupted" not in result:
        cli.log(f"saved {s.out}: val loss {result['val_loss']:.4f}, perplexity {result['val_perplexity']:.2f}, "
                f"bits/byte {result['val_bits_per_byte']:.4f}")
    return 0
