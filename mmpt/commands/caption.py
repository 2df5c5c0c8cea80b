"""``mmpt caption``: generate captions for the samples of shards with a model's captioning objective and
write one JSON line per sample.

The model is an export or a run directory (:func:`mmpt.load`); any objective with ``start_decoding``
(``caption``, ``coca``) whose source is the asked modality captions it. :func:`caption_batches` is the
loop the ``caption`` eval task shares.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mmpt.data.shards import DataError
from mmpt.eval.captioning import caption_batches, find_captioner
from mmpt.nn.generate import GenerationConfig, Hypothesis


def caption(model_path: str, data: str, modality: str, out: str, *, objective: str | None = None,
            batch_size: int = 64, workers: int = 1, progress: bool = True, allow_nonfinite: bool = False,
            **generation: Any) -> str:
    """Caption every sample of ``data`` into JSONL ``out`` (key, caption, score, finished; ``captions`` with
    the n-best list when n_best > 1); returns the summary line. ``generation``: :class:`GenerationConfig` keys
    (``max_len`` defaults to what the decoder's positions allow)."""
    from mmpt.commands.export import load

    model, specs, _ = load(model_path, allow_nonfinite=allow_nonfinite)
    captioner = find_captioner(model.objectives, modality, objective)
    if generation.get("max_len") is None:
        generation["max_len"] = captioner.max_positions(model.model) - 1
    cfg = GenerationConfig(**generation)
    tokenizer = specs[captioner.text].tokenizer
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    written, absent, dropped = 0, 0, [0]
    with open(tmp, "w", encoding="utf-8") as f:
        for part in caption_batches(model.model, captioner, specs, data, batch_size, cfg, workers=workers,
                                    keep=(), progress=progress, dropped=dropped):
            for key, hyps in zip(part.keys, part.hypotheses, strict=True):
                f.write(json.dumps(caption_record(key, hyps, tokenizer, cfg.n_best)) + "\n")
            written += len(part.keys)
            absent += part.absent
    if not written:
        tmp.unlink()
        raise DataError(f"{data}: no sample with a decodable {modality!r} to caption "
                        f"({absent} lacked it, {dropped[0]} skipped by the loader)")
    os.replace(tmp, path)
    skipped = f"; skipped {absent + dropped[0]} without a usable {modality}" if absent + dropped[0] else ""
    return f"captioned {written} samples ({cfg.strategy}, max_len {cfg.max_len}) -> {path}{skipped}"


def caption_record(key: str, hyps: list[Hypothesis], tokenizer: Any, n_best: int) -> dict[str, Any]:
    """One JSONL record: the best caption, its score and whether it ended with EOS, plus the n-best list."""
    best = hyps[0]
    record: dict[str, Any] = {"key": key, "caption": tokenizer.decode(best.tokens), "score": round(best.score, 5),
                              "finished": best.finished}
    if n_best > 1:
        record["captions"] = [{"caption": tokenizer.decode(h.tokens), "score": round(h.score, 5)} for h in hyps]
    return record
