"""Generation (mmpt/nn/generate.py) and the KV cache (mmpt/nn/layers.py): cached decoding equals recomputing the
prefix, beam 1 equals greedy, EOS and max_len are respected, batch rows are independent."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from mmpt.nn.generate import GenerationConfig, generate
from mmpt.nn.layers import KVCache, Transformer
from mmpt.objectives.captioning import CaptionDecoder
from mmpt.registry import ConfigError

BOS, EOS, PAD, VOCAB = 1, 2, 0, 40


class ToyDecoder:
    """A random caption decoder over a random memory, behind the generation contract."""

    bos_id, eos_id, pad_id, max_positions = BOS, EOS, PAD, 24

    def __init__(self, batch: int = 3, seed: int = 0, sharpness: float = 30.0, eos_bias: float = 0.0):
        torch.manual_seed(seed)
        self.net = CaptionDecoder(VOCAB, 32, 2, 2, memory_width=16, context_length=self.max_positions).eval()
        with torch.no_grad():  # peaked distributions: cached/uncached float noise cannot flip an argmax
            self.net.head.weight.mul_(sharpness)
        self.eos_bias = eos_bias
        self.memory = torch.randn(batch, 5, 16)
        self.memory_mask = torch.ones(batch, 5, dtype=torch.bool)
        self.memory_mask[0, 3:] = False  # a padded memory row: its mask must follow it through the cache
        self.batch_size, self.device = batch, torch.device("cpu")
        self.calls: list[int] = []  # positions fed per step

    def step(self, ids: Tensor, rows: Tensor, cache: KVCache | None) -> Tensor:
        self.calls.append(ids.shape[1])
        first = cache is None or cache.length == 0
        memory = self.memory[rows] if first else None
        mask = self.memory_mask[rows] if first else None
        logits = self.net(ids, memory, mask, cache)[:, -1].float()
        logits[:, EOS] += self.eos_bias
        return logits


class ScriptedDecoder:
    """Emits ``script[row]`` token by token (then EOS forever); logits put all mass on that token."""

    bos_id, eos_id, pad_id, max_positions = BOS, EOS, PAD, 64

    def __init__(self, scripts: list[list[int]]):
        self.scripts, self.batch_size, self.device = scripts, len(scripts), torch.device("cpu")

    def step(self, ids: Tensor, rows: Tensor, cache: KVCache | None) -> Tensor:
        pos = (ids.shape[1] if cache is None else cache.length + ids.shape[1]) - 1  # tokens generated so far
        logits = torch.full((len(rows), VOCAB), -20.0)
        for n, r in enumerate(rows.tolist()):
            script = self.scripts[r]
            logits[n, script[pos] if pos < len(script) else EOS] = 0.0
        return logits


def tokens(hyps: list[list]) -> list[list[int]]:
    return [[h.tokens for h in sample] for sample in hyps]


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_cached_decoding_equals_uncached(strategy: str) -> None:
    cfg = GenerationConfig(strategy=strategy, max_len=12, beam=3, n_best=3 if strategy == "beam" else 1,
                           length_penalty=1.0)
    dec = ToyDecoder(eos_bias=2.0)
    cached = generate(dec, cfg)
    assert set(dec.calls) == {1}, "with the cache every step feeds one new position"
    uncached = generate(dec, GenerationConfig(**{**cfg.__dict__, "use_cache": False}))
    assert tokens(cached) == tokens(uncached)
    for a, b in zip(cached, uncached, strict=True):
        for ha, hb in zip(a, b, strict=True):
            assert ha.score == pytest.approx(hb.score, abs=1e-4)
    assert any(len(h.tokens) > 2 for sample in cached for h in sample), "degenerate: every caption ended at once"


def test_attention_cache_matches_full_forward() -> None:
    torch.manual_seed(0)
    trunk = Transformer(32, 2, 4, causal=True).eval()
    x = torch.randn(2, 7, 32)
    full = trunk(x)
    cache = KVCache()
    parts = [trunk(x[:, :3], None, cache)]
    cache.advance(3)
    for t in range(3, 7):
        parts.append(trunk(x[:, t:t + 1], None, cache))
        cache.advance(1)
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_beam_one_equals_greedy() -> None:
    dec = ToyDecoder(seed=1, eos_bias=1.0)
    greedy = generate(dec, GenerationConfig(strategy="greedy", max_len=15))
    beam = generate(dec, GenerationConfig(strategy="beam", beam=1, length_penalty=0.0, max_len=15))
    assert tokens(greedy) == tokens(beam)
    for g, b in zip(greedy, beam, strict=True):
        assert g[0].score == pytest.approx(b[0].score, abs=1e-4)


def test_beam_finds_a_better_sequence_than_greedy() -> None:
    # token 5 looks best first but leads to a poor continuation; 6 then 7 is better overall
    class Trap:
        bos_id, eos_id, pad_id, max_positions, batch_size, device = BOS, EOS, PAD, 16, 1, torch.device("cpu")

        def step(self, ids: Tensor, rows: Tensor, cache: KVCache | None) -> Tensor:
            logits = torch.full((len(rows), VOCAB), -30.0)
            for n, seq in enumerate(ids.tolist()):
                last = seq[-1]
                if last == BOS:
                    logits[n, 5], logits[n, 6] = 0.0, -0.2
                elif last == 5:
                    logits[n, 3:13] = 0.0  # ten equally likely tokens: log(1/10) each
                elif last == 6:
                    logits[n, 7] = 0.0
                else:
                    logits[n, EOS] = 0.0
            return logits

    greedy = generate(Trap(), GenerationConfig(strategy="greedy", max_len=5, use_cache=False))[0][0]
    beam = generate(Trap(), GenerationConfig(strategy="beam", beam=2, n_best=2, length_penalty=0.0, max_len=5,
                                             use_cache=False))[0]
    assert greedy.tokens[0] == 5
    assert beam[0].tokens == [6, 7] and beam[0].score > greedy.score
    assert beam[0].score >= beam[1].score


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_generation_stops_at_eos_and_respects_max_len(strategy: str) -> None:
    scripts = [[5, 6], [7], [8] * 30, []]
    dec = ScriptedDecoder(scripts)
    out = generate(dec, GenerationConfig(strategy=strategy, max_len=6, beam=2, seed=0))
    got = [sample[0] for sample in out]
    assert [h.tokens for h in got] == [[5, 6], [7], [8] * 6, []]
    assert [h.finished for h in got] == [True, True, False, True]
    # every row finished: no step after the last EOS
    dec.calls = []
    short = ScriptedDecoder([[5], [6, 7]])
    steps = []
    short.step = (lambda f: (lambda ids, rows, cache: (steps.append(1), f(ids, rows, cache))[1]))(short.step)
    generate(short, GenerationConfig(strategy="greedy", max_len=20))
    assert len(steps) == 3


def test_batched_rows_are_independent() -> None:
    cfg = GenerationConfig(strategy="beam", beam=3, max_len=10, n_best=2)
    together = generate(ToyDecoder(batch=3, eos_bias=2.0), cfg)
    for i in range(3):
        alone = ToyDecoder(batch=3, eos_bias=2.0)
        alone.memory, alone.memory_mask, alone.batch_size = alone.memory[i:i + 1], alone.memory_mask[i:i + 1], 1
        assert tokens(generate(alone, cfg)) == tokens(together[i:i + 1])
    g_together = generate(ToyDecoder(batch=3, eos_bias=2.0), GenerationConfig(max_len=10))
    alone = ToyDecoder(batch=3, eos_bias=2.0)
    alone.memory, alone.memory_mask, alone.batch_size = alone.memory[2:], alone.memory_mask[2:], 1
    assert tokens(generate(alone, GenerationConfig(max_len=10))) == tokens(g_together[2:])


def test_sampling_filters_and_is_seeded() -> None:
    from mmpt.nn.generate import filter_logits

    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True, True]]
    p = logits.softmax(-1)[0]
    kept = ~torch.isinf(filter_logits(logits, top_p=float(p[0] + p[1] / 2)))
    assert kept.tolist() == [[True, True, False, False, False]]
    assert (~torch.isinf(filter_logits(logits, top_p=0.01))).sum() == 1
    cfg = GenerationConfig(strategy="sample", max_len=8, seed=3, top_k=5, temperature=2.0)
    assert tokens(generate(ToyDecoder(), cfg)) == tokens(generate(ToyDecoder(), cfg))


def test_bad_generation_settings_name_the_key() -> None:
    with pytest.raises(ConfigError, match="strategy"):
        GenerationConfig(strategy="nucleus")
    with pytest.raises(ConfigError, match="n_best"):
        GenerationConfig(strategy="beam", beam=2, n_best=3)
    with pytest.raises(ConfigError, match="max_len"):
        generate(ToyDecoder(), GenerationConfig(max_len=24))
