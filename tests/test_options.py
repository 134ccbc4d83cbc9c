"""--storage-options (jobs/options.py): JSON, @file, and ${ENV} references kept off `ps`."""

from __future__ import annotations

import argparse
import json

import pytest

from codec.errors import SgarcError
from jobs import serve
from jobs.metrics import MetricsError
from jobs.metrics import parse_storage_options as metrics_options
from jobs.options import parse_storage_options
from jobs.spec import SpecError, parse_spec

ENV = {"S3_KEY": "AKIA-EXAMPLE", "S3_SECRET": "s3cr3t-value", "HOST": "minio"}


def test_plain_json_and_absent() -> None:
    assert parse_storage_options(None) is None and parse_storage_options("") is None
    assert parse_storage_options('{"anon": true}', environ={}) == {"anon": True}


def test_env_references_are_expanded_at_any_depth() -> None:
    text = json.dumps({"key": "${S3_KEY}", "secret": "${S3_SECRET}", "anon": False,
                       "client_kwargs": {"endpoint_url": "http://${HOST}:9000"},
                       "headers": ["Bearer ${S3_SECRET}"]})
    assert parse_storage_options(text, environ=ENV) == {
        "key": "AKIA-EXAMPLE", "secret": "s3cr3t-value", "anon": False,
        "client_kwargs": {"endpoint_url": "http://minio:9000"},
        "headers": ["Bearer s3cr3t-value"]}


def test_unset_variable_is_an_error_naming_it_and_no_value() -> None:
    text = '{"key": "${S3_KEY}", "client_kwargs": {"aws_secret": "${MISSING_SECRET}"}}'
    with pytest.raises(SgarcError) as caught:
        parse_storage_options(text, environ=ENV)
    message = str(caught.value)
    assert "MISSING_SECRET" in message and "client_kwargs.aws_secret" in message
    assert "not set" in message and "AKIA-EXAMPLE" not in message
    with pytest.raises(SgarcError, match="not an environment variable name"):
        parse_storage_options('{"key": "${not a name}"}', environ=ENV)


def test_at_file_reads_the_json_from_a_file(tmp_path) -> None:
    path = tmp_path / "s3.json"
    path.write_text('{"key": "${S3_KEY}", "secret": "literal-in-file"}')
    assert parse_storage_options(f"@{path}", environ=ENV) == {
        "key": "AKIA-EXAMPLE", "secret": "literal-in-file"}
    with pytest.raises(SgarcError, match="cannot read the file"):
        parse_storage_options(f"@{tmp_path / 'missing.json'}", environ=ENV)
    path.write_text('{"secret": "literal-in-file",}')
    with pytest.raises(SgarcError, match="is not valid JSON") as caught:
        parse_storage_options(f"@{path}", environ=ENV)
    assert "literal-in-file" not in str(caught.value)  # the file's text is never quoted
    path.write_text("[1, 2]")
    with pytest.raises(SgarcError, match="must be a JSON object"):
        parse_storage_options(f"@{path}", environ=ENV)


def test_commands_share_the_parser(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("SGARC_TEST_UNSET", raising=False)
    with pytest.raises(MetricsError, match="SGARC_TEST_UNSET"):
        metrics_options('{"key": "${SGARC_TEST_UNSET}"}')
    monkeypatch.setenv("SGARC_TEST_KEY", "from-env")
    assert metrics_options('{"key": "${SGARC_TEST_KEY}"}') == {"key": "from-env"}
    parser = argparse.ArgumentParser()
    serve._add_arguments(parser)
    args = parser.parse_args(["--archive", str(tmp_path), "--storage-options",
                              '{"key": "${SGARC_TEST_UNSET}"}'])
    with pytest.raises(SgarcError, match="SGARC_TEST_UNSET"):
        serve.cmd_serve(args)
    assert "@FILE" in parser.format_help() and "${NAME}" in parser.format_help()


def test_job_specs_expand_with_the_same_function() -> None:
    spec = parse_spec('[job]\ninput = "s3://a/in"\noutput = "s3://a/out"\n'
                      '[storage]\noptions = {key = "${S3_KEY}", secret = "${NOPE}"}\n',
                      source="job.toml")
    with pytest.raises(SpecError, match=r"job.toml: \[storage\] options.secret refers to "
                                        r"\$\{NOPE\}, which is not set"):
        spec.storage_options(ENV)
    assert spec.storage_options({**ENV, "NOPE": "x"}) == {"key": "AKIA-EXAMPLE", "secret": "x"}
