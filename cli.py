"""The `onellm` command line (installed as `onellm.cli`).

This is the one place that turns an `OneLLMError` into a one-line message and an exit
code. Heavy imports (torch, onnxruntime, llama.cpp) happen inside the commands, so
`onellm --help` is instant and works without the export extra.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

import click

from onellm.runtime import __version__
from onellm.runtime.errors import OneLLMError
from onellm.runtime.registry import DECODER_QUANTS, ENCODER_PRECISIONS, EXECUTION_PROVIDERS, KV_CACHE_TYPES


# Optional modules -> the extra that installs them (a missing one names its `pip install`).
_EXTRAS = {"torch": "export", "onnx": "export", "onnxscript": "export", "gguf": "export",
           "matplotlib": "bench", "tensorrt": "trt"}

log = logging.getLogger("onellm.cli")


def handle_errors(func):
    """Run a command body; any error becomes one line on stderr and a non-zero exit code.

    `OneLLMError`s carry their own message and code; an OSError names its path and what
    went wrong; a missing optional module names the `pip install` that brings it; anything
    else is reported as an internal error (its traceback only with -vv).
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except OneLLMError as exc:
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            click.echo("onellm: interrupted", err=True)
            sys.exit(130)
        except ModuleNotFoundError as exc:
            root = (exc.name or "").split(".")[0]
            extra = _EXTRAS.get(root)
            if extra is None:
                _internal(exc)
            _fail(f"this command needs {root}, which is not installed: pip install 'onellm[{extra}]'", 1)
        except OSError as exc:
            from onellm.runtime.errors import describe_os_error

            where = exc.filename if exc.filename is not None else "?"
            _fail(f"{where}: {describe_os_error(exc)}", 1)
        except Exception as exc:  # noqa: BLE001 - the CLI never shows a raw traceback
            _internal(exc)

    return wrapper


def _fail(message: str, code: int) -> None:
    # One line, whatever the message holds (a library's multi-line text is folded).
    click.echo("onellm: error: " + " ".join(str(message).split()), err=True)
    sys.exit(code)


def _internal(exc: BaseException) -> None:
    log.debug("internal error", exc_info=exc)
    _fail(f"internal error ({type(exc).__name__}: {exc}); rerun with -vv for the traceback and report it", 70)


def _require_extra(command: str) -> None:
    """Stop early, in one line, when the torch-based export extra is missing."""
    from onellm.runtime.errors import ConfigError

    try:
        import torch  # noqa: F401
    except ImportError:
        raise ConfigError(f"`onellm {command}` needs the export extra (torch, onnx, gguf): "
                          "pip install 'onellm[export]'") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "ONELLM"})
@click.version_option(__version__, prog_name="onellm")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """onellm: run OneLLM (eight modalities -> text) locally from exported graphs.

    Export a checkpoint once into a bundle (ONNX encoder graphs + a GGUF decoder),
    then ask questions about images, video, audio, point clouds, depth/normal maps,
    IMU recordings and fMRI with no Python ML stack at run time.
    Every option can also be set through an ONELLM_<COMMAND>_<OPTION> environment variable.
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    fmt = "onellm: %(message)s" if verbose == 0 else "%(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt)


@main.command("presets")
@handle_errors
def presets_cmd() -> None:
    """List the shipped model presets (use with --preset)."""
    from onellm.ref.config import list_presets, load_preset

    for name in list_presets():
        cfg = load_preset(name)
        click.echo(
            f"{name:8s} decoder {cfg.decoder.n_layers}x{cfg.decoder.dim}, "
            f"CLIP {cfg.clip.layers}x{cfg.clip.width}, UPM {cfg.upm.n_experts}x{cfg.upm.depth}"
        )


@main.command("modalities")
@handle_errors
def modalities_cmd() -> None:
    """List the input modalities, their options and accepted file types."""
    from onellm.runtime.modalities import all_modalities

    for spec in all_modalities().values():
        click.echo(f"{spec.name:6s} {spec.cli_option:9s} {spec.description} [{' '.join(spec.file_types)}]")


# --------------------------------------------------------------------------- reference


def _model_options(func):
    """--preset / --config, shared by every command that builds a model."""
    func = click.option("--config", "config_path", type=click.Path(dir_okay=False),
                        help="Model config JSON (instead of --preset).")(func)
    func = click.option("--preset", default=None, help="Model preset name (default 7b; see `onellm presets`).")(func)
    return func


@main.group("reference")
def reference_group() -> None:
    """The PyTorch reference model (needs torch: pip install onellm[export]).

    Count parameters, write a small random test model, or answer a question straight
    from a checkpoint, without exporting a bundle.
    """


@reference_group.command("params")
@_model_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def reference_params_cmd(preset: str | None, config_path: str | None, as_json: bool) -> None:
    """Parameter counts of a model config, split by part."""
    import json

    _require_extra("reference params")

    from onellm.ref.config import resolve_config
    from onellm.ref.model import count_parameters

    cfg = resolve_config(preset, config_path)
    counts = count_parameters(cfg)
    if as_json:
        click.echo(json.dumps({"config": cfg.name, **counts}, indent=2))
        return

    unit, scale = ("GiB", 2**30) if counts["total"] * 2 >= 2**30 else ("MiB", 2**20)

    def row(label: str, n: int, indent: int = 0) -> None:
        click.echo(f"{' ' * indent}{label:<{28 - indent}s} {n:>15,d}  {n * 2 / scale:8.2f} {unit} fp16")

    click.echo(f"config {cfg.name}: {len(cfg.modalities)} modalities ({', '.join(cfg.modalities)})")
    row("decoder (LLaMA)", counts["decoder"])
    row("CLIP visual tower", counts["clip"])
    row("CLIP proj (stored, unused)", counts["clip_unused_proj"])
    row("UPM experts", counts["upm_experts"])
    row("UPM per-modality parts", counts["upm"] - counts["upm_experts"])
    for m, n in counts["upm_per_modality"].items():
        row(m, n, indent=2)
    row("modality tokenizers", sum(counts["tokenizers"].values()))
    for m, n in counts["tokenizers"].items():
        if n:
            row(m, n, indent=2)
    row("total", counts["total"])


_MAKE_TINY_LIMIT = 200_000_000  # parameters; a random model bigger than this is a mistake


@reference_group.command("make-tiny")
@click.option("--out", "out_dir", required=True, type=click.Path(),
              help="Directory for consolidated.00-of-01.pth, tokenizer.model and config.json.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random weights.")
@click.option("--preset", default="tiny", show_default=True, help="Model preset name.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Model config JSON (instead of --preset).")
@click.option("--force", is_flag=True, help="Write into a non-empty directory, replacing these files.")
@handle_errors
def reference_make_tiny_cmd(out_dir: str, seed: int, preset: str, config_path: str | None, force: bool) -> None:
    """Write a small RANDOM-weight OneLLM checkpoint and a tiny tokenizer, for trying the pipeline.

    The checkpoint uses the release's own key format, so every command that takes the
    real checkpoint takes this one. Its answers are meaningless text.
    """
    from pathlib import Path

    _require_extra("reference make-tiny")
    from onellm.ref.config import resolve_config
    from onellm.ref.model import count_parameters
    from onellm.ref.testing import save_random_checkpoint, train_tiny_tokenizer
    from onellm.runtime.errors import ConfigError, InputError
    from onellm.runtime.inputs import check_out_dir

    check_out_dir(out_dir)
    cfg = resolve_config(None if config_path else preset, config_path)
    total = count_parameters(cfg)["total"]
    if total > _MAKE_TINY_LIMIT:
        raise ConfigError(
            f"config {cfg.name!r} has {total / 1e6:.0f}M parameters; make-tiny writes random test models "
            f"of at most {_MAKE_TINY_LIMIT // 1_000_000}M (use --preset tiny or a small --config)"
        )
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not force:
        raise InputError(out, "an empty or new directory (or --force)", f"{sum(1 for _ in out.iterdir())} existing entries")
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "consolidated.00-of-01.pth"
    save_random_checkpoint(cfg, ckpt, seed=seed)
    tok = train_tiny_tokenizer(out, vocab_size=cfg.decoder.vocab_size)
    (out / "config.json").write_text(cfg.to_json())
    click.echo(f"wrote {ckpt} ({total / 1e6:.1f}M parameters, seed {seed}), {tok}, {out / 'config.json'}")
    click.echo("NOTE: the weights are RANDOM: answers from this model are meaningless text.")
    click.echo(f"try: onellm reference ask --checkpoint {ckpt} --tokenizer {tok} --config {out / 'config.json'} "
               "--greedy \"Describe the scene.\"")


# Legal ranges of the numeric options: option -> (test, words for "expected").
_RANGES = {
    "--max-tokens": (lambda v: v >= 1, "an integer >= 1"),
    "--temperature": (lambda v: v >= 0, "a number >= 0"),
    "--top-p": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "--top-k": (lambda v: v >= 0, "an integer >= 0 (0: off)"),
    "--repeat-penalty": (lambda v: v > 0, "a number > 0 (1: off)"),
    "--threads": (lambda v: v >= 1, "an integer >= 1"),
    "--ctx": (lambda v: v >= 1, "an integer >= 1"),
    "--logprobs": (lambda v: v >= 0, "an integer >= 0"),
}


def _check_ranges(**values) -> None:
    """Refuse an out-of-range option before anything loads (None: not given)."""
    import math

    from onellm.runtime.errors import InputError

    for name, value in values.items():
        option = "--" + name.replace("_", "-")
        if value is None:
            continue
        test, words = _RANGES[option]
        if isinstance(value, float) and not math.isfinite(value) or not test(value):
            raise InputError(option, words, repr(value))


def _check_question(question: str | None) -> None:
    from onellm.runtime.errors import InputError

    if question is not None and not question.strip():
        raise InputError("QUESTION", "a non-empty question (or none, to use the input's caption prompt)",
                         "an empty string")


class _ModalityOptionsCommand(click.Command):
    """A command that gets one file option per registered modality (--image, --imu, ...).

    The options are added when the command is first parsed or shown, so importing the
    CLI does not import the modality readers.
    """

    with_reader_flags = False  # also each modality's dedicated reader options (--imu-rate, --audio-start, ...)

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        if not getattr(self, "_modality_options_added", False):
            from onellm.runtime.modalities import all_modalities

            self._modality_options_added = True
            specs = list(all_modalities().values())
            # --imu takes an export folder too, and repeats for one-sensor files (ACC.csv + GYRO.csv).
            extra = [
                click.Option([spec.cli_option, spec.name], type=click.Path(), default=None,
                             multiple=spec.several_files,
                             help=f"{spec.description} [{' '.join(spec.file_types)}]; - reads standard input")
                for spec in specs
            ]
            if self.with_reader_flags:  # declared by the modality specs, never written here
                extra += [
                    click.Option([flag.option, flag.param], default=None, help=flag.help,
                                 type=click.Choice(list(flag.kind)) if isinstance(flag.kind, tuple) else flag.kind)
                    for spec in specs for flag in spec.flags
                ]
            anchor = getattr(self, "insert_after", "clip_checkpoint")
            at = next(i for i, p in enumerate(self.params) if p.name == anchor) + 1
            self.params[at:at] = extra  # after the checkpoint options
        return super().get_params(ctx)


def _parse_reader_options(items: tuple[str, ...]) -> dict:
    """KEY=VALUE strings -> keyword arguments (numbers become float, true/false bool)."""
    from onellm.runtime.inputs import parse_reader_options

    return parse_reader_options(items)


@reference_group.command("ask", cls=_ModalityOptionsCommand)
@click.option("--checkpoint", required=True, type=click.Path(),
              help="consolidated.00-of-01.pth, one of its .s0-.s9 shards, or their directory.")
@click.option("--tokenizer", "tokenizer_path", required=True, type=click.Path(dir_okay=False),
              help="The SentencePiece tokenizer.model.")
@click.option("--clip-checkpoint", type=click.Path(dir_okay=False),
              help="OpenAI/open_clip CLIP ViT-L/14 weights, if the checkpoint lacks clip.visual.*.")
@_model_options
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True,
              help="Weight dtype (fp16 on CPU is slow; fp32 of an fp16 file doubles the memory).")
@click.option("--input-npy", type=click.Path(dir_okay=False),
              help="An already-preprocessed input array (.npy of the modality's input shape); needs --modality.")
@click.option("--modality", default=None, help="Modality of --input-npy (see `onellm modalities`).")
@click.option("--reader-option", "reader_options", multiple=True, metavar="KEY=VALUE",
              help="Passed to the modality reader, e.g. rate=100 (IMU without timestamps), start=3.5. Repeatable.")
@click.option("--max-tokens", default=256, show_default=True, help="Most new tokens to generate.")
@click.option("--temperature", default=0.1, show_default=True, help="Sampling temperature.")
@click.option("--top-p", default=0.75, show_default=True, help="Nucleus sampling mass.")
@click.option("--seed", default=0, show_default=True, help="Sampling seed.")
@click.option("--greedy", is_flag=True, help="Take the most likely token each step (no sampling).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.argument("question", required=False)
@handle_errors
def reference_ask_cmd(checkpoint, tokenizer_path, clip_checkpoint, preset, config_path, dtype, input_npy, modality,
                      reader_options, max_tokens, temperature, top_p, seed, greedy, as_json, question, **modality_files) -> None:
    """Answer QUESTION about one input with the PyTorch reference model (slow; for checking).

    Give at most one input (--image, --video, --audio, --point, --depth/--normal with
    --image, --imu, --fmri, or --input-npy with --modality); without one it is a text-only
    chat. QUESTION defaults to the modality's evaluation prompt.
    """
    import json
    import time

    _require_extra("reference ask")
    _check_ranges(max_tokens=max_tokens, temperature=temperature, top_p=top_p)
    _check_question(question)
    from onellm.ref.checkpoint import load_model
    from onellm.ref.config import resolve_config
    from onellm.ref.generate import generate
    from onellm.runtime.errors import InputError
    from onellm.runtime.inputs import read_selected
    from onellm.runtime.modalities import get_modality
    from onellm.runtime.tokenizer import Tokenizer

    cfg = resolve_config(preset, config_path)
    tokenizer = Tokenizer(tokenizer_path)
    if tokenizer.vocab_size != cfg.decoder.vocab_size:
        raise InputError(tokenizer_path, f"a tokenizer of {cfg.decoder.vocab_size} pieces (config {cfg.name!r})",
                         f"{tokenizer.vocab_size} pieces")
    t0 = time.perf_counter()
    modality_files = {name: _one_or_list(v) for name, v in modality_files.items()}
    inputs = read_selected(modality_files, _parse_reader_options(reader_options), input_npy=input_npy,
                           modality=modality)
    preprocess_s = time.perf_counter() - t0
    if inputs is not None and inputs[0] not in cfg.modalities:
        raise InputError(inputs[0], f"one of the config's modalities ({', '.join(cfg.modalities)})", inputs[0])
    if question is None:
        if inputs is None:
            raise InputError("QUESTION", "a question (required without a modality input)", "none")
        question = get_modality(inputs[0]).caption_prompt
    model, report = load_model(cfg, checkpoint, clip_checkpoint=clip_checkpoint, dtype=dtype)
    t0 = time.perf_counter()
    result = generate(model, tokenizer, question, inputs=inputs, max_new_tokens=max_tokens,
                      temperature=temperature, top_p=top_p, seed=seed, greedy=greedy)
    generate_s = time.perf_counter() - t0
    if as_json:
        click.echo(json.dumps({
            "answer": result.text,
            "stop_reason": result.stop_reason,
            "n_new_tokens": len(result.token_ids),
            "modality": inputs[0] if inputs else None,
            "question": question,
            "config": cfg.name,
            "dtype": report.dtype,
            "clip_source": report.clip_source,
            "load_s": round(report.seconds, 3),
            "preprocess_s": round(preprocess_s, 3),
            "generate_s": round(generate_s, 3),
        }, indent=2))
    else:
        click.echo(result.text)



# ------------------------------------------------------------------------ bundles


class _Progress:
    """A one-line progress bar on stderr for (what, done, total) callbacks.

    On a terminal it redraws in place; elsewhere (CI logs, pipes) it prints a line per
    step name so logs stay short.
    """

    def __init__(self, title: str) -> None:
        import time

        self.title = title
        self.tty = sys.stderr.isatty()
        self.last_what = None
        self.last_print = 0.0
        self.t0 = time.perf_counter()

    def __call__(self, what: str, done: int, total: int) -> None:
        import time

        total = max(total, 1)
        frac = min(max(done / total, 0.0), 1.0)
        elapsed = time.perf_counter() - self.t0
        if self.tty:
            width = 24
            bar = "#" * int(frac * width) + "." * (width - int(frac * width))
            line = f"\r{self.title} [{bar}] {done}/{total} {elapsed:5.1f}s {what[:48]:48s}"
            click.echo(line, err=True, nl=False)
            if done >= total and what == "done":
                click.echo("", err=True)
        else:
            # Not a terminal (logs, pipes): a line when the stage changes, and at most one
            # every 3 s within a stage, so long steps still show they are moving.
            step = what.split(":")[0]
            if step != self.last_what or elapsed - self.last_print >= 3.0:
                click.echo(f"{self.title}: [{done}/{total}] {what} ({elapsed:.1f}s)", err=True)
                self.last_what = step
                self.last_print = elapsed

    def finish(self) -> None:
        if self.tty:
            click.echo("", err=True)


def _echo_random_notice(manifest) -> None:
    if manifest.random_weights:
        click.secho("onellm: note: this bundle has RANDOM weights (the tiny demo model); its answers are "
                    "meaningless text. Export the real checkpoint with `onellm export` for real answers.",
                    err=True, fg="yellow")


# `onellm export`'s decoder when --decoder-quant is not given: q4_0 with llama.cpp's CPU_REPACK
# weights measured the fastest prefill of the 4-bit types (prefill_sweep; at 7B on Zen 4, paired
# with q4_k_m: 0.6 s sooner to the first token, 6 % slower per token, even over 256 tokens).
DEFAULT_EXPORT_QUANT = "q4_0"


@main.command("export")
@click.option("--checkpoint", type=click.Path(), help="consolidated.00-of-01.pth, one of its ten .s{0..9}.pth shards, or their directory.")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(dir_okay=False), help="LLaMA SentencePiece tokenizer.model.")
@click.option("--clip-checkpoint", type=click.Path(dir_okay=False),
              help="OpenAI or open_clip ViT-L/14 weights, when the checkpoint has no clip.visual.* keys.")
@click.option("--out", "out_dir", required=True, type=click.Path(), help="Bundle directory to create.")
@_model_options
@click.option("--modalities", default=None, help="Comma-separated modalities to export (default: all in the config).")
@click.option("--encoder-precision", default="fp32,int8", show_default=True,
              help="Comma-separated encoder precisions: "
                   + "; ".join(f"{p.name} ({p.help})" for p in ENCODER_PRECISIONS.values())
                   + ". The runtime picks per device.")
@click.option("--decoder-quant", default=None,
              help="Comma-separated GGUF types: " + ", ".join(DECODER_QUANTS)
                   + "; the first is the bundle's default [default: q4_0, the fastest to first token on AVX-512 "
                   "CPUs (benchmarks/RESULTS.md); q4_k_m decodes about 6 % faster per token; q8_0 for "
                   "near-lossless; f32 for --demo].")
@click.option("--calibrate", "calibrate", multiple=True, metavar="MODALITY=PATH",
              help="ov-int8 only: calibrate the static int8 encoder on these recordings too (a file, or a "
                   "directory of files, read by the modality's reader as `ask` reads them; a .npy holds an "
                   "already preprocessed array). Repeatable. Always used: seeded random inputs of each "
                   "modality and, in a source checkout, examples/; recordings like the ones you will ask "
                   "about give better scales.")
@click.option("--trt", is_flag=True, help="Also build TensorRT fp16 engines (needs TensorRT and an NVIDIA GPU).")
@click.option("--demo", is_flag=True, help="Build the tiny RANDOM-weight demo bundle (no checkpoint needed).")
@click.option("--force", is_flag=True, help="Replace a non-empty --out directory.")
@handle_errors
def export_cmd(checkpoint, tokenizer_path, clip_checkpoint, out_dir, preset, config_path, modalities,
               encoder_precision, decoder_quant, calibrate, trt, demo, force) -> None:
    """Export a OneLLM checkpoint into a bundle the runtime runs without torch.

    Writes staged ONNX encoder graphs (per-modality tokenizers, one shared CLIP trunk,
    one shared UPM, per-modality projections) and a GGUF decoder, validates each against
    the PyTorch reference, and records checksums and parity figures in manifest.json.
    Needs the export extra: pip install "onellm[export]".
    """
    from onellm.runtime.inputs import check_out_dir

    _require_extra("export")
    check_out_dir(out_dir)
    calibration = _calibration_inputs(calibrate, encoder_precision)
    progress = _Progress("export")
    try:
        manifest = _export(checkpoint, tokenizer_path, clip_checkpoint, out_dir, preset, config_path, modalities,
                           encoder_precision, decoder_quant, trt, demo, force, progress, calibration)
    except OSError as exc:
        from onellm.runtime.errors import os_error

        raise os_error(exc, doing="write the bundle") from None
    progress.finish()
    _print_summary(manifest, out_dir)
    _echo_random_notice(manifest)


def _calibration_inputs(items, encoder_precision: str) -> dict:
    """--calibrate MODALITY=PATH values -> {modality: [preprocessed arrays]}, read before the export starts."""
    import numpy as np

    from onellm.runtime.errors import ConfigError
    from onellm.runtime.modalities import MODALITY_ORDER, get_modality
    from onellm.runtime.pipeline import read_input

    if not items:
        return {}
    if "ov-int8" not in [p.strip() for p in encoder_precision.split(",")]:
        raise ConfigError("--calibrate calibrates the ov-int8 encoder; add ov-int8 to --encoder-precision")
    out: dict[str, list] = {}
    for item in items:
        modality, sep, path = item.partition("=")
        if not sep or not path:
            raise ConfigError(f"--calibrate {item!r}: expected MODALITY=PATH (e.g. imu=recordings/)")
        if modality not in MODALITY_ORDER:
            raise ConfigError(f"--calibrate {item!r}: unknown modality {modality!r} "
                              f"(known: {', '.join(MODALITY_ORDER)})")
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"--calibrate {item!r}: {p} does not exist")
        files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")) if p.is_dir() else [p]
        if not files:
            raise ConfigError(f"--calibrate {item!r}: {p} holds no files")
        shape = tuple(get_modality(modality).input_shape)
        for f in files:
            if f.suffix == ".npy":
                arr = np.load(f, allow_pickle=False)
                if arr.shape != shape:
                    raise ConfigError(f"{f}: a preprocessed {modality} array must have shape {list(shape)}, "
                                      f"found {list(arr.shape)}")
            elif get_modality(modality).requires_image:
                raise ConfigError(f"{f}: {modality} calibration needs preprocessed .npy arrays of shape {list(shape)} "
                                  f"(its reader also needs the RGB photo)")
            else:
                arr = read_input(modality, str(f)).array
            out.setdefault(modality, []).append(np.asarray(arr, np.float32))
    return out


def _export(checkpoint, tokenizer_path, clip_checkpoint, out_dir, preset, config_path, modalities,
            encoder_precision, decoder_quant, trt, demo, force, progress, calibration=None) -> dict:
    from onellm.export.bundle import build_bundle, build_demo_bundle
    from onellm.runtime.errors import ConfigError

    if demo:
        if checkpoint or tokenizer_path:
            raise ConfigError("--demo builds a random-weight model; do not pass --checkpoint/--tokenizer with it")
        manifest = build_demo_bundle(out_dir, force=force, progress=progress, decoder_quant=decoder_quant or "f32",
                                     encoder_precision=encoder_precision, calibration=calibration)
    else:
        if not checkpoint or not tokenizer_path:
            raise ConfigError("pass --checkpoint and --tokenizer (or --demo for the random-weight demo bundle)")
        from onellm.ref.config import resolve_config

        cfg = resolve_config(preset, config_path)
        manifest = build_bundle(out_dir, cfg, checkpoint, tokenizer_path, clip_checkpoint=clip_checkpoint,
                                modalities=modalities, encoder_precision=encoder_precision,
                                decoder_quant=decoder_quant or DEFAULT_EXPORT_QUANT, trt=trt, force=force, progress=progress,
                                calibration=calibration)
    return manifest


def _print_summary(manifest, where) -> None:
    total = 0
    for rel in manifest.files:
        total += (Path(where) / rel).stat().st_size
    click.echo(f"bundle {where}: preset {manifest.preset}, {len(manifest.modalities)} modalities, "
               f"{len(manifest.files)} files, {total / 2**20:.1f} MiB")
    for prec, enc in manifest.encoder.precisions.items():
        worst = min(m.parity["cosine"] for m in enc.modalities.values()) if enc.modalities else float("nan")
        click.echo(f"  encoder {prec:5s}: {len(enc.graphs)} graphs, worst modality cosine vs torch {worst:.6f}")
    for quant, dec in manifest.decoder.quants.items():
        p = dec.parity
        click.echo(f"  decoder {quant:6s}: {dec.bytes / 2**20:.1f} MiB, logits cosine (min) {p['cos_min']:.6f}, "
                   f"top-1 agreement {p['top1']:.3f}")


@main.command("inspect")
@click.argument("bundle_dir", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the raw manifest.")
@handle_errors
def inspect_cmd(bundle_dir: str, as_json: bool) -> None:
    """Show what a bundle holds: model, files, graphs, parity figures, tool versions."""
    import json as _json

    from onellm.runtime.bundle import load_manifest

    manifest = load_manifest(bundle_dir, verify=False).manifest
    m = manifest.to_dict()  # the formatting below reads the plain form
    if as_json:
        click.echo(_json.dumps(m, indent=2))
        return
    cfg = m["config"]
    d = cfg["decoder"]
    click.echo(f"bundle      {bundle_dir}  (schema {m['schema']} v{m['schema_version']}, created {m['created']})")
    if m.get("random_weights"):
        click.secho("weights     RANDOM (tiny demo model; answers are meaningless)", fg="yellow")
    click.echo(f"model       preset {m['preset']}: decoder {d['n_layers']} layers x {d['dim']}, vocab {d['vocab_size']}, "
               f"context {d['max_seq_len']}; CLIP {cfg['clip']['layers']} x {cfg['clip']['width']}; "
               f"UPM {cfg['upm']['n_experts']} experts x {cfg['upm']['depth']}")
    click.echo(f"source      {', '.join(m['source']['checkpoint'])} sha256 {m['source']['sha256'][:16]}…  "
               f"CLIP from {m['source']['clip_source']}")
    click.echo(f"inserted    {m['n_inserted']} rows of {m['n_embd']} after BOS; stop strings {m['prompt']['stop']}")
    click.echo(f"modalities  {', '.join(m['modalities'])}")
    click.echo(f"encoder     default {m['encoder']['default']}")
    for prec, enc in m["encoder"]["precisions"].items():
        click.echo(f"  {prec}: {len(enc['graphs'])} graphs")
        for name, me in enc["modalities"].items():
            par = me["parity"]
            click.echo(f"    {name:6s} cosine {par['cosine']:.7f}  max-abs {par['max_abs']:.3g}")
    click.echo(f"decoder     default {m['decoder']['default']}")
    for quant, dec in m["decoder"]["quants"].items():
        p = dec["parity"]
        click.echo(f"  {quant:6s} {dec['file']}  {dec['bytes'] / 2**20:.1f} MiB  logits cos_min {p['cos_min']:.6f}  "
                   f"max-abs {p['max_abs']:.3g}  top-1 {p['top1']:.3f}")
    trt = m.get("tensorrt")
    click.echo(f"tensorrt    {'none' if not trt else trt.get('fingerprint')}")
    click.echo("tools       " + ", ".join(f"{k} {v}" for k, v in m["tools"].items()))


@main.command("verify")
@click.argument("bundle_dir", type=click.Path(file_okay=False))
@click.option("--checkpoint", default=None, type=click.Path(),
              help="The checkpoint the bundle was exported from (the demo bundle: rebuilt from its recorded seed).")
@click.option("--clip-checkpoint", type=click.Path(dir_okay=False), help="Separate CLIP weights, as at export.")
@click.option("--checksums-only", is_flag=True, help="Only re-hash the bundle's files (no checkpoint, no torch).")
@handle_errors
def verify_cmd(bundle_dir: str, checkpoint: str | None, clip_checkpoint: str | None, checksums_only: bool) -> None:
    """Re-check a bundle: file checksums, the checkpoint's identity, then parity of every graph and GGUF.

    A checkpoint other than the one the bundle was exported from stops the run before
    the slow parity checks.
    """
    from onellm.runtime.errors import ParityError

    if checksums_only:
        if checkpoint or clip_checkpoint:
            from onellm.runtime.errors import ConfigError

            raise ConfigError("--checksums-only checks the bundle's files alone; drop --checkpoint/--clip-checkpoint")
        from onellm.runtime.bundle import verify_checksums

        lines, checks, failures = verify_checksums(bundle_dir)
        report = {"lines": lines, "checks": checks, "failures": failures, "ok": not failures}
    else:
        _require_extra("verify")
        from onellm.export.verify import verify_bundle

        progress = _Progress("verify")
        report = verify_bundle(bundle_dir, checkpoint, clip_checkpoint=clip_checkpoint, progress=progress)
        progress.finish()
    for line in report["lines"]:
        click.echo(line)
    if not report["ok"]:
        raise ParityError(f"{bundle_dir}: {report['failures']} check(s) failed")
    click.echo(f"{bundle_dir}: all {report['checks']} checks passed")


# ------------------------------------------------------------------------ asking


class _RuntimeInputCommand(_ModalityOptionsCommand):
    with_reader_flags = True
    insert_after = "bundle"


def _runtime_options(func):
    opts = [
        click.option("--bundle", type=click.Path(file_okay=False), default=None,
                     help="Bundle directory (default: the demo bundle in the cache, built on first use)."),
        click.option("--device", type=click.Choice(["auto", *EXECUTION_PROVIDERS]), default="auto",
                     show_default=True,
                     help="Where the encoder runs (auto: the bundle's TensorRT engines, else CUDA, else CPU); "
                          "llama.cpp offloads to the GPU when built with CUDA."),
        click.option("--precision", type=click.Choice(list(ENCODER_PRECISIONS)), default=None,
                     help="Encoder precision to run (default per device, the first exported one this machine "
                          "can run: "
                          + ", ".join(f"{e.device} {'/'.join(e.precisions)}" for e in EXECUTION_PROVIDERS.values())
                          + "; else the bundle's. ov-int8 runs on OpenVINO: the openvino extra)."),
        click.option("--quant", type=click.Choice(list(DECODER_QUANTS)), default=None,
                     help="Which exported GGUF to run (default: the bundle's)."),
        click.option("--threads", type=int, default=None,
                     help="CPU threads, fixed (default: physical cores, fewer for llama.cpp while other "
                          "processes keep cores busy)."),
        click.option("--reader-option", "reader_options", multiple=True, metavar="KEY=VALUE",
                     help="Any other option of the modality's reader (repeatable)."),
    ]
    for opt in reversed(opts):
        func = opt(func)
    return func


def _sampling_options(func):
    opts = [
        click.option("--max-tokens", default=256, show_default=True, help="Most new tokens."),
        click.option("--temperature", default=0.1, show_default=True, help="Sampling temperature."),
        click.option("--top-p", default=0.75, show_default=True, help="Nucleus sampling mass."),
        click.option("--top-k", default=0, show_default=True, help="Keep the k most likely tokens first (0: off)."),
        click.option("--repeat-penalty", default=1.0, show_default=True, help="Repeat penalty (1: off)."),
        click.option("--seed", default=0, show_default=True, help="Sampling seed."),
        click.option("--greedy", is_flag=True, help="Always take the most likely token."),
    ]
    for opt in reversed(opts):
        func = opt(func)
    return func


def _make_sampling(max_tokens, temperature, top_p, top_k, repeat_penalty, seed, greedy):
    from onellm.runtime.decoder import Sampling

    if greedy:
        return Sampling(temperature=0.0, top_p=1.0, top_k=0, repeat_penalty=repeat_penalty, seed=seed,
                        max_new_tokens=max_tokens)
    return Sampling(temperature=temperature, top_p=top_p, top_k=top_k, repeat_penalty=repeat_penalty, seed=seed,
                    max_new_tokens=max_tokens)


def _reader_kwargs(modality: str | None, values: dict, reader_options=()) -> dict:
    """Reader options for the chosen modality from the command's values of the modality specs'
    flags (popped from `values`) and --reader-option; a flag meant for another modality is refused."""
    from onellm.runtime.inputs import reader_options as _reader_options
    from onellm.runtime.modalities import all_modalities

    flags = [(flag.option, spec.name, flag.key, values.pop(flag.param, None))
             for spec in all_modalities().values() for flag in spec.flags]
    return _reader_options(modality, _parse_reader_options(reader_options), flags)


def _pipeline_inputs(sel) -> dict:
    """A selection as Pipeline keyword inputs."""
    if sel.modality is None:
        return {}
    out = {sel.modality: sel.source}
    if sel.image is not None:
        out["image"] = sel.image
    return out


def _bundle_path(bundle) -> Path:
    """--bundle, or the demo bundle in the cache (built on first use where torch is installed)."""
    if bundle:
        return Path(bundle)
    from onellm.export.bundle import ensure_demo_bundle
    from onellm.runtime.pipeline import default_bundle_dir

    progress = _Progress("demo bundle")
    if ensure_demo_bundle(default_bundle_dir(), progress=progress,
                          announce=lambda msg: click.secho(f"onellm: {msg}", err=True, fg="yellow")):
        progress.finish()
    return default_bundle_dir()


def _open_pipeline(bundle, device, precision, quant, threads, n_ctx=None, fit=None, kv_cache=None):
    """The pipeline of a command; `fit` (question, max new tokens, with an input): without
    `n_ctx`, size the context to that one question (`context_for_question`)."""
    from onellm.runtime.pipeline import Pipeline, context_for_question
    from onellm.runtime.registry import kv_cache_context

    path = _bundle_path(bundle)
    if n_ctx is None and fit is not None:
        question, max_new_tokens, with_input = fit
        n_ctx = context_for_question(path, question, max_new_tokens=max_new_tokens, with_input=with_input)
    pipe = Pipeline.load(path, device=device, precision=precision, quant=quant, threads=threads, n_ctx=n_ctx,
                         context=kv_cache_context(kv_cache) or None)
    _echo_random_notice(pipe.manifest)
    return pipe


def _split_inputs(kwargs: dict) -> dict:
    from onellm.runtime.modalities import all_modalities

    files = {name: kwargs.pop(name, None) for name in list(all_modalities())}
    return {name: _one_or_list(v) for name, v in files.items()}


def _one_or_list(value):
    """A repeatable file option (--imu): None, one path, or a list of paths."""
    if isinstance(value, tuple):
        return None if not value else value[0] if len(value) == 1 else list(value)
    return value


# Model text on a terminal: C0 controls other than newline and tab, DEL and C1 controls
# are shown as visible symbols (U+2400 control pictures, U+FFFD for C1), so a model's
# backspaces or escape sequences cannot move the cursor, recolour or retitle the terminal.
_TERMINAL_SAFE = {c: 0x2400 + c for c in range(32) if c not in (9, 10)}
_TERMINAL_SAFE[0x7F] = 0x2421
_TERMINAL_SAFE.update({c: 0xFFFD for c in range(0x80, 0xA0)})


def terminal_safe(text: str) -> str:
    """`text` with terminal control characters made visible (newline and tab kept)."""
    return text.translate(_TERMINAL_SAFE)


def _stdout_is_tty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # a closed or unusual stream
        return False


def _write_chunk(chunk: str, tty: bool) -> None:
    click.echo(terminal_safe(chunk) if tty else chunk, nl=False)
    sys.stdout.flush()


def _ctx_option(func, default_help="the model's context"):
    return click.option("--ctx", "ctx", type=int, default=None,
                        help=f"Context length in tokens (default: {default_help}).")(func)


def _kv_cache_option(func):
    return click.option("--kv-cache", "kv_cache", type=click.Choice(list(KV_CACHE_TYPES)), default=None,
                        help="KV cache element type (default: f16 for every GGUF but f32). "
                             + "; ".join(f"{k}: {v}" for k, v in KV_CACHE_TYPES.items()) + ".")(func)


def _ask_ctx_option(func):
    return _ctx_option(func, "the question, the input's rows and --max-tokens, rounded up to 256, at most "
                             "the model's context; the KV cache's memory grows with it")


@main.command("ask", cls=_RuntimeInputCommand)
@_runtime_options
@click.option("--embeddings", type=click.Path(),
              help="A block file from `onellm encode` (.npz, or .npy with its .json) instead of an input file.")
@click.option("--modality", default=None, help="Modality of a bare .npy --embeddings block (the file's own metadata otherwise).")
@_ask_ctx_option
@_kv_cache_option
@_sampling_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: answer, token ids, timings, input facts.")
@click.option("--logprobs", type=int, default=0, help="With --json: the top-K log-probabilities of each step.")
@click.argument("question", required=False)
@handle_errors
def ask_cmd(question, bundle, device, precision, quant, threads, reader_options, embeddings, modality, ctx, kv_cache,
            max_tokens, temperature, top_p, top_k, repeat_penalty, seed, greedy, as_json, logprobs, **kwargs) -> None:
    """Ask a question about one input and stream the answer.

    \b
    Examples:
      onellm ask --imu examples/imu/walk.csv "What is the person doing?"
      onellm ask --depth examples/depth/depth.png --image examples/image/photo.jpg "What is in the room?"
      onellm ask --bundle my-bundle --audio clip.wav --json "Describe the sound."
      cat walk.csv | onellm ask --imu - "What is the person doing?"
    Without a question the modality's evaluation prompt is used. Everything given is
    checked before the bundle loads.
    """
    import json as _json

    from onellm.runtime.embeddings import check_embeddings, load_embeddings
    from onellm.runtime.errors import InputError
    from onellm.runtime.inputs import select_checked
    from onellm.runtime.modalities import get_modality

    _check_ranges(threads=threads, ctx=ctx, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                  repeat_penalty=repeat_penalty, logprobs=logprobs)
    _check_question(question)
    files = _split_inputs(kwargs)
    sel = select_checked(files, embeddings=bool(embeddings))
    block = meta = None
    if embeddings:
        block, meta = load_embeddings(embeddings)
        if meta is None and not modality:
            raise InputError(embeddings, "--modality NAME naming what the block encodes (a bare .npy has no metadata)",
                             "no --modality")
        if modality:
            get_modality(modality)
    elif modality:
        raise InputError("--modality", "--embeddings FILE to go with it", "no --embeddings")
    chosen = sel.modality or modality or (meta or {}).get("modality")
    options = _reader_kwargs(sel.modality, kwargs, reader_options)
    if question is None:
        if chosen is None:
            raise InputError("QUESTION", "a question (or an input file, to use its caption prompt)", "neither")
        question = get_modality(chosen).caption_prompt
    sampling = _make_sampling(max_tokens, temperature, top_p, top_k, repeat_penalty, seed, greedy)
    # one question: without --ctx, a cache for it and its answer, not the model's whole context
    pipe = _open_pipeline(bundle, device, precision, quant, threads, n_ctx=ctx,
                          fit=(question, sampling.max_new_tokens, block is not None or sel.modality is not None),
                          kv_cache=kv_cache)
    with pipe:
        if block is not None:
            block, modality = check_embeddings(block, pipe.manifest, modality=modality, meta=meta, source=embeddings)
        stream = pipe.ask(question, stream=True, embeddings=block, modality=modality, options=options,
                          sampling=sampling, logprobs=logprobs if as_json else 0, **_pipeline_inputs(sel))
        tty = _stdout_is_tty()
        try:
            for chunk in stream:
                if not as_json:
                    _write_chunk(chunk, tty)
        except KeyboardInterrupt:
            pipe.cancel()
            stream.close()
            click.echo("", err=True)
            raise
        answer = stream.answer
        if as_json:
            out = answer.to_json(pipe.tokenizer)
            out["question"] = question
            out["bundle"] = str(pipe.bundle_dir)
            out["random_weights"] = pipe.random_weights
            out["encoder_precision"], out["decoder_quant"] = pipe.precision, pipe.quant
            out["context"] = {"n_ctx": pipe.n_ctx, "kv_type": pipe.kv_type}
            click.echo(_json.dumps(out, indent=2))
        else:
            click.echo("")


@main.command("encode", cls=_RuntimeInputCommand)
@_runtime_options
@click.option("--out", "out_path", required=True, type=click.Path(),
              help="Where to write the block: NAME.npz (block + metadata), or NAME.npy plus NAME.npy.json.")
@click.option("--force", is_flag=True, help="Overwrite an existing --out file.")
@handle_errors
def encode_cmd(bundle, device, precision, quant, threads, reader_options, out_path, force, **kwargs) -> None:
    """Encode one input into the float32 [32, n_embd] block that would be injected after BOS.

    The file records its modality and the model that made it; decode it elsewhere with
    `onellm ask --embeddings FILE "question"` (a mismatched bundle or modality is refused).
    """
    from onellm.runtime.embeddings import embeddings_meta, save_embeddings
    from onellm.runtime.errors import InputError
    from onellm.runtime.inputs import check_out_file, select_checked

    _check_ranges(threads=threads)
    files = _split_inputs(kwargs)
    sel = select_checked(files)
    if sel.modality is None:
        raise InputError("options", "one input file to encode (--imu, --image, ...)", "none")
    options = _reader_kwargs(sel.modality, kwargs, reader_options)
    target = check_out_file(out_path, force=force)
    pipe = _open_pipeline(bundle, device, precision, quant, threads)
    with pipe:
        block, meta = pipe.encode(sel.modality, sel.source, image=sel.image, options=options)
        written = save_embeddings(target, block, embeddings_meta(pipe.manifest, sel.modality, pipe.precision, meta))
    click.echo(f"wrote {' and '.join(str(p) for p in written)}: {sel.modality} block {list(block.shape)} float32")


@main.command("chat", cls=_RuntimeInputCommand)
@_runtime_options
@_ctx_option
@_kv_cache_option
@_sampling_options
@handle_errors
def chat_cmd(bundle, device, precision, quant, threads, reader_options, ctx, kv_cache, max_tokens, temperature, top_p,
             top_k, repeat_penalty, seed, greedy, **kwargs) -> None:
    """Talk about one input over several turns (Ctrl-C stops an answer, Ctrl-D quits).

    The input is encoded once; follow-up questions reuse the KV cache, so only the new
    turn is prefilled.
    """
    from onellm.runtime.inputs import select_checked

    _check_ranges(threads=threads, ctx=ctx, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                  repeat_penalty=repeat_penalty)
    files = _split_inputs(kwargs)
    sel = select_checked(files, stdin_ok=False)
    options = _reader_kwargs(sel.modality, kwargs, reader_options)
    sampling = _make_sampling(max_tokens, temperature, top_p, top_k, repeat_penalty, seed, greedy)
    pipe = _open_pipeline(bundle, device, precision, quant, threads, n_ctx=ctx, kv_cache=kv_cache)
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:  # pragma: no cover
        pass
    with pipe:
        chat = pipe.chat(options=options, **_pipeline_inputs(sel))
        chat.prepare()  # read and encode the input before the first prompt (its notices come first)
        click.echo("onellm chat: type a question; Ctrl-C stops an answer, Ctrl-D quits.", err=True)
        tty = _stdout_is_tty()
        while True:
            try:
                question = input("you> ")
            except EOFError:
                click.echo("", err=True)
                break
            except KeyboardInterrupt:
                click.echo("", err=True)
                continue
            if not question.strip():
                continue
            stream = chat.ask(question, stream=True, sampling=sampling)
            click.echo("onellm> ", nl=False)
            try:
                for chunk in stream:
                    _write_chunk(chunk, tty)
            except KeyboardInterrupt:
                stream.cancel()
                for _ in stream:  # let the turn finish cleanly (cancelled)
                    pass
                click.echo(" [stopped]", nl=False)
            except OneLLMError as exc:  # one failed turn (e.g. a question longer than the context) ends no chat
                click.echo("")
                click.secho(f"onellm: {exc}", err=True, fg="red")
                continue
            click.echo("")


# --------------------------------------------------------------------------- preview

_NOT_READER_OPTIONS = ("bundle", "device", "precision", "quant", "threads")


def _reader_options(func):
    """The reader options of `ask` that are not modality flags (--reader-option): fresh copies of
    the same click options, without its bundle and device ones, so the two commands cannot drift
    apart; the modality flags (--imu-rate, ...) come from the specs, as for `ask`."""
    probe = _runtime_options(lambda **kw: None)
    params = getattr(func, "__click_params__", [])
    params.extend(p for p in probe.__click_params__ if p.name not in _NOT_READER_OPTIONS)
    func.__click_params__ = params
    return func


class _PreviewCommand(_ModalityOptionsCommand):
    with_reader_flags = True
    insert_after = "out_path"


@main.command("preview", cls=_PreviewCommand)
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None,
              help="Where the PNG goes (default: preview-<modality>.png in the current directory).")
@_reader_options
@click.option("--force", is_flag=True, help="Overwrite an existing --out file.")
@click.option("--json", "as_json", is_flag=True, help="Print the input facts and tensor statistics as JSON.")
@handle_errors
def preview_cmd(out_path, force, as_json, **kwargs) -> None:
    """See what the model sees: print the input facts and draw the exact encoder input.

    \b
    Examples:
      onellm preview --imu examples/imu/walk.csv
      onellm preview --depth examples/depth/depth.png --image examples/image/photo.jpg --out depth.png
    The picture shows the tensor the encoder gets, after every reader step (window,
    resampling, crops, normalisation). Needs no bundle and no torch; drawing needs
    matplotlib: pip install 'onellm[preview]'.
    """
    import inspect
    import json as _json

    from onellm.runtime.errors import InputError
    from onellm.runtime.modalities import get_modality
    from onellm.runtime.pipeline import read_input
    from onellm.runtime.preview import input_summary, require_matplotlib, write_preview

    files = _split_inputs(kwargs)
    given = [n for n, f in files.items() if f]
    chosen = [n for n in given if n != "image"] or given
    if len(chosen) != 1:
        found = " and ".join(get_modality(n).cli_option for n in chosen) or "none"
        raise InputError("options", "exactly one input file to preview (e.g. --imu FILE)", found)
    name = chosen[0]
    spec = get_modality(name)
    options = _reader_kwargs(name, kwargs, kwargs.pop("reader_options", ()))
    target = Path(out_path or f"preview-{name}.png")
    if target.exists() and not force:
        raise InputError(target, "a new file for the picture (pass --force to overwrite)", "an existing file")
    require_matplotlib()
    image = files.get("image") if spec.requires_image else None
    try:
        inspect.signature(spec.preprocess).bind(files[name], **options, **({"image": image} if image else {}))
    except TypeError as exc:  # an option this reader does not take
        raise InputError("--reader-option", f"options the {name} reader takes", str(exc)) from None
    item = read_input(name, files[name], options, image=image)
    write_preview(item, target, force=force)
    summary = input_summary(item)
    if as_json:
        click.echo(_json.dumps({"modality": name, "input": item.meta, "tensor": summary, "picture": str(target)},
                               indent=2))
        return
    click.echo(f"{name} input facts:")
    for key, value in item.meta.items():
        click.echo(f"  {key:22s} {value if isinstance(value, str) else _json.dumps(value)}")
    click.echo(f"tensor: {summary['shape']} {summary['dtype']}, min {summary['min']:.4g}, max {summary['max']:.4g}, "
               f"mean {summary['mean']:.4g}, std {summary['std']:.4g}")
    click.echo(f"wrote {target}")


# --------------------------------------------------------------------------- serve


@main.command("serve")
@click.option("--bundle", type=click.Path(file_okay=False), default=None,
              help="Bundle directory (default: the demo bundle in the cache, built on first use).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", type=int, default=8000, show_default=True, help="TCP port.")
@click.option("--parallel", type=int, default=None, help="Requests served at once (default: sized to the machine, 2-8).")
@click.option("--ctx-per-request", type=int, default=None, help="KV positions per request (default: the model's context).")
@_kv_cache_option
@click.option("--api-key", default=None, help="Require 'Authorization: Bearer KEY' (also ONELLM_SERVE_API_KEY).")
@click.option("--media-dir", type=click.Path(file_okay=False, exists=True), default=None,
              help="Allow file:// image/video URLs under this directory (off by default).")
@click.option("--max-tokens", type=int, default=1024, show_default=True, help="Cap on a request's max_tokens.")
@click.option("--max-queue", type=int, default=64, show_default=True, help="Requests waiting before 429 replies.")
@click.option("--threads", type=int, default=None, help="CPU threads (default: physical cores).")
@click.option("--device", type=click.Choice(["auto", *EXECUTION_PROVIDERS]), default="cpu", show_default=True,
              help="Where the encoder runs (as for `onellm ask`; auto: TensorRT, else CUDA, else CPU).")
@click.option("--precision", type=click.Choice(list(ENCODER_PRECISIONS)), default=None,
              help="Encoder precision (default: the device's pick among the exported ones).")
@click.option("--quant", type=click.Choice(list(DECODER_QUANTS)), default=None,
              help="Which exported GGUF to run (default: the bundle's).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Encoder and decoder as Ray Serve deployments (pip install onellm[ray]): a new local Ray, or ADDRESS.")
@click.option("--encoder-replicas", type=int, default=1, show_default=True, help="With --ray: encoder replicas.")
@click.option("--decoder-replicas", type=int, default=1, show_default=True,
              help="With --ray: decoder replicas (each --parallel slots).")
@click.option("--encoder-cpus", type=float, default=1.0, show_default=True, help="With --ray: CPUs per encoder replica.")
@click.option("--decoder-cpus", type=float, default=1.0, show_default=True, help="With --ray: CPUs per decoder replica.")
@click.option("--decoder-gpus", type=float, default=0.0, show_default=True, help="With --ray: GPUs per decoder replica.")
@handle_errors
def serve_cmd(bundle, host, port, parallel, ctx_per_request, kv_cache, api_key, media_dir, max_tokens, max_queue,
              threads, device, precision, quant, ray_address, encoder_replicas, decoder_replicas, encoder_cpus,
              decoder_cpus, decoder_gpus) -> None:
    """Serve the bundle over an OpenAI-compatible HTTP API (POST /v1/chat/completions).

    Media go in as content parts (image_url, input_audio, input_video, file, input_imu, ...);
    see README.md. Several requests are answered at once from one loaded model.
    """
    from onellm.runtime.bundle import load_manifest
    from onellm.runtime.engine import Engine, Limits
    from onellm.runtime.registry import kv_cache_context
    from onellm.runtime.server import RANDOM_NOTICE, run_server

    path = _bundle_path(bundle)
    limits = Limits(max_tokens=max_tokens, max_queue=max_queue)
    if ray_address and kv_cache:
        raise click.UsageError("--kv-cache is not passed to Ray deployments; leave it out with --ray")
    if ray_address:
        from onellm.runtime import ray_serve

        plan = ray_serve.ServePlan(encoder_replicas=encoder_replicas, decoder_replicas=decoder_replicas,
                                   slots=parallel or 2, encoder_cpus=encoder_cpus, decoder_cpus=decoder_cpus,
                                   decoder_gpus=decoder_gpus, threads=threads)
        engine = ray_serve.deploy(path, address=None if ray_address == "local" else ray_address, plan=plan,
                                  limits=limits)
    else:
        engine = Engine.load(path, parallel=parallel, n_ctx_slot=ctx_per_request, threads=threads, limits=limits,
                             device=device, precision=precision, quant=quant,
                             context=kv_cache_context(kv_cache) or None)
    model_id = load_manifest(path, verify=False).dir.name
    url = f"http://{host}:{port}"
    click.echo(f"onellm serve: {model_id} ({', '.join(engine.modalities)}), {engine.parallel} requests at once, "
               f"{engine.n_ctx_slot} positions each, on {url}/v1")
    if engine.random_weights:
        click.secho(f"onellm serve: note: {RANDOM_NOTICE}", fg="yellow")
    auth = f' -H "Authorization: Bearer {api_key}"' if api_key else ""
    click.echo(f"try:  curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} "
               f"-d '{{\"model\": \"{model_id}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'")
    try:
        run_server(engine, host=host, port=port, model_id=model_id, api_key=api_key, media_dir=media_dir)
    finally:
        engine.close()


# --------------------------------------------------------------------------- batch


@main.command("batch")
@click.argument("jobs_file", required=False, type=click.Path(dir_okay=False))
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="Results JSONL: appended to, never overwritten; ids already in it are skipped.")
@click.option("--inputs", "inputs_dir", type=click.Path(file_okay=False), default=None,
              help="Instead of JOBS_FILE: every file of --modality's types in this folder (id = relative path).")
@click.option("--question", default=None, help="With --inputs: the question asked about every file.")
@click.option("--modality", default=None, help="With --inputs: which modality the files are.")
@click.option("--bundle", type=click.Path(file_okay=False), default=None,
              help="Bundle directory (default: the demo bundle in the cache, built on first use).")
@click.option("--device", type=click.Choice(["auto", *EXECUTION_PROVIDERS]), default="auto", show_default=True,
              help="Where the encoder runs (as for `onellm ask`).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default=None, help="Encoder precision.")
@click.option("--quant", default=None, help="Which exported GGUF to run (default: the bundle's).")
@click.option("--threads", type=int, default=None, help="CPU threads (default: physical cores).")
@click.option("--reader-option", "reader_options", multiple=True, metavar="KEY=VALUE",
              help="Reader option for every job (a job's own \"options\" win; repeatable).")
@_sampling_options
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Run the jobs as a Ray Data pipeline (pip install onellm[ray]): a new local Ray, or ADDRESS.")
@click.option("--parallel", type=int, default=2, show_default=True,
              help="Decode slots: jobs decoded at once in one batch (the next ones are read and encoded meanwhile).")
@click.option("--ray-actors", type=int, default=2, show_default=True,
              help="With --ray: decoder actors (each an engine with --parallel slots).")
@click.option("--ray-encoders", type=int, default=1, show_default=True,
              help="With --ray: encoder actors (CPU: reader + encoder sessions).")
@_kv_cache_option
@click.option("--json", "as_json", is_flag=True, help="Print a final JSON summary {done, failed, skipped, seconds, jobs_per_s}.")
@handle_errors
def batch_cmd(jobs_file, out_path, inputs_dir, question, modality, bundle, device, precision, quant, threads,
              reader_options, max_tokens, temperature, top_p, top_k, repeat_penalty, seed, greedy, ray_address,
              parallel, ray_actors, ray_encoders, kv_cache, as_json) -> None:
    """Answer many jobs into a resumable JSONL results file.

    \b
    Each line of JOBS_FILE is a JSON object, e.g.
      {"id": "w1", "imu": "walk.csv", "question": "What is the person doing?",
       "options": {"start": 1.0}, "sampling": {"temperature": 0, "max_tokens": 32, "seed": 1}}
    ("questions": [...] asks several in one chat). Relative paths are relative to JOBS_FILE.
    \b
    Examples:
      onellm batch jobs.jsonl --out results.jsonl
      onellm batch --inputs clips/ --modality imu --question "What is the person doing?" --out r.jsonl
    A rerun skips the ids already in --out; a bad input becomes {"id", "error"} and the run goes on.
    """
    import json as _json

    from onellm.runtime.batch import ResultsFile, jobs_from_dir, read_jobs, run_batch
    from onellm.runtime.errors import InputError

    defaults = _parse_reader_options(reader_options)
    if inputs_dir is not None:
        if jobs_file is not None:
            raise InputError("--inputs", "either JOBS_FILE or --inputs DIR", "both")
        if not modality:
            raise InputError("--inputs", "--modality NAME saying which files to take", "no --modality")
        jobs = jobs_from_dir(inputs_dir, modality, question or "", defaults)
    else:
        if jobs_file is None:
            raise InputError("batch", "a JOBS_FILE (or --inputs DIR --modality M --question Q)", "neither")
        jobs = read_jobs(jobs_file)
        if defaults:
            import dataclasses

            jobs = [dataclasses.replace(j, options={**defaults, **j.options}) for j in jobs]
    if ray_address and kv_cache:
        raise click.UsageError("--kv-cache is not passed to Ray actors; leave it out with --ray")
    sampling = _make_sampling(max_tokens, temperature, top_p, top_k, repeat_penalty, seed, greedy)
    tty = sys.stderr.isatty()

    def show(p) -> None:
        if tty:
            eta = "?" if p.eta_s is None else f"{int(p.eta_s // 60)}:{int(p.eta_s % 60):02d}"
            click.echo(f"\rbatch: {p.finished}/{p.total} ({p.failed} failed) {p.jobs_per_s:.2f} jobs/s ETA {eta}  ",
                       err=True, nl=False)

    with ResultsFile(out_path) as results:
        pending = sum(1 for j in jobs if j.id not in results.done)
        if pending and ray_address:
            from onellm.runtime.pipeline import default_bundle_dir
            from onellm.runtime.ray_batch import RayPlan, run_batch_ray

            plan = RayPlan(encoders=ray_encoders, decoders=ray_actors, slots=parallel)
            state = run_batch_ray(jobs, results, bundle=bundle or default_bundle_dir(),
                                  address=None if ray_address == "local" else ray_address, plan=plan,
                                  sampling=sampling, device="cpu" if device == "auto" else device, threads=threads,
                                  progress=show)
        elif pending:
            from onellm.runtime.engine import Engine

            from onellm.runtime.registry import kv_cache_context

            with Engine.load(_bundle_path(bundle), parallel=parallel, device=device, precision=precision, quant=quant,
                             threads=threads, context=kv_cache_context(kv_cache) or None) as engine:
                _echo_random_notice(engine.manifest)
                state = run_batch(engine, jobs, results, sampling=sampling, progress=show)
        else:
            from onellm.runtime.batch import Progress

            state = Progress(total=0, skipped=len(jobs))
    if tty:
        click.echo("", err=True)
    summary = state.summary()
    if as_json:
        click.echo(_json.dumps(summary))
    else:
        click.echo(f"batch: {summary['done']} done, {summary['failed']} failed, {summary['skipped']} skipped "
                   f"in {summary['seconds']:.1f} s ({summary['jobs_per_s']:.2f} jobs/s) -> {out_path}", err=True)


# --------------------------------------------------------------------------- bench


@main.command("bench")
@click.option("--preset", default="tiny", show_default=True,
              help="tiny (seconds, CI), bench (release encoder + ~1B decoder) or 7b (needs --checkpoint).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Model config JSON instead of --preset.")
@click.option("--modalities", default=None, help="Comma list (default image,imu).")
@click.option("--encoder-precisions", default=None,
              help="Comma list of fp32,int8,ov-int8,fp16 (default fp32,int8; +fp16 on a GPU; ov-int8 needs the "
                   "openvino extra).")
@click.option("--decoder-quants", default=None,
              help=f"Comma list of {','.join(DECODER_QUANTS)} (default f16,q8_0,q4_k_m; 7b: q8_0,q4_k_m,q4_0).")
@click.option("--repeats", type=int, default=None, help="Timed runs per measurement (preset default).")
@click.option("--warmup", type=int, default=None, help="Untimed runs before them (preset default).")
@click.option("--new-tokens", type=int, default=None, help="Greedy tokens per decode measurement.")
@click.option("--out", "out_dir", type=click.Path(), default="bench-out", show_default=True,
              help="Where bench.json, bench.md and bench.png go.")
@click.option("--bundle", type=click.Path(file_okay=False), default=None,
              help="Reuse this exported bundle (must match the config) instead of the cached one.")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
              help="A real checkpoint (default: a seeded random one, synthesised once and cached).")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(dir_okay=False), default=None,
              help="The checkpoint's tokenizer.model.")
@click.option("--work-dir", type=click.Path(file_okay=False), default=None,
              help="Cache of the synthesised checkpoint and bundle (default $ONELLM_CACHE_DIR/bench/<preset>-<hash>).")
@click.option("--no-torch", is_flag=True, help="Skip the PyTorch reference rows.")
@click.option("--no-baselines", is_flag=True, help="Skip llama-cpp-python / plain onnxruntime overhead rows.")
@click.option("--no-footprint", is_flag=True, help="Skip the fresh-process load time / peak RSS probes.")
@click.option("--synthesize", is_flag=True, help="Allow a random 7B checkpoint for --preset 7b (~15 GB fp16 on disk, written streamed).")
@click.option("--threads", type=int, default=None, help="CPU threads for every backend (default: physical cores).")
@click.option("--device", type=click.Choice(["auto", *EXECUTION_PROVIDERS]), default="auto", show_default=True,
              help="Also run GPU encoder rows when onnxruntime has CUDA (auto).")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON result instead of the Markdown table.")
@handle_errors
def bench_cmd(preset, config_path, modalities, encoder_precisions, decoder_quants, repeats, warmup, new_tokens,
              out_dir, bundle, checkpoint, tokenizer_path, work_dir, no_torch, no_baselines, no_footprint,
              synthesize, threads, device, as_json) -> None:
    """Measure the whole chain stage by stage: runtime vs the torch reference vs the machine's ceilings.

    Writes bench.json (schema onellm-bench v1), bench.md and bench.png into --out. The
    checkpoint (random unless --checkpoint) and the exported bundle are cached under
    --work-dir, so a rerun does not export again.
    """
    from onellm.runtime.inputs import check_out_dir

    _check_ranges(threads=threads)
    if not (bundle and no_torch):  # the reference rows and the export of a bundle need torch
        _require_extra("bench")
    check_out_dir(out_dir)
    from onellm.benchmarks.bench import BenchOptions, run_bench
    from onellm.benchmarks.report import write_reports

    opts = BenchOptions(
        preset=None if config_path else preset, config_path=config_path,
        modalities=modalities.split(",") if modalities else None,
        encoder_precisions=encoder_precisions, decoder_quants=decoder_quants, repeats=repeats, warmup=warmup,
        new_tokens=new_tokens, bundle=bundle, checkpoint=checkpoint, tokenizer=tokenizer_path, work_dir=work_dir,
        torch_reference=not no_torch, synthesize=synthesize, threads=threads, footprint=not no_footprint,
        plain_baselines=not no_baselines, device=device,
    )
    result = run_bench(opts, progress=lambda msg: click.echo(f"bench: {msg}", err=True))
    try:
        paths = write_reports(result, out_dir)
    except OSError as exc:
        from onellm.runtime.errors import os_error

        raise os_error(exc, doing="write the bench reports") from None
    if as_json:
        click.echo(paths["json"].read_text(), nl=False)
    else:
        click.echo(paths["md"].read_text())
    click.echo(f"bench: wrote {', '.join(str(p) for p in paths.values() if p)}", err=True)


if __name__ == "__main__":  # pragma: no cover
    main()
