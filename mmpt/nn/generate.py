"""Text generation for any autoregressive decoder: greedy, beam search (length penalty, n-best) and
top-k / top-p sampling, batched, with a KV cache so a step feeds only the new token.

The decoder contract (:class:`Decoder`) is one method, ``step(ids, rows, cache) -> (N, V) logits``, plus
its special ids: generation owns the sequences, the cache and which source sample each row continues
(``rows``: beam search repeats and reorders rows), so the same code decodes a caption decoder, CoCa's
multimodal layers or a plain language model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from mmpt.nn.layers import KVCache
from mmpt.registry import ConfigError

STRATEGIES = ("greedy", "beam", "sample")


class Decoder(Protocol):
    """What generation needs from a model (see :class:`mmpt.objectives.captioning.SourceDecoder`)."""

    bos_id: int
    eos_id: int
    pad_id: int
    batch_size: int  # source samples
    max_positions: int  # tokens a sequence may hold, BOS included
    device: torch.device

    def step(self, ids: Tensor, rows: Tensor, cache: KVCache | None) -> Tensor:
        """(N, V) logits of the token after ``ids`` (N, t), row i continuing source sample ``rows[i]``.
        Without a cache ``ids`` is the whole sequence; with one, only the positions after ``cache.length``."""
        ...


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate.

    strategy: 'greedy', 'beam' or 'sample'. max_len: tokens generated per sequence at most, EOS included.
    beam: beams per sample (beam). length_penalty: beam scores are log-probability sums divided by
    length ** length_penalty (0: plain sums; >= 0). n_best: hypotheses returned per sample (beam; <= beam).
    top_k: sample from the k most likely tokens only (0: all). top_p: sample from the smallest set of
    tokens whose probability reaches top_p (1: all). temperature: logits are divided by it before sampling.
    use_cache: feed one new token a step through the KV cache (False recomputes the prefix; for tests).
    seed: sampling seed (None: torch's global generator).
    """

    strategy: str = "greedy"
    max_len: int = 32
    beam: int = 4
    length_penalty: float = 1.0
    n_best: int = 1
    top_k: int = 0
    top_p: float = 1.0
    temperature: float = 1.0
    use_cache: bool = True
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy: {self.strategy!r}; expected one of {', '.join(STRATEGIES)}")
        checks = [(self.max_len >= 1, "max_len", ">= 1"), (self.beam >= 1, "beam", ">= 1"),
                  (self.length_penalty >= 0, "length_penalty", ">= 0"), (self.top_k >= 0, "top_k", ">= 0"),
                  (0 < self.top_p <= 1, "top_p", "in (0, 1]"), (self.temperature > 0, "temperature", "> 0"),
                  (1 <= self.n_best <= (self.beam if self.strategy == "beam" else 1), "n_best",
                   "between 1 and beam (1 unless strategy is beam)")]
        for ok, key, expected in checks:
            if not ok:
                raise ConfigError(f"{key}: {getattr(self, key)!r}; expected {expected}")


@dataclass
class Hypothesis:
    """One generated sequence: token ids without BOS and EOS, its score (log-probability sum; beam: divided
    by length ** length_penalty) and whether it ended with EOS (False: cut at max_len)."""

    tokens: list[int]
    score: float
    finished: bool


@torch.no_grad()
def generate(decoder: Decoder, cfg: GenerationConfig) -> list[list[Hypothesis]]:
    """Hypotheses per source sample (``cfg.n_best`` each, best first)."""
    if cfg.max_len > decoder.max_positions - 1:
        raise ConfigError(f"max_len: {cfg.max_len} tokens do not fit the decoder's {decoder.max_positions} positions "
                          f"(BOS included); use max_len <= {decoder.max_positions - 1}")
    if cfg.strategy == "beam":
        return beam_search(decoder, cfg)
    return [[h] for h in sample_or_greedy(decoder, cfg)]


class _Stepper:
    """Feeds the decoder whole sequences (no cache) or only what its cache has not seen."""

    def __init__(self, decoder: Decoder, use_cache: bool):
        self.decoder = decoder
        self.cache = KVCache() if use_cache else None

    def __call__(self, seqs: Tensor, rows: Tensor) -> Tensor:
        if self.cache is None:
            return self.decoder.step(seqs, rows, None)
        new = seqs[:, self.cache.length:]
        logits = self.decoder.step(new, rows, self.cache)
        self.cache.advance(new.shape[1])
        return logits

    def reorder(self, index: Tensor) -> None:
        if self.cache is not None:
            self.cache.reorder(index)


def _start(decoder: Decoder, rows: Tensor) -> Tensor:
    return torch.full((len(rows), 1), decoder.bos_id, dtype=torch.long, device=rows.device)


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Logits with tokens outside the top ``top_k`` and outside the top-``top_p`` nucleus set to -inf
    (the most likely token always stays)."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_or_greedy(decoder: Decoder, cfg: GenerationConfig) -> list[Hypothesis]:
    """One sequence per sample: the most likely token each step (greedy) or a draw from the filtered,
    tempered distribution (sample); rows that emitted EOS are padded until every row has."""
    device = decoder.device
    rows = torch.arange(decoder.batch_size, device=device)
    step = _Stepper(decoder, cfg.use_cache)
    seqs = _start(decoder, rows)
    scores = torch.zeros(len(rows), device=device)
    done = torch.zeros(len(rows), dtype=torch.bool, device=device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None
    for _ in range(cfg.max_len):
        logits = step(seqs, rows)
        logp = logits.log_softmax(-1)
        if cfg.strategy == "greedy":
            tok = logits.argmax(-1)
        else:
            probs = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p).softmax(-1)
            tok = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        tok = tok.masked_fill(done, decoder.pad_id)
        scores += logp.gather(1, tok[:, None]).squeeze(1).masked_fill(done, 0.0)
        seqs = torch.cat([seqs, tok[:, None]], 1)
        done |= tok == decoder.eos_id
        if bool(done.all()):
            break
    return [_hypothesis(seqs[i, 1:].tolist(), float(scores[i]), decoder.eos_id) for i in range(len(rows))]


def _hypothesis(tokens: list[int], score: float, eos_id: int) -> Hypothesis:
    if eos_id in tokens:
        return Hypothesis(tokens[: tokens.index(eos_id)], score, True)
    return Hypothesis(tokens, score, False)


def beam_search(decoder: Decoder, cfg: GenerationConfig) -> list[list[Hypothesis]]:
    """Beam search over all samples at once: ``beam`` rows per sample, 2 x beam candidates a step, the best
    ``beam`` that do not end in EOS go on; a candidate ending in EOS within the top ``beam`` is a finished
    hypothesis scored sum / length ** length_penalty (length counts EOS). A sample stops once it holds
    ``beam`` finished hypotheses and no live beam can beat the worst of them (exact for scores <= 0:
    a live sum only falls, and its best normalised value is at ``max_len``). Live beams at ``max_len``
    are finished as they are."""
    b, k = decoder.batch_size, cfg.beam
    device = decoder.device
    rows = torch.arange(b, device=device).repeat_interleave(k)
    step = _Stepper(decoder, cfg.use_cache)
    seqs = _start(decoder, rows)
    # only the first beam of each sample is live at the start, so the first step expands it k ways
    beam_scores = torch.full((b, k), float("-inf"), device=device)
    beam_scores[:, 0] = 0.0
    finished: list[list[tuple[float, list[int], bool]]] = [[] for _ in range(b)]
    done = [False] * b
    for length in range(1, cfg.max_len + 1):
        logp = step(seqs, rows).log_softmax(-1)
        vocab = logp.shape[-1]
        if vocab < 2 * k:
            raise ConfigError(f"beam: {k} beams need a vocabulary of at least {2 * k} tokens, got {vocab}")
        cand = (beam_scores.view(-1, 1) + logp).view(b, k * vocab)
        top_scores, top_index = cand.topk(2 * k, dim=1)
        origin, tok = top_index // vocab, top_index % vocab
        is_eos = tok == decoder.eos_id
        _collect_finished(finished, done, seqs, top_scores, origin, is_eos, k, length, cfg.length_penalty)
        # each beam has one EOS candidate at most, so at least k of the 2k candidates go on
        keep = ~is_eos & (torch.cumsum((~is_eos).long(), 1) <= k)
        beam_scores = top_scores[keep].view(b, k)
        src = (torch.arange(b, device=device)[:, None] * k + origin[keep].view(b, k)).view(-1)
        seqs = torch.cat([seqs.index_select(0, src), tok[keep].view(-1, 1)], 1)
        step.reorder(src)
        best_live = beam_scores.max(1).values / cfg.max_len ** cfg.length_penalty
        for i in range(b):
            worst = sorted(s for s, _, _ in finished[i])[-k:][0] if len(finished[i]) >= k else None
            done[i] = done[i] or (worst is not None and worst >= float(best_live[i]))
        if all(done):
            break
    for i in range(b):
        if not done[i]:  # cut at max_len: every live beam is a hypothesis
            length = seqs.shape[1] - 1
            for j in range(k):
                score = float(beam_scores[i, j]) / length ** cfg.length_penalty
                finished[i].append((score, seqs[i * k + j, 1:].tolist(), False))
    out = []
    for i in range(b):
        ranked = sorted(finished[i], key=lambda h: -h[0])[: cfg.n_best]
        out.append([Hypothesis(tokens, score, fin) for score, tokens, fin in ranked])
    return out


def _collect_finished(finished: list[list[tuple[float, list[int], bool]]], done: list[bool], seqs: Tensor,
                      top_scores: Tensor, origin: Tensor, is_eos: Tensor, k: int, length: int,
                      length_penalty: float) -> None:
    """Add candidates that end in EOS and rank within the top ``k`` to their sample's finished list."""
    hits = (is_eos[:, :k] & torch.isfinite(top_scores[:, :k])).nonzero().tolist()
    for i, j in hits:
        if done[i]:
            continue
        tokens = seqs[i * k + int(origin[i, j]), 1:].tolist()
        finished[i].append((float(top_scores[i, j]) / length ** length_penalty, tokens, True))
