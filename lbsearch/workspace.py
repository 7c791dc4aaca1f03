"""Workspace: everything a command or a search worker needs, built once from a search space.

The teacher and its tokenizer, the data splits as token blocks, the teacher's logits on the
held-out blocks (and on held-out real text), the block library, the cost table of the serving
target and the CPU/GPU defaults. ``student(plan, heal)`` turns the teacher into a plan's student
for the length of a ``with`` block and gives the teacher back exactly, so one process scores plan
after plan (:mod:`lbsearch.objective`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import torch

from .attention import ORIGINAL
from .cost import CostTable, ModelShape, spec_key, target_table
from .corpus.mixture import teacher_text
from .corpus.splits import held_out_groups
from .data import (Corpus, blocks_hash, build_corpus, check_sources, eval_texts, pack_blocks, reblock,
                   split_corpus)
from .distill import BlockLibrary, add_tuning, heal, remove_tuning, trainable_pairs
from .errors import LBSearchError
from .evaluate import PrefixStates, Quality, TeacherLogits, evaluate, perplexity_by_position, teacher_logits
from .io import cache_dir, stable_hash
from .models import load_teacher, load_tokenizer, model_key
from .plan import Plan
from .recipe import HealConfig, TransferConfig
from .space import SearchSpace, load_space
from .surgery import apply_plan


@dataclass(frozen=True, kw_only=True)
class DeviceDefaults:
    """What differs between a GPU and a CPU run, in one place (the space and flags override)."""

    transfer_steps: int
    heal_batch_size: int  # blocks per micro-batch
    heal_grad_accum: int  # micro-batches per step (CPU: 1 block x 4 keeps the peak near 4 GB for SmolLM2)
    eval_batch_size: int
    generate_batch_size: int
    healing_tokens: int  # fidelity "full"
    trial_healing_tokens: int  # fidelity "brief"
    healing_corpus_tokens: int  # heal on a separate corpus of this size from the same sources (0: the train split)

    @classmethod
    def for_device(cls, device: torch.device, space: SearchSpace) -> "DeviceDefaults":
        b, data = space.budgets, space.data
        if device.type == "cuda":
            return cls(transfer_steps=300, heal_batch_size=32, heal_grad_accum=1, eval_batch_size=16,
                       generate_batch_size=512,
                       healing_tokens=b.healing_tokens, trial_healing_tokens=b.trial_healing_tokens,
                       healing_corpus_tokens=data.healing_corpus_tokens)
        return cls(transfer_steps=50, heal_batch_size=1, heal_grad_accum=4, eval_batch_size=4, generate_batch_size=64,
                   healing_tokens=b.healing_tokens, trial_healing_tokens=b.trial_healing_tokens,
                   healing_corpus_tokens=0)


@dataclass(frozen=True)
class EvalSet:
    """Held-out blocks and the teacher's top-k log-probs on them."""

    blocks: torch.Tensor
    teacher: TeacherLogits


def pick_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LBSearchError(f"--device {name!r}: not a torch device (use cpu or cuda[:N])") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LBSearchError(f"--device {name}: no CUDA GPU is available on this machine; use --device cpu")
    return device


class Workspace:
    """See the module docstring; build one with :meth:`open`."""

    def __init__(self, *, space: SearchSpace, device: torch.device, model, tokenizer, key: str,
                 blocks: dict[str, torch.Tensor], heldout: EvalSet, real_text: dict[str, EvalSet],
                 library: BlockLibrary, defaults: DeviceDefaults, progress: bool = True, corpus: Corpus | None = None,
                 held_groups: frozenset = frozenset()):
        self.space, self.device, self.model, self.tokenizer, self.key = space, device, model, tokenizer, key
        self.corpus, self.healing_corpus = corpus, None  # what each source gave (the run's metadata)
        self.held_groups = held_groups  # the corpus's held-out and calibration groups: never healed on
        self.blocks, self.heldout, self.real_text = blocks, heldout, real_text
        self.library, self.defaults, self.progress = library, defaults, progress
        self.n_layers = model.config.num_hidden_layers
        self._busy = False
        self._prefix: dict[str, PrefixStates] | None = None
        self._tables: dict[frozenset, CostTable] = {}
        self._long: dict[tuple[int, int], torch.Tensor] = {}

    @classmethod
    def open(cls, space: SearchSpace | str | Path | None = None, *, device: str | None = None,
             cache: str | Path | None = None, model: str | None = None, library: str | Path | None = None,
             transfer: dict | None = None, defaults: dict | None = None, progress: bool = True) -> "Workspace":
        """Load the teacher and data of ``space`` (a SearchSpace, a YAML path, or None: the default).

        ``cache`` sets this process's cache folder (``LBSEARCH_CACHE``); ``model`` overrides the
        space's model; ``library`` the block library folder; ``transfer`` the transfer settings;
        ``defaults`` fields of :class:`DeviceDefaults`.
        """
        if cache is not None:
            os.environ["LBSEARCH_CACHE"] = str(Path(cache).expanduser().resolve())
        space = space if isinstance(space, SearchSpace) else load_space(space)
        dev = pick_device(device)
        space = space.on(dev)
        check_sources(space.data)  # bad sources fail here, in one line, before the teacher loads
        ref = model or space.model
        key = model_key(ref)
        teacher, tokenizer = load_teacher(ref, device=str(dev)), load_tokenizer(ref)
        space.check_layers(teacher.config.num_hidden_layers, "space")
        device_defaults = replace(DeviceDefaults.for_device(dev, space), **(defaults or {}))
        corpus = build_corpus(space.data, teacher, tokenizer, model_key=key,
                              batch_size=device_defaults.generate_batch_size, progress=progress)
        splits = split_corpus(corpus.dataset, space.data)
        seq, budgets = space.data.seq_len, space.budgets
        blocks = {"train": pack_blocks(splits["train"], tokenizer, seq),
                  "calibration": pack_blocks(splits["calibration"], tokenizer, seq,
                                             max_tokens=budgets.calibration_tokens),
                  "heldout": pack_blocks(teacher_text(splits["heldout"], corpus), tokenizer, seq,
                                         max_tokens=max(budgets.eval_tokens, budgets.sensitivity_tokens))}
        batch = device_defaults.eval_batch_size

        def eval_set(b: torch.Tensor) -> EvalSet:
            return EvalSet(b, teacher_logits(teacher, b, batch_size=batch, model_key=key))

        real = {name: eval_set(pack_blocks(eval_texts(name, space.data.text_field), tokenizer, seq,
                                           max_tokens=budgets.eval_tokens))
                for name in space.data.eval_sources}
        config = TransferConfig(**{"steps": device_defaults.transfer_steps, **space.transfer, **(transfer or {})})
        root = Path(library) if library else cache_dir("libraries", key)
        lib = BlockLibrary(root, key, blocks_hash(blocks["calibration"]), config)
        return cls(space=space, device=dev, model=teacher, tokenizer=tokenizer, key=key, blocks=blocks,
                   heldout=eval_set(blocks["heldout"][: max(1, budgets.eval_tokens // seq)]), real_text=real,
                   library=lib, defaults=device_defaults, progress=progress, corpus=corpus,
                   held_groups=held_out_groups(corpus.dataset, splits))

    # -- configs ---------------------------------------------------------------------------
    def heal_config(self, tokens: int | None = None, **overrides) -> HealConfig:
        """The space's recipe with this device's batch size; ``tokens`` defaults to the full budget.
        Blocks longer than the data's (``seq_len``) come fewer per batch, so that a step trains on as
        many tokens, unless the recipe sets ``batch_size`` itself."""
        d = self.defaults
        recipe = {**self.space.heal, **overrides}
        batch = d.heal_batch_size
        if recipe.get("seq_len", 0) > self.space.data.seq_len and "batch_size" not in recipe:
            batch = max(1, batch * self.space.data.seq_len // recipe["seq_len"])
        base = {"batch_size": batch, "grad_accum": d.heal_grad_accum, "tokens": tokens or d.healing_tokens}
        return HealConfig(**{**base, **recipe})

    def parse_plan(self, text: str, source: str = "plan") -> Plan:
        """A plan string or file, with the space's LSWA defaults, checked against the model."""
        from .plan import resolve_plan

        return resolve_plan(text, self.space.lswa_defaults).check(self.n_layers, source)

    # -- data --------------------------------------------------------------------------------
    @cached_property
    def healing_blocks(self) -> torch.Tensor:
        """What healing trains on: on GPU a separate corpus of ``healing_corpus_tokens`` from the same
        sources and weights (the next seed; only prompts and documents of the train split, so nothing
        held out feeds healing), else the train split (a small budget on CPU would not repeat it)."""
        n = self.defaults.healing_corpus_tokens
        if not n:
            return self.blocks["train"]
        if self._busy:  # the teacher writes the corpus: a student's samples would be another distribution
            raise RuntimeError("the healing corpus must be drawn before the model becomes a student")
        data = self.space.data
        self.healing_corpus = build_corpus(data, self.model, self.tokenizer, model_key=self.key,
                                           batch_size=self.defaults.generate_batch_size, n_tokens=n,
                                           seed=data.seed + 1, train_only=True, exclude_groups=self.held_groups,
                                           progress=self.progress)
        return pack_blocks(self.healing_corpus.dataset, self.tokenizer, data.seq_len)

    def data_key(self) -> str:
        """What this workspace scores on: the corpus key (sources and what shapes them, e.g. the installed
        distributions behind package-docs) and the held-out real text's blocks. Workers of one search
        must agree on it."""
        return stable_hash(self.corpus.key if self.corpus else None,
                           {name: blocks_hash(ev.blocks) for name, ev in self.real_text.items()})

    def data_sources(self) -> dict:
        """What each source gave: the corpus split into train / calibration / held-out, and the healing
        corpus: its own once built (None until healing needs it), or the corpus's train split."""
        healing = (self.healing_corpus.describe() if self.healing_corpus
                   else None if self.defaults.healing_corpus_tokens else "the corpus's train split")
        return {"corpus": self.corpus.describe() if self.corpus else None, "healing": healing}

    def prefix_states(self) -> dict[str, PrefixStates]:
        """The teacher's hidden states on every held-out set (built once, while the model is the teacher)."""
        if self._prefix is None:
            if self._busy:
                raise RuntimeError("teacher hidden states must be built before the model becomes a student")
            self._prefix = {name: PrefixStates(ev.blocks, self.defaults.eval_batch_size)
                            for name, ev in self.eval_sets().items()}
            for states in self._prefix.values():
                states.build(self.model)
        return self._prefix

    def eval_sets(self) -> dict[str, EvalSet]:
        """"heldout" (teacher text) first, then every real-text set by name."""
        return {"heldout": self.heldout, **self.real_text}

    def evaluate(self, model=None) -> dict[str, Quality]:
        """Quality of ``model`` (default: the teacher as it is now) on every held-out set."""
        model = self.model if model is None else model
        return {name: evaluate(model, ev.blocks, ev.teacher, self.defaults.eval_batch_size)
                for name, ev in self.eval_sets().items()}

    def long_context(self, lengths: tuple[int, ...], tokens: int) -> dict[str, float]:
        """Perplexity of the model as it is now (the teacher, or the student inside :meth:`student`) on
        held-out real text (the first ``data.eval_sources``) packed in blocks of the longest length,
        per span of predicted positions [0, L1), [L1, L2), ...: a plan whose ratio to the teacher grows
        from span to span drifts with the context (BENCHMARKS.md, long contexts)."""
        lengths = tuple(sorted(set(lengths)))
        window = getattr(self.model.config, "max_position_embeddings", None)
        if window and lengths[-1] > window:
            raise LBSearchError(f"long context: {lengths[-1]} tokens is past the model's context window ({window})")
        key = (lengths[-1], tokens)
        if key not in self._long:
            source = self.space.data.eval_sources[0] if self.space.data.eval_sources else None
            if source is None:
                raise LBSearchError("long-context quality needs held-out real text: set data.eval_sources")
            blocks = pack_blocks(eval_texts(source, self.space.data.text_field), self.tokenizer, lengths[-1],
                                 max_tokens=tokens)
            if not len(blocks):
                raise LBSearchError(f"long context: {source} holds fewer than {lengths[-1]} tokens for one block")
            self._long[key] = blocks
        edges = (0, *lengths)
        spans = perplexity_by_position(self.model, self._long[key], edges)
        return {f"{a}-{b}": ppl for a, b, ppl in zip(edges[:-1], edges[1:], spans)}

    def evaluate_assembled(self, plan: Plan) -> dict[str, Quality]:
        """Like :meth:`evaluate` for an unhealed student (inside ``student(plan)``), reusing the
        teacher's hidden states up to the first layer the plan changes."""
        first = next((i for i, s in enumerate(plan.layers) if s.kind != ORIGINAL), self.n_layers)
        states = self.prefix_states()
        return {name: states[name].evaluate(self.model, ev.teacher, first) for name, ev in self.eval_sets().items()}

    # -- the serving target --------------------------------------------------------------------
    @cached_property
    def target_shape(self) -> ModelShape:
        """The teacher's shape as served on the target (bf16 weights and caches)."""
        return ModelShape.from_config(self.model.config, dtype_bytes=2)

    def cost_table(self, plan: Plan | None = None) -> CostTable:
        """The target's cost table for every spec of the space (and of ``plan``, if it leaves the space)."""
        specs = self.space.all_specs(self.n_layers) + (list(plan.layers) if plan else [])
        names = frozenset(spec_key(s) for s in specs)
        if names not in self._tables:
            target, local = self.space.target, None
            if target.device == "local":
                from .profile import measure_machine

                local = measure_machine(str(self.device))
            self._tables[names] = target_table(target.device, self.target_shape, target.batch, target.context,
                                               specs, local)
        return self._tables[names]

    # -- students --------------------------------------------------------------------------------
    def ensure_blocks(self, plan: Plan, library: BlockLibrary | None = None) -> list[dict]:
        """Train the library blocks ``plan`` needs that are not there yet."""
        return (library or self.library).ensure(self.model, trainable_pairs(plan), self.blocks["calibration"],
                                                progress=self.progress)

    def student(self, plan: Plan, heal: HealConfig | None = None, *, checkpoints: str | Path | None = None,
                resume: bool = True, evaluator: bool = False, library: BlockLibrary | None = None) -> "Student":
        """Context manager: the teacher as ``plan``'s student (assembled from the block library, or
        ``library``; healed when ``heal`` is given, checkpointing to ``checkpoints`` and resuming from
        them unless ``resume`` is False), restored exactly on exit; see :class:`Student`."""
        return Student(self, plan.check(self.n_layers), heal, checkpoints, evaluator, library or self.library,
                       resume)

    def library_for(self, transfer: TransferConfig) -> BlockLibrary:
        """A block library beside the workspace's, for other transfer settings (ablations)."""
        return BlockLibrary(self.library.root, self.key, self.library.data_key, transfer)


class Student:
    """``with workspace.student(plan, heal) as model:`` — the teacher turned into the student.

    On entry: missing library blocks are trained, the plan is applied with them, and with
    ``heal`` the tuning (LoRA adapters or full weights) is added and the model is distilled (``heal_state`` tells how). On
    exit, also after an exception: tuning removed, original attention modules put back; the
    teacher's weights were never written, so it is bit-identical to before.
    """

    def __init__(self, workspace: Workspace, plan: Plan, heal: HealConfig | None,
                 checkpoints: str | Path | None, evaluator: bool, library: BlockLibrary, resume: bool = True):
        self.ws, self.plan, self.heal, self.checkpoints, self.evaluator = workspace, plan, heal, checkpoints, evaluator
        self.library, self.resume = library, resume
        self.handle = None
        self.transfers: list[dict] = []
        self.heal_state = None

    def __enter__(self):
        ws = self.ws
        if ws._busy:
            raise RuntimeError("the workspace's teacher is already a student; leave that block first")
        self.transfers = ws.ensure_blocks(self.plan, self.library)
        if self.heal is None:
            ws.prefix_states()  # the teacher's states, for evaluate_assembled, while it is still the teacher
        else:
            ws.healing_blocks  # noqa: B018 - sampled from the teacher, before it becomes the student
        ws._busy = True
        try:
            self.handle = apply_plan(ws.model, self.plan, self.library)
            if self.heal is not None:
                add_tuning(ws.model, self.heal)
                evaluate = (lambda: {k: q.to_dict() for k, q in ws.evaluate().items()}) if self.evaluator else None
                blocks = reblock(ws.healing_blocks, self.heal.seq_len or ws.space.data.seq_len)
                self.heal_state = heal(ws.model, self.handle, blocks, self.heal, self.checkpoints,
                                       resume=self.resume, progress=ws.progress, evaluator=evaluate)
        except BaseException:
            self._restore()
            raise
        return ws.model

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        remove_tuning(self.ws.model)
        if self.handle is not None:
            self.handle.restore()
        self.ws.model.requires_grad_(False)
        self.ws._busy = False
