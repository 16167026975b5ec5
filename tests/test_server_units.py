"""Server pieces without a model: request validation, ``headwise serve`` arguments (the text hold-back is the
engine's: tests/test_sequence.py)."""

from __future__ import annotations

import pytest

pytest.importorskip("pydantic", reason="the server's request models need pydantic (the `server` extra)")

from headwise.server.protocol import APIError, parse_request


def test_completion_defaults_follow_openai():
    p = parse_request({"model": "m", "prompt": "hi"}, chat=False, default_max_tokens=16)
    assert p.params.max_new_tokens == 16 and p.params.temperature == 1.0 and p.params.top_p == 1.0
    assert not p.stream and p.prompt == "hi"


def test_token_id_prompt_and_single_item_batch_are_accepted():
    assert parse_request({"model": "m", "prompt": [1, 2, 3]}, False, 16).prompt_ids == [1, 2, 3]
    assert parse_request({"model": "m", "prompt": ["hi"]}, False, 16).prompt == "hi"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m", "prompt": "hi", "max_tokens": True}, "max_tokens"),
        ({"model": "m", "prompt": "hi", "seed": 1.5}, "seed"),
        ({"model": "m", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": "m", "prompt": "hi", "stop": 3}, "stop"),
        ({"model": "m", "prompt": ["a", "b"]}, "prompt"),
        ({"model": "m", "prompt": ""}, "prompt"),
        ({"model": "m", "prompt": "hi", "temperature": 2.5}, "temperature"),
        ({"model": "m", "prompt": "hi", "echo": True}, "echo"),
        ({"model": 7, "prompt": "hi"}, "model"),
    ],
)
def test_invalid_fields_are_named_in_the_error(body, param):
    with pytest.raises(APIError) as info:
        parse_request(body, chat=False, default_max_tokens=16)
    assert info.value.status == 400 and info.value.param == param


def test_chat_content_parts_are_joined_and_developer_is_system():
    p = parse_request({"model": "m", "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]},
        chat=True, default_max_tokens=None)
    assert p.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [("--max-batch", "0", "--max-batch"), ("--port", "70000", "--port"), ("--kv-budget-gb", "-1", "--kv-budget-gb"),
     ("--max-queue", "-1", "--max-queue"), ("--kv-memory", "lots", "--kv-memory"), ("--kv-memory", "150%", "90%"),
     ("--multi-step", "0", "--multi-step")],
)
def test_serve_rejects_bad_options_in_one_line(flag, value, message, capsys):
    from headwise.cli import main

    assert main(["serve", "smollm2-135m", flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("headwise: error:") and message in err and "\n" not in err


def test_serve_takes_a_page_pool_or_a_byte_budget_not_both(capsys):
    from headwise.cli import main

    assert main(["serve", "smollm2-135m", "--kv-memory", "2", "--kv-budget-gb", "2"]) == 2
    assert "not both" in capsys.readouterr().err


def test_serve_with_kv_memory_runs_the_engine_over_a_pool_of_that_size(smollm2, monkeypatch):
    import argparse

    from headwise.server import cli

    monkeypatch.setattr(cli, "load_from_args", lambda args: smollm2)
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    compiled = []  # the shared fixture's model is not compiled for real: other tests run it
    monkeypatch.setattr("headwise.fusion.compile_layers", lambda model: compiled.append(model) or ["model.layers.0.mlp"])
    _, scheduler = cli.build(parser.parse_args(["serve", "smollm2-135m", "--kv-memory", "0.5", "--multi-step", "4",
                                                "--compile-layers"]))
    assert scheduler.engine.multi_step == 4
    assert compiled == [smollm2.model] and scheduler.engine.compiled == ["model.layers.0.mlp"]
    pool = scheduler.engine.pool
    assert pool is not None and pool.num_pages == int(0.5e9) // pool.page_bytes
    assert scheduler.kv_budget == pool.num_pages * pool.page_bytes


@pytest.mark.parametrize(
    ("loc", "param"),
    [(("body", "messages", 0, "role"), "messages[0].role"), (("body", "prompt", "list[int]", 3), "prompt"),
     (("body", "temperature"), "temperature"), (("body",), None)],
)
def test_error_param_is_the_field_path_without_union_member_tags(loc, param):
    from headwise.server.protocol import _param

    assert _param(loc) == param


def _scope(path: str = "/v1/completions", method: str = "POST") -> dict:
    return {"type": "http", "path": path, "method": method, "scheme": "http"}


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"host": "127.0.0.1:8000"}, None),
        ({"host": "[::1]:8000"}, None),
        ({"host": "LOCALHOST"}, None),
        ({"host": "evil.example:8000"}, 400),
        ({"host": "127.0.0.1.evil.example"}, 400),
        ({"host": "127.0.0.1:8000", "origin": "http://evil.example"}, 403),
        ({"host": "127.0.0.1:8000", "origin": "null"}, 403),
        ({"host": "127.0.0.1:8000", "origin": "http://127.0.0.1:8000"}, None),
        ({"host": "127.0.0.1:8000", "origin": "http://ok.example"}, None),
    ],
)
def test_guard_checks_host_then_origin(headers, status):
    from headwise.server.app import Guard, ServerConfig

    guard = Guard(None, ServerConfig(allowed_origins=("http://ok.example",)), metrics_sink=lambda s: None)
    refusal = guard.refusal(_scope(), headers)
    assert (refusal.status if refusal else None) == status


def test_guard_wants_the_api_key_on_v1_only():
    from headwise.server.app import Guard, ServerConfig

    guard = Guard(None, ServerConfig(api_key="k", allowed_hosts=None), metrics_sink=lambda s: None)
    assert guard.refusal(_scope(), {}).status == 401
    assert guard.refusal(_scope(), {"authorization": "Bearer k"}) is None
    assert guard.refusal(_scope(), {"authorization": "bearer k"}) is None
    assert guard.refusal(_scope("/health", "GET"), {}) is None
    assert guard.refusal(_scope("/v1/completions", "OPTIONS"), {}) is None  # CORS preflights carry no key


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--max-body-mb", "0"], "--max-body-mb"), (["--request-timeout", "nan"], "--request-timeout"),
     (["--shutdown-grace", "-1"], "--shutdown-grace"), (["--api-key", " "], "--api-key")],
)
def test_serve_rejects_bad_limits_in_one_line(flags, message, capsys):
    from headwise.cli import main

    assert main(["serve", "smollm2-135m", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("headwise: error:") and message in err and "\n" not in err
