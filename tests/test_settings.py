"""The one settings model (pipeline.settings.EncodeSettings): the library, the CLI and job
specs share its defaults; a new field reaches the CLI, the codec and the fingerprint by
itself; the command modules register themselves and keep to each other's public names."""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from codec.inference import InferenceConfig
from jobs.cli import COMMANDS, build_parser, main
from jobs.options import add_settings_options, settings_from_args
from jobs.spec import SpecError, parse_spec
from pipeline.settings import EncodeSettings, option
from tests.conftest import smooth_image

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = "[job]\ninput = 'a'\noutput = 'b'\n"


def test_library_cli_and_spec_defaults_are_one():
    """`Codec.encode()` with no config (InferenceConfig()), `sgarc encode` with no flags and
    a spec with no [encode] table all encode the same way: the product's defaults."""
    cli = settings_from_args(build_parser().parse_args(["encode", "in.png", "out.sga"]))
    spec = parse_spec(MINIMAL).to_settings()
    assert cli == spec == EncodeSettings()
    assert EncodeSettings().inference() == InferenceConfig()
    library = InferenceConfig()
    assert (library.iterations, library.schedule, library.learning_rate) == (1000, "scaled",
                                                                             1e-2)
    assert parse_spec(MINIMAL).refine.iterations == library.iterations


def png(path: Path, size: int = 16) -> Path:
    Image.fromarray(smooth_image(size, size)).save(path)
    return path


class WithTau0(EncodeSettings):
    """What adding an encode option looks like: one field and its description."""

    tau0: float = option(0.5, "SGA's initial temperature", gt=0)


def test_one_new_field_reaches_the_cli_the_codec_and_the_fingerprint():
    import argparse

    parser = argparse.ArgumentParser()
    add_settings_options(parser, WithTau0)
    assert "SGA's initial temperature (default: 0.5)" in parser.format_help()
    args = parser.parse_args(["--tau0", "0.25", "-n", "7"])
    settings = settings_from_args(args, WithTau0)
    assert (settings.tau0, settings.iterations) == (0.25, 7)
    assert settings.inference().tau0 == 0.25  # the codec's own field of that name
    # at its default the option is not in the fingerprint: archives keep their work
    assert WithTau0().fingerprint() == EncodeSettings().fingerprint() == "30a21418d7698bfd"
    assert WithTau0(tau0=0.25).fingerprint() != WithTau0().fingerprint()
    assert WithTau0(tau0=0.25).resolved()["tau0"] == 0.25
    with pytest.raises(Exception, match="--tau0: must be > 0, got -1"):
        settings_from_args(parser.parse_args(["--tau0", "-1"]), WithTau0)


def test_every_field_is_a_flag_and_a_spec_key():
    help_text = build_parser()._subparsers._group_actions[0].choices["encode"].format_help()
    for name, info in EncodeSettings.model_fields.items():
        assert "--" + name.replace("_", "-") in help_text, name
        table = info.json_schema_extra["group"]
        with pytest.raises(SpecError) as caught:  # a wrong type names the table and key
            parse_spec(MINIMAL + f"[{table}]\n{name} = {{}}\n", source="s.toml")
        assert str(caught.value).startswith(f"s.toml: [{table}] {name}: "), name


@pytest.mark.parametrize("flags, needle", [
    (["--iterations", "-5"], "--iterations: must be >= 0, got -5"),
    (["--target-psnr", "0"], "--target-psnr: must be > 0, got 0"),
    (["--quality", "3", "--model", "msh-vr"], "give quality or model, not both"),
    (["--max-pixels", "0"], "--max-pixels: must be >= 1, got 0"),
])
def test_cli_out_of_range_is_one_line_and_exit_2(tmp_path, capsys, flags, needle):
    photo, out = png(tmp_path / "x.png"), tmp_path / "x.sga"
    assert main(["encode", str(photo), str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err == f"sgarc encode: error: {needle}\n", err
    assert not out.exists()
    assert main(["run", str(tmp_path), str(tmp_path / "archive"), *flags]) == 2
    assert capsys.readouterr().err == f"sgarc run: error: {needle}\n"


@pytest.mark.parametrize("body, message", [
    ("[encode]\niterations = -5\n", "s.toml: [encode] iterations: must be >= 0, got -5"),
    ("[encode]\nlr = true\n", "s.toml: [encode] lr: expected a number, got boolean true"),
    ("[encode]\nschedule = 'linear'\n", "s.toml: [encode] schedule: 'linear' is not one of "
                                         "paper, scaled"),
    ("[encode]\nmin_psnr = 30\n", "s.toml: [encode] min_psnr belongs in [policy]"),
    ("[encode]\ntarget_psnr = 30.0\ntarget_bpp = 1.0\n",
     "s.toml: [encode] give target_psnr or target_bpp, not both"),
    ("[refine]\niterations = 0\n", "s.toml: [refine] iterations: must be >= 1, got 0"),
])
def test_spec_out_of_range_is_one_line_naming_the_key(body, message):
    with pytest.raises(SpecError) as caught:
        parse_spec(MINIMAL + body, source="s.toml")
    assert str(caught.value) == message


def test_spec_errors_exit_2_through_the_cli(tmp_path, capsys):
    spec = tmp_path / "job.toml"
    spec.write_text(textwrap.dedent(MINIMAL + "[encode]\niterations = -5\n"))
    assert main(["submit", str(spec)]) == 2
    assert capsys.readouterr().err == (f"sgarc submit: error: {spec}: [encode] iterations: "
                                       "must be >= 0, got -5\n")


def test_command_modules_register_themselves_and_import_no_private_names():
    """One way to add a command: a module with register(subparsers) named in COMMANDS; no
    command module reaches into another's underscore names."""
    commands = build_parser()._subparsers._group_actions[0].choices
    for name in ("encode", "run", "refine", "decode", "info", "models", "train", "eval",
                 "submit", "jobs", "schedule", "scheduler", "metrics", "report", "serve",
                 "demo"):
        assert name in commands, name
    for module in COMMANDS:
        path = ROOT / (module.replace(".", "/") + ".py")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jobs."):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{module} imports {private} from {node.module}"
