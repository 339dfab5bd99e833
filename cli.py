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


if __name__ == "__main__":  # pragma: no cover
    main()
