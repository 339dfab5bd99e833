"""The `onellm` command line (installed as `onellm.cli`).

This is the one place that turns an `OneLLMError` into a one-line message and an exit
code. Heavy imports (torch, onnxruntime, llama.cpp) happen inside the commands, so
`onellm --help` is instant and works without the export extra.
"""

from __future__ import annotations

import functools
import logging
import sys

import click

from onellm.runtime import __version__
from onellm.runtime.errors import OneLLMError


def handle_errors(func):
    """Run a command body, printing `OneLLMError`s as one line with their exit code."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except OneLLMError as exc:
            click.echo(f"onellm: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("onellm: interrupted", err=True)
            sys.exit(130)

    return wrapper


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
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


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
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
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

    from onellm.ref.config import resolve_config
    from onellm.ref.model import count_parameters
    from onellm.ref.testing import save_random_checkpoint, train_tiny_tokenizer
    from onellm.runtime.errors import ConfigError, InputError

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


class _ModalityOptionsCommand(click.Command):
    """A command that gets one file option per registered modality (--image, --imu, ...).

    The options are added when the command is first parsed or shown, so importing the
    CLI does not import the modality readers.
    """

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        if not getattr(self, "_modality_options_added", False):
            from onellm.runtime.modalities import all_modalities

            self._modality_options_added = True
            extra = [
                click.Option([spec.cli_option, spec.name], type=click.Path(dir_okay=False), default=None,
                             help=f"{spec.description} [{' '.join(spec.file_types)}]")
                for spec in all_modalities().values()
            ]
            at = next(i for i, p in enumerate(self.params) if p.name == "clip_checkpoint") + 1
            self.params[at:at] = extra  # after the checkpoint options
        return super().get_params(ctx)


def _parse_reader_options(items: tuple[str, ...]) -> dict:
    """KEY=VALUE strings -> keyword arguments (numbers become float, true/false bool)."""
    from onellm.runtime.errors import InputError

    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise InputError("--reader-option", "KEY=VALUE", repr(item))
        if value.lower() in ("true", "false"):
            out[key] = value.lower() == "true"
        else:
            try:
                out[key] = float(value)
            except ValueError:
                out[key] = value
    return out


def _read_modality_input(files: dict[str, str | None], input_npy: str | None, modality: str | None,
                         options: dict | None = None):
    """(modality name, preprocessed array) from the modality options, or None for text only."""
    from onellm.runtime.errors import InputError
    from onellm.runtime.modalities import all_modalities, get_modality

    specs = all_modalities()
    given = {name: path for name, path in files.items() if path}
    if input_npy:
        if not modality:
            raise InputError("--input-npy", "--modality NAME saying which modality the array is", "no --modality")
        if given:
            raise InputError("--input-npy", "no modality file options alongside it", " ".join(
                specs[n].cli_option for n in given))
        import numpy as np

        spec = get_modality(modality)
        try:
            array = np.load(input_npy, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputError(input_npy, "a .npy array", f"an unreadable file ({str(exc).splitlines()[0][:120]})") from None
        if tuple(array.shape) not in (spec.input_shape, (1, *spec.input_shape)):
            raise InputError(input_npy, f"a preprocessed {spec.name} array of shape {list(spec.input_shape)}",
                             f"shape {list(array.shape)}")
        return spec.name, array.astype(spec.input_dtype, copy=False)
    if modality:
        raise InputError("--modality", "--input-npy FILE to go with it", "no --input-npy")
    photo = given.get("image")
    paired = [n for n in given if specs[n].requires_image]
    others = [n for n in given if n != "image"]
    if len(others) > 1:
        raise InputError("options", "one modality input per question",
                         " and ".join(specs[n].cli_option for n in others))
    if not given:
        return None
    name = others[0] if others else "image"
    spec = specs[name]
    if spec.requires_image and not photo:
        raise InputError(spec.cli_option, f"its RGB photo too (--image) for {name}", "no --image")
    options = dict(options or {})
    if paired:
        options["image"] = photo
    import inspect

    try:
        inspect.signature(spec.preprocess).bind(given[name], **options)
    except TypeError as exc:  # an option this reader does not take
        raise InputError("--reader-option", f"options the {name} reader takes", str(exc)) from None
    try:
        result = spec.preprocess(given[name], **options)
    except NotImplementedError:
        raise InputError(given[name], f"a file the {name} reader can read",
                         f"no {name} reader yet; pass a preprocessed array with --input-npy FILE --modality {name}") from None
    return name, result.array


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

    from onellm.ref.checkpoint import load_model
    from onellm.ref.config import resolve_config
    from onellm.ref.generate import generate
    from onellm.runtime.errors import InputError
    from onellm.runtime.modalities import get_modality
    from onellm.runtime.tokenizer import Tokenizer

    cfg = resolve_config(preset, config_path)
    tokenizer = Tokenizer(tokenizer_path)
    if tokenizer.vocab_size != cfg.decoder.vocab_size:
        raise InputError(tokenizer_path, f"a tokenizer of {cfg.decoder.vocab_size} pieces (config {cfg.name!r})",
                         f"{tokenizer.vocab_size} pieces")
    t0 = time.perf_counter()
    inputs = _read_modality_input(modality_files, input_npy, modality, _parse_reader_options(reader_options))
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


if __name__ == "__main__":  # pragma: no cover
    main()
