"""The LightningModule: load a `transformers` model, inject the pyramid, train adapter + head.

    YAML -> LightningCLI -> MSPLoRAModule(model, pyramid, ...) + DataModule
                              |  setup(): load model (task from the DataModule), inject
                              v
                 Trainer: AdamW on trainable params only, linear warmup/decay
                              |
                 checkpoint = adapter + head only; best -> adapter dir; metrics.json

Problems: sequence classification and regression (a DataModule with a GLUE-style
``spec``), and causal LM (any other DataModule; batches carry ``labels``).
"""

from __future__ import annotations

import atexit
import functools
import math
from typing import Literal

import lightning as L
import torch
from torch import nn

import msplora
from msplora.config import MSPLoRAConfig
from msplora.hf import check_model_name, resolve_model
from msplora.pyramid import short_label

# Linear maps targeted by default, per architecture family (docs/design.md: q/v in the paper).
DEFAULT_TARGETS = (["query", "value"], ["q_proj", "v_proj"], ["c_attn"])


def default_targets(model: nn.Module) -> list[str]:
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    for targets in DEFAULT_TARGETS:
        if set(targets) <= names:
            return targets
    raise msplora.ConfigError(
        f"model.pyramid.targets: no default targets for {type(model).__name__}. Fix: set pyramid.targets"
    )


def pyramid_label(pyramid: dict | None) -> str:
    """One line for a pyramid dict (``MSPLoRAConfig.to_dict()``): its levels (``pyramid.short_label``)
    and targets, e.g. ``G8 M4/3g L2 on ['query', 'value']``."""
    if not pyramid:
        return "(paper defaults)"
    return f"{short_label(pyramid.get('levels', []))} on {pyramid.get('targets')}"


def head_modules(model: nn.Module) -> list[str]:
    """Top-level children outside the backbone that hold parameters: the task head."""
    prefix = getattr(model, "base_model_prefix", None)
    return [n for n, c in model.named_children() if n != prefix and any(True for _ in c.parameters())]


def _destroy_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@functools.cache
def destroy_process_group_at_exit() -> None:
    """Destroy the default process group at exit, while the interpreter is still whole. A gloo
    (or NCCL) group left to interpreter finalization can abort a process whose run succeeded:
    SIGABRT, "terminate called without an active exception" (pytorch/pytorch#190489). Registered
    once; a no-op if the group is already gone."""
    atexit.register(_destroy_process_group)


class MSPLoRAModule(L.LightningModule):
    def __init__(
        self,
        model: str = "minilm",
        pyramid: MSPLoRAConfig | None = None,
        problem: str | None = None,
        num_labels: int | None = None,
        lr: float = 4e-4,
        head_lr: float | None = None,
        weight_decay: float = 0.1,
        warmup_ratio: float = 0.06,
        dtype: str = "float32",
        gradient_checkpointing: bool = False,
        train_adapter: bool = True,
        quantize: Literal["nf4", "fp4", "int8"] | None = None,
        compile: bool | str = False,
        compile_bucket: int = 32,
    ) -> None:
        """Fine-tune a frozen transformer with an MSPLoRA adapter.

        Args:
            model: Hub name (``FacebookAI/roberta-base``), local folder, or an embedded alias
                (``minilm``, ``smollm2``).
            pyramid: the adapter (``MSPLoRAConfig``); None = paper defaults with targets
                detected from the architecture (query/value, q_proj/v_proj, c_attn).
            problem: ``classification``, ``regression`` or ``causal_lm``; None = from the
                DataModule (a GLUE-style ``spec`` means classification/regression).
            num_labels: classes (1 = regression); None = from the DataModule's task.
            lr: learning rate of the adapter.
            head_lr: learning rate of the task head; None = ``lr``.
            weight_decay: AdamW weight decay on matrices (not on biases / norms).
            warmup_ratio: fraction of the steps with linear warmup, then linear decay to 0.
            dtype: base-model dtype (``float32``, ``bfloat16``); adapters stay fp32.
            gradient_checkpointing: trade compute for memory in the backbone.
            train_adapter: False keeps the adapter at its init (B = 0: the base model) and trains
                the head alone: the head-only floor of a comparison (ablations/head_only.yaml).
            quantize: load the frozen base quantized with bitsandbytes (QLoRA-style): ``nf4`` or
                ``fp4`` (4-bit, computing in ``dtype``) or ``int8`` (LLM.int8); the task head and
                ``pyramid.modules_to_save`` stay unquantized. The adapter trains in fp32 beside
                the quantized weights. None = no quantization. Needs ``pip install 'msplora[quant]'``.
            compile: ``torch.compile`` the model's forward (True: inductor; or a backend name such as
                ``aot_eager``). Off by default; numbers equal eager up to float noise.
            compile_bucket: with ``compile``, batches are right-padded (masked) to a multiple of this
                many tokens, so dynamic padding gives a few shapes instead of a recompile per length.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["pyramid"])
        self.pyramid = pyramid
        self.hparams["pyramid"] = None if pyramid is None else pyramid.to_dict()
        self.model: nn.Module | None = None
        self.spec = None
        self._loader_states: list[dict] | None = None  # from a checkpoint, for on_train_start
        self.run_record = None  # metrics.json's content (a msplora.training.record.RunRecord), kept by MetricsJSON
        self.strict_loading = False  # checkpoints hold only adapter + head
        self.val_metrics = nn.ModuleList()
        self.test_metrics = nn.ModuleList()
        # Per-example predictions of the latest validation / test, by logged prefix ("val",
        # "test_matched"), encoded (msplora.training.predictions); metrics.json keeps those of the
        # best validation and of the test, so runs can be compared paired.
        self.eval_predictions: dict[str, dict[str, dict]] = {"val": {}, "test": {}}
        self._collected: dict[tuple[str, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}

    # -- building ---------------------------------------------------------------------------
    def _resolve_problem(self) -> None:
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        self.spec = getattr(dm, "spec", None)
        if self.hparams.problem is None:
            if self.spec is None:
                self.hparams.problem = "causal_lm"
            else:
                self.hparams.problem = "regression" if self.spec.is_regression else "classification"
        if self.hparams.num_labels is None and self.spec is not None:
            self.hparams.num_labels = self.spec.num_labels

    def prepare_data(self) -> None:
        # Lightning calls this before it creates the run folder: check that the pyramid fits the
        # model (targets, groups vs layers) on a weightless copy, so a refusal writes nothing.
        if self.model is not None:
            return
        check_model_name(self.hparams.model)  # a Hub name offline must be in the Hub cache
        if self.hparams.get("quantize") is not None:  # bitsandbytes must import before anything is written
            from msplora.quant import import_bnb

            import_bnb()
        if self.pyramid is None:
            return
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

        from msplora.inject import target_layout

        self._resolve_problem()
        hp = self.hparams
        config = AutoConfig.from_pretrained(resolve_model(hp.model), num_labels=hp.num_labels or 2)
        auto = AutoModelForCausalLM if hp.problem == "causal_lm" else AutoModelForSequenceClassification
        with torch.device("meta"):  # shapes and names only: no memory, no weights read
            model = auto.from_config(config)
        target_layout(model, self.pyramid)

    def configure_model(self) -> None:
        if self.model is not None:
            return
        self._resolve_problem()
        self.model = self.build_model()

    def build_model(self) -> nn.Module:
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        hp = self.hparams
        path = resolve_model(hp.model)
        dtype = getattr(torch, hp.dtype)
        quant = self._quantization(path) if hp.get("quantize") is not None else {}
        auto = AutoModelForCausalLM if hp.problem == "causal_lm" else AutoModelForSequenceClassification
        labels = {}
        if hp.problem != "causal_lm":
            if hp.num_labels is None:
                raise msplora.ConfigError("model.num_labels: unknown. Fix: use a GLUE-style DataModule or set it")
            labels = {"num_labels": hp.num_labels}
        # Under FSDP only rank 0 reads the weights; the other ranks build the same model on the meta
        # device (no memory, no disk) and receive their shards from rank 0 when the strategy shards it.
        self.base_skeleton = not quant and self._base_from_rank0()
        if self.base_skeleton:
            from transformers import AutoConfig

            with torch.device("meta"):
                model = auto.from_config(AutoConfig.from_pretrained(path, **labels), dtype=dtype)
        else:
            model = auto.from_pretrained(path, dtype=dtype, **labels, **quant)
        if hp.problem != "causal_lm" and model.config.pad_token_id is None:  # decoders need it to find the last token
            model.config.pad_token_id = model.config.eos_token_id
        cfg = self.pyramid or MSPLoRAConfig(targets=default_targets(model))
        if hp.problem != "causal_lm" and not cfg.modules_to_save:
            cfg.modules_to_save = head_modules(model)
        msplora.inject(model, cfg)
        if not hp.train_adapter:
            msplora.get_bank(model).requires_grad_(False)
        self.pyramid = msplora.get_bank(model).config  # cfg, or its copy with budget_of resolved
        self.hparams["pyramid"] = self.pyramid.to_dict()
        model.train()  # from_pretrained returns eval mode; Lightning keeps submodule modes as found
        if hp.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if hp.get("compile"):
            if hp.compile_bucket < 1:
                raise msplora.ConfigError(
                    f"model.compile_bucket: {hp.compile_bucket} is not a token count. Fix: use e.g. 32 (1: no bucketing)"
                )
            # In place (nn.Module.compile): the module stays itself, so the bank, save_adapter and the
            # checkpoint hooks see the same object; only its call goes through the compiled forward.
            model.compile(backend="inductor" if hp.compile is True else hp.compile)
        if self.spec is not None:
            from msplora.training.metrics import build_metrics

            n_val = len(getattr(self._trainer.datamodule, "val_names", [None]))
            n_test = len(getattr(self._trainer.datamodule, "test_names", [None]))
            self.val_metrics = nn.ModuleList(build_metrics(self.spec) for _ in range(n_val))
            self.test_metrics = nn.ModuleList(build_metrics(self.spec) for _ in range(n_test))
        return model

    def _base_from_rank0(self) -> bool:
        """True on the ranks other than 0 of a multi-process ``msplora_fsdp`` fit: they build the
        base on the meta device and get its weights from rank 0 (:mod:`msplora.training.fsdp`)."""
        from msplora.training.fsdp import PyramidFSDPStrategy

        strategy = self._trainer.strategy if self._trainer is not None else None
        return isinstance(strategy, PyramidFSDPStrategy) and strategy.world_size > 1 and strategy.global_rank != 0

    def _quantization(self, path: str) -> dict:
        """``from_pretrained``'s arguments for ``quantize``: transformers' bitsandbytes config,
        skipping the task head (``head_modules`` of a weightless copy) and ``modules_to_save``,
        which must train. (transformers' own default skips only the model's last parameter's
        module, which misses e.g. BERT's ``classifier``.)"""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

        from msplora.quant import quantization_config

        hp = self.hparams
        auto = AutoModelForCausalLM if hp.problem == "causal_lm" else AutoModelForSequenceClassification
        with torch.device("meta"):
            skeleton = auto.from_config(AutoConfig.from_pretrained(path, num_labels=hp.num_labels or 2))
        skip = head_modules(skeleton) + list(self.pyramid.modules_to_save if self.pyramid else [])
        return {"quantization_config": quantization_config(hp.quantize, getattr(torch, hp.dtype), skip)}

    # -- naming of logged values --------------------------------------------------------------
    def _prefix(self, stage: str, idx: int) -> str:
        dm = self._trainer.datamodule
        names = dm.val_names if stage == "val" else dm.test_names
        suffix = names[idx].split("_", 1)[1] if "_" in names[idx] else ""
        return f"{stage}_{suffix}" if suffix else stage

    @property
    def monitor(self) -> tuple[str, str]:
        """(logged key, mode) used for model selection."""
        if self.spec is None:
            return "val/loss", "min"
        return f"{self._prefix('val', 0)}/{self.spec.metric}", "max"

    # -- steps ----------------------------------------------------------------------------------
    def forward(self, batch: dict) -> torch.Tensor:
        if self.hparams.get("compile"):
            batch = self._bucketed(batch)
        return self.model(**batch)

    def _bucketed(self, batch: dict) -> dict:
        """Right-pad every (batch, length) tensor to a multiple of ``compile_bucket`` tokens: pad ids
        in ``input_ids``, 0 in the attention mask (so the pads are ignored), -100 in LM labels."""
        m = self.hparams.compile_bucket
        length = batch["input_ids"].shape[1]
        pad = -length % m
        if pad == 0:
            return batch
        fill = {"input_ids": self.model.config.pad_token_id or 0, "labels": -100}
        return {
            k: nn.functional.pad(v, (0, pad), value=fill.get(k, 0))
            if torch.is_tensor(v) and v.dim() == 2 and v.shape[1] == length
            else v
            for k, v in batch.items()
        }

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self(batch).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def _eval_step(self, stage: str, batch: dict, dataloader_idx: int) -> None:
        out = self(batch)
        prefix = self._prefix(stage, dataloader_idx) if self.spec is not None else stage
        bs = batch["input_ids"].shape[0]
        self.log(f"{prefix}/loss", out.loss, batch_size=bs, add_dataloader_idx=False, sync_dist=True)
        if self.spec is None:
            return
        labels = batch["labels"]
        preds = out.logits.squeeze(-1) if self.spec.is_regression else out.logits.argmax(-1)
        metrics = (self.val_metrics if stage == "val" else self.test_metrics)[dataloader_idx]
        metrics.update(preds.float() if self.spec.is_regression else preds, labels)
        if not self.trainer.sanity_checking:
            self._collected.setdefault((stage, dataloader_idx), []).append((preds.detach().cpu(), labels.cpu()))
        self.log_dict(
            {f"{prefix}/{k}": m for k, m in metrics.items()}, batch_size=bs, add_dataloader_idx=False, prog_bar=True
        )

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("val", batch, dataloader_idx)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("test", batch, dataloader_idx)

    def _finish_predictions(self, stage: str) -> None:
        """This epoch's predictions of every ``stage`` loader, in dataset order, encoded."""
        from msplora.training.predictions import encode, gather_in_order

        done = {}
        for (st, idx), parts in sorted(self._collected.items()):
            if st != stage:
                continue
            dm = self._trainer.datamodule
            name = (dm.val_names if stage == "val" else dm.test_names)[idx]
            n = len(dm.datasets[name]) if getattr(dm, "datasets", None) is not None else sum(len(p) for p, _ in parts)
            preds = gather_in_order(self, torch.cat([p for p, _ in parts]).to(self.device), n).cpu()
            labels = gather_in_order(self, torch.cat([y for _, y in parts]).to(self.device), n).cpu()
            done[self._prefix(stage, idx)] = encode(preds.numpy(), labels.numpy(), self.spec.is_regression)
        self._collected = {k: v for k, v in self._collected.items() if k[0] != stage}
        self.eval_predictions[stage] = done

    def on_validation_epoch_start(self) -> None:
        self._collected = {k: v for k, v in self._collected.items() if k[0] != "val"}

    def on_validation_epoch_end(self) -> None:
        if self.spec is not None and not self.trainer.sanity_checking:
            self._finish_predictions("val")

    def on_test_epoch_start(self) -> None:
        self._collected = {k: v for k, v in self._collected.items() if k[0] != "test"}

    def on_test_epoch_end(self) -> None:
        if self.spec is not None:
            self._finish_predictions("test")

    # -- optimisation ---------------------------------------------------------------------------
    def configure_optimizers(self):
        """AdamW, one parameter group per (lr, weight decay): the adapter at ``lr`` (every B at
        ``lr * pyramid.lr_ratio_B``, LoRA+), the head at ``head_lr``; each level's rows then
        step ``lr_scale`` (x the ``lr_rule`` factor) as far (``msplora.layers.scale_level_steps``).
        Linear warmup, then linear decay to 0."""
        from msplora.optim import create_optimizer, linear_warmup_decay

        hp = self.hparams
        # the parameter groups (order, lrs, weight decays) and hooks of msplora.optim, public for Trainer users
        opt = create_optimizer(self, lr=hp.lr, head_lr=hp.head_lr, weight_decay=hp.weight_decay)
        total = self.trainer.estimated_stepping_batches
        total = int(total) if math.isfinite(total) else 10_000
        sched = linear_warmup_decay(opt, int(hp.warmup_ratio * total), total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- checkpoints: adapter + head only ---------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """``strict_loading`` is off because a checkpoint holds only the trainable tensors; check
        here that it holds exactly those, with their shapes, and was made with this pyramid, so a
        checkpoint of another pyramid, head or model is refused instead of loading partly (or not
        at all) and training on."""
        # Lightning saved the train loaders' states here; see on_train_start.
        loops = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
        self._loader_states = loops.get("combined_loader")
        want = {n: tuple(p.shape) for n, p in self.named_parameters() if p.requires_grad}
        have = {k: tuple(v.shape) for k, v in checkpoint.get("state_dict", {}).items()}
        saved = checkpoint.get("hyper_parameters", {}).get("pyramid")
        problems = []
        if missing := sorted(want.keys() - have.keys()):
            problems.append(f"{len(missing)} trainable tensor(s) missing (e.g. {missing[:3]})")
        if unexpected := sorted(have.keys() - want.keys()):
            problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if reshaped := [f"{k} {have[k]} vs {want[k]}" for k in sorted(want.keys() & have.keys()) if have[k] != want[k]]:
            problems.append(f"{len(reshaped)} of another shape (e.g. {reshaped[:2]})")
        if saved is not None and saved != self.hparams.get("pyramid"):
            problems.append("another pyramid")
        if problems:
            raise msplora.ConfigError(
                f"ckpt_path: the checkpoint does not fit this model: {'; '.join(problems)}; checkpoint pyramid "
                f"{pyramid_label(saved)}, this model's {pyramid_label(self.hparams.get('pyramid'))}. "
                "Fix: resume with the model and pyramid the checkpoint was trained with, or start a new fit"
            )

    def on_train_start(self) -> None:
        """Hand the checkpoint's data position to the train loaders. Lightning does so itself unless
        the train loader was built before the loops were restored, which happens whenever
        configure_optimizers reads ``trainer.estimated_stepping_batches`` (Lightning-AI/
        pytorch-lightning#20550, open): the state would then be dropped and the resumed epoch
        would start over. Loading it twice (once the bug is fixed) is harmless: the loader takes
        the state at its first batch, which comes after this hook."""
        from msplora.training.loader import ResumableDataLoader

        states, self._loader_states = getattr(self, "_loader_states", None), None
        if not states:
            return
        loaders = self.trainer.train_dataloader
        loaders = list(loaders.values()) if isinstance(loaders, dict) else loaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        stateful = [dl for dl in loaders if hasattr(dl, "state_dict") and hasattr(dl, "load_state_dict")]
        for loader, state in zip(stateful, states):
            if isinstance(loader, ResumableDataLoader):
                loader.load_state_dict(state)

    def teardown(self, stage: str) -> None:
        """Lightning calls this only after a fit, validate, test or predict that ended well: a
        rank that failed must not take part in a teardown its peers may never reach."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            destroy_process_group_at_exit()

    def trainable_summary(self) -> dict:
        """Trainable counts of this run and of plain LoRA r=8 with the same head and targets."""
        bank = msplora.get_bank(self.model)
        adapter = msplora.adapter_parameters(self.model) if self.hparams.get("train_adapter", True) else 0
        head = msplora.trainable_parameters(self.model) - adapter
        lora = {"share": "layer", "rank": 8}
        lora_adapter = sum(
            msplora.parameter_count([lora], len(kb.layer_ids), {k: (kb.d_in, kb.d_out)}) for k, kb in bank.kinds.items()
        )
        return {
            "trainable_params": adapter + head,
            "adapter_params": adapter,
            "lora_r8_params": lora_adapter + head,
            "lora_r8_adapter_params": lora_adapter,
            "params_per_level": {
                lv: sum(r["params"] for r in msplora.parameter_report(self.model) if r["level"] == lv) if adapter else 0
                for lv in [lv.name for lv in bank.config.levels]
            },
        }

    def configure_callbacks(self) -> list:
        """Selection follows the task's metric, which is known only once the data is."""
        from lightning.pytorch.callbacks import ModelCheckpoint

        from msplora.training.callbacks import BestAdapter, LastCheckpoint, MetricsJSON

        self._resolve_problem()
        monitor, mode = self.monitor
        best = BestAdapter(monitor, mode)
        ckpt = ModelCheckpoint(monitor=monitor, mode=mode, filename="best", auto_insert_metric_name=False)
        # last.ckpt must be written after the best checkpoint and the best adapter have taken in a
        # validation, so that it carries their updated state. Lightning runs checkpoint callbacks
        # last, in list order, trainer callbacks before these. So the trainer's LastCheckpoint (the
        # CLI's `last_checkpoint` settings) moves here, after ModelCheckpoint, which stays
        # `trainer.checkpoint_callback` (ckpt_path="best").
        trainer = self._trainer
        last = next((c for c in (trainer.callbacks if trainer else []) if isinstance(c, LastCheckpoint)), None)
        if last is not None:
            trainer.callbacks.remove(last)
        return [ckpt, last or LastCheckpoint(), best, MetricsJSON(best)]
