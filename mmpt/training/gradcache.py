"""GradCache (Gao et al. 2021): a contrastive loss over the whole batch with one chunk's activation memory.

One call of :class:`GradCacheStep` replaces one plain micro-step (forward, backward, step) on a batch:

1. embed every chunk of ``train.gradcache_chunk`` samples without grad, saving the RNG state before each;
2. compute the objectives' loss on all the embeddings (gathered across ranks as the objective's gather
   mode does) and its gradient w.r.t. them (``torch.autograd.grad``: no parameter gradient yet);
3. re-forward each chunk with its saved RNG state (same dropout, masking, on-device augmentation) and
   back-propagate ``sum(output * cached grad)`` through the engine, one DeepSpeed micro-step a chunk.
   The first chunk's forward also recomputes the loss on the cached (detached) embeddings, so the
   loss's own parameters (logit scale, bias) get their gradient in the same backward.

Why the loss's parameters ride with the first chunk: ZeRO-3 *copies* gradients into its partitions at
the first micro-step after an optimizer step and *adds* afterwards, without zeroing, so every parameter
must receive its gradient in the first backward of the step (a separate loss backward first left the
encoders' partitions adding to the previous step's gradients; the test's second step catches that).

Scaling. DeepSpeed divides every ``backward`` by its ``gradient_accumulation_steps`` G, here
``grad_accum * chunks``. A plain micro-batch contributes ``loss / grad_accum``; so each chunk's backward
goes in times ``chunks`` (= G / grad_accum). The cached gradients come from outside the engine and so
carry no fp16 loss scale; the engine applies it once, as in a plain step. The last chunk's ``step()`` is
the accumulation boundary, where ZeRO reduces across ranks and the optimizer updates.

Re-forwards run through the engine's forward (``Pretrainer.forward(batch, phase=...)``), so ZeRO-3
fetches and releases parameters and hooks their backward as in a plain step. What a chunk's encoders
return is cached (embeddings, per-token embeddings, masks: what the objectives read, token-wise ones
too) except floating fields the loss takes no gradient from (under CLIP the tokens and pooled
features), found once by the loss on the first chunk. The cache is at most one layer's output for the
whole batch, against every layer's activations of it in a plain step.

Allocator. On CPU, glibc's malloc raises its mmap threshold (up to 32 MB) each time a large mmapped
block is freed, so after the no-grad embedding pass every chunk's activation tensors come from the heap,
which fragments and is not returned: the resident peak grew ~190 MB (batch 2048, chunks of 128) over a
plain step on one chunk. ``train.gradcache_mmap_threshold`` (opt-in, bytes) fixes the threshold on the
first call (``mallopt``; 1 MB measured): activations are mmapped and unmapped when freed, and the peak is
one chunk's plain step. The price is page faults on every re-forward (~0.3 s of system time a chunk of 128
there, ~20% of a step's CPU), which is why it is not the default.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from mmpt.contracts import Batch
from mmpt.pretrainer import to_fp32


class GradCacheStep:
    """The ``train.step: gradcache`` micro-step: ``step(engine, batch) -> {"loss", "losses", "metrics"}``.

    chunk: samples per forward; it divides the per-rank batch, and the engine's accumulation steps are
    ``train.grad_accum * len(batch) // chunk`` (see ``engine.deepspeed_config``). mmap_threshold: bytes at
    which glibc's malloc is fixed on the first call (None: left alone; see "Allocator" above).
    """

    def __init__(self, chunk: int, mmap_threshold: int | None = None):
        self.chunk = chunk
        self.mmap_threshold = mmap_threshold
        # Floating outputs the loss takes no gradient from (an encoder's tokens under CLIP), found on the
        # first chunk of the first step and never cached: they are the largest fields (B x T x D).
        self.unread: set[tuple] | None = None
        self.checked = False

    def __call__(self, engine: Any, batch: Batch) -> dict[str, Any]:
        if not self.checked:
            self.checked = True
            refuse_encoding_objectives(engine.module)
            warn_batch_norm(engine.module, self.chunk)
            if self.mmap_threshold is not None:
                fix_mmap_threshold(self.mmap_threshold)
        if len(batch) % self.chunk:  # the engine counts batch // chunk micro-steps to its boundary
            raise ValueError(f"gradcache: a batch of {len(batch)} samples does not split into chunks of {self.chunk}")
        chunks = [chunk_of(batch, i, i + self.chunk) for i in range(0, len(batch), self.chunk)]
        states, cached = [], []
        with torch.no_grad():
            for c in chunks:
                states.append(RngState.capture(_device(c)))
                outputs = engine(c, phase=_embed)
                if self.unread is None:
                    self.unread = unread_outputs(engine.module.loss, outputs, c)
                # fp32 (under bf16 autocast the towers return bf16): the loss's gradient is cached unrounded
                cached.append(to_fp32(_map(outputs, lambda path, t: None if path in self.unread else t)))
        merged = merge_chunks(cached)
        del cached
        loss_state = RngState.capture(_device(batch))
        out, grads = embedding_grads(engine.module.loss, merged, batch)
        after = RngState.capture(_device(batch))  # past the loss's own draws (token subsampling)
        scale = len(chunks)
        for i, (c, state) in enumerate(zip(chunks, states, strict=True)):
            again = (_map(merged, lambda _, t: t.detach()), batch, loss_state) if i == 0 else None
            rows = slice(i * self.chunk, (i + 1) * self.chunk)
            surrogate = engine(c, phase=functools.partial(
                _reforward, grads={path: g[rows] * scale for path, g in grads.items() if g is not None},
                state=state, loss_again=again, loss_weight=scale))
            engine.backward(surrogate)
            engine.step()
        after.restore()  # the RNG stream continues as if each chunk had been forwarded once
        return out


MMAP_THRESHOLD = 1 << 20  # bytes (bench/README.md: peak vs page faults); a fixed threshold stops glibc's dynamic raise (mallopt(3))


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc malloc's mmap threshold so freed chunk activations go back to the OS instead of
    fragmenting the heap; False (and nothing done) where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(-3, threshold))  # -3: M_MMAP_THRESHOLD in glibc's malloc.h


def refuse_encoding_objectives(pretrainer: torch.nn.Module) -> None:
    """GradCache caches the towers' outputs and runs the loss on them: an objective that runs a tower itself
    (``uses_model``: masked modelling) would re-encode the whole batch at once, outside the cache."""
    from mmpt.registry import ConfigError

    names = [name for name, obj in pretrainer.objectives.items() if getattr(obj, "uses_model", False)]
    if names:
        raise ConfigError(f"train.step: gradcache cannot run objectives that encode inputs themselves "
                          f"({', '.join(names)}); use train.step=plain with train.grad_accum")


def warn_batch_norm(module: torch.nn.Module, chunk: int) -> None:
    """Warn once when a training-mode BatchNorm would normalise over each chunk instead of the whole
    batch: its gradients (and running statistics, updated on both forwards) are then not a plain step's."""
    from torch.nn.modules.batchnorm import _BatchNorm

    towers = sorted({".".join(name.split(".")[:3]) for name, m in module.named_modules()
                     if isinstance(m, _BatchNorm) and m.training})  # e.g. model.encoders.image
    if towers:
        warnings.warn(f"gradcache: BatchNorm in {', '.join(towers)} normalises over each chunk of {chunk} "
                      "samples, not the whole batch: gradients differ from one plain step (towers with "
                      "GroupNorm/LayerNorm give the same gradients)", stacklevel=2)


def embedding_grads(loss_fn: Callable[[Any, Batch], dict[str, Any]], merged: Any,
                    batch: Batch) -> tuple[dict[str, Any], dict[tuple, Tensor | None]]:
    """The loss on the cached outputs (detached metrics) and its gradient w.r.t. each of their floating
    tensors by path (None where the loss does not read it), with no parameter gradient accumulated."""
    leaves = {path: t.requires_grad_() for path, t in _flatten(merged).items() if t.is_floating_point()}
    # The loss sees a copy of the dicts: ZeRO-3's hooks replace the tensors inside a submodule's inputs.
    out = loss_fn(_map(merged, lambda _, t: t), batch)
    found = torch.autograd.grad(out["loss"], list(leaves.values()), allow_unused=True) if leaves else ()
    for t in leaves.values():
        t.requires_grad_(False)
    grads = dict(zip(leaves, found, strict=True))
    if all(g is None for g in grads.values()):
        raise ValueError("gradcache: the loss reads no encoder output; GradCache needs a loss on embeddings")
    return {"loss": out["loss"].detach(), "losses": out["losses"], "metrics": out["metrics"]}, grads


def unread_outputs(loss_fn: Callable[[Any, Batch], dict[str, Any]], outputs: Any, chunk: Batch) -> set[tuple]:
    """Paths of the floating encoder outputs the loss takes no gradient from, found by the loss on one
    chunk (every rank calls it at the same point, so its collectives line up; RNG draws are undone)."""
    state = RngState.capture(_device(chunk))
    with torch.enable_grad():
        _, grads = embedding_grads(loss_fn, _map(outputs, lambda _, t: t.detach()), chunk)
    state.restore()
    return {path for path, g in grads.items() if g is None}


def chunk_of(batch: Batch, start: int, stop: int) -> Batch:
    """Samples ``start:stop`` of ``batch``; ``meta`` is left out (the chunk only feeds ``embed``)."""
    return Batch(fields={m: {k: v[start:stop] for k, v in f.items()} for m, f in batch.fields.items()},
                 present={m: v[start:stop] for m, v in batch.present.items()}, keys=batch.keys[start:stop])


def merge_chunks(parts: list[Any]) -> Any:
    """Concatenate per-chunk encoder outputs (nested dicts of (B, ...) tensors) along the batch."""
    first = parts[0]
    if isinstance(first, Tensor):
        if first.dim() == 0:
            raise ValueError("gradcache: an encoder output holds a 0-dim tensor; every tensor an encoder "
                             "returns must have the batch as its first dimension")
        return torch.cat([p.detach() for p in parts])
    if isinstance(first, dict):
        return _like(first, {k: merge_chunks([p[k] for p in parts]) for k in first})
    if isinstance(first, (list, tuple)):
        return type(first)(merge_chunks(list(xs)) for xs in zip(*parts, strict=True))
    return first  # None, numbers: the same in every chunk


class RngState:
    """The torch CPU generator's state and, on CUDA, the device generator's."""

    def __init__(self, cpu: Tensor, cuda: Tensor | None, device: torch.device):
        self.cpu, self.cuda, self.device = cpu, cuda, device

    @classmethod
    def capture(cls, device: torch.device) -> RngState:
        """The state now."""
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), cuda, device)

    def restore(self) -> None:
        """Put the generators back to the captured state."""
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def _embed(module: Any, batch: Batch) -> Any:
    return module.embed(batch)


def _reforward(module: Any, chunk: Batch, grads: dict[tuple, Tensor], state: RngState,
               loss_again: tuple[Any, Batch, RngState] | None, loss_weight: float) -> Tensor:
    """``sum(output * cached grad)`` over the re-embedded chunk (its parameter gradient is the loss's
    through this chunk's samples), plus, when given, the loss on the detached cached outputs (whose
    gradient reaches only the loss's own parameters)."""
    terms = []
    if loss_again is not None:
        outputs, batch, loss_state = loss_again
        loss_state.restore()
        terms.append(module.loss(outputs, batch)["loss"] * loss_weight)
    state.restore()
    embedded = _flatten(module.embed(chunk))
    terms += [(embedded[path].float() * g).sum() for path, g in grads.items()]
    return torch.stack(terms).sum()


def _flatten(x: Any) -> dict[tuple, Tensor]:
    """Every tensor in nested dicts/lists by its path, e.g. ``("image", "embedding")``."""
    out: dict[tuple, Tensor] = {}
    _map(x, lambda path, t: out.setdefault(path, t))
    return out


def _map(x: Any, fn: Callable[[tuple, Tensor], Tensor | None], path: tuple = ()) -> Any:
    """A copy of nested dicts/lists with ``fn(path, tensor)`` in place of every tensor (classes kept)."""
    if isinstance(x, Tensor):
        return fn(path, x)
    if isinstance(x, dict):
        return _like(x, {k: _map(v, fn, (*path, k)) for k, v in x.items()})
    if isinstance(x, (list, tuple)):
        return type(x)(_map(v, fn, (*path, i)) for i, v in enumerate(x))
    return x


def _like(template: dict, items: dict) -> dict:
    """A dict of ``template``'s class (EncoderOutput, TensorRecord) holding ``items``."""
    out = dict.__new__(type(template))
    dict.update(out, items)
    return out


def _device(batch: Batch) -> torch.device:
    for f in batch.fields.values():
        for v in f.values():
            return v.device
    return torch.device("cpu")
