"""``mmpt`` command line: thin parsing over the Python API.

    mmpt train RECIPE [--set key=value ...] [--resume latest|PATH]
    mmpt eval MODEL [--task ID ...] [--set key=value ...] [--out FILE]
    mmpt embed MODEL --data SHARDS --modality M --out DIR
    mmpt export RUN_DIR --out FILE [--format mmpt|openclip|hf-clip]
    mmpt import openclip --model NAME --weights FILE --out FILE | mmpt import hf-clip --weights DIR --out FILE
    mmpt data demo|write|inspect ...
    mmpt demo [--recipe NAME] [--out DIR] [--smoke]
    mmpt info [--tasks] [--keys]

``python -m mmpt ...`` is the same command. Errors print one line (``mmpt: error: ...``; exit 2 for a
bad config, data location or argument, 1 otherwise); ``--debug`` shows the traceback instead.

Multi-rank: ``torchrun --nproc_per_node N -m mmpt.cli train RECIPE`` or
``deepspeed --num_gpus N $(which mmpt) train RECIPE``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

EPILOG = """examples:
  mmpt demo                                   # generate demo data, train clip-tiny, eval, export, embed
  mmpt train clip-tiny --set train.steps=200 --set optim.lr=5e-4
  torchrun --nproc_per_node 2 -m mmpt.cli train clip-tiny --set train.zero_stage=3
  mmpt train clip-tiny --resume latest        # continue the run in train.out_dir
  mmpt export runs/demo/clip-tiny --out model.safetensors
  mmpt eval model.safetensors --tasks-file tasks.yaml --task zero_shot/color
  mmpt embed model.safetensors --data 'shards/{000..009}.tar' --modality image --out emb/
  mmpt data inspect 'shards/*.tar'

Add --debug to any command for a traceback instead of the one-line error.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmpt", description="Multimodal pretraining: pluggable encoders, shared "
                                "objectives, DeepSpeed ZeRO, WebDataset shards.", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # the `deepspeed` launcher appends --local_rank=N; the rank is read from the environment instead
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors (any position)")
    p.add_argument("--version", action="version", version=f"mmpt {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in (_train_parser, _eval_parser, _embed_parser, _caption_parser, _export_parser, _import_parser,
                        _data_parser, _demo_parser, _info_parser):
        add_command(sub)
    _add_plugged(sub, COMMAND_MODULES)
    return p


# Verbs that live in a module of their own: each module defines ``add_parser(sub)``, which adds its
# sub-parser and sets ``handler=<function(args)>`` on it, and imports nothing heavy at module level
# (``mmpt --help`` imports every one of them).
COMMAND_MODULES: tuple[str, ...] = (
    "mmpt.commands.soup",
    "mmpt.commands.index",
    "mmpt.commands.serve",
)
# ``mmpt data ACTION`` actions living in a module of their own, same contract.
DATA_ACTION_MODULES: tuple[str, ...] = (
    "mmpt.data.curate",
    "mmpt.data.poison",
)


def _add_plugged(sub: argparse._SubParsersAction, modules: tuple[str, ...]) -> None:
    """Let each listed module add its sub-parser (see ``COMMAND_MODULES``)."""
    import importlib

    for name in modules:
        importlib.import_module(name).add_parser(sub)


def _train_parser(sub: argparse._SubParsersAction) -> None:
    """``mmpt train RECIPE``."""
    t = sub.add_parser("train", help="train a recipe (shipped name or YAML path)", epilog=_recipe_keys_help,
                       formatter_class=_LazyEpilogFormatter)
    t.add_argument("recipe", help="shipped recipe name (see `mmpt info`) or path to a YAML file")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=3e-4 (repeatable)")
    t.add_argument("--resume", metavar="latest|PATH",
                   help="resume from the newest checkpoint of train.out_dir ('latest') or a given run/checkpoint")


def _eval_parser(sub: argparse._SubParsersAction) -> None:
    """``mmpt eval MODEL``."""
    e = sub.add_parser("eval", help="run eval tasks on an exported model or a run directory",
                       epilog=_task_keys_help, formatter_class=_LazyEpilogFormatter)
    e.add_argument("model", help="exported .safetensors file or run directory (its latest checkpoint)")
    e.add_argument("--task", action="append", default=[], metavar="ID",
                   help="task id or name to run (e.g. zero_shot/color, retrieval); repeatable; default: all. "
                        "Only selected tasks get --set and are validated")
    e.add_argument("--tasks-file", help="YAML list of task configs (or a recipe with eval:); your own file, "
                                        "so pipe: sources are allowed")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="set a key on every selected task, e.g. --set data=/path/to/eval")
    e.add_argument("--out", help="write results JSON here")
    e.add_argument("--use-embedded-tasks", action="store_true",
                   help="run the eval tasks stored in the model's recipe (data from a model file: their pipe: "
                        "and URL sources are refused)")
    e.add_argument("--allow-nonfinite", action="store_true", help="load weights holding NaN/inf (with a warning)")


def _embed_parser(sub: argparse._SubParsersAction) -> None:
    """``mmpt embed MODEL``."""
    m = sub.add_parser("embed", help="extract embeddings (clip-retrieval layout), resumable, multi-rank")
    m.add_argument("model", help="exported .safetensors file or run directory")
    m.add_argument("--data", required=True, help="shards: path, glob, brace list or pipe: URL")
    m.add_argument("--modality", required=True, help="which tower to run, e.g. image or text")
    m.add_argument("--out", required=True,
                   help="output folder; rerunning into it resumes and new shards extend it (its manifest keys "
                        "shards by path, size and mtime); another model or settings are refused")
    m.add_argument("--batch-size", type=int, default=256)
    m.add_argument("--workers", type=int, default=1)
    m.add_argument("--no-normalize", action="store_true", help="write unnormalised projections")
    m.add_argument("--dtype", default="float16", choices=["float16", "float32"],
                   help="float16 (default) halves the files; rows of unit vectors then deviate by at most 6.1e-5 "
                        "per component and cosine similarities by ~1e-4 (measured) from float32")
    m.add_argument("--metadata", default="", metavar="FIELDS",
                   help="extra parquet columns, comma-separated: caption (the sample's txt), json (its json)")
    m.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="compute precision: auto = bf16 where the hardware has native bf16 (AVX512-BF16/AMX CPUs, "
                        "CUDA), else fp32; bf16 rows stay within 1e-2 per component (cosine >= 0.999) of fp32; "
                        "a folder keeps the precision it started with")
    m.add_argument("--allow-nonfinite", action="store_true", help="load weights holding NaN/inf (with a warning)")
    m.add_argument("--dim", type=int, default=None,
                   help="keep the first DIM dims of each embedding, normalised again (a Matryoshka size)")
    m.add_argument("--layer", type=int, default=None,
                   help="stop the tower after its first LAYER transformer blocks (a Starbucks sub-model)")


def _caption_parser(sub: argparse._SubParsersAction) -> None:
    """``mmpt caption MODEL``."""
    c = sub.add_parser("caption", help="generate captions for shards with a model's caption/coca objective (JSONL)")
    c.add_argument("model", help="exported .safetensors file or run directory")
    c.add_argument("--data", required=True, help="shards: path, glob, brace list or pipe: URL")
    c.add_argument("--modality", required=True, help="what to caption (the objective's source), e.g. image")
    c.add_argument("--out", required=True, help="output JSONL: key, caption, score, finished (+ captions: n-best)")
    c.add_argument("--objective", help="captioning objective to use when several caption --modality")
    c.add_argument("--strategy", default="greedy", choices=["greedy", "beam", "sample"])
    c.add_argument("--beam", type=int, default=4, help="beams per sample (--strategy beam)")
    c.add_argument("--n-best", type=int, default=1, help="captions per sample (--strategy beam; <= --beam)")
    c.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam scores are log-probability sums / length ** this (0: plain sums)")
    c.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    c.add_argument("--top-p", type=float, default=1.0, help="sample within the top-p probability mass")
    c.add_argument("--temperature", type=float, default=1.0)
    c.add_argument("--seed", type=int, help="sampling seed")
    c.add_argument("--max-len", type=int, help="tokens generated at most, EOS included (default: what fits)")
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--workers", type=int, default=1)
    c.add_argument("--allow-nonfinite", action="store_true", help="load weights holding NaN/inf (with a warning)")


def _export_parser(sub: argparse._SubParsersAction) -> None:
    """``mmpt export RUN_DIR``."""
    x = sub.add_parser("export", help="consolidate a run (any ZeRO stage) into one .safetensors file")
    x.add_argument("run_dir", help="run directory or checkpoint folder (--format openclip|hf-clip|folder|hf-text: "
                                   "or an export)")
    x.add_argument("--out", required=True, help="output .safetensors path (hf-clip, folder, hf-text: a folder; "
                                                "openclip: a folder in OpenCLIP's local-dir: format, or a file for models with OpenCLIP towers)")
    x.add_argument("--format", default="mmpt", choices=["mmpt", "openclip", "hf-clip", "folder", "hf-text"],
                   help="mmpt (default); openclip: what open_clip.create_model_and_transforms('local-dir:OUT') "
                        "loads (timm image towers and OpenCLIP-layout text towers map; others are refused "
                        "naming what is missing); hf-clip: a folder CLIPModel.from_pretrained loads; folder: a hub-style model folder "
                        "(config.json, model.safetensors, tokenizer files, README.md model card) mmpt.load reads; "
                        "hf-text: an MLM-trained text or protein tower as a folder "
                        "AutoModelForMaskedLM.from_pretrained loads")
    x.add_argument("--license", default="other", help="folder: the model card's licence field (default: other)")
    x.add_argument("--keep-adapters", action="store_true",
                   help="keep LoRA adapters as separate tensors (default: merged into the base weights)")


def _import_parser(sub: argparse._SubParsersAction) -> None:
    """``mmpt import openclip|hf-clip``."""
    im = sub.add_parser("import", help="turn OpenCLIP or Hugging Face CLIP weights into an mmpt model file")
    isub = im.add_subparsers(dest="import_format", required=True, metavar="FORMAT")
    io = isub.add_parser("openclip", help="an OpenCLIP checkpoint of a named architecture")
    io.add_argument("--model", required=True, help="OpenCLIP architecture name, e.g. ViT-B-32 (open_clip.list_models())")
    io.add_argument("--weights", required=True, help="OpenCLIP checkpoint: .safetensors, or .pt/.bin read weights-only")
    io.add_argument("--model-config", help="JSON file or folder of extra OpenCLIP model configs (add_model_config)")
    io.add_argument("--tokenizer", help="default openclip-bpe; hf:<folder> for architectures with an HF tokenizer")
    io.add_argument("--out", required=True, help="output .safetensors path")
    ih = isub.add_parser("hf-clip", help="a Hugging Face CLIPModel folder (save_pretrained)")
    ih.add_argument("--weights", required=True, help="the folder (config.json + model.safetensors)")
    ih.add_argument("--out", required=True, help="output .safetensors path")


def _data_parser(sub: argparse._SubParsersAction) -> None:
    """``mmpt data demo|write|inspect``."""
    d = sub.add_parser("data", help="demo data, shard writing and inspection")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    from mmpt.data.demo_options import add_modalities_argument

    dd = dsub.add_parser("demo", help="generate the embedded synthetic shapes/colours set")
    dd.add_argument("--out", required=True)
    dd.add_argument("--train-samples", type=int, default=20000)
    dd.add_argument("--eval-samples", type=int, default=1000)
    dd.add_argument("--image-size", type=int, default=64)
    dd.add_argument("--seed", type=int, default=0)
    add_modalities_argument(dd)
    dw = dsub.add_parser("write", help="write shards of any modality from a table, a folder or a FASTA file",
                         description="Each sample gets its files as their data sides store them (an image by its "
                         "bytes, PLY as npy, a FASTA record as seq), its caption (txt) and a json member with "
                         "every other column of its row (CSV numbers kept as numbers), the file's sidecar .json, "
                         "a class folder's label or a FASTA header. Every sample is decoded as training will, "
                         "under the same byte budget; what fails is skipped and counted per reason. Re-running "
                         "keeps the shards already finished. Writing no sample at all is an error.")
    dw.add_argument("input", help="a CSV/Parquet/JSONL table (a path or value column per modality), a folder of "
                    "files with .txt/.json sidecars (or class folders with --caption-template), or a FASTA file")
    dw.add_argument("--out", required=True, help="output pattern, e.g. shards/train-%%06d.tar")
    dw.add_argument("--max-size", type=float, default=256, help="target shard size in MB")
    dw.add_argument("--max-count", type=int, default=10000, help="samples per shard at most")
    dw.add_argument("--column", action="append", default=[], metavar="MODALITY=COLUMN",
                    help="table column of a modality (repeatable: --column image=img --column audio=wav "
                    "--column text=caption); default: found by name and by the extensions of the values")
    dw.add_argument("--path-column", help="table column with the file paths (default: found by name: file, path, "
                    "url, <modality>, <modality>_path, ..., or by its values' extensions)")
    dw.add_argument("--caption-column", help="table column with the captions (default: caption, text or title)")
    dw.add_argument("--caption-template", help="class folders <input>/<class>/<file>: caption each file with this "
                    "template, {} standing for the class name, e.g. 'a photo of a {}'; json gets {\"label\": class}")
    dw.add_argument("--key-prefix", help="sample keys are PREFIX + row number; default: the input's name and a "
                    "hash of its path and content (train-1a2b3c4d_000000012): separate tables never collide")
    dw.add_argument("--workers", type=int, help="processes decoding samples to validate them (default: CPUs - 1, at most 8)")
    di = dsub.add_parser("inspect", help="count samples, keys, modalities and decode errors of shards")
    di.add_argument("shards", help="path, glob, brace list or pipe: URL")
    di.add_argument("--decode", action="store_true", help="also decode every member to find bad ones")
    _add_plugged(dsub, DATA_ACTION_MODULES)


def _demo_parser(sub: argparse._SubParsersAction) -> None:
    """``mmpt demo``."""
    demo = sub.add_parser("demo", help="the whole path on generated data: data, train, eval, export, embed")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--smoke", action="store_true", help="tiny data and few steps (about a minute)")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    demo.add_argument("--recipe", default="clip-tiny", metavar="NAME",
                      help="recipe to run on demo data for its modalities (default: %(default)s)")


def _info_parser(sub: argparse._SubParsersAction) -> None:
    """``mmpt info``."""
    i = sub.add_parser("info", help="versions and registered encoders, objectives, recipes, eval tasks")
    i.add_argument("--tasks", action="store_true", help="list every eval task's keys with a description")
    i.add_argument("--keys", action="store_true", help="list every recipe key with a description")


def _version() -> str:
    from mmpt import __version__

    return __version__


class _LazyEpilogFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's line breaks and builds it only when help is shown (it imports the registries)."""

    def add_text(self, text: object) -> None:
        super().add_text(text() if callable(text) else text)


def _recipe_keys_help() -> str:
    from mmpt.config import Config, DataConfig, ModelConfig, OptimConfig, Source, TrainConfig
    from mmpt.config.keys import format_keys

    blocks = [format_keys("recipe keys (top level):", Config)]
    for section, cls in (("model", ModelConfig), ("data", DataConfig), ("data.sources[]", Source),
                         ("optim", OptimConfig), ("train", TrainConfig)):
        blocks.append(format_keys(f"{section}.*:", cls))
    blocks.append("model.encoders.<modality> and objectives.<name> take `name: <registered part>` plus that part's "
                  "keys (`mmpt info --keys` lists them); eval tasks: `mmpt info --tasks`. A wrong key names the "
                  "closest valid one.")
    return "\n\n".join(blocks)


def _part_keys_help() -> str:
    from mmpt.config.keys import format_keys
    from mmpt.registry import encoders, objectives

    return "\n\n".join(format_keys(f"{reg.kind} '{name}' keys:", reg.get(name))
                        for reg in (encoders, objectives) for name in reg.names())


def _task_keys_help() -> str:
    from mmpt.config.keys import format_keys
    from mmpt.registry import tasks

    return "\n\n".join(format_keys(f"task '{name}' keys:", tasks.get(name)) for name in tasks.names())


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mmpt`` command: one-line errors (``--debug``: tracebacks)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted after the subcommand too, where argparse would not see it
    args = _parser().parse_args([a for a in argv if a != "--debug"])
    from mmpt.training.launcher import watch_launcher
    from mmpt.training.startup import quiet_third_party

    watch_launcher()  # under torchrun/deepspeed (train, embed, ...): stop when the launcher dies
    quiet_third_party(debug)  # before anything imports deepspeed: it warns while being imported
    _route_messages()
    from mmpt.registry import ConfigError

    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print("mmpt: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        # A bad config, data location or argument is the user's to fix (2); anything else may be ours (1).
        code = 2 if isinstance(exc, (ConfigError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                                     PermissionError)) else 1
        hint = "" if code == 2 else " (run with --debug for the traceback)"
        print(f"mmpt: error: {_one_line(exc)}{hint}", file=sys.stderr)
        return code


def _one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line, naming the file for OS errors."""
    from mmpt.registry import ConfigError

    if isinstance(exc, OSError) and exc.filename:
        text = f"{exc.filename}: {exc.strerror or exc}"
    elif isinstance(exc, ConfigError):
        text = str(exc)
    else:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return " ".join(text.split())


def _route_messages() -> None:
    """Warnings and mmpt's log records go to stderr as ``mmpt: warning: ...`` lines."""
    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        print(f"mmpt: warning: {message}", file=sys.stderr)

    warnings.showwarning = show
    log = logging.getLogger("mmpt")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("mmpt: %(levelname)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def _dispatch(args: argparse.Namespace) -> int:
    handler = getattr(args, "handler", None)
    if handler is not None:  # a verb or data action from COMMAND_MODULES / DATA_ACTION_MODULES
        return handler(args) or 0
    if args.command == "train":
        from mmpt.config import load_config
        from mmpt.training.loop import train

        train(load_config(args.recipe, args.overrides), resume=args.resume)
    elif args.command == "eval":
        _eval(args)
    elif args.command == "embed":
        from mmpt.commands.embed import embed

        print(embed(args.model, args.data, args.modality, args.out, batch_size=args.batch_size,
                    workers=args.workers, normalize=not args.no_normalize, dtype=args.dtype,
                    metadata=args.metadata, allow_nonfinite=args.allow_nonfinite, precision=args.precision,
                    dim=args.dim, layer=args.layer))
    elif args.command == "caption":
        from mmpt.commands.caption import caption

        print(caption(args.model, args.data, args.modality, args.out, objective=args.objective,
                      batch_size=args.batch_size, workers=args.workers, allow_nonfinite=args.allow_nonfinite,
                      strategy=args.strategy, beam=args.beam, n_best=args.n_best, length_penalty=args.length_penalty,
                      top_k=args.top_k, top_p=args.top_p, temperature=args.temperature, seed=args.seed,
                      max_len=args.max_len))
    elif args.command == "export":
        _export(args)
    elif args.command == "import":
        _import(args)
    elif args.command == "data":
        _data(args)
    elif args.command == "demo":
        from mmpt.commands.demo import run_demo

        run_demo(args.out, smoke=args.smoke, overrides=args.overrides, recipe=args.recipe)
    elif args.command == "info":
        _info(args)
    return 0


def _export(args: argparse.Namespace) -> None:
    if args.format == "openclip":
        from mmpt.interop.openclip import export_openclip

        out, how = export_openclip(args.run_dir, args.out)
        print(f"exported {out} (load it with {how})")
    elif args.format == "hf-clip":
        from mmpt.interop.hf_clip import export_hf_clip

        print(f"exported {export_hf_clip(args.run_dir, args.out)} (CLIPModel.from_pretrained loads it)")
    elif args.format == "folder":
        from mmpt.interop.folder import export_folder

        out = export_folder(args.run_dir, args.out, keep_adapters=args.keep_adapters, license=args.license)
        print(f"exported {out} (mmpt.load or mmpt.create_model_and_transforms loads it)")
    elif args.format == "hf-text":
        from mmpt.interop.hf_text import export_hf_text

        out, cls = export_hf_text(args.run_dir, args.out)
        print(f"exported {out} (AutoModelForMaskedLM.from_pretrained loads it as {cls})")
    else:
        from mmpt.commands.export import export

        print(f"exported {export(args.run_dir, args.out, keep_adapters=args.keep_adapters)}")


def _import(args: argparse.Namespace) -> None:
    if args.import_format == "openclip":
        from mmpt.interop.openclip import import_openclip

        out = import_openclip(args.model, args.weights, args.out, model_config=args.model_config,
                              tokenizer=args.tokenizer)
    else:
        from mmpt.interop.hf_clip import import_hf_clip

        out = import_hf_clip(args.weights, args.out)
    print(f"imported {args.weights} into {out}")


def _eval(args: argparse.Namespace) -> None:
    from mmpt.eval.task_list import read_tasks, stored_tasks, tasks_to_run
    from mmpt.registry import ConfigError

    # What the user typed is checked before the model load (seconds of imports) starts.
    if not Path(args.model).exists():
        raise ConfigError(f"{args.model}: no such file (expected an exported .safetensors file or a run directory)")
    if not args.tasks_file and not args.use_embedded_tasks:
        raise ConfigError(f"{args.model}: no tasks: give --tasks-file FILE (your task list), or "
                          "--use-embedded-tasks to run the eval tasks stored with the model")
    # the user's own file: pipe: sources allowed
    tasks = read_tasks(args.tasks_file, f"--tasks-file {args.tasks_file}") if args.tasks_file else None
    where = args.tasks_file
    import mmpt
    from mmpt.eval import format_table, run_tasks, write_results

    model, transforms, _ = mmpt.load(args.model, allow_nonfinite=args.allow_nonfinite)
    if tasks is None:
        where = f"{args.model} (embedded eval tasks)"
        tasks = stored_tasks(args.model, where)
    tasks = tasks_to_run(tasks, args.task, args.overrides, where, trusted=bool(args.tasks_file))
    results = run_tasks(model, transforms, tasks, device="cpu")  # the Pretrainer: caption tasks need objectives
    print(format_table(results))
    if args.out:
        write_results(results, args.out)


def _data(args: argparse.Namespace) -> None:
    if args.data_command == "demo":
        from mmpt.data.demo_shards import generate_demo

        info = generate_demo(args.out, train_samples=args.train_samples, eval_samples=args.eval_samples,
                             image_size=args.image_size, seed=args.seed, modalities=args.modalities)
        print(f"demo data written to {args.out}: {info.train_samples} train + {info.eval_samples} eval samples, "
              f"modalities {', '.join(info.modalities)}; train: {info.train_pattern}, eval: {info.eval_pattern}")
    elif args.data_command == "write":
        from mmpt.data.writer import write_shards
        from mmpt.registry import ConfigError

        columns = {}
        for item in args.column:
            modality, sep, column = item.partition("=")
            if not sep or not modality or not column:
                raise ConfigError(f"--column {item!r}: expected MODALITY=COLUMN, e.g. --column audio=wav_path")
            columns[modality.strip()] = column.strip()
        print(write_shards(args.input, args.out, path_column=args.path_column, caption_column=args.caption_column,
                           columns=columns, caption_template=args.caption_template, key_prefix=args.key_prefix,
                           max_size=int(args.max_size * 2**20), max_count=args.max_count, workers=args.workers))
    elif args.data_command == "inspect":
        from mmpt.data.inspect import inspect_shards

        report = inspect_shards(args.shards, decode=args.decode)
        print(json.dumps(report, indent=1))


def _info(args: argparse.Namespace) -> None:
    if args.tasks or args.keys:
        blocks = [_recipe_keys_help(), _part_keys_help()] if args.keys else []
        print("\n\n".join(blocks + ([_task_keys_help()] if args.tasks else [])))
        return
    import importlib.metadata as md

    from mmpt.registry import encoders, modalities, objectives, tasks

    for pkg in ("mmpt", "torch", "torchaudio", "timm", "open_clip_torch", "transformers", "webdataset", "deepspeed"):
        try:
            print(f"{pkg:16s} {md.version(pkg)}")
        except md.PackageNotFoundError:
            print(f"{pkg:16s} not installed")
    from importlib import resources

    recipes = sorted(f.name[:-5] for f in resources.files("mmpt.recipes").iterdir() if f.name.endswith(".yaml"))
    verbs, actions = argparse.ArgumentParser().add_subparsers(), argparse.ArgumentParser().add_subparsers()
    _add_plugged(verbs, COMMAND_MODULES)
    _add_plugged(actions, DATA_ACTION_MODULES)
    plugged = [*verbs.choices, *(f"data {a}" for a in actions.choices)]  # `mmpt VERB --help`: their options
    for title, names in (("encoders", encoders.names()), ("modalities", modalities.names()),
                         ("objectives", objectives.names()), ("eval tasks", tasks.names()), ("recipes", recipes),
                         ("plugged verbs", plugged)):
        print(f"{title:16s} {', '.join(names)}")


if __name__ == "__main__":
    sys.exit(main())
