"""Sampling never crashes on a bad parameter: validation refuses non-finite or out-of-range values, and
``sample_next`` stays safe for any value that gets past it (no division by ~0, no NaN probabilities)."""

from __future__ import annotations

import math

import pytest
import torch

from headwise.engine import SamplingParams, sample_next
from headwise.errors import InputError


def unchecked(**fields) -> SamplingParams:
    """Params holding values validation would refuse, as a caller mutating a dataclass could produce."""
    params = SamplingParams()
    for k, v in fields.items():
        setattr(params, k, v)
    return params


LOGITS = torch.tensor([0.5, 3.0, 2.999, -1.0])


@pytest.mark.parametrize("temperature", [math.nan, 1e-300, 1e-38, 5e-324, -1.0, 0.0])
def test_nan_tiny_or_negative_temperature_samples_greedily(temperature):
    gen = torch.Generator().manual_seed(0)
    assert sample_next(LOGITS, unchecked(temperature=temperature), gen) == 1


def test_nan_top_p_keeps_the_whole_distribution():
    a = [sample_next(LOGITS, unchecked(temperature=1.0, top_p=math.nan), torch.Generator().manual_seed(s))
         for s in range(20)]
    b = [sample_next(LOGITS, unchecked(temperature=1.0, top_p=1.0), torch.Generator().manual_seed(s))
         for s in range(20)]
    assert a == b


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_logits_fall_back_to_the_largest_finite_one(bad):
    logits = torch.tensor([0.1, 2.0, bad, 1.0]) if bad != math.inf else torch.tensor([0.1, 2.0, bad, bad])
    got = sample_next(logits, unchecked(temperature=0.7), torch.Generator().manual_seed(0))
    if bad == math.inf:
        assert got == 2  # an infinite logit is the argmax
    else:
        assert got == 1


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"temperature": math.nan}, "temperature"), ({"temperature": math.inf}, "temperature"),
     ({"temperature": -1.0}, "temperature"), ({"top_p": math.nan}, "top_p"), ({"top_p": 0.0}, "top_p"),
     ({"top_p": 1.5}, "top_p"), ({"seed": 1 << 64}, "seed"), ({"seed": -(1 << 63) - 1}, "seed")],
)
def test_sampling_params_refuse_non_finite_or_out_of_range(fields, message):
    with pytest.raises(InputError, match=message):
        SamplingParams(**fields)


@pytest.mark.parametrize(
    ("flags", "word"),
    [(["--temperature", "nan"], "temperature"), (["--temperature", "-1"], "temperature"),
     (["--temperature", "inf"], "temperature"), (["--top-p", "0"], "top_p"), (["--top-p", "nan"], "top_p")],
)
def test_generate_refuses_bad_sampling_flags_in_one_line(flags, word, capsys):
    from headwise.cli import main

    assert main(["generate", "smollm2-135m", "--prompt", "hi", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("headwise: error:") and word in err and "\n" not in err
    assert "Traceback" not in err
