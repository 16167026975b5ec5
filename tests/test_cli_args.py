"""One set of model-loading arguments for every command, one dtype default."""

from __future__ import annotations

import argparse

import pytest
import torch

from headwise.cli import build_parser
from headwise.models import default_dtype

MODEL_COMMANDS = [["info"], ["generate"], ["plan", "dense", "-o", "p.json"], ["profile", "--budget", "0.25", "-o", "p.json"],
                  ["eval"], ["serve"]]


def _subparser(parser: argparse.ArgumentParser, words: list[str]) -> argparse.ArgumentParser:
    for word in words:
        if word.startswith("-"):
            break
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[word]
    return parser


@pytest.mark.parametrize("command", MODEL_COMMANDS, ids=lambda c: c[0])
def test_every_model_command_shares_the_model_arguments(command):
    parser = build_parser()
    args = parser.parse_args([*command, "smollm2-135m", "--device", "cpu", "--dtype", "bfloat16"])
    assert (args.model, args.device, args.dtype) == ("smollm2-135m", "cpu", "bfloat16")
    helps = {a.dest: a.help for a in _subparser(parser, command)._actions if a.dest in ("model", "dtype")}
    reference = {a.dest: a.help for a in _subparser(parser, ["info"])._actions if a.dest in ("model", "dtype")}
    assert helps == reference


def test_models_load_in_bfloat16_on_cuda_and_float32_elsewhere_unless_told():
    assert default_dtype("cuda") == torch.bfloat16
    assert default_dtype(torch.device("cuda:1")) == torch.bfloat16
    assert default_dtype("cpu") == torch.float32


def test_profile_leaves_the_dtype_to_the_shared_default():
    args = build_parser().parse_args(["profile", "m", "--budget", "0.25", "-o", "p.json"])
    assert args.dtype is None and args.device is None
